"""Prototype ops (RDE, Sec. 3.3, Eq. 4; family ``prototypes``).

:func:`prototype_distance` is Eq. 4's two terms for every (instance, prototype) pair, fused:
``sgg_kernels::prototype_distance``, a ``torch.library`` op with a fake kernel and an autograd
formula whose backward is its own op (``sgg_kernels::prototype_distance_backward``). Backends:
``reference`` (:mod:`sgg_kernels.reference.prototypes`, the spec and its backward formulas),
``cpu`` (csrc/cpu/prototypes.cpp) and ``triton`` (:mod:`sgg_kernels.triton.prototypes`, the CUDA
backend). The kernels never materialise the ``[N, Q, D]`` differences x_n - p_q.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import _checks
from .._backend import Kernels
from ..reference import prototypes as ref

_LIB = "sgg_kernels"

_DIST = Kernels("prototypes", ref.prototype_distance, cpu="_prototype_distance", triton="prototype_distance")
_DIST_BWD = Kernels("prototypes", ref.prototype_distance_backward, cpu="_prototype_distance_backward",
                    triton="prototype_distance_backward")

# Public op name -> its tables (forward first), for `python -m sgg_kernels.info` and the tests.
KERNELS = {"prototype_distance": (_DIST, _DIST_BWD)}


# ---------------------------------------------------------------------------------------------
# prototype_distance (Eq. 4)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::prototype_distance", mutates_args=())
def _prototype_distance_op(x: Tensor, protos: Tensor) -> Tuple[Tensor, Tensor]:
    return _DIST(x.device, x, protos)


@_prototype_distance_op.register_fake
def _(x, protos):
    shape = (x.shape[0], protos.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op(f"{_LIB}::prototype_distance_backward", mutates_args=())
def _prototype_distance_backward_op(grad_cos: Tensor, grad_dist: Tensor, x: Tensor, protos: Tensor,
                                    need_x: bool, need_protos: bool) -> Tuple[Tensor, Tensor]:
    gx, gp = _DIST_BWD(x.device, grad_cos.contiguous(), grad_dist.contiguous(), x, protos, need_x, need_protos)
    return (gx if need_x else x.new_empty((0,))), (gp if need_protos else protos.new_empty((0,)))


@_prototype_distance_backward_op.register_fake
def _(grad_cos, grad_dist, x, protos, need_x, need_protos):
    return x.new_empty(x.shape if need_x else (0,)), protos.new_empty(protos.shape if need_protos else (0,))


def _distance_setup(ctx, inputs, output):
    x, protos = inputs
    ctx.save_for_backward(x, protos)  # cos and dist are recomputed (reference module docstring)


def _distance_bwd(ctx, grad_cos, grad_dist):
    x, protos = ctx.saved_tensors
    need_x, need_protos = ctx.needs_input_grad[:2]
    if not (need_x or need_protos):
        return None, None
    # An output that took no part in the loss arrives as None: it contributes nothing.
    if grad_cos is None:
        grad_cos = x.new_zeros((x.shape[0], protos.shape[0]))
    if grad_dist is None:
        grad_dist = x.new_zeros((x.shape[0], protos.shape[0]))
    gx, gp = _prototype_distance_backward_op(grad_cos, grad_dist, x, protos, need_x, need_protos)
    return (gx if need_x else None), (gp if need_protos else None)


torch.library.register_autograd(f"{_LIB}::prototype_distance", _distance_bwd, setup_context=_distance_setup)
# Autocast: mixed float inputs are cast to float32, as for every other op of the package.
for _device in ("cpu", "cuda"):
    torch.library.register_autocast(f"{_LIB}::prototype_distance", _device, torch.float32)


def prototype_distance(x: Tensor, protos: Tensor) -> Tuple[Tensor, Tensor]:
    """Eq. 4's cosine similarity and Euclidean distance of every instance to every prototype, in one pass.

    cos[n, q]  = <x_n, p_q> / (max(|x_n|, 1e-12) max(|p_q|, 1e-12))   (L2(x) . L2(P), ``F.normalize``'s eps)
    dist[n, q] = sqrt(max(||x_n - p_q||^2, 1e-12))                     (||x - P||_2, finite gradient at x = P)

    Eq. 4 prints their sum, D(x, P) = L2(x) . L2(P) + ||x - P||_2 (a similarity plus a distance);
    the op returns the two terms so a loss can combine them as it reads the equation. The kernels
    (C++ CPU, Triton) compute <x_n, p_q> as a GEMM and ||x_n - p_q||^2 = |x_n|^2 + |p_q|^2 -
    2 <x_n, p_q>, recomputed by direct differences wherever that cancels (||x_n - p_q||^2 below
    1/64 of |x_n|^2 + |p_q|^2: exact 0 at x_n = p_q, full accuracy for near pairs); they never
    materialise the ``[N, Q, D]`` differences and are deterministic on every backend.

    Args:
        x (Tensor[N, D]): instance features (RDE: the parameterised relation features).
        protos (Tensor[Q, D]): prototypes (RDE: one learnable vector per relation class), same
            dtype and device as ``x``. ``prototype_distance(protos, protos)`` gives
            D(P_k, P_{-k}) for the prototype-separation term.

    Returns:
        (cos Tensor[N, Q], dist Tensor[N, Q]) in the dtype of ``x`` (float32 under autocast),
        both differentiable w.r.t. ``x`` and ``protos``. Half and bfloat16 accumulate in float32.
    """
    _checks.tensor(x, "x", "N, D")
    _checks.tensor(protos, "protos", "Q, D")
    _checks.same_device([("x", x), ("protos", protos)])
    _checks.same_float_dtype([("x", x), ("protos", protos)])
    _checks.size(protos, "protos", 1, x.shape[1], "D, the feature width of x")
    return _prototype_distance_op(x, protos)
