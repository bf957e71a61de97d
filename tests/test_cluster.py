"""Superpixel clustering ops (SIL Eq. 1-3, 9): every compiled backend against the float64 reference.

Forward and every gradient, float32/float16/bfloat16/float64, odd shapes (M not a multiple of any
block, C = 1, D = 1, D = 257, B = 1, k = M), strided inputs, empty inputs, out-of-range indices with
checks off, gradcheck, opcheck, determinism.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import sgg_kernels as sk
from sgg_kernels.ops import cluster as ops
from sgg_kernels.reference import cluster as ref

from helpers import assert_close, backend_params, gradcheck_params, require, run_with_grads, to_ref

K = ops.KERNELS
SHAPES = [  # (B, M, C, D)
    pytest.param(1, 37, 5, 3, id="B1-M37-C5-D3"),
    pytest.param(3, 130, 49, 64, id="B3-M130-C49-D64"),
    pytest.param(2, 20, 1, 1, id="B2-M20-C1-D1"),
    pytest.param(1, 50, 7, 257, id="B1-M50-C7-D257"),
]
DTYPES = [torch.float64, torch.float16, torch.bfloat16]
DTYPE_SHAPE = (2, 45, 6, 16)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, device, gen, strided=False, grad=True, scale=1.0):
    """Random float tensor; ``strided`` makes it a non-contiguous view (last two dims swapped)."""
    if strided:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64) * scale
        base = base.to(dtype).to(device).requires_grad_(grad)
        return base.transpose(-1, -2)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_(grad)


def _assign(B, M, C, device, gen, strided=False):
    if strided:
        return torch.randint(0, C, (B, 2 * M), generator=gen).to(device)[:, ::2]
    return torch.randint(0, C, (B, M), generator=gen).to(device)


def _sim(B, M, dtype, device, gen):
    return (torch.rand(B, M, generator=gen, dtype=torch.float64) * 0.9 + 0.1).to(dtype).to(device).requires_grad_(True)


def _alpha_beta(dtype, device, sigmoid):
    if not sigmoid:
        return None, None
    alpha = torch.tensor([0.8], dtype=dtype, device=device, requires_grad=True)
    beta = torch.tensor([-0.3], dtype=dtype, device=device, requires_grad=True)
    return alpha, beta


# ---------------------------------------------------------------------------------------------
# An oracle for Eq. 2 given an assignment: argmax may legitimately flip on near-ties between
# backends, so values and gradients are compared at the kernel's own (validated) assignment.
# ---------------------------------------------------------------------------------------------
def _sim_at(feats, centers, assign, alpha, beta):
    chosen = torch.gather(centers, 1, assign[..., None].expand(-1, -1, centers.shape[2]))
    cos = (F.normalize(feats, dim=-1, eps=1e-12) * F.normalize(chosen, dim=-1, eps=1e-12)).sum(-1)
    return cos if alpha is None else torch.sigmoid(beta.reshape(()) + alpha.reshape(()) * cos)


def _check_argmax(assign, feats, centers, alpha, beta, dtype):
    """The kernel's choice is a maximum of the float64 similarity (up to rounding at ``dtype``)."""
    with sk.use_backend("reference"):
        full = ref._similarity(to_ref(feats).detach(), to_ref(centers).detach(), to_ref(alpha), to_ref(beta))
    a = assign.to("cpu")
    assert a.dtype == torch.int64 and ((a >= 0) & (a < centers.shape[1])).all()
    chosen = torch.gather(full, 2, a[..., None]).squeeze(-1)
    best = full.max(dim=-1).values
    slack = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-4)
    assert (best - chosen <= slack).all(), f"assign is not an argmax: worst gap {(best - chosen).max().item():.3g}"
    exact = (best - chosen == 0).float().mean().item()
    assert exact > 0.95, f"only {exact:.0%} of points chose the exact float64 maximum"


# ---------------------------------------------------------------------------------------------
# grid_points / grid_centers
# ---------------------------------------------------------------------------------------------
def test_grid_points_and_centers():
    p = sk.grid_points(2, 3)
    assert p.shape == (6, 2)
    assert p[0].tolist() == [0.5, 0.5] and p[1].tolist() == [1.5, 0.5] and p[3].tolist() == [0.5, 1.5]
    c = sk.grid_centers(64, 96, 7)
    assert c.shape == (49, 2)
    assert c[0].tolist() == pytest.approx([0.5 * 96 / 7, 0.5 * 64 / 7])
    assert c[1].tolist() == pytest.approx([1.5 * 96 / 7, 0.5 * 64 / 7])  # x varies fastest (y outer)
    assert c[7].tolist() == pytest.approx([0.5 * 96 / 7, 1.5 * 64 / 7])


# ---------------------------------------------------------------------------------------------
# knn_center_features / knn_index / gather_mean (Eq. 1)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backend_params(K["knn_center_features"]))
@pytest.mark.parametrize("H,W,per_dim,D,B", [(5, 7, 2, 3, 1), (9, 13, 3, 64, 3), (6, 6, 1, 1, 2), (4, 5, 2, 257, 1)])
@pytest.mark.parametrize("k_mode", ["ceil", "one", "all"])
def test_knn_center_features(backend, device, H, W, per_dim, D, B, k_mode):
    require(K["knn_center_features"], backend, device)
    M, C = H * W, per_dim * per_dim
    k = {"ceil": math.ceil(M / C), "one": 1, "all": M}[k_mode]
    gen = _gen(1)
    feats = _rand((B, M, D), torch.float32, device, gen, strided=(D > 1))
    points, centers = sk.grid_points(H, W, device=device), sk.grid_centers(H, W, per_dim, device=device)
    (cf, idx), grads = run_with_grads(backend, sk.knn_center_features, (feats, points, centers, k))
    (cf_r, idx_r), grads_r = run_with_grads("reference", sk.knn_center_features, [to_ref(feats), points.cpu(), centers.cpu(), k])
    assert idx.dtype == torch.int64 and idx.shape == (B, C, k)
    # Grid geometry is full of exact distance ties: indices must agree exactly (ties to lower index).
    assert torch.equal(idx.cpu(), idx_r)
    assert_close(cf, cf_r, torch.float32, "center_feats")
    assert_close(grads[0], grads_r[0], torch.float32, "d feats")


@pytest.mark.parametrize("backend,device", backend_params(K["knn_index"]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_index_random_geometry(backend, device, dtype):
    require(K["knn_index"], backend, device)
    gen = _gen(2)
    points = (torch.rand(3, 101, 2, generator=gen, dtype=torch.float64) * 10).to(dtype).to(device)
    centers = (torch.rand(3, 9, 2, generator=gen, dtype=torch.float64) * 10).to(dtype).to(device)
    points[:, 50] = points[:, 7]  # duplicate points: equal distances, ties to the lower index
    with sk.use_backend(backend):
        idx = sk.knn_index(points, centers, 17)
    with sk.use_backend("reference"):
        idx_r = sk.knn_index(points.cpu(), centers.cpu(), 17)
    assert torch.equal(idx.cpu(), idx_r)


@pytest.mark.parametrize("backend,device", backend_params(K["gather_mean"]))
@pytest.mark.parametrize("dtype", [torch.float32] + DTYPES)
@pytest.mark.parametrize("index_batch", [1, 3])
def test_gather_mean(backend, device, dtype, index_batch):
    require(K["gather_mean"], backend, device)
    gen = _gen(3)
    feats = _rand((3, 41, 19), dtype, device, gen)
    index = torch.randint(0, 41, (index_batch, 6, 9), generator=gen).to(device)  # repeats on purpose
    out, grads = run_with_grads(backend, sk.gather_mean, (feats, index), round_to=dtype)
    out_r, grads_r = run_with_grads("reference", sk.gather_mean, (to_ref(feats), index.cpu()), round_to=dtype)
    assert out[0].dtype == dtype
    assert_close(out[0], out_r[0], dtype, "gather_mean")
    assert_close(grads[0], grads_r[0], dtype, "d feats")


# ---------------------------------------------------------------------------------------------
# cosine_assign (Eq. 2)
# ---------------------------------------------------------------------------------------------
def _check_cosine_assign(backend, device, B, M, C, D, dtype, sigmoid, strided, seed=4, zero_rows=False):
    gen = _gen(seed)
    feats = _rand((B, M, D), dtype, device, gen, strided=strided)
    centers = _rand((B, C, D), dtype, device, gen, strided=strided)
    if zero_rows:  # |f| = 0 and |c| = 0: the eps clamp of F.normalize decides value and gradient
        with torch.no_grad():
            feats[:, 3].zero_()
            centers[:, 1].zero_()
    alpha, beta = _alpha_beta(dtype, device, sigmoid)
    args = (feats, centers, alpha, beta)
    (assign, sim), grads = run_with_grads(backend, sk.cosine_assign, args, round_to=dtype)
    assert assign.shape == (B, M) and sim.shape == (B, M) and sim.dtype == dtype
    _check_argmax(assign, feats, centers, alpha, beta, dtype)
    # Oracle at the kernel's assignment, in float64, with autograd.
    ref_args = [to_ref(a) for a in args]
    oracle = lambda f, c, a, b: _sim_at(f, c, assign.cpu(), a, b)  # noqa: E731
    (sim_r,), grads_r = run_with_grads("reference", oracle, ref_args, round_to=dtype)
    assert_close(sim, sim_r, dtype, "sim")
    for name, g, g_r in zip(("d feats", "d centers", "d alpha", "d beta"), grads, grads_r):
        assert_close(g, g_r, dtype, name, scale=4.0 if dtype in (torch.float16, torch.bfloat16) else 1.0)


@pytest.mark.parametrize("backend,device", backend_params(K["cosine_assign"]))
@pytest.mark.parametrize("B,M,C,D", SHAPES)
@pytest.mark.parametrize("sigmoid", [False, True], ids=["cos", "sigmoid"])
def test_cosine_assign_shapes(backend, device, B, M, C, D, sigmoid):
    require(K["cosine_assign"], backend, device)
    _check_cosine_assign(backend, device, B, M, C, D, torch.float32, sigmoid, strided=False)


@pytest.mark.parametrize("backend,device", backend_params(K["cosine_assign"]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_assign_dtypes(backend, device, dtype):
    require(K["cosine_assign"], backend, device)
    _check_cosine_assign(backend, device, *DTYPE_SHAPE, dtype, sigmoid=True, strided=False)


@pytest.mark.parametrize("backend,device", backend_params(K["cosine_assign"]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_cosine_assign_strided_and_zero_rows(backend, device, dtype):
    """At a zero row the gradient is scaled by 1 / eps: float64 sees whether eps is exactly 1e-12."""
    require(K["cosine_assign"], backend, device)
    _check_cosine_assign(backend, device, 2, 33, 5, 12, dtype, sigmoid=False, strided=True, zero_rows=True)


def test_cosine_assign_ties_to_lower_center():
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    centers = torch.tensor([[[0.0, 2.0], [3.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # duplicates by direction
    for backend in ("reference", "cpu"):
        with sk.use_backend(backend):
            assign, sim = sk.cosine_assign(feats, centers)
        assert assign.tolist() == [[1, 0]], backend
        assert sim.tolist() == [[1.0, 1.0]], backend


# ---------------------------------------------------------------------------------------------
# cluster_aggregate (Eq. 3) and cluster_dispatch (Eq. 9)
# ---------------------------------------------------------------------------------------------
def _aggregate_args(B, M, C, D, dtype, device, strided, seed=5):
    gen = _gen(seed)
    values = _rand((B, M, D), dtype, device, gen, strided=strided)
    value_centers = _rand((B, C, D), dtype, device, gen, strided=strided)
    return values, _assign(B, M, C, device, gen, strided), _sim(B, M, dtype, device, gen), value_centers


def _dispatch_args(B, M, C, D, dtype, device, strided, residual, seed=6):
    gen = _gen(seed)
    center_out = _rand((B, C, D), dtype, device, gen, strided=strided)
    res = _rand((B, M, D), dtype, device, gen, strided=strided) if residual else None
    return center_out, _assign(B, M, C, device, gen, strided), _sim(B, M, dtype, device, gen), res


def _check_parity(backend, fn, args, dtype):
    outs, grads = run_with_grads(backend, fn, args, round_to=dtype)
    outs_r, grads_r = run_with_grads("reference", fn, [to_ref(a) for a in args], round_to=dtype)
    for i, (o, o_r) in enumerate(zip(outs, outs_r)):
        assert o.dtype == (dtype if o_r.is_floating_point() else o_r.dtype)
        assert_close(o, o_r, dtype, f"output {i}")
    assert len(grads) == len(grads_r)
    for i, (g, g_r) in enumerate(zip(grads, grads_r)):
        assert g is not None and g_r is not None, f"gradient {i} missing"
        assert_close(g, g_r, dtype, f"gradient {i}")


@pytest.mark.parametrize("backend,device", backend_params(K["cluster_aggregate"]))
@pytest.mark.parametrize("B,M,C,D", SHAPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_cluster_aggregate_shapes(backend, device, B, M, C, D, strided):
    require(K["cluster_aggregate"], backend, device)
    _check_parity(backend, sk.cluster_aggregate, _aggregate_args(B, M, C, D, torch.float32, device, strided), torch.float32)


@pytest.mark.parametrize("backend,device", backend_params(K["cluster_aggregate"]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cluster_aggregate_dtypes(backend, device, dtype):
    require(K["cluster_aggregate"], backend, device)
    _check_parity(backend, sk.cluster_aggregate, _aggregate_args(*DTYPE_SHAPE, dtype, device, False), dtype)


@pytest.mark.parametrize("backend,device", backend_params(K["cluster_dispatch"]))
@pytest.mark.parametrize("B,M,C,D", SHAPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cluster_dispatch_shapes(backend, device, B, M, C, D, residual):
    require(K["cluster_dispatch"], backend, device)
    args = _dispatch_args(B, M, C, D, torch.float32, device, strided=(D > 1), residual=residual)
    _check_parity(backend, sk.cluster_dispatch, args, torch.float32)


@pytest.mark.parametrize("backend,device", backend_params(K["cluster_dispatch"]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cluster_dispatch_dtypes(backend, device, dtype):
    require(K["cluster_dispatch"], backend, device)
    _check_parity(backend, sk.cluster_dispatch, _dispatch_args(*DTYPE_SHAPE, dtype, device, False, True), dtype)


# ---------------------------------------------------------------------------------------------
# superpixel_cluster (Eq. 2 + 3 fused)
# ---------------------------------------------------------------------------------------------
def _check_superpixel(backend, device, B, M, C, D, dtype, sigmoid, separate_values, strided=False, seed=7):
    gen = _gen(seed)
    feats = _rand((B, M, D), dtype, device, gen, strided=strided)
    centers = _rand((B, C, D), dtype, device, gen, strided=strided)
    alpha, beta = _alpha_beta(dtype, device, sigmoid)
    if separate_values:
        values, value_centers = _rand((B, M, D + 2), dtype, device, gen), _rand((B, C, D + 2), dtype, device, gen)
        args = (feats, centers, values, value_centers, alpha, beta)
    else:
        args = (feats, centers, None, None, alpha, beta)
    (out, assign, sim), grads = run_with_grads(backend, sk.superpixel_cluster, args, round_to=dtype)
    _check_argmax(assign, feats, centers, alpha, beta, dtype)
    a = assign.cpu()

    def oracle(f, c, v, vc, al, be):  # Eq. 2 at the kernel's assignment, then Eq. 3, in float64
        s = _sim_at(f, c, a, al, be)
        v, vc = (f, c) if v is None else (v, vc)
        return ref.cluster_aggregate(v, a, s, vc)[0], s

    (out_r, sim_r), grads_r = run_with_grads("reference", oracle, [to_ref(x) for x in args], round_to=dtype)
    assert_close(out, out_r, dtype, "out")
    assert_close(sim, sim_r, dtype, "sim")
    assert len(grads) == len(grads_r) == sum(x is not None for x in args)
    for i, (g, g_r) in enumerate(zip(grads, grads_r)):
        assert_close(g, g_r, dtype, f"gradient {i}", scale=4.0 if dtype in (torch.float16, torch.bfloat16) else 1.0)


@pytest.mark.parametrize("backend,device", backend_params(K["superpixel_cluster"]))
@pytest.mark.parametrize("B,M,C,D", SHAPES)
@pytest.mark.parametrize("sigmoid", [False, True], ids=["cos", "sigmoid"])
def test_superpixel_cluster_shapes(backend, device, B, M, C, D, sigmoid):
    require(K["superpixel_cluster"], backend, device)
    _check_superpixel(backend, device, B, M, C, D, torch.float32, sigmoid, separate_values=False)


@pytest.mark.parametrize("backend,device", backend_params(K["superpixel_cluster"]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_superpixel_cluster_dtypes(backend, device, dtype):
    require(K["superpixel_cluster"], backend, device)
    _check_superpixel(backend, device, *DTYPE_SHAPE, dtype, sigmoid=True, separate_values=False)


@pytest.mark.parametrize("backend,device", backend_params(K["superpixel_cluster"]))
def test_superpixel_cluster_separate_values_strided(backend, device):
    require(K["superpixel_cluster"], backend, device)
    _check_superpixel(backend, device, 2, 70, 9, 10, torch.float32, sigmoid=True, separate_values=True, strided=True)


@pytest.mark.parametrize("backend,device", backend_params(K["superpixel_cluster"]))
def test_superpixel_cluster_equals_assign_then_aggregate(backend, device):
    require(K["superpixel_cluster"], backend, device)
    gen = _gen(8)
    feats, centers = _rand((2, 57, 8), torch.float32, device, gen, grad=False), _rand((2, 6, 8), torch.float32, device, gen, grad=False)
    with sk.use_backend(backend):
        out, assign, sim = sk.superpixel_cluster(feats, centers)
        assign2, sim2 = sk.cosine_assign(feats, centers)
        out2 = sk.cluster_aggregate(feats, assign2, sim2, centers)
    assert torch.equal(assign, assign2)
    assert_close(sim, sim2, torch.float32, "sim")
    assert_close(out, out2, torch.float32, "out")


# ---------------------------------------------------------------------------------------------
# Empty inputs, out-of-range indices with checks off, determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backend_params(K["superpixel_cluster"]))
@pytest.mark.parametrize("B,M", [(0, 5), (2, 0)])
def test_empty_inputs(backend, device, B, M):
    require(K["superpixel_cluster"], backend, device)
    require(K["cluster_dispatch"], backend, device)
    gen = _gen(9)
    feats, centers = _rand((B, M, 4), torch.float32, device, gen), _rand((B, 3, 4), torch.float32, device, gen)
    with sk.use_backend(backend):
        assign, sim = sk.cosine_assign(feats, centers)
        out, assign2, sim2 = sk.superpixel_cluster(feats, centers)
        agg = sk.cluster_aggregate(feats, assign, sim, centers)
        disp = sk.cluster_dispatch(agg, assign, sim, feats)
        (agg.sum() + disp.sum() + out.sum()).backward()
    assert assign.shape == (B, M) and sim.shape == (B, M) and disp.shape == (B, M, 4)
    assert torch.equal(agg, centers.detach()) and torch.equal(out, centers.detach())  # no points: out = v^c / 1
    assert centers.grad.shape == centers.shape and feats.grad.shape == feats.shape


@pytest.mark.parametrize("backend,device", backend_params(K["cluster_dispatch"]) + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_out_of_range_assign_with_checks_off(backend, device):
    if backend != "reference":
        require(K["cluster_dispatch"], backend, device)
        require(K["cluster_aggregate"], backend, device)
    values, assign, sim, value_centers = _aggregate_args(2, 30, 4, 5, torch.float32, device, False)
    assign = assign.clone()
    assign[0, :3] = torch.tensor([-1, 4, 1_000_000])
    assign[1, 7] = -(2**40)
    with pytest.raises(IndexError, match="assign"):
        sk.cluster_aggregate(values, assign, sim, value_centers)
    sk.set_checks(False)
    for fn, args in ((sk.cluster_aggregate, (values, assign, sim, value_centers)),
                     (sk.cluster_dispatch, (value_centers, assign, sim, values))):
        outs, grads = run_with_grads(backend, fn, args)
        valid = (assign >= 0) & (assign < 4)
        safe = torch.where(valid, assign, torch.zeros_like(assign))
        # An invalid index contributes exactly nothing: same as dropping those points.
        ref_args = [to_ref(a) for a in args]
        ref_args[2] = (to_ref(sim) * valid.cpu()).detach().requires_grad_()
        ref_args[1] = safe.cpu()
        outs_r, _ = run_with_grads("reference", fn, ref_args)
        assert_close(outs[0], outs_r[0], torch.float32, fn.__name__)
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend,device", backend_params(K["gather_mean"]))
def test_gather_mean_out_of_range_with_checks_off(backend, device):
    require(K["gather_mean"], backend, device)
    gen = _gen(10)
    feats = _rand((2, 11, 5), torch.float32, device, gen)
    index = torch.randint(0, 11, (2, 3, 4), generator=gen).to(device)
    index[0, 0, 0], index[1, 2, 3] = -1, 11
    with pytest.raises(IndexError, match="knn_index"):
        sk.gather_mean(feats, index)
    sk.set_checks(False)
    out, grads = run_with_grads(backend, sk.gather_mean, (feats, index))
    out_r, grads_r = run_with_grads("reference", sk.gather_mean, (to_ref(feats), index.cpu()))
    assert_close(out[0], out_r[0], torch.float32, "out")
    assert_close(grads[0], grads_r[0], torch.float32, "d feats")


@pytest.mark.parametrize("backend,device", backend_params(K["superpixel_cluster"]))
def test_deterministic(backend, device):
    require(K["superpixel_cluster"], backend, device)
    require(K["cluster_dispatch"], backend, device)
    runs = []
    for _ in range(2):
        gen = _gen(11)
        feats, centers = _rand((2, 150, 16), torch.float32, device, gen), _rand((2, 5, 16), torch.float32, device, gen)
        with sk.use_backend(backend):
            out, assign, sim = sk.superpixel_cluster(feats, centers)
            y = sk.cluster_dispatch(out, assign, sim, feats)
            gf, gc = torch.autograd.grad(y, (feats, centers), torch.ones_like(y) * 0.37)
        runs.append((out, sim, gf, gc))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "two identical runs gave different bits"


# ---------------------------------------------------------------------------------------------
# gradcheck (float64) and opcheck
# ---------------------------------------------------------------------------------------------
def _gradcheck_cases(device):
    gen = _gen(12)
    f = lambda *s: _rand(s, torch.float64, device, gen)  # noqa: E731
    feats, centers = f(2, 9, 4), f(2, 3, 4)
    alpha = torch.tensor([1.1], dtype=torch.float64, device=device, requires_grad=True)
    beta = torch.tensor([0.2], dtype=torch.float64, device=device, requires_grad=True)
    assign = torch.randint(0, 3, (2, 9), generator=gen).to(device)
    sim = _sim(2, 9, torch.float64, device, gen)
    points, gcenters = sk.grid_points(3, 3, device=device), sk.grid_centers(3, 3, 2, device=device)
    index = torch.randint(0, 9, (2, 3, 2), generator=gen).to(device)
    return {
        "knn_center_features": (lambda x: sk.knn_center_features(x, points, gcenters, 3)[0], (feats,)),
        "gather_mean": (lambda x: sk.gather_mean(x, index), (feats,)),
        "cosine_assign": (lambda x, c, a, b: sk.cosine_assign(x, c, a, b)[1], (feats, centers, alpha, beta)),
        "cosine_assign_plain": (lambda x, c: sk.cosine_assign(x, c)[1], (feats, centers)),
        "cluster_aggregate": (lambda v, s, vc: sk.cluster_aggregate(v, assign, s, vc), (feats, sim, centers)),
        "superpixel_cluster": (lambda x, c, a, b: sk.superpixel_cluster(x, c, alpha=a, beta=b)[::2], (feats, centers, alpha, beta)),
        "cluster_dispatch": (lambda co, s, r: sk.cluster_dispatch(co, assign, s, r), (centers, sim, feats)),
    }


GRADCHECK_OPS = ["knn_center_features", "gather_mean", "cosine_assign", "cosine_assign_plain",
                 "cluster_aggregate", "superpixel_cluster", "cluster_dispatch"]


@pytest.mark.parametrize("backend,device,name", gradcheck_params(K, GRADCHECK_OPS))
def test_gradcheck(backend, device, name):
    if backend != "reference":
        require(K[name.replace("_plain", "")], backend, device)
    fn, inputs = _gradcheck_cases(device)[name]
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _opcheck_samples(device):
    gen = _gen(13)
    f = lambda *s, grad=True: _rand(s, torch.float32, device, gen, grad=grad)  # noqa: E731
    feats, centers = f(2, 11, 5), f(2, 3, 5)
    feats_t = f(2, 5, 11, grad=False).transpose(1, 2)  # [2, 11, 5], strided
    alpha = torch.tensor([0.9], device=device, requires_grad=True)
    beta = torch.tensor([0.1], device=device, requires_grad=True)
    assign = torch.randint(0, 3, (2, 11), generator=gen).to(device)
    sim = _sim(2, 11, torch.float32, device, gen)
    points = sk.grid_points(1, 11, device=device)[None].expand(2, -1, -1).contiguous()
    gcenters = sk.grid_centers(1, 11, 2, device=device)[None].expand(2, -1, -1).contiguous()[:, :3]
    index = torch.randint(0, 11, (2, 3, 4), generator=gen).to(device)
    den = torch.rand(2, 3, generator=gen).to(device) + 1
    out = f(2, 3, 5, grad=False)
    g = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    o = torch.ops.sgg_kernels
    return [
        (o.knn_index.default, (points, gcenters, 4)),
        (o.knn_center_features.default, (feats, points, gcenters, 4)),
        (o.gather_mean.default, (feats, index)),
        (o.gather_mean_backward.default, (g(2, 3, 5), index, 11)),
        (o.cosine_assign.default, (feats, centers, alpha, beta)),
        (o.cosine_assign.default, (feats, centers, None, None)),
        (o.cosine_assign_backward.default, (g(2, 11), feats.detach(), centers.detach(), assign, sim.detach(), alpha.detach(), beta.detach())),
        (o.cluster_aggregate.default, (feats, assign, sim, centers)),
        (o.cluster_aggregate_backward.default, (g(2, 3, 5), feats.detach(), assign, sim.detach(), out, den)),
        (o.superpixel_cluster.default, (feats, centers, feats, centers, alpha, beta)),
        (o.superpixel_cluster_backward.default, (g(2, 3, 5), g(2, 11), feats.detach(), centers.detach(), feats.detach(),
                                                 None, None, out, den, assign, sim.detach())),
        (o.cluster_dispatch.default, (centers, assign, sim, feats)),
        (o.cluster_dispatch.default, (centers, assign, sim, None)),
        (o.cluster_dispatch_backward.default, (g(2, 11, 5), centers.detach(), assign, sim.detach(), True)),
        # strided inputs: the fake kernels must give the gradients the real kernels' (contiguous) strides
        (o.cluster_dispatch_backward.default, (g(2, 5, 11).transpose(1, 2), centers.detach(), assign, sim.detach(), True)),
        (o.cosine_assign_backward.default, (g(2, 11), feats_t, centers.detach(), assign, sim.detach(), alpha.detach(),
                                            beta.detach())),
        (o.cluster_aggregate_backward.default, (g(2, 3, 5), feats_t, assign, sim.detach(), out, den)),
    ]


@pytest.mark.parametrize("backend,device", [pytest.param(None, "cpu", id="default-cpu"),
                                            pytest.param("reference", "cpu", id="reference-cpu"),
                                            pytest.param("triton", "cpu", id="triton-cpu"),
                                            pytest.param(None, "cuda", id="default-cuda", marks=pytest.mark.cuda)])
def test_opcheck(backend, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend == "triton":
        require(K["cluster_dispatch"], "triton", device)
    for op, args in _opcheck_samples(device):
        # Eq. 1's KNN ops have no Triton kernel: under the triton param they keep their default.
        has_triton = not any(name in op.name() for name in ("knn", "gather_mean"))
        with sk.use_backend(backend if backend != "triton" or has_triton else None):
            torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# Triton: multi-block paths (several tiles per chunk, several chunks, C and D blocks) that the
# default blocks only reach at GPU sizes, exercised here by shrinking the blocks.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_triton_blocks(monkeypatch):
    from sgg_kernels.triton import cluster as tc

    monkeypatch.setattr(tc, "_BLOCK_M", 16)
    monkeypatch.setattr(tc, "_MAX_BLOCK_C", 16)
    monkeypatch.setattr(tc, "_MAX_BLOCK_D", 16)
    monkeypatch.setattr(tc, "_MIN_TILES_PER_CHUNK", 3)  # 130 points -> 9 tiles -> 3 chunks of 3 tiles per image
    return tc


@pytest.mark.parametrize("backend,device", [p for p in backend_params(K["superpixel_cluster"]) if p.values[0] == "triton"])
def test_triton_multiblock_paths(backend, device, small_triton_blocks):
    require(K["superpixel_cluster"], backend, device)
    n_chunks, per_chunk = small_triton_blocks._chunking(2, 130, 16)
    assert (n_chunks, per_chunk) == (3, 3)
    _check_cosine_assign(backend, device, 2, 130, 37, 40, torch.float32, sigmoid=True, strided=False)
    _check_superpixel(backend, device, 2, 130, 37, 40, torch.float32, sigmoid=True, separate_values=True)
    _check_parity(backend, sk.cluster_aggregate, _aggregate_args(2, 130, 37, 40, torch.float32, device, False), torch.float32)
    _check_parity(backend, sk.cluster_dispatch, _dispatch_args(2, 130, 37, 40, torch.float32, device, False, True), torch.float32)
