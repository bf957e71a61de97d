"""Triton kernels of prototype_distance (RDE, Sec. 3.3, Eq. 4).

The launchers live in :mod:`sgg_kernels.triton.prototypes`; this module holds only ``@triton.jit``
code. Notation: ``x [N, D]`` (strides ``s_xn, s_xd``), ``protos [Q, D]`` (``s_pq, s_pd``), and for
row n, prototype q (eps = 1e-12):

    a_n = max(|x_n|, eps), b_q = max(|p_q|, eps), s = ||x_n - p_q||^2
    cos = <x_n, p_q> / (a_n b_q),  dist = sqrt(max(s, eps))                          (Eq. 4)
    W = H [s >= eps] / dist,  K = G / (a_n b_q) - W                                    (backward)
    grad x = K @ P + r x,  grad P = K^T @ x + c P

with r and c the sums of the reference module docstring. One helper carries the forward math
and is shared by the forward and the backward's coefficient kernel:

- :func:`_distance_tile`: ``<x_n, p_q>`` and ``||x_n - p_q||^2`` for a ``[BLOCK_N, BLOCK_Q]`` tile
  from direct differences: a ``[BLOCK_N, BLOCK_Q, BLOCK_D]`` broadcast per step over D, reduced
  over D at once (so x_n = p_q gives s = 0 exactly, and no [N, Q, D] tensor ever exists), plus
  the squared norms of the tile's rows and prototypes.

dtype conventions (as the cluster and pairs kernels): every load is converted to ACC (float32, or
float64 for float64 inputs) before arithmetic; outputs are stored with ``.to(ptr.dtype.element_ty)``;
the backward's dots multiply float32 coefficients K (not representable in fp16/bf16), so they run
in ACC with ``input_precision="ieee"`` (TF32 would keep 10 mantissa bits). Row offsets are int64
before they meet a stride.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._cluster_kernels import _div, _eps_like, _sqrt

# F.normalize's eps (reference EPS, 1e-12) is the norm floor of cos and the floor of ||x - p||^2 in
# dist: _eps_like(x) gives it in x's dtype (cluster kernels' helper).


@triton.jit
def _distance_tile(x_ptr, p_ptr, offs_n, mask_n, offs_q, mask_q, D, s_xn, s_xd, s_pq, s_pd,
                   ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(dot, sq, nx2, np2)`` for rows ``offs_n`` and prototypes ``offs_q`` (int64), in ACC:

        dot[n, q] = <x_n, p_q>,  sq[n, q] = sum_d (x_nd - p_qd)^2,  nx2[n] = |x_n|^2,  np2[q] = |p_q|^2

    Masked rows / prototypes / columns load 0 (their results are never stored).
    """
    offs_db = tl.arange(0, BLOCK_D)
    dot = tl.zeros([offs_n.shape[0], offs_q.shape[0]], dtype=ACC)
    sq = tl.zeros([offs_n.shape[0], offs_q.shape[0]], dtype=ACC)
    nx2 = tl.zeros([offs_n.shape[0]], dtype=ACC)
    np2 = tl.zeros([offs_q.shape[0]], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_db
        mask_d = offs_d < D
        x = tl.load(x_ptr + offs_n[:, None] * s_xn + offs_d[None, :] * s_xd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(ACC)  # load, then convert
        p = tl.load(p_ptr + offs_q[:, None] * s_pq + offs_d[None, :] * s_pd,
                    mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(ACC)
        x3 = x[:, None, :]
        p3 = p[None, :, :]
        diff = x3 - p3
        dot += tl.sum(x3 * p3, axis=2)
        sq += tl.sum(diff * diff, axis=2)  # Eq. 4: ||x - P||^2 by direct differences
        nx2 += tl.sum(x * x, axis=1)
        np2 += tl.sum(p * p, axis=1)
    return dot, sq, nx2, np2


@triton.jit
def _prototype_distance_kernel(
    x_ptr, p_ptr, cos_ptr, dist_ptr,
    N, Q, D,
    s_xn, s_xd, s_pq, s_pd,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Eq. 4 for a ``[BLOCK_N, BLOCK_Q]`` tile: cos = <x, p> / (a b), dist = sqrt(max(s, eps)).

    Grid ``(cdiv(N, BLOCK_N), cdiv(Q, BLOCK_Q))``; ``cos``/``dist`` are contiguous ``[N, Q]``.
    """
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_n = offs_n < N
    mask_q = offs_q < Q
    dot, sq, nx2, np2 = _distance_tile(x_ptr, p_ptr, offs_n, mask_n, offs_q, mask_q, D, s_xn, s_xd, s_pq, s_pd,
                                       ACC, BLOCK_D)
    a = _sqrt(nx2)
    a = tl.maximum(a, _eps_like(a))
    b = _sqrt(np2)
    b = tl.maximum(b, _eps_like(b))
    cos = _div(dot, a[:, None] * b[None, :])  # Eq. 4: L2(x) . L2(P)
    dist = _sqrt(tl.maximum(sq, _eps_like(sq)))  # Eq. 4: ||x - P||_2, finite gradient at x = P
    out = offs_n[:, None] * Q + offs_q[None, :]
    mask = mask_n[:, None] & mask_q[None, :]
    tl.store(cos_ptr + out, cos.to(cos_ptr.dtype.element_ty), mask=mask)
    tl.store(dist_ptr + out, dist.to(dist_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prototype_coef_kernel(
    g_ptr, h_ptr, x_ptr, p_ptr, k_ptr, r_part_ptr, c_part_ptr,
    N, Q, D,
    s_gn, s_gq, s_hn, s_hq, s_xn, s_xd, s_pq, s_pd,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The backward's coefficients for a ``[BLOCK_N, BLOCK_Q]`` tile (cos and s recomputed):

        K[n, q] = G / (a_n b_q) - W,  W = H [s >= eps] / dist                   -> k [N, Q]
        r_part[qb, n] = sum_{q in block qb} (W - [|x_n| >= eps] G cos / a_n^2)    -> [n_qb, N]
        c_part[nb, q] = sum_{n in block nb} (W - [|p_q| >= eps] G cos / b_q^2)    -> [n_nb, Q]

    The launcher sums the partials over their (short) leading axis: deterministic.
    Grid ``(cdiv(N, BLOCK_N), cdiv(Q, BLOCK_Q))``.
    """
    pid_n = tl.program_id(0)
    pid_q = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = pid_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_n = offs_n < N
    mask_q = offs_q < Q
    mask = mask_n[:, None] & mask_q[None, :]
    dot, sq, nx2, np2 = _distance_tile(x_ptr, p_ptr, offs_n, mask_n, offs_q, mask_q, D, s_xn, s_xd, s_pq, s_pd,
                                       ACC, BLOCK_D)
    x_norm = _sqrt(nx2)
    p_norm = _sqrt(np2)
    a = tl.maximum(x_norm, _eps_like(x_norm))
    b = tl.maximum(p_norm, _eps_like(p_norm))
    ab = a[:, None] * b[None, :]
    cos = _div(dot, ab)
    dist = _sqrt(tl.maximum(sq, _eps_like(sq)))
    G = tl.load(g_ptr + offs_n[:, None] * s_gn + offs_q[None, :] * s_gq, mask=mask, other=0.0).to(ACC)
    H = tl.load(h_ptr + offs_n[:, None] * s_hn + offs_q[None, :] * s_hq, mask=mask, other=0.0).to(ACC)
    W = tl.where(sq >= _eps_like(sq), _div(H, dist), 0.0)  # zero where the clamp holds s at eps (x = p)
    K = _div(G, ab) - W
    gcos = G * cos
    rx = W - tl.where((x_norm >= _eps_like(x_norm))[:, None], _div(gcos, (a * a)[:, None]), 0.0)
    cp = W - tl.where((p_norm >= _eps_like(p_norm))[None, :], _div(gcos, (b * b)[None, :]), 0.0)
    rx = tl.where(mask, rx, 0.0)
    cp = tl.where(mask, cp, 0.0)
    tl.store(k_ptr + offs_n[:, None] * Q + offs_q[None, :], K.to(k_ptr.dtype.element_ty), mask=mask)
    tl.store(r_part_ptr + pid_q.to(tl.int64) * N + offs_n, tl.sum(rx, axis=1), mask=mask_n)
    tl.store(c_part_ptr + pid_n.to(tl.int64) * Q + offs_q, tl.sum(cp, axis=0), mask=mask_q)


@triton.jit
def _prototype_grad_x_kernel(
    k_ptr, r_ptr, x_ptr, p_ptr, gx_ptr,
    N, Q, D,
    s_xn, s_xd, s_pq, s_pd,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad x = K @ P + r x for a ``[BLOCK_N, BLOCK_D]`` tile, the dot over Q blocks in order.

    ``k`` is the contiguous ``[N, Q]`` ACC buffer, ``r`` ``[N]`` ACC, ``gx`` contiguous ``[N, D]``.
    Grid ``(cdiv(N, BLOCK_N), cdiv(D, BLOCK_D))``.
    """
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_qb = tl.arange(0, BLOCK_Q)
    mask_n = offs_n < N
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for q0 in range(0, Q, BLOCK_Q):
        offs_q = (q0 + offs_qb).to(tl.int64)
        mask_q = offs_q < Q
        k = tl.load(k_ptr + offs_n[:, None] * Q + offs_q[None, :], mask=mask_n[:, None] & mask_q[None, :], other=0.0)
        p = tl.load(p_ptr + offs_q[:, None] * s_pq + offs_d[None, :] * s_pd,
                    mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(ACC)
        acc = tl.dot(k.to(ACC), p, acc, input_precision="ieee", out_dtype=ACC)
    r = tl.load(r_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    mask = mask_n[:, None] & mask_d[None, :]
    x = tl.load(x_ptr + offs_n[:, None] * s_xn + offs_d[None, :] * s_xd, mask=mask, other=0.0).to(ACC)
    acc += r[:, None] * x
    tl.store(gx_ptr + offs_n[:, None] * D + offs_d[None, :], acc.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prototype_grad_p_kernel(
    k_ptr, c_ptr, x_ptr, p_ptr, gp_ptr,
    N, Q, D,
    s_xn, s_xd, s_pq, s_pd,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad P = K^T @ x + c P for a ``[BLOCK_Q, BLOCK_D]`` tile, the dot over N blocks in
    ascending order (one program owns each output element: deterministic, no atomics).

    K^T is loaded transposed (pointer arithmetic, no ``tl.trans``). ``gp`` contiguous ``[Q, D]``.
    Grid ``(cdiv(Q, BLOCK_Q), cdiv(D, BLOCK_D))``.
    """
    offs_q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_nb = tl.arange(0, BLOCK_N)
    mask_q = offs_q < Q
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + offs_nb).to(tl.int64)
        mask_n = offs_n < N
        kt = tl.load(k_ptr + offs_n[None, :] * Q + offs_q[:, None], mask=mask_q[:, None] & mask_n[None, :], other=0.0)
        x = tl.load(x_ptr + offs_n[:, None] * s_xn + offs_d[None, :] * s_xd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(ACC)
        acc = tl.dot(kt.to(ACC), x, acc, input_precision="ieee", out_dtype=ACC)
    c = tl.load(c_ptr + offs_q, mask=mask_q, other=0.0).to(ACC)
    mask = mask_q[:, None] & mask_d[None, :]
    p = tl.load(p_ptr + offs_q[:, None] * s_pq + offs_d[None, :] * s_pd, mask=mask, other=0.0).to(ACC)
    acc += c[:, None] * p
    tl.store(gp_ptr + offs_q[:, None] * D + offs_d[None, :], acc.to(gp_ptr.dtype.element_ty), mask=mask)
