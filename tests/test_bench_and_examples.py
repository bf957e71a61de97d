"""The benchmark command and the example scripts run end to end (tiny sizes; no timing asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, **kw)


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
    assert "cluster_aggregate" in proc.stdout and "median" in proc.stdout.lower()


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
