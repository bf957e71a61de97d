"""Triton kernels of the superpixel clustering family (SIL, MM'23, Eq. 2, 3, 9).

The launchers live in :mod:`sgg_kernels.triton.cluster`; this module holds only ``@triton.jit``
code. Three helpers carry the math and are shared by every kernel (no copied kernel bodies):

- :func:`_assign_tile`: Eq. 2 for one tile of points, looping over center blocks and D blocks;
  never more than a ``BLOCK_M x BLOCK_C`` tile of the ``M x C`` similarity exists.
- :func:`_cluster_sum_tile`: the "weighted cluster sum" of Eq. 3 for one tile of points,
  ``acc[c, :] += sum_m w_m 1(a_m = c) v_m`` as one ``tl.dot(W^T, V)``; deterministic (no atomics).
- :func:`_chunk_cluster_sums`: that sum over one program's chunk of points, for every
  (center block, D block), written to a ``[B, n_chunks, C, D]`` partial buffer that
  :func:`_cluster_finish_kernel` reduces over chunks in a fixed order.

dtype conventions (they bite): every load is followed by ``.to(ACC)`` (float32, or float64 for
float64 inputs) before any arithmetic -- bfloat16 arithmetic is wrong in the interpreter and
imprecise on the GPU; outputs are stored with ``.to(ptr.dtype.element_ty)``. A ``tl.dot`` in
ACC passes ``input_precision=PREC``, from :func:`sgg_kernels.set_precision`: ``"tf32x3"`` by
default on a GPU (tensor cores at ~fp32 accuracy; plain TF32 keeps 10 mantissa bits: cosines off
by 1e-3 flip assignments), ``"ieee"`` for float64 and under the interpreter. ``W_NATIVE`` lets a
GPU dot run in float16/bfloat16 when the weights are exactly representable in that dtype (they
were stored in it), so products stay exact.
Index arithmetic: batch, point and center offsets are int64 before they meet a stride (B*M*D
passes 2^31 at the ``sgdet`` size).

Floors (each kernel's docstring): the numbers of :mod:`sgg_kernels.bench.floors` (``FLOORS``) and
benchmarks/NOTES.md, arithmetic only, never measured. e = 4 (float32), int64 assign; MiB = 2^20
bytes (floors.py's "MB"); times at the H100 datasheet's 3.35 TB/s, tf32x3 ~165 TFLOP/s, FMA 67.
Sizes (bench/cases/cluster.py): paper [B, M, D] = [16, 6144, 64], C = 49; sgdet [32, 24576, 64],
C = 81. Launch geometry (triton/cluster.py, fp32): BLOCK_M = 32, BLOCK_D = 16, BLOCK_C = 64 (C = 49
one center block, C = 81 two: the dots run on 64 / 128 padded centers); chunks of 6 tiles x 32
(paper, 48 KiB of a [.., 64] fp32 input) / 46 tiles x 17 (sgdet, 368 KiB).
"""
from __future__ import annotations

import triton
import triton.language as tl

# F.normalize's eps (reference EPS): cos uses max(|x|, EPS) norms. A jit function may read a
# global only if it is a tl.constexpr (the GPU compiler raises NameError; the interpreter does not).
EPS = tl.constexpr(1e-12)


@triton.jit
def _eps_like(x):
    """EPS as a tensor of x's shape and dtype. (``tl.maximum(x, EPS)`` would round the literal to
    float32 first: 9.99999996e-13 in a float64 kernel, a 4e-9 relative error at zero-norm rows,
    whose gradients scale with 1 / EPS.)"""
    return tl.full(x.shape, EPS, x.dtype)


# ---------------------------------------------------------------------------------------------
# Small numeric helpers.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sqrt(x):
    """IEEE square root. ``tl.sqrt`` is the fast approximate one in fp32 on NVIDIA GPUs and
    ``tl.sqrt_rn`` only takes fp32, so pick by dtype."""
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _div(a, b):
    """IEEE division ``a / b`` with broadcasting (fp32 ``/`` is approximate on NVIDIA GPUs;
    ``tl.div_rn`` is fp32-only and does not broadcast)."""
    a, b = tl.broadcast(a, b)
    if a.dtype == tl.float64:
        q = a / b
    else:
        q = tl.div_rn(a, b)
    return q


@triton.jit
def _recip(x):
    """1 / x, IEEE-rounded (see :func:`_div`)."""
    return _div(tl.full(x.shape, 1.0, x.dtype), x)


@triton.jit
def _sigmoid(x):
    """sigmoid(x) = 1 / (1 + exp(-x)), as torch.sigmoid, in the dtype of x."""
    return _recip(1.0 + tl.exp(-x))


@triton.jit
def _load_rows(ptr, b, rows, row_mask, offs_d, mask_d, s_b, s_row, s_d, ACC: tl.constexpr):
    """Load a ``[len(rows), BLOCK_D]`` tile of a strided ``[B, *, D]`` tensor as ACC (masked -> 0).

    ``b`` and ``rows`` are int64 so ``b * s_b + rows * s_row`` cannot overflow int32.
    """
    ptrs = ptr + b * s_b + rows[:, None] * s_row + offs_d[None, :] * s_d
    x = tl.load(ptrs, mask=row_mask[:, None] & mask_d[None, :], other=0.0)
    return x.to(ACC)  # load, then convert: never compute in bf16/fp16


@triton.jit
def _load_assign(assign_ptr, b, offs_m, mask_m, s_ab, s_am, C):
    """``(valid, safe)`` for a tile of points: which assignments lie in [0, C), and the assignment
    with every other entry replaced by 0, so an out-of-range center is never dereferenced."""
    a = tl.load(assign_ptr + b * s_ab + offs_m * s_am, mask=mask_m, other=-1)
    valid = mask_m & (a >= 0) & (a < C)
    return valid, tl.where(valid, a, 0)


@triton.jit
def _load_points(ptr, b, offs_m, mask_m, s_b, s_m, other, ACC: tl.constexpr):
    """Load a ``[BLOCK_M]`` vector of a strided ``[B, M]`` tensor as ACC."""
    return tl.load(ptr + b * s_b + offs_m * s_m, mask=mask_m, other=other).to(ACC)


# ---------------------------------------------------------------------------------------------
# Eq. 2: cosine similarity and argmax over centers, one tile of points.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _assign_tile(
    feats_ptr, centers_ptr, b, offs_m, mask_m, C, D,
    s_fb, s_fm, s_fd, s_cb, s_cc, s_cd,
    alpha, beta,
    ACC: tl.constexpr, SIGMOID: tl.constexpr, DOT_NATIVE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Eq. 2 for the points ``offs_m``: P_i = argmax_j s_ij, sim_i = max_j s_ij, with
    s_ij = cos(F_i, F^c_j) = F_i.F^c_j / (max(|F_i|, eps) max(|F^c_j|, eps)), or
    sigmoid(beta + alpha cos) when SIGMOID. Returns (assign int64, sim ACC), ``[BLOCK_M]``.

    The similarity exists one ``[BLOCK_M, BLOCK_C]`` tile at a time (dot over D blocks). Ties go
    to the lower center: ``tl.max(..., return_indices_tie_break_left=True)`` inside a block, and
    a later block replaces the running best only when strictly greater. Padded centers are -inf
    and never win. (A NaN similarity is not propagated as torch.max would: NaN compares false.)
    """
    offs_cb = tl.arange(0, BLOCK_C)
    offs_db = tl.arange(0, BLOCK_D)
    # |F_i|^2 over all D blocks
    nf2 = tl.zeros([offs_m.shape[0]], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_db
        f = _load_rows(feats_ptr, b, offs_m, mask_m, offs_d, offs_d < D, s_fb, s_fm, s_fd, ACC)
        nf2 += tl.sum(f * f, axis=1)
    nf = _sqrt(nf2)
    inv_nf = _recip(tl.maximum(nf, _eps_like(nf)))

    best_sim = tl.full([offs_m.shape[0]], float("-inf"), dtype=ACC)
    best_idx = tl.zeros([offs_m.shape[0]], dtype=tl.int64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + offs_cb).to(tl.int64)
        mask_c = offs_c < C
        dot = tl.zeros([offs_m.shape[0], BLOCK_C], dtype=ACC)
        nc2 = tl.zeros([BLOCK_C], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_db
            mask_d = offs_d < D
            f_ptrs = feats_ptr + b * s_fb + offs_m[:, None] * s_fm + offs_d[None, :] * s_fd
            c_ptrs = centers_ptr + b * s_cb + offs_c[:, None] * s_cc + offs_d[None, :] * s_cd
            f = tl.load(f_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            c = tl.load(c_ptrs, mask=mask_c[:, None] & mask_d[None, :], other=0.0)
            c_acc = c.to(ACC)
            nc2 += tl.sum(c_acc * c_acc, axis=1)
            if DOT_NATIVE:
                # fp16/bf16 on a GPU: products of two halves are exact in the fp32 accumulator.
                dot = tl.dot(f, tl.trans(c), dot, out_dtype=ACC)
            else:
                dot = tl.dot(f.to(ACC), tl.trans(c_acc), dot, input_precision=PREC, out_dtype=ACC)
        nc = _sqrt(nc2)
        inv_nc = _recip(tl.maximum(nc, _eps_like(nc)))
        s = dot * inv_nf[:, None] * inv_nc[None, :]
        if SIGMOID:
            s = _sigmoid(beta + alpha * s)
        s = tl.where(mask_c[None, :], s, float("-inf"))
        blk_max, blk_arg = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = blk_max > best_sim  # strictly: an equal later block keeps the lower index
        best_idx = tl.where(better, c0 + blk_arg.to(tl.int64), best_idx)
        best_sim = tl.where(better, blk_max, best_sim)
    return best_idx, best_sim


# ---------------------------------------------------------------------------------------------
# Eq. 3 (and every other per-cluster sum): deterministic weighted cluster sums.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _cluster_sum_tile(acc, acc_w, a, w, w2, v, offs_c, C, W_NATIVE: tl.constexpr, PREC: tl.constexpr):
    """One tile of points of the weighted cluster sum (Eq. 3's numerator and denominator):

        acc[c, :] += sum_m W[m, c] v_m,   acc_w[c] += sum_m w2_m 1(a_m = c),
        W[m, c] = w_m 1(a_m = c)

    computed as ``tl.dot(W^T, V)`` so the tile's scatter is a small GEMM with a fixed summation
    order (deterministic; no atomics). Out-of-range a_m (< 0 or >= C, or padded rows with
    a_m = -1) match no column and contribute nothing. ``v`` is ``[BLOCK_M, BLOCK_D]`` (zeros in
    padded rows; note 0 * inf = NaN: an infinite value poisons its whole column block, where the
    reference's scatter would poison only its own cluster). W^T is built transposed
    (``[BLOCK_C, BLOCK_M]``), not ``tl.trans``-ed: with a converted fp16 V, the trans + FMA-dot
    form made ptxas spill ~17 KB per thread on sm_90. With W_NATIVE the dot runs in v's dtype
    (fp16/bf16; the caller guarantees w is exactly representable in it, so W^T V's products are
    exact). Otherwise the weights go onto V's rows first and the dot takes the exact 0/1 one-hot
    matrix H^T as its other operand: acc += H^T (w * V) with ``input_precision=PREC``. Under
    tf32x3 the split of H^T is exact (its TF32 remainder is 0), so each sum carries only the
    rounding of w * V to its two TF32 parts: fp32-level error, not TF32's 1e-3.
    """
    hit = (a[None, :] == offs_c[:, None]) & (offs_c[:, None] < C)
    if W_NATIVE:
        WT = tl.where(hit, w[None, :], 0.0).to(acc.dtype)
        acc = tl.dot(WT.to(v.dtype), v, acc, out_dtype=acc.dtype)
    else:
        HT = tl.where(hit, 1.0, 0.0).to(acc.dtype)
        wv = v.to(acc.dtype) * w[:, None].to(acc.dtype)
        acc = tl.dot(HT, wv, acc, input_precision=PREC, out_dtype=acc.dtype)
    acc_w += tl.sum(tl.where(hit, w2[None, :], 0.0).to(acc.dtype), axis=1)
    return acc, acc_w


@triton.jit
def _chunk_cluster_sums(
    b, chunk, n_chunks, tile_lo, tile_hi, M, C, D, N_DB,
    assign_ptr, s_ab, s_am,
    w_ptr, s_wb, s_wm,
    w2_ptr, s_w2b, s_w2m,
    v_ptr, s_vb, s_vm, s_vd,
    part_ptr, part_w_ptr,
    ACC: tl.constexpr, W2: tl.constexpr, W_NATIVE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial cluster sums of one program's chunk of points (tiles ``tile_lo..tile_hi-1``) for
    every center block and D block (Eq. 3; also d(centers) of Eq. 2 and d(center_out) of Eq. 9):

        part[b, chunk, j, :] = sum_{i in chunk, a_i = j} w_i v_i
        part_w[b, chunk, j]  = sum_{i in chunk, a_i = j} w2_i      (W2 = 1: w2 = w; 2: own w2; 0: none)

    ``part`` is a contiguous ``[B, n_chunks, C, D]`` ACC buffer, ``part_w`` ``[B, n_chunks, C]``.
    Every (j, d) of the chunk is written (zeros for an empty chunk), so the buffers need no init.
    ``N_DB = max(1, cdiv(D, BLOCK_D))``: at least one D block, so ``part_w`` is written when D = 0.
    """
    offs_mb = tl.arange(0, BLOCK_M)
    offs_cb = tl.arange(0, BLOCK_C)
    offs_db = tl.arange(0, BLOCK_D)
    row = b * n_chunks + chunk  # int64 (b is)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + offs_cb).to(tl.int64)
        mask_c = offs_c < C
        for db in range(0, N_DB):
            offs_d = db * BLOCK_D + offs_db
            mask_d = offs_d < D
            acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
            acc_w = tl.zeros([BLOCK_C], dtype=ACC)
            for t in range(tile_lo, tile_hi):
                offs_m = (t * BLOCK_M + offs_mb).to(tl.int64)
                mask_m = offs_m < M
                a = tl.load(assign_ptr + b * s_ab + offs_m * s_am, mask=mask_m, other=-1)
                w = _load_points(w_ptr, b, offs_m, mask_m, s_wb, s_wm, 0.0, ACC)
                if W2 == 2:
                    w2 = _load_points(w2_ptr, b, offs_m, mask_m, s_w2b, s_w2m, 0.0, ACC)
                else:
                    w2 = w
                v_ptrs = v_ptr + b * s_vb + offs_m[:, None] * s_vm + offs_d[None, :] * s_vd
                v = tl.load(v_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
                acc, acc_w = _cluster_sum_tile(acc, acc_w, a, w, w2, v, offs_c, C, W_NATIVE, PREC)
            p_ptrs = part_ptr + (row * C + offs_c[:, None]) * D + offs_d[None, :]
            tl.store(p_ptrs, acc, mask=mask_c[:, None] & mask_d[None, :])
            if W2 != 0:
                # a uniform branch, not `mask_c & (db == 0)`: triton 3.9's interpreter turns a block mask
                # and-ed with a scalar condition into an int mask and refuses it
                if db == 0:
                    tl.store(part_w_ptr + row * C + offs_c, acc_w, mask=mask_c)


@triton.jit
def _chunk_bounds(chunk, M, TILES_PER_CHUNK, BLOCK_M: tl.constexpr):
    """Tiles ``[lo, hi)`` of points owned by chunk ``chunk`` (its last one may be short or empty)."""
    n_tiles = tl.cdiv(M, BLOCK_M)
    lo = chunk * TILES_PER_CHUNK
    hi = tl.minimum(lo + TILES_PER_CHUNK, n_tiles)
    return lo, hi


@triton.jit
def _split_pid(N_X):
    """1-D grid of ``B * N_X`` programs -> (x, b): consecutive programs walk one image's tiles or
    chunks (locality), and no grid dimension meets CUDA's 65535 limit of the y/z axes."""
    pid = tl.program_id(0)
    return pid % N_X, (pid // N_X).to(tl.int64)


@triton.jit
def _load_alpha_beta(alpha_ptr, beta_ptr, SIGMOID: tl.constexpr, ACC: tl.constexpr):
    """The learnable scalars as ACC (they may have another float dtype than the features)."""
    if SIGMOID:
        alpha = tl.load(alpha_ptr).to(ACC)
        beta = tl.load(beta_ptr).to(ACC)
    else:
        alpha = tl.zeros([1], dtype=ACC).sum()
        beta = alpha
    return alpha, beta


# ---------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _cosine_assign_kernel(
    feats_ptr, centers_ptr, alpha_ptr, beta_ptr, assign_ptr, sim_ptr,
    M, C, D,
    s_fb, s_fm, s_fd, s_cb, s_cc, s_cd,
    ACC: tl.constexpr, SIGMOID: tl.constexpr, DOT_NATIVE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Eq. 2, P^QT_i = argmax_j s_ij and sim_i = max_j s_ij (see :func:`_assign_tile`).

    Grid ``(B * cdiv(M, BLOCK_M),)``; ``assign``/``sim`` are contiguous ``[B, M]`` (int64, feats dtype).

    Floor (cosine_assign fwd): feats, centers read once, assign and sim written once:
    (B M D + B C D) e + B M (8 + e) bytes; 2 B M C D + 2 B (M + C) D + B M C FLOPs. paper: 25.3 MiB,
    0.63 GFLOP; sgdet: 201.6 MiB, 8.3 GFLOP. Bound: memory (7.9 / 63 us; the dots 3.8 / 50 us).
    This kernel: feats from HBM once (each tile loaded 1 + ceil(C/64) times, repeats from L1/L2),
    centers[b] re-read and their norms recomputed by every tile (L2); padded dots: 0.81 / 12.9
    GFLOP executed (64/49, 128/81), ~78 us at sgdet: dot-bound there, ~1.2x the floor's time.
    """
    tile, b = _split_pid(tl.cdiv(M, BLOCK_M))
    offs_m = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    alpha, beta = _load_alpha_beta(alpha_ptr, beta_ptr, SIGMOID, ACC)
    idx, sim = _assign_tile(feats_ptr, centers_ptr, b, offs_m, mask_m, C, D,
                            s_fb, s_fm, s_fd, s_cb, s_cc, s_cd, alpha, beta,
                            ACC, SIGMOID, DOT_NATIVE, PREC, BLOCK_C, BLOCK_D)
    tl.store(assign_ptr + b * M + offs_m, idx, mask=mask_m)
    tl.store(sim_ptr + b * M + offs_m, sim.to(sim_ptr.dtype.element_ty), mask=mask_m)


@triton.jit(do_not_specialize=["n_chunks"])  # one compile for 1 and many chunks (1 spilled 16 B in bf16)
def _cluster_partial_kernel(
    values_ptr, assign_ptr, sim_ptr, part_ptr, part_w_ptr,
    M, C, D, N_DB, n_chunks, TILES_PER_CHUNK,
    s_vb, s_vm, s_vd, s_ab, s_am, s_sb, s_sm,
    ACC: tl.constexpr, W_NATIVE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Eq. 3, per chunk of points: part[b, k, j] = sum_{i in chunk k, a_i = j} s_i v_i and
    part_w[b, k, j] = sum_{i in chunk k, a_i = j} s_i. Grid ``(B * n_chunks,)``; finished by
    :func:`_cluster_finish_kernel`.

    Floor (cluster_aggregate fwd, this kernel + the finish): values, assign, sim, value_centers read
    once, out and den written once: (B M D + 2 B C D) e + B M (8 + e) + B C e bytes; 2 B M D + B M
    + 2 B C D FLOPs. paper: 25.5 MiB, 0.013 GFLOP; sgdet: 202.3 MiB, 0.10 GFLOP. Bound: memory
    (8.0 / 63 us). This kernel: every read of the floor but value_centers, plus its ACC partials
    B n_chunks C (D + 1) (6.2 / 10.9 MiB, written here and read by the finish); values re-read per
    center block (sgdet: twice, up to 2x the floor on values if a 368 KiB chunk leaves L2): ~1.5x
    (paper) / up to ~2.1x (sgdet) the floor's bytes. One-hot dot: 2 B M 64 ceil(C/64) D = 0.81 /
    12.9 GFLOP executed, ~78 us at sgdet (> 63 us: dot-bound there)."""
    chunk, b = _split_pid(n_chunks)
    lo, hi = _chunk_bounds(chunk, M, TILES_PER_CHUNK, BLOCK_M)
    _chunk_cluster_sums(b, chunk, n_chunks, lo, hi, M, C, D, N_DB,
                        assign_ptr, s_ab, s_am, sim_ptr, s_sb, s_sm, sim_ptr, s_sb, s_sm,
                        values_ptr, s_vb, s_vm, s_vd, part_ptr, part_w_ptr,
                        ACC, 1, W_NATIVE, PREC, BLOCK_M, BLOCK_C, BLOCK_D)


@triton.jit(do_not_specialize=["n_chunks"])  # one compile for 1 and many chunks (1 spilled 16 B in bf16)
def _superpixel_kernel(
    feats_ptr, centers_ptr, values_ptr, alpha_ptr, beta_ptr, assign_ptr, sim_ptr, part_ptr, part_w_ptr,
    M, C, D, DV, N_DBV, n_chunks, TILES_PER_CHUNK,
    s_fb, s_fm, s_fd, s_cb, s_cc, s_cd, s_vb, s_vm, s_vd,
    ACC: tl.constexpr, SIGMOID: tl.constexpr, DOT_NATIVE: tl.constexpr, W_NATIVE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Eq. 2 + Eq. 3 in one launch over the points. Grid ``(B * n_chunks,)``; each program owns a
    chunk of point tiles:

    1. Eq. 2 (:func:`_assign_tile`) for each tile; assign and sim (rounded to the feats dtype)
       are stored to the ``[B, M]`` outputs;
    2. after a CTA barrier (the stores of phase 1 are read back by other threads of the same
       program), the chunk's partial Eq. 3 sums (:func:`_chunk_cluster_sums`) over ``values``,
       weighted by the *stored* sim: exactly what ``cluster_aggregate(values, assign, sim, .)``
       sees. The chunk was just read, so the re-read mostly hits L2.

    :func:`_cluster_finish_kernel` then adds the centers' values and divides by 1 + sum sim.

    Floor (superpixel_cluster fwd, values = feats, value_centers = centers as the case and SIL use
    it): feats, centers read once; assign, sim, out, den written once: (B M D + 2 B C D) e
    + B M (8 + e) + B C e bytes; cosine_assign's + cluster_aggregate's FLOPs. paper: 25.5 MiB,
    0.65 GFLOP; sgdet: 202.3 MiB, 8.4 GFLOP. Bound: memory (8.0 / 63 us; dots 3.9 / 51 us).
    This kernel: feats from HBM in phase 1, re-read ceil(C/64) times in phase 2 (L2 at paper; up to
    3x the floor on feats at sgdet), assign/sim stored then re-read, partials as
    :func:`_cluster_partial_kernel`'s; both dots padded: 1.6 GFLOP (paper, ~10 us, about balanced
    with memory) / 25.8 GFLOP (sgdet, ~156 us: dot-bound, 2.5x the floor's time).
    """
    chunk, b = _split_pid(n_chunks)
    lo, hi = _chunk_bounds(chunk, M, TILES_PER_CHUNK, BLOCK_M)
    alpha, beta = _load_alpha_beta(alpha_ptr, beta_ptr, SIGMOID, ACC)
    for t in range(lo, hi):
        offs_m = (t * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < M
        idx, sim = _assign_tile(feats_ptr, centers_ptr, b, offs_m, mask_m, C, D,
                                s_fb, s_fm, s_fd, s_cb, s_cc, s_cd, alpha, beta,
                                ACC, SIGMOID, DOT_NATIVE, PREC, BLOCK_C, BLOCK_D)
        tl.store(assign_ptr + b * M + offs_m, idx, mask=mask_m)
        tl.store(sim_ptr + b * M + offs_m, sim.to(sim_ptr.dtype.element_ty), mask=mask_m)
    tl.debug_barrier()
    _chunk_cluster_sums(b, chunk, n_chunks, lo, hi, M, C, DV, N_DBV,
                        assign_ptr, M, 1, sim_ptr, M, 1, sim_ptr, M, 1,
                        values_ptr, s_vb, s_vm, s_vd, part_ptr, part_w_ptr,
                        ACC, 1, W_NATIVE, PREC, BLOCK_M, BLOCK_C, BLOCK_DV)


@triton.jit
def _cluster_finish_kernel(
    part_ptr, part_w_ptr, vc_ptr, out_ptr, den_ptr,
    n_chunks, C, D,
    s_vcb, s_vcc, s_vcd,
    ACC: tl.constexpr, ADD_CENTER: tl.constexpr, DIVIDE: tl.constexpr, STORE_W: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Reduce the partial cluster sums over chunks in a fixed order (deterministic). Grid
    ``(B, cdiv(C, BLOCK_C), max(1, cdiv(D, BLOCK_D)))``:

        num_j = sum_k part[b, k, j, :] (+ vc_j if ADD_CENTER),  sw_j = sum_k part_w[b, k, j]
        DIVIDE (Eq. 3):  den_j = 1 + sw_j,  out_j = num_j / den_j,  den stored
        else:            out_j = num_j;  sw_j stored to den if STORE_W

    ``out``/``den`` are contiguous ``[B, C, D]``/``[B, C]``, stored in their own dtype.

    Floor share: value_centers read (ADD_CENTER) and out [B, C, D] / den [B, C] written once,
    ~B C (2 D + 1) e (0.39 / 1.3 MiB); FLOPs n_chunks B C D adds + 2 B C D (negligible). It also
    reads the B n_chunks C (D + 1) ACC partials once (6.2 MiB paper, 32 chunks; 10.9 MiB sgdet,
    17 chunks), traffic of no floor: the price of deterministic chunked sums. Memory-bound (~2 /
    ~4 us), in practice latency-bound: B ceil(C/64) ceil(D/16) = 64 (paper) / 256 (sgdet) programs.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = offs_c < C
    mask_d = offs_d < D
    mask = mask_c[:, None] & mask_d[None, :]
    num = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
    sw = tl.zeros([BLOCK_C], dtype=ACC)
    for k in range(0, n_chunks):
        row = b * n_chunks + k
        num += tl.load(part_ptr + (row * C + offs_c[:, None]) * D + offs_d[None, :], mask=mask, other=0.0)
        if DIVIDE or STORE_W:
            sw += tl.load(part_w_ptr + row * C + offs_c, mask=mask_c, other=0.0)
    if ADD_CENTER:
        vc = tl.load(vc_ptr + b * s_vcb + offs_c[:, None] * s_vcc + offs_d[None, :] * s_vcd, mask=mask, other=0.0)
        num += vc.to(ACC)
    first_d = tl.program_id(2) == 0  # one program per C tile stores den (a uniform branch: see _chunk_cluster_sums)
    if DIVIDE:
        den = 1.0 + sw
        num = _div(num, den[:, None])
        if first_d:
            tl.store(den_ptr + b * C + offs_c, den.to(den_ptr.dtype.element_ty), mask=mask_c)
    elif STORE_W:
        if first_d:
            tl.store(den_ptr + b * C + offs_c, sw.to(den_ptr.dtype.element_ty), mask=mask_c)
    tl.store(out_ptr + (b * C + offs_c[:, None]) * D + offs_d[None, :], num.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_chunks"])  # one compile for 1 and many chunks (1 spilled 16 B in bf16)
def _cosine_assign_backward_kernel(
    grad_sim_ptr, feats_ptr, centers_ptr, assign_ptr, alpha_ptr, beta_ptr,
    grad_feats_ptr, w_ptr, t_ptr, ab_part_ptr, part_ptr, part_w_ptr,
    M, C, D, N_DB, n_chunks, TILES_PER_CHUNK,
    s_gb, s_gm, s_fb, s_fm, s_fd, s_cb, s_cc, s_cd, s_ab, s_am,
    ACC: tl.constexpr, SIGMOID: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of Eq. 2. Grid ``(B * n_chunks,)``. For point i, a = assign_i (out of range: g = 0),
    n_i = max(|f_i|, eps), m_a = max(|c_a|, eps), cos_i = f_i.c_a / (n_i m_a), g = grad_sim_i:

        gc_i      = g (alpha s_i (1 - s_i) if SIGMOID), s_i = sigmoid(beta + alpha cos_i)
        grad f_i  = gc_i / n_i (c_a / m_a - [|f_i| >= eps] cos_i f_i / n_i)      (stored, feats dtype)
        w_i = gc_i / n_i,  t_i = gc_i cos_i                                      (ACC scratch [B, M])
        ab_part[b, k] = (sum g s (1 - s) cos, sum g s (1 - s)) over the chunk      (alpha, beta grads)

    then (after a CTA barrier: w, t were written by other threads of this program) the chunk's
    partial cluster sums S_j = sum_{a_i = j} w_i f_i and T_j = sum_{a_i = j} t_i; the launcher
    finishes grad c_j = (S_j - [|c_j| >= eps] T_j c_j / m_j) / m_j.

    Floor (cosine_assign bwd, whole op): grad sim, feats, centers, assign, sim read once, grad
    feats, grad centers written once: 2 (B M D + B C D) e + B M (8 + 2e) bytes; 7 B M D + 4 B C D
    FLOPs (9 B M D with the sigmoid). paper: 49.9 MiB, 0.044 GFLOP; sgdet: 397.3 MiB, 0.35 GFLOP.
    Bound: memory (15.6 / 124 us). This kernel: all of it but grad centers (finish + per-center
    torch). It reads no sim: cos and |c_a|^2 are recomputed per point (+4 B M D FMA FLOPs); feats
    is loaded twice per tile (L1/L2) and again ceil(C/64) times in the cluster-sum phase (L2 at
    paper, up to 3x the floor on feats at sgdet); w, t scratch 4 B M 4 bytes (1.5 / 12 MiB) and
    6.2 / 10.9 MiB of partials: ~1.3x the floor's bytes at paper. One-hot dot 0.81 / 12.9 GFLOP
    (~78 us < 124 us).
    """
    chunk, b = _split_pid(n_chunks)
    lo, hi = _chunk_bounds(chunk, M, TILES_PER_CHUNK, BLOCK_M)
    alpha, beta = _load_alpha_beta(alpha_ptr, beta_ptr, SIGMOID, ACC)
    offs_db = tl.arange(0, BLOCK_D)
    pa = tl.zeros([BLOCK_M], dtype=ACC)
    pb = tl.zeros([BLOCK_M], dtype=ACC)
    for t in range(lo, hi):
        offs_m = (t * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < M
        valid, safe = _load_assign(assign_ptr, b, offs_m, mask_m, s_ab, s_am, C)
        g = _load_points(grad_sim_ptr, b, offs_m, mask_m, s_gb, s_gm, 0.0, ACC)
        g = tl.where(valid, g, 0.0)
        nf2 = tl.zeros([BLOCK_M], dtype=ACC)
        nc2 = tl.zeros([BLOCK_M], dtype=ACC)
        fc = tl.zeros([BLOCK_M], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_db
            mask_d = offs_d < D
            f = _load_rows(feats_ptr, b, offs_m, mask_m, offs_d, mask_d, s_fb, s_fm, s_fd, ACC)
            c = _load_rows(centers_ptr, b, safe, valid, offs_d, mask_d, s_cb, s_cc, s_cd, ACC)
            nf2 += tl.sum(f * f, axis=1)
            nc2 += tl.sum(c * c, axis=1)
            fc += tl.sum(f * c, axis=1)
        nf_raw = _sqrt(nf2)
        n = tl.maximum(nf_raw, _eps_like(nf_raw))
        m_raw = _sqrt(nc2)
        m = tl.maximum(m_raw, _eps_like(m_raw))
        cos = _div(fc, n * m)
        if SIGMOID:
            s = _sigmoid(beta + alpha * cos)
            ds = s * (1.0 - s)
            gc = g * alpha * ds
            pa += g * ds * cos
            pb += g * ds
        else:
            gc = g
        coef_c = _div(gc, n * m)  # multiplies c_a
        coef_f = tl.where(nf_raw >= _eps_like(nf_raw), _div(gc * cos, n * n), 0.0)  # multiplies f_i
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_db
            mask_d = offs_d < D
            f = _load_rows(feats_ptr, b, offs_m, mask_m, offs_d, mask_d, s_fb, s_fm, s_fd, ACC)
            c = _load_rows(centers_ptr, b, safe, valid, offs_d, mask_d, s_cb, s_cc, s_cd, ACC)
            gf = coef_c[:, None] * c - coef_f[:, None] * f
            gf_ptrs = grad_feats_ptr + (b * M + offs_m[:, None]) * D + offs_d[None, :]
            tl.store(gf_ptrs, gf.to(grad_feats_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
        tl.store(w_ptr + b * M + offs_m, _div(gc, n), mask=mask_m)
        tl.store(t_ptr + b * M + offs_m, gc * cos, mask=mask_m)
    row = b * n_chunks + chunk
    tl.store(ab_part_ptr + row * 2, tl.sum(pa, axis=0))
    tl.store(ab_part_ptr + row * 2 + 1, tl.sum(pb, axis=0))
    tl.debug_barrier()
    _chunk_cluster_sums(b, chunk, n_chunks, lo, hi, M, C, D, N_DB,
                        assign_ptr, s_ab, s_am, w_ptr, M, 1, t_ptr, M, 1,
                        feats_ptr, s_fb, s_fm, s_fd, part_ptr, part_w_ptr,
                        ACC, 2, False, PREC, BLOCK_M, BLOCK_C, BLOCK_D)


@triton.jit
def _cluster_aggregate_backward_kernel(
    grad_out_ptr, values_ptr, assign_ptr, sim_ptr, out_ptr, den_ptr, grad_values_ptr, grad_sim_ptr,
    M, C, D,
    s_gb, s_gc, s_gd, s_vb, s_vm, s_vd, s_ab, s_am, s_sb, s_sm, s_ob, s_oc, s_od, s_db, s_dc,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of Eq. 3, per point (gathers by assign, no races). Grid ``(B * cdiv(M, BLOCK_M),)``.
    With a = assign_i (out of range: both grads 0), G = grad_out:

        grad v_i = s_i G_a / den_a,     grad s_i = G_a . (v_i - out_a) / den_a

    (grad vc_j = G_j / den_j is a per-center elementwise op left to the launcher.)

    Floor (cluster_aggregate bwd, whole op): G, values, assign, sim, out, den read once; grad
    values, grad sim, grad vc written once: (3 B C D + 2 B M D) e + B M (8 + 2e) + B C e bytes;
    4 B M D + B C D FLOPs. paper: 50.1 MiB, 0.025 GFLOP; sgdet: 397.9 MiB, 0.20 GFLOP. Bound: memory
    (15.7 / 125 us). This kernel: all of it but grad vc (torch, B C D); values read and grad values
    written once (~1x the floor); G_a, out_a, den_a gathered per point from L2 ([B, C, D]: 0.19 /
    0.63 MiB), G_a / den_a recomputed per point (+B M D FLOPs, FMA).
    """
    tile, b = _split_pid(tl.cdiv(M, BLOCK_M))
    offs_m = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    valid, safe = _load_assign(assign_ptr, b, offs_m, mask_m, s_ab, s_am, C)
    s = _load_points(sim_ptr, b, offs_m, mask_m, s_sb, s_sm, 0.0, ACC)
    den = tl.load(den_ptr + b * s_db + safe * s_dc, mask=valid, other=1.0).to(ACC)
    inv_den = _recip(den)
    gs = tl.zeros([BLOCK_M], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        G = _load_rows(grad_out_ptr, b, safe, valid, offs_d, mask_d, s_gb, s_gc, s_gd, ACC)
        o = _load_rows(out_ptr, b, safe, valid, offs_d, mask_d, s_ob, s_oc, s_od, ACC)
        v = _load_rows(values_ptr, b, offs_m, mask_m, offs_d, mask_d, s_vb, s_vm, s_vd, ACC)
        rows = G * inv_den[:, None]  # G_a / den_a, zero for invalid points
        gv_ptrs = grad_values_ptr + (b * M + offs_m[:, None]) * D + offs_d[None, :]
        gv = (s[:, None] * rows).to(grad_values_ptr.dtype.element_ty)
        tl.store(gv_ptrs, gv, mask=mask_m[:, None] & mask_d[None, :])
        gs += tl.sum(rows * (v - o), axis=1)
    tl.store(grad_sim_ptr + b * M + offs_m, gs.to(grad_sim_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _cluster_dispatch_kernel(
    center_out_ptr, assign_ptr, sim_ptr, residual_ptr, out_ptr,
    M, C, D,
    s_cb, s_cc, s_cd, s_ab, s_am, s_sb, s_sm, s_rb, s_rm, s_rd,
    ACC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Eq. 9: out_i = r_i + s_i center_out[a_i] (the center term is 0 when a_i is out of range).
    Grid ``(B * cdiv(M, BLOCK_M), cdiv(D, BLOCK_D))``; ``out`` contiguous ``[B, M, D]``.

    Floor (cluster_dispatch fwd): center_out, assign, sim, residual read once, out written once:
    (B C D + 2 B M D) e + B M (8 + e) bytes; 2 B M D FLOPs (one multiply-add per point and
    channel). paper: 49.3 MiB, 0.013 GFLOP; sgdet: 393.6 MiB, 0.10 GFLOP; 0.24 FLOP/B. Bound: memory
    (15 / 123 us). This kernel: residual read and out written once (~1x the floor in HBM); assign
    and sim re-read by each of the ceil(D/16) = 4 D-block programs of a tile and center_out rows
    gathered per point, all L2-resident (1.1 / 9 MiB; 0.19 / 0.63 MiB)."""
    tile, b = _split_pid(tl.cdiv(M, BLOCK_M))
    offs_m = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    valid, safe = _load_assign(assign_ptr, b, offs_m, mask_m, s_ab, s_am, C)
    s = _load_points(sim_ptr, b, offs_m, mask_m, s_sb, s_sm, 0.0, ACC)
    co = _load_rows(center_out_ptr, b, safe, valid, offs_d, mask_d, s_cb, s_cc, s_cd, ACC)
    o = s[:, None] * co
    if HAS_RESIDUAL:
        o += _load_rows(residual_ptr, b, offs_m, mask_m, offs_d, mask_d, s_rb, s_rm, s_rd, ACC)
    o_ptrs = out_ptr + (b * M + offs_m[:, None]) * D + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit(do_not_specialize=["n_chunks"])  # one compile for 1 and many chunks (1 spilled 16 B in bf16)
def _cluster_dispatch_backward_kernel(
    grad_out_ptr, center_out_ptr, assign_ptr, sim_ptr, grad_sim_ptr, part_ptr,
    M, C, D, N_DB, n_chunks, TILES_PER_CHUNK,
    s_gb, s_gm, s_gd, s_cb, s_cc, s_cd, s_ab, s_am, s_sb, s_sm,
    ACC: tl.constexpr, W_NATIVE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of Eq. 9. Grid ``(B * n_chunks,)``. Per point (gather, no races):

        grad s_i = G_i . center_out_a        (0 when a_i is out of range)

    then the chunk's partial cluster sums grad center_out_j = sum_{a_i = j} s_i G_i, finished
    (summed over chunks) by :func:`_cluster_finish_kernel`. (grad r_i = G_i needs no kernel.)

    Floor (cluster_dispatch bwd, whole op): G, center_out, assign, sim read once; grad center_out,
    grad sim and grad r (a copy of G) written once: (2 B M D + 2 B C D) e + B M (8 + 2e) bytes;
    4 B M D FLOPs. paper: 49.9 MiB, 0.025 GFLOP; sgdet: 397.3 MiB, 0.20 GFLOP; memory (15.6 /
    124 us). The op never writes grad r (autograd hands grad_out itself to the residual), so
    B M D e of that floor (24 / 192 MiB) never moves: 25.9 / 205 MiB remain (8.1 / 64 us). This
    kernel: G read in phase 1 and again ceil(C/64) times in phase 2 (L2 at paper; up to 3x the
    floor on G at sgdet), 6.1 / 10.8 MiB of partials; one-hot dot 0.81 / 12.9 GFLOP (~78 us at
    sgdet: above those 64 us of memory, so dot-bound).
    """
    chunk, b = _split_pid(n_chunks)
    lo, hi = _chunk_bounds(chunk, M, TILES_PER_CHUNK, BLOCK_M)
    for t in range(lo, hi):
        offs_m = (t * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < M
        valid, safe = _load_assign(assign_ptr, b, offs_m, mask_m, s_ab, s_am, C)
        gs = tl.zeros([BLOCK_M], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            G = _load_rows(grad_out_ptr, b, offs_m, mask_m, offs_d, mask_d, s_gb, s_gm, s_gd, ACC)
            co = _load_rows(center_out_ptr, b, safe, valid, offs_d, mask_d, s_cb, s_cc, s_cd, ACC)
            gs += tl.sum(G * co, axis=1)
        tl.store(grad_sim_ptr + b * M + offs_m, gs.to(grad_sim_ptr.dtype.element_ty), mask=mask_m)
    # No barrier needed: the cluster sums read only inputs (assign, sim, grad_out).
    _chunk_cluster_sums(b, chunk, n_chunks, lo, hi, M, C, D, N_DB,
                        assign_ptr, s_ab, s_am, sim_ptr, s_sb, s_sm, sim_ptr, s_sb, s_sm,
                        grad_out_ptr, s_gb, s_gm, s_gd, part_ptr, part_ptr,
                        ACC, 0, W_NATIVE, PREC, BLOCK_M, BLOCK_C, BLOCK_D)
