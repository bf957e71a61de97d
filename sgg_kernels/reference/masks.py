"""Gaussian pair masks (segmentation-grounded SGG, ICCV'21, Sec. 2.3-2.6, Eq. 4 and 6) in plain PyTorch.

The test oracle (and, once the op layer lands, the fallback) of family ``masks``. Written equation
by equation, float64-safe, differentiable by autograd.

**gaussian_kernels** (Eq. 6's K): params (log sx^2, log sy^2, raw rho) -> s = exp(v/2) clamped to
at least 1e-7, rho = tanh(raw); kernel[r, c] with u = c - size//2 (x, columns), v = r - size//2
(y, rows) is proportional to exp(-(u^2/sx^2 - 2 rho u v/(sx sy) + v^2/sy^2) / (2 (1 - rho^2))),
normalised to sum 1.

**pair_mask_conv** (Eq. 6): out_p = (K_s (*) m_s) . (K_o (*) m_o), (*) the cross-correlation of
``F.conv2d`` with zero padding size//2, per class channel; K_s, K_o the pair's kernels for the
subject and object roles (``[P, 2, d, d]``, the authors' released code) or each object's own
kernel (``[K, d, d]``, the paper's text). Masks stay in their own box frames; with ``boxes`` and
``out_size = R`` both smoothed masks are resampled into the pair's union box first:

    output pixel (i, j) of the union box U sits at x = U.x1 + (j + 0.5) w_U / R, y likewise;
    a smoothed mask of box b is read there bilinearly at mask coordinates
    ((x - b.x1) / w_b * m - 0.5, (y - b.y1) / h_b * m - 0.5), clamped to the mask's border
    (``grid_sample(align_corners=False, padding_mode="border")``), and is 0 where (x, y) lies
    outside b (x < b.x1 or x > b.x2, same for y). Box sizes are clamped to at least 1e-6.

**transfer_masks** (Eq. 4): m~_k = sum_j S[l_k, j] sigmoid(mask_logits[k, j]), the mask of each
object's own target class as a similarity-weighted mix of the source classes' masks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

SIGMA_MIN = 1e-7
BOX_EPS = 1e-6


def gaussian_kernels(params: Tensor, size: int = 7) -> Tensor:
    """Eq. 6's Gaussian kernels: ``params [..., 3]`` (log sx^2, log sy^2, raw rho) -> ``[..., size, size]``."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd int (the kernel has a centre), got {size}")
    sx = torch.exp(params[..., 0] / 2).clamp_min(SIGMA_MIN)[..., None, None]
    sy = torch.exp(params[..., 1] / 2).clamp_min(SIGMA_MIN)[..., None, None]
    rho = torch.tanh(params[..., 2])[..., None, None]
    offsets = torch.arange(size, dtype=params.dtype, device=params.device) - size // 2
    v, u = torch.meshgrid(offsets, offsets, indexing="ij")  # v: rows (y), u: columns (x)
    q = (u / sx) ** 2 - 2 * rho * u * v / (sx * sy) + (v / sy) ** 2
    logk = -q / (2 * (1 - rho * rho))
    # normalise in log space (softmax over the size x size cells): stable for tiny sigmas
    flat = logk.flatten(-2)
    return torch.softmax(flat, dim=-1).reshape(logk.shape)


def _role_kernels(kernels: Tensor, pairs: Tensor):
    """(kernel of the subject, kernel of the object) of each pair, ``[P, d, d]`` each."""
    if kernels.dim() == 4:  # [P, 2, d, d]: per pair and role
        return kernels[:, 0], kernels[:, 1]
    return kernels[pairs[:, 0]], kernels[pairs[:, 1]]  # [K, d, d]: per object


def _smooth(masks: Tensor, kernels: Tensor) -> Tensor:
    """Each [C, m, m] mask cross-correlated with its own [d, d] kernel: grouped conv2d, ``[P, C, m, m]``."""
    P, C, m, _ = masks.shape
    d = kernels.shape[-1]
    weight = kernels[:, None, None].expand(P, C, 1, d, d).reshape(P * C, 1, d, d)
    out = F.conv2d(masks.reshape(1, P * C, m, m), weight, padding=d // 2, groups=P * C)
    return out.reshape(P, C, m, m)


def _to_union_frame(smoothed: Tensor, own: Tensor, union: Tensor, out_size: int) -> Tensor:
    """Resample masks in the frame of their boxes ``own [P, 4]`` into ``union [P, 4]`` (R x R)."""
    P = smoothed.shape[0]
    R = out_size
    steps = (torch.arange(R, dtype=smoothed.dtype, device=smoothed.device) + 0.5) / R
    uw = (union[:, 2] - union[:, 0]).clamp_min(BOX_EPS)
    uh = (union[:, 3] - union[:, 1]).clamp_min(BOX_EPS)
    x = union[:, 0, None] + steps[None] * uw[:, None]  # [P, R]
    y = union[:, 1, None] + steps[None] * uh[:, None]
    bw = (own[:, 2] - own[:, 0]).clamp_min(BOX_EPS)
    bh = (own[:, 3] - own[:, 1]).clamp_min(BOX_EPS)
    m = smoothed.shape[-1]
    fx = (x - own[:, 0, None]) / bw[:, None] * m - 0.5  # mask column coordinate, [P, R]
    fy = (y - own[:, 1, None]) / bh[:, None] * m - 0.5
    inside_x = (x >= own[:, 0, None]) & (x <= own[:, 2, None])
    inside_y = (y >= own[:, 1, None]) & (y <= own[:, 3, None])

    def axis_weights(f, n):  # [P, R, n]: bilinear weights along one axis, clamped to the border
        f = f.clamp(0, n - 1)
        lo = f.floor().clamp(max=n - 1)
        frac = f - lo
        lo = lo.to(torch.int64)
        hi = (lo + 1).clamp(max=n - 1)
        w = smoothed.new_zeros(f.shape + (n,))
        w.scatter_add_(-1, lo[..., None], (1 - frac)[..., None])
        w.scatter_add_(-1, hi[..., None], frac[..., None])
        return w

    wy = axis_weights(fy, m) * inside_y[..., None]  # [P, R, m]
    wx = axis_weights(fx, m) * inside_x[..., None]
    return torch.einsum("pry,pcyx,pqx->pcrq", wy, smoothed, wx)


def pair_mask_conv(masks: Tensor, pairs: Tensor, kernels: Tensor, boxes: Optional[Tensor] = None,
                   out_size: Optional[int] = None) -> Tensor:
    """Eq. 6: (K_s (*) m_s) . (K_o (*) m_o) per pair, ``[P, C, m, m]`` (or ``[P, C, R, R]`` in the
    union frame). The reference gathers and convolves per pair; kernels never do."""
    ks, ko = _role_kernels(kernels, pairs)
    ms = _smooth(masks[pairs[:, 0]], ks)
    mo = _smooth(masks[pairs[:, 1]], ko)
    if boxes is None:
        return ms * mo
    bs, bo = boxes[pairs[:, 0]].to(masks.dtype), boxes[pairs[:, 1]].to(masks.dtype)
    union = torch.cat([torch.minimum(bs[:, :2], bo[:, :2]), torch.maximum(bs[:, 2:], bo[:, 2:])], dim=1)
    return _to_union_frame(ms, bs, union, out_size) * _to_union_frame(mo, bo, union, out_size)


def transfer_masks(mask_logits: Tensor, similarity: Tensor, labels: Tensor) -> Tensor:
    """Eq. 4 for each object's own class: ``[K, d_m, m, m]``, ``[d_g, d_m]``, ``[K]`` -> ``[K, m, m]``."""
    weights = similarity[labels]  # [K, d_m]
    return torch.einsum("kj,kjyx->kyx", weights.to(mask_logits.dtype), torch.sigmoid(mask_logits))


__all__ = ["gaussian_kernels", "pair_mask_conv", "transfer_masks"]
