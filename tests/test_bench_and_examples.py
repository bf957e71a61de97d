"""The benchmark command and the example scripts run end to end (tiny sizes; no timing asserted)."""
import dataclasses
import json

import pytest

from helpers import ROOT, run_python


def _run(args, timeout=600):
    """The package under test in a subprocess (helpers.run_python); ``python/...`` scripts of the checkout."""
    return run_python([ROOT / a if str(a).startswith("python/") else a for a in args], timeout=timeout)


def test_sgg_bench_writes_results_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(["-m", "sgg_kernels.bench", "--device", "cpu", "--size", "small", "--ops", "cluster_aggregate,cluster_dispatch",
                 "--no-compile", "--min-time", "0.01", "--no-progress", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "command", "date", "results"):
        assert key in data, key
    rows = data["results"]
    assert {(r["op"], r["pass"], r["impl"]) for r in rows} == {
        (op, p, impl) for op in ("cluster_aggregate", "cluster_dispatch") for p in ("fwd", "fwd+bwd") for impl in ("fused", "eager")
    }
    for r in rows:
        assert r["size"] == "small" and not r.get("error"), r
        assert r["median_ms"] > 0 and r["peak_mem_mb"] >= 0
        # every row states its floor for its pass; the % of floor is CUDA-only (no CPU peak assumed)
        assert r["floor_bytes"] > 0 and r["floor_flops"] > 0, r
        assert r["floor_ms"] is None and r["pct_of_floor"] is None, r
        fl = data["floors"][r["op"]]["small"]
        assert r["floor_bytes"] == fl["bytes_fwd"] + (fl["bytes_bwd"] if r["pass"] == "fwd+bwd" else 0)
    assert data["peaks"] is None
    assert "cluster_aggregate" in proc.stdout and "median" in proc.stdout.lower()
    header = next(line for line in proc.stdout.splitlines() if line.startswith("op "))
    assert "floor MB" in header and "floor GFLOP" in header and "%" not in header


def test_sgg_bench_single_call_times_one_call(monkeypatch):
    """--single-call: the peak-memory call, then exactly one timed call per row (counted), and the
    JSON and footer say so."""
    from sgg_kernels.bench import registry, runner

    case = registry.all_cases()["cluster_dispatch"]
    calls = []

    def counted(**kw):
        calls.append(1)
        return case.fused(**kw)

    counted_case = dataclasses.replace(case, fused=counted)
    monkeypatch.setattr(runner.timing, "peak_memory_mb", lambda step, device: (step(), 1.0)[1])
    rows = runner.run([counted_case], ["small"], impls=("fused",), passes=("fwd",), single_call=True)
    assert len(rows) == 1 and rows[0].median_ms > 0 and rows[0].first_call_s is None and rows[0].peak_mem_mb == 1.0
    assert len(calls) == 2  # the peak-memory call and the timed one
    calls.clear()
    runner.run([counted_case], ["small"], impls=("fused",), passes=("fwd",), min_time=0.01)
    assert len(calls) > 2  # the default: cold call, warm-up, peak, autorange


def test_sgg_bench_single_call_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(["-m", "sgg_kernels.bench", "--device", "cpu", "--size", "small", "--ops", "cluster_dispatch",
                 "--no-compile", "--passes", "fwd", "--single-call", "--no-progress", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["single_call"] is True and data["min_time_s"] is None
    assert "ONE timed call" in data["timer"] and "ONE timed call" in proc.stdout
    assert all(r["median_ms"] > 0 and not r.get("error") for r in data["results"])


def test_superpixel_example_runs():
    proc = _run(["python/superpixel_clustering.py", "--size", "14x21", "--dim", "32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "output [2, 32, 14, 21]" in proc.stdout


def test_forced_backend_covers_the_backward(monkeypatch):
    """`sgg-bench --backend reference`: the backward ops (run inside torch.autograd.grad) take the
    forced backend too, not only the forward."""
    from sgg_kernels.bench import registry, runner
    from sgg_kernels.ops import cluster

    chosen = {"fwd": [], "bwd": []}
    for key, table in zip(("fwd", "bwd"), cluster.KERNELS["cluster_dispatch"]):
        original = table.select
        monkeypatch.setattr(table, "select", lambda device_type, _o=original, _k=key: chosen[_k].append(_o(device_type))
                            or chosen[_k][-1])
    case = registry.all_cases()["cluster_dispatch"]
    rows = runner.run([case], ["small"], impls=["fused"], passes=["fwd+bwd"], backend="reference", min_time=0.01,
                      log=lambda _: None)
    assert rows and all(r.error is None for r in rows)
    assert chosen["fwd"] and set(chosen["fwd"]) == {"reference"}
    assert chosen["bwd"] and set(chosen["bwd"]) == {"reference"}


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_shape(path):
    """(height, width) of a PNG, read back with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape[:2]


def test_visualize_superpixels_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("skimage")
    out = tmp_path / "sp.png"
    proc = _run(["python/visualize_superpixels.py", "--size", "48x48", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout and "48x48" in proc.stdout
    assert out.read_bytes()[:8] == _PNG_SIGNATURE
    h, w = _png_shape(out)
    assert 300 <= h <= 1000 and 1000 <= w <= 2000 and w > 2 * h, (h, w)   # three panels side by side


def test_sgg_bench_writes_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "b.json", tmp_path / "p.png"
    proc = _run(["-m", "sgg_kernels.bench", "--device", "cpu", "--size", "small", "--ops", "cluster_dispatch",
                 "--no-compile", "--min-time", "0.01", "--no-progress", "--out", str(out), "--plot", str(png)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {png}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert png.read_bytes()[:8] == _PNG_SIGNATURE
    h, w = _png_shape(png)
    assert h >= 200 and w >= 300, (h, w)


def test_sgg_bench_default_output_is_git_ignored(tmp_path):
    """Without --out, sgg-bench writes benchmarks/results/local/<device>.json (relative to the working
    directory), a path git ignores: a default run never overwrites a committed result file."""
    import shutil
    import subprocess

    proc = run_python(["-m", "sgg_kernels.bench", "--device", "cpu", "--size", "small", "--ops", "cluster_dispatch",
                       "--no-compile", "--passes", "fwd", "--min-time", "0.01", "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    assert len(written) == 1 and written[0].startswith("benchmarks/results/local/"), written
    assert f"wrote {written[0]}" in proc.stdout
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", written[0]], cwd=ROOT)
        assert ignored.returncode == 0, f"{written[0]} is not git-ignored in the checkout"


@pytest.mark.parametrize("script", ["python/superpixel_clustering.py", "python/visualize_superpixels.py",
                                    "python/train_sgg_toy.py"])
def test_examples_without_cuda_say_so_in_one_line(script):
    """``--device cuda`` where this torch sees no GPU: argparse's one-line error (exit code 2) naming the
    torch build and the way out, not torch's "Torch not compiled with CUDA enabled" traceback."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --device cuda is valid here")
    if script.endswith("visualize_superpixels.py"):
        pytest.importorskip("matplotlib")
        pytest.importorskip("skimage")
    proc = _run([script, "--device", "cuda"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "no CUDA device is visible to this torch" in errors[0] and torch.__version__ in errors[0]
    assert "--device cpu" in errors[0]
    assert "Traceback" not in proc.stderr and "not compiled with CUDA enabled" not in proc.stderr


@pytest.mark.parametrize("impl,checks", [("fused", True), ("fused-nochecks", False)])
def test_fused_nochecks_runs_without_value_checks(monkeypatch, impl, checks):
    """`fused-nochecks` (sgg-bench's default on CUDA) runs the op with sk.set_checks(False): its
    index value check (a reduction and a host sync) never runs; `fused` runs it every call. The
    setting is restored afterwards."""
    from sgg_kernels import _checks
    from sgg_kernels._backend import checks_enabled
    from sgg_kernels.bench import registry, runner

    calls = []
    original = _checks.index_range
    monkeypatch.setattr(_checks, "index_range", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    case = registry.all_cases()["cluster_dispatch"]
    rows = runner.run([case], ["small"], impls=[impl], passes=["fwd", "fwd+bwd"], min_time=0.01, log=lambda _: None)
    assert len(rows) == 2 and all(r.error is None and r.impl == impl and r.backend == case.backend("cpu") for r in rows)
    assert bool(calls) == checks and set(calls) <= {"assign"}, calls
    assert checks_enabled()
