"""Triton backend of prototype_distance (RDE, Sec. 3.3, Eq. 4): the family's CUDA backend.

Same functions, signatures, outputs and output dtypes as :mod:`sgg_kernels.reference.prototypes`
(the spec; its module docstring derives the backward formulas). The ``@triton.jit`` code is in
:mod:`sgg_kernels.triton._prototypes_kernels`; these are the plain-Python launchers that the op
layer (:mod:`sgg_kernels.ops.prototypes`) calls inside its ``torch.library`` custom ops.

Design (``x [N, D]``, ``protos [Q, D]``, any strides; the ``[N, Q, D]`` differences never exist,
each program holds one ``[BLOCK_N, BLOCK_Q, BLOCK_D]`` slab of them in registers):

    function                      kernel   grid                     scratch (ACC dtype)
    prototype_distance            forward  (N tiles, Q blocks)      -
    prototype_distance_backward   coef     (N tiles, Q blocks)      K [N, Q], r/c partials
                                  grad x   (N tiles, D blocks)      -
                                  grad P   (Q blocks, D blocks)     -

The forward and the coefficient kernel compute <x_n, p_q> and ||x_n - p_q||^2 together from
direct differences (exact 0 at x_n = p_q). The backward recomputes cos and s (the saved outputs
are not read), writes K = G / (a b) - W once, then the two gradients are GEMMs with a fixed
summation order: grad x = K @ P + r x (dot over Q blocks), grad P = K^T @ x + c P (dot over N
tiles, one program per output tile); r and c are per-block partials summed by torch over a fixed
short axis. Deterministic, no atomics. Empty inputs (N = 0 or Q = 0) launch nothing.

Tuning knobs are module globals (``_BLOCK_N``, ``_MAX_BLOCK_Q``, ...) so tests can shrink the
blocks to exercise the multi-block paths in the interpreter.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._prototypes_kernels import (
    _prototype_coef_kernel,
    _prototype_distance_kernel,
    _prototype_grad_p_kernel,
    _prototype_grad_x_kernel,
)

# ---------------------------------------------------------------------------------------------
# Configuration: one fixed config (the interpreter cannot autotune), checked by compiling every
# kernel for sm_90 with ptxas at the benchmark sizes (.ci/check_triton_compile.py: N = 2,400 and
# 25,280, Q = 51, D = 4096, every dtype). The distance slab [BLOCK_N, BLOCK_Q, BLOCK_DIST_D] is
# what a program holds in registers: 8K elements (fp32) compile to 128 registers without spills.
# The grad GEMMs (fp32 FMA dots on converted operands) spilled 0.3-0.4 KB per thread in fp16/bf16
# with 2 pipeline stages; one stage removes every spill. grad P's grid is (Q blocks, D blocks)
# only (its reduction runs over N inside the program): 32-column tiles give 128 programs at D = 4096.
# ---------------------------------------------------------------------------------------------
_BLOCK_N = 32  # rows of x per distance tile (forward, coef)
_MAX_BLOCK_Q = 32  # prototypes per distance tile: Q = 51 is two blocks
_BLOCK_DIST_D = 8  # columns per step of the direct differences
_BLOCK_N_DOT = 64  # rows per tile of the grad GEMMs (grad x tile, grad P reduction step)
_MAX_BLOCK_Q_DOT = 64  # prototypes per grad GEMM tile: Q = 51 is one block
_MAX_BLOCK_D_DOT = 32  # columns per grad x tile (64 spilled 8 B on sm_80)
_MAX_BLOCK_D_GRAD_P = 32  # columns per grad P tile
_FP64_SHRINK = 2  # fp64 tiles are twice the bytes: halve the row blocks
_NUM_WARPS = 4
_NUM_WARPS_DOT = 8
_NUM_STAGES_DOT = 1


def _acc(dtype: torch.dtype) -> Tuple[tl.dtype, torch.dtype]:
    """Accumulation dtype: float64 for float64 inputs, else float32 (reference ``_acc_dtype``)."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _pow2(n: int, lo: int, cap: int) -> int:
    """A power-of-two block for extent n, in [lo, cap] (tl.dot needs every dim >= 16)."""
    return max(lo, min(triton.next_power_of_2(max(int(n), 1)), cap))


def _distance_blocks(Q: int, acc: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_Q, BLOCK_D) of the direct-difference kernels (forward, coef)."""
    shrink = _FP64_SHRINK if acc == torch.float64 else 1
    return max(1, _BLOCK_N // shrink), _pow2(Q, 1, _MAX_BLOCK_Q), _BLOCK_DIST_D


def _dot_blocks(Q: int, D: int, acc: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_Q, BLOCK_D) of the grad GEMM kernels."""
    shrink = _FP64_SHRINK if acc == torch.float64 else 1
    return max(16, _BLOCK_N_DOT // shrink), _pow2(Q, 16, _MAX_BLOCK_Q_DOT), _pow2(D, 16, _MAX_BLOCK_D_DOT)


# ---------------------------------------------------------------------------------------------
# Eq. 4
# ---------------------------------------------------------------------------------------------
def prototype_distance(x: Tensor, protos: Tensor):
    """Eq. 4: ``(cos [N, Q], dist [N, Q])`` in the dtype of ``x``; one launch over ``[N, Q]`` tiles."""
    N, D = x.shape
    Q = protos.shape[0]
    cos = torch.empty((N, Q), dtype=x.dtype, device=x.device)
    dist = torch.empty((N, Q), dtype=x.dtype, device=x.device)
    if N == 0 or Q == 0:
        return cos, dist
    acc_tl, acc = _acc(x.dtype)
    block_n, block_q, block_d = _distance_blocks(Q, acc)
    grid = (triton.cdiv(N, block_n), triton.cdiv(Q, block_q))
    _prototype_distance_kernel[grid](
        x, protos, cos, dist,
        N, Q, D,
        *x.stride(), *protos.stride(),
        ACC=acc_tl, BLOCK_N=block_n, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=_NUM_WARPS,
    )
    return cos, dist


def prototype_distance_backward(grad_cos: Tensor, grad_dist: Tensor, x: Tensor, protos: Tensor,
                                need_x: bool = True, need_protos: bool = True):
    """``(grad x [N, D], grad protos [Q, D])`` of :func:`prototype_distance` (an empty ``[0]``
    tensor for a gradient not needed): the coefficient kernel, then one GEMM kernel per gradient."""
    N, D = x.shape
    Q = protos.shape[0]
    dev = x.device
    grad_x = torch.empty((N, D) if need_x else (0,), dtype=x.dtype, device=dev)
    grad_p = torch.empty((Q, D) if need_protos else (0,), dtype=protos.dtype, device=dev)
    if N == 0 or Q == 0:  # no pair: both gradients are 0
        return grad_x.zero_(), grad_p.zero_()
    if not (need_x or need_protos):
        return grad_x, grad_p
    acc_tl, acc = _acc(x.dtype)
    block_n, block_q, block_d = _distance_blocks(Q, acc)
    n_nb, n_qb = triton.cdiv(N, block_n), triton.cdiv(Q, block_q)
    K = torch.empty((N, Q), dtype=acc, device=dev)
    r_part = torch.empty((n_qb, N), dtype=acc, device=dev)
    c_part = torch.empty((n_nb, Q), dtype=acc, device=dev)
    _prototype_coef_kernel[(n_nb, n_qb)](
        grad_cos, grad_dist, x, protos, K, r_part, c_part,
        N, Q, D,
        *grad_cos.stride(), *grad_dist.stride(), *x.stride(), *protos.stride(),
        ACC=acc_tl, BLOCK_N=block_n, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=_NUM_WARPS,
    )
    dn, dq, dd = _dot_blocks(Q, D, acc)
    if need_x and D > 0:
        r = r_part.sum(dim=0)  # fixed-shape torch sum over the Q blocks: deterministic
        _prototype_grad_x_kernel[(triton.cdiv(N, dn), triton.cdiv(D, dd))](
            K, r, x, protos, grad_x,
            N, Q, D,
            *x.stride(), *protos.stride(),
            ACC=acc_tl, BLOCK_N=dn, BLOCK_Q=dq, BLOCK_D=dd, num_warps=_NUM_WARPS_DOT, num_stages=_NUM_STAGES_DOT,
        )
    if need_protos and D > 0:
        c = c_part.sum(dim=0)
        dd = _pow2(D, 16, _MAX_BLOCK_D_GRAD_P)
        _prototype_grad_p_kernel[(triton.cdiv(Q, dq), triton.cdiv(D, dd))](
            K, c, x, protos, grad_p,
            N, Q, D,
            *x.stride(), *protos.stride(),
            ACC=acc_tl, BLOCK_N=dn, BLOCK_Q=dq, BLOCK_D=dd, num_warps=_NUM_WARPS_DOT, num_stages=_NUM_STAGES_DOT,
        )
    return grad_x, grad_p
