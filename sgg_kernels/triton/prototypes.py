"""Triton backend of prototype_distance (RDE, Sec. 3.3, Eq. 4): the family's CUDA backend.

Same functions, signatures, outputs and output dtypes as :mod:`sgg_kernels.reference.prototypes`
(the spec; its module docstring derives the backward formulas). The ``@triton.jit`` code is in
:mod:`sgg_kernels.triton._prototypes_kernels`; these are the plain-Python launchers that the op
layer (:mod:`sgg_kernels.ops.prototypes`) calls inside its ``torch.library`` custom ops.

Design (``x [N, D]``, ``protos [Q, D]``, any strides; the ``[N, Q, D]`` differences never exist):

    function                      kernel   grid                            scratch (ACC dtype)
    prototype_distance            dot      (N tiles, Q blocks, D splits)   dot [S, N, Q], norms [S, N], [S, Q]
                                  sq       (N tiles, Q blocks)             dot, s [N, Q], norms [N], [Q]
                                  finish   (N tiles, Q blocks)             -
    prototype_distance_backward   dot, sq  (as the forward)                (as the forward)
                                  finish   (N tiles, Q blocks)             K [N, Q], r/c partials
                                  grad x   (N tiles, D blocks)             -
                                  grad P   (Q blocks, D blocks, N splits)  grad P partials [S, Q, D]

<x_n, p_q> is a GEMM on tensor cores and s = |x|^2 + |p|^2 - 2 <x, p>; the pairs where that
cancels (s < TAU (|x|^2 + |p|^2), TAU = 1/64) are recomputed by direct differences in the sq
kernel (exact 0 at x_n = p_q). The backward recomputes the same way (the saved outputs are not
read), writes K = G / (a b) - W once, then the two gradients are GEMMs with a fixed summation
order: grad x = K @ P + r x (dot over Q blocks), grad P = K^T @ x + c P (dot over the row tiles of
one N split; the split partials and the r/c partials are summed by torch over a fixed short
axis). Deterministic, no atomics. Empty inputs (N = 0 or Q = 0) launch nothing. Floors and the
error bound of the recompute threshold: :mod:`sgg_kernels.triton._prototypes_kernels`.

Tuning knobs are module globals (``_BLOCK_N``, ``_MAX_BLOCK_Q``, ...) so tests can shrink the
blocks to exercise the multi-block paths in the interpreter.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
from torch import Tensor

from .._backend import dot_precision
from ._geometry import split_work
from .pairs import _acc, _native, _variant
from ._prototypes_kernels import (
    _prototype_dot_kernel,
    _prototype_finish_kernel,
    _prototype_sq_kernel,
    _prototype_grad_p_kernel,
    _prototype_grad_x_kernel,
)

# ---------------------------------------------------------------------------------------------
# Configuration: one fixed config (the interpreter cannot autotune), checked by compiling every
# kernel for sm_90 and sm_80 with ptxas at the benchmark sizes (.ci/check_triton_compile.py:
# N = 2,400 and 25,280, Q = 51, D = 4096, every dtype): no spills in fp32/fp16/bf16 on either.
# - dot: [32, 64] tiles (Q = 51 is one block: 20 % of the MMA is padding, free in a memory-bound
#   kernel), 32 columns a step. 64-row tiles took 214 registers in fp32 (2 CTAs/SM) and spilled
#   84 B on sm_80. D is split so that the grid reaches two waves at the CTAs per SM the variant
#   fits (_CTAS_DOT); the price is the S partials of [N, Q] (written once, read by the sq kernel).
#   The split count is _geometry.split_work's (whole waves; a split's partial costs 4 (fp32) / 8
#   (fp16/bf16) steps in its model). paper: 75 row tiles x 10 splits of 416 columns = 750
#   programs (fp32, 1.89 waves at 3 CTAs/SM: two rounds); fp16/bf16 x 16 splits of 256 (capped by
#   _MIN_D_PER_SPLIT: 1.3 waves at 7 CTAs/SM, partials 16 x 0.49 MB each way against 19.7 MB of
#   x). sgdet: 790 row tiles x 1 (fp32: 1.99 waves) / 2 splits (fp16/bf16: 1.71 waves).
# - sq and finish: [8, 64] tiles, elementwise on [N, Q] (0.5 MB at paper) plus the rare
#   recompute (32 columns a step); not hot (300 programs at paper, 3,160 at sgdet).
# - grad x: [32, 32] output tiles, the dot over Q (paper: 75 x 128 = 9,600 programs).
# - grad P: [64, 32] output tiles (Q = 51: one block; 128 column tiles at D = 4096), its reduction
#   over N split for whole waves at _CTAS_GRAD_P (paper: 10 splits of 256 rows, 1,280 programs,
#   1.94 waves at 5 CTAs/SM; partials 10 x 0.8 MB; sgdet: 10 splits of 2,528 rows).
# ---------------------------------------------------------------------------------------------
_BLOCK_N = 32  # rows of x per GEMM tile (dot kernel, grad x tile, grad P reduction step)
_MAX_BLOCK_Q = 64  # prototypes per GEMM and finish tile
_BLOCK_D = 32  # columns per step of the dot kernel; columns per grad x / grad P output tile
_BLOCK_N_FINISH = 8  # rows per finish tile
_BLOCK_D_FIX = 32  # columns per step of the exact recompute
_MIN_D_PER_SPLIT = 256  # a D split of the dot kernel is at least this many columns
_MIN_N_PER_SPLIT = 256  # an N split of grad P is at least this many rows
# resident CTAs per SM of the sm_90 compiles (check_triton_compile.py), by variant: the waves the
# D split (dot) and the N split (grad P) fill (_geometry.split_work)
_CTAS_DOT = {"fp32": 3, "native": 7, "fp64": 4}
_CTAS_GRAD_P = {"fp32": 5, "native": 5, "fp64": 7}
_TAU = 1.0 / 64  # recompute s exactly where s < _TAU (|x|^2 + |p|^2) (kernels module: error bound)
_FP64_SHRINK = 2  # fp64 tiles are twice the bytes: halve the column blocks
_NUM_WARPS = 4
_NUM_WARPS_DOT = 4
_NUM_STAGES_DOT = 2


def _pow2(n: int, lo: int, cap: int) -> int:
    """A power-of-two block for extent n, in [lo, cap] (tl.dot needs every dim >= 16)."""
    return max(lo, min(triton.next_power_of_2(max(int(n), 1)), cap))


def _gemm_blocks(Q: int, acc: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_Q, BLOCK_D) of the GEMM kernels (dot, grad x, grad P)."""
    shrink = _FP64_SHRINK if acc == torch.float64 else 1
    return max(16, _BLOCK_N), _pow2(Q, 16, _MAX_BLOCK_Q), max(16, _BLOCK_D // shrink)


def _finish_blocks(Q: int) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_Q, BLOCK_D) of the sq and finish kernels."""
    return _BLOCK_N_FINISH, _pow2(Q, 16, _MAX_BLOCK_Q), _BLOCK_D_FIX


def _split(extent: int, tiles: int, block: int, minimum: int, ctas: int, split_cost: float = 1.0) -> Tuple[int, int]:
    """(splits, extent per split) of a reduction over ``extent`` with ``tiles`` programs per split:
    the split that fills whole waves at ``ctas`` CTAs per SM (:func:`split_work`), each split at
    least ``minimum`` long and a multiple of ``block`` (shapes only: the summation order never
    depends on the device); ``split_cost``: a split's partial, in reduction steps."""
    n, per = split_work(tiles, triton.cdiv(max(extent, 1), block), ctas, triton.cdiv(minimum, block),
                        split_cost=split_cost)
    return n, per * block


def _dot_grid(N: int, Q: int, D: int, acc: torch.dtype, native: bool):
    """(BLOCK_N, BLOCK_Q, BLOCK_D, n_row_tiles, n_q_blocks, d_splits, d_per_split) of the dot kernel."""
    bn, bq, bd = _gemm_blocks(Q, acc)
    n_nb, n_qb = triton.cdiv(N, bn), triton.cdiv(Q, bq)
    # a split writes an ACC [bn, bq] partial that the sq kernel reads back: 2 bq 4 / (bd e) steps
    # of bn rows x bd input columns (fp32: 4, fp16/bf16: 8; the S partial bytes against x's)
    elem = 2 if native else (8 if acc == torch.float64 else 4)
    cost = 2 * bq * (8 if acc == torch.float64 else 4) / (bd * elem)
    splits, per = _split(D, n_nb * n_qb, bd, _MIN_D_PER_SPLIT, _CTAS_DOT[_variant(acc, native)], cost)
    return bn, bq, bd, n_nb, n_qb, splits, per


def _grad_p_grid(N: int, Q: int, D: int, acc: torch.dtype, native: bool):
    """(BLOCK_N, BLOCK_Q, BLOCK_D, n_q_blocks, n_d_blocks, n_splits, n_per_split) of grad P."""
    bn, bq, bd = _gemm_blocks(Q, acc)
    n_qb, n_db = triton.cdiv(Q, bq), triton.cdiv(D, bd)
    splits, per = _split(N, n_qb * n_db, bn, _MIN_N_PER_SPLIT, _CTAS_GRAD_P[_variant(acc, native)])
    return bn, bq, bd, n_qb, n_db, splits, per


def _distance(x: Tensor, protos: Tensor, backward: bool, grads=None):
    """The dot, sq and finish kernels. Forward: ``(cos, dist)``; backward (``grads`` =
    (G, H)): ``(K [N, Q], r [N], c [Q])`` in ACC."""
    N, D = x.shape
    Q = protos.shape[0]
    dev = x.device
    acc_tl, acc = _acc(x.dtype)
    native = _native(x.dtype)  # fp16/bf16 operands into the dot: on a GPU only (not the interpreter)
    bn, bq, bd, n_nb, n_qb, splits, per = _dot_grid(N, Q, D, acc, native)
    dot = torch.empty((splits, N, Q), dtype=acc, device=dev)
    nx2 = torch.empty((splits, N), dtype=acc, device=dev)
    np2 = torch.empty((splits, Q), dtype=acc, device=dev)
    _prototype_dot_kernel[(n_nb, n_qb, splits)](
        x, protos, dot, nx2, np2,
        N, Q, D, per,
        *x.stride(), *protos.stride(),
        ACC=acc_tl, DOT_NATIVE=native, PREC=dot_precision(acc), BLOCK_N=bn, BLOCK_Q=bq, BLOCK_D=bd,
        num_warps=_NUM_WARPS_DOT, num_stages=_NUM_STAGES_DOT,
    )
    fn, fq, fd = _finish_blocks(Q)
    f_nb, f_qb = triton.cdiv(N, fn), triton.cdiv(Q, fq)
    dot_sum = torch.empty((N, Q), dtype=acc, device=dev)
    sq = torch.empty((N, Q), dtype=acc, device=dev)
    nx2_sum = torch.empty((N,), dtype=acc, device=dev)
    np2_sum = torch.empty((Q,), dtype=acc, device=dev)
    _prototype_sq_kernel[(f_nb, f_qb)](
        x, protos, dot, nx2, np2,
        dot_sum, sq, nx2_sum, np2_sum,
        N, Q, D, splits,
        *x.stride(), *protos.stride(),
        ACC=acc_tl, TAU=_TAU, BLOCK_N=fn, BLOCK_Q=fq, BLOCK_D=fd, num_warps=_NUM_WARPS,
    )
    if backward:
        G, H = grads
        cos = dist = sq  # unused pointers
        K = dot[0]  # reused: the partials were all read by the sq kernel above (stream order)
        r_part = torch.empty((f_qb, N), dtype=acc, device=dev)
        c_part = torch.empty((f_nb, Q), dtype=acc, device=dev)
        g_strides = (*G.stride(), *H.stride())
    else:
        cos = torch.empty((N, Q), dtype=x.dtype, device=dev)
        dist = torch.empty((N, Q), dtype=x.dtype, device=dev)
        G = H = K = r_part = c_part = sq  # unused pointers
        g_strides = (0, 0, 0, 0)
    _prototype_finish_kernel[(f_nb, f_qb)](
        dot_sum, sq, nx2_sum, np2_sum,
        cos, dist,
        G, H, K, r_part, c_part,
        N, Q,
        *g_strides,
        ACC=acc_tl, BACKWARD=backward, BLOCK_N=fn, BLOCK_Q=fq, num_warps=_NUM_WARPS,
    )
    if backward:
        return K, r_part.sum(dim=0), c_part.sum(dim=0)  # fixed-shape torch sums: deterministic
    return cos, dist


# ---------------------------------------------------------------------------------------------
# Eq. 4
# ---------------------------------------------------------------------------------------------
def prototype_distance(x: Tensor, protos: Tensor):
    """Eq. 4: ``(cos [N, Q], dist [N, Q])`` in the dtype of ``x``: the GEMM, the sq kernel, the finish kernel."""
    N, Q = x.shape[0], protos.shape[0]
    if N == 0 or Q == 0:
        return (torch.empty((N, Q), dtype=x.dtype, device=x.device),
                torch.empty((N, Q), dtype=x.dtype, device=x.device))
    return _distance(x, protos, backward=False)


def prototype_distance_backward(grad_cos: Tensor, grad_dist: Tensor, x: Tensor, protos: Tensor,
                                need_x: bool = True, need_protos: bool = True):
    """``(grad x [N, D], grad protos [Q, D])`` of :func:`prototype_distance` (an empty ``[0]``
    tensor for a gradient not needed): the GEMM, sq and finish kernels (K, r, c), then one GEMM kernel
    per gradient."""
    N, D = x.shape
    Q = protos.shape[0]
    dev = x.device
    grad_x = torch.empty((N, D) if need_x else (0,), dtype=x.dtype, device=dev)
    if N == 0 or Q == 0:  # no pair: both gradients are 0
        return grad_x.zero_(), torch.zeros((Q, D) if need_protos else (0,), dtype=protos.dtype, device=dev)
    if not (need_x or need_protos) or D == 0:
        return grad_x, torch.empty((Q, D) if need_protos else (0,), dtype=protos.dtype, device=dev)
    acc_tl, acc = _acc(x.dtype)
    prec = dot_precision(acc)
    K, r, c = _distance(x, protos, backward=True, grads=(grad_cos, grad_dist))
    bn, bq, bd = _gemm_blocks(Q, acc)
    if need_x:
        _prototype_grad_x_kernel[(triton.cdiv(N, bn), triton.cdiv(D, bd))](
            K, r, x, protos, grad_x,
            N, Q, D,
            *x.stride(), *protos.stride(),
            ACC=acc_tl, PREC=prec, BLOCK_N=bn, BLOCK_Q=bq, BLOCK_D=bd,
            num_warps=_NUM_WARPS_DOT, num_stages=_NUM_STAGES_DOT,
        )
    if not need_protos:
        return grad_x, torch.empty((0,), dtype=protos.dtype, device=dev)
    bn, bq, bd, n_qb, n_db, splits, per = _grad_p_grid(N, Q, D, acc, _native(x.dtype))
    part = torch.empty((splits, Q, D), dtype=acc, device=dev)
    _prototype_grad_p_kernel[(n_qb, n_db, splits)](
        K, c, x, protos, part,
        N, Q, D, per,
        *x.stride(), *protos.stride(),
        ACC=acc_tl, PREC=prec, BLOCK_N=bn, BLOCK_Q=bq, BLOCK_D=bd,
        num_warps=_NUM_WARPS_DOT, num_stages=_NUM_STAGES_DOT,
    )
    grad_p = (part[0] if splits == 1 else part.sum(dim=0)).to(protos.dtype)  # fixed order over S
    return grad_x, grad_p
