"""Superpixel-based Interaction Learning (Wang, Zhang, Huang, Ren, Deng, "Improving Scene Graph
Generation with Superpixel-Based Interaction Learning", MM'23, Sec. 3, Algorithm 1, Eq. 1-9).

Thin ``nn.Module``s over the ops of the ``cluster`` family:

- :class:`SILBlock` - one SIL block (Fig. 2): superpixel clustering (Eq. 1-3, fused ops), intra-entity
  interaction (Eq. 4-6, batched matmuls over per-image K x C weight matrices), cross-entity
  interaction (Eq. 7-8, a standard ``nn.TransformerEncoder``), dispatch back to the points (Eq. 9);
- :class:`SILNetwork` - Sec. 3.5: SIL blocks stacked, the output map of one the input of the next.

Shapes: feature map ``[B, D, H, W]``; its points ``[B, M, D]`` (M = H*W, row-major), heads folded
into the batch (``[B*heads, M, D/heads]``); C centers on a ``sqrt(C) x sqrt(C)`` grid; K boxes packed
over the batch (``boxes [K, 4]`` in image pixels, ``box_batch [K]``).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _checks
from .._backend import suspended_value_checks, value_checks_on
from ..ops.cluster import cluster_dispatch, gather_mean, grid_centers, grid_points, knn_index, superpixel_cluster
from ..ops.pairs import _raise_non_finite, _roi_boxes, roi_align

__all__ = ["SILBlock", "SILNetwork"]

SIMILARITIES = ("cosine", "sigmoid")
INTRA_WEIGHTINGS = ("distance", "inverse_distance", "uniform", "attention")

# RoIAlign of the default reference features g_k (see SILBlock.reference_features).
REF_OUTPUT_SIZE = 7
REF_SAMPLING_RATIO = 2
REF_ALIGNED = True


def _choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# The value checks of a SIL block as a registered op: they read device data (one reduction and a
# sync), so inside a traced graph they must run as an opaque op, not as Python on tensor values. It
# returns a copy of box_batch that the block then uses, so no compiler drops it as dead code; with
# ``sgg_kernels.set_checks(False)`` it is just that copy (a box of no image then touches nothing).
# Given ``boxes`` (the boxes as sk.roi_align reads them), it also checks what roi_align would check
# for the default reference features (finite boxes; box_batch in [0, B) is the check above), in the
# same reduction, so the block's forward syncs once and calls its ops with their checks suspended.
# (The ops' other index inputs, the KNN index and the assignments, are the block's own outputs of
# knn_index and superpixel_cluster, in range by construction.)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("sgg_kernels::sil_checked_batch", mutates_args=())
def _checked_batch(box_batch: Tensor, B: int, boxes: Optional[Tensor] = None) -> Tensor:
    if value_checks_on() and box_batch.numel() > 0:
        parts = [torch.stack(torch.aminmax(box_batch))]
        if boxes is not None:
            non_finite = ~torch.isfinite(boxes).all(1)
            parts.append(non_finite.sum().reshape(1))
        stats = torch.cat(parts).tolist()  # the one sync
        lo, hi = stats[0], stats[1]
        if lo < 0 or hi >= B:
            raise ValueError(
                f"box_batch holds {lo if lo < 0 else hi}, outside [0, {B}) (B, the batch of feature_map); "
                "sgg_kernels.set_checks(False) skips this check (such a box then touches no image)"
            )
        if boxes is not None and stats[2]:
            _raise_non_finite(boxes, non_finite)
    return box_batch.clone()


@_checked_batch.register_fake
def _(box_batch, B, boxes=None):
    return torch.empty_like(box_batch)


def _checked_forward(feature_map: Tensor, boxes: Tensor, box_batch: Tensor, needs_ref: bool, body):
    """``body(box_batch)`` after the value checks of a block's (or network's) inputs: one sync in
    eager mode with checks on (``needs_ref``: the default reference features' roi_align will run, so
    its finite-box check is folded in), then ``body`` with the ops' own value checks suspended."""
    proved = _checks.module_value_checks()  # eager, checks on: _checked_batch checks everything once
    finite = _roi_boxes(boxes, feature_map) if proved and needs_ref else None
    box_batch = _checked_batch(box_batch, feature_map.shape[0], finite)
    if not proved:
        return body(box_batch)
    with suspended_value_checks():
        return body(box_batch)


def _check_map(feature_map: Tensor, dim: int, dtype: torch.dtype, owner: str) -> None:
    _checks.tensor(feature_map, "feature_map", "B, D, H, W")
    _checks.size(feature_map, "feature_map", 1, dim, "D, the dim of this SIL block")
    H, W = feature_map.shape[2:]
    if H < 1 or W < 1:
        raise ValueError(f"feature_map is empty (H = {H}, W = {W}, {_checks._describe(feature_map)}): a SIL block "
                         "clusters the H * W points of the map, so it needs H >= 1 and W >= 1")
    _checks.module_dtype([("feature_map", feature_map)], owner, dtype)


def _check_boxes(feature_map: Tensor, boxes: Tensor, box_batch: Tensor, spatial_scale, ref_feats: Optional[Tensor],
                 dim: int, dtype: torch.dtype, owner: str) -> None:
    _checks.tensor(boxes, "boxes", "K, 4")
    _checks.size(boxes, "boxes", 1, 4, "(x1, y1, x2, y2)")
    K = boxes.shape[0]
    _checks.tensor(box_batch, "box_batch", "K", kind="index")
    _checks.size(box_batch, "box_batch", 0, K, "K, the rows of boxes")
    if ref_feats is not None:
        _checks.tensor(ref_feats, "ref_feats", "K, D")
        _checks.size(ref_feats, "ref_feats", 0, K, "K, the rows of boxes")
        _checks.size(ref_feats, "ref_feats", 1, dim, "D, the dim of this SIL block")
        _checks.module_dtype([("ref_feats", ref_feats)], owner, dtype)
    _checks.same_device([("feature_map", feature_map), ("boxes", boxes), ("box_batch", box_batch),
                         ("ref_feats", ref_feats)])
    if (not isinstance(spatial_scale, numbers.Real) or isinstance(spatial_scale, bool)
            or not math.isfinite(spatial_scale) or spatial_scale <= 0):
        raise ValueError(f"spatial_scale must be a positive float (feature-map pixels per image pixel), "
                         f"got {spatial_scale!r}")


def reference_features(feature_map: Tensor, boxes: Tensor, box_batch: Tensor, spatial_scale: float) -> Tensor:
    """The default reference feature g_k of every box (Eq. 4): the mean of its RoIAlign.

    ``sk.roi_align(feature_map, boxes, box_batch, 7, spatial_scale, sampling_ratio=2, aligned=True)``
    averaged over the 7 x 7 bins -> ``[K, D]``. ``aligned=True`` because the points of this package
    sit at cell centres (c + 0.5, r + 0.5) in continuous feature-map coordinates, the pixel model of
    ``aligned=True`` (Scene-Graph-Benchmark's pooler is the legacy ``aligned=False``; pass ``ref_feats``
    to use yours); ``sampling_ratio=2`` (a fixed 2 x 2 samples per bin) keeps the cost independent of
    the box size. Differentiable in ``feature_map``.
    """
    pooled = roi_align(feature_map, boxes, box_batch, REF_OUTPUT_SIZE, spatial_scale, REF_SAMPLING_RATIO, REF_ALIGNED)
    return pooled.mean((2, 3))


class SILBlock(nn.Module):
    """One SIL block (Sec. 3.2-3.4, Algorithm 1): ``[B, D, H, W]`` -> ``[B, D, H, W]``.

    Steps (each a public method, so they can be checked and reused; :meth:`forward` chains them)::

        F^SC, assign, sim, points = cluster(feature_map)                Eq. 1-3 (+ H')
        F^IN, F^a = intra(F^SC, boxes, box_batch, g, spatial_scale, (H, W))   Eq. 4-6
        F^CR = cross(F^IN)                                              Eq. 7-8
        F^SIL = dispatch(F^CR, assign, sim, points, (H, W))              Eq. 9 (+ H'')

    **Superpixel clustering** (Eq. 1-3). The D channels split into ``heads`` groups of D/heads,
    folded into the batch (``[B*heads, M, D/heads]``; head i = channels i*D/heads ... ). C =
    ``num_centers`` centres T on a ``sqrt(C) x sqrt(C)`` grid (``sk.grid_centers``; C must be a perfect
    square, 49 = 7 x 7 in the paper); each head's F^c is the mean of the ``knn`` points nearest to
    each centre (Eq. 1; ``knn=None`` means ceil(M / C)), with the KNN index cached per (H, W, device)
    (it depends on geometry alone; under ``torch.compile`` it is recomputed inside the graph by the
    ``knn_index`` op instead, so tracing never touches the cache). ``sk.superpixel_cluster`` then
    assigns every point to its most similar centre (Eq. 2) and takes each cluster's similarity-weighted
    mean (Eq. 3), per head. ``similarity="cosine"`` is Eq. 2 as printed; ``"sigmoid"`` is
    sigmoid(beta + alpha cos) with learnable scalars alpha = 1, beta = 0 at init, as in Context Cluster
    [37], which the paper follows (Sec. 4.3) - positive similarities keep Eq. 3's denominator
    1 + sum s_i >= 1, which plain cosine does not guarantee. H' (Eq. 3, Sec. 4.3) is an MLP on the
    concatenated heads: Linear(D, mlp_hidden) -> GELU -> Linear(mlp_hidden, D), giving F^SC [B, C, D].

    **Intra-entity interaction** (Eq. 4-6). Boxes are scaled by ``spatial_scale`` into feature-map
    pixels; centre T_j belongs to box b_k when x1 <= x_j <= x2 and y1 <= y_j <= y2 (closed box).
    d(T_j, b_k) is the Euclidean distance from T_j to the box centre, in feature-map pixels. Box
    geometry carries no gradient (as RoIAlign). ``intra_weighting`` picks w(j, k) over the C_k
    centres inside b_k (0 outside):

    - ``"inverse_distance"`` (default): w ∝ 1 / (d + 1), normalised to sum 1. The text says it twice
      (Sec. 3 overview: "Clusters at far distances have low weights"; Sec. 3.3: weights "emphasize the
      varying importance"), while Eq. 5 as printed gives *far* centres *high* weight and the centre
      closest to the box centre weight 0 (a lone centre at the box centre gets 0/0). We follow the
      text; the +1 (one feature-map pixel) keeps a centre at the box centre finite.
    - ``"distance"``: Eq. 5 as printed, w = d / sum_j d. If every in-box centre sits exactly at the
      box centre (sum d = 0), the weights fall back to uniform.
    - ``"uniform"``: w = 1 / C_k, the paper's ablation (Table 4, row ○).
    - ``"attention"``: softmax over the in-box centres of F^SC_j . g_k / sqrt(D) (no parameters).

    Eq. 4, F^a_k = H^a((g_k + sum_j F^SC_j w(j,k) 1(T_j in b_k)) / den_k). The printed denominator is
    1 + sum_j d(T_j, b_k) 1(T_j in b_k), which with Eq. 5's normalised weights is not the weights' mass
    (it mixes pixels into a feature average, so the scale of F^a depends on the box size). Default
    (``literal_eq4=False``): den_k = 1 + sum_j w(j,k) 1(T_j in b_k), i.e. F^a_k = H^a of the mean of g_k
    and the weighted superpixel average (den = 2 for a box with centres). ``literal_eq4=True``: the
    printed denominator, with d as above (any weighting). H^a is Linear(D, D) without activation
    ("a network for feature dimension transformation"; its output is a residual update in Eq. 6, and
    the non-linearities are H' before it and the encoder after it).

    Eq. 6, summed over boxes: F^IN_j = F^SC_j + sum_k F^a_k w(j,k) 1(T_j in b_k). A centre inside
    several boxes receives the sum of their contributions; a centre in no box keeps F^SC_j; a box
    with no centre inside gets F^a_k = H^a(g_k) and contributes to no centre. All of it is batched
    matmuls with the block structure of ``box_batch`` (a [B, K, C] weight tensor zero outside each
    box's image): no loop over images or boxes, no host sync, so ``torch.compile(fullgraph=True)``
    traces it. K = 0 works (F^IN = F^SC).

    g_k: ``ref_feats [K, D]`` as given, else :func:`reference_features` (the mean of a 7 x 7
    ``sk.roi_align(feature_map, boxes, box_batch, 7, spatial_scale, sampling_ratio=2, aligned=True)``;
    the paper uses "the corresponding feature in the output of ResNeXt-101-FPN", Sec. 4.3).

    **Cross-entity interaction** (Eq. 7-8): ``nn.TransformerEncoder`` over each image's C centres
    ``[B, C, D]`` (batch_first), ``encoder_layers`` layers (2 in the paper), D / ``encoder_head_dim``
    heads (32-d heads in the paper), ``dropout``, feed-forward width ``encoder_ffn`` (default
    ``mlp_hidden``, 4 D in the paper's setting), post-norm (``norm_first=False``: the Transformer of
    [48] that the paper cites, and F^CR comes out layer-normalised before H''). Attention is
    PyTorch's ``scaled_dot_product_attention`` inside ``nn.MultiheadAttention``.

    **Dispatch** (Eq. 9): H'' = Linear(D, D) on F^CR, split per head, and
    ``sk.cluster_dispatch(H''(F^CR), assign, sim, residual=F)``: F^SIL_i = F_i + s_i H''(F^CR_{a_i}).

    **Ablations** (Table 4): ``use_intra=False`` gives F^IN = F^SC (no H^a, boxes unused);
    ``use_cross=False`` gives F^CR = F^IN (no encoder); ``intra_weighting="uniform"`` is row ○.

    Args:
        dim (int): D, channels of the feature map (256 in the paper).
        num_centers (int): C, a perfect square (49).
        heads (int): clustering heads; ``dim`` must be divisible by it (4).
        knn (int or None): n_k of Eq. 1; None = ceil(H*W / C).
        mlp_hidden (int): hidden width of H' (1024).
        encoder_layers (int): Transformer encoder layers (2).
        encoder_head_dim (int): width of each attention head (32); ``dim`` must be divisible by it.
        dropout (float): dropout of the encoder (0.1).
        similarity (str): ``"cosine"`` (Eq. 2) or ``"sigmoid"`` (Context Cluster).
        intra_weighting (str): ``"inverse_distance"`` (default), ``"distance"``, ``"uniform"``, ``"attention"``.
        use_intra, use_cross (bool): the IEI / CEI switches.
        literal_eq4 (bool): Eq. 4's printed denominator instead of the weights' mass.
        encoder_ffn (int or None): encoder feed-forward width; None = ``mlp_hidden``.
    """

    inverse_distance_eps = 1.0  # feature-map pixels added to d in "inverse_distance"

    def __init__(self, dim: int = 256, num_centers: int = 49, heads: int = 4, knn: Optional[int] = None,
                 mlp_hidden: int = 1024, encoder_layers: int = 2, encoder_head_dim: int = 32, dropout: float = 0.1,
                 similarity: str = "cosine", intra_weighting: str = "inverse_distance", use_intra: bool = True,
                 use_cross: bool = True, literal_eq4: bool = False, encoder_ffn: Optional[int] = None):
        super().__init__()
        self.dim = _checks.positive_int(dim, "dim", "D, channels of the feature map")
        self.num_centers = _checks.positive_int(num_centers, "num_centers", "C, a perfect square such as 49 = 7 x 7")
        self.per_dim = math.isqrt(self.num_centers)
        if self.per_dim ** 2 != self.num_centers:
            raise ValueError(f"num_centers must be a perfect square (centres on a sqrt(C) x sqrt(C) grid, "
                             f"e.g. 49 = 7 x 7), got {num_centers}")
        self.heads = _checks.positive_int(heads, "heads", "clustering heads")
        if self.dim % self.heads:
            raise ValueError(f"dim = {dim} must be divisible by heads = {heads} "
                             "(each head clusters dim / heads channels)")
        self.knn = None if knn is None else _checks.positive_int(knn, "knn", "n_k, the points averaged per centre in Eq. 1")
        mlp_hidden = _checks.positive_int(mlp_hidden, "mlp_hidden", "hidden width of H'")
        self.similarity = _choice(similarity, "similarity", SIMILARITIES)
        self.intra_weighting = _choice(intra_weighting, "intra_weighting", INTRA_WEIGHTINGS)
        self.use_intra, self.use_cross, self.literal_eq4 = bool(use_intra), bool(use_cross), bool(literal_eq4)
        if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")

        if self.similarity == "sigmoid":  # Context Cluster's sim_alpha, sim_beta
            self.alpha = nn.Parameter(torch.ones(1))
            self.beta = nn.Parameter(torch.zeros(1))
        else:
            self.alpha = self.beta = None
        # H' (Eq. 3): the MLP of Sec. 4.3 on the concatenated heads.
        self.h_prime = nn.Sequential(nn.Linear(self.dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, self.dim))
        # H^a (Eq. 4).
        self.h_a = nn.Linear(self.dim, self.dim) if self.use_intra else None
        # Eq. 7-8: the cross-entity Transformer encoder.
        if self.use_cross:
            encoder_layers = _checks.positive_int(encoder_layers, "encoder_layers", "Transformer encoder layers")
            encoder_head_dim = _checks.positive_int(encoder_head_dim, "encoder_head_dim", "width of each attention head")
            if self.dim % encoder_head_dim:
                raise ValueError(f"dim = {dim} must be divisible by encoder_head_dim = {encoder_head_dim} "
                                 "(the encoder has dim / encoder_head_dim heads)")
            ffn = mlp_hidden if encoder_ffn is None else _checks.positive_int(encoder_ffn, "encoder_ffn", "feed-forward width")
            layer = nn.TransformerEncoderLayer(self.dim, self.dim // encoder_head_dim, dim_feedforward=ffn,
                                               dropout=float(dropout), batch_first=True, norm_first=False)
            self.encoder = nn.TransformerEncoder(layer, encoder_layers, enable_nested_tensor=False)
        else:
            self.encoder = None
        # H'' (Eq. 9).
        self.h_second = nn.Linear(self.dim, self.dim)
        # (H, W, device) -> knn index [1, C, k]; geometry only, so never saved or trained.
        self._knn_cache = {}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_centers={self.num_centers}, heads={self.heads}, knn={self.knn}, "
                f"similarity={self.similarity!r}, intra_weighting={self.intra_weighting!r}, "
                f"use_intra={self.use_intra}, use_cross={self.use_cross}, literal_eq4={self.literal_eq4}")

    def _dtype(self) -> torch.dtype:
        """The dtype of the block's parameters, which its inputs must share (outside autocast)."""
        return self.h_second.weight.dtype

    # -- Eq. 1-3 ------------------------------------------------------------------------------
    def _n_k(self, H: int, W: int) -> int:
        M = H * W
        k = math.ceil(M / self.num_centers) if self.knn is None else self.knn
        if k > M:
            raise ValueError(f"knn = {k} nearest points per centre were asked for, but the feature map has only "
                             f"H * W = {M} points")
        return k

    def _knn_index(self, H: int, W: int, device: torch.device) -> Tensor:
        """Eq. 1's KNN(T_j) as ``[1, C, k]``, cached per (H, W, device) in eager mode."""
        k = self._n_k(H, W)
        if torch.compiler.is_compiling():  # inside a traced graph: the op, no cache access
            return knn_index(grid_points(H, W, device=device), grid_centers(H, W, self.per_dim, device=device), k)
        key = (H, W, k, str(device))
        index = self._knn_cache.get(key)
        if index is None:
            index = knn_index(grid_points(H, W, device=device), grid_centers(H, W, self.per_dim, device=device), k)
            self._knn_cache[key] = index
        return index

    def cluster(self, feature_map: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Superpixel clustering, Eq. 1-3 with H'.

        Args:
            feature_map (Tensor[B, D, H, W]).

        Returns:
            (center_feats Tensor[B, C, D]: F^SC, the heads concatenated then H';
             assign Tensor[B*heads, M] int64, sim Tensor[B*heads, M]: Eq. 2 per head;
             points Tensor[B*heads, M, D/heads]: the input points per head, Eq. 9's residual).
        """
        _check_map(feature_map, self.dim, self._dtype(), "this SILBlock")
        B, D, H, W = feature_map.shape
        M, C, h = H * W, self.num_centers, self.heads
        points = feature_map.flatten(2).transpose(1, 2)                            # [B, M, D]
        points = points.reshape(B, M, h, D // h).transpose(1, 2).reshape(B * h, M, D // h).contiguous()
        center_init = gather_mean(points, self._knn_index(H, W, feature_map.device))  # Eq. 1
        pooled, assign, sim = superpixel_cluster(points, center_init, alpha=self.alpha, beta=self.beta)  # Eq. 2-3
        pooled = pooled.reshape(B, h, C, D // h).transpose(1, 2).reshape(B, C, D)  # heads concatenated
        return self.h_prime(pooled), assign, sim, points                           # Eq. 3's H'

    # -- Eq. 4-6 ------------------------------------------------------------------------------
    def intra_weights(self, center_feats: Tensor, boxes: Tensor, box_batch: Tensor, ref_feats: Optional[Tensor],
                      spatial_scale: float, map_size: Tuple[int, int]) -> Tuple[Tensor, Tensor, Tensor]:
        """Eq. 5 (in the chosen ``intra_weighting``): which centres lie in which box, and their weights.

        Args:
            center_feats (Tensor[B, C, D]): F^SC (used by ``"attention"`` only).
            boxes (Tensor[K, 4]): (x1, y1, x2, y2) in image pixels. box_batch (Tensor[K] int64).
            ref_feats (Tensor[K, D] or None): g_k (used by ``"attention"`` only).
            spatial_scale (float): feature-map pixels per image pixel. map_size ((H, W)).

        Returns:
            (inside Tensor[K, C] bool: 1(T_j in b_k), False for a box of no image (checks off);
             weights Tensor[K, C] in center_feats' dtype: w(j, k), 0 outside the box, each non-empty
             row summing to 1; dist Tensor[K, C]: d(T_j, b_k) in feature-map pixels, 0 outside).
        """
        H, W = map_size
        B, C, D = center_feats.shape
        geo = torch.float64 if center_feats.dtype == torch.float64 else torch.float32
        T = grid_centers(H, W, self.per_dim, device=center_feats.device, dtype=geo)   # [C, 2] (x, y)
        b = boxes.detach().to(geo) * spatial_scale                                  # feature-map pixels
        x, y = T[:, 0], T[:, 1]
        in_image = ((box_batch >= 0) & (box_batch < B)).unsqueeze(1)
        inside = ((x >= b[:, 0:1]) & (x <= b[:, 2:3]) & (y >= b[:, 1:2]) & (y <= b[:, 3:4])) & in_image  # P^BT_k
        ins = inside.to(geo)
        box_center = (b[:, :2] + b[:, 2:]) / 2
        dist = (T.unsqueeze(0) - box_center.unsqueeze(1)).square().sum(-1).sqrt() * ins   # d(T_j, b_k)
        count = ins.sum(1, keepdim=True)                                            # C_k
        uniform = ins / count.clamp_min(1)
        mode = self.intra_weighting
        if mode == "uniform":
            w = uniform
        elif mode == "distance":                                                    # Eq. 5 as printed
            total = dist.sum(1, keepdim=True)
            w = torch.where(total > 0, dist / torch.where(total > 0, total, torch.ones_like(total)), uniform)
        elif mode == "inverse_distance":                                            # the text: far -> low
            inv = ins / (dist + self.inverse_distance_eps)
            w = inv / inv.sum(1, keepdim=True).clamp_min(torch.finfo(geo).tiny)
        else:                                                                       # "attention"
            if ref_feats is None:
                raise ValueError("intra_weighting='attention' needs ref_feats [K, D] (g_k)")
            safe = box_batch.clamp(0, max(B - 1, 0))
            logits = torch.einsum("kcd,kd->kc", center_feats[safe], ref_feats) / math.sqrt(D)
            logits = logits.masked_fill(~inside, float("-inf"))
            logits = torch.where(inside.any(1, keepdim=True), logits, torch.zeros_like(logits))  # empty rows: no NaN
            return inside, torch.softmax(logits, dim=1) * inside, dist.to(center_feats.dtype)
        return inside, w.to(center_feats.dtype), dist.to(center_feats.dtype)

    def intra(self, center_feats: Tensor, boxes: Tensor, box_batch: Tensor, ref_feats: Tensor, spatial_scale: float,
              map_size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """Intra-entity interaction, Eq. 4-6, for all boxes of all images at once.

        Args:
            center_feats (Tensor[B, C, D]): F^SC. boxes (Tensor[K, 4]), box_batch (Tensor[K] int64).
            ref_feats (Tensor[K, D]): g_k. spatial_scale (float). map_size ((H, W)) of the feature map.

        Returns:
            (F^IN Tensor[B, C, D] (Eq. 6), F^a Tensor[K, D] (Eq. 4)).
        """
        if self.h_a is None:
            raise RuntimeError("this SILBlock was built with use_intra=False: it has no intra-entity interaction")
        B, C, D = center_feats.shape
        inside, w, dist = self.intra_weights(center_feats, boxes, box_batch, ref_feats, spatial_scale, map_size)
        # Per-image block structure: Wb[b, k, j] = w(j, k) if box k belongs to image b, else 0.
        image_of_box = (box_batch.unsqueeze(0) == torch.arange(B, device=box_batch.device).unsqueeze(1))
        Wb = image_of_box.to(w.dtype).unsqueeze(2) * w.unsqueeze(0)                  # [B, K, C]
        pooled = torch.einsum("bkc,bcd->kd", Wb, center_feats)                       # sum_j F^SC_j w(j,k) 1(T_j in b_k)
        if self.literal_eq4:
            den = 1 + dist.sum(1, keepdim=True)                                      # Eq. 4 as printed
        else:
            den = 1 + w.sum(1, keepdim=True)                                         # the weights' mass
        entity = self.h_a((ref_feats + pooled) / den)                                # Eq. 4: F^a_k
        return center_feats + Wb.transpose(1, 2) @ entity, entity                    # Eq. 6, summed over boxes

    # -- Eq. 7-9 ------------------------------------------------------------------------------
    def cross(self, intra_feats: Tensor) -> Tensor:
        """Cross-entity interaction, Eq. 7-8: ``[B, C, D]`` -> F^CR ``[B, C, D]`` (identity without CEI)."""
        if self.encoder is None:
            return intra_feats
        return self.encoder(intra_feats)                                             # Eq. 7-8

    def dispatch(self, cross_feats: Tensor, assign: Tensor, sim: Tensor, points: Tensor,
                 map_size: Tuple[int, int]) -> Tensor:
        """Eq. 9: F^SIL_i = F_i + sim_i H''(F^CR_{assign_i}), per head, back to ``[B, D, H, W]``.

        Args:
            cross_feats (Tensor[B, C, D]): F^CR. assign, sim (Tensor[B*heads, M]): from :meth:`cluster`.
            points (Tensor[B*heads, M, D/heads]): the residual, from :meth:`cluster`. map_size ((H, W)).
        """
        H, W = map_size
        B, C, D = cross_feats.shape
        h, M = self.heads, H * W
        center_out = self.h_second(cross_feats)                                      # H''
        center_out = center_out.reshape(B, C, h, D // h).transpose(1, 2).reshape(B * h, C, D // h).contiguous()
        out = cluster_dispatch(center_out, assign, sim, residual=points)  # Eq. 9: F_i + s_i H''(F^CR_{a_i})
        out = out.reshape(B, h, M, D // h).transpose(1, 2).reshape(B, M, D)
        return out.transpose(1, 2).reshape(B, D, H, W).contiguous()

    def reference_features(self, feature_map: Tensor, boxes: Tensor, box_batch: Tensor, spatial_scale: float) -> Tensor:
        """The default g_k ``[K, D]``: see :func:`reference_features` (module level)."""
        return reference_features(feature_map, boxes, box_batch, spatial_scale)

    def forward(self, feature_map: Tensor, boxes: Tensor, box_batch: Tensor, spatial_scale: float,
                ref_feats: Optional[Tensor] = None) -> Tensor:
        """One SIL block.

        Args:
            feature_map (Tensor[B, D, H, W]): F.
            boxes (Tensor[K, 4]): entity boxes (x1, y1, x2, y2) in image pixels, packed over the batch.
            box_batch (Tensor[K] int64): image of each box, in [0, B).
            spatial_scale (float): feature-map pixels per image pixel (e.g. 1/16).
            ref_feats (Tensor[K, D] or None): g_k; None = :func:`reference_features` of ``feature_map``.

        Returns:
            Tensor[B, D, H, W]: F^SIL.
        """
        _check_map(feature_map, self.dim, self._dtype(), "this SILBlock")
        _check_boxes(feature_map, boxes, box_batch, spatial_scale, ref_feats, self.dim, self._dtype(), "this SILBlock")
        return _checked_forward(feature_map, boxes, box_batch, self.use_intra and ref_feats is None,
                                lambda bb: self._forward(feature_map, boxes, bb, spatial_scale, ref_feats))

    def _forward(self, feature_map: Tensor, boxes: Tensor, box_batch: Tensor, spatial_scale: float,
                 ref_feats: Optional[Tensor]) -> Tensor:
        """:meth:`forward` on arguments already checked (box_batch's values included)."""
        B, _, H, W = feature_map.shape
        center_feats, assign, sim, points = self.cluster(feature_map)                # Eq. 1-3
        if self.use_intra:
            if ref_feats is None:
                ref_feats = reference_features(feature_map, boxes, box_batch, spatial_scale)
            intra_feats, _ = self.intra(center_feats, boxes, box_batch, ref_feats, spatial_scale, (H, W))  # Eq. 4-6
        else:
            intra_feats = center_feats
        cross_feats = self.cross(intra_feats)                                        # Eq. 7-8
        return self.dispatch(cross_feats, assign, sim, points, (H, W))               # Eq. 9


class SILNetwork(nn.Module):
    """Sec. 3.5: ``depth`` SIL blocks in a row, ``[B, D, H, W]`` -> ``[B, D, H, W]``.

    Each block's output map is the next one's input ("the degree of interaction increases
    gradually"); the last one's output replaces the feature map from which the SGG model pools its
    entity features. The reference features g_k are computed once, from the *input* map (the
    detector's backbone features, Sec. 4.3), and shared by every block, unless ``ref_feats`` is given.

    Args:
        dim (int): D. depth (int): number of blocks (>= 1).
        **block_kwargs: passed to every :class:`SILBlock`.
    """

    def __init__(self, dim: int = 256, depth: int = 2, **block_kwargs):
        super().__init__()
        depth = _checks.positive_int(depth, "depth", "the number of SIL blocks")
        self.blocks = nn.ModuleList([SILBlock(dim, **block_kwargs) for _ in range(depth)])
        self.dim = self.blocks[0].dim

    def forward(self, feature_map: Tensor, boxes: Tensor, box_batch: Tensor, spatial_scale: float,
                ref_feats: Optional[Tensor] = None) -> Tensor:
        """Same arguments and result as :meth:`SILBlock.forward`."""
        _check_map(feature_map, self.dim, self.blocks[0]._dtype(), "this SILNetwork")
        _check_boxes(feature_map, boxes, box_batch, spatial_scale, ref_feats, self.dim, self.blocks[0]._dtype(),
                     "this SILNetwork")
        needs_ref = ref_feats is None and any(block.use_intra for block in self.blocks)
        return _checked_forward(feature_map, boxes, box_batch, needs_ref,  # once for every block
                                lambda bb: self._forward(feature_map, boxes, bb, spatial_scale, ref_feats, needs_ref))

    def _forward(self, feature_map: Tensor, boxes: Tensor, box_batch: Tensor, spatial_scale: float,
                 ref_feats: Optional[Tensor], needs_ref: bool) -> Tensor:
        if needs_ref:
            ref_feats = reference_features(feature_map, boxes, box_batch, spatial_scale)
        x = feature_map
        for block in self.blocks:  # every block keeps the [B, dim, H, W] shape checked above
            x = block._forward(x, boxes, box_batch, spatial_scale, ref_feats)
        return x
