"""Triton backend of the superpixel clustering family (SIL, MM'23, Eq. 2, 3, 9).

Same functions, signatures, outputs and output dtypes as :mod:`sgg_kernels.reference.cluster`
(the spec; its module docstring derives every backward formula). The ``@triton.jit`` code is in
:mod:`sgg_kernels.triton._cluster_kernels`; these are the plain-Python launchers that the op
layer (:mod:`sgg_kernels.ops.cluster`) calls inside its ``torch.library`` custom ops.

Design (``[B, M, D]`` points, ``C`` centers; a *tile* is ``BLOCK_M`` points, a *chunk* a run of
tiles owned by one program; grids are 1-D over ``B * tiles`` or ``B * chunks``):

    function                    kernels                                  launches   scratch (ACC dtype)
    cosine_assign               assign, one tile per program             1          -
    cluster_aggregate           partial (per chunk) + finish             2          [B, chunks, C, D + 1]
    superpixel_cluster          assign + partial (per chunk) + finish    2          [B, chunks, C, Dv + 1]
    cosine_assign_backward      per point + partial (chunk) + finish     2 + torch  [B, chunks, C, D + 3], 2x[B, M]
    cluster_aggregate_backward  per point (grad vc = G / den in torch)   1 + torch  -
    cluster_dispatch            per point, grid (B * tiles, D blocks)    1          -
    cluster_dispatch_backward   per point + partial (chunk) + finish     2          [B, chunks, C, D]

The finish kernel's grid is ``(B, C blocks, D blocks)``. "torch" is per-center elementwise work on
``[B, C, D]`` and the sum of the alpha/beta partials. (The residual's gradient in Eq. 9 is grad_out
itself: the autograd formula returns it without calling the backward op for it.)

Cluster sums are deterministic: each program sums its chunk with ``tl.dot(W^T, V)`` on one-hot
weights, writes a ``[C, D]`` partial, and the finish kernel adds the chunks in a fixed order; the
chunking depends on the shapes only (it targets 2 waves of an H100's 132 SMs, not the device
present), so results are bitwise reproducible. Scalar grads (alpha, beta) are per-program
partials summed by torch. Empty inputs (B = 0 or M = 0) return without a launch.

Floors (bench/floors.py ``FLOORS``, benchmarks/NOTES.md; arithmetic, not measured): each op's
forward and backward floor, at paper and sgdet, is in its main kernel's docstring
(``_cosine_assign_kernel`` / ``_cosine_assign_backward_kernel``, ``_cluster_partial_kernel`` /
``_cluster_aggregate_backward_kernel``, ``_superpixel_kernel``, ``_cluster_dispatch_kernel`` /
``_cluster_dispatch_backward_kernel``) with that kernel's share and what it moves beyond it; the
finish kernel's partials are traffic of no floor. superpixel_cluster's backward floor (values =
feats): grad out, grad sim, feats, centers, assign, sim, out, den read once, grad feats and grad
centers written once: 50.3 / 398.5 MiB, 0.076 / 0.61 GFLOP, memory-bound (15.7 / 125 us at
3.35 TB/s). It has no kernel of its own (ops/cluster.py: cluster_aggregate_backward, then
cosine_assign_backward): feats is read by both, and grad values and grad feats (one tensor when
values = feats) are written separately and summed by autograd (3 B M D e more): ~190 MiB at
paper (~3.7x the floor), >= ~1.4 GiB at sgdet (~3.5x).

fp16/bf16 inputs run their dots on tensor cores (``DOT_NATIVE``/``W_NATIVE``: operands that are
exact in that dtype, fp32 accumulation) on a GPU only; the interpreter (bf16 dots are wrong
there) takes the fp32 path. Tuning knobs are module globals (``_BLOCK_M``, ``_MAX_BLOCK_C``, ...)
so tests can shrink the blocks to exercise multi-block paths in the interpreter.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import dot_precision
from ..reference.cluster import EPS
from ._cluster_kernels import (
    _cluster_aggregate_backward_kernel,
    _cluster_dispatch_backward_kernel,
    _cluster_dispatch_kernel,
    _cluster_finish_kernel,
    _cluster_partial_kernel,
    _cosine_assign_backward_kernel,
    _cosine_assign_kernel,
    _superpixel_kernel,
)
from ._geometry import register_cap, split_work

# ---------------------------------------------------------------------------------------------
# Configuration: one fixed config (the interpreter cannot autotune). Chosen by compiling every
# kernel for sm_90 with ptxas at the benchmark sizes (paper [16, 6144, 64], C = 49; sgdet
# [32, 24576, 64], C = 81; .ci/check_triton_compile.py prints programs, registers, CTAs/SM and
# waves): no spills, and the hot kernels at 96-142 registers (1-2 CTAs of 8 warps per SM).
# BLOCK_M = 64 / BLOCK_D = 32 took 250-255 registers with tf32x3 dots (each operand held as two
# TF32 halves) and spilled in the fp32 cluster sums and the fp16/bf16 assign backward; larger
# tiles (BLOCK_M = 128, BLOCK_D = 64, BLOCK_C = 128) spilled 0.5-20 KB per thread.
# ---------------------------------------------------------------------------------------------
_BLOCK_M = 32  # points per tile (fp16/bf16/fp32)
_BLOCK_M_FP64 = 16  # fp64 (gradcheck, not a hot dtype); ptxas caps it at 128 registers and spills 8-12 B
_MAX_BLOCK_C = 64  # C = 49 is one center block, C = 81 two
_MAX_BLOCK_D = 16
_MAX_BLOCK_D_FP64 = 16
_NUM_WARPS_DOT = 8  # kernels with tl.dot (assign, cluster sums)
_NUM_WARPS_DOT_FP64 = 8  # 4 warps spilled more (20-28 B at 255 registers)
_MAXNREG = 128  # dot kernels, fp32 accumulation: 2 CTAs of 8 warps per SM (65,536 registers)
_NUM_WARPS_POINT = 4  # per-point gathers (aggregate backward, dispatch) and the finish kernel
# Chunked kernels (cluster sums, superpixel, both backwards): the CTAs per SM their sm_90 compiles
# fit (72-121 registers at 8 warps, _dot_opts), which sets the wave the chunking fills (_chunking).
# A constant (not the device present), so the chunking, and the summation order, depend on the
# shapes only.
_CTAS_CHUNKED = 2
_CHUNK_COST = 4  # a chunk's [C, D] ACC partial, written and summed, in point tiles read (64 x 64 x 4 x 2 B / 32 x 64 x 4 B)
_MIN_TILES_PER_CHUNK = 4  # a chunk's [C, D] partial should cost much less than reading its points
_NUM_STAGES = 2  # the assignment (one pass over its point tile)
_NUM_STAGES_CHUNKED = 1  # loops over a chunk's tiles (see _dot_opts)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _acc(*dtypes: torch.dtype) -> Tuple[tl.dtype, torch.dtype]:
    """Accumulation dtype: float64 if any input is float64, else float32 (reference ``_acc_dtype``)."""
    if torch.float64 in dtypes:
        return tl.float64, torch.float64
    return tl.float32, torch.float32


def _pow2(n: int, cap: int) -> int:
    """A block size for extent n: a power of two in [16, cap] (tl.dot needs every dim >= 16)."""
    return max(16, min(triton.next_power_of_2(max(int(n), 1)), cap))


def _warps_dot(acc: torch.dtype) -> int:
    return _NUM_WARPS_DOT_FP64 if acc == torch.float64 else _NUM_WARPS_DOT


def _dot_opts(acc: torch.dtype, device: torch.device, block_c: int, chunked: bool = False) -> dict:
    """Launch options of the dot kernels: 8 warps; 2 stages for the assignment, 1 for the chunked
    loops (``chunked``: cluster sums, superpixel, both backwards) when capped; on sm_90, fp32 accumulation and
    full center blocks (BLOCK_C = 64: the benchmark sizes), at most _MAXNREG registers so two
    8-warp CTAs fit an SM (:func:`register_cap`). Uncapped and pipelined, the fp32 cluster sums
    and the assign backward took 142 registers (1 CTA/SM); capped at 128 with 2 stages they
    spilled 8-12 B; with 1 stage they fit in 96-121 with no spill (.ci/check_triton_compile.py,
    which fails on any spill; at BLOCK_C = 32 the capped fp16/bf16 assign backward spilled 16-20 B,
    so smaller blocks run uncapped). Two resident CTAs of 8 warps hide the tiles' load latency
    that software pipelining hid before."""
    cap = register_cap(_MAXNREG, device) if acc != torch.float64 and block_c == _MAX_BLOCK_C else {}
    # 1 stage only under the cap: uncapped (sm_80, small C blocks) 1 stage spilled 4-32 B where 2 did not
    stages = _NUM_STAGES_CHUNKED if chunked and cap else _NUM_STAGES
    return {"num_warps": _warps_dot(acc), "num_stages": stages, **cap}


def _block_m(acc: torch.dtype) -> int:
    return _BLOCK_M_FP64 if acc == torch.float64 else _BLOCK_M


def _block_d(D: int, acc: torch.dtype) -> int:
    return _pow2(D, _MAX_BLOCK_D_FP64 if acc == torch.float64 else _MAX_BLOCK_D)


def _chunking(B: int, M: int, block_m: int) -> Tuple[int, int]:
    """(n_chunks, tiles_per_chunk) of the chunked kernels' grid ``(B * n_chunks,)``: the split of
    each image's point tiles that fills whole waves at _CTAS_CHUNKED CTAs/SM (:func:`split_work`;
    paper: 16 images x 32 chunks of 6 tiles = 512 programs, sgdet: 32 x 16 chunks of 48 = 512),
    each chunk at least _MIN_TILES_PER_CHUNK tiles; a function of the shapes alone (determinism)."""
    return split_work(B, triton.cdiv(M, block_m), _CTAS_CHUNKED, _MIN_TILES_PER_CHUNK, split_cost=_CHUNK_COST)


def _half_dot(*dtypes: torch.dtype) -> bool:
    """Whether a tl.dot may run on fp16/bf16 operands (exact products, fp32 accumulation): only
    on a GPU (bf16 dots are wrong in the interpreter) and when every operand has that dtype."""
    return (not _interpret()) and dtypes[0] in (torch.float16, torch.bfloat16) and all(d == dtypes[0] for d in dtypes)


def _scalar_grads(ab_part: Tensor, alpha: Optional[Tensor], beta: Optional[Tensor]):
    """alpha/beta grads from the per-program partials ``[..., 2]`` (a fixed-shape torch sum:
    deterministic), in each scalar's own dtype and shape."""
    if alpha is None:
        return None, None
    total = ab_part.reshape(-1, 2).sum(dim=0)
    # copy=True: two views of `total` would alias each other, which custom ops forbid
    return (total[0].reshape(alpha.shape).to(alpha.dtype, copy=True),
            total[1].reshape(beta.shape).to(beta.dtype, copy=True))


def _finish(part: Tensor, part_w: Optional[Tensor], value_centers: Optional[Tensor], out: Tensor,
            den: Optional[Tensor], acc_tl, *, add_center: bool, divide: bool, store_w: bool) -> None:
    """Launch :func:`_cluster_finish_kernel`: sum ``part [B, n_chunks, C, D]`` over chunks into ``out``."""
    B, C, D = out.shape
    n_chunks = part.shape[1]
    block_c = _pow2(C, _MAX_BLOCK_C)
    block_d = _pow2(D, _MAX_BLOCK_D_FP64 if acc_tl == tl.float64 else _MAX_BLOCK_D)
    vc = value_centers if value_centers is not None else out
    grid = (B, triton.cdiv(C, block_c), max(1, triton.cdiv(D, block_d)))
    _cluster_finish_kernel[grid](
        part, part_w if part_w is not None else part, vc, out, den if den is not None else out,
        n_chunks, C, D, *vc.stride(),
        ACC=acc_tl, ADD_CENTER=add_center, DIVIDE=divide, STORE_W=store_w,
        BLOCK_C=block_c, BLOCK_D=block_d, num_warps=_NUM_WARPS_POINT,
    )


# ---------------------------------------------------------------------------------------------
# Eq. 2
# ---------------------------------------------------------------------------------------------
def cosine_assign(feats: Tensor, centers: Tensor, alpha: Optional[Tensor] = None, beta: Optional[Tensor] = None):
    """Eq. 2: ``(assign [B, M] int64, sim [B, M] feats dtype)``, argmax over centers, ties to the
    lower index. One launch; never more than a ``BLOCK_M x BLOCK_C`` tile of the similarity."""
    sigmoid = alpha is not None  # the op layer checked that alpha and beta come together
    B, M, D = feats.shape
    C = centers.shape[1]
    assign = torch.empty((B, M), dtype=torch.int64, device=feats.device)
    sim = torch.empty((B, M), dtype=feats.dtype, device=feats.device)
    if B == 0 or M == 0:
        return assign, sim
    if C == 0:
        raise ValueError("cosine_assign needs at least one center (C >= 1)")
    acc_tl, acc = _acc(feats.dtype, centers.dtype)
    block_m, block_c, block_d = _block_m(acc), _pow2(C, _MAX_BLOCK_C), _block_d(D, acc)
    grid = (B * triton.cdiv(M, block_m),)
    _cosine_assign_kernel[grid](
        feats, centers, alpha if sigmoid else feats, beta if sigmoid else feats, assign, sim,
        M, C, D, *feats.stride(), *centers.stride(),
        ACC=acc_tl, SIGMOID=sigmoid, DOT_NATIVE=_half_dot(feats.dtype, centers.dtype), PREC=dot_precision(acc),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=block_d,
        **_dot_opts(acc, feats.device, block_c),
    )
    return assign, sim


def cosine_assign_backward(grad_sim: Tensor, feats: Tensor, centers: Tensor, assign: Tensor, sim: Tensor,
                           alpha: Optional[Tensor] = None, beta: Optional[Tensor] = None):
    """Gradients of Eq. 2's ``sim`` w.r.t. (feats, centers, alpha, beta); ``(None, None)`` for
    alpha/beta when absent. Formulas: the reference module docstring.

    One launch does the per-point grads (grad feats, alpha/beta partials) and the chunk partials
    of S_j = sum_{a_i=j} gc_i f_i / n_i and T_j = sum_{a_i=j} gc_i cos_i; the finish kernel sums
    the chunks; grad c_j = (S_j - [|c_j| >= eps] T_j c_j / m_j) / m_j is per-center torch.
    """
    sigmoid = alpha is not None  # the op layer checked that alpha and beta come together
    B, M, D = feats.shape
    C = centers.shape[1]
    acc_tl, acc = _acc(feats.dtype, centers.dtype)
    grad_feats = torch.empty((B, M, D), dtype=feats.dtype, device=feats.device)
    if B == 0 or M == 0 or C == 0:
        zero = torch.zeros((1, 2), dtype=acc, device=feats.device)
        ga, gb = _scalar_grads(zero, alpha, beta)
        return grad_feats, torch.zeros_like(centers, memory_format=torch.contiguous_format), ga, gb
    # BLOCK_C >= 32: at 16 (C <= 16) the fp16/bf16 variant spilled 4 B on sm_90
    block_m, block_c, block_d = _block_m(acc), max(32, _pow2(C, _MAX_BLOCK_C)), _block_d(D, acc)
    n_chunks, per_chunk = _chunking(B, M, block_m)
    dev = feats.device
    w = torch.empty((B, M), dtype=acc, device=dev)  # gc_i / n_i
    t = torch.empty((B, M), dtype=acc, device=dev)  # gc_i cos_i
    ab_part = torch.empty((B, n_chunks, 2), dtype=acc, device=dev)
    part = torch.empty((B, n_chunks, C, D), dtype=acc, device=dev)
    part_w = torch.empty((B, n_chunks, C), dtype=acc, device=dev)
    _cosine_assign_backward_kernel[(B * n_chunks,)](
        grad_sim, feats, centers, assign, alpha if sigmoid else feats, beta if sigmoid else feats,
        grad_feats, w, t, ab_part, part, part_w,
        M, C, D, max(1, triton.cdiv(D, block_d)), n_chunks, per_chunk,
        *grad_sim.stride(), *feats.stride(), *centers.stride(), *assign.stride(),
        ACC=acc_tl, SIGMOID=sigmoid, PREC=dot_precision(acc), BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=block_d,
        **_dot_opts(acc, feats.device, block_c, chunked=True),
    )
    S = torch.empty((B, C, D), dtype=acc, device=dev)
    T = torch.empty((B, C), dtype=acc, device=dev)
    _finish(part, part_w, None, S, T, acc_tl, add_center=False, divide=False, store_w=True)
    # grad c_j = 1/m_j (S_j - [|c_j| >= eps] T_j c_j / m_j): tiny per-center work, [B, C, D].
    c = centers.to(acc)
    m_raw = torch.linalg.vector_norm(c, dim=-1)
    m = m_raw.clamp_min(EPS)
    T = T * (m_raw >= EPS).to(acc)
    grad_centers = (S - T[..., None] * (c / m[..., None])) / m[..., None]
    ga, gb = _scalar_grads(ab_part, alpha, beta)
    return grad_feats, grad_centers.to(centers.dtype), ga, gb


# ---------------------------------------------------------------------------------------------
# Eq. 3
# ---------------------------------------------------------------------------------------------
def _aggregate_empty(values: Tensor, value_centers: Tensor):
    """M = 0: no point joins any cluster, out_j = vc_j / 1, den_j = 1."""
    B, C, D = value_centers.shape
    out = torch.empty((B, C, D), dtype=values.dtype, device=values.device)
    out.copy_(value_centers)
    den = torch.ones((B, C), dtype=values.dtype, device=values.device)
    return out, den


def cluster_aggregate(values: Tensor, assign: Tensor, sim: Tensor, value_centers: Tensor):
    """Eq. 3 before H': ``out_j = (vc_j + sum_{a_i=j} s_i v_i) / (1 + sum_{a_i=j} s_i)``;
    returns ``(out [B, C, D], den [B, C])`` in the values dtype. Two launches, deterministic."""
    B, M, D = values.shape
    C = value_centers.shape[1]
    if B == 0 or M == 0 or C == 0:
        return _aggregate_empty(values, value_centers)
    acc_tl, acc = _acc(values.dtype, value_centers.dtype)
    block_m, block_c, block_d = _block_m(acc), _pow2(C, _MAX_BLOCK_C), _block_d(D, acc)
    n_chunks, per_chunk = _chunking(B, M, block_m)
    part = torch.empty((B, n_chunks, C, D), dtype=acc, device=values.device)
    part_w = torch.empty((B, n_chunks, C), dtype=acc, device=values.device)
    _cluster_partial_kernel[(B * n_chunks,)](
        values, assign, sim, part, part_w,
        M, C, D, max(1, triton.cdiv(D, block_d)), n_chunks, per_chunk,
        *values.stride(), *assign.stride(), *sim.stride(),
        ACC=acc_tl, W_NATIVE=_half_dot(values.dtype, sim.dtype), PREC=dot_precision(acc),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=block_d,
        **_dot_opts(acc, values.device, block_c, chunked=True),
    )
    out = torch.empty((B, C, D), dtype=values.dtype, device=values.device)
    den = torch.empty((B, C), dtype=values.dtype, device=values.device)
    _finish(part, part_w, value_centers, out, den, acc_tl, add_center=True, divide=True, store_w=False)
    return out, den


def cluster_aggregate_backward(grad_out: Tensor, values: Tensor, assign: Tensor, sim: Tensor, out: Tensor, den: Tensor):
    """Gradients of :func:`cluster_aggregate` w.r.t. (values, sim, value_centers):
    grad v_i = s_i G_a / den_a, grad s_i = G_a . (v_i - out_a) / den_a (one per-point launch, no
    races), grad vc_j = G_j / den_j (per-center torch)."""
    B, M, D = values.shape
    C = out.shape[1]
    acc_tl, acc = _acc(values.dtype, out.dtype)
    grad_vc = (grad_out.to(acc) / den.to(acc)[..., None]).to(out.dtype)
    grad_values = torch.empty((B, M, D), dtype=values.dtype, device=values.device)
    grad_sim = torch.empty((B, M), dtype=sim.dtype, device=values.device)
    if B == 0 or M == 0:
        return grad_values, grad_sim, grad_vc
    block_m, block_d = _block_m(acc), _block_d(D, acc)
    _cluster_aggregate_backward_kernel[(B * triton.cdiv(M, block_m),)](
        grad_out, values, assign, sim, out, den, grad_values, grad_sim,
        M, C, D,
        *grad_out.stride(), *values.stride(), *assign.stride(), *sim.stride(), *out.stride(), *den.stride(),
        ACC=acc_tl, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=_NUM_WARPS_POINT, num_stages=_NUM_STAGES,
    )
    return grad_values, grad_sim, grad_vc


# ---------------------------------------------------------------------------------------------
# Eq. 2 + Eq. 3 fused
# ---------------------------------------------------------------------------------------------
def superpixel_cluster(feats: Tensor, centers: Tensor, values: Tensor, value_centers: Tensor,
                       alpha: Optional[Tensor] = None, beta: Optional[Tensor] = None):
    """Eq. 2 + Eq. 3: ``(out [B, C, Dv], den [B, C], assign [B, M], sim [B, M])``, equal to
    :func:`cosine_assign` then :func:`cluster_aggregate`. One launch over the points (assign,
    then the chunk's partial cluster sums) plus the small finish kernel."""
    sigmoid = alpha is not None  # the op layer checked that alpha and beta come together
    B, M, D = feats.shape
    C = centers.shape[1]
    DV = values.shape[2]
    dev = feats.device
    assign = torch.empty((B, M), dtype=torch.int64, device=dev)
    sim = torch.empty((B, M), dtype=feats.dtype, device=dev)
    if B == 0 or M == 0:
        return (*_aggregate_empty(values, value_centers), assign, sim)
    if C == 0:
        raise ValueError("superpixel_cluster needs at least one center (C >= 1)")
    acc_tl, acc = _acc(feats.dtype, centers.dtype, values.dtype, value_centers.dtype)
    block_m, block_c = _block_m(acc), _pow2(C, _MAX_BLOCK_C)
    block_d, block_dv = _block_d(D, acc), _block_d(DV, acc)
    n_chunks, per_chunk = _chunking(B, M, block_m)
    part = torch.empty((B, n_chunks, C, DV), dtype=acc, device=dev)
    part_w = torch.empty((B, n_chunks, C), dtype=acc, device=dev)
    _superpixel_kernel[(B * n_chunks,)](
        feats, centers, values, alpha if sigmoid else feats, beta if sigmoid else feats, assign, sim, part, part_w,
        M, C, D, DV, max(1, triton.cdiv(DV, block_dv)), n_chunks, per_chunk,
        *feats.stride(), *centers.stride(), *values.stride(),
        ACC=acc_tl, SIGMOID=sigmoid, DOT_NATIVE=_half_dot(feats.dtype, centers.dtype),
        W_NATIVE=_half_dot(values.dtype, sim.dtype), PREC=dot_precision(acc),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_DV=block_dv,
        **_dot_opts(acc, feats.device, block_c, chunked=True),
    )
    out = torch.empty((B, C, DV), dtype=values.dtype, device=dev)
    den = torch.empty((B, C), dtype=values.dtype, device=dev)
    _finish(part, part_w, value_centers, out, den, acc_tl, add_center=True, divide=True, store_w=False)
    return out, den, assign, sim


# ---------------------------------------------------------------------------------------------
# Eq. 9
# ---------------------------------------------------------------------------------------------
def cluster_dispatch(center_out: Tensor, assign: Tensor, sim: Tensor, residual: Optional[Tensor] = None):
    """Eq. 9: ``out_i = residual_i + sim_i * center_out[assign_i]``, ``[B, M, D]``. One launch."""
    B, C, D = center_out.shape
    M = assign.shape[1]
    out = torch.empty((B, M, D), dtype=center_out.dtype, device=center_out.device)
    if out.numel() == 0:
        return out
    acc_tl, acc = _acc(center_out.dtype)
    block_m, block_d = _block_m(acc), _block_d(D, acc)
    has_res = residual is not None
    r = residual if has_res else center_out
    _cluster_dispatch_kernel[(B * triton.cdiv(M, block_m), triton.cdiv(D, block_d))](
        center_out, assign, sim, r, out,
        M, C, D,
        *center_out.stride(), *assign.stride(), *sim.stride(), *(r.stride() if has_res else (0, 0, 0)),
        ACC=acc_tl, HAS_RESIDUAL=has_res, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=_NUM_WARPS_POINT,
    )
    return out


def cluster_dispatch_backward(grad_out: Tensor, center_out: Tensor, assign: Tensor, sim: Tensor, has_residual: bool):
    """Gradients of :func:`cluster_dispatch` w.r.t. (center_out, sim, residual or None):
    grad s_i = G_i . center_out_a (per point), grad center_out_j = sum_{a_i=j} s_i G_i
    (deterministic cluster sum: one launch over chunks + finish), grad r = G (a copy, only when
    has_residual: autograd passes False and uses grad_out itself as the residual's gradient)."""
    B, C, D = center_out.shape
    M = assign.shape[1]
    dev = center_out.device
    grad_residual = grad_out.clone() if has_residual else None
    grad_sim = torch.empty((B, M), dtype=sim.dtype, device=dev)
    if B == 0 or M == 0 or C == 0:
        return torch.zeros((B, C, D), dtype=center_out.dtype, device=dev), grad_sim, grad_residual
    acc_tl, acc = _acc(center_out.dtype, grad_out.dtype)
    block_m, block_c, block_d = _block_m(acc), _pow2(C, _MAX_BLOCK_C), _block_d(D, acc)
    n_chunks, per_chunk = _chunking(B, M, block_m)
    part = torch.empty((B, n_chunks, C, D), dtype=acc, device=dev)
    _cluster_dispatch_backward_kernel[(B * n_chunks,)](
        grad_out, center_out, assign, sim, grad_sim, part,
        M, C, D, max(1, triton.cdiv(D, block_d)), n_chunks, per_chunk,
        *grad_out.stride(), *center_out.stride(), *assign.stride(), *sim.stride(),
        ACC=acc_tl, W_NATIVE=_half_dot(grad_out.dtype, sim.dtype), PREC=dot_precision(acc),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=block_d,
        **_dot_opts(acc, center_out.device, block_c, chunked=True),
    )
    grad_center = torch.empty((B, C, D), dtype=center_out.dtype, device=dev)
    _finish(part, None, None, grad_center, None, acc_tl, add_center=False, divide=False, store_w=False)
    return grad_center, grad_sim, grad_residual
