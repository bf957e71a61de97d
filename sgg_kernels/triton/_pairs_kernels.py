"""Triton kernels of pairwise_edge_fusion (LinkNet, NeurIPS'18, Eq. 12-14).

The launchers live in :mod:`sgg_kernels.triton.pairs`; this module holds only ``@triton.jit``
code. Notation: ``subj``/``obj`` ``[K, D]`` (row strides ``s_sk``/``s_ok``, column stride 1: they
may be the two halves of one ``[K, 2D]`` tensor), ``union`` ``[P, Du]`` (row stride ``s_up``),
``pairs`` ``[P, 2]``, ``weight`` ``[C, D]``, ``grad`` ``[P, C]``, and

    g_p = subj[s_p] * obj[o_p] * u_p     (u_p = union_p on the first Du dims, 1 beyond)
    dg_p = G_p W                          (G = grad; the gradient of g_p)

or, with the constexpr ``SUM`` (the sum form of Scene-Graph-Benchmark's predictors, see
:mod:`sgg_kernels.reference.pairs`), g_p = (subj[s_p] + obj[o_p]) * u_p. The same kernels serve
both forms; ``SUM`` changes only how the two gathered rows combine and, in the backward, which
factors multiply dg (d subj = d obj = dg * u; d union = dg * (subj + obj)).

Two helpers carry the math and are shared by every kernel:

- :func:`_fused_tile`: the ``[BLOCK_P, BLOCK_D]`` tile of g for a tile of pairs (the gather-
  multiply prologue); g is never stored, the backward recomputes it.
- :func:`_dg_tile`: the ``[BLOCK_P, BLOCK_D]`` tile of dg, a dot over C blocks.

A pair is *valid* when both indices lie in ``[0, K)``; an invalid pair's rows are never read
(masked loads), its g is 0 (its logits are the bias) and its gradient row G_p reaches d bias
only (the reference's rule).

dtype conventions (as the cluster kernels): every load is converted to ACC (float32, or float64
for float64 inputs) before arithmetic; outputs are stored with ``.to(ptr.dtype.element_ty)``;
ACC dots pass ``input_precision=PREC`` (:func:`sgg_kernels.set_precision`: ``"tf32x3"`` on a GPU by
default, ``"ieee"`` for float64 and under the interpreter; plain TF32 keeps 10 mantissa bits); with
``DOT_NATIVE`` (fp16/bf16 on a GPU) the dot operands are cast to the input dtype and accumulate
in float32. Row indices are int64 before they meet a stride.

Floors (each kernel's docstring): the numbers of :mod:`sgg_kernels.bench.floors` (``fusion_floor``)
and benchmarks/NOTES.md, arithmetic only, never measured. e = 4 (float32), int64 pairs; MiB = 2^20
bytes (floors.py's "MB"); times at the H100 datasheet's 3.35 TB/s, tf32x3 ~165 TFLOP/s. Sizes
(bench/cases/pairs.py, subj/obj the halves of E1 [K, 2D], Du = D, with bias): paper K = 100,
P = 2,400, D = 4,096, C = 51; sgdet K = 320, P = 25,280. fp32 geometry (triton/pairs.py): BLOCK_C 64
(C = 51 padded: 64/51 of the dot FLOPs), BLOCK_D 32, BLOCK_P 64 (forward) / 32 (d weight) / 16
(d subj, d obj, d union).
The op's backward floor, and what the four backward launches move in all: triton/pairs.py.
"""
from __future__ import annotations

import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, NATIVE: tl.constexpr, LOW: tl.constexpr, PREC: tl.constexpr):
    """``acc + a @ b``: operands in LOW (fp16/bf16, exact products) when NATIVE, else in acc's
    dtype with ``input_precision=PREC``."""
    if NATIVE:
        acc = tl.dot(a.to(LOW), b.to(LOW), acc, out_dtype=acc.dtype)
    else:
        acc = tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, input_precision=PREC, out_dtype=acc.dtype)
    return acc


@triton.jit
def _load_pairs(pairs_ptr, offs_p, mask_p, s_pp, s_pc, K):
    """``(valid, s, o)`` for a tile of pairs (int64): valid when both indices lie in [0, K);
    invalid (and padded) entries get the safe index 0 and must be masked by the caller."""
    s = tl.load(pairs_ptr + offs_p * s_pp, mask=mask_p, other=-1).to(tl.int64)
    o = tl.load(pairs_ptr + offs_p * s_pp + s_pc, mask=mask_p, other=-1).to(tl.int64)
    valid = mask_p & (s >= 0) & (s < K) & (o >= 0) & (o < K)
    return valid, tl.where(valid, s, 0), tl.where(valid, o, 0)


@triton.jit
def _load_union(union_ptr, rows, row_mask, offs_d, DU, s_up, ACC: tl.constexpr):
    """u for the tile: ``union[rows, d]`` where d < Du, 1 beyond (and in masked rows)."""
    ptrs = union_ptr + rows[:, None] * s_up + offs_d[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & (offs_d < DU)[None, :], other=1.0).to(ACC)


@triton.jit
def _load_rows(ptr, rows, row_mask, offs_d, mask_d, s_row, ACC: tl.constexpr):
    """``x[rows, offs_d]`` of a row-strided ``[*, D]`` tensor as ACC (masked -> 0)."""
    ptrs = ptr + rows[:, None] * s_row + offs_d[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & mask_d[None, :], other=0.0).to(ACC)


@triton.jit
def _fused_tile(subj_ptr, obj_ptr, union_ptr, offs_p, valid, s, o, offs_d, mask_d, DU, s_sk, s_ok, s_up,
                ACC: tl.constexpr, HAS_UNION: tl.constexpr, SUM: tl.constexpr):
    """g = subj[s] * obj[o] * u (SUM: (subj[s] + obj[o]) * u), ``[BLOCK_P, BLOCK_D]`` in ACC; 0 in
    invalid rows and d >= D (masked loads give 0 to both rows; same order as the reference:
    (subj * obj) * u, (subj + obj) * u)."""
    if SUM:
        g = _load_rows(subj_ptr, s, valid, offs_d, mask_d, s_sk, ACC) + _load_rows(obj_ptr, o, valid, offs_d, mask_d, s_ok, ACC)
    else:
        g = _load_rows(subj_ptr, s, valid, offs_d, mask_d, s_sk, ACC) * _load_rows(obj_ptr, o, valid, offs_d, mask_d, s_ok, ACC)
    if HAS_UNION:
        g = g * _load_union(union_ptr, offs_p, valid, offs_d, DU, s_up, ACC)
    return g


@triton.jit
def _dg_tile(grad_ptr, weight_ptr, rows, row_mask, offs_d, mask_d, C, s_gp, s_gc, s_wc,
             ACC: tl.constexpr, NATIVE: tl.constexpr, PREC: tl.constexpr, BLOCK_C: tl.constexpr):
    """dg = G[rows] W[:, offs_d], ``[len(rows), BLOCK_D]`` in ACC, a dot over C blocks; rows with
    ``row_mask`` False count as G = 0."""
    offs_cb = tl.arange(0, BLOCK_C)
    dg = tl.zeros([rows.shape[0], offs_d.shape[0]], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + offs_cb
        mask_c = offs_c < C
        G = tl.load(grad_ptr + rows[:, None] * s_gp + offs_c[None, :] * s_gc,
                    mask=row_mask[:, None] & mask_c[None, :], other=0.0)
        W = tl.load(weight_ptr + offs_c[:, None] * s_wc + offs_d[None, :],
                    mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        dg = _dot(G, W, dg, NATIVE, weight_ptr.dtype.element_ty, PREC)
    return dg


# ---------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fusion_forward_kernel(
    subj_ptr, obj_ptr, union_ptr, pairs_ptr, weight_ptr, bias_ptr, out_ptr,
    P, K, C, D, DU, D_PER_SPLIT,
    s_sk, s_ok, s_up, s_pp, s_pc, s_wc,
    ACC: tl.constexpr, HAS_UNION: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_NATIVE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, SUM: tl.constexpr,
):
    """Eq. 12-14: out[p, c] = sum_d g[p, d] W[c, d] + bias[c], a GEMM with a gather-multiply
    (SUM: gather-add-multiply) prologue. Grid ``(cdiv(P, BLOCK_P), cdiv(C, BLOCK_C), n_splits)``; split k sums
    d in ``[k D_PER_SPLIT, (k + 1) D_PER_SPLIT)`` (a multiple of BLOCK_D) and stores its
    ``[P, C]`` slice of ``out`` (contiguous ``[n_splits, P, C]``: the logits when n_splits = 1,
    else ACC partials the launcher sums in a fixed order). Each program loops over its D range in
    BLOCK_D chunks: g tile (:func:`_fused_tile`) times the ``[BLOCK_D, BLOCK_C]`` tile of W^T
    (loaded transposed), accumulated in ACC.

    Floor: E1 (subj, obj), union, pairs, weight, bias read once, logits written once:
    (2 K D + P Du + C D + C + P C) e + 16 P bytes; 2 P C D + P (D + Du) + P C FLOPs. paper: 41.9 MiB
    (union 37.5), 1.02 GFLOP; sgdet: 411 MiB (union 395), 10.8 GFLOP. Bound: memory (13 / 129 us;
    the tf32x3 dots 6.2 / 65 us: 23-25 FLOP/B against a ~49 FLOP/B ridge). This kernel: union read
    once; subj/obj rows gathered per pair and W re-read per pair tile, from L2 (E1 3.1 / 10 MiB);
    1.27 / 13.2 GFLOP executed (C padded: 7.7 / 80 us); the D splits (paper 13, sgdet 2) add ACC
    partials n P C (6.1 / 9.8 MiB, written, summed by torch): ~1.3x the floor's bytes at paper
    (with E1 and W from L2), ~1x at sgdet."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    mask_p = offs_p < P
    mask_c = offs_c < C
    valid, s, o = _load_pairs(pairs_ptr, offs_p, mask_p, s_pp, s_pc, K)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    d_lo = split * D_PER_SPLIT
    d_hi = tl.minimum(d_lo + D_PER_SPLIT, D)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d_hi
        g = _fused_tile(subj_ptr, obj_ptr, union_ptr, offs_p, valid, s, o, offs_d, mask_d, DU, s_sk, s_ok, s_up,
                        ACC, HAS_UNION, SUM)
        wt = tl.load(weight_ptr + offs_c[None, :] * s_wc + offs_d[:, None],
                     mask=mask_d[:, None] & mask_c[None, :], other=0.0)
        acc = _dot(g, wt, acc, DOT_NATIVE, weight_ptr.dtype.element_ty, PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
    out_ptrs = out_ptr + (split * P + offs_p[:, None]) * C + offs_c[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _fusion_dweight_kernel(
    grad_ptr, subj_ptr, obj_ptr, union_ptr, pairs_ptr, part_ptr, part_b_ptr,
    P, K, C, D, DU, TILES_PER_CHUNK,
    s_gp, s_gc, s_sk, s_ok, s_up, s_pp, s_pc,
    ACC: tl.constexpr, HAS_UNION: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_NATIVE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, SUM: tl.constexpr,
):
    """Partial d weight (and d bias) of one chunk of pair tiles (either form: g from
    :func:`_fused_tile`). Grid ``(max(1, cdiv(D, BLOCK_D)),
    n_chunks)``; chunk k owns tiles ``[k TILES_PER_CHUNK, (k + 1) TILES_PER_CHUNK)``:

        part[k, c, d] = sum_{p in chunk k, valid} G[p, c] g[p, d]   (tl.dot(G^T, g), g recomputed)
        part_b[k, c]  = sum_{p in chunk k} G[p, c]                    (HAS_BIAS, written by D block 0)

    (an invalid pair's logits are the bias alone, so its G row still counts in d bias). ``part`` ``[n_chunks, C, D]`` and ``part_b`` ``[n_chunks, C]`` are
    contiguous ACC buffers, fully written (zeros for an empty chunk); the launcher sums them over
    chunks in a fixed order (deterministic, no atomics).

    Floor share: d weight and d bias written once (C (D + 1) e, 0.8 MiB); 2 P C D (d W) + P C
    (d bias) + P (D + Du) (g recomputed) FLOPs. This kernel: union read once (the floor's one
    read of it), subj/obj rows gathered from L2, G re-read by each of the D / 32 = 128 D blocks
    (L2: 60 / 630 MiB of L2 reads), 4 chunks of partials (3.2 MiB, summed by torch); its dot
    executes 2 P 64 D = 1.26 / 13.3 GFLOP (7.6 / 80 us at tf32x3): memory-bound on union.
    """
    pid_d = tl.program_id(0)
    chunk = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lo = chunk * TILES_PER_CHUNK
    hi = tl.minimum(lo + TILES_PER_CHUNK, tl.cdiv(P, BLOCK_P))
    offs_pb = tl.arange(0, BLOCK_P)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
        acc_b = tl.zeros([BLOCK_C], dtype=ACC)
        for t in range(lo, hi):
            offs_p = t * BLOCK_P + offs_pb
            mask_p = offs_p < P
            valid, s, o = _load_pairs(pairs_ptr, offs_p, mask_p, s_pp, s_pc, K)
            g = _fused_tile(subj_ptr, obj_ptr, union_ptr, offs_p, valid, s, o, offs_d, mask_d, DU, s_sk, s_ok, s_up,
                            ACC, HAS_UNION, SUM)
            # G^T loaded transposed, [BLOCK_C, BLOCK_P]; every pair's row reaches the bias
            gt = tl.load(grad_ptr + offs_p[None, :] * s_gp + offs_c[:, None] * s_gc,
                         mask=mask_p[None, :] & mask_c[:, None], other=0.0)
            if HAS_BIAS:
                acc_b += tl.sum(gt.to(ACC), axis=1)
            gt = tl.where(valid[None, :], gt, 0.0)  # only valid pairs' rows reach W
            acc = _dot(gt, g, acc, DOT_NATIVE, grad_ptr.dtype.element_ty, PREC)
        p_ptrs = part_ptr + (chunk * C + offs_c[:, None]) * D + offs_d[None, :]
        tl.store(p_ptrs, acc, mask=mask_c[:, None] & mask_d[None, :])
        if HAS_BIAS:
            # a uniform branch, not `mask_c & (pid_d == 0)`: triton 3.9's interpreter refuses a block
            # mask and-ed with a scalar condition (it becomes an int mask)
            if pid_d == 0:
                tl.store(part_b_ptr + chunk * C + offs_c, acc_b, mask=mask_c)


@triton.jit
def _fusion_drows_kernel(
    grad_ptr, other_ptr, union_ptr, pairs_ptr, weight_ptr, order_ptr, offsets_ptr, out_ptr,
    C, D, DU,
    s_gp, s_gc, s_xk, s_up, s_pp, s_pc, s_wc,
    OTHER_COL: tl.constexpr, ACC: tl.constexpr, HAS_UNION: tl.constexpr, DOT_NATIVE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, SUM: tl.constexpr,
):
    """d subj (OTHER_COL = 1, ``other`` = obj) or d obj (OTHER_COL = 0, ``other`` = subj):

        out[k] = sum_{p: self_p = k} dg_p * other[other_p] * u_p
        (SUM: out[k] = sum_{p: self_p = k} dg_p * u_p; ``other`` is then never read)

    from a CSR of the valid pairs by their "self" index: pairs ``order[offsets[k]:offsets[k+1]]``
    (ascending p: the launcher's stable sort). Grid ``(K, cdiv(D, BLOCK_D))``; each program loops
    over its row's pairs in BLOCK_P steps, sums, and stores its ``out [K, D]`` block once (every
    row and column is written, zeros for a row without pairs; no atomics).

    Floor share (per launch): d subj (or d obj) written once (K D e: 1.6 / 5 MiB); P (D + Du)
    multiplies + P D adds. This kernel also reads union once per launch (the floor reads it once in
    the whole backward: each of the two launches adds 1x the floor on union, 37.5 / 395 MiB),
    gathers the other rows from L2, re-reads G rows and W blocks per (row, D block) from L2, and
    recomputes dg = G W (the floor counts it once): pairs in steps of 16 (fp32; 24 / 79 per row)
    and C padded, 1.68 / 13.4 GFLOP per launch (10 / 81 us at tf32x3): memory-bound on union.
    """
    k = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(offsets_ptr + k)
    end = tl.load(offsets_ptr + k + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        idx = p0 + tl.arange(0, BLOCK_P)
        m = idx < end
        pair = tl.load(order_ptr + idx, mask=m, other=0).to(tl.int64)
        dg = _dg_tile(grad_ptr, weight_ptr, pair, m, offs_d, mask_d, C, s_gp, s_gc, s_wc, ACC, DOT_NATIVE, PREC, BLOCK_C)
        if SUM:
            t = dg
        else:
            other = tl.load(pairs_ptr + pair * s_pp + OTHER_COL * s_pc, mask=m, other=0).to(tl.int64)
            t = dg * _load_rows(other_ptr, other, m, offs_d, mask_d, s_xk, ACC)
        if HAS_UNION:
            t = t * _load_union(union_ptr, pair, m, offs_d, DU, s_up, ACC)
        acc += tl.sum(t, axis=0)
    tl.store(out_ptr + k * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _fusion_dunion_kernel(
    grad_ptr, subj_ptr, obj_ptr, pairs_ptr, weight_ptr, out_ptr,
    P, K, C, DU,
    s_gp, s_gc, s_sk, s_ok, s_pp, s_pc, s_wc,
    ACC: tl.constexpr, DOT_NATIVE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, SUM: tl.constexpr,
):
    """d union_p = (dg_p * subj[s_p] * obj[o_p])[:Du] (SUM: (dg_p * (subj[s_p] + obj[o_p]))[:Du]; 0 for
    invalid pairs). Grid
    ``(cdiv(P, BLOCK_P), cdiv(Du, BLOCK_D))``; ``out`` contiguous ``[P, Du]``.

    Floor share: d union written once (P Du e: 37.5 / 395 MiB, ~half the backward's floor); P Du
    multiplies (2 P Du here: subj * obj is not shared with a g recompute). This kernel: no union
    read; subj/obj rows gathered, G and W re-read per program, from L2; dg recomputed here too,
    2 P 64 Du = 1.26 / 13.3 GFLOP (7.6 / 80 us at tf32x3 against ~12 / 124 us of writing
    d union): memory-bound, ~1x the floor on what it writes."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < P
    mask_d = offs_d < DU
    valid, s, o = _load_pairs(pairs_ptr, offs_p, mask_p, s_pp, s_pc, K)
    # dg over the padded tile, invalid rows zeroed after the dot (masking the G load with `valid`
    # instead trips a layout-propagation bug of triton 3.6's sm_90 pipeline on the shared select)
    dg = _dg_tile(grad_ptr, weight_ptr, offs_p, mask_p, offs_d, mask_d, C, s_gp, s_gc, s_wc, ACC, DOT_NATIVE, PREC, BLOCK_C)
    if SUM:
        du = dg * (_load_rows(subj_ptr, s, valid, offs_d, mask_d, s_sk, ACC)
                   + _load_rows(obj_ptr, o, valid, offs_d, mask_d, s_ok, ACC))
    else:
        du = dg * _load_rows(subj_ptr, s, valid, offs_d, mask_d, s_sk, ACC) * _load_rows(obj_ptr, o, valid, offs_d, mask_d, s_ok, ACC)
    du = tl.where(valid[:, None], du, 0.0)
    tl.store(out_ptr + offs_p[:, None] * DU + offs_d[None, :], du.to(out_ptr.dtype.element_ty),
             mask=mask_p[:, None] & mask_d[None, :])
