"""Benchmark cases of the superpixel clustering ops (SIL, family ``cluster``).

Sizes (DESIGN.md, Benchmark sizes; B counts images x heads, float32 unless ``--dtype``):

=======  ==  =========  ==  ==  =================================
name     B   map H x W  D   C   note
=======  ==  =========  ==  ==  =================================
small    2   16 x 16    32  16  M = 256, pytest-benchmark default
mid      8   48 x 64    64  49  the CPU target size (CLI default on CPU)
paper    16  64 x 96    64  49  B = 4 images x 4 heads (CLI default on CUDA)
sgdet    32  128 x 192  64  81
=======  ==  =========  ==  ==  =================================

k = ceil(M / C); centers ``sk.grid_centers(H, W, sqrt(C))``, points ``sk.grid_points(H, W)``.

Inputs look like SIL's: the feature map is spatially smooth (coarse noise upsampled bilinearly
plus fine noise), so clusters are compact regions as in real feature maps, not a uniform random
assignment. Center features are the reference KNN means (Eq. 1), assignments and similarities the
reference ``cosine_assign`` of those (Eq. 2), the dispatched center features the reference
aggregate (Eq. 3): all computed here, outside any timed region.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

import sgg_kernels as sk
from sgg_kernels.ops.cluster import KERNELS
from sgg_kernels.reference import cluster as ref

from ..registry import Case, Inputs


@dataclass(frozen=True)
class ClusterSize:
    B: int  # images x heads
    H: int
    W: int
    D: int
    C: int  # centers, a perfect square (grid_centers takes per_dim = sqrt(C))

    @property
    def M(self) -> int:
        return self.H * self.W

    @property
    def per_dim(self) -> int:
        return math.isqrt(self.C)

    @property
    def k(self) -> int:
        return math.ceil(self.M / self.C)

    def __str__(self) -> str:
        return f"B={self.B} map={self.H}x{self.W} (M={self.M}) D={self.D} C={self.C} k={self.k}"


SIZES: Dict[str, ClusterSize] = {
    "small": ClusterSize(B=2, H=16, W=16, D=32, C=16),
    "mid": ClusterSize(B=8, H=48, W=64, D=64, C=49),
    "paper": ClusterSize(B=16, H=64, W=96, D=64, C=49),
    "sgdet": ClusterSize(B=32, H=128, W=192, D=64, C=81),
}
for _s in SIZES.values():
    assert _s.per_dim ** 2 == _s.C, _s


def _feature_map(s: ClusterSize, seed: int) -> torch.Tensor:
    """A smooth random feature map as a point set ``[B, M, D]`` (float32, CPU, deterministic)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(s.B, s.D, max(1, s.H // 8), max(1, s.W // 8), generator=g)
    smooth = F.interpolate(coarse, size=(s.H, s.W), mode="bilinear", align_corners=False)
    fmap = smooth + 0.5 * torch.randn(s.B, s.D, s.H, s.W, generator=g)
    return fmap.flatten(2).transpose(1, 2).contiguous()


def _inputs(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
    """Every tensor any cluster case needs, for one size (derived ones by the reference)."""
    s = SIZES[size]
    feats = _feature_map(s, seed).to(device)
    points = sk.grid_points(s.H, s.W, device=device)
    centers_xy = sk.grid_centers(s.H, s.W, s.per_dim, device=device)
    with torch.no_grad():
        center_feats, _ = _reference_knn(feats, points, centers_xy, s.k)  # Eq. 1
        assign, sim = ref.cosine_assign(feats, center_feats)  # Eq. 2
        center_out, _ = ref.cluster_aggregate(feats, assign, sim, center_feats)  # Eq. 3
    cast = lambda t: t.to(dtype).contiguous()  # noqa: E731
    return {
        "feats": cast(feats), "points": points, "centers_xy": centers_xy, "k": s.k,
        "center_feats": cast(center_feats), "assign": assign.contiguous(), "sim": cast(sim),
        "center_out": cast(center_out),
    }


def _pick(*names):
    """make_inputs for a case taking the inputs ``names`` of :func:`_inputs` (renamed ``a=b``)."""
    def make_inputs(size, device, dtype, seed):
        everything = _inputs(size, device, dtype, seed)
        out = {}
        for name in names:
            mine, _, theirs = name.partition("=")
            out[mine] = everything[theirs or mine]
        return out
    return make_inputs


def _describe(size: str) -> str:
    return str(SIZES[size])


# ---------------------------------------------------------------------------------------------
# The eager references, with the public ops' signatures and outputs. The op layer broadcasts
# geometry and drops auxiliary outputs (den); these wrappers do the same in plain PyTorch, so
# `torch.compile` of them is "the reference, compiled".
# ---------------------------------------------------------------------------------------------
def _reference_knn(feats, points, centers, k):
    B = feats.shape[0]
    return ref.knn_center_features(feats, points.expand(B, -1, -1), centers.expand(B, -1, -1), k)


def _reference_assign(feats, centers):
    return ref.cosine_assign(feats, centers)


def _reference_aggregate(values, assign, sim, value_centers):
    return (ref.cluster_aggregate(values, assign, sim, value_centers)[0],)


def _reference_superpixel(feats, centers):
    out, _, assign, sim = ref.superpixel_cluster(feats, centers, feats, centers)
    return out, assign, sim


def _reference_dispatch(center_out, assign, sim, residual):
    return (ref.cluster_dispatch(center_out, assign, sim, residual),)


CASES = [
    Case(
        name="knn_center_features", family="cluster", sizes=SIZES,
        make_inputs=_pick("feats", "points", "centers=centers_xy", "k"),
        fused=lambda feats, points, centers, k: sk.knn_center_features(feats, points, centers, k),
        reference=_reference_knn,
        grad_inputs=("feats",),
        kernels=KERNELS["knn_center_features"], describe=_describe,
    ),
    Case(
        name="cosine_assign", family="cluster", sizes=SIZES,
        make_inputs=_pick("feats", "centers=center_feats"),
        fused=lambda feats, centers: sk.cosine_assign(feats, centers),
        reference=_reference_assign,
        grad_inputs=("feats", "centers"),
        kernels=KERNELS["cosine_assign"], describe=_describe,
    ),
    Case(
        name="cluster_aggregate", family="cluster", sizes=SIZES,
        make_inputs=_pick("values=feats", "assign", "sim", "value_centers=center_feats"),
        fused=lambda values, assign, sim, value_centers: (sk.cluster_aggregate(values, assign, sim, value_centers),),
        reference=_reference_aggregate,
        grad_inputs=("values", "sim", "value_centers"),
        kernels=KERNELS["cluster_aggregate"], describe=_describe,
    ),
    Case(
        name="superpixel_cluster", family="cluster", sizes=SIZES,
        make_inputs=_pick("feats", "centers=center_feats"),
        fused=lambda feats, centers: sk.superpixel_cluster(feats, centers),
        reference=_reference_superpixel,
        grad_inputs=("feats", "centers"),
        kernels=KERNELS["superpixel_cluster"], describe=_describe,
    ),
    Case(
        name="cluster_dispatch", family="cluster", sizes=SIZES,
        make_inputs=_pick("center_out", "assign", "sim", "residual=feats"),
        fused=lambda center_out, assign, sim, residual: (sk.cluster_dispatch(center_out, assign, sim, residual),),
        reference=_reference_dispatch,
        grad_inputs=("center_out", "sim", "residual"),
        kernels=KERNELS["cluster_dispatch"], describe=_describe,
    ),
]
