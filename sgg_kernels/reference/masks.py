"""Gaussian pair masks (segmentation-grounded SGG, ICCV'21, Sec. 2.3-2.6, Eq. 4 and 6) in plain PyTorch.

The test oracle and the fallback backend of family ``masks``. Written equation
by equation, float64-safe, differentiable by autograd.

**gaussian_kernels** (Eq. 6's K, size odd and at most MAX_KERNEL_SIZE = 255): params (log sx^2,
log sy^2, raw rho) -> s = exp(v/2) clamped to at least 1e-7, rho = tanh(raw); kernel[r, c] with
u = c - size//2 (x, columns), v = r - size//2 (y, rows) is proportional to
exp(-(u^2/sx^2 - 2 rho u v/(sx sy) + v^2/sy^2) / (2 (1 - rho^2))), normalised to sum 1.

**pair_mask_conv** (Eq. 6): out_p = (K_s (*) m_s) . (K_o (*) m_o), (*) the cross-correlation of
``F.conv2d`` with zero padding size//2, per class channel; K_s, K_o the pair's kernels for the
subject and object roles (``[P, 2, d, d]``, the authors' released code) or each object's own
kernel (``[K, d, d]``, the paper's text). Masks stay in their own box frames; with ``boxes`` and
``out_size = R`` both smoothed masks are resampled into the pair's union box first:

    output pixel (i, j) of the union box U sits at x = U.x1 + (j + 0.5) w_U / R, y likewise;
    a smoothed mask of box b is read there bilinearly at mask coordinates
    ((x - b.x1) / w_b * m - 0.5, (y - b.y1) / h_b * m - 0.5), clamped to the mask's border
    (``grid_sample(align_corners=False, padding_mode="border")``), and is 0 where (x, y) lies
    outside b (x < b.x1 or x > b.x2, same for y). Box sizes are clamped to at least 1e-6. Positions
    are computed in float32 (float64 for float64 masks) whatever the masks' dtype.

Backward, G = grad, S_p = K_s (*) m_s and O_p = K_o (*) m_o the smoothed masks, A_s / A_o the
resamplings into the union frame (the identity in the own frames; A(x) = wy x wx^T per channel,
so A^T(g) = wy^T g wx):

    g_S = A_s^T(G . A_o(O)),   g_O = A_o^T(G . A_s(S))
    d m[k] = sum_{p: s_p = k} K_s (*)^T g_S + sum_{p: o_p = k} K_o (*)^T g_O    ((*)^T: conv_transpose2d)
    d K_s[r, c] = sum_{channel, y, x} g_S[y, x] m_s[y + r - d//2, x + c - d//2]  (zero outside the mask)

and d K_o likewise; with per-object kernels ``[K, d, d]`` these are summed over every pair and role
using the object. Boxes get no gradient. Empty inputs (P = 0 pairs, C = 0 classes) give empty outputs
and zero gradients. In the union frame a NaN sample coordinate (from a non-finite box) reads nothing,
like a position outside the box: weight 0 at index 0, as in the kernels (the op layer rejects
non-finite boxes while value checks are on). An invalid pair (an index outside ``[0, K)``, possible only
with checks off) has output 0 and contributes nothing to any gradient.

**transfer_masks** (Eq. 4): m~_k = sum_j S[l_k, j] sigmoid(mask_logits[k, j]), the mask of each
object's own target class as a similarity-weighted mix of the source classes' masks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from .cluster import _split_index

SIGMA_MIN = 1e-7
BOX_EPS = 1e-6
# The largest Gaussian kernel size delta (gaussian_kernels): 2 x 128 - 1, the widest kernel that still
# reaches every pixel of a 128 x 128 mask from every other (the paper's masks are 28 x 28, its kernels
# 7 x 7); a larger one only multiplies the zero padding. It also bounds the [..., delta, delta] output.
MAX_KERNEL_SIZE = 255


def gaussian_kernels(params: Tensor, size: int = 7) -> Tensor:
    """Eq. 6's Gaussian kernels: ``params [..., 3]`` (log sx^2, log sy^2, raw rho) -> ``[..., size, size]``."""
    _checks.odd_size(size, "size", MAX_KERNEL_SIZE, "the kernel has a centre; MAX_KERNEL_SIZE")
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


def _pair_index(pairs: Tensor, K: int):
    """``(valid [P], s [P], o [P])``: invalid pairs (an index outside ``[0, K)``, possible only with
    checks off) get the safe index 0 and are masked by the callers."""
    vs, s = _split_index(pairs[:, 0], K)
    vo, o = _split_index(pairs[:, 1], K)
    valid = vs & vo
    zero = torch.zeros_like(s)
    return valid, torch.where(valid, s, zero), torch.where(valid, o, zero)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]``, also when ``x`` has no rows (K = 0: every pair is invalid)."""
    if x.shape[0] == 0:
        return x.new_zeros((index.shape[0],) + tuple(x.shape[1:]))
    return x[index]


def _role_kernels(kernels: Tensor, s: Tensor, o: Tensor):
    """(kernel of the subject, kernel of the object) of each pair, ``[P, d, d]`` each."""
    if kernels.dim() == 4:  # [P, 2, d, d]: per pair and role
        return kernels[:, 0], kernels[:, 1]
    return _rows(kernels, s), _rows(kernels, o)  # [K, d, d]: per object


def _grouped(x: Tensor, kernels: Tensor):
    """``x [P, C, a, a]`` as one image of P*C channels and each pair's kernel repeated per channel."""
    P, C = x.shape[:2]
    d = kernels.shape[-1]
    weight = kernels[:, None, None].expand(P, C, 1, d, d).reshape(P * C, 1, d, d)
    return x.reshape(1, P * C, *x.shape[2:]), weight


def _smooth(masks: Tensor, kernels: Tensor) -> Tensor:
    """Each [C, m, m] mask cross-correlated with its own [d, d] kernel: grouped conv2d, ``[P, C, m, m]``."""
    P, C, m, _ = masks.shape
    if P * C * m == 0:  # no planes (P = 0 pairs, C = 0 classes) or empty ones: conv2d needs groups >= 1
        return masks.new_zeros((P, C, m, m))
    x, weight = _grouped(masks, kernels)
    return F.conv2d(x, weight, padding=kernels.shape[-1] // 2, groups=P * C).reshape(P, C, m, m)


def _smooth_backward(grad: Tensor, masks: Tensor, kernels: Tensor):
    """Gradients of :func:`_smooth`: (d masks [P, C, m, m], d kernels [P, d, d])."""
    P, C, m, _ = masks.shape
    d = kernels.shape[-1]
    if P * C * m == 0:  # nothing to convolve: zero gradients of the right shapes (as _smooth)
        return masks.new_zeros((P, C, m, m)), kernels.new_zeros((P, d, d))
    g, weight = _grouped(grad, kernels)
    d_masks = F.conv_transpose2d(g, weight, padding=d // 2, groups=P * C).reshape(P, C, m, m)
    # d K[r, c] = sum_{channel, y, x} G[y, x] m[y + r - d//2, x + c - d//2]: the padded mask
    # cross-correlated with G
    padded = F.pad(masks, (d // 2,) * 4).reshape(1, P * C, m + 2 * (d // 2), m + 2 * (d // 2))
    d_kernels = F.conv2d(padded, grad.reshape(P * C, 1, m, m), groups=P * C).reshape(P, C, d, d).sum(1)
    return d_masks, d_kernels


def _union_weights(own: Tensor, union: Tensor, m: int, out_size: int):
    """The resampling of masks in the frame of boxes ``own [P, 4]`` into ``union [P, 4]``, R x R,
    as separable weights ``(wy [P, R, m], wx [P, R, m])``: out = wy @ mask @ wx^T per channel."""
    R = out_size
    steps = (torch.arange(R, dtype=own.dtype, device=own.device) + 0.5) / R
    uw = (union[:, 2] - union[:, 0]).clamp_min(BOX_EPS)
    uh = (union[:, 3] - union[:, 1]).clamp_min(BOX_EPS)
    x = union[:, 0, None] + steps[None] * uw[:, None]  # [P, R]
    y = union[:, 1, None] + steps[None] * uh[:, None]
    bw = (own[:, 2] - own[:, 0]).clamp_min(BOX_EPS)
    bh = (own[:, 3] - own[:, 1]).clamp_min(BOX_EPS)
    fx = (x - own[:, 0, None]) / bw[:, None] * m - 0.5  # mask column coordinate, [P, R]
    fy = (y - own[:, 1, None]) / bh[:, None] * m - 0.5
    # a NaN coordinate (a non-finite box) reads nothing, like a position outside the box
    inside_x = (x >= own[:, 0, None]) & (x <= own[:, 2, None]) & ~torch.isnan(fx)
    inside_y = (y >= own[:, 1, None]) & (y <= own[:, 3, None]) & ~torch.isnan(fy)

    def axis_weights(f):  # [P, R, m]: bilinear weights along one axis, clamped to the border
        f = f.clamp(0, m - 1)
        lo = f.floor().clamp(max=m - 1)
        frac = f - lo
        lo = torch.where(torch.isnan(lo), torch.zeros_like(lo), lo).to(torch.int64)  # NaN: index 0, never out of bounds
        hi = (lo + 1).clamp(max=m - 1)
        w = own.new_zeros(f.shape + (m,))
        w.scatter_add_(-1, lo[..., None], (1 - frac)[..., None])
        w.scatter_add_(-1, hi[..., None], frac[..., None])
        return w

    # a select, not a product: the weights of a NaN coordinate are NaN
    return (torch.where(inside_y[..., None], axis_weights(fy), 0),
            torch.where(inside_x[..., None], axis_weights(fx), 0))


def _frames(masks: Tensor, pairs: Tensor, boxes: Tensor, out_size: int):
    """Resampling weights of the subject and the object of each pair into its union box."""
    _, s, o = _pair_index(pairs, masks.shape[0])
    # sample positions in float32 (float64 for float64 masks): half box coordinates would be off by
    # up to a pixel; the weights are then cast to the masks' dtype
    acc = torch.float64 if masks.dtype == torch.float64 else torch.float32
    bs, bo = _rows(boxes, s).to(acc), _rows(boxes, o).to(acc)
    union = torch.cat([torch.minimum(bs[:, :2], bo[:, :2]), torch.maximum(bs[:, 2:], bo[:, 2:])], dim=1)
    m = masks.shape[-1]
    return tuple(tuple(w.to(masks.dtype) for w in _union_weights(b, union, m, out_size)) for b in (bs, bo))


def _resample(x: Tensor, w) -> Tensor:
    return torch.einsum("pry,pcyx,pqx->pcrq", w[0], x, w[1])


def _resample_backward(g: Tensor, w) -> Tensor:
    return torch.einsum("pry,pcrq,pqx->pcyx", w[0], g, w[1])


def _forward_parts(masks: Tensor, pairs: Tensor, kernels: Tensor):
    valid, s, o = _pair_index(pairs, masks.shape[0])
    ks, ko = _role_kernels(kernels, s, o)
    ms, mo = _rows(masks, s), _rows(masks, o)
    return valid, s, o, ks, ko, ms, mo


def pair_mask_conv(masks: Tensor, pairs: Tensor, kernels: Tensor, boxes: Optional[Tensor] = None,
                   out_size: Optional[int] = None) -> Tensor:
    """Eq. 6: (K_s (*) m_s) . (K_o (*) m_o) per pair, ``[P, C, m, m]`` (or ``[P, C, R, R]`` in the
    union frame). The reference gathers and convolves per pair; kernels never do."""
    valid, s, o, ks, ko, ms, mo = _forward_parts(masks, pairs, kernels)
    ss, so = _smooth(ms, ks), _smooth(mo, ko)
    if boxes is not None and out_size:
        ws, wo = _frames(masks, pairs, boxes, out_size)
        ss, so = _resample(ss, ws), _resample(so, wo)
    return torch.where(valid[:, None, None, None], ss * so, 0).contiguous()


def pair_mask_conv_backward(grad: Tensor, masks: Tensor, pairs: Tensor, kernels: Tensor,
                            boxes: Optional[Tensor] = None, out_size: int = 0, need_masks: bool = True,
                            need_kernels: bool = True) -> Tuple[Tensor, Tensor]:
    """``(d masks [K, C, m, m], d kernels)`` of :func:`pair_mask_conv` (an empty ``[0]`` tensor for
    a gradient not needed); the formulas are in the module docstring."""
    K = masks.shape[0]
    valid, s, o, ks, ko, ms, mo = _forward_parts(masks, pairs, kernels)
    grad = torch.where(valid[:, None, None, None], grad, 0)
    ss, so = _smooth(ms, ks), _smooth(mo, ko)
    if boxes is not None and out_size:
        ws, wo = _frames(masks, pairs, boxes, out_size)
        gs = _resample_backward(grad * _resample(so, wo), ws)
        go = _resample_backward(grad * _resample(ss, ws), wo)
    else:
        gs, go = grad * so, grad * ss
    dms, dks = _smooth_backward(gs, ms, ks)
    dmo, dko = _smooth_backward(go, mo, ko)
    d_masks = d_kernels = masks.new_empty((0,))
    if need_masks:
        d_masks = torch.zeros_like(masks).index_add_(0, s, dms).index_add_(0, o, dmo)
    if need_kernels:
        if kernels.dim() == 4:
            d_kernels = torch.stack([dks, dko], dim=1)
        else:
            d_kernels = torch.zeros_like(kernels).index_add_(0, s, dks).index_add_(0, o, dko)
    return d_masks, d_kernels


def transfer_masks(mask_logits: Tensor, similarity: Tensor, labels: Tensor) -> Tensor:
    """Eq. 4 for each object's own class: ``[K, d_m, m, m]``, ``[d_g, d_m]``, ``[K]`` -> ``[K, m, m]``."""
    weights = similarity[labels]  # [K, d_m]
    return torch.einsum("kj,kjyx->kyx", weights.to(mask_logits.dtype), torch.sigmoid(mask_logits))


__all__ = ["gaussian_kernels", "pair_mask_conv", "pair_mask_conv_backward", "transfer_masks"]
