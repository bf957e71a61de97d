"""Gaussian pair-mask ops (segmentation-grounded SGG, ICCV'21, Sec. 2.3-2.6, Eq. 4 and 6).

- :func:`gaussian_kernels` gives Eq. 6's kernels and :func:`transfer_masks` is Eq. 4 for each
  object's own class: plain PyTorch with argument checks (DESIGN.md has no kernels for them).
- :func:`pair_mask_conv` is Eq. 6's fused op, ``sgg_kernels::pair_mask_conv``: a ``torch.library``
  op with a fake kernel and an autograd formula whose backward is its own op
  (``sgg_kernels::pair_mask_conv_backward``). Backends: ``reference``
  (:mod:`sgg_kernels.reference.masks`, the spec), ``cpu`` (csrc/cpu/masks.cpp) and ``cuda``
  (csrc/cuda/masks.cu). The kernels read each object's mask in place; the per-pair gathered or
  convolved masks of the eager formulation never exist.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks
from .._backend import Kernels, value_checks_on
from ..reference import masks as ref

_LIB = "sgg_kernels"

_CONV = Kernels("masks", ref.pair_mask_conv, cpu="_pair_mask_conv", cuda="_pair_mask_conv")
_CONV_BWD = Kernels("masks", ref.pair_mask_conv_backward, cpu="_pair_mask_conv_backward",
                    cuda="_pair_mask_conv_backward")

KERNELS = {"pair_mask_conv": (_CONV, _CONV_BWD)}


def gaussian_kernels(params: Tensor, size: int = 7) -> Tensor:
    """Eq. 6's Gaussian kernels, normalised to sum 1, differentiable in ``params``.

    Args:
        params (Tensor[..., 3]): (log sigma_x^2, log sigma_y^2, raw rho) per kernel. sigma =
            exp(v / 2) is clamped to at least 1e-7, and rho = tanh(raw).
        size (int): the odd kernel size delta (7 in the paper's released code), at most
            ``MAX_KERNEL_SIZE`` = 255 (2 x 128 - 1: wide enough to spread over a whole 128 x 128 mask;
            beyond that a kernel only multiplies zero padding).

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
    size = _checks.odd_size(size, "size", ref.MAX_KERNEL_SIZE, "the kernel has a centre; MAX_KERNEL_SIZE")
    return ref.gaussian_kernels(params, size)


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

    Raises:
        IndexError for ``labels`` outside [0, d_g) while value checks are on
        (:func:`sgg_kernels.set_checks`; one reduction and one sync; not while ``torch.compile``
        traces it). With checks off no value is read back and such an object's mask is 0.
    """
    _checks.tensor(mask_logits, "mask_logits", "K, d_m, m, m")
    _checks.tensor(similarity, "similarity", "d_g, d_m")
    _checks.tensor(labels, "labels", "K", kind="index")
    _checks.size(similarity, "similarity", 1, mask_logits.shape[1], "d_m, the classes of mask_logits")
    _checks.size(labels, "labels", 0, mask_logits.shape[0], "K, the objects of mask_logits")
    _checks.same_device([("mask_logits", mask_logits), ("similarity", similarity), ("labels", labels)])
    d_g = similarity.shape[0]
    if _checks.module_value_checks():
        _checks.index_range(labels, "labels", d_g, "d_g, the rows of similarity")
    # No sync and no out-of-range read with checks off: an invalid label gets weights 0 (mask 0).
    valid = (labels >= 0) & (labels < d_g)
    if d_g == 0:
        weights = similarity.new_zeros((labels.shape[0], similarity.shape[1]))
    else:
        weights = torch.where(valid[:, None], similarity[labels.clamp(0, d_g - 1)], 0)
    return torch.einsum("kj,kjyx->kyx", weights.to(mask_logits.dtype), torch.sigmoid(mask_logits))  # ref.transfer_masks


# ---------------------------------------------------------------------------------------------
# pair_mask_conv (Eq. 6)
# ---------------------------------------------------------------------------------------------
def _mask_boxes(boxes: Optional[Tensor], masks: Tensor) -> Optional[Tensor]:
    """Box coordinates as the kernels read them: float64 for float64 masks, else float32."""
    if boxes is None:
        return None
    dtype = torch.float64 if masks.dtype == torch.float64 else torch.float32
    return boxes.detach().to(dtype).contiguous()


def _check_conv_values(pairs: Tensor, K: int, boxes: Optional[Tensor]) -> None:
    """Value checks, one fused reduction and one sync: pairs in [0, K); boxes (if given) finite."""
    if boxes is None:
        _checks.index_range(pairs, "pairs", K, "K, the number of masks")
        return
    non_finite = ~torch.isfinite(boxes).all(1)
    lo, hi, bad = torch.cat([_checks.index_bounds(pairs), non_finite.sum().reshape(1)]).tolist()
    _checks.check_bounds(lo, hi, "pairs", K, "K, the number of masks")
    if bad:
        k = int(non_finite.nonzero()[0, 0])
        raise ValueError(f"boxes must be finite: boxes[{k}] = {tuple(boxes[k].tolist())} ({bad} such boxes); "
                         "sgg_kernels.set_checks(False) skips this check (a NaN sample position then reads nothing)")


@torch.library.custom_op(f"{_LIB}::pair_mask_conv", mutates_args=())
def _pair_mask_conv_op(masks: Tensor, pairs: Tensor, kernels: Tensor, boxes: Optional[Tensor],
                       out_size: int) -> Tensor:
    mask_boxes = _mask_boxes(boxes, masks)
    if value_checks_on():
        _check_conv_values(pairs, masks.shape[0], mask_boxes)
    return _CONV(masks.device, masks.contiguous(), pairs.contiguous(), kernels.contiguous(), mask_boxes, out_size)


@_pair_mask_conv_op.register_fake
def _(masks, pairs, kernels, boxes, out_size):
    side = out_size if boxes is not None else masks.shape[-1]
    return masks.new_empty((pairs.shape[0], masks.shape[1], side, side))


@torch.library.custom_op(f"{_LIB}::pair_mask_conv_backward", mutates_args=())
def _pair_mask_conv_backward_op(grad: Tensor, masks: Tensor, pairs: Tensor, kernels: Tensor,
                                boxes: Optional[Tensor], out_size: int, need_masks: bool,
                                need_kernels: bool) -> Tuple[Tensor, Tensor]:
    dm, dk = _CONV_BWD(masks.device, grad.contiguous(), masks.contiguous(), pairs.contiguous(), kernels.contiguous(),
                       _mask_boxes(boxes, masks), out_size, need_masks, need_kernels)
    return (dm if need_masks else masks.new_empty((0,))), (dk if need_kernels else kernels.new_empty((0,)))


@_pair_mask_conv_backward_op.register_fake
def _(grad, masks, pairs, kernels, boxes, out_size, need_masks, need_kernels):
    dm = masks.new_empty(masks.shape if need_masks else (0,))
    dk = kernels.new_empty(kernels.shape if need_kernels else (0,))
    return dm, dk


def _conv_setup(ctx, inputs, output):
    masks, pairs, kernels, boxes, out_size = inputs
    ctx.out_size = out_size
    ctx.save_for_backward(masks, pairs, kernels, boxes)


def _conv_bwd(ctx, grad):
    masks, pairs, kernels, boxes = ctx.saved_tensors
    need_masks, _, need_kernels = ctx.needs_input_grad[:3]
    if not (need_masks or need_kernels):
        return None, None, None, None, None
    dm, dk = _pair_mask_conv_backward_op(grad, masks, pairs, kernels, boxes, ctx.out_size, need_masks, need_kernels)
    return (dm if need_masks else None), None, (dk if need_kernels else None), None, None


torch.library.register_autograd(f"{_LIB}::pair_mask_conv", _conv_bwd, setup_context=_conv_setup)
for _device in ("cpu", "cuda"):
    torch.library.register_autocast(f"{_LIB}::pair_mask_conv", _device, torch.float32)


def _check_frame(boxes: Optional[Tensor], out_size, K: int) -> None:
    """pair_mask_conv's ``boxes`` / ``out_size``: both or neither; boxes [K, 4], out_size >= 1."""
    if (boxes is None) != (out_size is None):
        raise ValueError("boxes and out_size go together: pass both for the union-box frame, neither for the "
                         f"objects' own frames (got boxes={'None' if boxes is None else 'a tensor'}, out_size={out_size!r})")
    if boxes is not None:
        _checks.tensor(boxes, "boxes", "K, 4")
        _checks.size(boxes, "boxes", 0, K, "K, the number of masks")
        _checks.size(boxes, "boxes", 1, 4, "(x1, y1, x2, y2)")
        if not isinstance(out_size, numbers.Integral) or isinstance(out_size, bool) or out_size < 1:
            raise ValueError(f"out_size must be a positive int (the side R of the union-frame output), got {out_size!r}")


def pair_mask_conv(masks: Tensor, pairs: Tensor, kernels: Tensor, boxes: Optional[Tensor] = None,
                   out_size: Optional[int] = None) -> Tensor:
    """Eq. 6, fused: each pair's subject and object masks smoothed by their Gaussian kernels, multiplied.

    out_p = (K_s (*) m_s) . (K_o (*) m_o), where (*) is ``F.conv2d``'s cross-correlation with zero
    padding size//2 on every class channel. The kernels read each object's mask where it is and
    write only the output: the per-pair gathered or convolved masks of the eager formulation
    (4 tensors of the output's size) never exist.

    Args:
        masks (Tensor[K, C, m, m]): each object's masks over C classes (e.g. from
            :func:`transfer_masks`), in the frame of its own box.
        pairs (Tensor[P, 2] int64): (subject, object) indices into the K masks.
        kernels (Tensor[P, 2, d, d] or Tensor[K, d, d]): from :func:`gaussian_kernels`, one per
            pair and role (``[:, 0]`` subject, ``[:, 1]`` object: the authors' released code) or
            one per object (the paper's text); d odd.
        boxes (Tensor[K, 4] or None): (x1, y1, x2, y2) of each object. With ``out_size``, both
            smoothed masks are resampled bilinearly into the pair's union box (zero outside their
            own box; see :mod:`sgg_kernels.reference.masks` for the exact sampling) before the
            product. Read in float32 (float64 for float64 masks); no gradient. Must be finite while
            value checks are on (:func:`sgg_kernels.set_checks`); with checks off a NaN sample
            position reads nothing (weight 0) on every backend.
        out_size (int or None): R, the side of the union-frame output; needs ``boxes``.

    Returns:
        Tensor[P, C, m, m], or Tensor[P, C, R, R] in the union frame; differentiable in ``masks``
        (summed over every pair that uses an object) and ``kernels`` (so, through
        :func:`gaussian_kernels`, in the Gaussian parameters).
    """
    _checks.tensor(masks, "masks", "K, C, m, m")
    K, C, m, m2 = masks.shape
    if m != m2:
        raise ValueError(f"masks must be square [K, C, m, m] (each object's mask in its box frame), got {_checks._describe(masks)}")
    _checks.tensor(pairs, "pairs", "P, 2", kind="index")
    _checks.size(pairs, "pairs", 1, 2, "(subject, object)")
    if not isinstance(kernels, Tensor) or kernels.dim() not in (3, 4):
        got = _checks._describe(kernels) if isinstance(kernels, Tensor) else type(kernels).__name__
        raise ValueError(f"kernels must be [P, 2, d, d] (per pair and role) or [K, d, d] (per object), got {got}")
    dims = "P, 2, d, d" if kernels.dim() == 4 else "K, d, d"
    _checks.tensor(kernels, "kernels", dims)
    d = kernels.shape[-1]
    if kernels.shape[-2] != d or d % 2 == 0:
        raise ValueError(f"kernels must be square with an odd size d (the kernel has a centre), got {_checks._describe(kernels)}")
    if kernels.dim() == 4:
        _checks.size(kernels, "kernels", 0, pairs.shape[0], "P, the number of pairs (kernels per pair and role)")
        _checks.size(kernels, "kernels", 1, 2, "(subject, object) roles")
    else:
        _checks.size(kernels, "kernels", 0, K, "K, the number of masks (kernels per object)")
    named = [("masks", masks), ("pairs", pairs), ("kernels", kernels)]
    _check_frame(boxes, out_size, K)
    if boxes is not None:
        named.append(("boxes", boxes))
    _checks.same_device(named)
    _checks.same_float_dtype([("masks", masks), ("kernels", kernels)])
    return _pair_mask_conv_op(masks, pairs, kernels, boxes, int(out_size) if boxes is not None else 0)
