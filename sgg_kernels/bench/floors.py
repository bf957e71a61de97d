"""The floor of every benchmark case: the bytes that must move and the FLOPs that must be done.

For a case's actual inputs, :func:`floor_of` gives a :class:`Floor` with four numbers:

- ``bytes_fwd``: every input the op reads, read once, plus every output written once;
- ``flops_fwd``: the math's essential arithmetic (a multiply-add is 2 FLOPs, a lone add, multiply,
  divide, compare-select, exp/log/sqrt 1 each; integer work such as sorting or index arithmetic
  is not counted);
- ``bytes_bwd``: the gradients of the outputs, the op's inputs and the forward's *outputs* the
  backward formula needs, each read once, plus every gradient of an input written once;
- ``flops_bwd``: the backward formula's essential arithmetic. Intermediates the op never stores
  (smoothed masks, the fusion's g, norms) are recomputed and their FLOPs counted; the forward's
  outputs are read (their bytes counted) rather than recomputed.

A fwd+bwd step's floor is the sum of the two. The numbers are shape arithmetic (plus, for RoIAlign,
the sample counts its boxes imply), never a measurement. They are lower bounds on what any
implementation must move and compute, not the traffic of a particular kernel (a kernel that
re-reads a tile from HBM moves more).

On CUDA, :func:`measure_peaks` measures in the same run a device-to-device copy bandwidth and a
large GEMM rate per dtype; :func:`apply_peaks` then gives every measured row
``floor_ms = max(bytes / bandwidth, flops / gemm_rate)`` (fwd+bwd: the fwd and bwd floor times
added, the two phases being sequential) and ``pct_of_floor = 100 * floor_ms / median_ms``. On the
CPU there is no such column: no CPU peak is assumed.

The table is :data:`FLOORS` (case name -> ``inputs -> Floor``), one small function per op; a
case may also carry its own ``floor`` callable (``Case.floor``), which wins. ``python -m
sgg_kernels.bench.floors`` prints the floors at named sizes (see ``--help``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import torch

INDEX_BYTES = 8  # int64 indices (pairs, assign, knn_index, box_batch)
MB = float(2 ** 20)  # as the table's peak MB


@dataclass(frozen=True)
class Floor:
    """Bytes and FLOPs that must move / happen, forward and backward (see the module docstring)."""

    bytes_fwd: int
    flops_fwd: int
    bytes_bwd: int
    flops_bwd: int

    def bytes(self, pass_: str) -> int:
        """The bytes of a pass: ``fwd`` or ``fwd+bwd`` (the sum)."""
        return self.bytes_fwd if pass_ == "fwd" else self.bytes_fwd + self.bytes_bwd

    def flops(self, pass_: str) -> int:
        return self.flops_fwd if pass_ == "fwd" else self.flops_fwd + self.flops_bwd

    def time_s(self, pass_: str, bandwidth: float, flop_rate: float) -> float:
        """Seconds at ``bandwidth`` (bytes/s) and ``flop_rate`` (FLOP/s): per phase the larger of the
        memory and compute times, phases added (the backward starts after the forward)."""
        fwd = max(self.bytes_fwd / bandwidth, self.flops_fwd / flop_rate)
        if pass_ == "fwd":
            return fwd
        return fwd + max(self.bytes_bwd / bandwidth, self.flops_bwd / flop_rate)

    def __add__(self, other: "Floor") -> "Floor":
        return Floor(self.bytes_fwd + other.bytes_fwd, self.flops_fwd + other.flops_fwd,
                     self.bytes_bwd + other.bytes_bwd, self.flops_bwd + other.flops_bwd)

    def to_json(self) -> Dict[str, int]:
        return {"bytes_fwd": int(self.bytes_fwd), "flops_fwd": int(self.flops_fwd),
                "bytes_bwd": int(self.bytes_bwd), "flops_bwd": int(self.flops_bwd)}


def _f(bytes_fwd, flops_fwd, bytes_bwd, flops_bwd) -> Floor:
    return Floor(int(bytes_fwd), int(flops_fwd), int(bytes_bwd), int(flops_bwd))


def nbytes(*tensors) -> int:
    """Bytes of the tensors (``None`` counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---------------------------------------------------------------------------------------------
# Shape-level floors (shared by the per-case functions below and by sil_block's composite).
# B, M, C, D as in DESIGN.md; e = bytes per element of the float tensors.
# ---------------------------------------------------------------------------------------------
def cosine_assign_floor(B: int, M: int, C: int, D: int, e: int, sigmoid: bool = False) -> Floor:
    """Eq. 2. fwd: the B*M*C dot products over D (2 FLOPs per multiply-add), the squared norms of
    points and centers, one scale per (point, center) (argmax of dot / |c_j|; the compare is not
    counted). bwd (sim = cos is saved; the argmax is known, so no M x C work): per point |f_i|^2 (2D),
    grad f_i = u c_a + v f_i (3D), the scatter S_a += w f_i (2D); per center |c_j|^2 and
    grad c_j = (S_j - T_j c_j / m_j) / m_j (4D). The sigmoid form recomputes cos_i (2D more)."""
    fwd_bytes = (B * M * D + B * C * D) * e + B * M * (INDEX_BYTES + e)
    fwd_flops = 2 * B * M * C * D + 2 * B * (M + C) * D + B * M * C
    bwd_bytes = B * M * e + (B * M * D + B * C * D) * e + B * M * (INDEX_BYTES + e) + (B * M * D + B * C * D) * e
    bwd_flops = (9 if sigmoid else 7) * B * M * D + 4 * B * C * D
    return _f(fwd_bytes, fwd_flops, bwd_bytes, bwd_flops)


def cluster_aggregate_floor(B: int, M: int, C: int, D: int, e: int) -> Floor:
    """Eq. 3. fwd: sum_i s_i v_i (2 FLOPs per point and channel), sum_i s_i (1 per point), then
    + v^c_j and / den_j (2 per center and channel); den [B, C] is written for the backward.
    bwd: G_j / den_j (= grad v^c, 1 per center and channel), grad v_i = s_i (G/den)_a (1 per point
    and channel), grad s_i = (G/den)_a . (v_i - out_a) (3 per point and channel)."""
    fwd_bytes = (B * M * D + B * C * D) * e + B * M * (INDEX_BYTES + e) + B * C * D * e + B * C * e
    fwd_flops = 2 * B * M * D + B * M + 2 * B * C * D
    bwd_bytes = (B * C * D * e + B * M * D * e + B * M * (INDEX_BYTES + e) + B * C * D * e + B * C * e
                 + B * M * D * e + B * M * e + B * C * D * e)
    bwd_flops = 4 * B * M * D + B * C * D
    return _f(fwd_bytes, fwd_flops, bwd_bytes, bwd_flops)


def superpixel_floor(B: int, M: int, C: int, D: int, e: int, sigmoid: bool = False) -> Floor:
    """Eq. 2 + 3 fused, values = feats and value centers = centers (as the case and SIL use it):
    feats and centers are read once, out [B, C, D], den [B, C], assign and sim written once. FLOPs
    are those of cosine_assign and cluster_aggregate, plus (bwd) the sums of the two paths'
    gradients (grad feats, grad centers, grad sim). bwd reads grad out, grad sim, feats, centers,
    assign, sim, out, den; writes grad feats and grad centers."""
    cos, agg = cosine_assign_floor(B, M, C, D, e, sigmoid), cluster_aggregate_floor(B, M, C, D, e)
    fwd_bytes = (B * M * D + B * C * D) * e + B * M * (INDEX_BYTES + e) + B * C * D * e + B * C * e
    bwd_bytes = (B * C * D * e + B * M * e + (B * M * D + B * C * D) * e + B * M * (INDEX_BYTES + e)
                 + B * C * D * e + B * C * e + (B * M * D + B * C * D) * e)
    return _f(fwd_bytes, cos.flops_fwd + agg.flops_fwd, bwd_bytes,
              cos.flops_bwd + agg.flops_bwd + B * M * D + B * C * D + B * M)


def cluster_dispatch_floor(B: int, M: int, C: int, D: int, e: int, residual: bool = True) -> Floor:
    """Eq. 9, out_i = r_i + s_i c_{a_i}. fwd: 1 multiply-add per point and channel (1 multiply
    without residual). bwd: grad s_i = G_i . c_a (2 per point and channel), grad c_j = sum s_i G_i
    (2 per point and channel); grad r = G is a copy (bytes only)."""
    r = B * M * D * e if residual else 0
    fwd_bytes = B * C * D * e + B * M * (INDEX_BYTES + e) + r + B * M * D * e
    fwd_flops = (2 if residual else 1) * B * M * D
    bwd_bytes = B * M * D * e + B * C * D * e + B * M * (INDEX_BYTES + e) + B * C * D * e + B * M * e + r
    return _f(fwd_bytes, fwd_flops, bwd_bytes, 4 * B * M * D)


def gather_mean_floor(B: int, M: int, C: int, D: int, k: int, e: int, index_batches: int) -> Floor:
    """Eq. 1 with the KNN index given (``index_batches`` = 1 or B rows of index [., C, k]): fwd
    k adds and one 1/k scale per center and channel; bwd G/k then k scatter-adds per center and
    channel. Reads the index once, feats once."""
    idx = index_batches * C * k * INDEX_BYTES
    fwd_bytes = B * M * D * e + idx + B * C * D * e
    bwd_bytes = B * C * D * e + idx + B * M * D * e
    return _f(fwd_bytes, B * C * k * D + B * C * D, bwd_bytes, B * C * k * D + B * C * D)


def roi_align_floor(sample_taps: int, R: int, D: int, pooled: int, feature_bytes: int, e: int,
                    extra_read: int) -> Floor:
    """RoIAlign as sampled by torchvision: each of the ``sample_taps`` = sum_r ph pw n_h(r) n_w(r)
    samples is a 4-tap bilinear read, 4 multiply-adds = 8 FLOPs per channel (the tap weights are
    per sample, shared by the D channels, and not counted; neither is the 1/count, foldable into
    them). bwd: the transposed taps, 8 FLOPs per sample and channel, into grad features (the whole
    map written once). The feature map is counted whole (read once / its gradient written once)."""
    out = R * D * pooled * pooled * e
    flops = 8 * D * sample_taps
    return _f(feature_bytes + extra_read + out, flops, out + extra_read + feature_bytes, flops)


def fusion_floor(K: int, P: int, D: int, Du: int, C: int, e: int, subj_obj_bytes: int, bias: bool,
                 mode: str = "product") -> Floor:
    """Eq. 12-14, logits = (subj[s] * obj[o] * u) W^T + b. fwd: g costs P (D + Du) multiplies
    (u = 1 beyond Du), the GEMM 2 P C D, the bias P C. bwd: dg = G W (2 P C D), g recomputed
    (P (D + Du)), dW = G^T g (2 P C D), d bias (P C), d subj = scatter of dg * obj * u and d obj
    likewise (P (D + Du) multiplies + P D adds each), d union = dg * (subj * obj) (P Du).

    ``mode="sum"`` (g = (subj[s] + obj[o]) * u): the same bytes and forward FLOPs (P D adds in
    place of the multiplies); bwd: d subj and d obj scatter the same dg * u (P Du multiplies, once)
    with P D adds each, d union = dg * (subj + obj) (P Du; the sum is g's recompute), so
    4 P C D + P C + P (D + Du) + P Du + 2 P D + P Du."""
    b = C * e if bias else 0
    pairs = P * 2 * INDEX_BYTES
    fwd_bytes = subj_obj_bytes + P * Du * e + pairs + C * D * e + b + P * C * e
    fwd_flops = P * (D + Du) + 2 * P * C * D + (P * C if bias else 0)
    bwd_bytes = (P * C * e + subj_obj_bytes + P * Du * e + pairs + C * D * e  # G, E1, union, pairs, W read
                 + subj_obj_bytes + P * Du * e + C * D * e + b)  # d E1, d union, d W, d bias written
    if mode == "sum":
        bwd_flops = 4 * P * C * D + (P * C if bias else 0) + P * (D + Du) + P * Du + 2 * P * D + P * Du
    else:
        bwd_flops = 4 * P * C * D + (P * C if bias else 0) + 3 * P * (D + Du) + 2 * P * D + P * Du
    return _f(fwd_bytes, fwd_flops, bwd_bytes, bwd_flops)


def prototype_floor(N: int, Q: int, D: int, e: int) -> Floor:
    """Eq. 4, cos and dist for every (n, q). fwd: the N x Q x D GEMM x.p (2 N Q D: dist comes from
    |x|^2 + |p|^2 - 2 x.p), the squared norms (2 (N + Q) D) and a 7-FLOP epilogue per (n, q)
    (2 scales; s; clamp; sqrt; the exact recompute where s cancels is data-dependent and not
    counted). bwd (cos, dist read): K and W per (n, q) (8 FLOPs), grad x = K P + r x and
    grad P = K^T x + c P (4 N Q D + 4 (N + Q) D)."""
    fwd_bytes = (N + Q) * D * e + 2 * N * Q * e
    fwd_flops = 2 * N * Q * D + 2 * (N + Q) * D + 7 * N * Q
    bwd_bytes = 4 * N * Q * e + (N + Q) * D * e + (N + Q) * D * e
    bwd_flops = 4 * N * Q * D + 4 * (N + Q) * D + 8 * N * Q
    return _f(fwd_bytes, fwd_flops, bwd_bytes, bwd_flops)


def valid_taps_1d(m: int, d: int) -> int:
    """Taps of a zero-padded 1-D cross-correlation (length m, kernel d odd) that land inside the signal."""
    r = d // 2
    return sum(min(i + r, m - 1) - max(i - r, 0) + 1 for i in range(m))


GAUSSIAN_FLOPS_PER_CELL = 15  # gaussian_kernels: the quadratic form, exp and the softmax's sum / divide per cell


def pair_mask_conv_floor(K: int, P: int, C: int, m: int, d: int, e: int, params_bytes: int,
                         R: int = 0, boxes_bytes: int = 0, per_object: bool = False) -> Floor:
    """Eq. 6 with one Gaussian kernel per pair and role (the case's ``[P, 2, d, d]``, built from
    ``params [P, 2, 3]`` inside the timed call) or, ``per_object``, one per object (``[K, d, d]``
    from ``params [K, 3]``). The Gaussian is not separable (rho != 0): a plane
    costs T = valid_taps_1d(m, d)^2 multiply-adds (taps in the zero padding not counted), 2 T FLOPs.
    N_s smoothed planes: 2 P C per pair and role (every plane distinct); per object K C (each
    object's smoothing depends on it alone, also in the union frame, where the masks are smoothed in
    their own frames before the per-pair resampling; an object in no pair would need none, but the
    floor assumes every object is used). Own frame (R = 0): fwd 2 T N_s + the product P C m^2 + the
    kernels (15 FLOPs per cell, 2 P d^2 or K d^2 cells). Union frame (R > 0): each smoothed plane is
    also resampled separably per pair and role, <= 2 taps per output along x then y:
    X = 4 (m R + R^2) FLOPs per plane and role; product P C R^2. bwd (the smoothed masks are never
    stored: recomputed): 2 T N_s (recompute) + 2 P C side^2 (G . O, G . S) + 4 T N_s (conv_transpose
    and the kernel-gradient correlation, once per smoothed plane: per object the role gradients are
    summed first) + 2 P C m^2 (the sums over pairs into d masks, or into the per-object gradient)
    + the kernels' backward; the union frame adds 2 P C X (recompute of both resamplings) + 2 P C X
    (A^T of both roles). Reads masks, pairs, params (boxes in the union frame) once; writes out
    once; bwd writes d masks and d params."""
    T = valid_taps_1d(m, d) ** 2
    planes = P * C
    smoothed = K * C if per_object else 2 * planes
    kern = GAUSSIAN_FLOPS_PER_CELL * (K if per_object else 2 * P) * d * d
    pairs = P * 2 * INDEX_BYTES
    masks = K * C * m * m * e
    side = R if R else m
    out = planes * side * side * e
    X = 4 * (m * R + R * R) if R else 0
    fwd_flops = 2 * T * smoothed + 2 * planes * X + planes * side * side + kern
    bwd_flops = (2 * T * smoothed + 2 * planes * X + 2 * planes * side * side + 2 * planes * X
                 + 4 * T * smoothed + 2 * planes * m * m + 2 * kern)
    fwd_bytes = masks + pairs + params_bytes + boxes_bytes + out
    bwd_bytes = out + masks + pairs + params_bytes + boxes_bytes + masks + params_bytes
    return _f(fwd_bytes, fwd_flops, bwd_bytes, bwd_flops)


# ---------------------------------------------------------------------------------------------
# Per-case floors: ``inputs`` are the case's ``make_inputs`` dict (tensors on any device).
# ---------------------------------------------------------------------------------------------
FLOORS: Dict[str, Callable[[Mapping[str, Any]], Floor]] = {}


def _case(name: str):
    def register(fn):
        FLOORS[name] = fn
        return fn
    return register


@_case("knn_center_features")
def _knn_center_features(x) -> Floor:
    """Eq. 1 end to end: the squared distances of every (center, point) (5 FLOPs each: 2 sub,
    2 mul, 1 add) once per distinct geometry (points/centers given without a batch are one
    geometry, though the op recomputes it per image), the k-selection (integer/compare work, not
    counted), then :func:`gather_mean_floor`; fwd also reads points and centers and writes the
    index [B, C, k] (int64), which the backward reads."""
    feats, points, centers, k = x["feats"], x["points"], x["centers"], int(x["k"])
    B, M, D = feats.shape
    C = centers.shape[-2]
    geo = max(t.shape[0] if t.dim() == 3 else 1 for t in (points, centers))
    g = gather_mean_floor(B, M, C, D, k, feats.element_size(), B)
    return _f(g.bytes_fwd + nbytes(points, centers), g.flops_fwd + 5 * geo * C * M, g.bytes_bwd, g.flops_bwd)


@_case("cosine_assign")
def _cosine_assign(x) -> Floor:
    feats, centers = x["feats"], x["centers"]
    B, M, D = feats.shape
    return cosine_assign_floor(B, M, centers.shape[1], D, feats.element_size(), x.get("alpha") is not None)


@_case("cluster_aggregate")
def _cluster_aggregate(x) -> Floor:
    v, vc = x["values"], x["value_centers"]
    B, M, D = v.shape
    return cluster_aggregate_floor(B, M, vc.shape[1], D, v.element_size())


@_case("superpixel_cluster")
def _superpixel_cluster(x) -> Floor:
    feats, centers = x["feats"], x["centers"]
    B, M, D = feats.shape
    return superpixel_floor(B, M, centers.shape[1], D, feats.element_size(), x.get("alpha") is not None)


@_case("cluster_dispatch")
def _cluster_dispatch(x) -> Floor:
    c, r = x["center_out"], x.get("residual")
    B, C, D = c.shape
    return cluster_dispatch_floor(B, x["assign"].shape[1], C, D, c.element_size(), r is not None)


def _pair_box_floor(x, flops_fwd_per_pair: int, flops_bwd_per_pair: int) -> Floor:
    boxes, pairs = x["boxes"], x["pairs"]
    P, e = pairs.shape[0], boxes.element_size()
    read = nbytes(boxes, pairs)
    return _f(read + P * 4 * e, flops_fwd_per_pair * P, P * 4 * e + read + nbytes(boxes), flops_bwd_per_pair * P)


@_case("union_boxes")
def _union_boxes(x) -> Floor:
    """4 min/max per pair; bwd: the 4 compares again and 4 scatter-adds per pair."""
    return _pair_box_floor(x, 4, 8)


@_case("pair_geometry")
def _pair_geometry(x) -> Floor:
    """Eq. 17 per pair: 2 centres and 2 sizes per box (8 + 8: adds, halvings, subs, clamps),
    2 sub + 2 div for the offsets, 2 div + 2 log for the log-ratios: 24 FLOPs. bwd: the centres and
    sizes again (16), 2 + 12 + 2 for the partials (module docstring of reference/pairs.py),
    4 x 2 for the chain rule to (x1, y1, x2, y2) of both boxes (16) and 8 scatter-adds: 56."""
    return _pair_box_floor(x, 24, 56)


def _sample_taps(rois: torch.Tensor, pooled: int, scale: float, sampling: int, aligned: bool) -> int:
    """sum over RoIs of pooled^2 n_h n_w: the bilinear samples RoIAlign reads per channel."""
    from ..reference import pairs as ref

    rois = rois.detach().to("cpu", torch.float64)
    _, _, ext_w, ext_h = ref.roi_extents(rois, scale, aligned)
    n_h = ref.samples_per_bin(ext_h, pooled, sampling)
    n_w = ref.samples_per_bin(ext_w, pooled, sampling)
    return int((n_h * n_w).sum()) * pooled * pooled


def _roi_constants():
    from .cases import pairs as cases

    return cases.OUT, cases.SCALE, cases.SAMPLING


@_case("roi_align")
def _roi_align(x) -> Floor:
    f, boxes, bb = x["features"], x["boxes"], x["box_batch"]
    out, scale, sampling = _roi_constants()
    taps = _sample_taps(boxes, out, scale, sampling, False)
    return roi_align_floor(taps, boxes.shape[0], f.shape[1], out, nbytes(f), f.element_size(), nbytes(boxes, bb))


@_case("union_roi_align")
def _union_roi_align(x) -> Floor:
    """As roi_align over the P union boxes, computed on the fly (4 min/max per pair, fwd and the
    bwd's recompute); also reads pairs."""
    from ..reference import pairs as ref

    f, boxes, bb, pairs = x["features"], x["boxes"], x["box_batch"], x["pairs"]
    out, scale, sampling = _roi_constants()
    union = ref.union_boxes(boxes.detach().to("cpu", torch.float64), pairs.to("cpu"))
    taps = _sample_taps(union, out, scale, sampling, False)
    P = pairs.shape[0]
    fl = roi_align_floor(taps, P, f.shape[1], out, nbytes(f), f.element_size(), nbytes(boxes, bb, pairs))
    return _f(fl.bytes_fwd, fl.flops_fwd + 4 * P, fl.bytes_bwd, fl.flops_bwd + 4 * P)


@_case("pairwise_edge_fusion")
def _pairwise_edge_fusion(x) -> Floor:
    """subj and obj are the two halves of E1 [K, 2D]: E1 read once (its gradient written once)."""
    E1, union, pairs, weight, bias = x["E1"], x.get("union"), x["pairs"], x["weight"], x.get("bias")
    C, D = weight.shape
    Du = 0 if union is None else union.shape[1]
    return fusion_floor(E1.shape[0], pairs.shape[0], D, Du, C, weight.element_size(), nbytes(E1), bias is not None)


@_case("prototype_distance")
def _prototype_distance(x) -> Floor:
    xs, protos = x["x"], x["protos"]
    return prototype_floor(xs.shape[0], protos.shape[0], xs.shape[1], xs.element_size())


def _mask_kernel_size() -> int:
    from .cases import masks as cases

    return cases.KERNEL_SIZE


@_case("pair_mask_conv")
@_case("pair_mask_conv_per_object")  # params [K, 3]: per_object below
def _pair_mask_conv(x) -> Floor:
    masks, pairs, params = x["masks"], x["pairs"], x["params"]
    K, C, m, _ = masks.shape
    return pair_mask_conv_floor(K, pairs.shape[0], C, m, _mask_kernel_size(), masks.element_size(), nbytes(params),
                                per_object=params.dim() == 2)


@_case("pair_mask_conv_union")
def _pair_mask_conv_union(x) -> Floor:
    """The union frame with R = m (the case's out_size); also reads boxes."""
    masks, pairs, params, boxes = x["masks"], x["pairs"], x["params"], x["boxes"]
    K, C, m, _ = masks.shape
    return pair_mask_conv_floor(K, pairs.shape[0], C, m, _mask_kernel_size(), masks.element_size(), nbytes(params),
                                R=m, boxes_bytes=nbytes(boxes), per_object=params.dim() == 2)


@_case("sil_block")
def _sil_block(x) -> Floor:
    """A whole SILBlock, gradient to the feature map only (no weight gradients are requested).

    FLOPs: the fused ops at the block's shapes (heads folded into the batch: [B h, M, D/h]; the KNN
    index is cached per map size and not counted): gather_mean, superpixel_cluster,
    cluster_dispatch, and the reference features' roi_align (7 x 7, 2 x 2 samples per bin) with its
    7 x 7 mean; plus the dense layers: H' (two Linears on B C rows), H^a (K rows), the intra-entity
    products (2 K C D each way, counting each box against its own image's centers only), the
    encoder layers (QKV and output projections, Q K^T and A V over C tokens per image, the
    feed-forward), H'' (B C rows). Elementwise work (GELU, LayerNorm, softmax, residual adds) is
    not counted. bwd: each op's backward floor; each Linear's input gradient (its forward FLOPs
    again); the attention products and the intra products twice (both operands depend on the map).
    Bytes: the map read and the output written (fwd); the output's gradient and the map read and
    the map's gradient written (bwd); the parameters read once per pass; boxes and box_batch."""
    block, fmap, boxes, bb = x["block"], x["feature_map"], x["boxes"], x["box_batch"]
    B, D, H, W = fmap.shape
    M, C, h, K = H * W, block.num_centers, block.heads, boxes.shape[0]
    e = fmap.element_size()
    k = block._n_k(H, W)
    sig = block.alpha is not None
    ops = (gather_mean_floor(B * h, M, C, D // h, k, e, 1) + superpixel_floor(B * h, M, C, D // h, e, sig)
           + cluster_dispatch_floor(B * h, M, C, D // h, e, True))

    def linear(mod, rows):  # forward FLOPs of an nn.Linear on `rows` rows (weight [out, in], + bias)
        return 2 * rows * mod.in_features * mod.out_features + (rows * mod.out_features if mod.bias is not None else 0)

    dense_fwd = linear(block.h_prime[0], B * C) + linear(block.h_prime[2], B * C) + linear(block.h_second, B * C)
    twice = 0  # products whose both operands need a gradient: counted once more in the backward
    if block.h_a is not None:
        from ..models.sil import REF_ALIGNED, REF_OUTPUT_SIZE, REF_SAMPLING_RATIO

        taps = _sample_taps(boxes, REF_OUTPUT_SIZE, float(x["spatial_scale"]), REF_SAMPLING_RATIO, REF_ALIGNED)
        roi = roi_align_floor(taps, K, D, REF_OUTPUT_SIZE, 0, e, 0)
        mean = K * D * REF_OUTPUT_SIZE ** 2
        ops = ops + _f(0, roi.flops_fwd + mean, 0, roi.flops_bwd + mean)
        intra = 2 * (2 * K * C * D)
        dense_fwd += linear(block.h_a, K) + intra
        twice += intra
    if block.encoder is not None:
        for layer in block.encoder.layers:
            attn = layer.self_attn
            E = attn.embed_dim
            dense_fwd += 2 * B * C * E * 3 * E + 2 * B * C * E * E  # in_proj (QKV) and out_proj
            qk_av = 2 * (2 * B * C * C * E)
            dense_fwd += qk_av + linear(layer.linear1, B * C) + linear(layer.linear2, B * C)
            twice += qk_av
    params = sum(p.numel() * p.element_size() for p in block.parameters())
    io = nbytes(boxes, bb)
    own = _f(2 * B * D * M * e + params + io, dense_fwd, 3 * B * D * M * e + params + io, dense_fwd + twice)
    # the ops' own bytes are intermediates of the block (points, centers, assign, ...): not counted
    return _f(own.bytes_fwd, own.flops_fwd + ops.flops_fwd, own.bytes_bwd, own.flops_bwd + ops.flops_bwd)


def floor_of(case, inputs: Mapping[str, Any]) -> Floor:
    """The floor of ``case`` for ``inputs``: the case's own ``floor`` callable if it has one, else
    :data:`FLOORS` by name; a ``KeyError`` names a case without either."""
    fn = getattr(case, "floor", None) or FLOORS.get(case.name)
    if fn is None:
        raise KeyError(f"no floor for benchmark case {case.name!r}: add one to sgg_kernels.bench.floors.FLOORS "
                       "(or give the Case a floor callable)")
    return fn(inputs)


# ---------------------------------------------------------------------------------------------
# Peaks measured in the same run (CUDA only), and the % of floor.
# ---------------------------------------------------------------------------------------------
COPY_BYTES = 2 ** 30  # the copy source (1 GiB); the copy moves twice that
GEMM_N = 8192
GEMM_DTYPES = ("float32", "bfloat16")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def measure_peaks(device: torch.device, dtypes=GEMM_DTYPES, copy_bytes: int = COPY_BYTES, gemm_n: int = GEMM_N,
                  log: Callable[[str], None] = print) -> Optional[Dict[str, Any]]:
    """Copy bandwidth and GEMM rates on ``device`` (CUDA), timed as the cases are (timing.median_ms).

    - copy: ``dst.copy_(src)`` of a ``copy_bytes`` uint8 tensor, device to device; bytes moved =
      2 x size (read + write). Halved until it fits the free memory.
    - GEMM: ``a @ b`` of ``gemm_n``^2 matrices per dtype, 2 n^3 FLOPs; float32 runs under the process's
      ``torch.get_float32_matmul_precision()`` (``highest`` by default: no TF32), recorded; plus
      ``tf32`` (float32 with TF32 allowed), recorded for reference only: a row uses its dtype's rate.

    Returns None on the CPU (no CPU peak is assumed). A measurement that fails (out of memory) is
    logged and left out.
    """
    from . import timing

    if device.type != "cuda":
        return None
    peaks: Dict[str, Any] = {"copy_gbps": None, "copy_bytes": None, "gemm_tflops": {}, "gemm_n": gemm_n,
                             "float32_matmul_precision": torch.get_float32_matmul_precision()}
    size = copy_bytes
    while size >= 2 ** 24:
        try:
            src = torch.empty(size, dtype=torch.uint8, device=device).random_()
            dst = torch.empty_like(src)
            ms = timing.median_ms(lambda: dst.copy_(src), device)
            peaks["copy_gbps"], peaks["copy_bytes"] = 2 * size / (ms * 1e-3) / 1e9, size
            break
        except torch.cuda.OutOfMemoryError:
            size //= 2
        finally:
            src = dst = None
            torch.cuda.empty_cache()
    if peaks["copy_gbps"] is None:
        log("floors: the copy bandwidth could not be measured (out of memory)")
    # "tf32": float32 operands with TF32 tensor cores allowed, for reference only (tf32x3 dots run
    # at about a third of it); rows use the rate of their own dtype.
    for name in list(dict.fromkeys(dtypes)) + ["tf32"]:
        saved = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = saved if name != "tf32" else True
            g = torch.Generator(device=device).manual_seed(0)
            dt = _DTYPES["float32" if name == "tf32" else name]
            a = torch.randn(gemm_n, gemm_n, device=device, dtype=dt, generator=g)
            b = torch.randn(gemm_n, gemm_n, device=device, dtype=dt, generator=g)
            ms = timing.median_ms(lambda: a @ b, device)
            peaks["gemm_tflops"][name] = 2 * gemm_n ** 3 / (ms * 1e-3) / 1e12
        except Exception as exc:  # OOM, or a dtype this GPU's GEMM lacks
            log(f"floors: the {name} GEMM rate could not be measured ({type(exc).__name__}: {exc})")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
            a = b = None
            torch.cuda.empty_cache()
    return peaks


def apply_peaks(results, peaks: Optional[Mapping[str, Any]]) -> None:
    """Set ``floor_ms`` and ``pct_of_floor`` of every row with a floor, a median and measured peaks
    for its dtype (left None otherwise, e.g. on the CPU)."""
    if not peaks or not peaks.get("copy_gbps"):
        return
    bandwidth = peaks["copy_gbps"] * 1e9
    for r in results:
        rate = (peaks.get("gemm_tflops") or {}).get(r.dtype)
        if r.floor_bytes is None or r.floor_flops is None or rate is None:
            continue
        fl = getattr(r, "floor", None)
        if fl is not None:
            r.floor_ms = fl.time_s(r.pass_, bandwidth, rate * 1e12) * 1e3
        else:
            r.floor_ms = max(r.floor_bytes / bandwidth, r.floor_flops / (rate * 1e12)) * 1e3
        r.pct_of_floor = 100.0 * r.floor_ms / r.median_ms if r.median_ms else None


# ---------------------------------------------------------------------------------------------
# `python -m sgg_kernels.bench.floors`: the floors at named sizes, with datasheet estimates.
# ---------------------------------------------------------------------------------------------
# Datasheet figures (NVIDIA H100 SXM5 / H200 SXM product pages, dense, no sparsity): NOT measured.
DATASHEETS = {
    "h100": {"name": "H100 SXM (datasheet)", "hbm_tbps": 3.35, "tf32": 495.0, "bf16": 990.0, "fp32": 67.0},
    "h200": {"name": "H200 SXM (datasheet)", "hbm_tbps": 4.8, "tf32": 495.0, "bf16": 990.0, "fp32": 67.0},
}
# The unit each op's intended CUDA formulation computes on in float32: "tc" tensor cores with
# tf32x3 (three TF32 products: a third of the TF32 rate), "fma" the CUDA cores' fp32 FMA.
# sil_block mixes both: its dense layers are torch Linears (cuBLAS SGEMM, no TF32 under torch's
# default precision), counted at the FMA rate.
UNITS = {
    "knn_center_features": "fma", "cosine_assign": "tc", "cluster_aggregate": "tc", "superpixel_cluster": "tc",
    "cluster_dispatch": "fma", "sil_block": "fma", "pair_mask_conv": "fma", "pair_mask_conv_union": "fma",
    "pair_mask_conv_per_object": "fma",
    "union_boxes": "fma", "pair_geometry": "fma", "roi_align": "fma", "union_roi_align": "fma",
    "pairwise_edge_fusion": "tc", "prototype_distance": "tc",
    "relation_head": "fma",  # torch convs / Linears (no TF32 by default) dominate; its pair step is a fusion
}


def datasheet_estimate(name: str, fl: Floor, sheet: Mapping[str, float], pass_: str) -> Dict[str, Any]:
    """The float32 floor time (us) of ``pass_`` on a datasheet and what bounds it: ``memory`` or the
    op's compute unit (:data:`UNITS`), per phase ("fwd X, bwd Y" when the two phases differ)."""
    unit = UNITS.get(name, "fma")
    rate = (sheet["tf32"] / 3 if unit == "tc" else sheet["fp32"]) * 1e12
    bw = sheet["hbm_tbps"] * 1e12
    compute = "tensor core (tf32x3)" if unit == "tc" else "FMA (fp32)"
    phases = [(fl.bytes_fwd, fl.flops_fwd)] + ([(fl.bytes_bwd, fl.flops_bwd)] if pass_ != "fwd" else [])
    bounds = ["memory" if b / bw >= f / rate else compute for b, f in phases]
    bound = bounds[0] if len(set(bounds)) == 1 else f"fwd {bounds[0]}, bwd {bounds[1]}"
    return {"us": fl.time_s(pass_, bw, rate) * 1e6, "bound": bound}


def _us(v: float) -> str:
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def main(argv=None) -> int:
    import argparse

    from . import registry

    p = argparse.ArgumentParser(prog="python -m sgg_kernels.bench.floors",
                                description="Print the floor (bytes, FLOPs; fwd and bwd) of every sgg-bench case, "
                                            "and a float32 estimate from datasheet figures (not a measurement).")
    p.add_argument("--size", default="paper,sgdet", help="comma-separated size names (default: paper,sgdet)")
    p.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    p.add_argument("--sheet", default="h100", choices=tuple(DATASHEETS), help="datasheet of the estimate (h100)")
    p.add_argument("--markdown", action="store_true", help="a markdown table")
    args = p.parse_args(argv)
    sizes = [s.strip() for s in args.size.split(",") if s.strip()]
    cases = registry.get_cases([o.strip() for o in args.ops.split(",")] if args.ops else None)
    sheet = DATASHEETS[args.sheet]
    headers = ("op", "size", "fwd MB", "fwd GFLOP", "bwd MB", "bwd GFLOP", "FLOP/B fwd",
               f"fwd us ({args.sheet})", "fwd bound", f"fwd+bwd us ({args.sheet})", "fwd+bwd bound")
    rows = []
    for case in cases:
        for size in sizes:
            if size not in case.sizes:
                continue
            inputs = case.make_inputs(size, torch.device("cpu"), torch.float32, 0)
            fl = floor_of(case, inputs)
            inputs = None
            f1 = datasheet_estimate(case.name, fl, sheet, "fwd")
            f2 = datasheet_estimate(case.name, fl, sheet, "fwd+bwd")
            rows.append((case.name, size, f"{fl.bytes_fwd / MB:.4g}", f"{fl.flops_fwd / 1e9:.4g}",
                         f"{fl.bytes_bwd / MB:.4g}", f"{fl.flops_bwd / 1e9:.4g}",
                         f"{fl.flops_fwd / max(fl.bytes_fwd, 1):.3g}", _us(f1["us"]), f1["bound"],
                         _us(f2["us"]), f2["bound"]))
    print(f"floors, float32 (MB = 2**20 bytes, GFLOP = 1e9 FLOPs); estimate: {sheet['name']}: "
          f"{sheet['hbm_tbps']} TB/s, tf32x3 = {sheet['tf32']:.0f}/3 TFLOP/s, fp32 FMA {sheet['fp32']:.0f} TFLOP/s")
    if args.markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + "---|" * len(headers))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
