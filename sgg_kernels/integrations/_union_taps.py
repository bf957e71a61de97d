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
   shifted gradient. Used for an image's pairs when the FLOP model below says it is cheaper
   (``_use_taps``); otherwise the pooled features go through the conv as SGB does.
   Pooling of the tap maps: ``sgg_kernels::_union_tap_pool`` (C++ CPU, channels-last) or, on other
   devices, the union RoIAlign op on the maps (``_tap_pool_generic``).
2. **No forward recomputation of fc6 / fc7 and one buffer per weight gradient.** fc6's output after
   ReLU and the output are kept ([P, D] each); the backward recomputes vis and the rect features per
   chunk only, adds each chunk's fc6 weight gradient into one buffer (``addmm_``) and returns the
   total, and overwrites the saved fc6 activation with its gradient. Peak memory is the two [P, D]
   tensors, their gradient, the weight gradients and one chunk's activations.

The BatchNorm statistics of the rect branch are inputs (the module computes them over the whole
batch of pairs first), so their gradients flow back to the module's statistics passes.
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


# Pooled C-vector reads cost about this many conv (GEMM) FLOPs each in the FLOP model of _use_taps.
GATHER_COST = 4.0
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


def use_taps(n: int, C: int, L: int, R: int, level_pixels: int) -> bool:
    """Whether n pairs of one image are cheaper through the tap maps than through the conv.

    taps: 18 C^2 sum_l H_l W_l (the nine projections) + 9 * 2 L R^2 * 16 C GATHER_COST (nine pooled
    passes of ~16 taps per bin); conv: 18 L C^2 R^2 n + the one pooled pass. At C = 256, L = 4,
    R = 7 and SGB's 592 x 800 levels the break-even is at ~330 pairs per image."""
    pool = 2 * L * R * R * 16 * C * GATHER_COST * n
    return 18 * C * C * level_pixels + 9 * pool < 18 * L * C * C * R * R * n + pool


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


def rect_features(masks: Tensor, rect: Sequence[Optional[Tensor]], stats: Sequence[Tensor], eps) -> Tensor:
    """SGB's rect_conv with BatchNorm on given statistics: Conv 7x7/2 -> ReLU -> BN -> MaxPool 3/2 ->
    Conv 3x3 -> ReLU -> BN. rect = (conv1 w, b, bn1 w, b, conv2 w, b, bn2 w, b); stats = (m1, v1, m2, v2)."""
    c1w, c1b, g1, b1, c2w, c2b, g2, b2 = rect
    m1, v1, m2, v2 = stats
    z = F.relu(F.conv2d(masks, c1w, c1b, stride=2, padding=3))
    z = F.max_pool2d(bn(z, m1, v1, g1, b1, eps[0]), kernel_size=3, stride=2, padding=1)
    z = F.relu(F.conv2d(z, c2w, c2b, stride=1, padding=1))
    return bn(z, m2, v2, g2, b2, eps[1])


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


def _vis(plan: Plan, img: _Image, idx: Tensor, W: Tensor, b: Tensor, taps: bool) -> Tensor:
    """ReLU(reduce_channel(pooled union features)) of the pairs at positions idx (one image): [n, C, R, R]."""
    pairs = plan.pairs[idx]
    local = torch.zeros_like(plan.box_batch)  # the one image's maps are image 0
    R, C = plan.resolution, W.shape[0]
    if not taps:
        pooled = union_roi_align(img.nchw, plan.boxes, local, pairs, (R, R), list(plan.scales), plan.sampling_ratio,
                                 False)
        return F.relu(F.conv2d(pooled, W, b, padding=1))
    acc = W.new_empty((pairs.shape[0], C, R, R))
    for ky, kx in TAPS:
        maps = [torch.mm(m.view(-1, C), _tap_weight(W, l, C, ky, kx).t()).view(m.shape)
                for l, m in enumerate(img.cl)]  # G_{l,t} = W_{l,t} F_l, channels-last
        for s in range(0, pairs.shape[0], plan.chunk):
            t = _tap_pool(maps, plan.boxes, local, pairs[s:s + plan.chunk], R, plan.scales, plan.sampling_ratio,
                          ky - 1, kx - 1)
            if (ky, kx) == TAPS[0]:
                acc[s:s + plan.chunk] = t
            else:
                acc[s:s + plan.chunk] += t
    acc += b.view(1, -1, 1, 1)
    return acc.relu_()


def _vis_weight_grad(plan: Plan, img: _Image, idx: Tensor, W: Tensor, dvis: Tensor, taps: bool,
                     dW: Tensor, dlevels: Optional[List[Tensor]], bimg: int) -> None:
    """dW += d reduce_channel weight of these pairs given dvis (after the ReLU's mask); dlevels
    (NCHW [B, C, H, W] per level, or None) += d features."""
    pairs = plan.pairs[idx]
    local = torch.zeros_like(plan.box_batch)
    R, C = plan.resolution, W.shape[0]
    if not taps:
        for s in range(0, pairs.shape[0], plan.chunk):
            with torch.enable_grad():
                leaves = [lv.detach().requires_grad_(dlevels is not None) for lv in img.nchw]
                pooled = union_roi_align(leaves, plan.boxes, local, pairs[s:s + plan.chunk], (R, R),
                                         list(plan.scales), plan.sampling_ratio, False)
            g = dvis[s:s + plan.chunk]
            dW += torch.nn.grad.conv2d_weight(pooled.detach(), W.shape, g, padding=1)
            if dlevels is not None:
                dx = torch.nn.grad.conv2d_input(pooled.shape, W, g, padding=1)
                for d, got in zip(dlevels, torch.autograd.grad(pooled, leaves, dx)):
                    d[bimg:bimg + 1] += got
        return
    for ky, kx in TAPS:
        dmaps = _tap_pool_backward(dvis, plan.boxes, local, pairs, img.cl, plan.scales, plan.sampling_ratio,
                                   ky - 1, kx - 1)
        for l, (dm, m) in enumerate(zip(dmaps, img.cl)):
            dg = dm.view(-1, C)  # [pixels, C_out]
            dW[:, l * C:(l + 1) * C, ky, kx] += torch.mm(dg.t(), m.view(-1, C))
            if dlevels is not None:  # G = F W^T -> dF = dG W
                dF = torch.mm(dg, _tap_weight(W, l, C, ky, kx)).view(m.shape)
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
        flags = []
        with suspended_value_checks() if plan.suspend else contextlib.nullcontext():
            for bimg, idx in plan.groups:
                img = _Image(levels, bimg)
                taps = use_taps(idx.numel(), C, L, R, img.pixels)
                flags.append(taps)
                vis = _vis(plan, img, idx, W_r, b_r, taps)
                del img  # its channels-last copies
                for s in range(0, idx.numel(), plan.chunk):
                    sub = idx[s:s + plan.chunk]
                    r = rect_features(plan.masks(plan.safe_pairs[sub]), rect, stats, plan.eps)
                    h = torch.addmm(b6, (vis[s:s + plan.chunk] + r).flatten(1), W6.t())
                    if not grad:  # nothing to keep: finish the rows here
                        h = F.relu(torch.addmm(b7, h.relu_(), W7.t()))
                    out[sub] = h
                del vis
        ctx.plan, ctx.flags = plan, flags
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
        dW6 = torch.zeros_like(W6)
        db6 = W6.new_zeros(W6.shape[0])
        dW_r = torch.zeros_like(W_r)
        db_r = W_r.new_zeros(C)
        want_levels = any(need[19:])
        dlevels = [torch.zeros_like(lv) for lv in levels] if want_levels else None
        leaves = [None if t is None else t.detach().requires_grad_(bool(n))
                  for t, n in zip(list(rect) + list(stats), need[7:19])]
        leaf_list = [t for t in leaves if t is not None and t.requires_grad]
        with suspended_value_checks() if plan.suspend else contextlib.nullcontext():
            for (bimg, idx), taps in zip(plan.groups, ctx.flags):
                img = _Image(levels, bimg)
                vis = _vis(plan, img, idx, W_r, b_r, taps)
                for s in range(0, idx.numel(), plan.chunk):
                    sub = idx[s:s + plan.chunk]
                    g = g6[sub]
                    with torch.enable_grad():
                        r = rect_features(plan.masks(plan.safe_pairs[sub]), leaves[:8], leaves[8:], plan.eps)
                    v = vis[s:s + plan.chunk]
                    dW6.addmm_(g.t(), (v + r.detach()).flatten(1))
                    db6 += g.sum(0)
                    dh = torch.mm(g, W6).view(v.shape)
                    if leaf_list:
                        torch.autograd.backward(r, dh, inputs=leaf_list)
                    v.copy_(dh * (v > 0))  # vis -> d(reduce_channel output), in place
                db_r += vis.sum((0, 2, 3))
                _vis_weight_grad(plan, img, idx, W_r, vis, taps, dW_r, dlevels, bimg)
                del vis, img
        grads_rect = [None if t is None or not t.requires_grad else t.grad for t in leaves]
        out = [None, dW_r, db_r, dW6, db6, dW7, db7] + grads_rect
        out += dlevels if dlevels is not None else [None] * len(levels)
        return tuple(g if (g is None or n) else None for g, n in zip(out, need))

