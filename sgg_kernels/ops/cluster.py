"""Superpixel clustering ops (SIL, MM'23, Sec. 3.2, Eq. 1-3 and 9).

Each public function checks its arguments, then calls one ``torch.library`` op
(``sgg_kernels::<name>``) whose body picks a backend (see ``sgg_kernels._backend``). Every op has a
fake kernel (so ``torch.compile(fullgraph=True)`` traces it) and an autograd formula whose backward
is its own op, ``sgg_kernels::<name>_backward``, with its own kernels per backend.

Shapes: feature maps as point sets ``[B, M, D]`` (M = H*W, row-major), C cluster centers, heads
folded into B (``[B*h, M, D/h]``). Coordinates are (x, y) in feature-map pixels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks
from .._backend import Kernels, value_checks_on
from ..reference import cluster as ref

_LIB = "sgg_kernels"

# ---------------------------------------------------------------------------------------------
# Backend tables. cpu/cuda name ops of the compiled extension; triton names functions of
# sgg_kernels.triton.cluster. All share the reference's signature.
# ---------------------------------------------------------------------------------------------
_KNN_INDEX = Kernels("cluster", ref.knn_index, cpu="_knn_index", cuda="_knn_index")
_GATHER_MEAN = Kernels("cluster", ref.gather_mean, cpu="_gather_mean", cuda="_gather_mean")
_GATHER_MEAN_BWD = Kernels("cluster", ref.gather_mean_backward, cpu="_gather_mean_backward", cuda="_gather_mean_backward")
_ASSIGN = Kernels("cluster", ref.cosine_assign, cpu="_cosine_assign", triton="cosine_assign")
_ASSIGN_BWD = Kernels("cluster", ref.cosine_assign_backward, cpu="_cosine_assign_backward", triton="cosine_assign_backward")
_AGGREGATE = Kernels("cluster", ref.cluster_aggregate, cpu="_cluster_aggregate", triton="cluster_aggregate")
_AGGREGATE_BWD = Kernels("cluster", ref.cluster_aggregate_backward, cpu="_cluster_aggregate_backward", triton="cluster_aggregate_backward")
_SUPERPIXEL = Kernels("cluster", ref.superpixel_cluster, cpu="_superpixel_cluster", triton="superpixel_cluster")
_DISPATCH = Kernels("cluster", ref.cluster_dispatch, cpu="_cluster_dispatch", triton="cluster_dispatch")
_DISPATCH_BWD = Kernels("cluster", ref.cluster_dispatch_backward, cpu="_cluster_dispatch_backward", triton="cluster_dispatch_backward")

# Public op name -> its tables (forward first), for `python -m sgg_kernels.info` and the tests.
KERNELS = {
    "knn_index": (_KNN_INDEX,),
    "knn_center_features": (_KNN_INDEX, _GATHER_MEAN, _GATHER_MEAN_BWD),
    "gather_mean": (_GATHER_MEAN, _GATHER_MEAN_BWD),
    "cosine_assign": (_ASSIGN, _ASSIGN_BWD),
    "cluster_aggregate": (_AGGREGATE, _AGGREGATE_BWD),
    "superpixel_cluster": (_SUPERPIXEL, _AGGREGATE_BWD, _ASSIGN_BWD),
    "cluster_dispatch": (_DISPATCH, _DISPATCH_BWD),
}


def _empty_grad(like: Tensor) -> Tensor:
    """Placeholder for 'no gradient' in a backward op's tuple output (ops cannot return None)."""
    return like.new_empty((0,))


def _broadcast_geometry(points: Tensor, centers: Tensor) -> Tuple[Tensor, Tensor]:
    """Points/centers given as [M, 2] or [B, M, 2] -> common batch, float32 (float64 if any is)."""
    dtype = torch.float64 if torch.float64 in (points.dtype, centers.dtype) else torch.float32
    p = points if points.dim() == 3 else points.unsqueeze(0)
    c = centers if centers.dim() == 3 else centers.unsqueeze(0)
    b = max(p.shape[0], c.shape[0])
    return p.to(dtype).expand(b, -1, -1), c.to(dtype).expand(b, -1, -1)


# ---------------------------------------------------------------------------------------------
# grid_points / grid_centers (plain PyTorch, sgg_kernels.reference.cluster, with argument checks)
# ---------------------------------------------------------------------------------------------
def grid_points(H: int, W: int, *, device=None, dtype=torch.float32) -> Tensor:
    """The points of an ``H x W`` feature map as ``[H*W, 2]`` (x, y), row-major: cell (r, c) is
    (c + 0.5, r + 0.5) in feature-map pixels.

    Args:
        H, W (int >= 0): rows and columns of the map (0 gives no points, ``[0, 2]``).
        device, dtype: of the result (float32 by default).
    """
    H = _checks.int_at_least(H, "H", 0, "rows of the feature map")
    W = _checks.int_at_least(W, "W", 0, "columns of the feature map")
    return ref.grid_points(H, W, device=device, dtype=dtype)


def grid_centers(H: int, W: int, per_dim: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Sec. 3.2: ``per_dim`` centers evenly spaced per dimension of an ``H x W`` map, paired up:
    ``[per_dim**2, 2]`` (x, y), x_i = (i + 0.5) W / per_dim, y_j = (j + 0.5) H / per_dim, row-major
    (y outer). ``per_dim = 7`` gives the paper's 49 centers.

    Args:
        H, W (int >= 1): rows and columns of the map. per_dim (int >= 1): centers per dimension.
        device, dtype: of the result (float32 by default).
    """
    H = _checks.positive_int(H, "H", "rows of the feature map")
    W = _checks.positive_int(W, "W", "columns of the feature map")
    per_dim = _checks.positive_int(per_dim, "per_dim", "centers per dimension, e.g. 7 for 49 centers")
    return ref.grid_centers(H, W, per_dim, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# knn_index / knn_center_features / gather_mean  (Eq. 1)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::knn_index", mutates_args=())
def _knn_index_op(points: Tensor, centers: Tensor, k: int) -> Tensor:
    return _KNN_INDEX(points.device, points.contiguous(), centers.contiguous(), k)


@_knn_index_op.register_fake
def _(points, centers, k):
    return points.new_empty((points.shape[0], centers.shape[1], k), dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::gather_mean", mutates_args=())
def _gather_mean_op(feats: Tensor, knn_index: Tensor) -> Tensor:
    if value_checks_on():
        _checks.index_range(knn_index, "knn_index", feats.shape[1], "M, the number of points of feats")
    index = knn_index.expand(feats.shape[0], -1, -1).contiguous()
    return _GATHER_MEAN(feats.device, feats, index)


@_gather_mean_op.register_fake
def _(feats, knn_index):
    return feats.new_empty((feats.shape[0], knn_index.shape[1], feats.shape[2]))


@torch.library.custom_op(f"{_LIB}::gather_mean_backward", mutates_args=())
def _gather_mean_backward_op(grad: Tensor, knn_index: Tensor, M: int) -> Tensor:
    index = knn_index.expand(grad.shape[0], -1, -1).contiguous()
    return _GATHER_MEAN_BWD(grad.device, grad.contiguous(), index, M)


@_gather_mean_backward_op.register_fake
def _(grad, knn_index, M):
    return grad.new_empty((grad.shape[0], M, grad.shape[2]))


def _gather_mean_setup(ctx, inputs, output):
    feats, knn_index = inputs
    ctx.save_for_backward(knn_index)
    ctx.M = feats.shape[1]


def _gather_mean_bwd(ctx, grad, *unused):
    (knn_index,) = ctx.saved_tensors
    return _gather_mean_backward_op(grad, knn_index, ctx.M), None


torch.library.register_autograd(f"{_LIB}::gather_mean", _gather_mean_bwd, setup_context=_gather_mean_setup)


@torch.library.custom_op(f"{_LIB}::knn_center_features", mutates_args=())
def _knn_center_features_op(feats: Tensor, points: Tensor, centers: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    index = _KNN_INDEX(feats.device, points.contiguous(), centers.contiguous(), k)
    index = index.expand(feats.shape[0], -1, -1).contiguous()
    return _GATHER_MEAN(feats.device, feats, index), index


@_knn_center_features_op.register_fake
def _(feats, points, centers, k):
    B, _, D = feats.shape
    C = centers.shape[1]
    return feats.new_empty((B, C, D)), feats.new_empty((B, C, k), dtype=torch.int64)


def _knn_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.M = inputs[0].shape[1]


def _knn_bwd(ctx, grad, grad_index):
    (knn_index,) = ctx.saved_tensors
    return _gather_mean_backward_op(grad, knn_index, ctx.M), None, None, None


torch.library.register_autograd(f"{_LIB}::knn_center_features", _knn_bwd, setup_context=_knn_setup)


def _check_geometry(points: Tensor, centers: Tensor) -> None:
    for name, t, what in (("points", points, "M"), ("centers", centers, "C")):
        if not isinstance(t, Tensor) or t.dim() not in (2, 3) or t.shape[-1] != 2 or t.dtype not in _checks.FLOAT_DTYPES:
            got = _checks._describe(t) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating tensor of (x, y) coordinates, [{what}, 2] or [B, {what}, 2], got {got}")
    if points.dim() == 3 and centers.dim() == 3 and points.shape[0] != centers.shape[0] and 1 not in (points.shape[0], centers.shape[0]):
        raise ValueError(f"points has batch {points.shape[0]} but centers has batch {centers.shape[0]}; use one batch size, or 2-D tensors shared by every image")
    _checks.same_device([("points", points), ("centers", centers)])
    if centers.shape[-2] < 1:
        raise ValueError("centers must hold at least one center (C >= 1)")


def _check_k(k, M: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > M:
        raise ValueError(f"k = {k} nearest points were asked for, but there are only M = {M} points")


def knn_index(points: Tensor, centers: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` points nearest to each center (Eq. 1's KNN(T_j)).

    Args:
        points (Tensor[M, 2] or Tensor[B, M, 2]): point coordinates (x, y), e.g. :func:`grid_points`.
        centers (Tensor[C, 2] or Tensor[B, C, 2]): center coordinates, e.g. :func:`grid_centers`.
        k (int): neighbours per center, ``1 <= k <= M``.

    Returns:
        Tensor[B', C, k] int64: nearest first, ties to the lower point index (B' = 1 for 2-D inputs).
        Depends on geometry alone: cache it for a fixed grid and use :func:`gather_mean`.
    """
    _check_geometry(points, centers)
    _check_k(k, points.shape[-2])
    p, c = _broadcast_geometry(points, centers)
    return _knn_index_op(p, c, k)


def knn_center_features(feats: Tensor, points: Tensor, centers: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Eq. 1: F^c_j = (1/n_k) sum_{Q_i in KNN(T_j)} F_i, the initial feature of every center.

    Args:
        feats (Tensor[B, M, D]): point features.
        points (Tensor[M, 2] or Tensor[B, M, 2]): point coordinates (x, y) in feature-map pixels.
        centers (Tensor[C, 2] or Tensor[B, C, 2]): center coordinates.
        k (int): n_k, the neighbours averaged per center (SIL: ceil(M / C)).

    Returns:
        (center_feats Tensor[B, C, D], knn_index Tensor[B, C, k] int64). Gradients flow to ``feats`` only.
    """
    _checks.tensor(feats, "feats", "B, M, D")
    _check_geometry(points, centers)
    _checks.same_device([("feats", feats), ("points", points), ("centers", centers)])
    B, M, _ = feats.shape
    _checks.size(points, "points", -2, M, "M, the number of points of feats")
    for name, t in (("points", points), ("centers", centers)):
        if t.dim() == 3 and t.shape[0] not in (1, B):
            raise ValueError(f"{name} has batch {t.shape[0]}, expected 1 or B = {B} (the batch of feats)")
    _check_k(k, M)
    p, c = _broadcast_geometry(points, centers)
    return _knn_center_features_op(feats, p, c, k)


def gather_mean(feats: Tensor, knn_index: Tensor) -> Tensor:
    """Eq. 1 with a cached index: the mean of ``feats`` over each center's ``k`` neighbours.

    Args:
        feats (Tensor[B, M, D]): point features.
        knn_index (Tensor[B, C, k] or Tensor[1, C, k] int64): from :func:`knn_index`, values in [0, M).

    Returns:
        Tensor[B, C, D].
    """
    _checks.tensor(feats, "feats", "B, M, D")
    _checks.tensor(knn_index, "knn_index", "B, C, k", kind="index")
    _checks.same_device([("feats", feats), ("knn_index", knn_index)])
    if knn_index.shape[0] not in (1, feats.shape[0]):
        raise ValueError(f"knn_index has batch {knn_index.shape[0]}, expected 1 or B = {feats.shape[0]} (the batch of feats)")
    if knn_index.shape[2] < 1:
        raise ValueError("knn_index must have k >= 1 neighbours per center")
    return _gather_mean_op(feats, knn_index)


# ---------------------------------------------------------------------------------------------
# cosine_assign  (Eq. 2)
# ---------------------------------------------------------------------------------------------
# The op returns (sim, assign), float first: torch.library.opcheck sums the outputs into the
# first one's dtype. The public function returns (assign, sim) like the paper's P^QT, sim.
@torch.library.custom_op(f"{_LIB}::cosine_assign", mutates_args=())
def _cosine_assign_op(feats: Tensor, centers: Tensor, alpha: Optional[Tensor], beta: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    assign, sim = _ASSIGN(feats.device, feats, centers, alpha, beta)
    return sim, assign


@_cosine_assign_op.register_fake
def _(feats, centers, alpha, beta):
    B, M, _ = feats.shape
    return feats.new_empty((B, M)), feats.new_empty((B, M), dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::cosine_assign_backward", mutates_args=())
def _cosine_assign_backward_op(
    grad_sim: Tensor, feats: Tensor, centers: Tensor, assign: Tensor, sim: Tensor,
    alpha: Optional[Tensor], beta: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    gf, gc, ga, gb = _ASSIGN_BWD(feats.device, grad_sim.contiguous(), feats, centers, assign, sim, alpha, beta)
    if alpha is None:
        ga, gb = _empty_grad(feats), _empty_grad(feats)
    return gf, gc, ga, gb


@_cosine_assign_backward_op.register_fake
def _(grad_sim, feats, centers, assign, sim, alpha, beta):
    if alpha is None:
        return torch.empty_like(feats, memory_format=torch.contiguous_format), torch.empty_like(centers, memory_format=torch.contiguous_format), feats.new_empty((0,)), feats.new_empty((0,))
    return torch.empty_like(feats, memory_format=torch.contiguous_format), torch.empty_like(centers, memory_format=torch.contiguous_format), torch.empty_like(alpha, memory_format=torch.contiguous_format), torch.empty_like(beta, memory_format=torch.contiguous_format)


def _assign_setup(ctx, inputs, output):
    feats, centers, alpha, beta = inputs
    ctx.has_alpha = alpha is not None
    sim, assign = output
    ctx.save_for_backward(feats, centers, assign, sim, alpha, beta)


def _assign_bwd(ctx, grad_sim, grad_assign):
    feats, centers, assign, sim, alpha, beta = ctx.saved_tensors
    gf, gc, ga, gb = _cosine_assign_backward_op(grad_sim, feats, centers, assign, sim, alpha, beta)
    if not ctx.has_alpha:
        ga = gb = None
    return gf, gc, ga, gb


torch.library.register_autograd(f"{_LIB}::cosine_assign", _assign_bwd, setup_context=_assign_setup)


def _check_points_centers(feats: Tensor, centers: Tensor, fname: str, cname: str) -> None:
    _checks.tensor(feats, fname, "B, M, D")
    _checks.tensor(centers, cname, "B, C, D")
    _checks.same_device([(fname, feats), (cname, centers)])
    _checks.same_float_dtype([(fname, feats), (cname, centers)])
    _checks.size(centers, cname, 0, feats.shape[0], f"B, the batch of {fname}")
    _checks.size(centers, cname, 2, feats.shape[2], f"D, the feature width of {fname}")
    if centers.shape[1] < 1:
        raise ValueError(f"{cname} must hold at least one center (C >= 1), got shape {list(centers.shape)}")


def _check_alpha_beta(alpha, beta, feats) -> None:
    if (alpha is None) != (beta is None):
        raise ValueError("alpha and beta come together: give both (sigmoid(beta + alpha*cos)) or neither (plain cosine)")
    _checks.scalar_param(alpha, "alpha")
    _checks.scalar_param(beta, "beta")
    _checks.same_device([("feats", feats), ("alpha", alpha), ("beta", beta)])


def cosine_assign(feats: Tensor, centers: Tensor, alpha: Optional[Tensor] = None, beta: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Eq. 2: assign every point to its most similar center.

    s_ij = cos(F_i, F^c_j) (norms clamped at 1e-12 as ``F.normalize`` does), or
    sigmoid(beta + alpha * cos) with learnable scalars as in Context Cluster when ``alpha``/``beta``
    are given. Never materialises the M x C similarity (kernels work tile by tile).

    Args:
        feats (Tensor[B, M, D]): point features.
        centers (Tensor[B, C, D]): center features (e.g. from :func:`knn_center_features`).
        alpha, beta (Tensor[1] or Tensor[] or None): learnable scalars, both or neither.

    Returns:
        (assign Tensor[B, M] int64, sim Tensor[B, M]): the argmax over centers (ties to the lower
        index) and the maximum similarity. ``sim`` is differentiable in feats, centers, alpha, beta.
    """
    _check_points_centers(feats, centers, "feats", "centers")
    _check_alpha_beta(alpha, beta, feats)
    sim, assign = _cosine_assign_op(feats, centers, alpha, beta)
    return assign, sim


# ---------------------------------------------------------------------------------------------
# cluster_aggregate  (Eq. 3)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::cluster_aggregate", mutates_args=())
def _cluster_aggregate_op(values: Tensor, assign: Tensor, sim: Tensor, value_centers: Tensor) -> Tuple[Tensor, Tensor]:
    if value_checks_on():
        _checks.index_range(assign, "assign", value_centers.shape[1], "C, the number of centers")
    return _AGGREGATE(values.device, values, assign, sim, value_centers)


@_cluster_aggregate_op.register_fake
def _(values, assign, sim, value_centers):
    return torch.empty_like(value_centers, memory_format=torch.contiguous_format), value_centers.new_empty(value_centers.shape[:2])


@torch.library.custom_op(f"{_LIB}::cluster_aggregate_backward", mutates_args=())
def _cluster_aggregate_backward_op(
    grad_out: Tensor, values: Tensor, assign: Tensor, sim: Tensor, out: Tensor, den: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    return _AGGREGATE_BWD(values.device, grad_out.contiguous(), values, assign, sim, out, den)


@_cluster_aggregate_backward_op.register_fake
def _(grad_out, values, assign, sim, out, den):
    return torch.empty_like(values, memory_format=torch.contiguous_format), torch.empty_like(sim, memory_format=torch.contiguous_format), torch.empty_like(out, memory_format=torch.contiguous_format)


def _aggregate_setup(ctx, inputs, output):
    values, assign, sim, _ = inputs
    ctx.save_for_backward(values, assign, sim, output[0], output[1])


def _aggregate_bwd(ctx, grad_out, grad_den):
    values, assign, sim, out, den = ctx.saved_tensors
    gv, gs, gvc = _cluster_aggregate_backward_op(grad_out, values, assign, sim, out, den)
    return gv, None, gs, gvc


torch.library.register_autograd(f"{_LIB}::cluster_aggregate", _aggregate_bwd, setup_context=_aggregate_setup)


def _check_assignment(assign: Tensor, sim: Tensor, B: int, M: int, device, dtype, sim_what: str) -> None:
    _checks.tensor(assign, "assign", "B, M", kind="index")
    _checks.tensor(sim, "sim", "B, M")
    for name, t in (("assign", assign), ("sim", sim)):
        _checks.size(t, name, 0, B, "B")
        _checks.size(t, name, 1, M, "M")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the features are on {device}")
    if sim.dtype != dtype and not torch.is_autocast_enabled(device.type):
        raise TypeError(f"sim is {sim.dtype} but {sim_what} is {dtype}: pass one dtype, or run under torch.autocast")


def cluster_aggregate(values: Tensor, assign: Tensor, sim: Tensor, value_centers: Tensor) -> Tensor:
    """Eq. 3 (before H'): similarity-weighted mean of each cluster, anchored by its center.

    out_j = (v^c_j + sum_{i: assign_i = j} sim_i v_i) / (1 + sum_{i: assign_i = j} sim_i)

    Deterministic on every backend (no floating-point atomics).

    Args:
        values (Tensor[B, M, D]): point values (SIL: the point features F).
        assign (Tensor[B, M] int64): cluster of each point, values in [0, C).
        sim (Tensor[B, M]): similarity of each point to its cluster (from :func:`cosine_assign`).
        value_centers (Tensor[B, C, D]): the centers' values (SIL: F^c).

    Returns:
        Tensor[B, C, D], differentiable in values, sim and value_centers.
    """
    _check_points_centers(values, value_centers, "values", "value_centers")
    _check_assignment(assign, sim, values.shape[0], values.shape[1], values.device, values.dtype, "values")
    return _cluster_aggregate_op(values, assign, sim, value_centers)[0]


# ---------------------------------------------------------------------------------------------
# superpixel_cluster  (Eq. 2 + Eq. 3 fused)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::superpixel_cluster", mutates_args=())
def _superpixel_cluster_op(
    feats: Tensor, centers: Tensor, values: Tensor, value_centers: Tensor,
    alpha: Optional[Tensor], beta: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _SUPERPIXEL(feats.device, feats, centers, values, value_centers, alpha, beta)


@_superpixel_cluster_op.register_fake
def _(feats, centers, values, value_centers, alpha, beta):
    B, M, _ = feats.shape
    return (torch.empty_like(value_centers, memory_format=torch.contiguous_format), value_centers.new_empty(value_centers.shape[:2]),
            feats.new_empty((B, M), dtype=torch.int64), feats.new_empty((B, M)))


@torch.library.custom_op(f"{_LIB}::superpixel_cluster_backward", mutates_args=())
def _superpixel_cluster_backward_op(
    grad_out: Tensor, grad_sim: Tensor, feats: Tensor, centers: Tensor, values: Tensor,
    alpha: Optional[Tensor], beta: Optional[Tensor], out: Tensor, den: Tensor, assign: Tensor, sim: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # The aggregation's d(sim) joins the caller's d(sim) (e.g. from cluster_dispatch), then flows
    # through Eq. 2 to feats, centers, alpha, beta.
    gv, gs, gvc = _AGGREGATE_BWD(feats.device, grad_out.contiguous(), values, assign, sim, out, den)
    gf, gc, ga, gb = _ASSIGN_BWD(feats.device, (grad_sim + gs).contiguous(), feats, centers, assign, sim, alpha, beta)
    if alpha is None:
        ga, gb = _empty_grad(feats), _empty_grad(feats)
    return gf, gc, gv, gvc, ga, gb


@_superpixel_cluster_backward_op.register_fake
def _(grad_out, grad_sim, feats, centers, values, alpha, beta, out, den, assign, sim):
    ga = feats.new_empty((0,)) if alpha is None else torch.empty_like(alpha, memory_format=torch.contiguous_format)
    gb = feats.new_empty((0,)) if beta is None else torch.empty_like(beta, memory_format=torch.contiguous_format)
    return torch.empty_like(feats, memory_format=torch.contiguous_format), torch.empty_like(centers, memory_format=torch.contiguous_format), torch.empty_like(values, memory_format=torch.contiguous_format), torch.empty_like(out, memory_format=torch.contiguous_format), ga, gb


def _superpixel_setup(ctx, inputs, output):
    feats, centers, values, _, alpha, beta = inputs
    out, den, assign, sim = output
    ctx.has_alpha = alpha is not None
    ctx.save_for_backward(feats, centers, values, alpha, beta, out, den, assign, sim)


def _superpixel_bwd(ctx, grad_out, grad_den, grad_assign, grad_sim):
    saved = ctx.saved_tensors
    gf, gc, gv, gvc, ga, gb = _superpixel_cluster_backward_op(grad_out, grad_sim, *saved)
    if not ctx.has_alpha:
        ga = gb = None
    return gf, gc, gv, gvc, ga, gb


torch.library.register_autograd(f"{_LIB}::superpixel_cluster", _superpixel_bwd, setup_context=_superpixel_setup)


def superpixel_cluster(
    feats: Tensor, centers: Tensor, values: Optional[Tensor] = None, value_centers: Optional[Tensor] = None,
    alpha: Optional[Tensor] = None, beta: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Eq. 2 and Eq. 3 in one op: assign points to centers and aggregate each cluster.

    Same result as ``assign, sim = cosine_assign(feats, centers, alpha, beta)`` followed by
    ``cluster_aggregate(values, assign, sim, value_centers)``; the Triton kernel does both in one
    launch over the points (plus a small deterministic reduction over point chunks).

    Args:
        feats (Tensor[B, M, D]): point features used for the similarity.
        centers (Tensor[B, C, D]): center features.
        values (Tensor[B, M, Dv] or None): what is aggregated; default ``feats`` (SIL).
        value_centers (Tensor[B, C, Dv] or None): the centers' values; default ``centers``.
        alpha, beta (Tensor[1] or None): learnable similarity scalars, both or neither.

    Returns:
        (out Tensor[B, C, Dv], assign Tensor[B, M] int64, sim Tensor[B, M]).
    """
    _check_points_centers(feats, centers, "feats", "centers")
    _check_alpha_beta(alpha, beta, feats)
    if (values is None) != (value_centers is None):
        raise ValueError("values and value_centers come together: give both, or neither to aggregate feats/centers")
    if values is None:
        values, value_centers = feats, centers
    else:
        _check_points_centers(values, value_centers, "values", "value_centers")
        _checks.size(values, "values", 1, feats.shape[1], "M, the number of points of feats")
        _checks.size(value_centers, "value_centers", 1, centers.shape[1], "C, the number of centers")
        _checks.same_device([("feats", feats), ("values", values)])
        _checks.same_float_dtype([("feats", feats), ("values", values)])
    out, _, assign, sim = _superpixel_cluster_op(feats, centers, values, value_centers, alpha, beta)
    return out, assign, sim


# ---------------------------------------------------------------------------------------------
# cluster_dispatch  (Eq. 9)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::cluster_dispatch", mutates_args=())
def _cluster_dispatch_op(center_out: Tensor, assign: Tensor, sim: Tensor, residual: Optional[Tensor]) -> Tensor:
    if value_checks_on():
        _checks.index_range(assign, "assign", center_out.shape[1], "C, the number of centers")
    return _DISPATCH(center_out.device, center_out, assign, sim, residual)


@_cluster_dispatch_op.register_fake
def _(center_out, assign, sim, residual):
    B, M = assign.shape
    return center_out.new_empty((B, M, center_out.shape[2]))


@torch.library.custom_op(f"{_LIB}::cluster_dispatch_backward", mutates_args=())
def _cluster_dispatch_backward_op(
    grad_out: Tensor, center_out: Tensor, assign: Tensor, sim: Tensor, has_residual: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    gco, gs, gr = _DISPATCH_BWD(center_out.device, grad_out.contiguous(), center_out, assign, sim, has_residual)
    return gco, gs, (gr if has_residual else _empty_grad(center_out))


@_cluster_dispatch_backward_op.register_fake
def _(grad_out, center_out, assign, sim, has_residual):
    gr = torch.empty_like(grad_out, memory_format=torch.contiguous_format) if has_residual else center_out.new_empty((0,))
    return torch.empty_like(center_out, memory_format=torch.contiguous_format), torch.empty_like(sim, memory_format=torch.contiguous_format), gr


def _dispatch_setup(ctx, inputs, output):
    center_out, assign, sim, residual = inputs
    ctx.has_residual = residual is not None
    ctx.save_for_backward(center_out, assign, sim)


def _dispatch_bwd(ctx, grad_out):
    center_out, assign, sim = ctx.saved_tensors
    # d out / d residual is the identity: the residual's gradient is grad_out itself, handed to
    # autograd as is (no copy); the backward op is asked for the other two only.
    gco, gs, _ = _cluster_dispatch_backward_op(grad_out, center_out, assign, sim, False)
    return gco, None, gs, (grad_out if ctx.has_residual else None)


torch.library.register_autograd(f"{_LIB}::cluster_dispatch", _dispatch_bwd, setup_context=_dispatch_setup)


def cluster_dispatch(center_out: Tensor, assign: Tensor, sim: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """Eq. 9: send each cluster's feature back to its points, weighted by their similarity.

    out_i = residual_i + sim_i * center_out[assign_i]   (F^SIL_i = F_i + sim(F_i, F^c_j) H''(F^CR_j))

    Args:
        center_out (Tensor[B, C, D]): per-center features (SIL: H''(F^CR)).
        assign (Tensor[B, M] int64), sim (Tensor[B, M]): from :func:`cosine_assign`.
        residual (Tensor[B, M, D] or None): added to the output (SIL: the input features F).

    Returns:
        Tensor[B, M, D], differentiable in center_out, sim and residual.
    """
    _checks.tensor(center_out, "center_out", "B, C, D")
    _checks.tensor(assign, "assign", "B, M", kind="index")
    B, C, D = center_out.shape
    if C < 1:
        raise ValueError(f"center_out must hold at least one center (C >= 1), got shape {list(center_out.shape)}")
    _checks.size(assign, "assign", 0, B, "B, the batch of center_out")
    M = assign.shape[1]
    _check_assignment(assign, sim, B, M, center_out.device, center_out.dtype, "center_out")
    if residual is not None:
        _checks.tensor(residual, "residual", "B, M, D")
        _checks.same_device([("center_out", center_out), ("residual", residual)])
        _checks.same_float_dtype([("center_out", center_out), ("residual", residual)])
        _checks.size(residual, "residual", 0, B, "B")
        _checks.size(residual, "residual", 1, M, "M, the number of points of assign")
        _checks.size(residual, "residual", 2, D, "D, the feature width of center_out")
    return _cluster_dispatch_op(center_out, assign, sim, residual)


# Autocast: mixed float inputs are cast to float32, as torchvision does for its ops.
for _name in ("knn_center_features", "gather_mean", "cosine_assign", "cluster_aggregate", "superpixel_cluster", "cluster_dispatch"):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(f"{_LIB}::{_name}", _device, torch.float32)
