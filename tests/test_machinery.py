"""The op machinery every family reuses: backend choice, checks, autocast, compile, import fallback."""

import pytest
import torch

import sgg_kernels as sk
from sgg_kernels import _backend
from sgg_kernels.ops import cluster as ops

from helpers import assert_close, run_python

HAS_CUDA = torch.cuda.is_available()


def _feats(B=2, M=24, D=6, C=4, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, M, D, generator=gen, dtype=dtype), torch.randn(B, C, D, generator=gen, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------
def test_extension_loaded():
    """The README's test command builds first: a missing extension is a failure, not a skip."""
    assert _backend._C is not None, _backend.C_ERROR
    assert torch.ops.sgg_kernels._built_with_cuda() == (torch.version.cuda is not None and _backend.c_has_cuda())


def test_triton_importable():
    assert _backend.triton is not None, _backend.TRITON_ERROR


def test_import_without_extension_falls_back_to_reference(tmp_path):
    """A missing/broken _C never breaks `import sgg_kernels`: a warning says why, the reference runs."""
    code = (
        "import sys, warnings\n"
        "sys.modules['sgg_kernels._C'] = None  # makes `import sgg_kernels._C` raise ImportError\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import sgg_kernels as sk\n"
        "assert any('could not be loaded' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "import torch\n"
        "f = torch.randn(1, 10, 3); c = torch.randn(1, 2, 3)\n"
        "a, s = sk.cosine_assign(f, c)\n"
        "assert a.shape == (1, 10)\n"
        "from sgg_kernels import info\n"
        "report = info.report()\n"
        "assert 'NOT loaded' in report and 'reference*' in report, report\n"
        "print('fallback ok')\n"
    )
    out = run_python(["-c", code], env={_backend.REQUIRE_ENV: "0"})  # this test asks for the fallback
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout


def test_required_extension_missing_is_an_import_error():
    """Under the suite's SGG_KERNELS_REQUIRE_EXTENSION=1 a missing _C fails loudly, saying what to do."""
    code = ("import sys\nsys.modules['sgg_kernels._C'] = None\n"
            "try:\n    import sgg_kernels\nexcept ImportError as exc:\n    print('raised:', exc)\n")
    out = run_python(["-c", code])
    assert out.returncode == 0, out.stderr
    assert "raised:" in out.stdout and "--no-build-isolation -e ." in out.stdout, out.stdout


def test_subprocesses_run_the_package_under_test():
    """run_python (every subprocess test) imports this process's sgg_kernels, with its _C loaded."""
    code = "import sgg_kernels, sgg_kernels._backend as b; print(sgg_kernels.__file__); print(b._C is not None)"
    out = run_python(["-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [sk.__file__, "True"], (out.stdout, sk.__file__)


def test_info_command():
    out = run_python(["-m", "sgg_kernels.info"])
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "extension", "cosine_assign", "cluster_dispatch", "cpu:", "cuda:"):
        assert word in out.stdout


# ---------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------
def test_default_backend_is_compiled_on_cpu():
    assert ops._ASSIGN.select("cpu") == "cpu"
    assert ops._KNN_INDEX.select("cpu") == "cpu"


def test_use_backend_forces_and_nests():
    calls = []
    original = ops._AGGREGATE.reference

    def spy(*args):
        calls.append("reference")
        return original(*args)

    ops._AGGREGATE._cache["reference"] = spy
    try:
        f, c = _feats()
        a, s = sk.cosine_assign(f, c)
        sk.cluster_aggregate(f, a, s, c)
        assert calls == []  # default: the C++ kernel
        with sk.use_backend("reference"):
            sk.cluster_aggregate(f, a, s, c)
            with sk.use_backend(None):  # back to automatic inside
                sk.cluster_aggregate(f, a, s, c)
            sk.cluster_aggregate(f, a, s, c)
        assert calls == ["reference", "reference"]
    finally:
        ops._AGGREGATE._cache.pop("reference")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert ops._ASSIGN.select("cpu") == "reference"
    with sk.use_backend("cpu"):  # the context manager wins over the variable
        assert ops._ASSIGN.select("cpu") == "cpu"
    monkeypatch.setenv(_backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        ops._ASSIGN.select("cpu")


def test_forcing_an_unavailable_backend_says_why():
    f, c = _feats()
    with pytest.raises(ValueError, match="unknown backend"):
        with sk.use_backend("tpu"):
            pass
    with sk.use_backend("cuda"):  # no CUDA C++ kernel for cosine_assign, and CPU tensors anyway
        with pytest.raises(RuntimeError, match="backend 'cuda' was forced.*no CUDA C\\+\\+ kernel.*available here"):
            sk.cosine_assign(f, c)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in ops._ASSIGN.why_not("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops._ASSIGN.why_not("triton", "cpu") is None


# ---------------------------------------------------------------------------------------------
# Argument checks: clear errors naming the argument, raised before any kernel runs
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    f, c = _feats()
    a, s = sk.cosine_assign(f, c)
    cases = [
        (lambda: sk.cosine_assign(f[0], c), ValueError, "feats must have shape \\[B, M, D\\]"),
        (lambda: sk.cosine_assign(f.long(), c), TypeError, "feats must be a float16/bfloat16/float32/float64"),
        (lambda: sk.cosine_assign(f, c[..., :5]), ValueError, "centers has size 5 in dim 2.*expected 6 \\(D"),
        (lambda: sk.cosine_assign(f, c[:1]), ValueError, "centers has size 1 in dim 0.*expected 2 \\(B"),
        (lambda: sk.cosine_assign(f, c.double()), TypeError, "centers is torch.float64 but feats is torch.float32"),
        (lambda: sk.cosine_assign(f, c.to("meta")), ValueError, "centers is on meta but feats is on cpu"),
        (lambda: sk.cosine_assign(f, c[:, :0]), ValueError, "at least one center"),
        (lambda: sk.cosine_assign(f, c, torch.ones(1)), ValueError, "alpha and beta come together"),
        (lambda: sk.cosine_assign(f, c, torch.ones(2), torch.ones(2)), ValueError, "alpha must be a floating tensor with one element"),
        (lambda: sk.cluster_aggregate(f, a.int(), s, c), TypeError, "assign must be an int64 tensor"),
        (lambda: sk.cluster_aggregate(f, a[:, :5], s, c), ValueError, "assign has size 5 in dim 1.*expected 24 \\(M"),
        (lambda: sk.cluster_aggregate(f, a, s.double(), c), TypeError, "sim is torch.float64 but values is torch.float32"),
        (lambda: sk.cluster_aggregate(f, a + 4, s, c), IndexError, "assign holds 7, outside \\[0, 4\\)"),
        (lambda: sk.cluster_aggregate(f, a - 5, s, c), IndexError, "assign holds -5"),
        (lambda: sk.cluster_dispatch(c, a + 4, s), IndexError, "assign holds 7, outside \\[0, 4\\)"),
        (lambda: sk.cluster_dispatch(c, a, s, f[..., :3]), ValueError, "residual has size 3 in dim 2.*expected 6"),
        (lambda: sk.superpixel_cluster(f, c, values=f), ValueError, "values and value_centers come together"),
        (lambda: sk.superpixel_cluster(f, c, f[:, :3], c), ValueError, "values has size 3 in dim 1.*expected 24"),
        (lambda: sk.knn_center_features(f, sk.grid_points(4, 6), sk.grid_centers(4, 6, 2), 25), ValueError, "k = 25 .* only M = 24"),
        (lambda: sk.knn_center_features(f, sk.grid_points(4, 6), sk.grid_centers(4, 6, 2), 0), ValueError, "k must be a positive int"),
        (lambda: sk.knn_center_features(f, sk.grid_points(5, 6), sk.grid_centers(4, 6, 2), 3), ValueError, "points has size 30 .* expected 24 \\(M"),
        (lambda: sk.knn_center_features(f, sk.grid_points(4, 6)[:, :1], sk.grid_centers(4, 6, 2), 3), ValueError, "points must be a floating tensor of \\(x, y\\)"),
        (lambda: sk.gather_mean(f, torch.zeros(2, 3, 2)), TypeError, "knn_index must be an int64 tensor"),
        (lambda: sk.gather_mean(f, torch.full((2, 3, 2), 24)), IndexError, "knn_index holds 24, outside \\[0, 24\\)"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_value_checks_can_be_turned_off():
    f, c = _feats()
    a, s = sk.cosine_assign(f, c)
    bad = a.clone()
    bad[0, 0] = 99
    with pytest.raises(IndexError):
        sk.cluster_aggregate(f, bad, s, c)
    sk.set_checks(False)
    assert not sk.checks_enabled()
    out = sk.cluster_aggregate(f, bad, s, c)  # no error, no out-of-bounds access
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Autocast: mixed float inputs are cast (as torchvision registers its ops), not rejected
# ---------------------------------------------------------------------------------------------
def test_autocast_accepts_mixed_dtypes():
    f, c = _feats()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assign, sim = sk.cosine_assign(f, c.to(torch.bfloat16))
        out = sk.cluster_aggregate(f.to(torch.bfloat16), assign, sim, c)
        y = sk.cluster_dispatch(out, assign, sim.to(torch.bfloat16), f)
    assert sim.dtype == torch.float32 and out.dtype == torch.float32 and y.dtype == torch.float32
    a_ref, s_ref = sk.cosine_assign(f, c.to(torch.bfloat16).float())
    assert torch.equal(assign, a_ref)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of the whole Eq. 1 -> 2 -> 3 -> 9 pipeline, forward and backward
# ---------------------------------------------------------------------------------------------
def _pipeline(feats, points, centers, alpha, beta, W):
    center_feats, _ = sk.knn_center_features(feats, points, centers, 3)       # Eq. 1
    assign, sim = sk.cosine_assign(feats, center_feats, alpha, beta)           # Eq. 2
    agg = sk.cluster_aggregate(feats, assign, sim, center_feats)               # Eq. 3
    return sk.cluster_dispatch(torch.tanh(agg @ W), assign, sim, feats)        # Eq. 9


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_compile_fullgraph_pipeline(device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    H, W_, D = 4, 5, 6
    feats = torch.randn(2, H * W_, D, generator=gen).to(device).requires_grad_()
    W = torch.randn(D, D, generator=gen).to(device).requires_grad_()
    alpha = torch.tensor([1.2], device=device, requires_grad=True)
    beta = torch.tensor([0.1], device=device, requires_grad=True)
    args = (feats, sk.grid_points(H, W_, device=device), sk.grid_centers(H, W_, 2, device=device), alpha, beta, W)
    compiled = torch.compile(_pipeline, fullgraph=True)
    out_c = compiled(*args)
    grads_c = torch.autograd.grad(out_c.square().sum(), (feats, alpha, beta, W))
    out_e = _pipeline(*args)
    grads_e = torch.autograd.grad(out_e.square().sum(), (feats, alpha, beta, W))
    assert_close(out_c, out_e, torch.float32, "compiled forward")
    for g_c, g_e in zip(grads_c, grads_e):
        assert_close(g_c, g_e, torch.float32, "compiled backward")


def test_triton_launches_run_under_their_tensors_device(monkeypatch):
    """The guard itself, without a GPU: a Triton kernel for tensors on cuda:1 is called inside
    ``torch.cuda.device(cuda:1)``; other backends get no guard (the CUDA C++ kernels take their own)."""
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    calls = []
    table = _backend.Kernels("cluster", lambda *a: calls.append(("reference", list(entered))), triton="cosine_assign")
    monkeypatch.setattr(torch.cuda, "device", Recorder)
    monkeypatch.setattr(table, "why_not", lambda backend, device_type: None)
    monkeypatch.setattr(table, "resolve", lambda backend: lambda *a: calls.append((backend, list(entered))))
    cuda1 = torch.device("cuda", 1)
    with sk.use_backend("triton"):
        table(cuda1, 1, 2)
    assert calls[-1] == ("triton", [cuda1]) and entered[-1] == "exit"
    with sk.use_backend("reference"):
        table(cuda1, 1, 2)
    assert calls[-1] == ("reference", [cuda1, "exit"])  # no new guard entered


@pytest.mark.cuda
def test_triton_on_a_second_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs (tensors on cuda:1 while cuda:0 is current); {torch.cuda.device_count()} here")
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(0)
    feats, centers = torch.randn(2, 70, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    with sk.use_backend("triton"):
        out, assign, sim = sk.superpixel_cluster(feats.to("cuda:1"), centers.to("cuda:1"))
    assert out.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    with sk.use_backend("reference"):
        out_r, _, _ = sk.superpixel_cluster(feats.double(), centers.double())
    assert_close(out, out_r, torch.float32, "superpixel_cluster on cuda:1")
