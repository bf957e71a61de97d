"""The union branch of Scene-Graph-Benchmark's RelationFeatureExtractor as one autograd Function.

Computes, for P pairs, SGB's

    vis  = ReLU(reduce_channel(cat_l RoIAlign_l(F_l, union box)))          [P, C, R, R]
    rect = rect_conv(rectangle masks)  (BatchNorm with the given statistics) [P, C, R, R]
    out  = ReLU(fc7(ReLU(fc6(flatten(vis + rect)))))                         [P, D]

in chunks, keeping between forward and backward only the two [P, D] hidden layers (fc6's ReLU output
and the output itself). Two things make it cheaper than checkpointing each chunk:

1. **reduce_channel folded into the FPN levels.** The 3x3 conv (weight W [C, L C, 3, 3]) acts on the
   concatenated per-level RoIAlign of the union box. RoIAlign is linear in the features and the same
   for every channel, so the channel mixing of each tap t = (ky, kx) and level l, W_{l,t} =
   W[:, l C:(l + 1) C, ky, kx], commutes with it:

       conv(x)[:, i, j] = b + sum_{l, t} RoIAlign_l(G_{l,t}, union box)[:, i + ky - 1, j + kx - 1],
       G_{l,t} = W_{l,t} F_l   (a 1x1 projection of the level, computed once per image and tap)

   (zero where the shifted bin leaves the R x R grid: the conv's zero padding). The per-pair cost
   drops from the conv's 2 * 9 * L C * C * R^2 FLOPs (231 MFLOP at C = 256, L = 4, R = 7) to nine
   pooled reads of C-vectors (~15 MFLOP), for 2 * 9 * C^2 * sum_l H_l W_l FLOPs per image (46 GFLOP
   at SGB's 592 x 800 input, the cost of the conv for ~200 pairs). The weight gradient takes the same
   route backwards: dW_{l,t} = sum_pixels dG_{l,t} F_l^T with dG_{l,t} the RoIAlign backward of the
   shifted gradient. Chosen per image, separately for the forward and the backward, by a cost model
   calibrated on the CPU (``route_costs`` / ``use_taps``); otherwise the pooled features of each
   chunk go through the conv as SGB does. The backward's conv route pools each chunk once and uses
   it for the recomputed conv and for the conv's weight gradient; a tap backward scatters into the
   maps, ~3x a tap pass, so training on a frozen detector (no feature gradients) keeps the conv in
   the backward while the forward of more than ~250 pairs per image takes the taps.
   Pooling of the tap maps: ``sgg_kernels::_union_tap_pool`` (C++ CPU, channels-last) or, on other
   devices, the union RoIAlign op on the maps (``_tap_pool_generic``).
2. **No forward recomputation of fc6 / fc7 and one buffer per weight gradient.** fc6's output after
   ReLU and the output are kept ([P, D] each); the backward recomputes vis and the rect features per
   chunk only, adds each chunk's fc6 weight gradient into one buffer (the first chunk's product, then
   ``addmm_``) and returns the
   total, and overwrites the saved fc6 activation with its gradient. Peak memory is the two [P, D]
   tensors, their gradient, the weight gradients and one chunk's activations.

The BatchNorm statistics of the rect branch are inputs (the module computes them over the whole
batch of pairs first, ``_sgb_union._WholeBatchStats``), so their gradients flow back to the module's
statistics passes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import Kernels, suspended_value_checks
from ..ops.pairs import union_roi_align
from ..reference import pairs as ref

_TAP = Kernels("pairs", ref.union_tap_pool, cpu="_union_tap_pool")
_TAP_BWD = Kernels("pairs", ref.union_tap_pool_backward, cpu="_union_tap_pool_backward")

@torch.library.register_fake("sgg_kernels::_union_tap_pool")
def _(maps, boxes, box_batch, pairs, pooled, scales, sampling_ratio, aligned, dy, dx):
    return maps[0].new_empty((pairs.shape[0], maps[0].shape[-1], pooled, pooled))


@torch.library.register_fake("sgg_kernels::_union_tap_pool_backward")
def _(grad, boxes, box_batch, pairs, B, heights, widths, scales, sampling_ratio, aligned, dy, dx):
    return [grad.new_empty((B, H, W, grad.shape[1])) for H, W in zip(heights, widths)]


# The cost model of use_taps, in FLOP equivalents of the conv's GEMM. Calibrated on 2 cores of an AMD
# EPYC (float32, torch 2.13 CPU) at SGB's widths, 1,024 pairs of one image in chunks of 256, where the
# conv ran at 432 GFLOP/s (549 ms): the tap route's forward took 835 ms, of which the nine 1x1
# projections of the levels (46 GFLOP) 313 ms as torch.mm (MKL sgemm), 109 ms as the oneDNN 1x1 convs of
# _project (424 GFLOP/s, measured 2026-12-05), and each tap's pooled pass with its accumulation ~58 ms;
# the conv route's RoIAlign of the L levels 421 ms; one tap's backward (the scatter into the maps) 193 ms.
# (Single runs on a shared machine vary by ~15%.)
GATHER_COST = 15.0  # one bilinear read of a C-vector by the tap kernel (and its accumulation), per channel
ROI_PASS = 7.3      # the union RoIAlign of the L levels (NCHW, one plane per channel), in tap passes
SCATTER = 3.3       # one tap's backward, in tap passes
PROJ_COST = 1.0     # per FLOP of the 1x1 projections (oneDNN 1x1 convs, channels-last: 424 GFLOP/s)
TAPS = [(ky, kx) for ky in range(3) for kx in range(3)]


@dataclass
class Plan:
    """What the Function needs besides its tensor inputs (fixed per forward)."""
    boxes: Tensor           # [K, 4] image pixels
    box_batch: Tensor       # [K]
    pairs: Tensor           # [P, 2] (checked; invalid only with checks off)
    safe_pairs: Tensor      # pairs clamped into [0, K) (mask gathers)
    masks: object           # callable(safe pairs [c, 2]) -> [c, 2, rect, rect]
    groups: List[Tuple[int, Tensor]]  # (image, positions into pairs) of at most `group` pairs each
    chunk: int              # pairs per rect / fc6 sub-chunk
    scales: Tuple[float, ...]
    resolution: int
    sampling_ratio: int
    eps: Tuple[float, float]  # BN1, BN2 eps
    suspend: bool           # ops inside run with value checks suspended (the module checked them)
    grad: bool              # grad mode was on at the call (Function.forward itself always runs without)


def route_costs(n: int, C: int, L: int, R: int, level_pixels: int, backward: bool = False,
                level_grad: bool = False) -> Tuple[float, float]:
    """(conv route, tap route) cost of reduce_channel for n pairs of one image, in conv-GEMM FLOP
    equivalents (constants above).

    Forward: conv = n (RoIAlign + 18 L C^2 R^2); taps = the nine projections (18 C^2 sum_l H_l W_l)
    + 9 n tap passes (2 L R^2 * 16 C GATHER_COST each: 16 bilinear taps per bin and level).
    Backward (the recomputation of the forward, then the weight gradient; level_grad: and the
    features' gradient): conv = n (RoIAlign + conv + conv weight gradient [+ input gradient + the
    RoIAlign's backward]), the pooled chunk reused; taps = the tap forward + 9 n tap backwards + the
    weight gradient's GEMMs over the pixels [+ the features' GEMMs]."""
    conv = 18.0 * L * C * C * R * R
    tap = 2.0 * L * R * R * 16 * C * GATHER_COST
    roi = ROI_PASS * tap
    proj = PROJ_COST * 18.0 * C * C * level_pixels
    conv_cost = n * (roi + conv)
    taps_cost = proj + 9 * n * tap
    if backward:
        conv_cost += n * conv + (n * (conv + SCATTER * roi) if level_grad else 0.0)
        taps_cost += 9 * n * SCATTER * tap + proj * (2 if level_grad else 1)
    return conv_cost, taps_cost


def use_taps(n: int, C: int, L: int, R: int, level_pixels: int, backward: bool = False,
             level_grad: bool = False) -> bool:
    """Whether n pairs of one image are cheaper through the tap maps than through the conv
    (:func:`route_costs`). At C = 256, L = 4, R = 7 and SGB's 592 x 800 levels the forward breaks even
    at ~250 pairs per image (SGDet training samples 1,024, testing takes 6,320); the backward (recomputation + weight gradient) keeps the conv, which
    reuses its pooled chunk for the weight gradient, unless the features need gradients too."""
    conv_cost, taps_cost = route_costs(n, C, L, R, level_pixels, backward, level_grad)
    return taps_cost < conv_cost


def _tap_pool_generic(maps: List[Tensor], boxes, box_batch, pairs, R: int, scales, sampling: int, dy: int,
                      dx: int) -> Tensor:
    """union_tap_pool through the union RoIAlign op (any device): maps channels-last [B, H, W, C]."""
    pooled = union_roi_align([m.permute(0, 3, 1, 2) for m in maps], boxes, box_batch, pairs, (R, R), list(scales),
                             sampling, False)
    n, C = pairs.shape[0], maps[0].shape[-1]
    return ref._shift_bins(pooled.view(n, len(maps), C, R, R).sum(1), dy, dx)


def cpp_tap_pool(t: Tensor) -> bool:
    """Whether the C++ CPU kernels pool the tap maps of tensors like t (CPU, float32 / float64);
    elsewhere :func:`_tap_pool_generic` does."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _tap_pool(maps, boxes, box_batch, pairs, R, scales, sampling, dy, dx) -> Tensor:
    if cpp_tap_pool(maps[0]):
        return _TAP(maps[0].device, maps, boxes.to(maps[0].dtype), box_batch, pairs, R, list(scales), sampling,
                    False, dy, dx)
    return _tap_pool_generic(maps, boxes, box_batch, pairs, R, scales, sampling, dy, dx)


def _tap_pool_backward(grad, boxes, box_batch, pairs, maps_like: List[Tensor], scales, sampling, dy, dx):
    heights = [m.shape[1] for m in maps_like]
    widths = [m.shape[2] for m in maps_like]
    B = maps_like[0].shape[0]
    if cpp_tap_pool(grad):
        return _TAP_BWD(grad.device, grad.contiguous(), boxes.to(grad.dtype), box_batch, pairs, B, heights, widths,
                        list(scales), sampling, False, dy, dx)
    with torch.enable_grad():
        leaves = [torch.zeros_like(m, requires_grad=True) for m in maps_like]
        out = _tap_pool_generic(leaves, boxes, box_batch, pairs, grad.shape[-1], scales, sampling, dy, dx)
        return list(torch.autograd.grad(out, leaves, grad))


def bn(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """BatchNorm with given (mean, biased var) as one multiply-add (autograd keeps x and the scale only)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))


def rect_z1(masks: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """BN1's input in SGB's rect_conv: ReLU(conv 7x7/2, padding 3) of the masks [n, 2, S, S] -> [n, C/2, S', S']."""
    return F.relu(F.conv2d(masks, w, b, stride=2, padding=3))


def rect_z2(z1: Tensor, g1: Optional[Tensor], b1: Optional[Tensor], m1: Tensor, v1: Tensor, eps1: float,
            w: Tensor, b: Optional[Tensor]) -> Tensor:
    """BN2's input: ReLU(conv 3x3(MaxPool 3/2(BN1(z1)))) with BN1 on the given (mean, biased var)."""
    y = F.max_pool2d(bn(z1, m1, v1, g1, b1, eps1), kernel_size=3, stride=2, padding=1)
    return F.relu(F.conv2d(y, w, b, stride=1, padding=1))


def rect_features(masks: Tensor, rect: Sequence[Optional[Tensor]], stats: Sequence[Tensor], eps) -> Tensor:
    """SGB's rect_conv with BatchNorm on given statistics: Conv 7x7/2 -> ReLU -> BN -> MaxPool 3/2 ->
    Conv 3x3 -> ReLU -> BN. rect = (conv1 w, b, bn1 w, b, conv2 w, b, bn2 w, b); stats = (m1, v1, m2, v2)."""
    c1w, c1b, g1, b1, c2w, c2b, g2, b2 = rect
    m1, v1, m2, v2 = stats
    return bn(rect_z2(rect_z1(masks, c1w, c1b), g1, b1, m1, v1, eps[0], c2w, c2b), m2, v2, g2, b2, eps[1])


class _Image:
    """One image's levels: the [1, C, H, W] slices and their channels-last copies (made on demand)."""

    def __init__(self, levels: Sequence[Tensor], b: int):
        self.nchw = [lv[b:b + 1] for lv in levels]
        self._cl: Optional[List[Tensor]] = None

    @property
    def cl(self) -> List[Tensor]:
        if self._cl is None:
            self._cl = [lv.permute(0, 2, 3, 1).contiguous() for lv in self.nchw]
        return self._cl

    @property
    def pixels(self) -> int:
        return sum(lv.shape[2] * lv.shape[3] for lv in self.nchw)


def _tap_weight(W: Tensor, l: int, C: int, ky: int, kx: int) -> Tensor:
    return W[:, l * C:(l + 1) * C, ky, kx]  # [C_out, C_in]


def _project(m: Tensor, w: Tensor) -> Tensor:
    """m [1, H, W, C_in] channels-last (contiguous) times w [C_out, C_in]^T -> [1, H, W, C_out] contiguous.

    On the CPU in float32 / bfloat16 / float16 as a 1x1 conv of the channels-last view (oneDNN): measured
    on the 2-core AMD EPYC at 148 x 200 x 256 -> 256, 8.2 ms against 25 ms for ``torch.mm`` (MKL's
    sgemm on that CPU). float64 (no oneDNN kernel) and other devices: ``torch.mm``."""
    if m.device.type == "cpu" and m.dtype != torch.float64:
        out = F.conv2d(m.permute(0, 3, 1, 2), w.contiguous()[:, :, None, None])
        return out.permute(0, 2, 3, 1).contiguous()  # already channels-last: no copy
    return torch.mm(m.view(-1, m.shape[-1]), w.t()).view(*m.shape[:-1], w.shape[0])


def _pool(plan: Plan, img: _Image, pairs: Tensor, leaves: Optional[List[Tensor]] = None) -> Tensor:
    """SGB's pooled union features of these pairs (one image): [n, L C, R, R] (from `leaves`, the
    image's levels as autograd leaves, when given)."""
    R = plan.resolution
    local = torch.zeros_like(plan.box_batch)  # the one image's maps are image 0
    return union_roi_align(img.nchw if leaves is None else leaves, plan.boxes, local, pairs, (R, R),
                           list(plan.scales), plan.sampling_ratio, False)


def _vis(plan: Plan, img: _Image, idx: Tensor, W: Tensor, b: Tensor, taps: bool) -> Tensor:
    """ReLU(reduce_channel(pooled union features)) of the pairs at positions idx (one image): [n, C, R, R]."""
    pairs = plan.pairs[idx]
    R, C = plan.resolution, W.shape[0]
    acc = W.new_empty((pairs.shape[0], C, R, R))
    if not taps:  # pooled per chunk: [chunk, L C, R, R] at a time
        for s in range(0, pairs.shape[0], plan.chunk):
            acc[s:s + plan.chunk] = F.conv2d(_pool(plan, img, pairs[s:s + plan.chunk]), W, b, padding=1)
        return acc.relu_()
    local = torch.zeros_like(plan.box_batch)
    for ky, kx in TAPS:
        maps = [_project(m, _tap_weight(W, l, C, ky, kx)) for l, m in enumerate(img.cl)]  # G_{l,t} = W_{l,t} F_l
        for s in range(0, pairs.shape[0], plan.chunk):
            t = _tap_pool(maps, plan.boxes, local, pairs[s:s + plan.chunk], R, plan.scales, plan.sampling_ratio,
                          ky - 1, kx - 1)
            if (ky, kx) == TAPS[0]:
                acc[s:s + plan.chunk] = t
            else:
                acc[s:s + plan.chunk] += t
    acc += b.view(1, -1, 1, 1)
    return acc.relu_()


def _tap_weight_grad(plan: Plan, img: _Image, idx: Tensor, W: Tensor, dvis: Tensor, dW: Optional[Tensor],
                     dlevels: Optional[List[Tensor]], bimg: int) -> None:
    """The tap route's backward for the pairs at positions idx given dvis (after the ReLU's mask):
    dW (or None) += d reduce_channel weight, dlevels (NCHW [B, C, H, W] per level, or None) += d
    features: per tap, dG_{l,t} = the tap pool's backward, dW_{l,t} = dG^T F_l, dF_l = dG W_{l,t}."""
    pairs = plan.pairs[idx]
    local = torch.zeros_like(plan.box_batch)
    C = W.shape[0]
    for ky, kx in TAPS:
        dmaps = _tap_pool_backward(dvis, plan.boxes, local, pairs, img.cl, plan.scales, plan.sampling_ratio,
                                   ky - 1, kx - 1)
        for l, (dm, m) in enumerate(zip(dmaps, img.cl)):
            dg = dm.view(-1, C)  # [pixels, C_out]
            if dW is not None:
                dW[:, l * C:(l + 1) * C, ky, kx] += torch.mm(dg.t(), m.view(-1, C))
            if dlevels is not None:  # G = F W^T -> dF = dG W
                dF = _project(dm, _tap_weight(W, l, C, ky, kx).t())
                dlevels[l][bimg:bimg + 1] += dF.permute(0, 3, 1, 2)


class UnionHead(torch.autograd.Function):
    """out [P, D] = ReLU(fc7(ReLU(fc6(flatten(vis + rect))))) (module docstring).

    Inputs: plan, W_r, b_r (reduce_channel), W6, b6, W7, b7, the 8 rect tensors, the 4 BN statistics,
    then the L FPN levels [B, C, H_l, W_l]. Backward once (the saved fc6 activation is overwritten
    with its gradient; a second backward raises autograd's in-place error)."""

    @staticmethod
    def forward(ctx, plan: Plan, W_r, b_r, W6, b6, W7, b7, *rest):
        rect, stats, levels = rest[:8], rest[8:12], rest[12:]
        P, D = plan.pairs.shape[0], W6.shape[0]
        C, R, L = W_r.shape[0], plan.resolution, len(levels)
        grad = plan.grad and any(ctx.needs_input_grad[1:])
        out = W6.new_empty((P, D))
        with suspended_value_checks() if plan.suspend else contextlib.nullcontext():
            for bimg, idx in plan.groups:
                img = _Image(levels, bimg)
                vis = _vis(plan, img, idx, W_r, b_r, use_taps(idx.numel(), C, L, R, img.pixels))
                del img  # its channels-last copies
                for s in range(0, idx.numel(), plan.chunk):
                    sub = idx[s:s + plan.chunk]
                    r = rect_features(plan.masks(plan.safe_pairs[sub]), rect, stats, plan.eps)
                    h = torch.addmm(b6, (vis[s:s + plan.chunk] + r).flatten(1), W6.t())
                    if not grad:  # nothing to keep: finish the rows here
                        h = F.relu(torch.addmm(b7, h.relu_(), W7.t()))
                    out[sub] = h
                del vis
        ctx.plan = plan
        if not grad:
            return out
        y6 = out.relu_()
        y7 = F.relu(torch.addmm(b7, y6, W7.t()))
        ctx.save_for_backward(W_r, b_r, W6, W7, y6, y7, *rect, *stats, *levels)
        return y7

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g7):
        plan: Plan = ctx.plan
        saved = ctx.saved_tensors
        W_r, b_r, W6, W7, y6, y7 = saved[:6]
        rect, stats, levels = saved[6:14], saved[14:18], saved[18:]
        need = ctx.needs_input_grad  # (plan, W_r, b_r, W6, b6, W7, b7, rect x8, stats x4, levels...)
        C, R = W_r.shape[0], plan.resolution
        rows = 4 * plan.chunk
        dW7 = torch.zeros_like(W7)
        db7 = W7.new_zeros(W7.shape[0])
        g6 = y6  # overwritten in place, row block by row block, with d(fc6 output before ReLU)
        for s in range(0, y6.shape[0], rows):
            g = g7[s:s + rows] * (y7[s:s + rows] > 0)
            dW7.addmm_(g.t(), y6[s:s + rows])
            db7 += g.sum(0)
            g6[s:s + rows] = torch.mm(g, W7) * (y6[s:s + rows] > 0)
        dW6: Optional[Tensor] = None  # the first chunk's product, then addmm_ (no [D, C R R] zero fill)
        db6 = W6.new_zeros(W6.shape[0])
        dW_r = torch.zeros_like(W_r)
        db_r = W_r.new_zeros(C)
        want_levels = any(need[19:])
        dlevels = [torch.zeros_like(lv) for lv in levels] if want_levels else None
        leaves = [None if t is None else t.detach().requires_grad_(bool(n))
                  for t, n in zip(list(rect) + list(stats), need[7:19])]
        leaf_list = [t for t in leaves if t is not None and t.requires_grad]
        with suspended_value_checks() if plan.suspend else contextlib.nullcontext():
            for bimg, idx in plan.groups:
                img = _Image(levels, bimg)
                # The backward's own route: the conv route's pooled chunk also gives its weight gradient.
                taps = use_taps(idx.numel(), C, len(levels), R, img.pixels, backward=True, level_grad=want_levels)
                pairs = plan.pairs[idx]
                vis = _vis(plan, img, idx, W_r, b_r, True) if taps else None
                for s in range(0, idx.numel(), plan.chunk):
                    sub = idx[s:s + plan.chunk]
                    g = g6[sub]
                    with torch.enable_grad():
                        r = rect_features(plan.masks(plan.safe_pairs[sub]), leaves[:8], leaves[8:], plan.eps)
                    if taps:
                        v = vis[s:s + plan.chunk]
                    else:  # pool this chunk (as leaves of the levels when they need gradients), conv, ReLU
                        with torch.enable_grad():
                            lv = [t.detach().requires_grad_() for t in img.nchw] if want_levels else None
                            pooled = _pool(plan, img, pairs[s:s + plan.chunk], lv)
                        v = F.conv2d(pooled.detach(), W_r, b_r, padding=1).relu_()
                    x6 = (v + r.detach()).flatten(1)
                    dW6 = torch.mm(g.t(), x6) if dW6 is None else dW6.addmm_(g.t(), x6)
                    del x6
                    db6 += g.sum(0)
                    dh = torch.mm(g, W6).view(v.shape)
                    if leaf_list:
                        torch.autograd.backward(r, dh, inputs=leaf_list)
                    dv = dh.mul_(v > 0)  # d(reduce_channel output)
                    if taps:
                        v.copy_(dv)  # vis -> its gradient, in place
                        continue
                    db_r += dv.sum((0, 2, 3))
                    if need[1]:
                        dW_r += torch.nn.grad.conv2d_weight(pooled.detach(), W_r.shape, dv, padding=1)
                    if want_levels:
                        dx = torch.nn.grad.conv2d_input(pooled.shape, W_r, dv, padding=1)
                        for d, got in zip(dlevels, torch.autograd.grad(pooled, lv, dx)):
                            d[bimg:bimg + 1] += got
                    del pooled, v, dv
                if taps:
                    db_r += vis.sum((0, 2, 3))
                    _tap_weight_grad(plan, img, idx, W_r, vis, dW_r if need[1] else None, dlevels, bimg)
                del vis, img
        grads_rect = [None if t is None or not t.requires_grad else t.grad for t in leaves]
        if dW6 is None:  # no pairs in any group (only with checks off)
            dW6 = torch.zeros_like(W6)
        out = [None, dW_r, db_r, dW6, db6, dW7, db7] + grads_rect
        out += dlevels if dlevels is not None else [None] * len(levels)
        return tuple(g if (g is None or n) else None for g, n in zip(out, need))

