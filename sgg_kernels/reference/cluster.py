"""Superpixel clustering (SIL, MM'23, Sec. 3.2) in plain PyTorch: the test oracle and the fallback.

Written equation by equation, float64-safe, no speed tricks. Every backend (C++ CPU, CUDA C++,
Triton) implements the *same functions with the same signatures* as this module, forward and
backward, so the dispatcher in ``sgg_kernels.ops.cluster`` can call any of them. Inputs reaching
these functions are already checked and broadcast by the op layer:

- ``feats``/``values``  ``[B, M, D]`` floating, ``centers``/``value_centers`` ``[B, C, D]`` same dtype;
- ``assign`` ``[B, M]`` int64; ``sim`` ``[B, M]`` same dtype as the features;
- ``alpha``/``beta`` ``None`` or 1-element tensors (any float dtype; gradients come back in it).

Out-of-range ``assign`` entries (possible only with ``set_checks(False)``) contribute nothing:
every backend must then stay in bounds and treat the point as belonging to no cluster.

Backward formulas (used by every backend; derived once here):

cosine_assign, for point i with a = assign_i, n_i = max(|f_i|, eps), m_a = max(|c_a|, eps),
cos_i = f_i.c_a / (n_i m_a), s_i = cos_i or sigmoid(beta + alpha cos_i), g = grad_sim_i:
    gc_i      = g * (alpha s_i (1 - s_i)  if sigmoid else 1)
    grad f_i  = gc_i / n_i * (c_a / m_a - [|f_i| >= eps] cos_i f_i / n_i)
    grad c_j  = 1/m_j * (sum_{i: a_i=j} gc_i f_i / n_i - [|c_j| >= eps] (sum_{i: a_i=j} gc_i cos_i) c_j / m_j)
    grad alpha = sum_i g s_i (1 - s_i) cos_i,   grad beta = sum_i g s_i (1 - s_i)

cluster_aggregate, den_j = 1 + sum_{i: a_i=j} s_i, out_j = (vc_j + sum_{i: a_i=j} s_i v_i) / den_j, G = grad_out:
    grad vc_j = G_j / den_j
    grad v_i  = s_i G_a / den_a
    grad s_i  = G_a . (v_i - out_a) / den_a

cluster_dispatch, out_i = r_i + s_i center_out_a:
    grad center_out_j = sum_{i: a_i=j} s_i G_i,  grad s_i = G_i . center_out_a,  grad r_i = G_i

gather_mean, out[b,c] = mean_t feats[b, index[b,c,t]]:
    grad feats[b,m] = sum_{(c,t): index[b,c,t]=m} G[b,c] / k
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12  # the eps of F.normalize: cos uses max(|x|, EPS) norms


def _split_index(index: torch.Tensor, upper: int):
    """``(valid, safe)``: which entries lie in ``[0, upper)``, and the index with the others set to 0.

    Every use of an invalid entry is masked with ``torch.where`` (not multiplied by 0), so an
    invalid point contributes exactly nothing even next to inf/NaN values.
    """
    valid = (index >= 0) & (index < upper)
    return valid, torch.where(valid, index, torch.zeros_like(index))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32 (DESIGN.md, dtypes)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grid_points(H: int, W: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Points of an ``H x W`` feature map as ``[H*W, 2]`` (x, y); cell (r, c) is (c + 0.5, r + 0.5)."""
    ys, xs = torch.meshgrid(
        torch.arange(H, device=device, dtype=torch.float64) + 0.5,
        torch.arange(W, device=device, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).to(dtype)


def grid_centers(H: int, W: int, per_dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sec. 3.2: centers proposed evenly per dimension and paired up, ``[per_dim**2, 2]`` (x, y).

    x_i = (i + 0.5) W / per_dim, y_j = (j + 0.5) H / per_dim, row-major (y outer): 7 per dimension
    gives the paper's 49 centers.
    """
    steps = torch.arange(per_dim, device=device, dtype=torch.float64) + 0.5
    ys, xs = torch.meshgrid(steps * (H / per_dim), steps * (W / per_dim), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).to(dtype)


def knn_index(points: torch.Tensor, centers: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` points nearest to each center: ``[B, M, 2]``, ``[B, C, 2]`` -> ``[B, C, k]``.

    Squared Euclidean distance computed as ``dx*dx + dy*dy`` (each product and the sum rounded in
    the accumulation dtype, no fused multiply-add), sorted ascending, ties to the lower point index.
    """
    acc = _acc_dtype(points.dtype)
    p = points.to(acc)
    c = centers.to(acc)
    dx = c[:, :, None, 0] - p[:, None, :, 0]
    dy = c[:, :, None, 1] - p[:, None, :, 1]
    d2 = dx * dx + dy * dy  # [B, C, M]
    order = torch.sort(d2, dim=-1, stable=True).indices  # stable: ties keep the lower point index
    return order[..., :k].contiguous()


def gather_mean(feats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Eq. 1: F^c_j = 1/n_k sum_{Q_i in KNN(T_j)} F_i.  ``[B, M, D]``, ``[B, C, k]`` -> ``[B, C, D]``."""
    B, M, D = feats.shape
    _, C, k = index.shape
    acc = _acc_dtype(feats.dtype)
    if M == 0:  # no points (possible only with checks off): every entry is invalid, the means are 0
        return feats.new_zeros((B, C, D))
    valid, safe = _split_index(index, M)
    rows = torch.gather(feats.to(acc), 1, safe.reshape(B, C * k, 1).expand(B, C * k, D))
    rows = torch.where(valid.reshape(B, C * k, 1), rows, 0)
    return (rows.reshape(B, C, k, D).sum(dim=2) / k).to(feats.dtype)


def gather_mean_backward(grad: torch.Tensor, index: torch.Tensor, M: int) -> torch.Tensor:
    """d feats of :func:`gather_mean`: scatter G[b, c] / k onto every point in KNN(T_c)."""
    B, C, D = grad.shape
    k = index.shape[2]
    acc = _acc_dtype(grad.dtype)
    if M == 0:  # no points: nothing to scatter onto
        return grad.new_zeros((B, 0, D))
    valid, safe = _split_index(index, M)
    safe = safe.reshape(B, C * k)
    src = (grad.to(acc)[:, :, None, :] / k).expand(B, C, k, D).reshape(B, C * k, D)
    src = torch.where(valid.reshape(B, C * k, 1), src, 0)
    out = torch.zeros(B, M, D, dtype=acc, device=grad.device)
    out.scatter_add_(1, safe[:, :, None].expand(B, C * k, D), src)
    return out.to(grad.dtype)


def knn_center_features(feats: torch.Tensor, points: torch.Tensor, centers: torch.Tensor, k: int):
    """Eq. 1 end to end: ``(center_feats [B, C, D], knn_index [B, C, k])``; points/centers ``[B, *, 2]``."""
    index = knn_index(points, centers, k)
    return gather_mean(feats, index), index


def _similarity(feats, centers, alpha, beta):
    """Eq. 2's sim for every (point, center) pair, ``[B, M, C]`` in the accumulation dtype."""
    acc = _acc_dtype(feats.dtype)
    cos = F.normalize(feats.to(acc), dim=-1, eps=EPS) @ F.normalize(centers.to(acc), dim=-1, eps=EPS).transpose(1, 2)
    if alpha is None:
        return cos
    # Context-Cluster style learnable similarity: sigmoid(beta + alpha * cos).
    return torch.sigmoid(beta.to(acc).reshape(()) + alpha.to(acc).reshape(()) * cos)


def cosine_assign(feats, centers, alpha=None, beta=None):
    """Eq. 2: P^QT_i = argmax_j sim(F_i, F^c_j) (ties to the lower j), and the maximum sim.

    The reference materialises the whole ``[B, M, C]`` similarity; kernels never do.
    """
    s = _similarity(feats, centers, alpha, beta)
    sim, assign = s.max(dim=-1)  # torch.max returns the first maximal index
    return assign, sim.to(feats.dtype)


def cosine_assign_backward(grad_sim, feats, centers, assign, sim, alpha=None, beta=None):
    """Gradients of ``sim`` w.r.t. (feats, centers, alpha, beta); formulas in the module docstring.

    ``(None, None)`` for alpha/beta when they are absent. Checked against finite differences by
    the gradcheck tests.
    """
    acc = _acc_dtype(feats.dtype)
    B, M, D = feats.shape
    C = centers.shape[1]
    f = feats.to(acc)
    c = centers.to(acc)
    valid, safe = _split_index(assign, C)
    n_raw = f.norm(dim=-1)  # |f_i|
    m_raw = c.norm(dim=-1)  # |c_j|
    n = n_raw.clamp_min(EPS)
    m = m_raw.clamp_min(EPS)
    f_hat = f / n[..., None]
    c_hat = c / m[..., None]
    c_hat_a = torch.gather(c_hat, 1, safe[..., None].expand(B, M, D))  # c_a / m_a
    cos = (f_hat * c_hat_a).sum(-1)
    g = torch.where(valid, grad_sim.to(acc), 0)
    ga = gb = None
    if alpha is None:
        gc_pt = g
    else:
        s = torch.sigmoid(beta.to(acc).reshape(()) + alpha.to(acc).reshape(()) * cos)
        ds = s * (1 - s)
        gc_pt = g * alpha.to(acc).reshape(()) * ds
        ga = (g * ds * cos).sum().reshape(alpha.shape).to(alpha.dtype)
        gb = (g * ds).sum().reshape(beta.shape).to(beta.dtype)
    # grad f_i = gc_i / n_i * (c_a / m_a - [|f_i| >= eps] cos_i f_i / n_i)
    f_mask = (n_raw >= EPS).to(acc)
    grad_f = gc_pt[..., None] / n[..., None] * (c_hat_a - (f_mask * cos)[..., None] * f_hat)
    # grad c_j = 1/m_j (sum_{i in j} gc_i f_i / n_i - [|c_j| >= eps] (sum_{i in j} gc_i cos_i) c_j / m_j)
    S = torch.zeros(B, C, D, dtype=acc, device=f.device)
    S.scatter_add_(1, safe[..., None].expand(B, M, D), gc_pt[..., None] * f_hat)
    T = torch.zeros(B, C, dtype=acc, device=f.device)
    T.scatter_add_(1, safe, gc_pt * cos)
    c_mask = (m_raw >= EPS).to(acc)
    grad_c = (S - (c_mask * T)[..., None] * c_hat) / m[..., None]
    return grad_f.to(feats.dtype), grad_c.to(centers.dtype), ga, gb


def cluster_aggregate(values, assign, sim, value_centers):
    """Eq. 3 before H': (v^c_j + sum_{i: a_i=j} s_i v_i) / (1 + sum_{i: a_i=j} s_i).

    Returns ``(out [B, C, D], den [B, C])``; ``den = 1 + sum s`` is saved for the backward.
    """
    B, M, D = values.shape
    C = value_centers.shape[1]
    acc = _acc_dtype(values.dtype)
    valid, safe = _split_index(assign, C)
    w = torch.where(valid, sim.to(acc), 0)  # s_i * 1(P_i = j); invalid points count for nothing
    num = value_centers.to(acc).clone()
    num.scatter_add_(1, safe[..., None].expand(B, M, D), torch.where(valid[..., None], w[..., None] * values.to(acc), 0))
    den = torch.ones(B, C, dtype=acc, device=values.device)
    den.scatter_add_(1, safe, w)
    return (num / den[..., None]).to(values.dtype), den.to(values.dtype)


def cluster_aggregate_backward(grad_out, values, assign, sim, out, den):
    """Gradients of :func:`cluster_aggregate` w.r.t. (values, sim, value_centers)."""
    B, M, D = values.shape
    C = out.shape[1]
    acc = _acc_dtype(values.dtype)
    valid, safe = _split_index(assign, C)
    g_over_den = grad_out.to(acc) / den.to(acc)[..., None]  # G_j / den_j
    rows = torch.where(valid[..., None], torch.gather(g_over_den, 1, safe[..., None].expand(B, M, D)), 0)
    out_rows = torch.gather(out.to(acc), 1, safe[..., None].expand(B, M, D))
    grad_values = sim.to(acc)[..., None] * rows
    grad_sim = (rows * (values.to(acc) - out_rows)).sum(-1)
    return grad_values.to(values.dtype), grad_sim.to(sim.dtype), g_over_den.to(out.dtype)


def superpixel_cluster(feats, centers, values, value_centers, alpha=None, beta=None):
    """Eq. 2 + Eq. 3 in one op: ``(out [B, C, D], den [B, C], assign [B, M], sim [B, M])``."""
    assign, sim = cosine_assign(feats, centers, alpha, beta)
    out, den = cluster_aggregate(values, assign, sim, value_centers)
    return out, den, assign, sim


def cluster_dispatch(center_out, assign, sim, residual=None):
    """Eq. 9: F^SIL_i = F_i + sim(F_i, F^c_j) H''(F^CR_j) with j = P^QT_i: ``[B, M, D]``."""
    B, C, D = center_out.shape
    M = assign.shape[1]
    acc = _acc_dtype(center_out.dtype)
    valid, safe = _split_index(assign, C)
    rows = torch.gather(center_out.to(acc), 1, safe[..., None].expand(B, M, D))
    out = torch.where(valid[..., None], sim.to(acc)[..., None] * rows, 0)
    if residual is not None:
        out = out + residual.to(acc)
    return out.to(center_out.dtype)


def cluster_dispatch_backward(grad_out, center_out, assign, sim, has_residual: bool):
    """Gradients of :func:`cluster_dispatch` w.r.t. (center_out, sim, residual or None)."""
    B, C, D = center_out.shape
    M = assign.shape[1]
    acc = _acc_dtype(center_out.dtype)
    valid, safe = _split_index(assign, C)
    g = grad_out.to(acc)
    rows = torch.gather(center_out.to(acc), 1, safe[..., None].expand(B, M, D))
    grad_sim = torch.where(valid, (g * rows).sum(-1), 0)
    grad_center = torch.zeros(B, C, D, dtype=acc, device=g.device)
    grad_center.scatter_add_(1, safe[..., None].expand(B, M, D), torch.where(valid[..., None], sim.to(acc)[..., None] * g, 0))
    grad_residual = grad_out.clone() if has_residual else None
    return grad_center.to(center_out.dtype), grad_sim.to(sim.dtype), grad_residual
