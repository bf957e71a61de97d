"""Benchmark cases of the pair feature ops (LinkNet, family ``pairs``).

Sizes (DESIGN.md, Benchmark sizes; float32 unless ``--dtype``). Boxes live in an image of
16 x the map size (spatial_scale 1/16, a C4/FPN-P4 map); every image has the same number of
boxes and the pairs are all ordered pairs within each image (SGDet/SGCls candidates), except
``small``, which keeps the first 32 (RoIAlign) of them.

=======  =====================  =======  =======  ======================================
name     map [B, D, H, W]       boxes    pairs    pairwise_edge_fusion
=======  =====================  =======  =======  ======================================
small    [1, 32, 16, 16]        8        32 / 56  K=10 (1 image), P=90, D=256, C=51
mid      [2, 256, 32, 48]       40       760      K=40, P=760, D=1024, C=51 (CPU default)
paper    [4, 256, 64, 96]       100      2,400    K=100, P=2,400, D=4096, C=51
sgdet    [4, 256, 64, 96]       320      25,280   K=320, P=25,280, D=4096, C=51
=======  =====================  =======  =======  ======================================

RoIAlign: 7 x 7, sampling_ratio 0 (adaptive, maskrcnn-benchmark's default), aligned False.
Fusion: union features of width Du = D (LinkNet's F), with bias, subject/object rows the two
strided halves of one ``E1 [K, 2D]`` (as LinkNet computes them).

The eager baselines are what users write: for the fusion, gather rows, multiply, ``F.linear``;
for RoIAlign, the pure-PyTorch reference (separable bilinear weights contracted per image: no
torchvision on the CPU machine); union boxes computed first for ``union_roi_align``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

import sgg_kernels as sk
from sgg_kernels.ops.pairs import KERNELS
from sgg_kernels.reference import pairs as ref

from ..registry import Case, Inputs

SCALE = 1 / 16
OUT = 7
SAMPLING = 0


@dataclass(frozen=True)
class PairSize:
    B: int        # images
    D: int        # feature-map channels
    H: int
    W: int
    per_image: int  # boxes per image (RoIAlign cases)
    max_pairs: int  # 0: all ordered pairs
    fusion_K: int  # boxes of the fusion case (spread over B images)
    fusion_B: int
    fusion_D: int
    C: int = 51

    def __str__(self) -> str:
        return (f"map=[{self.B},{self.D},{self.H},{self.W}] boxes={self.B * self.per_image} "
                f"roi={OUT}x{OUT} | fusion K={self.fusion_K} P={_num_pairs(self.fusion_K, self.fusion_B)} "
                f"D={self.fusion_D} C={self.C}")


def _num_pairs(K: int, B: int) -> int:
    n = K // B
    return B * n * (n - 1)


SIZES: Dict[str, PairSize] = {
    "small": PairSize(B=1, D=32, H=16, W=16, per_image=8, max_pairs=32, fusion_K=10, fusion_B=1, fusion_D=256),
    "mid": PairSize(B=2, D=256, H=32, W=48, per_image=20, max_pairs=0, fusion_K=40, fusion_B=2, fusion_D=1024),
    "paper": PairSize(B=4, D=256, H=64, W=96, per_image=25, max_pairs=0, fusion_K=100, fusion_B=4, fusion_D=4096),
    "sgdet": PairSize(B=4, D=256, H=64, W=96, per_image=80, max_pairs=0, fusion_K=320, fusion_B=4, fusion_D=4096),
}


def _boxes(n: int, img_w: float, img_h: float, g: torch.Generator) -> torch.Tensor:
    """Detector-like boxes: sizes from 1/16 to 3/4 of the image (log-uniform), inside the image."""
    wh = torch.exp(torch.empty(n, 2).uniform_(torch.log(torch.tensor(1 / 16)).item(), torch.log(torch.tensor(0.75)).item(),
                                              generator=g)) * torch.tensor([img_w, img_h])
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([img_w, img_h]) - wh)
    return torch.cat([xy, xy + wh], dim=1)


def _roi_inputs(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(s.B, s.D, s.H, s.W, generator=g)
    boxes = _boxes(s.B * s.per_image, s.W / SCALE, s.H / SCALE, g)
    box_batch = torch.arange(s.B).repeat_interleave(s.per_image)
    pairs = sk.all_pairs(box_batch)
    if s.max_pairs:
        pairs = pairs[torch.randperm(pairs.shape[0], generator=g)[: s.max_pairs]]
    return {"features": features.to(device, dtype), "boxes": boxes.to(device), "box_batch": box_batch.to(device),
            "pairs": pairs.to(device)}


def _fusion_inputs(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    box_batch = torch.arange(s.fusion_B).repeat_interleave(s.fusion_K // s.fusion_B)
    pairs = sk.all_pairs(box_batch)
    D = s.fusion_D
    return {
        "E1": torch.randn(s.fusion_K, 2 * D, generator=g).to(device, dtype),
        "union": torch.randn(pairs.shape[0], D, generator=g).to(device, dtype),
        "pairs": pairs.to(device),
        "weight": (torch.randn(s.C, D, generator=g) * D ** -0.5).to(device, dtype),
        "bias": torch.randn(s.C, generator=g).to(device, dtype),
    }


def _describe(size: str) -> str:
    return str(SIZES[size])


# ---------------------------------------------------------------------------------------------
# Fused (the public ops) and eager (what users write) callables, same outputs in the same order.
# ---------------------------------------------------------------------------------------------
def _fused_fusion(E1, union, pairs, weight, bias):
    D = weight.shape[1]
    return (sk.pairwise_edge_fusion(E1[:, :D], E1[:, D:], union, pairs, weight, bias),)


def _eager_fusion(E1, union, pairs, weight, bias):
    D = weight.shape[1]
    g = E1[pairs[:, 0], :D] * E1[pairs[:, 1], D:] * union  # Eq. 12, materialised [P, D]
    return (F.linear(g, weight, bias),)  # Eq. 14


def _eager_union_boxes(boxes, pairs):
    s, o = boxes[pairs[:, 0]], boxes[pairs[:, 1]]
    return (torch.cat([torch.minimum(s[:, :2], o[:, :2]), torch.maximum(s[:, 2:], o[:, 2:])], dim=1),)


def _eager_roi_align(features, boxes, box_batch, pairs):
    return (ref.roi_align(features, boxes, box_batch, None, OUT, OUT, SCALE, SAMPLING, False),)


def _eager_union_roi_align(features, boxes, box_batch, pairs):
    union = _eager_union_boxes(boxes, pairs)[0]
    return (ref.roi_align(features, union, box_batch[pairs[:, 0]], None, OUT, OUT, SCALE, SAMPLING, False),)


CASES = [
    Case(
        name="union_boxes", family="pairs", sizes=SIZES, make_inputs=_roi_inputs,
        fused=lambda features, boxes, box_batch, pairs: (sk.union_boxes(boxes, pairs),),
        reference=lambda features, boxes, box_batch, pairs: _eager_union_boxes(boxes, pairs),
        grad_inputs=("boxes",), kernels=KERNELS["union_boxes"], describe=_describe,
    ),
    Case(
        name="pair_geometry", family="pairs", sizes=SIZES, make_inputs=_roi_inputs,
        fused=lambda features, boxes, box_batch, pairs: (sk.pair_geometry(boxes, pairs),),
        reference=lambda features, boxes, box_batch, pairs: (ref.pair_geometry(boxes, pairs),),
        grad_inputs=("boxes",), kernels=KERNELS["pair_geometry"], describe=_describe,
    ),
    Case(
        name="roi_align", family="pairs", sizes=SIZES, make_inputs=_roi_inputs,
        fused=lambda features, boxes, box_batch, pairs: (sk.roi_align(features, boxes, box_batch, OUT, SCALE, SAMPLING),),
        reference=_eager_roi_align,
        grad_inputs=("features",), kernels=KERNELS["roi_align"], describe=_describe,
    ),
    Case(
        name="union_roi_align", family="pairs", sizes=SIZES, make_inputs=_roi_inputs,
        fused=lambda features, boxes, box_batch, pairs: (sk.union_roi_align(features, boxes, box_batch, pairs, OUT, SCALE, SAMPLING),),
        reference=_eager_union_roi_align,
        grad_inputs=("features",), kernels=KERNELS["union_roi_align"], describe=_describe,
    ),
    Case(
        name="pairwise_edge_fusion", family="pairs", sizes=SIZES, make_inputs=_fusion_inputs,
        fused=_fused_fusion, reference=_eager_fusion,
        grad_inputs=("E1", "union", "weight", "bias"), kernels=KERNELS["pairwise_edge_fusion"], describe=_describe,
    ),
]
