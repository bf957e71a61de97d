"""The benchmark's outputs: the terminal table, the JSON file, an optional PNG plot, device names.

JSON layout (one file per device, ``benchmarks/results/<device>.json`` by default)::

    {"device": str, "torch": str, "triton": str, "command": str, "date": ISO 8601,
     "results": [{"op", "size", "pass": "fwd" | "fwd+bwd", "impl": "fused" | "fused-nochecks" | "eager" | "compile",
                  "median_ms", "peak_mem_mb", "speedup", "backend", "dtype", "first_call_s",
                  "error", "floor_bytes", "floor_flops", "floor_ms", "pct_of_floor"}],
     "floors": {op: {size: {"bytes_fwd", "flops_fwd", "bytes_bwd", "flops_bwd"}}},
     "peaks": null (CPU) | {"copy_gbps", "copy_bytes", "gemm_tflops": {dtype: TFLOP/s}, "gemm_n",
                            "float32_matmul_precision", "method"},
     ...environment fields (cpu, cuda, sgg_kernels, git, timer, memory, sizes)}

``median_ms``/``peak_mem_mb``/``speedup`` are ``null`` on error rows, whose ``error`` says why.
``floor_bytes``/``floor_flops`` are the case's floor for the row's pass (:mod:`.floors`);
``floor_ms``/``pct_of_floor`` are ``null`` except on CUDA, where they come from the copy bandwidth
and GEMM rate measured in the same run (``peaks``): no CPU peak is ever assumed.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import torch

from .runner import Result

MB = float(2 ** 20)


# ---------------------------------------------------------------------------------------------
# Device and environment
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's marketing name, e.g. ``AMD EPYC 7R13 Processor`` (best effort)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5).stdout.strip()
        except Exception:
            pass
    return platform.processor() or platform.machine() or "unknown"


def _safe(name: str) -> str:
    """A file-name-safe form: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-") or "unknown"


def device_name(device: torch.device) -> str:
    """``NVIDIA-H100-80GB-HBM3`` for a GPU, ``cpu-AMD-EPYC-7R13`` for a CPU: safe in file names."""
    if device.type == "cuda":
        return _safe(torch.cuda.get_device_name(device))
    short = cpu_model()
    for noise in (r"\(R\)", r"\(TM\)", r"\(tm\)", r"@.*$", r"\bCPU\b", r"\bProcessor\b", r"\b\d+-Core\b", r"\bwith .*$"):
        short = re.sub(noise, " ", short)
    return "cpu-" + _safe(" ".join(short.split()))


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as the user typed it (``python -m sgg_kernels.bench ...`` or ``sgg-bench ...``)."""
    argv = list(sys.argv if argv is None else argv)
    prog = os.path.basename(argv[0]) if argv else "sgg-bench"
    if prog in ("__main__.py", "") or prog.endswith(".py"):
        prog = "python -m sgg_kernels.bench"
    return " ".join([prog] + [shlex.quote(a) for a in argv[1:]])


def _git_commit() -> Optional[str]:
    """The package checkout's commit (read only), or None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except Exception:
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> Dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    import sgg_kernels
    from sgg_kernels import _backend

    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "sgg_kernels": sgg_kernels.__version__,
        "extension": "loaded" if _backend._C is not None else f"missing ({_backend.C_ERROR})",
        "git": _git_commit(),
        "python": platform.python_version(),
        "cpu": {"model": cpu_model(), "threads": torch.get_num_threads(), "cores": os.cpu_count()},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["cuda"] = {
            "name": torch.cuda.get_device_name(device),
            "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 1e9, 1),
            "cuda": torch.version.cuda,
        }
    return env


def methods(device: torch.device, min_time: float, single_call: bool = False) -> Dict[str, str]:
    """How time and memory were measured (for the JSON and the table footer)."""
    if device.type == "cuda":
        timer = "median of triton.testing.do_bench(fn, return_mode='median'): CUDA events, L2 flushed between calls"
        memory = "torch.cuda max_memory_allocated() - memory_allocated() around one call, after reset_peak_memory_stats()"
    else:
        timer = (f"median of torch.utils.benchmark.Timer.blocked_autorange(min_run_time={min_time:g}), "
                 f"num_threads={torch.get_num_threads()}")
        memory = ("peak of the running sum of the PyTorch profiler's [memory] allocator events "
                  "(profile_memory=True) over one separate, untimed call")
    if single_call:
        timer = ("ONE timed call per row (time.perf_counter around it, synchronised), after the peak-memory "
                 f"call, which warms up; not a median (--single-call); num_threads={torch.get_num_threads()}")
    return {"timer": timer, "memory": memory + "; MB = 2**20 bytes, beyond the inputs (outputs, saved tensors, temporaries, gradients)"}


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------
def _fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 1000 else f"{v:.0f}"


def _fmt_floor_mb(nbytes: Optional[int]) -> str:
    if nbytes is None:
        return "-"
    mb = nbytes / MB
    return f"{mb:.3f}" if mb < 1 else f"{mb:.1f}" if mb < 1000 else f"{mb:.0f}"


def _fmt_gflop(flops: Optional[int]) -> str:
    if flops is None:
        return "-"
    g = flops / 1e9
    if g == 0:
        return "0"
    return f"{g:.1e}" if g < 0.001 else f"{g:.4f}" if g < 0.01 else f"{g:.3f}" if g < 10 else f"{g:.1f}"


def table(results: Sequence[Result], footer: Sequence[str] = (), percent: Optional[bool] = None) -> str:
    """The results as a fixed-width text table; error rows point to numbered notes below it.

    Every row shows its case's floor for its pass (MB = 2**20 bytes, GFLOP = 1e9 FLOPs). The
    "% floor" column (floor time / median, from peaks measured in the same run) appears when
    ``percent`` is true; None: when any row has one (CUDA runs), never on the CPU.
    """
    if percent is None:
        percent = any(r.pct_of_floor is not None for r in results)
    headers = ("op", "size", "pass", "impl", "backend", "median ms", "vs eager", "peak MB", "floor MB", "floor GFLOP")
    if percent:
        headers += ("% floor",)
    errors: List[str] = []
    rows = []
    for r in results:
        if r.error is not None:
            if r.error not in errors:
                errors.append(r.error)
            ms = f"error [{errors.index(r.error) + 1}]"
        else:
            ms = _fmt_ms(r.median_ms)
        speed = "-" if r.speedup is None else f"{r.speedup:.2f}x" if r.speedup >= 0.095 else f"{r.speedup:.3f}x"
        mem = f"{r.peak_mem_mb:.1f}" if r.peak_mem_mb is not None else "-"
        cells = (r.op, r.size, r.pass_, r.impl, r.backend or "-", ms, speed, mem, _fmt_floor_mb(r.floor_bytes),
                 _fmt_gflop(r.floor_flops))
        if percent:
            pct = r.pct_of_floor
            cells += ("-" if pct is None else f"{pct:.1f}%" if pct >= 0.1 else f"{pct:.2f}%",)
        rows.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    right = set(range(5, len(headers)))

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    previous = None
    for r, row in zip(results, rows):
        group = (r.op, r.size)
        if previous is not None and group != previous:
            out.append("")
        previous = group
        out.append(line(row))
    out.append("")
    out.extend(footer)
    if errors:
        out.append("errors:")
        out.extend(f"  [{i}] {e}" for i, e in enumerate(errors, 1))
    return "\n".join(out)


def floor_lines(peaks: Optional[Dict], device: torch.device) -> List[str]:
    """Footer lines saying what the floor columns mean and, on CUDA, the peaks measured."""
    lines = ["floor MB / GFLOP: what the row's pass must move (inputs read once, outputs written once; bwd: output "
             "grads + needed inputs/outputs read once, input grads written once) and compute (a multiply-add = 2 "
             "FLOPs), from the case's shapes (sgg_kernels/bench/floors.py)."]
    if device.type != "cuda":
        lines.append("% of floor: CUDA only (measured copy bandwidth and GEMM rate); no CPU peak is assumed.")
        return lines
    if not peaks or not peaks.get("copy_gbps"):
        lines.append("% of floor: not available (the copy bandwidth could not be measured).")
        return lines
    rates = ", ".join(f"{k} {v:.1f}" for k, v in (peaks.get("gemm_tflops") or {}).items())
    lines.append(f"% floor = 100 x max(bytes / {peaks['copy_gbps']:.0f} GB/s, FLOPs / GEMM rate) / median (fwd+bwd: "
                 f"per phase, added); measured in this run: copy {peaks['copy_gbps']:.0f} GB/s "
                 f"({peaks['copy_bytes'] / 2 ** 30:.2f} GiB device-to-device), GEMM {peaks['gemm_n']}^3 TFLOP/s: "
                 f"{rates or 'none'} (float32 matmul precision {peaks['float32_matmul_precision']!r}).")
    return lines


# ---------------------------------------------------------------------------------------------
# JSON and plot
# ---------------------------------------------------------------------------------------------
def floors_json(floors: Optional[Dict]) -> Dict:
    """``{(op, size): Floor}`` -> ``{op: {size: {bytes_fwd, flops_fwd, bytes_bwd, flops_bwd}}}``."""
    out: Dict = {}
    for (op, size), fl in (floors or {}).items():
        out.setdefault(op, {})[size] = fl.to_json()
    return out


def peaks_json(peaks: Optional[Dict]) -> Optional[Dict]:
    """The measured peaks, rounded, with how they were measured; None on the CPU."""
    if not peaks:
        return None
    out = dict(peaks)
    if out.get("copy_gbps") is not None:
        out["copy_gbps"] = round(out["copy_gbps"], 1)
    out["gemm_tflops"] = {k: round(v, 2) for k, v in (out.get("gemm_tflops") or {}).items()}
    out["method"] = ("median time (the cases' timer) of dst.copy_(src), a device-to-device copy of copy_bytes, "
                     "2 x copy_bytes moved; of a @ b with gemm_n x gemm_n matrices per dtype, 2 gemm_n^3 FLOPs")
    return out


def document(results: Sequence[Result], device: torch.device, command: str, extra: Optional[Dict] = None,
             floors: Optional[Dict] = None, peaks: Optional[Dict] = None) -> Dict:
    env = environment(device)
    doc = {
        "device": env.pop("device"),
        "torch": env.pop("torch"),
        "triton": env.pop("triton"),
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": [r.to_json() for r in results],
        "floors": floors_json(floors),
        "peaks": peaks_json(peaks),
    }
    doc.update(env)
    doc.update(extra or {})
    return doc


def write_json(doc: Dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")


def plot(results: Sequence[Result], path: str, title: str) -> None:
    """Bar chart of the speedup over eager per (op, size, pass), one bar per non-eager impl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from exc
    groups: List[tuple] = []
    impls: List[str] = []
    for r in results:
        if (r.op, r.size, r.pass_) not in groups:
            groups.append((r.op, r.size, r.pass_))
        if r.impl != "eager" and r.impl not in impls:
            impls.append(r.impl)
    value = {(r.op, r.size, r.pass_, r.impl): r.speedup for r in results}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(groups) * max(1, len(impls))), 4.5))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(groups))]
        ys = [value.get(g + (impl,)) or 0.0 for g in groups]
        ax.bar(xs, ys, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{op}\n{size} {p}" for op, size, p in groups], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("speedup over eager (x)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
