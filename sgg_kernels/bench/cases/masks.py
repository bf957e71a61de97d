"""Benchmark cases of the Gaussian pair-mask op (segmentation-grounded SGG, Eq. 6, family ``masks``).

Sizes (DESIGN.md, Benchmark sizes; float32 unless ``--dtype``): K objects over B images, P pairs
drawn at random from the ordered pairs within each image, masks ``[K, C, m, m]`` in [0, 1],
Gaussian parameters per pair and role ``[P, 2, 3]`` (the authors' released code), kernels
``gaussian_kernels(params, d)`` computed inside the timed call by both implementations.

=======  ====  ===  =====  ===  =======  ==  =========================
name     B     K    P      C    m x m    d   (R for the union frame)
=======  ====  ===  =====  ===  =======  ==  =========================
small    2     8    16     3    28 x 28  7   28
c16      2     40   128    16   28 x 28  7   28 (few classes: where per-pair work dominates)
mid      2     40   96     150  28 x 28  7   28 (CPU default)
paper    4     100  256    150  28 x 28  7   28
sgdet    4     320  2048   150  28 x 28  7   28
=======  ====  ===  =====  ===  =======  ==  =========================

Three cases: ``pair_mask_conv`` in the objects' own frames (the released code),
``pair_mask_conv_union``, the same op with ``boxes`` and ``out_size = 28`` (both smoothed masks
resampled into the pair's union box; the paper's text), and ``pair_mask_conv_per_object``: one
Gaussian per object (``params [K, 3]``, kernels ``[K, d, d]``, each object's masks smoothed once
whatever its pairs), own frames.

The eager baseline is the released code's way: gather both masks of every pair, one grouped
``F.conv2d`` with a group per pair, role and class channel, then the product
(``sgg_kernels.reference.masks.pair_mask_conv``; in the union frame followed by its separable
bilinear resampling). Its forward+backward holds the gathered and the convolved masks of both
roles (four ``[P, C, m, m]`` tensors) besides the output; the fused op holds only the output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

import sgg_kernels as sk
from sgg_kernels.ops.masks import KERNELS
from sgg_kernels.reference import masks as ref

from ..registry import Case, Inputs

KERNEL_SIZE = 7
IMAGE = 592.0  # boxes live in a 592 x 592 image (Visual Genome's shorter side)


@dataclass(frozen=True)
class MaskSize:
    B: int
    K: int
    P: int
    C: int
    m: int = 28

    def __str__(self) -> str:
        return (f"K={self.K} ({self.B} images) P={self.P} C={self.C} masks {self.m}x{self.m} "
                f"d={KERNEL_SIZE} (union frame R={self.m})")


SIZES: Dict[str, MaskSize] = {
    "small": MaskSize(B=2, K=8, P=16, C=3),
    "c16": MaskSize(B=2, K=40, P=128, C=16),
    "mid": MaskSize(B=2, K=40, P=96, C=150),
    "paper": MaskSize(B=4, K=100, P=256, C=150),
    "sgdet": MaskSize(B=4, K=320, P=2048, C=150),
}


def _inputs(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    box_batch = torch.arange(s.B).repeat_interleave(s.K // s.B)
    candidates = sk.all_pairs(box_batch)
    pairs = candidates[torch.randperm(candidates.shape[0], generator=g)[: s.P]]
    wh = torch.rand(s.K, 2, generator=g) * (IMAGE / 2) + 8
    xy = torch.rand(s.K, 2, generator=g) * (IMAGE - wh)
    return {
        "masks": torch.rand(s.K, s.C, s.m, s.m, generator=g).to(device, dtype),
        "pairs": pairs.to(device),
        "params": (torch.randn(s.P, 2, 3, generator=g) * 0.5).to(device, dtype),  # sigma around 1 px
        "boxes": torch.cat([xy, xy + wh], dim=1).to(device),
    }


def _inputs_per_object(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
    inputs = _inputs(size, device, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    inputs["params"] = (torch.randn(SIZES[size].K, 3, generator=g) * 0.5).to(device, dtype)  # one per object
    return inputs


def _describe(size: str) -> str:
    return str(SIZES[size])


def _kernels(params):
    return sk.gaussian_kernels(params, KERNEL_SIZE)


def _fused(masks, pairs, params, boxes):
    return (sk.pair_mask_conv(masks, pairs, _kernels(params)),)


def _eager(masks, pairs, params, boxes):
    return (ref.pair_mask_conv(masks, pairs, _kernels(params)),)


# The union frame's side R equals m at every size.
def _fused_union(masks, pairs, params, boxes):
    return (sk.pair_mask_conv(masks, pairs, _kernels(params), boxes, masks.shape[-1]),)


def _eager_union(masks, pairs, params, boxes):
    return (ref.pair_mask_conv(masks, pairs, _kernels(params), boxes, masks.shape[-1]),)


CASES = [
    Case(
        name="pair_mask_conv", family="masks", sizes=SIZES, make_inputs=_inputs, fused=_fused, reference=_eager,
        grad_inputs=("masks", "params"), kernels=KERNELS["pair_mask_conv"], describe=_describe,
    ),
    Case(
        name="pair_mask_conv_union", family="masks", sizes=SIZES, make_inputs=_inputs, fused=_fused_union,
        reference=_eager_union, grad_inputs=("masks", "params"), kernels=KERNELS["pair_mask_conv"],
        describe=_describe,
    ),
    Case(
        name="pair_mask_conv_per_object", family="masks", sizes=SIZES, make_inputs=_inputs_per_object,
        fused=_fused, reference=_eager, grad_inputs=("masks", "params"), kernels=KERNELS["pair_mask_conv"],
        describe=_describe,
    ),
]
