"""benchmarks/gpu_check.sh on this machine: its limits fit the device tool, and its rehearsal
(GPU steps stubbed) runs every step in order, logs each one and writes the summary.

The script itself has not run on a GPU yet; these tests check its control flow, logging, timeouts,
summary and background build handling, which are what a cut or failed device call depends on.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ORDER = ["env", "build", "parity", "bench", "cudatests", "memcheck", "initcheck", "sgdet", "racecheck", "synccheck"]
OPTIONAL = ["tritontests", "gradchecks"]
DEVICE_FILES_LIMIT = 8  # the device tool brings back at most 8 files from $OUT

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _text():
    return SCRIPT.read_text()


def _limits():
    return {m.group(1).lower(): int(m.group(2)) for m in re.finditer(r'^: "\$\{TIMEOUT_([A-Z]+):=(\d+)\}"$', _text(), re.M)}


def _default_steps():
    return re.search(r'^DEFAULT_STEPS="([^"]+)"$', _text(), re.M).group(1).split()


def _run(tmp_path, extra_env, timeout=60):
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "TIMEOUT_")) and k != "STEPS"}
    env.update({"OUT": str(out), "GPU_CHECK_LOGS": str(logs), "PYTHON": sys.executable, "GPU_CHECK_REHEARSAL": "1"})
    env.update(extra_env)
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=timeout)
    return proc, out, logs


def _summary_rows(path):
    rows = {}
    order = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ORDER + OPTIONAL:
            m = re.match(r"^(\S+)\s+(.+?)\s+(\S+)\s+(\S+)\s+(\S+)$", line)
            assert m, line
            order.append(m.group(1))
            rows[m.group(1)] = {"status": m.group(2), "rc": m.group(3), "secs": m.group(4), "limit": m.group(5)}
    return order, rows


def test_limits_fit_the_device_call():
    limits, steps = _limits(), _default_steps()
    assert steps == ORDER, "the default steps, most important first"
    assert set(ORDER + OPTIONAL) <= set(limits), f"every step has its own TIMEOUT_<STEP>: {sorted(limits)}"
    total = sum(limits[s] for s in steps)
    assert total <= 540, f"the default steps' limits add up to {total} s > 540 s (10-minute call, start and transfers)"
    budget = int(re.search(r'^BUDGET="\$\{GPU_CHECK_BUDGET:-(\d+)\}"$', _text(), re.M).group(1))
    assert total <= budget <= 540
    assert f"add up to {total} s" in _text(), "the header states the sum"
    assert _text().splitlines()[1:3] and "set -uo pipefail" in _text()


def test_rehearsal_runs_every_step_in_order(tmp_path):
    # cudatests and sgdet are stubbed here to keep this test fast; the others run their CPU stand-ins
    # (the real pytest selections, every test skipping; a tiny CPU sgg-bench).
    proc, out, logs = _run(tmp_path, {"GPU_CHECK_STUB_CUDATESTS": "echo cudatests stub",
                                      "GPU_CHECK_STUB_SGDET": "echo sgdet stub"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = out / "summary.txt"
    assert summary.is_file()
    order, rows = _summary_rows(summary)
    assert order == ORDER + OPTIONAL, order
    limits = _limits()
    for step in ORDER:
        assert rows[step]["status"] == "ok" and rows[step]["rc"] == "0", (step, rows[step])
        assert int(rows[step]["secs"]) <= int(rows[step]["limit"]) <= limits[step]
        assert (logs / f"{step}.log").is_file() and (logs / f"{step}.log").stat().st_size > 0, step
    for step in OPTIONAL:
        assert rows[step]["status"] == "not selected"
    assert "every selected step passed" in summary.read_text()
    # the summary is printed after every step, and last
    assert proc.stdout.count("step         status") >= len(ORDER) + 1
    assert proc.stdout.rstrip().splitlines()[-1].startswith("logs: ")
    # steps.log: every foreground step under its header, in order; the build's tail after parity
    steps_log = (out / "steps.log").read_text()
    heads = re.findall(r"^===== (\w+)(?: \(background\))?: ", steps_log, re.M)
    assert heads == ["env", "parity", "build"] + ORDER[3:], heads
    assert "rehearsal: would run" in (out / "build.log").read_text()
    assert "would run: compute-sanitizer --tool racecheck" in (logs / "racecheck.log").read_text()
    assert "needs a CUDA GPU" in (logs / "parity.log").read_text()
    bench = json.loads((out / "bench-paper.json").read_text())
    assert bench, "the rehearsal's tiny bench wrote its JSON into $OUT"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= DEVICE_FILES_LIMIT, f"{len(files)} files in $OUT: the device tool returns {DEVICE_FILES_LIMIT}"


def test_rehearsal_reports_timeouts_failures_and_skips(tmp_path):
    proc, out, logs = _run(tmp_path, {
        "STEPS": "env build parity bench cudatests",
        "GPU_CHECK_STUB_BUILD": "echo building; exit 3",      # a failed background build ...
        "GPU_CHECK_STUB_PARITY": "echo started; sleep 30",   # ... while parity runs past its limit
        "TIMEOUT_PARITY": "2",
        "GPU_CHECK_STUB_BENCH": "echo bench stub",
        "GPU_CHECK_STUB_CUDATESTS": "echo must not run; exit 1",
    }, timeout=40)
    assert proc.returncode == 1, proc.stdout[-3000:]
    order, rows = _summary_rows(out / "summary.txt")
    assert order == ORDER + OPTIONAL
    assert rows["env"]["status"] == "ok"
    assert rows["build"]["status"] == "FAILED" and rows["build"]["rc"] == "3"
    assert rows["parity"]["status"] == "TIMED OUT" and rows["parity"]["rc"] == "124"
    assert int(rows["parity"]["secs"]) < 10
    assert "started" in (logs / "parity.log").read_text()
    assert rows["bench"]["status"] == "ok", "bench runs without the build (Triton ops need none)"
    assert rows["cudatests"]["status"] == "skipped: no build"
    assert rows["memcheck"]["status"] == "not selected"
    assert "SOME STEPS FAILED" in (out / "summary.txt").read_text()


def test_budget_cuts_late_steps(tmp_path):
    proc, out, _ = _run(tmp_path, {"STEPS": "env parity bench", "GPU_CHECK_BUDGET": "6",
                                   "GPU_CHECK_STUB_ENV": "echo env stub", "GPU_CHECK_STUB_PARITY": "sleep 30",
                                   "GPU_CHECK_STUB_BENCH": "echo bench stub"}, timeout=40)
    order, rows = _summary_rows(out / "summary.txt")
    assert rows["parity"]["status"] == "TIMED OUT" and int(rows["parity"]["limit"]) <= 6
    assert rows["bench"]["status"] == "no time"
    assert proc.returncode == 1


def test_rejects_unknown_steps(tmp_path):
    proc, _, _ = _run(tmp_path, {"STEPS": "env bogus"})
    assert proc.returncode == 2 and "unknown step 'bogus'" in proc.stderr
