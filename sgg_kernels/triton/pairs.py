"""Triton backend of pairwise_edge_fusion (LinkNet, NeurIPS'18, Eq. 12-14).

Same functions, signatures, outputs and output dtypes as :mod:`sgg_kernels.reference.pairs`
(the spec; its module docstring gives the backward formulas). The ``@triton.jit`` code is in
:mod:`sgg_kernels.triton._pairs_kernels`; these are the plain-Python launchers that the op layer
(:mod:`sgg_kernels.ops.pairs`) calls inside its ``torch.library`` custom ops.

Design (``subj``/``obj`` ``[K, D]``, ``union`` ``[P, Du]``, ``weight`` ``[C, D]``; g_p =
subj[s_p] * obj[o_p] * u_p is never materialised, every kernel recomputes its tiles):

    function                        kernel    grid                              scratch (ACC dtype)
    pairwise_edge_fusion            forward   (P tiles, C blocks)               -
    pairwise_edge_fusion_backward   dweight   (D blocks, chunks of P tiles)     [chunks, C, D + 1]
                                    drows x2  (K, D blocks), CSR by s / by o    order, offsets (int64)
                                    dunion    (P tiles, Du blocks)              -

The forward is a GEMM with a gather-multiply prologue (one ``[BLOCK_P, BLOCK_D]`` g tile at a
time). The backward is deterministic, with no float atomics: d weight / d bias are per-chunk
partials summed by torch over the chunk axis (chunking depends on the shapes only: it targets 2
waves of an H100's 132 SMs, not the device present); d subj / d obj gather each row's pairs
from a CSR built with a stable sort (on-device, no host sync), so every output row is written by
one program in ascending pair order; d union is per pair. dg = G W (P C D multiply-adds) is
computed by each of the three gradient kernels that need it: 3 P C D multiply-adds where a stored
dg would cost P C D, against a [P, D] buffer (written once, read three times) saved.

Floors (bench/floors.py ``fusion_floor``, benchmarks/NOTES.md; float32, MiB = 2^20 B, H100
datasheet 3.35 TB/s and tf32x3 ~165 TFLOP/s; arithmetic, not measured). The forward's: see
``_fusion_forward_kernel``. The backward's, for the whole op: G [P, C], E1 [K, 2D], union, pairs,
weight read once; d E1, d union, d weight, d bias written once: (P C + 4 K D + 2 P Du + 2 C D + C) e
+ 16 P bytes; 4 P C D + P C + 3 P (D + Du) + 2 P D + P Du FLOPs. paper (K = 100, P = 2,400,
D = Du = 4,096, C = 51): 83.4 MiB, 2.09 GFLOP; sgdet (K = 320, P = 25,280): 817 MiB, 22.1 GFLOP.
Bound: memory (26 / 256 us; dots 13 / 134 us). These four launches read union three times (d
weight, d subj, d obj each recompute g): ~2x the floor's bytes (163 / 1,612 MiB: 51 / 504 us);
dg thrice, padded C and pair steps: 5.9 / 58.7 GFLOP executed (36 / 356 us at tf32x3), so still
memory-bound on an H100, about balanced at sgdet on an H200 (4.8 TB/s: 352 us of memory). Each
kernel's docstring gives its share.

The sum form (``sum_mode``, g_p = (subj[s_p] + obj[o_p]) * u_p: Scene-Graph-Benchmark's Motifs /
VCTree / Transformer predictors) runs the same four kernels with the constexpr ``SUM``: the same
grids and tiles; d subj / d obj then gather no rows of the other tensor (dg * u only: one
[BLOCK_P, BLOCK_D] load and multiply fewer per step), and every sum variant compiles without
spills at no more registers than its product twin (check_triton_compile.py). Its floor
(bench/floors.py ``fusion_floor(mode="sum")``) differs from the product's in backward FLOPs only.

Pairs with an index outside ``[0, K)`` are never read: their g is 0 (logits = bias), so their
gradient reaches d bias and nothing else. Empty inputs (P = 0, K = 0, C = 0) launch nothing empty.

fp16/bf16 inputs run their dots on fp16/bf16 operands with fp32 accumulation (``DOT_NATIVE``)
on a GPU only; the interpreter (bf16 dots are wrong there) takes the fp32 path. float64 inputs
accumulate and dot in float64. Tuning knobs are module globals (``_BLOCK_P``, ``_MAX_BLOCK_D``,
...) so tests can shrink the blocks to exercise multi-block paths in the interpreter.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import dot_precision
from ._geometry import register_cap, split_work
from ._pairs_kernels import (
    _fusion_drows_kernel,
    _fusion_dunion_kernel,
    _fusion_dweight_kernel,
    _fusion_forward_kernel,
)

# ---------------------------------------------------------------------------------------------
# Configuration: one fixed config (the interpreter cannot autotune), chosen by compiling every
# kernel for sm_90 with ptxas at the benchmark sizes (K = 100, P = 2,400 and K = 320, P = 25,280;
# D = Du = 4096, C = 51): the largest tiles that compile without register spills. With 4 warps,
# d weight spilled 0.3-0.6 KB per thread (fp32 FMA dot over 64 pairs) and the odd-size forward
# 0.1-0.2 KB; 8 warps, a 32-pair reduction in the FMA d weight and no software pipelining of the
# d weight / CSR loops remove every spill at these sizes.
# ---------------------------------------------------------------------------------------------
_BLOCK_P = 64  # pairs per tile: forward, d weight, d union
_BLOCK_P_ROWS = 16  # pairs per step of one row's CSR list (d subj / d obj): ~24-80 pairs per box;
# fp32 at 32 took 249-253 registers at 8 warps (1 CTA/SM), at 16 with 4 warps 135-165 (3 CTAs/SM)
_BLOCK_P_ROWS_NATIVE = 16  # fp16/bf16: 32 spilled 16 B on sm_80 (fp32 spills at 16 instead)
_MAX_BLOCK_C = 64  # C = 51 is one block
_MAX_BLOCK_D = 64
_BLOCK_P_FP64 = 32  # fp64 tiles are twice the bytes
_BLOCK_P_DUNION_FMA = 16  # fp32/fp64 d union: 64 spilled 32 B on sm_80 (tf32x3 on mma.sync); 32 took
# 254 registers at 8 warps (1 CTA/SM) and spilled 60 B at 4; 16 at 4 warps: 128 (4 CTAs/SM)
_BLOCK_P_DWEIGHT_NATIVE = 32  # fp16/bf16 d weight under the 128-register cap (sm_90): 64 spilled 8 B there
_BLOCK_P_DWEIGHT_FMA = 32  # d weight's dot reduces over pairs: a shorter reduction for the FMA (fp32/fp64) dot
_MAX_BLOCK_D_FP64 = 32
_MAX_BLOCK_D_FP32 = 32  # fp32 tf32x3 dots hold each operand as two TF32 halves: BLOCK_D = 64 spilled at C < 32
_BLOCK_D_DWEIGHT_FP64 = 16  # fp64 d weight spilled 16 B at BLOCK_D = 32
_NUM_WARPS = 8  # forward and d weight (GEMM tiles)
_NUM_WARPS_GATHER = 4  # d subj/obj, fp32/fp64 d union: small dg tiles per program, many programs
# (fp16/bf16 d union keeps 8: its 64-pair tile spilled 116-348 B at 4 warps at odd sizes)
_MAXNREG_FORWARD = 128  # fp32 forward: 130-136 registers at 8 warps held it to 1 CTA/SM; 128 -> 2, no spill
_MAXNREG_DWEIGHT = 128  # d weight: fp16/bf16 took 170-206 registers at 8 warps (1 CTA/SM)
_NUM_STAGES = 2  # forward and d union
_NUM_STAGES_LOOP = 1  # d weight and d subj/obj: their pipelined variants spilled
# Resident CTAs per SM of the sm_90 compiles (check_triton_compile.py), which set the waves the
# split reductions fill (_geometry.split_work); constants, so the splits depend on shapes only.
# forward: fp32 128 registers (capped), fp64 ~110; fp16/bf16 56-96 (2-4 CTAs): the most, so that
# no variant runs under one wave
_CTAS_FORWARD = {"fp32": 2, "native": 4, "fp64": 2}
_CTAS_DWEIGHT = 2  # fp32 111-122 registers at 8 warps
_CTAS_DWEIGHT_NATIVE = 2  # fp16/bf16 122-128 (capped; 170-206 uncapped)
_MIN_TILES_PER_CHUNK = 2  # a chunk's [C, BLOCK_D] partial should cost much less than its g tiles
_MIN_D_PER_SPLIT = 256  # forward split over D: each split reads >= 256 columns of g per pair tile


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _acc(dtype: torch.dtype) -> Tuple[tl.dtype, torch.dtype]:
    """Accumulation dtype: float64 for float64 inputs, else float32 (reference ``_acc_dtype``)."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _pow2(n: int, cap: int) -> int:
    """A block size for extent n: a power of two in [16, cap] (tl.dot needs every dim >= 16)."""
    return max(16, min(triton.next_power_of_2(max(int(n), 1)), cap))


def _blocks(C: int, D: int, acc: torch.dtype, native: bool) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, BLOCK_D) for the pair-tiled kernels."""
    fp64 = acc == torch.float64
    block_p = max(16, _BLOCK_P_FP64 if fp64 else _BLOCK_P)
    cap_d = _MAX_BLOCK_D_FP64 if fp64 else (_MAX_BLOCK_D if native else min(_MAX_BLOCK_D, _MAX_BLOCK_D_FP32))
    return block_p, _pow2(C, _MAX_BLOCK_C), _pow2(D, cap_d)


def _maxnreg(acc: torch.dtype, cap: int, device: torch.device, block_c: int) -> dict:
    """A register cap (:func:`register_cap`: sm_90 only) for fp32 accumulation and full C blocks
    (BLOCK_C = 64, the benchmark sizes: at 16 the capped forward spilled 24 B); fp64, the
    gradcheck dtype, runs uncapped."""
    return register_cap(cap, device) if acc == torch.float32 and block_c == _MAX_BLOCK_C else {}


def _variant(acc: torch.dtype, native: bool) -> str:
    """The key of the CTAs-per-SM tables: "fp64", "native" (fp16/bf16 dots) or "fp32"."""
    return "fp64" if acc == torch.float64 else ("native" if native else "fp32")


def _native(dtype: torch.dtype) -> bool:
    """Whether dots may run on fp16/bf16 operands (fp32 accumulation): on a GPU only."""
    return (not _interpret()) and dtype in (torch.float16, torch.bfloat16)


def _chunking(P: int, block_p: int, n_db: int, native: bool) -> Tuple[int, int]:
    """(n_chunks, tiles_per_chunk) of the d weight grid ``(n_db, n_chunks)``: the split of the
    pair tiles that fills whole waves at the CTAs/SM of the d weight compile (:func:`split_work`;
    paper fp32: 128 D blocks x 4 chunks of 19 tiles = 512 programs), each chunk at least
    _MIN_TILES_PER_CHUNK tiles; a function of the shapes alone."""
    ctas = _CTAS_DWEIGHT_NATIVE if native else _CTAS_DWEIGHT
    return split_work(n_db, triton.cdiv(P, block_p), ctas, _MIN_TILES_PER_CHUNK)


def _union_args(union: Optional[Tensor], like: Tensor) -> Tuple[Tensor, int, int]:
    """(tensor, Du, row stride): a dummy pointer with Du = 0 when there are no union features."""
    if union is None:
        return like, 0, 0
    return union, union.shape[1], union.stride(0)


# ---------------------------------------------------------------------------------------------
# Eq. 12-14
# ---------------------------------------------------------------------------------------------
def pairwise_edge_fusion(subj: Tensor, obj: Tensor, union: Optional[Tensor], pairs: Tensor, weight: Tensor,
                         bias: Optional[Tensor], sum_mode: bool = False) -> Tensor:
    """Eq. 12-14: ``logits [P, C] = g W^T + bias`` with g_p = subj[s_p] * obj[o_p] * u_p (``sum_mode``:
    g_p = (subj[s_p] + obj[o_p]) * u_p), in the input dtype. One launch; never more than a
    ``BLOCK_P x BLOCK_D`` tile of g."""
    K, D = subj.shape
    P, C = pairs.shape[0], weight.shape[0]
    out = torch.empty((P, C), dtype=subj.dtype, device=subj.device)
    if P == 0 or C == 0:
        return out
    acc_tl, acc = _acc(subj.dtype)
    native = _native(subj.dtype)
    block_p, block_c, block_d = _blocks(C, D, acc, native)
    u, du, s_up = _union_args(union, subj)
    has_bias = bias is not None
    tiles = triton.cdiv(P, block_p) * triton.cdiv(C, block_c)
    n_splits, d_per_split = _split_d(tiles, D, block_d, _CTAS_FORWARD[_variant(acc, native)])
    grid = (triton.cdiv(P, block_p), triton.cdiv(C, block_c), n_splits)
    # One split: the logits directly. Several: ACC partials [n_splits, P, C], summed over splits in
    # a fixed order (deterministic) and the bias added once.
    dest = out if n_splits == 1 else torch.empty((n_splits, P, C), dtype=acc, device=subj.device)
    _fusion_forward_kernel[grid](
        subj, obj, u, pairs, weight, bias if has_bias else weight, dest,
        P, K, C, D, du, d_per_split,
        subj.stride(0), obj.stride(0), s_up, *pairs.stride(), weight.stride(0),
        ACC=acc_tl, HAS_UNION=union is not None, HAS_BIAS=has_bias and n_splits == 1, DOT_NATIVE=native,
        PREC=dot_precision(acc), BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_D=block_d, SUM=bool(sum_mode),
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES, **_maxnreg(acc, 0 if native else _MAXNREG_FORWARD, subj.device, block_c),
    )
    if n_splits > 1:
        logits = dest.sum(dim=0)
        if has_bias:
            logits += bias.to(acc)
        out.copy_(logits)
    return out


def _split_d(tiles: int, D: int, block_d: int, ctas: int) -> Tuple[int, int]:
    """(n_splits, d_per_split) of the forward's reduction over D: the split that fills whole waves
    at ``ctas`` CTAs/SM (:func:`split_work`; paper fp32: 38 (P, C) tiles x 13 splits of 320
    columns = 494 programs, 1.87 waves: two full rounds; two waves would need 3 rounds, 1.2x
    slower in the model), each split at least _MIN_D_PER_SPLIT wide so its [P, C] partial stays
    small next to the g tiles it reads (paper: 13 x 2,400 x 51 x 4 B = 6.1 MiB written and summed,
    against the 41.9 MiB floor). A function of the shapes alone (determinism)."""
    n_db = max(1, triton.cdiv(D, block_d))
    n, per = split_work(tiles, n_db, ctas, triton.cdiv(_MIN_D_PER_SPLIT, block_d))
    return n, per * block_d


def _csr(key: Tensor, K: int) -> Tuple[Tensor, Tensor]:
    """``(order [P], offsets [K + 1])``: the pairs with key k (in [0, K]; K = invalid, dropped)
    are ``order[offsets[k]:offsets[k + 1]]``, in ascending pair order (stable sort). On-device,
    no host sync (searchsorted on the sorted keys: no atomics either)."""
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(K + 1, dtype=key.dtype, device=key.device)
    return order, torch.searchsorted(sorted_key, bounds)


def pairwise_edge_fusion_backward(grad: Tensor, subj: Tensor, obj: Tensor, union: Optional[Tensor], pairs: Tensor,
                                  weight: Tensor, has_bias: bool, sum_mode: bool = False):
    """``(d subj [K, D], d obj [K, D], d union [P, Du] | empty, d weight [C, D], d bias [C] | empty)``
    of the product form (``sum_mode``: of the sum form), formulas in the reference module docstring. Four launches (d weight + d bias, d subj, d obj,
    d union) plus two stable sorts for the CSRs; deterministic."""
    K, D = subj.shape
    P, C = pairs.shape[0], weight.shape[0]
    dev = subj.device
    acc_tl, acc = _acc(subj.dtype)
    native = _native(subj.dtype)
    block_p, block_c, block_d = _blocks(C, D, acc, native)
    u, du, s_up = _union_args(union, subj)
    has_union = union is not None
    d_subj = torch.empty((K, D), dtype=subj.dtype, device=dev)
    d_obj = torch.empty((K, D), dtype=obj.dtype, device=dev)
    d_union = torch.empty((P, du), dtype=union.dtype, device=dev) if has_union else subj.new_empty((0,))
    if P == 0 or C == 0:
        d_subj.zero_()
        d_obj.zero_()
        d_union.zero_()
        d_weight = torch.zeros((C, D), dtype=weight.dtype, device=dev)
        d_bias = torch.zeros((C,), dtype=weight.dtype, device=dev) if has_bias else subj.new_empty((0,))
        return d_subj, d_obj, d_union, d_weight, d_bias
    s_gp, s_gc = grad.stride()
    s_pp, s_pc = pairs.stride()

    # d weight, d bias: per-chunk partials, summed over chunks by torch (fixed order).
    cap_dw = _maxnreg(acc, _MAXNREG_DWEIGHT, subj.device, block_c)
    # fp16/bf16: 32-pair tiles under the cap (sm_90), 64 uncapped (32 spilled 8-20 B there); the
    # tile only groups the pairs of a chunk's dot, and native dots never run in the interpreter
    block_p_dw = max(16, min(block_p, (_BLOCK_P_DWEIGHT_NATIVE if cap_dw else block_p) if native else _BLOCK_P_DWEIGHT_FMA))
    block_d_dw = min(block_d, _BLOCK_D_DWEIGHT_FP64) if acc == torch.float64 else block_d
    n_db = max(1, triton.cdiv(D, block_d_dw))
    n_chunks, per_chunk = _chunking(P, block_p_dw, n_db, native)
    part = torch.empty((n_chunks, C, D), dtype=acc, device=dev)
    part_b = torch.empty((n_chunks, C), dtype=acc, device=dev) if has_bias else part
    _fusion_dweight_kernel[(n_db, n_chunks)](
        grad, subj, obj, u, pairs, part, part_b,
        P, K, C, D, du, per_chunk,
        s_gp, s_gc, subj.stride(0), obj.stride(0), s_up, s_pp, s_pc,
        ACC=acc_tl, HAS_UNION=has_union, HAS_BIAS=has_bias, DOT_NATIVE=native, PREC=dot_precision(acc),
        BLOCK_P=block_p_dw, BLOCK_C=block_c, BLOCK_D=block_d_dw, SUM=bool(sum_mode),
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES_LOOP, **cap_dw,
    )
    d_weight = part.sum(dim=0).to(weight.dtype)
    d_bias = part_b.sum(dim=0).to(weight.dtype) if has_bias else subj.new_empty((0,))

    # d subj / d obj: CSR of the valid pairs by subject / by object, one program per (row, D block).
    if K > 0 and D > 0:
        s, o = pairs[:, 0], pairs[:, 1]
        valid = (s >= 0) & (s < K) & (o >= 0) & (o < K)
        invalid = torch.full_like(s, K)
        block_rows = max(16, _BLOCK_P_ROWS_NATIVE if native else _BLOCK_P_ROWS)
        for self_col, other, out in ((0, obj, d_subj), (1, subj, d_obj)):
            order, offsets = _csr(torch.where(valid, pairs[:, self_col], invalid), K)
            _fusion_drows_kernel[(K, triton.cdiv(D, block_d))](
                grad, other, u, pairs, weight, order, offsets, out,
                C, D, du,
                s_gp, s_gc, other.stride(0), s_up, s_pp, s_pc, weight.stride(0),
                OTHER_COL=1 - self_col, ACC=acc_tl, HAS_UNION=has_union, DOT_NATIVE=native, PREC=dot_precision(acc),
                BLOCK_P=block_rows, BLOCK_C=block_c, BLOCK_D=block_d, SUM=bool(sum_mode),
                num_warps=_NUM_WARPS_GATHER, num_stages=_NUM_STAGES_LOOP,
            )

    if has_union and du > 0:
        block_p_du = block_p if native else max(16, min(block_p, _BLOCK_P_DUNION_FMA))
        _fusion_dunion_kernel[(triton.cdiv(P, block_p_du), triton.cdiv(du, _pow2(du, block_d)))](
            grad, subj, obj, pairs, weight, d_union,
            P, K, C, du,
            s_gp, s_gc, subj.stride(0), obj.stride(0), s_pp, s_pc, weight.stride(0),
            ACC=acc_tl, DOT_NATIVE=native, PREC=dot_precision(acc),
            BLOCK_P=block_p_du, BLOCK_C=block_c, BLOCK_D=_pow2(du, block_d), SUM=bool(sum_mode),
            num_warps=_NUM_WARPS if native else _NUM_WARPS_GATHER, num_stages=_NUM_STAGES,
        )
    return d_subj, d_obj, d_union, d_weight, d_bias


__all__ = ["pairwise_edge_fusion", "pairwise_edge_fusion_backward"]
