"""RDE: relationship representations disentangled into a Gaussian-mixture form (He, Hou, Bei, Ren;
the text ends after Sec. 4.1). Training-time only: nothing here runs at inference, where the
baseline's relation features are used as they are.

Thin ``nn.Module``s:

- :class:`FDVAE` - Sec. 3.2, Eq. 1-3: the feature-disentangling VAE, f_k -> (mu_k, sigma^s_k,
  sigma^o_k) -> f'_k = W_dec(mu_k + lambda (sigma^s_k + sigma^o_k)), no random sampler;
- :func:`prototype_loss`, :func:`prototype_separation_loss` - Sec. 3.3, Eq. 4 (L_proto), on
  :func:`sgg_kernels.prototype_distance` (cosine and Euclidean distance in one fused pass);
- :func:`information_loss` - Sec. 3.4, Eq. 5 (L_info): subject and object classes from sigma;
- :func:`reconstruction_loss` - Sec. 3.5 (L_re): MSE + cosine;
- :class:`RDE` - Sec. 3.5, Eq. 6: all of the above on a batch of relation features, a dict of
  scalar losses.

Readings of the paper (its printed formulas leave these open; each is a documented choice):

- **Eq. 1 / Sec. 3.1** sigma_k has a subject part and an object part, f_k <-> mu_k + sigma^s_k +
  sigma^o_k: FDVAE has one mu branch and two sigma branches (s and o) of ``num_blocks`` blocks each.
- **Eq. 2-3, the encoder blocks** X^(l) = X^(l-1) + g(Attn(X^(l-1), ref) V(ref)), g = Linear +
  ReLU. Attn is single-head scaled dot-product cross-attention with a LayerNorm on the query
  (pre-norm, for stability; Fig. 4's details are not in the text). The mu branch attends, per
  sample, over the ``num_prototypes`` learnable prototypes ("a standard cross-attention layer").
  The sigma branches attend over the mu of the *batch* (the rows of mu are the keys): a single key
  would make softmax = 1 and the negated map 1 - Attn = 0, so the references must be a set. The
  negated map (1 - A) is renormalised by its row sum N - 1 so its weights sum to 1 as A's do
  (N = 1: no update). The printed sum of the negated map is ``literal_negation=True``.
- **Attention width** (``attn_dim``, a). Eq. 3 prints g(Attn(X, ref) ref): a "standard
  cross-attention layer" whose values are the references themselves, and g "a Linear layer and a
  ReLU layer" whose output is added to X (Eq. 2), so g must *end* at width D; nothing in the text
  fixes the width of the attention's query/key space, nor of the values g reads. The paper's own
  width, every projection D x D (q, k, v and g in each of the 3 x 6 blocks), is ``attn_dim=None``
  (or ``"full"``): 1.26 billion parameters at D = 4096, which is not the "lightweight"
  plug-in the paper describes. The default narrows the attention as multi-head attention narrows
  a head: q, k, v map D -> a and g = Linear(a, D) + ReLU is the output projection back to D
  (g's Linear is the only D-wide map after the attention, so it is where the width must come back;
  narrowing only q/k would still leave 2 D^2 per block, 604 M at D = 4096). For the mu branch
  this costs nothing once a >= Q: its values A V(P) lie in the span of the Q prototypes and its
  scores are a D -> Q map, so both have rank <= Q at any width, and a >= Q spans every such map.
  For the sigma branches (references: the batch's mu) the update of each block becomes rank <= a.
  ``attn_dim="auto"`` is a = min(D, max(128, Q)); for D <= 128 (or Q >= D) it equals the full width.
- **Decoder** f' = W_dec(mu + lambda sigma), lambda a learnable scalar (init 1), W_dec one
  Linear ("a simple linear layer is introduced as sampling generation"), no noise. The shuffled
  pair (mu_k, sigma_j) uses j = (k + r) mod N with one random r in [1, N): every sample takes the
  sigma of *another* sample, as Sec. 3.2 asks, with no data-dependent control flow.
- **Eq. 4** prints D(mu, P) = L2(mu) . L2(P) + ||mu - P||_2, a similarity plus a distance, while
  the loss "pulls in the distances between mu_k and P_k". Minimising the printed D would push the
  cosine *down*; the default reading makes both terms dissimilarities:
  D(mu, P) = (1 - cos(mu, P)) + ||mu - P||_2, zero iff mu = P. ``literal=True`` gives the printed
  D = cos + ||.||. L_proto = mean_k D(mu_k, P_{y_k}).
- **Prototype separation** "pushes out the distances between prototypes" (D(P_k, P_-k)): a hinge
  mean_{q != q'} relu(margin - D(P_q, P_q')), bounded, so prototypes do not fly apart for ever.
- **Eq. 5** is printed as ``argmin(w2 ReLU(w1 sigma_k), m)``; it is the cross-entropy of an MLP
  classifier (w1, ReLU, w2) on sigma: subject classes from sigma^s, object classes from sigma^o.
- **L_re** = MSE(f', f) + mean(1 - cos(f', f)) for the unshuffled f' (the shuffled f'' has no
  target: it feeds the relation classifier only). The target f is detached by default, so the
  reconstruction trains the FDVAE and does not pull the baseline's features toward what is easy
  to reconstruct.
- **L_pred** is the baseline's own relation classification loss. If a ``classifier`` (the
  baseline's, shared) is given, :class:`RDE` adds the cross-entropy of its logits on f' and f''
  against the relation labels as ``"pred_rde"``; otherwise the caller adds its L_pred.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from ..ops.prototypes import prototype_distance

__all__ = [
    "FDVAE",
    "RDE",
    "prototype_loss",
    "prototype_separation_loss",
    "information_loss",
    "reconstruction_loss",
]


def _mean(x: Tensor) -> Tensor:
    """Mean that is 0 (not NaN) for an empty tensor: a batch without relations adds no loss."""
    return x.sum() / max(x.numel(), 1)


def _value_checks() -> bool:
    """Value checks read device data (a sync): only while ``sgg_kernels.set_checks(True)`` (the
    package's switch), not already done by an enclosing module, and outside torch.compile tracing."""
    return _checks.module_value_checks()


# ---------------------------------------------------------------------------------------------
# FDVAE (Sec. 3.2, Eq. 1-3)
# ---------------------------------------------------------------------------------------------
class _EncoderBlock(nn.Module):
    """One block of Eq. 3: X <- X + g(A V(ref)), A = softmax(q(LN X) k(ref)^T / sqrt(a)) or its
    negation (1 - A), renormalised to rows summing to 1 unless ``literal``.

    q, k, v map D -> a (``attn_dim``; None: a = D, the paper's full width) and g = Linear(a, D) +
    ReLU maps the attended values back to D for the residual of Eq. 2."""

    def __init__(self, dim: int, negate: bool, literal: bool = False, attn_dim: Optional[int] = None):
        super().__init__()
        width = dim if attn_dim is None else attn_dim
        self.negate, self.literal, self.attn_dim = negate, literal, width
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, width, bias=False)
        self.k = nn.Linear(dim, width, bias=False)
        self.v = nn.Linear(dim, width, bias=False)
        self.g = nn.Sequential(nn.Linear(width, dim), nn.ReLU())  # g(.): Linear + ReLU (Eq. 3), a -> D
        self.scale = 1.0 / math.sqrt(width)

    def forward(self, x: Tensor, ref: Tensor) -> Tensor:
        attn = torch.softmax(self.q(self.norm(x)) @ self.k(ref).T * self.scale, dim=-1)  # [N, R]
        if self.negate:  # Eq. 3, sigma branch: information of ref *unrelated* to x
            attn = 1 - attn
            if not self.literal:
                attn = attn / max(ref.shape[0] - 1, 1)
        return x + self.g(attn @ self.v(ref))  # Eq. 2: X^(l) = X^(l-1) + dI


DEFAULT_ATTN_DIM = 128  # "auto": min(D, max(128, Q)), see :func:`resolve_attn_dim`


def resolve_attn_dim(attn_dim, dim: int, num_prototypes: int) -> int:
    """The encoder blocks' attention width a for an ``attn_dim`` argument.

    ``"auto"`` (the default): min(D, max(128, Q)); ``None`` or ``"full"``: D, the paper's full
    width (q, k, v, g all D x D); an int >= 1: that width.
    """
    if attn_dim is None or attn_dim == "full":
        return dim
    if attn_dim == "auto":
        return min(dim, max(DEFAULT_ATTN_DIM, num_prototypes))
    if isinstance(attn_dim, str):
        raise ValueError(f"attn_dim must be a positive int, 'auto' or None/'full' (D), got {attn_dim!r}")
    return _checks.positive_int(attn_dim, "attn_dim", "the width of the encoder blocks' q/k/v and g's input")


class FDVAE(nn.Module):
    """The feature-disentangling VAE of Sec. 3.2 (Eq. 1-3): f -> (mu, sigma^s, sigma^o) -> f'.

    The mu branch stacks ``num_blocks`` cross-attention blocks over the learnable prototypes P
    (Eq. 3, top); each sigma branch stacks ``num_blocks`` blocks over the batch's mu with the
    negated attention map 1 - Attn (Eq. 3, bottom). The decoder is f' = W_dec(mu + lambda sigma)
    with sigma = sigma^s + sigma^o and no random sampler. See the module docstring for each reading.

    Args:
        dim (int): D, the width of the relation features.
        num_prototypes (int): Q, one learnable prototype per relation class.
        num_blocks (int): encoder blocks per branch (6 in the paper).
        literal_negation (bool): use the printed 1 - Attn (rows summing to N - 1) instead of its
            row-normalised form.
        attn_dim (int, "auto", "full" or None): a, the width of every encoder block's q, k, v
            projections and of g's input (g = Linear(a, D) + ReLU). ``"auto"`` (default):
            min(D, max(128, Q)); ``None`` / ``"full"``: a = D, the paper's full width. See
            :class:`RDE` for the parameter counts and the reading.

    Shapes: ``forward(f [N, D])`` -> dict with ``mu``, ``sigma_s``, ``sigma_o``, ``sigma`` (all
    ``[N, D]``) and ``recon`` f' ``[N, D]``; :meth:`decode` and :meth:`shuffled` give f' and f''.
    ``f`` must have the parameters' dtype (outside autocast).
    """

    def __init__(self, dim: int, num_prototypes: int, num_blocks: int = 6, literal_negation: bool = False,
                 attn_dim="auto"):
        super().__init__()
        self.dim = _checks.positive_int(dim, "dim", "D, the width of the relation features")
        self.num_prototypes = _checks.positive_int(num_prototypes, "num_prototypes", "Q, one per relation class")
        self.num_blocks = _checks.positive_int(num_blocks, "num_blocks", "encoder blocks per branch")
        self.attn_dim = resolve_attn_dim(attn_dim, self.dim, self.num_prototypes)
        a = self.attn_dim
        self.prototypes = nn.Parameter(torch.randn(self.num_prototypes, self.dim) / math.sqrt(self.dim))
        self.mu_blocks = nn.ModuleList(
            _EncoderBlock(self.dim, negate=False, attn_dim=a) for _ in range(self.num_blocks))
        self.sigma_s_blocks = nn.ModuleList(
            _EncoderBlock(self.dim, negate=True, literal=literal_negation, attn_dim=a) for _ in range(self.num_blocks))
        self.sigma_o_blocks = nn.ModuleList(
            _EncoderBlock(self.dim, negate=True, literal=literal_negation, attn_dim=a) for _ in range(self.num_blocks))
        self.decoder = nn.Linear(self.dim, self.dim)  # "a simple linear layer ... as sampling generation"
        self.lam = nn.Parameter(torch.ones(()))  # lambda of f' = mu + lambda sigma

    def encode(self, f: Tensor) -> Dict[str, Tensor]:
        """Eq. 2-3: ``f [N, D]`` -> ``mu``, ``sigma_s``, ``sigma_o``, ``sigma`` (= sigma_s + sigma_o)."""
        mu = f
        for block in self.mu_blocks:
            mu = block(mu, self.prototypes)  # X_mu^(l) = X_mu^(l-1) + g(Attn(X_mu^(l-1), P) P)
        sigma_s, sigma_o = f, f
        for block_s, block_o in zip(self.sigma_s_blocks, self.sigma_o_blocks):
            sigma_s = block_s(sigma_s, mu)  # X_sigma^(l) = X_sigma^(l-1) + g((1 - Attn(X_sigma, mu)) mu)
            sigma_o = block_o(sigma_o, mu)
        return {"mu": mu, "sigma_s": sigma_s, "sigma_o": sigma_o, "sigma": sigma_s + sigma_o}

    def decode(self, mu: Tensor, sigma: Tensor) -> Tensor:
        """f' = W_dec(mu + lambda sigma): Eq. 1 read right to left, no random sampler."""
        return self.decoder(mu + self.lam * sigma)

    @staticmethod
    def shuffle_index(n: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """j(k) = (k + r) mod n with one random r in [1, n): every sample gets another's sigma
        (n = 1: itself). ``[n]`` int64."""
        r = torch.randint(1, max(n, 2), (1,), device=device, generator=generator) if n > 1 else \
            torch.zeros(1, dtype=torch.int64, device=device)
        return (torch.arange(n, device=device) + r) % max(n, 1)

    def shuffled(self, mu: Tensor, sigma: Tensor, index: Tensor) -> Tensor:
        """f'' = W_dec(mu_k + lambda sigma_{index[k]}): the shuffled pairs of Sec. 3.2."""
        return self.decode(mu, sigma[index])

    def forward(self, f: Tensor) -> Dict[str, Tensor]:
        _checks.tensor(f, "f", "N, D")
        _checks.size(f, "f", 1, self.dim, "dim")
        _checks.module_dtype([("f", f)], "FDVAE", self.prototypes.dtype)
        out = self.encode(f)
        out["recon"] = self.decode(out["mu"], out["sigma"])
        return out


# ---------------------------------------------------------------------------------------------
# Losses (Sec. 3.3-3.5, Eq. 4-6)
# ---------------------------------------------------------------------------------------------
def _distance(cos: Tensor, dist: Tensor, literal: bool) -> Tensor:
    """Eq. 4's D from the fused op's (cos, dist): (1 - cos) + dist, or the printed cos + dist."""
    return cos + dist if literal else (1 - cos) + dist


def _valid(labels: Tensor, upper: int) -> Tensor:
    """``labels`` in [0, upper), elementwise: no sync, no data-dependent control flow."""
    return (labels >= 0) & (labels < upper)


def prototype_loss(mu: Tensor, prototypes: Tensor, labels: Tensor, literal: bool = False) -> Tensor:
    """L_proto's attraction, Eq. 4: mean_k D(mu_k, P_{y_k}).

    Args:
        mu (Tensor[N, D]), prototypes (Tensor[Q, D]), labels (Tensor[N] int64 in [0, Q)).
        literal (bool): the printed D = cos + ||mu - P|| instead of (1 - cos) + ||mu - P||.

    Returns:
        scalar Tensor (0 for N = 0). A label outside [0, Q) is not read: its sample contributes 0
        to the sum (the mean still divides by N). :class:`RDE` raises on such labels while
        ``sgg_kernels.set_checks(True)``; this function never checks (no sync).
    """
    Q = prototypes.shape[0]
    if Q == 0:  # no prototype to pull towards: every label is invalid
        return mu.new_zeros(())
    cos, dist = prototype_distance(mu, prototypes)  # [N, Q] each, one fused pass
    D = _distance(cos, dist, literal)
    valid = _valid(labels, Q)
    picked = D.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    return _mean(torch.where(valid, picked, 0))


def prototype_separation_loss(prototypes: Tensor, margin: float = 1.0, literal: bool = False) -> Tensor:
    """L_proto's repulsion, D(P_k, P_-k): mean over ordered pairs q != q' of relu(margin - D(P_q, P_q')).

    Returns:
        scalar Tensor (0 for fewer than two prototypes).
    """
    Q = prototypes.shape[0]
    cos, dist = prototype_distance(prototypes, prototypes)
    D = _distance(cos, dist, literal)
    off = ~torch.eye(Q, dtype=torch.bool, device=prototypes.device)
    # A where, not D[off]: boolean-mask indexing has a data-dependent size, so it syncs the host.
    return torch.where(off, F.relu(margin - D), 0).sum() / max(Q * (Q - 1), 1)


def _cross_entropy_sum(logits: Tensor, labels: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Sum of the cross-entropies of the rows whose label is in [0, C) (and ``valid``); a row with an
    invalid label contributes 0 and its label is never read (no sync, no out-of-bounds read)."""
    ok = _valid(labels, logits.shape[1])
    if valid is not None:
        ok = ok & valid
    ce = F.cross_entropy(logits, torch.where(ok, labels, 0), reduction="none")
    return torch.where(ok, ce, 0).sum()


def information_loss(logits_s: Tensor, logits_o: Tensor, subj_labels: Tensor, obj_labels: Tensor) -> Tensor:
    """L_info, Eq. 5: cross-entropy of the subject classes (from sigma^s) plus the object classes
    (from sigma^o). ``logits_* [N, num_obj_classes]``, labels ``[N]`` int64; 0 for N = 0. A label
    outside [0, num_obj_classes) contributes 0 to its term (the mean still divides by N)."""
    ce_s = _cross_entropy_sum(logits_s, subj_labels)
    ce_o = _cross_entropy_sum(logits_o, obj_labels)
    return (ce_s + ce_o) / max(subj_labels.shape[0], 1)


def reconstruction_loss(recon: Tensor, target: Tensor) -> Tensor:
    """L_re (Sec. 3.5): MSE(f', f) + mean(1 - cos(f', f)); 0 for N = 0."""
    mse = _mean((recon - target) ** 2)
    cos = F.cosine_similarity(recon, target, dim=-1, eps=1e-12)
    return mse + _mean(1 - cos)


class RDE(nn.Module):
    """RDE's training losses on a batch of relation features (Sec. 3, Eq. 6), training-time only.

    ``forward(rel_feats, rel_labels, subj_labels, obj_labels)`` runs :class:`FDVAE` and returns a
    dict of scalar losses:

    - ``"proto"``: L_proto's attraction (Eq. 4), mean D(mu_k, P_{y_k});
    - ``"proto_sep"``: L_proto's prototype-to-prototype separation (hinge, ``margin``);
    - ``"info"``: L_info (Eq. 5), subject/object classes from sigma^s/sigma^o by MLP heads;
    - ``"re"``: L_re, MSE + cosine between f' and f;
    - ``"pred_rde"`` (only with a ``classifier``): cross-entropy of ``classifier(f')`` and
      ``classifier(f'')`` (the shuffled pairs) against the relation labels;
    - ``"total"``: the weighted sum, Eq. 6 without the baseline's own L_pred (add it yourself).

    Args:
        dim (int): D, the width of ``rel_feats``.
        num_rel_classes (int): relation classes (prototypes), background included if your labels
            have it.
        num_obj_classes (int): object classes of the subject / object labels.
        num_blocks (int): FDVAE encoder blocks per branch (6).
        attn_dim (int, "auto", "full" or None): a, the encoder blocks' attention width: q, k, v map
            D -> a and g = Linear(a, D) + ReLU. ``"auto"`` (default): min(D, max(128,
            num_rel_classes)); ``None`` / ``"full"``: a = D, the paper's full width (see below).
        info_hidden (int): hidden width of the Eq. 5 classifiers (w1); ``dim`` if None.
        margin (float): separation hinge margin (1.0).
        literal (bool): the printed Eq. 4 (cos + distance), see the module docstring.
        literal_negation (bool): the printed 1 - Attn in the sigma branches.
        detach_target (bool): reconstruct a detached f (True).
        classifier (nn.Module or None): the baseline's relation classifier ``[N, D] -> [N,
            num_rel_classes]``, shared; enables ``"pred_rde"``.
        weights (dict or None): loss weights, default 1 for every term.

    **Size** (parameters, measured by instantiating ``RDE(dim, 51, 151)``: 6 blocks per branch,
    ``info_hidden = dim``, no classifier; the FDVAE's share in brackets):

    =====  ==================================  ====================================
    dim    default ``attn_dim="auto"`` (a)      paper width ``attn_dim=None`` (a = D)
    =====  ==================================  ====================================
    4096   89,760,047 (FDVAE 54,960,129), 128   1,259,970,863 (FDVAE 1,225,170,945)
    2048   32,297,263 (FDVAE 23,285,761), 128   315,412,783 (FDVAE 306,401,281)
    1024   13,003,055 (FDVAE 10,594,305), 128   79,063,343 (FDVAE 76,654,593)
    512    5,715,247 (FDVAE 5,035,009), 128     19,871,023 (FDVAE 19,190,785)
    =====  ==================================  ====================================

    Of the 89.8 M at dim 4096, 34.8 M are the two Eq. 5 classifiers (``info_hidden``) and 16.8 M
    the decoder W_dec (D x D); ``info_hidden=1024`` brings the total to 63.7 M.

    **Inputs.** ``rel_feats`` must have the parameters' dtype (a ``ValueError`` naming it and the
    dtype expected otherwise; under ``torch.autocast`` the matmuls cast). Labels are checked with
    :func:`sgg_kernels.set_checks` on (the default): an ``IndexError`` naming the argument and its
    range [0, num_rel_classes) / [0, num_obj_classes) (``shuffle``: [0, P)), raised before anything
    runs; all of them cost one fused reduction and one host sync per forward. With checks off no
    value is read back to the host (no sync) and no label is used as an index out of range: as
    everywhere in the package an invalid index contributes zeros. A ``rel_labels`` entry outside
    [0, num_rel_classes) removes that sample from ``"proto"`` and from both of its ``"pred_rde"``
    terms, a ``subj_labels`` / ``obj_labels`` entry from its half of ``"info"``, a ``shuffle``
    entry from the shuffled ``"pred_rde"`` term; the means still divide by P (2P for
    ``"pred_rde"``). ``"re"`` and ``"proto_sep"`` use no label.
    """

    TERMS = ("proto", "proto_sep", "info", "re", "pred_rde")

    def __init__(self, dim: int, num_rel_classes: int, num_obj_classes: int, num_blocks: int = 6,
                 info_hidden: Optional[int] = None, margin: float = 1.0, literal: bool = False,
                 literal_negation: bool = False, detach_target: bool = True,
                 classifier: Optional[nn.Module] = None, weights: Optional[Dict[str, float]] = None,
                 attn_dim="auto"):
        super().__init__()
        self.dim = _checks.positive_int(dim, "dim", "D, the width of rel_feats")
        self.num_rel_classes = _checks.positive_int(num_rel_classes, "num_rel_classes", "relation classes")
        self.num_obj_classes = _checks.positive_int(num_obj_classes, "num_obj_classes", "object classes")
        hidden = self.dim if info_hidden is None else _checks.positive_int(info_hidden, "info_hidden", "w1's width")
        if not isinstance(margin, numbers.Real) or isinstance(margin, bool) or margin < 0:
            raise ValueError(f"margin must be a float >= 0, got {margin!r}")
        self.margin, self.literal, self.detach_target = float(margin), bool(literal), bool(detach_target)
        self.fdvae = FDVAE(self.dim, self.num_rel_classes, num_blocks, literal_negation=literal_negation,
                           attn_dim=attn_dim)
        # Eq. 5: w2 ReLU(w1 sigma), one classifier per role
        self.info_subj = nn.Sequential(nn.Linear(self.dim, hidden), nn.ReLU(), nn.Linear(hidden, self.num_obj_classes))
        self.info_obj = nn.Sequential(nn.Linear(self.dim, hidden), nn.ReLU(), nn.Linear(hidden, self.num_obj_classes))
        self.classifier = classifier
        weights = dict(weights or {})
        unknown = set(weights) - set(self.TERMS)
        if unknown:
            raise ValueError(f"weights has unknown terms {sorted(unknown)}; the terms are {list(self.TERMS)}")
        self.weights = {t: float(weights.get(t, 1.0)) for t in self.TERMS}

    @property
    def prototypes(self) -> Tensor:
        """P, ``[num_rel_classes, dim]``."""
        return self.fdvae.prototypes

    @property
    def attn_dim(self) -> int:
        """a, the encoder blocks' attention width (``dim`` for the paper's full width)."""
        return self.fdvae.attn_dim

    def _check(self, rel_feats, rel_labels, subj_labels, obj_labels, shuffle=None) -> None:
        _checks.tensor(rel_feats, "rel_feats", "P, D")
        _checks.size(rel_feats, "rel_feats", 1, self.dim, "dim")
        _checks.module_dtype([("rel_feats", rel_feats)], "RDE", self.prototypes.dtype)
        params = getattr(self.classifier, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        if first is not None and first.is_floating_point() and first.dtype != self.prototypes.dtype \
                and not torch.is_autocast_enabled(rel_feats.device.type):
            raise ValueError(f"classifier's parameters are {str(first.dtype).replace('torch.', '')} but RDE's are "
                             f"{str(self.prototypes.dtype).replace('torch.', '')}: convert both to one dtype")
        N = rel_feats.shape[0]
        ranges = [("rel_labels", rel_labels, self.num_rel_classes, "num_rel_classes"),
                  ("subj_labels", subj_labels, self.num_obj_classes, "num_obj_classes"),
                  ("obj_labels", obj_labels, self.num_obj_classes, "num_obj_classes")]
        for name, labels, _, _ in ranges:
            _checks.tensor(labels, name, "P", kind="index")
            _checks.size(labels, name, 0, N, "P, the rows of rel_feats")
        _checks.same_device([("rel_feats", rel_feats), ("rel_labels", rel_labels), ("subj_labels", subj_labels),
                             ("obj_labels", obj_labels)])
        if self.classifier is not None and shuffle is not None:
            _checks.tensor(shuffle, "shuffle", "P", kind="index")
            _checks.size(shuffle, "shuffle", 0, N, "P, the rows of rel_feats")
            _checks.same_device([("rel_feats", rel_feats), ("shuffle", shuffle)])
            ranges.append(("shuffle", shuffle, N, "P, the rows of rel_feats"))
        if _value_checks():  # every label (and shuffle) in range: one fused reduction, one sync
            _checks.index_ranges(ranges)

    def forward(self, rel_feats: Tensor, rel_labels: Tensor, subj_labels: Tensor, obj_labels: Tensor,
                shuffle: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """
        Args:
            rel_feats (Tensor[P, D]): f, the baseline's relation representations.
            rel_labels (Tensor[P] int64): relation classes in [0, num_rel_classes).
            subj_labels, obj_labels (Tensor[P] int64): object classes in [0, num_obj_classes).
            shuffle (Tensor[P] int64 or None): j(k), whose sigma sample k's shuffled pair takes;
                None draws :meth:`FDVAE.shuffle_index` (pass one for reproducible runs; a
                ``torch.Generator`` cannot enter a compiled graph, an index can).

        Returns:
            dict of scalar Tensors (see the class docstring); every term is 0 for P = 0.
        """
        self._check(rel_feats, rel_labels, subj_labels, obj_labels, shuffle)
        out = self.fdvae(rel_feats)
        mu, sigma = out["mu"], out["sigma"]
        target = rel_feats.detach() if self.detach_target else rel_feats
        losses = {
            "proto": prototype_loss(mu, self.prototypes, rel_labels, self.literal),  # Eq. 4
            "proto_sep": prototype_separation_loss(self.prototypes, self.margin, self.literal),
            "info": information_loss(self.info_subj(out["sigma_s"]), self.info_obj(out["sigma_o"]),  # Eq. 5
                                     subj_labels, obj_labels),
            "re": reconstruction_loss(out["recon"], target),
        }
        if self.classifier is not None:
            N = rel_feats.shape[0]
            if shuffle is None:
                shuffle = FDVAE.shuffle_index(N, rel_feats.device)  # in [0, P) by construction
            shuffle_ok = _valid(shuffle, N)  # checks off: an invalid j masks its shuffled pair out
            # f'' = W_dec(mu_k + lambda sigma_j)
            shuffled = self.fdvae.shuffled(mu, sigma, torch.where(shuffle_ok, shuffle, 0))
            logits = self.classifier(torch.cat([out["recon"], shuffled]))
            rel_ok = _valid(rel_labels, self.num_rel_classes)  # also if the classifier has more outputs
            keep = torch.cat([rel_ok, rel_ok & shuffle_ok])
            losses["pred_rde"] = _cross_entropy_sum(logits, torch.cat([rel_labels, rel_labels]), keep) / max(2 * N, 1)
        losses["total"] = sum(self.weights[t] * v for t, v in losses.items())  # Eq. 6 (baseline L_pred apart)
        return losses
