"""Prototype distance (RDE, Sec. 3.3, Eq. 4) in plain PyTorch: the test oracle and the fallback.

Written equation by equation, float64-safe, no speed tricks. Every backend (C++ CPU, Triton)
implements the *same functions with the same signatures* as this module, forward and backward,
so the dispatcher in ``sgg_kernels.ops.prototypes`` can call any of them. Inputs reaching these
functions are already checked by the op layer: ``x [N, D]`` and ``protos [Q, D]``, one floating
dtype, one device (any strides).

Eq. 4 prints D(x, P) = L2(x) . L2(P) + ||x - P||_2: a cosine similarity plus a Euclidean
distance. This op returns the two terms separately, for every (instance, prototype) pair, in one
pass; the loss module combines them (and documents its reading of the sum). For row n and
prototype q, with eps = 1e-12:

    a_n = max(|x_n|, eps),  b_q = max(|p_q|, eps)                      (F.normalize's norms)
    cos[n, q]  = <x_n, p_q> / (a_n b_q)                                 (Eq. 4, L2(x) . L2(P))
    s[n, q]    = ||x_n - p_q||^2 = sum_d (x_nd - p_qd)^2                (a direct sum of squares)
    dist[n, q] = sqrt(max(s[n, q], eps))                                (Eq. 4, ||x - P||_2)

The eps under the square root keeps the gradient finite where x_n = p_q (s = 0): there dist is
1e-6 and its gradient is 0 (the clamp's), not 0/0.

Backward formulas (used by every backend; derived once here). G = grad_cos, H = grad_dist, both
``[N, Q]``; [.] is 1 where the condition holds (the clamps pass gradient where their input is at
least eps, as ``torch.clamp_min`` does):

    W[n, q] = H[n, q] [s[n, q] >= eps] / dist[n, q]                     (d dist / d s = W / (2 H))
    grad x_n = sum_q G[n, q] / (a_n b_q) p_q  -  [|x_n| >= eps] (sum_q G[n, q] cos[n, q]) x_n / a_n^2
             + sum_q W[n, q] (x_n - p_q)
    grad p_q = sum_n G[n, q] / (a_n b_q) x_n  -  [|p_q| >= eps] (sum_n G[n, q] cos[n, q]) p_q / b_q^2
             + sum_n W[n, q] (p_q - x_n)

Collected per (n, q) into one ``[N, Q]`` matrix K and two vectors, both gradients are GEMMs:

    K[n, q] = G[n, q] / (a_n b_q) - W[n, q]
    r_n = sum_q W[n, q] - [|x_n| >= eps] sum_q G[n, q] cos[n, q] / a_n^2
    c_q = sum_n W[n, q] - [|p_q| >= eps] sum_n G[n, q] cos[n, q] / b_q^2
    grad x = K @ P + r x,    grad P = K^T @ x + c P

cos and dist are recomputed from x and protos in the backward (the saved outputs are not read):
in half precision a rounded dist would misjudge the mask [s >= eps] at x = p. The kernels
accumulate in float32 (float64 for float64 inputs); the mask reads s computed by direct
differences, so x_n = p_q exactly always gives W = 0. (Near, but not at, a coincidence, the GEMM
form's W x_n - W p_q cancels: its error is W * ulp(|x|), the price of never forming x_n - p_q
per (n, q, d) in the backward.)
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .cluster import _acc_dtype

EPS = 1e-12  # F.normalize's eps for the norms of cos, and the floor of ||x - p||^2 under dist's sqrt


def _squared_distances(x: Tensor, protos: Tensor) -> Tensor:
    """s[n, q] = sum_d (x_nd - p_qd)^2, ``[N, Q]``: direct differences, one prototype at a time
    (readable, exact at x = p, and never the whole ``[N, Q, D]`` difference tensor)."""
    columns = [((x - p) ** 2).sum(dim=-1) for p in protos]
    if not columns:
        return x.new_zeros((x.shape[0], 0))
    return torch.stack(columns, dim=1)


def _cos_and_sq(x: Tensor, protos: Tensor):
    """(cos [N, Q], s = ||x - p||^2 [N, Q], a [N], b [Q], |x| [N], |p| [Q]) in the accumulation dtype."""
    acc = _acc_dtype(x.dtype)
    xa, pa = x.to(acc), protos.to(acc)
    x_norm = torch.linalg.vector_norm(xa, dim=-1)
    p_norm = torch.linalg.vector_norm(pa, dim=-1)
    a, b = x_norm.clamp_min(EPS), p_norm.clamp_min(EPS)
    cos = (xa @ pa.T) / (a[:, None] * b[None, :])  # Eq. 4: L2(x) . L2(P)
    return cos, _squared_distances(xa, pa), a, b, x_norm, p_norm


def prototype_distance(x: Tensor, protos: Tensor) -> Tuple[Tensor, Tensor]:
    """Eq. 4's two terms for every (instance, prototype) pair: ``(cos [N, Q], dist [N, Q])``.

    cos = L2(x_n) . L2(p_q) with F.normalize's norms max(|.|, 1e-12); dist = ||x_n - p_q||_2 as
    sqrt(max(||x_n - p_q||^2, 1e-12)). Outputs in the dtype of ``x``.
    """
    cos, s, *_ = _cos_and_sq(x, protos)
    dist = torch.sqrt(s.clamp_min(EPS))  # Eq. 4: ||x - P||_2, finite gradient at x = P
    return cos.to(x.dtype), dist.to(x.dtype)


def prototype_distance_backward(grad_cos: Tensor, grad_dist: Tensor, x: Tensor, protos: Tensor,
                                need_x: bool = True, need_protos: bool = True) -> Tuple[Tensor, Tensor]:
    """``(grad x [N, D], grad protos [Q, D])`` of :func:`prototype_distance`; the formulas are in
    the module docstring. A gradient not needed comes back as an empty ``[0]`` tensor."""
    acc = _acc_dtype(x.dtype)
    cos, s, a, b, x_norm, p_norm = _cos_and_sq(x, protos)
    G, H = grad_cos.to(acc), grad_dist.to(acc)
    dist = torch.sqrt(s.clamp_min(EPS))
    W = torch.where(s >= EPS, H / dist, 0)  # H d dist / d s * 2: zero where the clamp holds s at eps
    K = G / (a[:, None] * b[None, :]) - W
    Gcos = G * cos
    xa, pa = x.to(acc), protos.to(acc)
    grad_x = grad_p = None
    if need_x:
        r = W.sum(dim=1) - torch.where(x_norm >= EPS, Gcos.sum(dim=1) / (a * a), 0)
        grad_x = (K @ pa + r[:, None] * xa).to(x.dtype)
    if need_protos:
        c = W.sum(dim=0) - torch.where(p_norm >= EPS, Gcos.sum(dim=0) / (b * b), 0)
        grad_p = (K.T @ xa + c[:, None] * pa).to(protos.dtype)
    return (grad_x if need_x else x.new_empty((0,)),
            grad_p if need_protos else protos.new_empty((0,)))
