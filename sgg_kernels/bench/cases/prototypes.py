"""Benchmark case of the prototype distance op (RDE, Sec. 3.3, Eq. 4, family ``prototypes``).

Sizes (float32 unless ``--dtype``): N relation instances (one per candidate pair: the pairs of
the ``pairs`` family), Q = 51 prototypes (Visual Genome's 50 predicates and background), D the
width of the relation feature (4096, the LinkNet/Motifs relation head's).

=======  ======  ==  ====  ==========================================
name     N       Q   D
=======  ======  ==  ====  ==========================================
small    64      51  256
mid      2,400   51  4096  (CPU default; the paper's size: ~0.4 s fwd+bwd fused on 2 cores)
paper    2,400   51  4096  (100 boxes, all ordered pairs, in 4 images)
sgdet    25,280  51  4096  (80 boxes per image in 4 images)
=======  ======  ==  ====  ==========================================

Instances are drawn near their prototypes (x = p_label + noise of 0.3 of a prototype's norm per
coordinate), as the prototype loss drives them in training.

The eager baseline is what a researcher writes for Eq. 4's two terms:
``F.normalize(x) @ F.normalize(protos).T`` for the cosine and ``torch.cdist(x, protos)`` for the
Euclidean distance (torch's matmul-based cdist for these sizes: |x|^2 + |p|^2 - 2 x.p, clamped,
then sqrt). Its forward+backward holds the normalised copy of x ([N, D], as large as x) and
cdist's intermediates; the fused op holds only its two ``[N, Q]`` outputs (its backward adds one
``[N, Q]`` coefficient matrix).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

import sgg_kernels as sk
from sgg_kernels.ops.prototypes import KERNELS

from ..registry import Case, Inputs


@dataclass(frozen=True)
class ProtoSize:
    N: int
    Q: int
    D: int

    def __str__(self) -> str:
        return f"x [N={self.N}, D={self.D}], protos [Q={self.Q}, D={self.D}]"


SIZES: Dict[str, ProtoSize] = {
    "small": ProtoSize(N=64, Q=51, D=256),
    "mid": ProtoSize(N=2400, Q=51, D=4096),
    "paper": ProtoSize(N=2400, Q=51, D=4096),
    "sgdet": ProtoSize(N=25280, Q=51, D=4096),
}


def _inputs(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(s.Q, s.D, generator=g)
    labels = torch.randint(0, s.Q, (s.N,), generator=g)
    x = protos[labels] + 0.3 * torch.randn(s.N, s.D, generator=g)
    return {"x": x.to(device, dtype), "protos": protos.to(device, dtype)}


def _describe(size: str) -> str:
    return str(SIZES[size])


def _fused(x, protos):
    return sk.prototype_distance(x, protos)


def _eager(x, protos):
    cos = F.normalize(x, dim=-1) @ F.normalize(protos, dim=-1).T  # Eq. 4: L2(x) . L2(P)
    dist = torch.cdist(x, protos)  # Eq. 4: ||x - P||_2
    return cos, dist


CASES = [
    Case(
        name="prototype_distance", family="prototypes", sizes=SIZES, make_inputs=_inputs, fused=_fused,
        reference=_eager, grad_inputs=("x", "protos"), kernels=KERNELS["prototype_distance"], describe=_describe,
    ),
]
