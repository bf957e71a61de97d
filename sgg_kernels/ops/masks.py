"""Gaussian pair-mask ops (segmentation-grounded SGG, ICCV'21, Sec. 2.3-2.6, Eq. 4 and 6).

This module holds the family's plain-PyTorch functions, with argument checks: DESIGN.md has no
kernels for them. :func:`gaussian_kernels` gives Eq. 6's kernels. :func:`transfer_masks` is Eq. 4
for each object's own class.

The fused ``pair_mask_conv`` op is not here yet: it needs C++/CUDA kernels. Its oracle is
``sgg_kernels.reference.masks.pair_mask_conv``.
"""
from __future__ import annotations

import numbers

from torch import Tensor

from .. import _checks
from ..reference import masks as ref


def gaussian_kernels(params: Tensor, size: int = 7) -> Tensor:
    """Eq. 6's Gaussian kernels, normalised to sum 1, differentiable in ``params``.

    Args:
        params (Tensor[..., 3]): (log sigma_x^2, log sigma_y^2, raw rho) per kernel. sigma =
            exp(v / 2) is clamped to at least 1e-7, and rho = tanh(raw).
        size (int): the odd kernel size delta (7 in the paper's released code).

    Returns:
        Tensor[..., size, size]. kernel[r, c] has u = c - size//2 along x (columns) and
        v = r - size//2 along y (rows), and is proportional to
        exp(-(u^2/sx^2 - 2 rho u v/(sx sy) + v^2/sy^2) / (2 (1 - rho^2))).
    """
    if not isinstance(params, Tensor) or params.dim() < 1 or params.shape[-1] != 3:
        got = _checks._describe(params) if isinstance(params, Tensor) else type(params).__name__
        raise ValueError(f"params must be a floating tensor [..., 3] of (log sx^2, log sy^2, raw rho), got {got}")
    if params.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"params must be a floating tensor [..., 3], got {_checks._describe(params)}")
    if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd int (the kernel has a centre), got {size!r}")
    return ref.gaussian_kernels(params, int(size))


def transfer_masks(mask_logits: Tensor, similarity: Tensor, labels: Tensor) -> Tensor:
    """Eq. 4 for each object's own class: a similarity-weighted mix of the source classes' masks.

    m~_k = sum_j S[l_k, j] sigmoid(mask_logits[k, j]).

    Args:
        mask_logits (Tensor[K, d_m, m, m]): mask logits of each object over the d_m source classes
            (the dataset the segmentation head was trained on).
        similarity (Tensor[d_g, d_m]): S, from each target class to each source class. A class
            present in both datasets has a one-hot row.
        labels (Tensor[K] int64): the target class l_k of each object, in [0, d_g).

    Returns:
        Tensor[K, m, m] in [0, 1] when the rows of S sum to at most 1.
    """
    _checks.tensor(mask_logits, "mask_logits", "K, d_m, m, m")
    _checks.tensor(similarity, "similarity", "d_g, d_m")
    _checks.tensor(labels, "labels", "K", kind="index")
    _checks.size(similarity, "similarity", 1, mask_logits.shape[1], "d_m, the classes of mask_logits")
    _checks.size(labels, "labels", 0, mask_logits.shape[0], "K, the objects of mask_logits")
    _checks.same_device([("mask_logits", mask_logits), ("similarity", similarity), ("labels", labels)])
    _checks.index_range(labels, "labels", similarity.shape[0], "d_g, the rows of similarity")
    return ref.transfer_masks(mask_logits, similarity, labels)
