"""The prototype distance op (RDE, Sec. 3.3, Eq. 4): every backend against the float64 reference,
forward and both gradients.

float32/float64/float16/bfloat16; odd shapes (N = 1, Q = 1, D = 1, D = 257, N and Q not multiples of
any block), strided inputs, empty inputs (N = 0, Q = 0), x equal to a prototype (dist's gradient
stays finite), zero-norm rows, one output used alone, determinism (also across CPU thread counts),
the Triton multi-block paths with shrunken blocks, gradcheck, opcheck, autocast, torch.compile,
bad inputs; and the reference's explicit backward formulas against autograd through its forward.
"""
import pytest
import torch
import torch.nn.functional as F

import sgg_kernels as sk
from sgg_kernels.ops import prototypes as ops
from sgg_kernels.reference import prototypes as ref

from helpers import HAS_CUDA, assert_close, backend_params, gradcheck_params, require, run_with_grads, to_ref

TABLES = ops.KERNELS["prototype_distance"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(N, Q, D, dtype=torch.float32, device="cpu", seed=0, strided=False, coincide=(), zero_x=(), zero_p=()):
    """(x [N, D], protos [Q, D]) leaves requiring grad.

    ``coincide``: (n, q) pairs with x_n set to p_q exactly (in the rounded dtype); ``zero_x`` /
    ``zero_p``: rows set to 0. ``strided``: x a column-strided view (every other column of a
    [N, 2D] tensor) and protos a transposed [D, Q] tensor: neither is contiguous.
    """
    g = _gen(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    protos = torch.randn(Q, D, generator=g, dtype=torch.float64)
    for n, q in coincide:
        x[n] = protos[q]
    for n in zero_x:
        x[n] = 0
    for q in zero_p:
        protos[q] = 0
    x, protos = x.to(dtype), protos.to(dtype)
    if strided:
        wide = torch.zeros(N, 2 * D, dtype=dtype)
        wide[:, ::2] = x
        x = wide.to(device).requires_grad_()[:, ::2]
        protos = protos.t().contiguous().to(device).requires_grad_().t()
        assert not x.is_contiguous() and not protos.is_contiguous()
        return x, protos
    return x.to(device).requires_grad_(), protos.to(device).requires_grad_()


def _check_against_reference(backend, x, protos, dtype, scale=1.0, fn=sk.prototype_distance):
    """Outputs and gradients of ``backend`` against the float64 reference on the same rounded values."""
    (cos, dist), grads = run_with_grads(backend, fn, (x, protos))
    (cos_r, dist_r), grads_r = run_with_grads("reference", fn, (to_ref(x), to_ref(protos)), round_to=dtype)
    assert cos.dtype == dtype and dist.dtype == dtype
    assert cos.shape == dist.shape == (x.shape[0], protos.shape[0])
    assert_close(cos, cos_r, dtype, "cos", scale)
    assert_close(dist, dist_r, dtype, "dist", scale)
    assert len(grads) == 2
    for name, g, g_r in zip(("d x", "d protos"), grads, grads_r):
        assert g is not None and g.dtype == dtype and torch.isfinite(g).all(), name
        assert_close(g, g_r, dtype, name, scale)
    return grads


# ---------------------------------------------------------------------------------------------
# The reference: Eq. 4 as written, and its explicit backward formulas against autograd
# ---------------------------------------------------------------------------------------------
def test_reference_matches_eq4_written_out():
    x, protos = _case(6, 4, 5, torch.float64, seed=1)
    cos, dist = ref.prototype_distance(x, protos)
    want_cos = F.normalize(x, dim=-1, eps=1e-12) @ F.normalize(protos, dim=-1, eps=1e-12).T
    want_dist = torch.stack([torch.stack([torch.sqrt(((xn - pq) ** 2).sum().clamp_min(1e-12)) for pq in protos])
                             for xn in x])
    torch.testing.assert_close(cos, want_cos, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(dist, want_dist, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(dist, torch.cdist(x, protos), rtol=1e-12, atol=1e-12)


def test_reference_backward_formulas_match_autograd():
    """The module docstring's formulas (ref.prototype_distance_backward) against autograd through
    the reference forward, with a coincident pair (x_3 = p_1) and zero-norm rows of x and protos."""
    x, protos = _case(7, 5, 6, torch.float64, seed=2, coincide=[(3, 1)], zero_x=[5], zero_p=[4])
    cos, dist = ref.prototype_distance(x, protos)
    assert dist[3, 1].item() == pytest.approx(1e-6, rel=1e-12)  # sqrt(eps) at x = p
    G, H = torch.randn(cos.shape, generator=_gen(3), dtype=torch.float64), torch.randn(dist.shape, generator=_gen(4), dtype=torch.float64)
    want = torch.autograd.grad((cos, dist), (x, protos), (G, H))
    got = ref.prototype_distance_backward(G, H, x.detach(), protos.detach())
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        # zero-norm rows have gradients of order 1/eps = 1e12 (F.normalize's); compare relatively
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    only_x = ref.prototype_distance_backward(G, H, x.detach(), protos.detach(), True, False)
    only_p = ref.prototype_distance_backward(G, H, x.detach(), protos.detach(), False, True)
    assert only_x[1].shape == (0,) and torch.equal(only_x[0], got[0])
    assert only_p[0].shape == (0,) and torch.equal(only_p[1], got[1])


# ---------------------------------------------------------------------------------------------
# Parity per backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backend_params(TABLES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
def test_parity_dtypes(backend, device, dtype):
    """Every dtype, with one instance equal to a prototype (dist = 1e-6 there, gradient finite)."""
    require(TABLES, backend, device)
    x, protos = _case(29, 11, 40, dtype, device, seed=5, coincide=[(3, 2)])
    _check_against_reference(backend, x, protos, dtype, scale=4.0 if dtype in HALF else 1.0)


SHAPES = [  # N, Q, D
    (1, 1, 1),
    (1, 7, 5),
    (9, 1, 3),
    (37, 5, 1),     # D = 1
    (13, 6, 257),   # D past a power of two
    (70, 51, 24),   # the paper's Q = 51: several N and Q blocks of the default tiles
]


@pytest.mark.parametrize("backend,device", backend_params(TABLES))
@pytest.mark.parametrize("N,Q,D", SHAPES, ids=[f"N{s[0]}-Q{s[1]}-D{s[2]}" for s in SHAPES])
def test_parity_odd_shapes(backend, device, N, Q, D):
    require(TABLES, backend, device)
    _check_against_reference(backend, *_case(N, Q, D, torch.float32, device, seed=6), torch.float32)


@pytest.mark.parametrize("backend,device", backend_params(TABLES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_parity_strided(backend, device, dtype):
    require(TABLES, backend, device)
    x, protos = _case(21, 9, 17, dtype, device, seed=7, strided=True, coincide=[(0, 8)])
    _check_against_reference(backend, x, protos, dtype)


@pytest.mark.parametrize("backend,device", backend_params(TABLES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_coincident_and_zero_rows(backend, device, dtype):
    """x_n = p_q: dist = sqrt(1e-12) and the gradient through dist is 0 (finite, not 0/0).
    Zero-norm rows: cos = 0 and F.normalize's clamp decides the (1/eps-sized) gradient. Rows of
    each kind are compared separately: the 1e12-sized gradients would hide errors elsewhere."""
    require(TABLES, backend, device)
    x, protos = _case(12, 6, 10, dtype, device, seed=8, coincide=[(1, 0), (4, 0), (7, 3)], zero_x=[9], zero_p=[5])
    (cos, dist), (gx, gp) = run_with_grads(backend, sk.prototype_distance, (x, protos))
    (cos_r, dist_r), (gx_r, gp_r) = run_with_grads("reference", sk.prototype_distance, (to_ref(x), to_ref(protos)))
    assert_close(cos, cos_r, dtype, "cos")
    assert_close(dist, dist_r, dtype, "dist")
    for n, q in ((1, 0), (4, 0), (7, 3)):
        assert dist[n, q].item() == pytest.approx(1e-6, rel=1e-6)
    assert (cos[9] == 0).all() and (cos[:, 5] == 0).all()
    rows_x, rows_p = torch.ones(12, dtype=torch.bool), torch.ones(6, dtype=torch.bool)
    rows_x[9], rows_p[5] = False, False
    for name, g, g_r, rows in (("d x", gx, gx_r, rows_x), ("d protos", gp, gp_r, rows_p)):
        assert torch.isfinite(g).all(), name
        assert_close(g.cpu()[rows], g_r[rows], dtype, f"{name} (nonzero rows)")
        assert_close(g.cpu()[~rows], g_r[~rows], dtype, f"{name} (zero rows)")
    # Through dist alone, a coincident pair adds nothing: x_1 = x_4 = p_0, so their dist-only
    # gradients are their gradients w.r.t. the other prototypes only.
    with sk.use_backend(backend):
        _, dist_only = sk.prototype_distance(x, protos)
        gx_dist, = torch.autograd.grad(dist_only[:, 0].sum(), (x,))
    assert (gx_dist[1] == 0).all() and (gx_dist[4] == 0).all()


@pytest.mark.parametrize("backend,device", backend_params(TABLES))
def test_one_output_and_one_input(backend, device):
    """A loss on cos alone, then on dist alone (the other output's gradient arrives as None), and
    protos alone requiring grad (the backward computes only d protos)."""
    require(TABLES, backend, device)
    x, protos = _case(15, 4, 9, torch.float64, device, seed=9)
    for pick in (0, 1):
        fn = lambda a, b, pick=pick: sk.prototype_distance(a, b)[pick]  # noqa: E731
        (out,), grads = run_with_grads(backend, fn, (x, protos))
        (out_r,), grads_r = run_with_grads("reference", fn, (to_ref(x), to_ref(protos)))
        assert_close(out, out_r, torch.float64, f"output {pick}")
        for g, g_r in zip(grads, grads_r):
            assert_close(g, g_r, torch.float64, f"gradient through output {pick}")
    x_const = x.detach()
    (cos, dist), (gp,) = run_with_grads(backend, sk.prototype_distance, (x_const, protos))
    (_, _), (gp_r,) = run_with_grads("reference", sk.prototype_distance, (to_ref(x_const), to_ref(protos)))
    assert_close(gp, gp_r, torch.float64, "d protos alone")


@pytest.mark.parametrize("backend,device", backend_params(TABLES))
@pytest.mark.parametrize("N,Q", [(0, 5), (6, 0), (0, 0)])
def test_empty(backend, device, N, Q):
    require(TABLES, backend, device)
    x, protos = _case(N, Q, 7, torch.float32, device, seed=10)
    with sk.use_backend(backend):
        cos, dist = sk.prototype_distance(x, protos)
        assert cos.shape == dist.shape == (N, Q)
        gx, gp = torch.autograd.grad((cos.sum() + dist.sum()), (x, protos))
    assert gx.shape == x.shape and gp.shape == protos.shape
    assert not gx.any() and not gp.any()


@pytest.mark.parametrize("backend,device", backend_params(TABLES))
def test_deterministic(backend, device):
    """Same inputs, same bits: every call, and on the CPU with 1 or several threads (the sizes
    split both CPU passes into several parallel tasks)."""
    require(TABLES, backend, device)
    N, Q, D = (300, 7, 600) if backend == "cpu" else (70, 37, 48)
    x, protos = _case(N, Q, D, torch.float32, device, seed=11, coincide=[(2, 3)])
    threads = torch.get_num_threads()
    runs = []
    for n in ((1, max(threads, 2)) if device == "cpu" else (threads, threads)):
        torch.set_num_threads(n)
        try:
            runs.append(run_with_grads(backend, sk.prototype_distance, (x, protos)))
        finally:
            torch.set_num_threads(threads)
    (a, ga), (b, gb) = runs
    assert all(torch.equal(u, v) for u, v in zip(a, b)), "outputs differ between runs"
    assert all(torch.equal(u, v) for u, v in zip(ga, gb)), "gradients differ between runs"


# ---------------------------------------------------------------------------------------------
# Triton: multi-block paths (several N tiles, Q blocks and D blocks in every kernel, partial sums
# over several blocks) that the default blocks reach only at GPU sizes, with shrunken blocks.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_triton_blocks(monkeypatch):
    from sgg_kernels.triton import prototypes as tp

    monkeypatch.setattr(tp, "_BLOCK_N", 16)
    monkeypatch.setattr(tp, "_MAX_BLOCK_Q", 16)
    monkeypatch.setattr(tp, "_BLOCK_D", 16)
    monkeypatch.setattr(tp, "_BLOCK_N_FINISH", 8)
    monkeypatch.setattr(tp, "_BLOCK_D_FIX", 8)
    monkeypatch.setattr(tp, "_MIN_D_PER_SPLIT", 16)
    monkeypatch.setattr(tp, "_MIN_N_PER_SPLIT", 16)
    monkeypatch.setattr(tp, "_FP64_SHRINK", 1)
    return tp


@pytest.mark.parametrize("backend,device", [p for p in backend_params(TABLES) if p.values[0] == "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_triton_multiblock_paths(backend, device, dtype, small_triton_blocks):
    """Several row tiles, Q blocks, D splits (the dot kernel) and N splits (grad P), several
    recompute steps, on strided inputs with coincident pairs."""
    require(TABLES, backend, device)
    tp = small_triton_blocks
    N, Q, D = 40, 37, 41
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bn, bq, bd, _, _, d_splits, _ = tp._dot_grid(N, Q, D, acc, native=False)
    fn, fq, fd = tp._finish_blocks(Q)
    n_splits = tp._grad_p_grid(N, Q, D, acc, native=False)[5]
    assert N > 2 * bn and Q > 2 * bq and N > 2 * fn and D > 2 * fd and d_splits >= 2 and n_splits >= 2
    x, protos = _case(N, Q, D, dtype, device, seed=12, coincide=[(5, 30), (6, 30), (7, 2)], strided=True)
    _check_against_reference(backend, x, protos, dtype)


# ---------------------------------------------------------------------------------------------
# The GEMM formulation's exact recompute: s = |x|^2 + |p|^2 - 2 <x, p> cancels near x = p
# ---------------------------------------------------------------------------------------------
def _near_case(device, seed=16, N=23, Q=9, D=300, offset=1e-3):
    """x_n = p_{n mod Q} + offset * noise for even n (s / (|x|^2 + |p|^2) ~ offset^2 / 2: far below
    TAU, so every such pair cancels in the GEMM form), plain random rows for odd n."""
    g = _gen(seed)
    protos = torch.randn(Q, D, generator=g, dtype=torch.float64)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    near = torch.arange(0, N, 2)
    x[near] = protos[near % Q] + offset * torch.randn(len(near), D, generator=g, dtype=torch.float64)
    return (x.float().to(device).requires_grad_(), protos.float().to(device).requires_grad_(), near, near % Q)


@pytest.mark.parametrize("backend,device", backend_params(TABLES))
def test_near_coincident_pairs_keep_fp32_accuracy(backend, device):
    """Pairs 1e-3 apart (relative) at D = 300: the cancelling difference would lose ~6 digits in
    float32; recomputed by direct differences, dist keeps float32 accuracy (relative 1e-5) and the
    gradients match the float64 reference."""
    require(TABLES, backend, device)
    x, protos, near, q_near = _near_case(device)
    (cos, dist), grads = run_with_grads(backend, sk.prototype_distance, (x, protos))
    (cos_r, dist_r), grads_r = run_with_grads("reference", sk.prototype_distance, (to_ref(x), to_ref(protos)))
    rel = ((dist.cpu().double() - dist_r) / dist_r).abs()
    assert rel[near, q_near].max() < 1e-5, f"near pairs: relative dist error {rel[near, q_near].max():.2e}"
    assert rel.max() < 1e-5, f"relative dist error {rel.max():.2e}"
    assert_close(cos, cos_r, torch.float32, "cos")
    for name, g, g_r in zip(("d x", "d protos"), grads, grads_r):
        assert_close(g, g_r, torch.float32, name)


@pytest.mark.parametrize("backend,device", [p for p in backend_params(TABLES) if p.values[0] == "triton"])
def test_triton_recompute_threshold(backend, device, monkeypatch):
    """The threshold decides: TAU = 0 (never recompute) loses the near pairs' accuracy (so the test
    above can fail), TAU = 1 (recompute every pair) gives the same values as the default within
    float32 rounding, on near and far pairs, forward and backward."""
    require(TABLES, backend, device)
    from sgg_kernels.triton import prototypes as tp

    x, protos, near, q_near = _near_case(device)
    (_, dist_r), _ = run_with_grads("reference", sk.prototype_distance, (to_ref(x), to_ref(protos)))
    default = tp._TAU
    results = {}
    for tau in (0.0, 1.0, default):
        monkeypatch.setattr(tp, "_TAU", tau)
        results[tau] = run_with_grads(backend, sk.prototype_distance, (x, protos))
    rel_never = ((results[0.0][0][1].cpu().double() - dist_r) / dist_r).abs()[near, q_near].max()
    assert rel_never > 1e-3, f"without the recompute the near pairs should cancel (relative error {rel_never:.2e})"
    (cos_all, dist_all), g_all = results[1.0]
    (cos_def, dist_def), g_def = results[default]
    assert_close(cos_all, cos_def, torch.float32, "cos, TAU = 1 vs default")
    assert_close(dist_all, dist_def, torch.float32, "dist, TAU = 1 vs default")
    for name, a, b in zip(("d x", "d protos"), g_all, g_def):
        assert_close(a, b, torch.float32, f"{name}, TAU = 1 vs default")


# ---------------------------------------------------------------------------------------------
# gradcheck (float64) and opcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device,name", gradcheck_params(ops.KERNELS, ["prototype_distance"]))
def test_gradcheck(backend, device, name):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if backend != "reference":
        require(TABLES, backend, device)
    x, protos = _case(5, 3, 4, torch.float64, device, seed=13)
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(sk.prototype_distance, (x, protos), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend,device", [pytest.param(None, "cpu", id="default-cpu"),
                                            pytest.param("reference", "cpu", id="reference-cpu"),
                                            pytest.param("triton", "cpu", id="triton-cpu"),
                                            pytest.param(None, "cuda", id="default-cuda", marks=pytest.mark.cuda)])
def test_opcheck(backend, device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if backend is not None and backend != "reference":
        require(TABLES, backend, device)
    x, protos = _case(9, 4, 6, torch.float32, device, seed=14, coincide=[(2, 1)])
    g = _gen(15)
    G, H = torch.randn(9, 4, generator=g).to(device), torch.randn(9, 4, generator=g).to(device)
    o = torch.ops.sgg_kernels
    with sk.use_backend(backend):
        torch.library.opcheck(o.prototype_distance.default, (x, protos))
        for need_x, need_protos in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(o.prototype_distance_backward.default,
                                  (G, H, x.detach(), protos.detach(), need_x, need_protos))


# ---------------------------------------------------------------------------------------------
# Autocast, torch.compile, bad inputs
# ---------------------------------------------------------------------------------------------
def test_autocast_mixed_dtypes():
    """Under autocast, bfloat16 instances and float32 prototypes meet in float32 (the op's rule)."""
    x, protos = _case(10, 4, 8, torch.float32, seed=16)
    want = sk.prototype_distance(x.to(torch.bfloat16).float(), protos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sk.prototype_distance(x.to(torch.bfloat16), protos)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, protos = _case(11, 5, 8, torch.float32, seed=17)

    def loss(x, protos):  # Eq. 4 read as a sum of its two terms, as a loss might
        cos, dist = sk.prototype_distance(x, protos)
        return (dist - cos).square().mean()

    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(x, protos)
    got_grads = torch.autograd.grad(got, (x, protos))
    want = loss(x, protos)
    want_grads = torch.autograd.grad(want, (x, protos))
    assert_close(got, want, torch.float32, "compiled loss")
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w, torch.float32, "compiled gradient")


def test_bad_inputs():
    x, protos = _case(6, 3, 5, torch.float32, seed=18)
    cases = [
        (lambda: sk.prototype_distance(x[0], protos), ValueError, r"x must have shape \[N, D\]"),
        (lambda: sk.prototype_distance(x[None], protos), ValueError, r"x must have shape \[N, D\]"),
        (lambda: sk.prototype_distance(x, protos[0]), ValueError, r"protos must have shape \[Q, D\]"),
        (lambda: sk.prototype_distance(x.long(), protos), TypeError, "x must be a float16/bfloat16/float32/float64"),
        (lambda: sk.prototype_distance(x, protos.int()), TypeError, "protos must be a float16/bfloat16/float32/float64"),
        (lambda: sk.prototype_distance(x.tolist(), protos), TypeError, "x must be a floating tensor"),
        (lambda: sk.prototype_distance(x, protos[:, :4]), ValueError, r"protos has size 4 in dim 1.*expected 5 \(D"),
        (lambda: sk.prototype_distance(x, protos.double()), TypeError, "protos is torch.float64 but x is torch.float32"),
        (lambda: sk.prototype_distance(x, protos.to("meta")), ValueError, "protos is on meta but x is on cpu"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_public_api():
    assert "prototype_distance" in sk.__all__ and sk.prototype_distance is ops.prototype_distance
    from sgg_kernels import info

    assert "prototypes" in info.FAMILIES and "prototype_distance" in info.report()
