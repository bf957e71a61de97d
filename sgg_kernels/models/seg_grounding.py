"""Segmentation-grounded SGG (Khandelwal, Suhail, Sigal, "Segmentation-grounded Scene Graph Generation",
ICCV'21, Sec. 2.3-2.6, Eq. 3-9).

Thin ``nn.Module``s over the ops of the ``masks`` family:

- :class:`MaskTransfer` - Sec. 2.3, Eq. 3-4: the zero-shot transfer of a segmentation head's masks
  over the d_m classes of D^m (e.g. COCO) to the d_g classes of the scene-graph dataset D^g (e.g.
  VG), through a class-similarity matrix S [d_g, d_m] (a buffer, not trained);
- :class:`ObjectGrounding` - Sec. 2.4, Eq. 5: f_N, object features joined with their masks;
- :class:`GaussianPairMasks` - Sec. 2.5, Eq. 6: each pair's masks smoothed by Gaussian kernels
  predicted from the label scores, multiplied (:func:`sgg_kernels.pair_mask_conv`, fused);
- :class:`EdgeGrounding` - Sec. 2.5, Eq. 7: f_E, union features joined with the pair masks;
- :class:`MaskRefinement` - Sec. 2.6, Eq. 8-9: f_M', a zero-initialised residual on the masks from
  context features, and its pixel-wise binary cross-entropy (Eq. 10's L^seg, used in Eq. 11).

How the pieces connect (K objects, P pairs (subject, object) int64, all packed over a batch)::

    masks  = transfer(mask_logits)                         [K, d_g, m, m]   Eq. 4, every class
    masks  = refine(masks, context)                        [K, d_g, m, m]   Eq. 9 (optional)
    z_hat  = ground_obj(roi_feats, masks)                  [K, D, m, m]     Eq. 5
    m_pair = pair_masks(masks, label_scores, pairs,
                        boxes, out_size=R)                 [P, d_g, R, R]   Eq. 6, union frame
    z_hat_pair = ground_edge(union_feats, m_pair)          [P, Du, R, R]    Eq. 7

Where the paper and the authors' released code differ, each class says which one it follows.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from .._backend import suspended_value_checks
from ..ops.masks import _check_conv_values, _check_frame, _mask_boxes, gaussian_kernels, pair_mask_conv, transfer_masks

__all__ = [
    "MaskTransfer",
    "ObjectGrounding",
    "GaussianPairMasks",
    "EdgeGrounding",
    "MaskRefinement",
]

PER_CHOICES = ("pair", "object")


def _check_square_masks(masks: Tensor, name: str, dims: str) -> None:
    _checks.tensor(masks, name, dims)
    if masks.shape[-1] != masks.shape[-2]:
        raise ValueError(f"{name} must be square [{dims}], got {_checks._describe(masks)}")


# ---------------------------------------------------------------------------------------------
# Mask transfer (Sec. 2.3, Eq. 3-4)
# ---------------------------------------------------------------------------------------------
class MaskTransfer(nn.Module):
    """Zero-shot mask transfer, Eq. 3-4: masks of the d_g target classes from the d_m source ones.

    A segmentation head f_M trained on D^m gives each object mask logits over the source classes,
    m~ = f_M(z) [d_m, m, m]. The mask of target class c is a similarity-weighted mix of the source
    classes' masks::

        m[c] = sum_j S[c, j] sigmoid(m~[j])                                   Eq. 4

    (Eq. 4 prints S^T m~; with S of shape [d_g, d_m], as the paper defines it, the product that
    gives d_g masks is S m~. The sigmoid comes first, as in :func:`sgg_kernels.transfer_masks`, so
    each transferred mask is a convex mix of probabilities and stays in [0, 1]; the released code
    mixes the logits and applies the sigmoid after.)

    **S.** Eq. 3 defines S[c_g, c_m] = g_{c_g}^T g_{c_m}, dot products of the classes' word
    embeddings (300-d GloVe, multi-word names averaged; footnote 4). The authors' released scheme,
    which :meth:`similarity_from_embeddings` computes, turns it into mixing weights:

    1. row-softmax of the dot products: S = softmax_row(G_t G_s^T), each target row sums to 1;
    2. entries below ``threshold`` (0.05) are zeroed, except the row's largest (so no row empties),
       and each row is renormalised to sum 1;
    3. a target class that also exists in D^m ("shared", e.g. VG "person" and COCO "person") gets a
       one-hot row: its mask is copied from that source class directly.

    Pass the two embedding matrices (nothing is downloaded) or a ready-made ``similarity`` [d_g, d_m],
    which is used as given (``shared`` rows are still made one-hot). S is a buffer: it moves with
    ``.to()``, is saved in the ``state_dict`` and is not trained.

    Args:
        similarity (Tensor[d_g, d_m] or None): a prepared S; or None with both embeddings.
        target_embeddings (Tensor[d_g, E] or None): the target classes' embeddings G_t.
        source_embeddings (Tensor[d_m, E] or None): the source classes' embeddings G_s.
        shared (dict[int, int] or Tensor[d_g] int64 or None): target class -> source class for the
            classes in both datasets; as a tensor, -1 marks a target class with no counterpart.
        threshold (float): step 2's cut, in [0, 1); only with embeddings.
    """

    def __init__(self, similarity: Optional[Tensor] = None, *, target_embeddings: Optional[Tensor] = None,
                 source_embeddings: Optional[Tensor] = None,
                 shared: Optional[Union[Dict[int, int], Tensor]] = None, threshold: float = 0.05):
        super().__init__()
        have_emb = target_embeddings is not None or source_embeddings is not None
        if (similarity is not None) == have_emb:  # both given, or neither
            raise ValueError("MaskTransfer takes either similarity [d_g, d_m] or both target_embeddings [d_g, E] and "
                             "source_embeddings [d_m, E], not both and not neither")
        if have_emb:
            if target_embeddings is None or source_embeddings is None:
                missing = "target_embeddings" if target_embeddings is None else "source_embeddings"
                raise ValueError(f"{missing} is missing: pass both target_embeddings and source_embeddings")
            S = self.similarity_from_embeddings(target_embeddings, source_embeddings, threshold)
        else:
            _checks.tensor(similarity, "similarity", "d_g, d_m")
            S = similarity.detach().clone()
        if shared is not None:
            S = self._copy_shared(S, shared)
        self.register_buffer("similarity", S)

    @property
    def num_target_classes(self) -> int:
        """d_g."""
        return self.similarity.shape[0]

    @property
    def num_source_classes(self) -> int:
        """d_m."""
        return self.similarity.shape[1]

    @staticmethod
    def similarity_from_embeddings(target_embeddings: Tensor, source_embeddings: Tensor,
                                   threshold: float = 0.05) -> Tensor:
        """Steps 1-2 of the class docstring: Eq. 3's dot products, row-softmax, threshold, renormalise.

        Args:
            target_embeddings (Tensor[d_g, E]), source_embeddings (Tensor[d_m, E]).
            threshold (float): entries below it are zeroed (a row's largest entry is always kept).

        Returns:
            Tensor[d_g, d_m], every row non-negative and summing to 1 (no gradient).
        """
        _checks.tensor(target_embeddings, "target_embeddings", "d_g, E")
        _checks.tensor(source_embeddings, "source_embeddings", "d_m, E")
        _checks.size(source_embeddings, "source_embeddings", 1, target_embeddings.shape[1],
                     "E, the width of target_embeddings")
        _checks.same_device([("target_embeddings", target_embeddings), ("source_embeddings", source_embeddings)])
        if source_embeddings.shape[0] == 0:
            raise ValueError("source_embeddings has no rows: there is no source class to transfer masks from")
        if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not 0 <= threshold < 1:
            raise ValueError(f"threshold must be a float in [0, 1), got {threshold!r}")
        with torch.no_grad():
            dtype = torch.promote_types(target_embeddings.dtype, source_embeddings.dtype)
            dots = target_embeddings.to(dtype) @ source_embeddings.to(dtype).T  # Eq. 3
            S = torch.softmax(dots, dim=1)
            keep = (S >= threshold) | (S == S.amax(dim=1, keepdim=True))
            S = S * keep
            return S / S.sum(dim=1, keepdim=True)

    @staticmethod
    def _copy_shared(S: Tensor, shared) -> Tensor:
        d_g, d_m = S.shape
        if isinstance(shared, Tensor):
            _checks.tensor(shared, "shared", "d_g", kind="index")
            _checks.size(shared, "shared", 0, d_g, "d_g, the target classes (-1 for none)")
            items = [(t, int(s)) for t, s in enumerate(shared.tolist()) if s != -1]
        elif isinstance(shared, dict):
            items = [(t, s) for t, s in shared.items()]
        else:
            raise TypeError(f"shared must be a dict {{target class: source class}} or an int64 tensor [d_g] "
                            f"(-1 for none), got {type(shared).__name__}")
        S = S.clone()
        for t, s in items:
            if not isinstance(t, numbers.Integral) or not 0 <= t < d_g:
                raise ValueError(f"shared maps target class {t!r}, outside [0, {d_g}) (d_g, the rows of similarity)")
            if not isinstance(s, numbers.Integral) or not 0 <= s < d_m:
                raise ValueError(f"shared maps target class {t} to source class {s!r}, outside [0, {d_m}) "
                                 "(d_m, the columns of similarity)")
            S[t] = 0
            S[t, s] = 1  # a class in both datasets: copied, not mixed
        return S

    def forward(self, mask_logits: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """Eq. 4.

        Args:
            mask_logits (Tensor[K, d_m, m, m]): f_M's mask logits over the source classes.
            labels (Tensor[K] int64 or None): each object's target class in [0, d_g); None for all
                classes.

        Returns:
            Tensor[K, d_g, m, m] (labels None: every target class, what :class:`GaussianPairMasks`,
            :class:`ObjectGrounding` and :class:`MaskRefinement` take), or Tensor[K, m, m] (each
            object's own class, via :func:`sgg_kernels.transfer_masks`; ``[:, None]`` makes it a
            one-channel ``[K, 1, m, m]``). Values in [0, 1] when the rows of S sum to at most 1.
        """
        _checks.tensor(mask_logits, "mask_logits", "K, d_m, m, m")
        _checks.size(mask_logits, "mask_logits", 1, self.num_source_classes,
                     "d_m, the source classes (columns) of the similarity")
        if labels is not None:
            return transfer_masks(mask_logits, self.similarity, labels)  # Eq. 4, own class
        _checks.same_device([("mask_logits", mask_logits), ("similarity", self.similarity)])
        S = self.similarity.to(mask_logits.dtype)
        return torch.einsum("gj,kjyx->kgyx", S, torch.sigmoid(mask_logits))  # Eq. 4, every class


# ---------------------------------------------------------------------------------------------
# Grounding convolutions (Sec. 2.4-2.5, Eq. 5 and 7)
# ---------------------------------------------------------------------------------------------
class _Grounding(nn.Module):
    """Concatenate features and masks along channels, one 3x3 convolution back to ``out_channels``."""

    _feats, _feat_dims, _masks, _mask_dims = "", "", "", ""

    def __init__(self, in_channels: int, mask_channels: int, out_channels: Optional[int] = None,
                 kernel_size: int = 3):
        super().__init__()
        self.in_channels = _checks.positive_int(in_channels, "in_channels", "channels of the features")
        self.mask_channels = _checks.positive_int(mask_channels, "mask_channels", "channels of the masks")
        self.out_channels = in_channels if out_channels is None else _checks.positive_int(
            out_channels, "out_channels", "channels of the output")
        k = _checks.positive_int(kernel_size, "kernel_size", "of the convolution")
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a 'same' convolution keeps the m x m size), got {k}")
        self.conv = nn.Conv2d(self.in_channels + self.mask_channels, self.out_channels, k, padding=k // 2)

    def _ground(self, feats: Tensor, masks: Tensor) -> Tensor:
        f, fd, mn, md = self._feats, self._feat_dims, self._masks, self._mask_dims
        _checks.tensor(feats, f, fd)
        _checks.tensor(masks, mn, md)
        _checks.size(feats, f, 1, self.in_channels, "in_channels")
        _checks.size(masks, mn, 0, feats.shape[0], f"the rows of {f}")
        _checks.size(masks, mn, 1, self.mask_channels, "mask_channels")
        if masks.shape[2:] != feats.shape[2:]:
            raise ValueError(f"{mn} has spatial size {list(masks.shape[2:])} but {f} has {list(feats.shape[2:])}; "
                             f"resample one of them (e.g. F.interpolate) so both cover the box on one grid")
        _checks.same_device([(f, feats), (mn, masks)])
        return self.conv(torch.cat([feats, masks.to(feats.dtype)], dim=1))


class ObjectGrounding(_Grounding):
    """f_N of Eq. 5: the segmentation-aware object representation z_hat = f_N([z, m]).

    ``roi_feats`` (z, RoIAlign of the object's box) and the object's masks, both on the same m x m
    grid over the box, are concatenated along channels and mixed by one 3x3 convolution back to the
    feature width, as in the authors' released code (``Conv2d(D + C, D, 3, padding=1)``, no
    activation). The detector's box head (flatten, fc6, fc7) then runs on z_hat as it ran on z,
    and z_hat goes to the object network with the label scores l (Sec. 2.4).

    Args:
        in_channels (int): D, the channels of ``roi_feats``.
        mask_channels (int): C, the channels of ``masks``: d_g (every class, as released;
            :class:`MaskTransfer` with ``labels=None``) or 1 (the object's own class).
        out_channels (int or None): width of z_hat; None keeps D.
        kernel_size (int): odd size of the convolution (3).
    """

    _feats, _feat_dims, _masks, _mask_dims = "roi_feats", "K, D, m, m", "masks", "K, C, m, m"

    def forward(self, roi_feats: Tensor, masks: Tensor) -> Tensor:
        """
        Args:
            roi_feats (Tensor[K, D, m, m]): z, the object features.
            masks (Tensor[K, C, m, m]): m, the object's masks in its box frame.

        Returns:
            Tensor[K, out_channels, m, m]: z_hat (Eq. 5). Masks are cast to the features' dtype.
        """
        return self._ground(roi_feats, masks)  # Eq. 5


class EdgeGrounding(_Grounding):
    """f_E of Eq. 7: the segmentation-aware pair representation z_hat_{j,j'} = f_E([z_{j,j'}, m_{j,j'}]).

    ``union_feats`` (RoIAlign of the pair's union box, e.g. :func:`sgg_kernels.union_roi_align`)
    and the pair masks of :class:`GaussianPairMasks` are concatenated along channels and mixed by one
    3x3 convolution back to the union features' width (the released code's ``mask_combiner``).
    The union features cover the union box, so compute the pair masks in the union frame
    (``boxes`` and ``out_size=R`` in :class:`GaussianPairMasks`); the released code concatenates
    masks in the objects' own box frames instead.

    Args:
        in_channels (int): Cu, the channels of ``union_feats``.
        mask_channels (int): C, the channels of the pair masks (d_g, or 1).
        out_channels (int or None): width of the output; None keeps Cu.
        kernel_size (int): odd size of the convolution (3).
    """

    _feats, _feat_dims, _masks, _mask_dims = "union_feats", "P, Cu, R, R", "pair_masks", "P, C, R, R"

    def forward(self, union_feats: Tensor, pair_masks: Tensor) -> Tensor:
        """
        Args:
            union_feats (Tensor[P, Cu, R, R]): z_{j,j'}, the union-box features of each pair.
            pair_masks (Tensor[P, C, R, R]): m_{j,j'} of Eq. 6 on the same grid.

        Returns:
            Tensor[P, out_channels, R, R] (Eq. 7).
        """
        return self._ground(union_feats, pair_masks)  # Eq. 7


# ---------------------------------------------------------------------------------------------
# Gaussian pair masks (Sec. 2.5, Eq. 6)
# ---------------------------------------------------------------------------------------------
def _rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` with out-of-range entries clamped into range (they can only reach here with
    ``sgg_kernels.set_checks(False)``: :func:`pair_mask_conv` then gives such a pair 0 and no
    gradient, so the value read does not matter); zeros when ``x`` has no rows."""
    n = x.shape[0]
    if n == 0:
        return x.new_zeros(tuple(index.shape) + tuple(x.shape[1:]))
    return x[index.clamp(0, n - 1)]


class GaussianPairMasks(nn.Module):
    """The attended union mask of Eq. 6: m_{j,j'} = (K_j (*) m_j) . (K_j' (*) m_j').

    K_j, K_j' are delta x delta Gaussian kernels with parameters (sigma_x^2, sigma_y^2, rho)
    predicted from the object label scores by a learned map ("variance head"), (*) a per-class
    convolution and . the element-wise product; the whole product is one fused op,
    :func:`sgg_kernels.pair_mask_conv`. Then, as in the released code's ``SIGMOID_ATTENTION``
    setting, a sigmoid (``sigmoid=True``).

    **Variance head** (``per``):

    - ``"pair"`` (the released code): ``Linear(2 (num_classes + 1), 6)`` on the concatenated
      label scores [l_s, l_o] of each pair, reshaped to [P, 2, 3]: the subject's and the object's
      kernel depend on both objects;
    - ``"object"`` (the paper's text, "sigma_x^2, sigma_y^2, rho = f(l_j)"): ``Linear(num_classes
      + 1, 3)`` on each object's own scores: one kernel per object, shared by its pairs.

    The head outputs (log sigma_x^2, log sigma_y^2, raw rho) (sigma = exp(v / 2) >= 1e-7, rho =
    tanh(raw)), turned into normalised kernels by :func:`sgg_kernels.gaussian_kernels`.

    **Initialisation.** The paper gives none; the released code keeps ``nn.Linear``'s default,
    i.e. random small kernels' parameters. Here the weight is zero and the bias (2 log init_sigma,
    2 log init_sigma, 0): every kernel starts as the same isotropic Gaussian of ``init_sigma``
    (1 px), which covers the 7 x 7 window to +-3 sigma, so the initial pair masks are lightly
    smoothed products and the head learns class-specific shapes from there. (The zero weight still
    gets gradients; the label scores get theirs once it moves.)

    Args:
        num_classes (int): d_g, the target classes; ``label_scores`` has num_classes + 1 columns
            (background included, the paper's l_j in R^{d_g + 1}).
        kernel_size (int): delta, odd (7, the released code).
        per (str): ``"pair"`` or ``"object"``, see above.
        sigmoid (bool): apply the sigmoid to the product (True, as released).
        init_sigma (float): sigma (in mask pixels) of every kernel at initialisation (1.0).
    """

    def __init__(self, num_classes: int, kernel_size: int = 7, per: str = "pair", sigmoid: bool = True,
                 init_sigma: float = 1.0):
        super().__init__()
        self.num_classes = _checks.positive_int(num_classes, "num_classes", "d_g, the target classes")
        self.kernel_size = _checks.positive_int(kernel_size, "kernel_size", "delta, the Gaussian kernel's size")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the Gaussian kernel has a centre), got {kernel_size}")
        if per not in PER_CHOICES:
            raise ValueError(f"per must be 'pair' (kernels from both objects' scores, the released code) or "
                             f"'object' (one kernel per object, the paper's text), got {per!r}")
        if not isinstance(init_sigma, numbers.Real) or isinstance(init_sigma, bool) or not init_sigma > 0:
            raise ValueError(f"init_sigma must be a positive float (pixels), got {init_sigma!r}")
        self.per, self.sigmoid, self.init_sigma = per, bool(sigmoid), float(init_sigma)
        width = self.num_classes + 1
        self.variance_net = nn.Linear(2 * width, 6) if per == "pair" else nn.Linear(width, 3)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.variance_net.weight)
        log_var = 2.0 * math.log(self.init_sigma)  # log sigma^2
        with torch.no_grad():
            self.variance_net.bias.copy_(torch.tensor([log_var, log_var, 0.0], dtype=torch.float64).repeat(2 if self.per == "pair" else 1))

    def _check(self, masks: Tensor, label_scores: Tensor, pairs: Tensor, boxes: Optional[Tensor] = None,
               out_size: Optional[int] = None) -> None:
        _check_square_masks(masks, "masks", "K, C, m, m")
        C = masks.shape[1]
        if C not in (1, self.num_classes):
            raise ValueError(f"masks has {C} channels (shape {list(masks.shape)}), expected num_classes = "
                             f"{self.num_classes} (every class) or 1 (each object's own class)")
        _checks.tensor(label_scores, "label_scores", "K, num_classes + 1")
        _checks.size(label_scores, "label_scores", 0, masks.shape[0], "K, the rows of masks")
        _checks.size(label_scores, "label_scores", 1, self.num_classes + 1, "num_classes + 1, background included")
        _checks.tensor(pairs, "pairs", "P, 2", kind="index")
        _checks.size(pairs, "pairs", 1, 2, "(subject, object)")
        _check_frame(boxes, out_size, masks.shape[0])
        _checks.same_device([("masks", masks), ("label_scores", label_scores), ("pairs", pairs), ("boxes", boxes)])

    def gaussian_params(self, label_scores: Tensor, pairs: Tensor) -> Tensor:
        """The variance head: (log sigma_x^2, log sigma_y^2, raw rho) of every kernel.

        Args:
            label_scores (Tensor[K, num_classes + 1]), pairs (Tensor[P, 2] int64).

        Returns:
            Tensor[P, 2, 3] (``per="pair"``: [:, 0] subject, [:, 1] object) or Tensor[K, 3]
            (``per="object"``), in the dtype of the head.
        """
        scores = label_scores.to(self.variance_net.weight.dtype)
        if self.per == "object":
            return self.variance_net(scores)  # f(l_j), one kernel per object (the paper's text)
        both = _rows(scores, pairs).flatten(1)  # [P, 2 (num_classes + 1)]: [l_s, l_o]
        return self.variance_net(both).reshape(-1, 2, 3)

    def kernels(self, label_scores: Tensor, pairs: Tensor) -> Tensor:
        """K of Eq. 6: Tensor[P, 2, delta, delta] (``per="pair"``) or Tensor[K, delta, delta]."""
        return gaussian_kernels(self.gaussian_params(label_scores, pairs), self.kernel_size)

    def forward(self, masks: Tensor, label_scores: Tensor, pairs: Tensor, boxes: Optional[Tensor] = None,
                out_size: Optional[int] = None) -> Tensor:
        """
        Args:
            masks (Tensor[K, C, m, m]): each object's masks in its box frame, C = num_classes
                (every class: :class:`MaskTransfer` with ``labels=None``) or 1; values in [0, 1].
            label_scores (Tensor[K, num_classes + 1]): l_j, the object label probabilities.
            pairs (Tensor[P, 2] int64): (subject, object) indices into the K objects.
            boxes (Tensor[K, 4] or None), out_size (int or None): both or neither; with them the
                smoothed masks are resampled into each pair's union box, R = out_size (see
                :func:`sgg_kernels.pair_mask_conv`), to line up with union-box features.

        Returns:
            Tensor[P, C, m, m], or Tensor[P, C, R, R] in the union frame; in [0, 1] (with the
            sigmoid, in [1/2, sigmoid(1)] for masks in [0, 1]). Differentiable in ``masks``,
            ``label_scores`` and the head's parameters.

        Raises:
            ValueError naming the argument for wrong shapes; IndexError for pair indices outside
            [0, K) and ValueError for non-finite ``boxes`` (value checks, see
            :func:`sgg_kernels.set_checks`: one fused reduction and one host sync per forward,
            before anything runs; :func:`sgg_kernels.pair_mask_conv` then skips its own).
        """
        self._check(masks, label_scores, pairs, boxes, out_size)
        if not _checks.module_value_checks():  # checks off (or traced: the op checks as it runs)
            return self._forward(masks, label_scores, pairs, boxes, out_size)
        # what pair_mask_conv would check (pairs in [0, K), boxes finite), once, before anything runs
        _check_conv_values(pairs, masks.shape[0], _mask_boxes(boxes, masks))
        with suspended_value_checks():
            return self._forward(masks, label_scores, pairs, boxes, out_size)

    def _forward(self, masks: Tensor, label_scores: Tensor, pairs: Tensor, boxes: Optional[Tensor],
                 out_size: Optional[int]) -> Tensor:
        kernels = self.kernels(label_scores, pairs).to(masks.dtype)
        out = pair_mask_conv(masks, pairs, kernels, boxes, out_size)  # Eq. 6, fused
        return torch.sigmoid(out) if self.sigmoid else out


# ---------------------------------------------------------------------------------------------
# Mask refinement (Sec. 2.6, Eq. 8-10)
# ---------------------------------------------------------------------------------------------
class MaskRefinement(nn.Module):
    """f_M' of Eq. 8-9: refined masks m_hat = m + f_M'(z^o), a zero-initialised residual.

    z^o is each object's representation from the context aggregation layer of the object network
    (e.g. MOTIF's object-context LSTM), given as a vector ``[K, D]`` (broadcast over the m x m grid)
    or as a map ``[K, D, m, m]`` (e.g. that vector tiled and concatenated with the RoI features,
    so the residual can vary across the box). f_M' is ``num_convs`` x (3x3 conv + ReLU) of width
    ``hidden`` and a 1x1 conv to one residual per class channel; that last conv's weight and bias
    are zero, so at initialisation f_M' = 0 and the refinement is the identity (Sec. 2.6: "a
    zero-initialized network that learns a residual update"). At initialisation only that last
    conv gets gradients (every other layer's gradient passes through its zero weight).

    The residual is added to the mask *logits*, as in the released code: m_hat = sigmoid(logit(m)
    + f_M'(z^o)) for masks given as probabilities (logit(m) = log(m / (1 - m)), m clamped to
    [eps, 1 - eps]), or m_hat = m + f_M'(z^o) for ``logits=True`` (Eq. 8-9 in logit space). Adding
    in logit space keeps m_hat in [0, 1] whatever the residual.

    Training (Eq. 10-11): on D^m images, where ground-truth masks exist, :meth:`loss` is the
    pixel-wise binary cross-entropy of each object's mask of its ground-truth class.

    Args:
        context_channels (int): D, the channels of ``context``.
        num_classes (int): C, the mask channels refined (d_m on D^m images and d_g on D^g images
            need one module each, or C = 1 with each object's own-class mask).
        hidden (int): width of the convolutions (256).
        num_convs (int): number of 3x3 conv + ReLU layers before the 1x1 predictor (2; >= 0).
        eps (float): clamp of probabilities before the logit (1e-6).
    """

    def __init__(self, context_channels: int, num_classes: int, hidden: int = 256, num_convs: int = 2,
                 eps: float = 1e-6):
        super().__init__()
        self.context_channels = _checks.positive_int(context_channels, "context_channels", "D, channels of context")
        self.num_classes = _checks.positive_int(num_classes, "num_classes", "C, the mask channels")
        self.hidden = _checks.positive_int(hidden, "hidden", "width of the convolutions")
        if not isinstance(num_convs, numbers.Integral) or isinstance(num_convs, bool) or num_convs < 0:
            raise ValueError(f"num_convs must be an int >= 0, got {num_convs!r}")
        if not isinstance(eps, numbers.Real) or not 0 < eps < 0.5:
            raise ValueError(f"eps must be a float in (0, 0.5), got {eps!r}")
        self.eps = float(eps)
        layers = []
        width = self.context_channels
        for _ in range(int(num_convs)):
            layers += [nn.Conv2d(width, self.hidden, 3, padding=1), nn.ReLU()]
            width = self.hidden
        self.convs = nn.Sequential(*layers)
        self.predictor = nn.Conv2d(width, self.num_classes, 1)
        nn.init.zeros_(self.predictor.weight)  # zero-initialised: f_M' = 0 (Sec. 2.6)
        nn.init.zeros_(self.predictor.bias)

    def residual(self, context: Tensor, m: int) -> Tensor:
        """f_M'(z^o): Tensor[K, num_classes, m, m] (context as in :meth:`forward`)."""
        if context.dim() == 2:
            context = context[:, :, None, None].expand(-1, -1, m, m)
        return self.predictor(self.convs(context))

    def forward(self, masks: Tensor, context: Tensor, logits: bool = False) -> Tensor:
        """Eq. 8-9.

        Args:
            masks (Tensor[K, num_classes, m, m]): m, probabilities in [0, 1] (or logits with
                ``logits=True``), e.g. from :class:`MaskTransfer`.
            context (Tensor[K, D] or Tensor[K, D, m, m]): z^o, the context representations.
            logits (bool): ``masks`` are logits; the output then is refined logits.

        Returns:
            Tensor[K, num_classes, m, m]: m_hat, probabilities (or logits with ``logits=True``).
        """
        _check_square_masks(masks, "masks", "K, C, m, m")
        _checks.size(masks, "masks", 1, self.num_classes, "num_classes")
        K, _, m, _ = masks.shape
        if not isinstance(context, Tensor) or context.dim() not in (2, 4):
            got = _checks._describe(context) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must be [K, D] (a vector per object) or [K, D, m, m] (a map), got {got}")
        _checks.tensor(context, "context", "K, D" if context.dim() == 2 else "K, D, m, m")
        _checks.size(context, "context", 0, K, "K, the rows of masks")
        _checks.size(context, "context", 1, self.context_channels, "context_channels")
        if context.dim() == 4 and tuple(context.shape[2:]) != (m, m):
            raise ValueError(f"context has spatial size {list(context.shape[2:])}, expected [{m}, {m}] (the masks' m x m)")
        _checks.same_device([("masks", masks), ("context", context)])
        residual = self.residual(context, m).to(masks.dtype)
        if logits:
            return masks + residual  # Eq. 8-9 on logits
        m_clamped = masks.clamp(self.eps, 1 - self.eps)
        return torch.sigmoid(torch.log(m_clamped) - torch.log1p(-m_clamped) + residual)  # Eq. 8-9

    @staticmethod
    def loss(masks: Tensor, targets: Tensor, labels: Optional[Tensor] = None, logits: bool = False) -> Tensor:
        """L^seg of Eq. 10-11: the pixel-wise binary cross-entropy (Mask R-CNN's mask loss).

        Each object's loss is on the mask of its ground-truth class only (``labels``), averaged
        over the K m m pixels of all objects.

        Args:
            masks (Tensor[K, C, m, m]): refined masks from :meth:`forward`, probabilities (or
                logits with ``logits=True``: computed with ``binary_cross_entropy_with_logits``,
                the stabler choice for training).
            targets (Tensor[K, m, m]): ground-truth masks in [0, 1] in each object's box frame;
                any dtype (bool too), cast to the masks' dtype.
            labels (Tensor[K] int64 or None): each object's class in [0, C); may be None when C = 1.
                An IndexError for a label outside [0, C) while value checks are on
                (:func:`sgg_kernels.set_checks`); with them off such an object contributes 0.
            logits (bool): ``masks`` are logits.

        Returns:
            scalar Tensor (0 for K = 0).
        """
        _check_square_masks(masks, "masks", "K, C, m, m")
        K, C, m, _ = masks.shape
        if not isinstance(targets, Tensor) or tuple(targets.shape) != (K, m, m):
            got = list(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"targets must have shape [K, m, m] = {[K, m, m]} (one ground-truth mask per object), got {got}")
        if labels is None:
            if C != 1:
                raise ValueError(f"labels is needed to pick each object's class channel (masks has C = {C} channels)")
            picked = masks[:, 0]
        else:
            _checks.tensor(labels, "labels", "K", kind="index")
            _checks.size(labels, "labels", 0, K, "K, the rows of masks")
            if _checks.module_value_checks():  # one reduction and one sync; not with checks off
                _checks.index_range(labels, "labels", C, "C, the channels of masks")
            # With checks off no value is read back: an invalid label's object contributes 0.
            valid = (labels >= 0) & (labels < C)
            if C == 0:  # no channel to pick: every label is invalid
                picked = masks.sum((1,)) * 0  # [K, m, m] zeros, attached to masks
            else:
                picked = masks[torch.arange(K, device=masks.device), labels.clamp(0, C - 1)]
        targets = targets.to(masks.dtype)
        if logits:
            per_pixel = F.binary_cross_entropy_with_logits(picked, targets, reduction="none")
        else:
            per_pixel = F.binary_cross_entropy(picked, targets, reduction="none")
        if labels is not None:
            per_pixel = torch.where(valid[:, None, None], per_pixel, 0)
        return per_pixel.sum() / max(K * m * m, 1)
