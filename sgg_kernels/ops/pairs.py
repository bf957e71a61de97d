"""Pair feature ops (LinkNet, NeurIPS'18, Sec. 3.4, Eq. 12-14 and 17; union-box RoIAlign).

Each public function checks its arguments, then calls one ``torch.library`` op
(``sgg_kernels::<name>``) whose body picks a backend (see ``sgg_kernels._backend``). Every op has a
fake kernel and an autograd formula whose backward is its own op with kernels per backend.

Conventions (DESIGN.md): boxes ``[K, 4]`` (x1, y1, x2, y2) in image pixels, ``box_batch [K]`` the
image of each box, ``pairs [P, 2]`` int64 (subject, object) global indices into the K boxes, both
of one image. Feature maps ``[B, D, H, W]``; ``spatial_scale`` maps image pixels to map pixels.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _checks
from .._backend import Kernels, value_checks_on
from ..reference import pairs as ref

_LIB = "sgg_kernels"

# ---------------------------------------------------------------------------------------------
# Backend tables (cpu/cuda: ops of the compiled extension; triton: sgg_kernels.triton.pairs).
# ---------------------------------------------------------------------------------------------
_UNION = Kernels("pairs", ref.union_boxes, cpu="_union_boxes", cuda="_union_boxes")
_UNION_BWD = Kernels("pairs", ref.union_boxes_backward, cpu="_union_boxes_backward", cuda="_union_boxes_backward")
_GEOMETRY = Kernels("pairs", ref.pair_geometry, cpu="_pair_geometry", cuda="_pair_geometry")
_GEOMETRY_BWD = Kernels("pairs", ref.pair_geometry_backward, cpu="_pair_geometry_backward", cuda="_pair_geometry_backward")
_ROI = Kernels("pairs", ref.roi_align, cpu="_roi_align", cuda="_roi_align")
_ROI_BWD = Kernels("pairs", ref.roi_align_backward, cpu="_roi_align_backward", cuda="_roi_align_backward")
_FUSION = Kernels("pairs", ref.pairwise_edge_fusion, cpu="_pairwise_edge_fusion", triton="pairwise_edge_fusion")
_FUSION_BWD = Kernels("pairs", ref.pairwise_edge_fusion_backward, cpu="_pairwise_edge_fusion_backward",
                      triton="pairwise_edge_fusion_backward")

KERNELS = {
    "union_boxes": (_UNION, _UNION_BWD),
    "pair_geometry": (_GEOMETRY, _GEOMETRY_BWD),
    "roi_align": (_ROI, _ROI_BWD),
    "union_roi_align": (_ROI, _ROI_BWD),
    "pairwise_edge_fusion": (_FUSION, _FUSION_BWD),
}


def _empty_grad(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _roi_boxes(boxes: Tensor, features: Tensor) -> Tensor:
    """Box coordinates as the RoIAlign kernels read them: float64 for float64 features (or their
    float64 gradient), else float32.

    (Coordinates in half precision would be off by up to 0.5 px at 1000 px; torchvision keeps the
    boxes' precision too, via autocast's float32.)
    """
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    return boxes.detach().to(dtype).contiguous()


def _cross_image(pairs: Tensor, box_batch: Tensor) -> Tensor:
    """Bool [P]: pairs whose two boxes lie in different images (pairs outside [0, K) count as not)."""
    valid, s, o = ref._pair_rows(pairs, box_batch.shape[0])
    if box_batch.shape[0] == 0:
        return valid  # all False
    return valid & (box_batch[s] != box_batch[o])


def _raise_cross_image(pairs: Tensor, box_batch: Tensor) -> None:
    """The error for pairs joining two images (called once :func:`_cross_image` found some)."""
    cross = _cross_image(pairs, box_batch).nonzero()
    p = int(cross[0, 0])
    s, o = int(pairs[p, 0]), int(pairs[p, 1])
    raise ValueError(
        f"pairs[{p}] = ({s}, {o}) joins boxes of images {int(box_batch[s])} and {int(box_batch[o])} "
        f"({cross.shape[0]} such pairs); a pair's boxes must be in one image (box_batch)"
    )


def _check_pair_values(pairs: Tensor, K: int, box_batch: Optional[Tensor] = None,
                       batch_size: Optional[int] = None, batch_what: str = "B, the number of images") -> None:
    """Value checks from one fused reduction and one sync: pair indices in [0, K); given
    ``box_batch``, both boxes of a pair in one image; given ``batch_size`` too, box_batch in
    [0, batch_size)."""
    if box_batch is None:
        _checks.index_range(pairs, "pairs", K, "K, the number of boxes")
        return
    parts = [_checks.index_bounds(pairs), _cross_image(pairs, box_batch).sum().reshape(1)]
    if batch_size is not None:
        parts.append(_checks.index_bounds(box_batch))
    stats = torch.cat(parts).tolist()  # the one sync
    if batch_size is not None:
        _checks.check_bounds(stats[3], stats[4], "box_batch", batch_size, batch_what)
    _checks.check_bounds(stats[0], stats[1], "pairs", K, "K, the number of boxes")
    if stats[2]:
        _raise_cross_image(pairs, box_batch)


# ---------------------------------------------------------------------------------------------
# union_boxes / pair_geometry
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::union_boxes", mutates_args=())
def _union_boxes_op(boxes: Tensor, pairs: Tensor) -> Tensor:
    if value_checks_on():
        _check_pair_values(pairs, boxes.shape[0])
    return _UNION(boxes.device, boxes.contiguous(), pairs.contiguous())


@_union_boxes_op.register_fake
def _(boxes, pairs):
    return boxes.new_empty((pairs.shape[0], 4))


@torch.library.custom_op(f"{_LIB}::union_boxes_backward", mutates_args=())
def _union_boxes_backward_op(grad: Tensor, boxes: Tensor, pairs: Tensor) -> Tensor:
    return _UNION_BWD(boxes.device, grad.contiguous(), boxes.contiguous(), pairs.contiguous())


@_union_boxes_backward_op.register_fake
def _(grad, boxes, pairs):
    return torch.empty_like(boxes, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{_LIB}::pair_geometry", mutates_args=())
def _pair_geometry_op(boxes: Tensor, pairs: Tensor) -> Tensor:
    if value_checks_on():
        _check_pair_values(pairs, boxes.shape[0])
    return _GEOMETRY(boxes.device, boxes.contiguous(), pairs.contiguous())


@_pair_geometry_op.register_fake
def _(boxes, pairs):
    return boxes.new_empty((pairs.shape[0], 4))


@torch.library.custom_op(f"{_LIB}::pair_geometry_backward", mutates_args=())
def _pair_geometry_backward_op(grad: Tensor, boxes: Tensor, pairs: Tensor) -> Tensor:
    return _GEOMETRY_BWD(boxes.device, grad.contiguous(), boxes.contiguous(), pairs.contiguous())


@_pair_geometry_backward_op.register_fake
def _(grad, boxes, pairs):
    return torch.empty_like(boxes, memory_format=torch.contiguous_format)


def _boxes_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _union_boxes_bwd(ctx, grad):
    boxes, pairs = ctx.saved_tensors
    return _union_boxes_backward_op(grad, boxes, pairs), None


def _pair_geometry_bwd(ctx, grad):
    boxes, pairs = ctx.saved_tensors
    return _pair_geometry_backward_op(grad, boxes, pairs), None


torch.library.register_autograd(f"{_LIB}::union_boxes", _union_boxes_bwd, setup_context=_boxes_setup)
torch.library.register_autograd(f"{_LIB}::pair_geometry", _pair_geometry_bwd, setup_context=_boxes_setup)


def _check_boxes(boxes: Tensor) -> None:
    _checks.tensor(boxes, "boxes", "K, 4")
    _checks.size(boxes, "boxes", 1, 4, "(x1, y1, x2, y2)")


def _check_pairs(pairs: Tensor, boxes: Tensor) -> None:
    _checks.tensor(pairs, "pairs", "P, 2", kind="index")
    _checks.size(pairs, "pairs", 1, 2, "(subject, object)")
    _checks.same_device([("boxes", boxes), ("pairs", pairs)])


def union_boxes(boxes: Tensor, pairs: Tensor) -> Tensor:
    """The union box of each pair: (min x1, min y1, max x2, max y2) of subject and object.

    Args:
        boxes (Tensor[K, 4]): (x1, y1, x2, y2).
        pairs (Tensor[P, 2] int64): (subject, object) indices into ``boxes``.

    Returns:
        Tensor[P, 4] in the dtype of ``boxes``; differentiable in ``boxes`` (each coordinate's
        gradient goes to the box attaining the min/max, the subject on ties).
    """
    _check_boxes(boxes)
    _check_pairs(pairs, boxes)
    return _union_boxes_op(boxes, pairs)


def pair_geometry(boxes: Tensor, pairs: Tensor) -> Tensor:
    """Eq. 17, the relative layout of each pair's object w.r.t. its subject.

    b_o|s = ((x_o - x_s) / w_s, (y_o - y_s) / h_s, log(w_o / w_s), log(h_o / h_s)) with (x, y) the
    box centres; widths and heights are clamped to at least 1e-6, so degenerate boxes stay finite.

    Args:
        boxes (Tensor[K, 4]): (x1, y1, x2, y2).
        pairs (Tensor[P, 2] int64): (subject, object) indices into ``boxes``.

    Returns:
        Tensor[P, 4] in the dtype of ``boxes`` (computed in float32, float64 for float64 boxes);
        differentiable in ``boxes``. A degenerate subject gives offsets of order 1e6 x its
        distance: finite in float32/bfloat16/float64, but past float16's range (pass float32 boxes).
    """
    _check_boxes(boxes)
    _check_pairs(pairs, boxes)
    return _pair_geometry_op(boxes, pairs)


# ---------------------------------------------------------------------------------------------
# roi_align / union_roi_align
# ---------------------------------------------------------------------------------------------
MAX_SAMPLES_PER_BIN_DIM = ref.MAX_SAMPLES_PER_BIN_DIM  # samples per bin and axis (see roi_align)


def _roi_grid_over(rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float, sampling_ratio: int,
                   aligned: bool) -> Tensor:
    """Bool [R]: with adaptive sampling, RoIs whose sample grid per bin exceeds MAX_SAMPLES_PER_BIN_DIM
    along an axis (computed as the kernels do, with reference.pairs' functions); none otherwise."""
    if sampling_ratio > 0:
        return torch.zeros(rois.shape[0], dtype=torch.bool, device=rois.device)
    _, _, ext_w, ext_h = ref.roi_extents(rois, spatial_scale, aligned)
    cap = MAX_SAMPLES_PER_BIN_DIM
    return (ref.adaptive_grid(ext_h, pooled_h) > cap) | (ref.adaptive_grid(ext_w, pooled_w) > cap)


def _raise_non_finite(boxes: Tensor, bad: Tensor) -> None:
    k = int(bad.nonzero()[0, 0])
    raise ValueError(f"boxes must be finite: boxes[{k}] = {tuple(boxes[k].tolist())} ({int(bad.sum())} such boxes); "
                     "sgg_kernels.set_checks(False) skips this check (a RoI with such a box then pools zeros)")


def _raise_grid_over(rois: Tensor, over: Tensor, pairs: Optional[Tensor], pooled_h: int, pooled_w: int,
                     spatial_scale: float, aligned: bool) -> None:
    """The error for the first RoI flagged by :func:`_roi_grid_over` (a few syncs: error path only)."""
    r = int(over.nonzero()[0, 0])
    what = f"boxes[{r}]" if pairs is None else \
        f"the union box of pairs[{r}] = ({int(pairs[r, 0])}, {int(pairs[r, 1])}) (from boxes)"
    _, _, ext_w, ext_h = ref.roi_extents(rois[r:r + 1], spatial_scale, aligned)
    grid = (int(ref.adaptive_grid(ext_h, pooled_h)), int(ref.adaptive_grid(ext_w, pooled_w)))
    cap = MAX_SAMPLES_PER_BIN_DIM
    raise ValueError(
        f"boxes: {what} = {tuple(rois[r].tolist())} spans {float(ext_h):.4g} x {float(ext_w):.4g} feature-map pixels "
        f"(h x w, with spatial_scale = {spatial_scale:g}); adaptive sampling (sampling_ratio <= 0) would take "
        f"{grid[0]} x {grid[1]} samples per bin, above the cap of {cap} per axis (MAX_SAMPLES_PER_BIN_DIM: a RoI "
        f"may span at most {cap} x output_size = {cap * pooled_h} x {cap * pooled_w} feature-map pixels). Check the "
        f"boxes' units and spatial_scale, or pass sampling_ratio in [1, {cap}] for a fixed grid "
        f"({int(over.sum())} such RoIs); sgg_kernels.set_checks(False) skips this check (the grid is then clamped "
        f"to {cap})"
    )


def _check_roi_values(features: Tensor, roi_boxes: Tensor, box_batch: Tensor, pairs: Optional[Tensor],
                      pooled_h: int, pooled_w: int, spatial_scale: float, sampling_ratio: int, aligned: bool) -> None:
    """Every value check of roi_align / union_roi_align from one fused reduction and one sync:
    box_batch in [0, B); with pairs, pairs in [0, K) and both boxes in one image; every box finite;
    with adaptive sampling, the RoIs (the boxes, or the pairs' union boxes) within
    MAX_SAMPLES_PER_BIN_DIM samples per bin and axis. ``roi_boxes``: the boxes as the kernels read
    them (:func:`_roi_boxes`)."""
    B, K = features.shape[0], roi_boxes.shape[0]
    parts = [_checks.index_bounds(box_batch)]
    if pairs is None:
        rois = roi_boxes
    else:
        parts.append(_checks.index_bounds(pairs))
        parts.append(_cross_image(pairs, box_batch).sum().reshape(1))
        rois = ref.union_boxes(roi_boxes, pairs)  # an invalid pair gets a zero box
    non_finite = ~torch.isfinite(roi_boxes).all(1)
    over = _roi_grid_over(rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned)
    parts += [non_finite.sum().reshape(1), over.sum().reshape(1)]
    stats = torch.cat([t.to(torch.int64) for t in parts]).tolist()  # the one sync
    _checks.check_bounds(stats[0], stats[1], "box_batch", B, "B, the batch of features")
    if pairs is not None:
        _checks.check_bounds(stats[2], stats[3], "pairs", K, "K, the number of boxes")
        if stats[4]:
            _raise_cross_image(pairs, box_batch)
    if stats[-2]:
        _raise_non_finite(roi_boxes, non_finite)
    if stats[-1]:
        _raise_grid_over(rois, over, pairs, pooled_h, pooled_w, spatial_scale, aligned)


@torch.library.custom_op(f"{_LIB}::roi_align", mutates_args=())
def _roi_align_op(features: Tensor, boxes: Tensor, box_batch: Tensor, pooled_h: int, pooled_w: int,
                  spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    rois = _roi_boxes(boxes, features)
    if value_checks_on():
        _check_roi_values(features, rois, box_batch, None, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned)
    return _ROI(features.device, features.contiguous(), rois, box_batch.contiguous(), None,
                pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned)


@_roi_align_op.register_fake
def _(features, boxes, box_batch, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned):
    return features.new_empty((boxes.shape[0], features.shape[1], pooled_h, pooled_w))


@torch.library.custom_op(f"{_LIB}::union_roi_align", mutates_args=())
def _union_roi_align_op(features: Tensor, boxes: Tensor, box_batch: Tensor, pairs: Tensor, pooled_h: int,
                        pooled_w: int, spatial_scale: float, sampling_ratio: int, aligned: bool,
                        check_values: bool = True) -> Tensor:
    rois = _roi_boxes(boxes, features)
    if check_values and value_checks_on():
        _check_roi_values(features, rois, box_batch, pairs, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned)
    return _ROI(features.device, features.contiguous(), rois, box_batch.contiguous(),
                pairs.contiguous(), pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned)


@_union_roi_align_op.register_fake
def _(features, boxes, box_batch, pairs, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, check_values=True):
    return features.new_empty((pairs.shape[0], features.shape[1], pooled_h, pooled_w))


@torch.library.custom_op(f"{_LIB}::roi_align_backward", mutates_args=())
def _roi_align_backward_op(grad: Tensor, boxes: Tensor, box_batch: Tensor, pairs: Optional[Tensor], B: int, H: int,
                           W: int, spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    return _ROI_BWD(grad.device, grad.contiguous(), _roi_boxes(boxes, grad), box_batch.contiguous(),
                    None if pairs is None else pairs.contiguous(), B, H, W, spatial_scale, sampling_ratio, aligned)


@_roi_align_backward_op.register_fake
def _(grad, boxes, box_batch, pairs, B, H, W, spatial_scale, sampling_ratio, aligned):
    return grad.new_empty((B, grad.shape[1], H, W))


def _roi_setup(ctx, inputs, output):
    features, boxes, box_batch = inputs[:3]
    ctx.n_inputs = len(inputs)  # roi_align: 8; union_roi_align: 10 (pairs, ..., check_values)
    pairs = inputs[3] if len(inputs) == 10 else None
    first = 4 if pairs is not None else 3
    ctx.params = inputs[first:first + 5]  # pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
    ctx.B, _, ctx.H, ctx.W = features.shape
    ctx.save_for_backward(boxes, box_batch, pairs)


def _roi_bwd(ctx, grad):
    boxes, box_batch, pairs = ctx.saved_tensors
    _, _, scale, ratio, aligned = ctx.params
    gf = _roi_align_backward_op(grad, boxes, box_batch, pairs, ctx.B, ctx.H, ctx.W, scale, ratio, aligned)
    return (gf,) + (None,) * (ctx.n_inputs - 1)


torch.library.register_autograd(f"{_LIB}::roi_align", _roi_bwd, setup_context=_roi_setup)
torch.library.register_autograd(f"{_LIB}::union_roi_align", _roi_bwd, setup_context=_roi_setup)


def _output_size(output_size) -> Tuple[int, int]:
    if isinstance(output_size, numbers.Integral) and not isinstance(output_size, bool):
        output_size = (int(output_size), int(output_size))
    if (not isinstance(output_size, (tuple, list)) or len(output_size) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in output_size)):
        raise ValueError(f"output_size must be a positive int or a pair (h, w) of positive ints, got {output_size!r}")
    return int(output_size[0]), int(output_size[1])


def _check_roi_params(spatial_scale, sampling_ratio, aligned, name="spatial_scale") -> float:
    if not isinstance(spatial_scale, numbers.Real) or isinstance(spatial_scale, bool) or not spatial_scale > 0:
        raise ValueError(f"{name} must be a positive number (feature-map pixels per image pixel), got {spatial_scale!r}")
    if (not isinstance(sampling_ratio, numbers.Integral) or isinstance(sampling_ratio, bool)
            or sampling_ratio > MAX_SAMPLES_PER_BIN_DIM):
        raise ValueError(f"sampling_ratio must be an int <= {MAX_SAMPLES_PER_BIN_DIM} (MAX_SAMPLES_PER_BIN_DIM samples per "
                         f"bin and axis; <= 0: adaptive, ceil(roi size / output size)), got {sampling_ratio!r}")
    if not isinstance(aligned, bool):
        raise ValueError(f"aligned must be a bool, got {aligned!r}")
    return float(spatial_scale)


def _check_roi_inputs(features: Tensor, boxes: Tensor, box_batch: Tensor, fname: str = "features") -> None:
    _checks.tensor(features, fname, "B, D, H, W")
    _check_boxes(boxes)
    _checks.tensor(box_batch, "box_batch", "K", kind="index")
    _checks.size(box_batch, "box_batch", 0, boxes.shape[0], "K, the number of boxes")
    _checks.same_device([(fname, features), ("boxes", boxes), ("box_batch", box_batch)])


def roi_align(features: Tensor, boxes: Tensor, box_batch: Tensor, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign with torchvision's semantics (``torchvision.ops.roi_align``), boxes packed per batch.

    Args:
        features (Tensor[B, D, H, W]): feature map.
        boxes (Tensor[K, 4]): (x1, y1, x2, y2) in image pixels.
        box_batch (Tensor[K] int64): image of each box, in [0, B).
        output_size (int or (int, int)): pooled (h, w).
        spatial_scale (float): feature-map pixels per image pixel (e.g. 1/16).
        sampling_ratio (int): samples per bin and axis, at most ``MAX_SAMPLES_PER_BIN_DIM`` = 512;
            <= 0 (default -1, torchvision's; 0 in maskrcnn-benchmark) means adaptive, ceil(roi size /
            output size), capped at 512 (see below).
        aligned (bool): shift boxes by -0.5 px (pixel model of Detectron2); False = legacy.

    Returns:
        Tensor[K, D, h, w] in the dtype of ``features``; differentiable in ``features`` (not in the
        boxes, as torchvision). Box coordinates are read in float32 (float64 for float64 features).

    Raises:
        ValueError for ``sampling_ratio`` > 512 (always), and while value checks are on
        (:func:`sgg_kernels.set_checks`, the default) for non-finite boxes and, with adaptive
        sampling, for a box spanning more than 512 x output_size feature-map pixels along an axis
        (box size x ``spatial_scale``: 3,584 pixels at output 7, far beyond any real image; pass a
        fixed ``sampling_ratio`` for such RoIs). IndexError for ``box_batch`` outside [0, B). With
        checks off every backend clamps the grid to 512 per axis and a non-finite box pools zeros,
        so the run stays bounded. These value checks cost one fused reduction and one sync.
    """
    _check_roi_inputs(features, boxes, box_batch)
    ph, pw = _output_size(output_size)
    scale = _check_roi_params(spatial_scale, sampling_ratio, aligned)
    return _roi_align_op(features, boxes, box_batch, ph, pw, scale, int(sampling_ratio), aligned)


def union_roi_align(features: Union[Tensor, Sequence[Tensor]], boxes: Tensor, box_batch: Tensor, pairs: Tensor,
                    output_size, spatial_scale: Union[float, Sequence[float]] = 1.0, sampling_ratio: int = -1,
                    aligned: bool = False) -> Tensor:
    """RoIAlign over each pair's union box, computed on the fly (no ``[P, 4]`` union boxes kept).

    Args:
        features (Tensor[B, D, H, W] or list of them): one map, or FPN levels (each its own D, H, W).
        boxes (Tensor[K, 4]), box_batch (Tensor[K] int64): packed boxes and their images.
        pairs (Tensor[P, 2] int64): (subject, object) indices, both boxes of one image.
        output_size (int or (int, int)): pooled (h, w).
        spatial_scale (float, or one per level): feature-map pixels per image pixel.
        sampling_ratio, aligned: as :func:`roi_align` (``sampling_ratio`` at most
            ``MAX_SAMPLES_PER_BIN_DIM`` = 512; adaptive sampling capped at 512 per bin and axis).

    Returns:
        Tensor[P, sum of D, h, w]: with several levels, every pair is pooled from every level and the
        outputs are concatenated along channels (Scene-Graph-Benchmark's all-levels pooling).

    Raises:
        As :func:`roi_align`, with the union boxes as the RoIs (a union box that is not finite, or
        that spans more than 512 x output_size feature-map pixels under adaptive sampling, names
        ``boxes`` and the pair); also IndexError for ``pairs`` outside [0, K) and ValueError for a
        pair joining two images. All value checks share one fused reduction and one sync per call
        (on the level of the largest spatial_scale), whatever the number of levels.
    """
    levels: List[Tensor] = list(features) if isinstance(features, (list, tuple)) else [features]
    if not levels:
        raise ValueError("features must be a tensor [B, D, H, W] or a non-empty list of FPN levels")
    scales = list(spatial_scale) if isinstance(spatial_scale, (list, tuple)) else [spatial_scale] * len(levels)
    if len(scales) != len(levels):
        raise ValueError(f"spatial_scale has {len(scales)} entries but features has {len(levels)} levels")
    for i, level in enumerate(levels):
        name = "features" if len(levels) == 1 else f"features[{i}]"
        _check_roi_inputs(level, boxes, box_batch, name)
        _checks.size(level, name, 0, levels[0].shape[0], "B, the batch of the first level")
        _checks.same_float_dtype([("features[0]", levels[0]), (name, level)])
    _check_pairs(pairs, boxes)
    ph, pw = _output_size(output_size)
    scales = [_check_roi_params(s, sampling_ratio, aligned, "spatial_scale" if len(levels) == 1 else f"spatial_scale[{i}]")
              for i, s in enumerate(scales)]
    # The value checks run once, with the level of the largest spatial_scale: the index and finiteness
    # checks do not depend on the level, and the adaptive grid's cap binds first at the largest scale.
    checked = max(range(len(levels)), key=lambda i: scales[i])
    outs = [_union_roi_align_op(level, boxes, box_batch, pairs, ph, pw, s, int(sampling_ratio), aligned, i == checked)
            for i, (level, s) in enumerate(zip(levels, scales))]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


# ---------------------------------------------------------------------------------------------
# pairwise_edge_fusion (Eq. 12-14)
# ---------------------------------------------------------------------------------------------
def _rows(x: Tensor) -> Tensor:
    """Row-strided views (LinkNet's E1 halves) pass as they are; other layouts are made contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


FUSION_MODES = ("product", "sum")  # pairwise_edge_fusion's forms: g = subj * obj * u or (subj + obj) * u


@torch.library.custom_op(f"{_LIB}::pairwise_edge_fusion", mutates_args=())
def _fusion_op(subj: Tensor, obj: Tensor, union: Optional[Tensor], pairs: Tensor, weight: Tensor,
               bias: Optional[Tensor], sum_mode: bool = False) -> Tensor:
    if value_checks_on():
        _check_pair_values(pairs, subj.shape[0])
    return _FUSION(subj.device, _rows(subj), _rows(obj), None if union is None else _rows(union), pairs.contiguous(),
                   weight.contiguous(), None if bias is None else bias.contiguous(), sum_mode)


@_fusion_op.register_fake
def _(subj, obj, union, pairs, weight, bias, sum_mode=False):
    return subj.new_empty((pairs.shape[0], weight.shape[0]))


@torch.library.custom_op(f"{_LIB}::pairwise_edge_fusion_backward", mutates_args=())
def _fusion_backward_op(grad: Tensor, subj: Tensor, obj: Tensor, union: Optional[Tensor], pairs: Tensor,
                        weight: Tensor, has_bias: bool,
                        sum_mode: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ds, do, du, dw, db = _FUSION_BWD(subj.device, grad.contiguous(), _rows(subj), _rows(obj),
                                     None if union is None else _rows(union), pairs.contiguous(), weight.contiguous(),
                                     has_bias, sum_mode)
    if union is None or du is None:
        du = _empty_grad(subj)
    if not has_bias or db is None:
        db = _empty_grad(subj)
    return ds, do, du, dw, db


@_fusion_backward_op.register_fake
def _(grad, subj, obj, union, pairs, weight, has_bias, sum_mode=False):
    du = subj.new_empty((0,)) if union is None else union.new_empty(union.shape)
    db = subj.new_empty((weight.shape[0],) if has_bias else (0,))
    return subj.new_empty(subj.shape), obj.new_empty(obj.shape), du, weight.new_empty(weight.shape), db


def _fusion_setup(ctx, inputs, output):
    subj, obj, union, pairs, weight, bias = inputs[:6]
    ctx.sum_mode = bool(inputs[6]) if len(inputs) > 6 else False
    ctx.has_union, ctx.has_bias = union is not None, bias is not None
    ctx.save_for_backward(subj, obj, union, pairs, weight)


def _fusion_bwd(ctx, grad):
    subj, obj, union, pairs, weight = ctx.saved_tensors
    ds, do, du, dw, db = _fusion_backward_op(grad, subj, obj, union, pairs, weight, ctx.has_bias, ctx.sum_mode)
    return ds, do, (du if ctx.has_union else None), None, dw, (db if ctx.has_bias else None), None


torch.library.register_autograd(f"{_LIB}::pairwise_edge_fusion", _fusion_bwd, setup_context=_fusion_setup)


def pairwise_edge_fusion(subj: Tensor, obj: Tensor, union: Optional[Tensor], pairs: Tensor, weight: Tensor,
                         bias: Optional[Tensor] = None, *, mode: str = "product") -> Tensor:
    """Eq. 12-14: relation logits of every pair without materialising the ``[P, D]`` fused features.

    ``mode="product"`` (LinkNet): g_p = subj[s_p] * obj[o_p] * union_p (Eq. 12; ``union`` multiplies
    the first Du dims when Du < D, and counts as 1 when absent), logits_p = g_p W^T + bias (Eq. 14
    without the geometry term of Eq. 13, which the module adds as its own small matmul).

    ``mode="sum"`` (Scene-Graph-Benchmark's Motifs / VCTree / Transformer predictors):
    g_p = (subj[s_p] + obj[o_p]) * union_p, the same union rule, logits_p = g_p W^T + bias. Their
    ``post_cat(cat(head[s], tail[o]))`` is a linear map of a concatenation, i.e. the sum of two
    per-object projections: subj = head W_h^T + b_cat, obj = tail W_t^T (W_h, W_t the head and
    tail column blocks of post_cat's weight), each only ``[K, D]``.

    Args:
        subj (Tensor[K, D]): subject edge features (LinkNet: ``E1[:, :D]``; a row-strided view of a
            ``[K, 2D]`` tensor is read in place); sum form: the subjects' projection.
        obj (Tensor[K, D]): object edge features (``E1[:, D:]``); sum form: the objects' projection.
        union (Tensor[P, Du] or None): union-box features, Du <= D.
        pairs (Tensor[P, 2] int64): (subject, object) indices into the K rows.
        weight (Tensor[C, D]): fc4's weight restricted to the fused features (sum form: the
            classifier's, e.g. SGB's ``rel_compress.weight``).
        bias (Tensor[C] or None).
        mode (str, keyword-only): ``"product"`` (default) or ``"sum"``.

    Returns:
        Tensor[P, C], differentiable in subj, obj, union, weight and bias. Backward recomputes the
        fused features tile by tile (peak memory O(P C + P Du), not O(P D)).

    Raises:
        ValueError for an unknown ``mode`` and for shape mismatches, TypeError for wrong dtypes,
        IndexError for ``pairs`` outside [0, K) (while value checks are on).
    """
    if not isinstance(mode, str) or mode not in FUSION_MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in FUSION_MODES)}, got {mode!r}")
    _checks.tensor(subj, "subj", "K, D")
    _checks.tensor(obj, "obj", "K, D")
    _checks.tensor(weight, "weight", "C, D")
    K, D = subj.shape
    _checks.size(obj, "obj", 0, K, "K, the rows of subj")
    _checks.size(obj, "obj", 1, D, "D, the width of subj")
    _checks.size(weight, "weight", 1, D, "D, the width of subj")
    _checks.tensor(pairs, "pairs", "P, 2", kind="index")
    _checks.size(pairs, "pairs", 1, 2, "(subject, object)")
    named = [("subj", subj), ("obj", obj), ("union", union), ("pairs", pairs), ("weight", weight), ("bias", bias)]
    if union is not None:
        _checks.tensor(union, "union", "P, Du")
        _checks.size(union, "union", 0, pairs.shape[0], "P, the number of pairs")
        if union.shape[1] > D:
            raise ValueError(f"union has width Du = {union.shape[1]} > D = {D} (the width of subj); "
                             "union features multiply the first Du dims of the subject-object product")
    if bias is not None:
        _checks.tensor(bias, "bias", "C")
        _checks.size(bias, "bias", 0, weight.shape[0], "C, the rows of weight")
    _checks.same_device(named[:1] + [(n, t) for n, t in named[1:] if t is not None])
    _checks.same_float_dtype([(n, t) for n, t in named if t is not None and n != "pairs"])
    return _fusion_op(subj, obj, union, pairs, weight, bias, mode == "sum")


for _name in ("roi_align", "union_roi_align", "pairwise_edge_fusion"):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(f"{_LIB}::{_name}", _device, torch.float32)
