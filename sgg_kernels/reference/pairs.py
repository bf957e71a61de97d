"""Pair features (LinkNet, NeurIPS'18, Sec. 3.4) in plain PyTorch: the test oracle and the fallback.

Written equation by equation, float64-safe. Every backend (C++ CPU, CUDA C++, Triton) implements
the *same functions with the same signatures*, forward and backward, so ``sgg_kernels.ops.pairs``
can call any of them. Inputs reaching these functions are already checked by the op layer:

- ``boxes [K, 4]`` (x1, y1, x2, y2), any float dtype for :func:`union_boxes`/:func:`pair_geometry`;
  float32 (float64 when the features are float64) for :func:`roi_align`;
- ``pairs [P, 2]`` int64 (subject, object) into the K boxes; ``box_batch [K]`` int64;
- ``features [B, D, H, W]``; ``subj``/``obj [K, D]`` (possibly row-strided views), ``union [P, Du]``,
  ``weight [C, D]``, ``bias [C]``, all one dtype.

Out-of-range ``pairs``/``box_batch`` entries (possible only with ``set_checks(False)``) contribute
nothing: the pair's or RoI's output is zero and it adds nothing to any gradient.

**union_boxes** u_p = (min(x1_s, x1_o), min(y1_s, y1_o), max(x2_s, x2_o), max(y2_s, y2_o)); its
gradient goes to the box that attains each min/max, the subject on ties.

**pair_geometry** (Eq. 17, box centres): with c = ((x1+x2)/2, (y1+y2)/2), w = max(x2-x1, 1e-6),
h = max(y2-y1, 1e-6): b_o|s = ((cx_o-cx_s)/w_s, (cy_o-cy_s)/h_s, log(w_o/w_s), log(h_o/h_s)).
Backward, G = grad [P, 4]:
    g_cx_o = G0/w_s, g_cx_s = -G0/w_s, g_w_s = -G0 (cx_o-cx_s)/w_s^2 - G2/w_s, g_w_o = G2/w_o
    (y/h likewise with G1, G3); g_w = 0 where x2-x1 < 1e-6 (the clamp);
    d x1 = g_cx/2 - g_w, d x2 = g_cx/2 + g_w, summed over every pair that uses the box.

**roi_align** (torchvision's semantics exactly): for RoI r of image b with box (x1, y1, x2, y2),
offset = 0.5 if aligned else 0, start = x1*scale - offset, extent = x2*scale - offset - start
(at least 1 unless aligned), bin = extent / pooled, n = sampling_ratio if > 0 else ceil(extent /
pooled) samples per bin and axis, clamped to [0, MAX_SAMPLES_PER_BIN_DIM] (a NaN count reads no
sample; see below), count = max(n_h n_w, 1). Sample i of bin p sits at
start + p*bin + (i + 0.5)*bin/n; a sample with y < -1, y > H, x < -1 or x > W reads 0; otherwise
it is bilinear with the coordinate clamped at 0 and at the last row/column. All of this is
separable in y and x, so the output is

    out[r, :, p, q] = 1/count * sum_{y, x} Ay[r, p, y] Ax[r, q, x] f[b, :, y, x]      (*)

where Ay[r, p, y] sums the bilinear weights row y receives from the samples of bin p (zero for
invalid samples), Ax likewise. The reference builds Ay and Ax and contracts (*) per image; the
C++ CPU and CUDA kernels build each RoI's Ay, Ax once and sum (*) over each bin's taps directly
(the CUDA backward with one atomic per RoI, channel and touched pixel). Backward: grad f[b] = sum_{r in b} Ay[r]^T
(G[r] / count) Ax[r]; the boxes get no gradient (as in torchvision). With ``pairs`` the RoIs are
the pairs' union boxes (``union_boxes``), in the subject's image.

**The cap** MAX_SAMPLES_PER_BIN_DIM = 512 samples per bin and axis (the same constant in
csrc/cpu/pairs.cpp and csrc/cuda/pairs.cu): adaptive sampling of a RoI spanning more than 512 x
output_size feature-map pixels along an axis (far beyond any real image: 7 x 512 = 3,584 pixels of a
stride-4 map is a 14,336-pixel image) would need more, and absurd boxes (coordinates x 1e12) would
run for hours. The op layer rejects such boxes, non-finite ones and ``sampling_ratio`` > the cap
while value checks are on (``sgg_kernels.set_checks``); below it, every backend clamps n to
[0, MAX_SAMPLES_PER_BIN_DIM] the same way (a NaN n is 0: no sample, a zero output), so a run is
bounded and reads nothing out of bounds whatever the boxes.

**pairwise_edge_fusion** (Eq. 12-14): g_p = subj[s_p] * obj[o_p] * u_p with u_p = union[p] on the
first Du dims and 1 on the rest, logits = g W^T + bias. Backward, G = grad [P, C], dg = G W [P, D]:
    d subj[k] = sum_{p: s_p = k} dg_p * obj[o_p] * u_p,   d obj[k] = sum_{p: o_p = k} dg_p * subj[s_p] * u_p
    d union_p = (dg_p * subj[s_p] * obj[o_p])[:Du],  d W = G^T g,  d bias = sum_p G_p
(for an invalid pair g_p = 0, so its logits are the bias: it still counts in d bias, nowhere else).

The **sum form** (``sum_mode=True``; Scene-Graph-Benchmark's Motifs / VCTree / Transformer
predictors: ``post_cat(cat(head[s], tail[o])) * union`` with post_cat's weight split into its head
and tail column blocks, subj = head W_h^T + b_cat and obj = tail W_t^T) replaces the product of
the two rows by their sum: g_p = (subj[s_p] + obj[o_p]) * u_p, logits = g W^T + bias. Backward:
    d subj[k] = sum_{p: s_p = k} dg_p * u_p,   d obj[k] = sum_{p: o_p = k} dg_p * u_p
    d union_p = (dg_p * (subj[s_p] + obj[o_p]))[:Du],  d W = G^T g,  d bias = sum_p G_p
with the same rule for invalid pairs (g_p = 0, G_p reaches d bias only).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .cluster import _acc_dtype, _split_index

SIZE_EPS = 1e-6  # pair_geometry: widths and heights are clamped to at least this


# ---------------------------------------------------------------------------------------------
# Pair indices
# ---------------------------------------------------------------------------------------------
def _pair_rows(pairs: Tensor, K: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(valid [P], s [P], o [P])``: a pair is valid when both indices lie in ``[0, K)``; invalid
    pairs get the safe index 0 and must be masked by the caller."""
    vs, s = _split_index(pairs[:, 0], K)
    vo, o = _split_index(pairs[:, 1], K)
    valid = vs & vo
    zero = torch.zeros_like(s)
    return valid, torch.where(valid, s, zero), torch.where(valid, o, zero)


def _rows_at(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]``, also when ``x`` has no rows (K = 0: every pair is invalid, rows of zeros)."""
    if x.shape[0] == 0:
        return x.new_zeros((index.shape[0],) + tuple(x.shape[1:]))
    return x[index]


def _scatter_rows(values: Tensor, index: Tensor, K: int) -> Tensor:
    """``out[k] = sum_{p: index_p = k} values[p]`` (``values [P, ...]``) in the accumulation dtype."""
    out = values.new_zeros((K,) + tuple(values.shape[1:]))
    return out.index_add_(0, index, values)


# ---------------------------------------------------------------------------------------------
# union_boxes
# ---------------------------------------------------------------------------------------------
def union_boxes(boxes: Tensor, pairs: Tensor) -> Tensor:
    """The smallest box holding both boxes of each pair: ``[K, 4]``, ``[P, 2]`` -> ``[P, 4]``."""
    valid, s, o = _pair_rows(pairs, boxes.shape[0])
    bs, bo = _rows_at(boxes, s), _rows_at(boxes, o)
    u = torch.cat([torch.minimum(bs[:, :2], bo[:, :2]), torch.maximum(bs[:, 2:], bo[:, 2:])], dim=1)
    return torch.where(valid[:, None], u, torch.zeros_like(u))


def union_boxes_backward(grad: Tensor, boxes: Tensor, pairs: Tensor) -> Tensor:
    """d boxes of :func:`union_boxes`: each coordinate's gradient to the box attaining the min/max
    (the subject on ties), summed over pairs."""
    K = boxes.shape[0]
    acc = _acc_dtype(grad.dtype)
    valid, s, o = _pair_rows(pairs, K)
    bs, bo = _rows_at(boxes, s), _rows_at(boxes, o)
    to_subject = torch.cat([bs[:, :2] <= bo[:, :2], bs[:, 2:] >= bo[:, 2:]], dim=1)
    g = torch.where(valid[:, None], grad.to(acc), 0)
    out = _scatter_rows(torch.where(to_subject, g, 0), s, K)
    out.index_add_(0, o, torch.where(to_subject, 0, g))
    return out.to(boxes.dtype)


# ---------------------------------------------------------------------------------------------
# pair_geometry (Eq. 17)
# ---------------------------------------------------------------------------------------------
def _centres_sizes(b: Tensor):
    """``(cx, cy, w, h, w_raw, h_raw)`` of boxes ``[*, 4]``; w, h clamped to at least SIZE_EPS."""
    w_raw, h_raw = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return ((b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
            w_raw.clamp_min(SIZE_EPS), h_raw.clamp_min(SIZE_EPS), w_raw, h_raw)


def pair_geometry(boxes: Tensor, pairs: Tensor) -> Tensor:
    """Eq. 17: b_o|s = ((x_o-x_s)/w_s, (y_o-y_s)/h_s, log(w_o/w_s), log(h_o/h_s)), ``[P, 4]``.

    (x, y) are box centres; widths and heights are clamped to at least 1e-6, so degenerate boxes
    (zero or negative size) give finite values.
    """
    acc = _acc_dtype(boxes.dtype)
    valid, s, o = _pair_rows(pairs, boxes.shape[0])
    cxs, cys, ws, hs, _, _ = _centres_sizes(_rows_at(boxes, s).to(acc))
    cxo, cyo, wo, ho, _, _ = _centres_sizes(_rows_at(boxes, o).to(acc))
    out = torch.stack([(cxo - cxs) / ws, (cyo - cys) / hs, torch.log(wo / ws), torch.log(ho / hs)], dim=1)
    return torch.where(valid[:, None], out, 0).to(boxes.dtype)


def pair_geometry_backward(grad: Tensor, boxes: Tensor, pairs: Tensor) -> Tensor:
    """d boxes of :func:`pair_geometry` (formulas in the module docstring)."""
    K = boxes.shape[0]
    acc = _acc_dtype(grad.dtype)
    valid, s, o = _pair_rows(pairs, K)
    G = torch.where(valid[:, None], grad.to(acc), 0)
    cxs, cys, ws, hs, ws_raw, hs_raw = _centres_sizes(_rows_at(boxes, s).to(acc))
    cxo, cyo, wo, ho, wo_raw, ho_raw = _centres_sizes(_rows_at(boxes, o).to(acc))
    g_cxo, g_cyo = G[:, 0] / ws, G[:, 1] / hs
    g_ws = -G[:, 0] * (cxo - cxs) / (ws * ws) - G[:, 2] / ws
    g_hs = -G[:, 1] * (cyo - cys) / (hs * hs) - G[:, 3] / hs
    g_wo, g_ho = G[:, 2] / wo, G[:, 3] / ho
    # clamp_min's gradient: passes where the raw size is >= the bound (as autograd's clamp).
    g_ws, g_hs = torch.where(ws_raw >= SIZE_EPS, g_ws, 0), torch.where(hs_raw >= SIZE_EPS, g_hs, 0)
    g_wo, g_ho = torch.where(wo_raw >= SIZE_EPS, g_wo, 0), torch.where(ho_raw >= SIZE_EPS, g_ho, 0)

    def box_grad(g_cx, g_cy, g_w, g_h):  # chain rule through c = (x1+x2)/2, w = x2-x1
        return torch.stack([g_cx / 2 - g_w, g_cy / 2 - g_h, g_cx / 2 + g_w, g_cy / 2 + g_h], dim=1)

    out = _scatter_rows(box_grad(-g_cxo, -g_cyo, g_ws, g_hs), s, K)
    out.index_add_(0, o, box_grad(g_cxo, g_cyo, g_wo, g_ho))
    return out.to(boxes.dtype)


# ---------------------------------------------------------------------------------------------
# roi_align / union_roi_align
# ---------------------------------------------------------------------------------------------
ROI_CHUNK = 512  # RoIs contracted at once in (*): bounds the reference's temporaries
MAX_SAMPLES_PER_BIN_DIM = 512  # the cap on n (module docstring); = kMaxSamplesPerBinDim of the kernels


def _rois(boxes: Tensor, box_batch: Tensor, pairs: Optional[Tensor], B: int):
    """``(roi_boxes [R, 4], roi_batch [R], valid [R])``: the boxes themselves, or with ``pairs``
    their union boxes in the subject's image. Invalid RoIs get box 0 / image 0 and valid False."""
    K = boxes.shape[0]
    if pairs is None:
        rb = box_batch
        valid = torch.ones_like(rb, dtype=torch.bool)
        roi_boxes = boxes
    else:
        valid, s, _ = _pair_rows(pairs, K)
        roi_boxes = union_boxes(boxes, pairs)
        rb = torch.where(valid, _rows_at(box_batch, s), torch.zeros_like(s))
    vb, rb = _split_index(rb, B)
    return roi_boxes, rb, valid & vb


def roi_extents(roi_boxes: Tensor, spatial_scale: float, aligned: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x0, y0, ext_w, ext_h)`` of RoIs ``[R, 4]`` in feature-map pixels (torchvision's rules: the
    -0.5 px shift when aligned, malformed RoIs forced to 1 x 1 when not)."""
    offset = 0.5 if aligned else 0.0
    start = roi_boxes * spatial_scale - offset
    ext_w, ext_h = start[:, 2] - start[:, 0], start[:, 3] - start[:, 1]
    if not aligned:  # torchvision: force malformed RoIs to be 1x1
        ext_w, ext_h = ext_w.clamp_min(1.0), ext_h.clamp_min(1.0)
    return start[:, 0], start[:, 1], ext_w, ext_h


def adaptive_grid(extent: Tensor, pooled: int) -> Tensor:
    """ceil(extent / pooled): the adaptive samples per bin along one axis, before the cap (float)."""
    return torch.ceil(extent / pooled)


def samples_per_bin(extent: Tensor, pooled: int, sampling_ratio: int) -> Tensor:
    """n [R] int64: ``sampling_ratio`` if > 0 else ceil(extent / pooled), clamped to
    [0, MAX_SAMPLES_PER_BIN_DIM]; NaN (a non-finite box) gives 0, no sample."""
    if sampling_ratio > 0:
        return torch.full(extent.shape, min(sampling_ratio, MAX_SAMPLES_PER_BIN_DIM), dtype=torch.int64,
                          device=extent.device)
    q = adaptive_grid(extent, pooled)
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q.clamp(0, MAX_SAMPLES_PER_BIN_DIM))
    return q.to(torch.int64)


def _axis_weights(start: Tensor, extent: Tensor, pooled: int, size: int, sampling_ratio: int) -> Tuple[Tensor, Tensor]:
    """``(A [R, pooled, size], n [R])`` along one axis: A[r, p, i] sums the bilinear weights that
    pixel row (or column) i receives from the n samples of bin p of RoI r (torchvision's rules)."""
    R = start.shape[0]
    bin_size = extent / pooled
    n = samples_per_bin(extent, pooled, sampling_ratio)
    g = int(n.max()) if R else 0
    A = start.new_zeros((R, pooled, size))
    if g == 0 or size == 0:
        return A, n
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)[None, :, None]
    i = torch.arange(g, device=start.device)[None, None, :]
    nn = n.clamp_min(1).to(start.dtype)[:, None, None]
    pos = start[:, None, None] + p * bin_size[:, None, None] + (i + 0.5) * bin_size[:, None, None] / nn
    use = (i < n[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp_min(0)
    low = pos.floor().to(torch.int64)
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, size - 1, low + 1)
    pos = torch.where(edge, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    zero = torch.zeros_like(frac)
    A.scatter_add_(2, low.clamp(0, size - 1), torch.where(use, 1 - frac, zero))
    A.scatter_add_(2, high.clamp(0, size - 1), torch.where(use, frac, zero))
    return A, n


def _roi_weights(boxes, box_batch, pairs, B, H, W, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned):
    """``(Ay [R, ph, H], Ax [R, pw, W], roi_batch [R])`` with 1/count and invalid RoIs folded into Ay."""
    roi_boxes, rb, valid = _rois(boxes, box_batch, pairs, B)
    x0, y0, ext_w, ext_h = roi_extents(roi_boxes, spatial_scale, aligned)
    Ay, n_h = _axis_weights(y0, ext_h, pooled_h, H, sampling_ratio)
    Ax, n_w = _axis_weights(x0, ext_w, pooled_w, W, sampling_ratio)
    count = (n_h * n_w).clamp_min(1).to(Ay.dtype)
    Ay = torch.where(valid[:, None, None], Ay / count[:, None, None], 0)
    return Ay, Ax, rb


def _per_image_chunks(roi_batch: Tensor, B: int):
    """``(b, index)`` for each image and chunk of at most ROI_CHUNK of its RoIs."""
    for b in range(B):
        idx = (roi_batch == b).nonzero().flatten()
        for start in range(0, idx.numel(), ROI_CHUNK):
            yield b, idx[start:start + ROI_CHUNK]


def roi_align(features: Tensor, boxes: Tensor, box_batch: Tensor, pairs: Optional[Tensor], pooled_h: int,
              pooled_w: int, spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign (torchvision's semantics), ``[B, D, H, W]`` -> ``[R, D, pooled_h, pooled_w]``.

    R = K boxes, or with ``pairs`` the P union boxes. Computed as (*) of the module docstring.
    """
    B, D, H, W = features.shape
    acc = _acc_dtype(features.dtype)
    Ay, Ax, rb = _roi_weights(boxes.to(acc), box_batch, pairs, B, H, W, pooled_h, pooled_w,
                              spatial_scale, sampling_ratio, aligned)
    R = Ay.shape[0]
    out = features.new_zeros((R, D, pooled_h, pooled_w), dtype=acc)
    f = features.to(acc)
    for b, idx in _per_image_chunks(rb, B):
        t = torch.einsum("dyx,rqx->rdyq", f[b], Ax[idx])
        out[idx] = torch.einsum("rpy,rdyq->rdpq", Ay[idx], t)
    return out.to(features.dtype)


def roi_align_backward(grad: Tensor, boxes: Tensor, box_batch: Tensor, pairs: Optional[Tensor], B: int, H: int,
                       W: int, spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    """d features of :func:`roi_align`: ``grad f[b] = sum_{r in b} Ay[r]^T G[r] Ax[r]``, ``[B, D, H, W]``."""
    D, pooled_h, pooled_w = grad.shape[1:]
    acc = _acc_dtype(grad.dtype)
    Ay, Ax, rb = _roi_weights(boxes.to(acc), box_batch, pairs, B, H, W, pooled_h, pooled_w,
                              spatial_scale, sampling_ratio, aligned)
    out = grad.new_zeros((B, D, H, W), dtype=acc)
    g = grad.to(acc)
    for b, idx in _per_image_chunks(rb, B):
        t = torch.einsum("rdpq,rqx->rdpx", g[idx], Ax[idx])
        out[b] += torch.einsum("rpy,rdpx->dyx", Ay[idx], t)
    return out.to(grad.dtype)


# ---------------------------------------------------------------------------------------------
# pairwise_edge_fusion (Eq. 12-14)
# ---------------------------------------------------------------------------------------------
def _fused_rows(subj: Tensor, obj: Tensor, union: Optional[Tensor], valid, s, o, sum_mode: bool = False) -> Tensor:
    """g [P, D] of Eq. 12 (the sum form: (subj[s] + obj[o]) * u), zero for invalid pairs (the
    reference materialises it; kernels never do)."""
    g = _rows_at(subj, s) + _rows_at(obj, o) if sum_mode else _rows_at(subj, s) * _rows_at(obj, o)
    if union is not None:
        Du = union.shape[1]
        g = torch.cat([g[:, :Du] * union, g[:, Du:]], dim=1)
    return torch.where(valid[:, None], g, 0)


def _union_full(union: Optional[Tensor], P: int, D: int, like: Tensor) -> Tensor:
    """u [P, D]: union on the first Du dims, 1 on the rest (all ones without union features)."""
    ones = like.new_ones((P, D))
    if union is None:
        return ones
    return torch.cat([union, ones[:, union.shape[1]:]], dim=1)


def pairwise_edge_fusion(subj: Tensor, obj: Tensor, union: Optional[Tensor], pairs: Tensor, weight: Tensor,
                         bias: Optional[Tensor], sum_mode: bool = False) -> Tensor:
    """Eq. 12-14: logits_p = (subj[s_p] * obj[o_p] * union_p) W^T + bias, ``[P, C]``; with
    ``sum_mode``, logits_p = ((subj[s_p] + obj[o_p]) * union_p) W^T + bias."""
    valid, s, o = _pair_rows(pairs, subj.shape[0])
    g = _fused_rows(subj, obj, union, valid, s, o, sum_mode)
    out = g @ weight.t()
    return out if bias is None else out + bias


def pairwise_edge_fusion_backward(grad: Tensor, subj: Tensor, obj: Tensor, union: Optional[Tensor], pairs: Tensor,
                                  weight: Tensor, has_bias: bool, sum_mode: bool = False):
    """``(d subj [K, D], d obj [K, D], d union [P, Du] | empty, d weight [C, D], d bias [C] | empty)``
    of the product form, or with ``sum_mode`` of the sum form (module docstring)."""
    K, D = subj.shape
    P = pairs.shape[0]
    acc = _acc_dtype(grad.dtype)
    valid, s, o = _pair_rows(pairs, K)
    G = torch.where(valid[:, None], grad.to(acc), 0)
    sub, ob = _rows_at(subj.to(acc), s), _rows_at(obj.to(acc), o)
    u = _union_full(None if union is None else union.to(acc), P, D, sub)
    dg = G @ weight.to(acc)
    if sum_mode:  # d g_p / d subj[s_p] = d g_p / d obj[o_p] = u_p; d g_p / d u_p = subj[s_p] + obj[o_p]
        d_subj = _scatter_rows(dg * u, s, K).to(subj.dtype)
        d_obj = _scatter_rows(dg * u, o, K).to(obj.dtype)
        rows = sub + ob
    else:
        d_subj = _scatter_rows(dg * ob * u, s, K).to(subj.dtype)
        d_obj = _scatter_rows(dg * sub * u, o, K).to(obj.dtype)
        rows = sub * ob
    if union is None:
        d_union = grad.new_empty((0,))
    else:
        d_union = (dg * rows)[:, :union.shape[1]].to(union.dtype).contiguous()
    g = _fused_rows(subj.to(acc), obj.to(acc), None if union is None else union.to(acc), valid, s, o, sum_mode)
    d_weight = (G.t() @ g).to(weight.dtype)
    # an invalid pair's logits are the bias alone, so its gradient still reaches the bias
    d_bias = grad.to(acc).sum(0).to(weight.dtype) if has_bias else grad.new_empty((0,))
    return d_subj, d_obj, d_union, d_weight, d_bias


__all__ = [
    "MAX_SAMPLES_PER_BIN_DIM", "roi_extents", "adaptive_grid", "samples_per_bin",
    "union_boxes", "union_boxes_backward", "pair_geometry", "pair_geometry_backward",
    "roi_align", "roi_align_backward", "pairwise_edge_fusion", "pairwise_edge_fusion_backward",
]


# ---------------------------------------------------------------------------------------------
# union_tap_pool: one tap of a 3x3 convolution after the all-level union RoIAlign, pooled from
# the tap's projected maps (Scene-Graph-Benchmark's reduce_channel folded into the FPN levels)
# ---------------------------------------------------------------------------------------------
def _shift_bins(x: Tensor, dy: int, dx: int) -> Tensor:
    """``out[..., i, j] = x[..., i + dy, j + dx]`` where that bin exists, else 0 (same shape)."""
    R, S = x.shape[-2:]
    out = torch.zeros_like(x)
    i0, i1 = max(0, -dy), min(R, R - dy)
    j0, j1 = max(0, -dx), min(S, S - dx)
    if i0 < i1 and j0 < j1:
        out[..., i0:i1, j0:j1] = x[..., i0 + dy:i1 + dy, j0 + dx:j1 + dx]
    return out


def union_tap_pool(maps, boxes: Tensor, box_batch: Tensor, pairs: Tensor, pooled: int, scales,
                   sampling_ratio: int, aligned: bool, dy: int, dx: int) -> Tensor:
    """``[P, C, pooled, pooled]``: the union-box RoIAlign of every level, summed over the levels and
    shifted by one tap of a 3x3 convolution with zero padding 1:

        out[p, :, i, j] = sum_l roi_align(maps[l], union box p, scales[l])[:, i + dy, j + dx]

    (0 where bin (i + dy, j + dx) is outside the pooled grid). ``maps`` are channels-last
    ``[B, H_l, W_l, C]``. With maps[l] = F_l W_{l,t}^T (the FPN level F_l projected by the tap's
    slice of a conv weight W [C, L C, 3, 3]: W_{l,t} = W[:, l C:(l + 1) C, dy + 1, dx + 1]) the sum
    over the 9 taps is that conv (no bias) of the concatenated per-level RoIAlign, because RoIAlign
    is linear in the features and the same for every channel, so channel mixing commutes with it."""
    acc = _acc_dtype(maps[0].dtype)
    b = boxes.to(acc)
    out = None
    for m, s in zip(maps, scales):
        r = roi_align(m.permute(0, 3, 1, 2), b, box_batch, pairs, pooled, pooled, s, sampling_ratio, aligned)
        out = r if out is None else out + r
    return _shift_bins(out, dy, dx)


def union_tap_pool_backward(grad: Tensor, boxes: Tensor, box_batch: Tensor, pairs: Tensor, B: int, heights,
                            widths, scales, sampling_ratio: int, aligned: bool, dy: int, dx: int):
    """d maps of :func:`union_tap_pool`: per level ``roi_align_backward`` of the grad shifted back,
    channels-last ``[B, H_l, W_l, C]``."""
    acc = _acc_dtype(grad.dtype)
    b = boxes.to(acc)
    g = _shift_bins(grad, -dy, -dx)
    return [roi_align_backward(g, b, box_batch, pairs, B, H, W, s, sampling_ratio, aligned).permute(0, 2, 3, 1)
            .contiguous() for H, W, s in zip(heights, widths, scales)]
