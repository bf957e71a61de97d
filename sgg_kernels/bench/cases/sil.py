"""Benchmark case of the whole SIL block (MM'23, Sec. 3, Eq. 1-9; family ``cluster``).

``sil_block``: one :class:`sgg_kernels.models.SILBlock` forward (+ backward to the feature map),
the fused ops (default backend for the device) against *the same block, same weights*, run under
``sk.use_backend("reference")`` (every op of the block on its pure-PyTorch reference). The block is
in eval mode (encoder dropout off), so both impls compute the same function. Everything outside the
ops (H', H^a, the intra-entity matmuls, the Transformer encoder, H'') is the same PyTorch code in
both: the speedup is what the fused ops buy at the scale of a whole block.

Sizes (float32 unless ``--dtype``; default block settings otherwise: cosine similarity,
inverse-distance weights, 2 encoder layers of 32-d heads, H' hidden 4 D):

=======  ==  ===  =========  =====  ==  ==  =============================
name     B   D    map H x W  heads  C   K   note
=======  ==  ===  =========  =====  ==  ==  =============================
small    2   64   16 x 16    2      16  6   pytest-benchmark default
mid      2   256  32 x 48    4      49  20  the CPU default of sgg-bench
paper    4   256  64 x 96    4      49  80  Sec. 4.3's block, 20 boxes per image
sgdet    8   256  128 x 192  4      81  640 DESIGN's cluster sgdet map, 80 boxes per image
=======  ==  ===  =========  =====  ==  ==  =============================

Boxes: K spread evenly over the B images, random in an image of 16 x the map (spatial_scale 1/16,
an FPN P4-like level), at least one map cell wide. ``grad_inputs`` is the feature map: the timed
backward differentiates the output with respect to it through the whole block (weight gradients
are not requested, so they are not computed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch

import sgg_kernels as sk
from sgg_kernels.models.sil import SILBlock
from sgg_kernels.ops.cluster import KERNELS
from sgg_kernels.ops.pairs import KERNELS as PAIR_KERNELS

from ..registry import Case, Inputs

SPATIAL_SCALE = 1 / 16


@dataclass(frozen=True)
class SILSize:
    B: int
    D: int
    H: int
    W: int
    heads: int
    C: int
    K: int

    def __str__(self) -> str:
        k = math.ceil(self.H * self.W / self.C)
        return (f"B={self.B} D={self.D} map={self.H}x{self.W} heads={self.heads} C={self.C} k={k} "
                f"K={self.K} boxes, hidden={4 * self.D}, eval")


SIZES: Dict[str, SILSize] = {
    "small": SILSize(B=2, D=64, H=16, W=16, heads=2, C=16, K=6),
    "mid": SILSize(B=2, D=256, H=32, W=48, heads=4, C=49, K=20),
    "paper": SILSize(B=4, D=256, H=64, W=96, heads=4, C=49, K=80),
    "sgdet": SILSize(B=8, D=256, H=128, W=192, heads=4, C=81, K=640),
}


def _inputs(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    fmap = torch.randn(s.B, s.D, s.H, s.W, generator=g)
    img_w, img_h = s.W / SPATIAL_SCALE, s.H / SPATIAL_SCALE
    size_wh = torch.tensor([img_w, img_h])
    wh = (torch.rand(s.K, 2, generator=g) * 0.5 + 0.05) * size_wh   # 5 % to 55 % of the image side
    wh = wh.clamp_min(1 / SPATIAL_SCALE)                               # at least one map cell
    xy = torch.rand(s.K, 2, generator=g) * (size_wh - wh)
    boxes = torch.cat([xy, xy + wh], dim=1)
    box_batch = torch.arange(s.K) * s.B // s.K                         # sorted, evenly spread
    with torch.random.fork_rng(devices=[]):                             # weights from `seed`, global RNG untouched
        torch.manual_seed(seed)
        block = SILBlock(s.D, s.C, heads=s.heads, mlp_hidden=4 * s.D)
    block = block.to(device=device, dtype=dtype).eval()
    return {
        "block": block,
        "feature_map": fmap.to(device, dtype),
        "boxes": boxes.to(device),
        "box_batch": box_batch.to(device),
        "spatial_scale": SPATIAL_SCALE,
    }


def _describe(size: str) -> str:
    return str(SIZES[size])


def _fused(block, feature_map, boxes, box_batch, spatial_scale):
    return (block(feature_map, boxes, box_batch, spatial_scale),)


class _OnReference(torch.autograd.Function):
    """``block(feature_map, ...)`` with every op on the reference backend, forward *and* backward.

    ``sk.use_backend`` is read when an op runs, and the harness runs the backward
    (``torch.autograd.grad``) outside the callable, where a plain ``with`` block would no longer
    hold: the backward ops would pick the default backend. So the block runs on its own autograd
    graph inside this Function, and the backward differentiates that graph inside the same context
    (gradient to the feature map only, the case's only grad input).
    """

    @staticmethod
    def forward(ctx, feature_map, block, boxes, box_batch, spatial_scale):
        with torch.enable_grad(), sk.use_backend("reference"):
            x = feature_map.detach().requires_grad_(True)
            out = block(x, boxes, box_batch, spatial_scale)
        ctx.x, ctx.out = x, out
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        with sk.use_backend("reference"):
            (grad_map,) = torch.autograd.grad(ctx.out, ctx.x, grad)
        ctx.x = ctx.out = None
        return grad_map, None, None, None, None


def _reference(block, feature_map, boxes, box_batch, spatial_scale):
    return (_OnReference.apply(feature_map, block, boxes, box_batch, spatial_scale),)


CASES = [
    Case(
        name="sil_block", family="cluster", sizes=SIZES, make_inputs=_inputs, fused=_fused, reference=_reference,
        grad_inputs=("feature_map",),
        kernels=(KERNELS["knn_index"] + KERNELS["gather_mean"] + KERNELS["superpixel_cluster"]
                 + KERNELS["cluster_dispatch"] + PAIR_KERNELS["roi_align"]),
        describe=_describe,
    ),
]
