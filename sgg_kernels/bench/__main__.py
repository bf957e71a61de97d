"""``sgg-bench`` / ``python -m sgg_kernels.bench``: time every op against the eager and compiled reference.

For each (op, size, pass in {fwd, fwd+bwd}, impl in {fused, eager, compile}; on CUDA also
fused-nochecks, the fused ops with ``sk.set_checks(False)``: no host sync) it measures the median
time and the peak memory beyond the inputs, states the case's floor (bytes that must move, FLOPs;
``sgg_kernels/bench/floors.py``), and on CUDA the % of that floor reached, from a copy bandwidth and
GEMM rates measured in the same run; prints a table (speedup = eager median / median) and
writes ``benchmarks/results/local/<device>.json`` (git-ignored: a default run never overwrites a
committed result file; ``--out benchmarks/results/<device>.json`` writes one on purpose). An impl that fails (a kernel not built yet, a compile
error, out of memory) becomes an error row; the run goes on.

Examples::

    python -m sgg_kernels.bench                          # all ops, mid (CPU, ~2-3 min on 2 cores) / paper (CUDA)
    python -m sgg_kernels.bench --ops cosine_assign,cluster_dispatch --size small,mid
    python -m sgg_kernels.bench --no-compile --passes fwd+bwd --min-time 1
    sgg-bench --device cuda --size paper,sgdet --plot benchmarks/results/h100.png
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

import torch

from . import floors as floors_mod
from . import registry, report, runner, timing

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEFAULT_SIZE = {"cpu": "mid", "cuda": "paper"}
DEFAULT_OUT = "benchmarks/results/local/{device}.json"  # git-ignored


def _split(text: str) -> List[str]:
    """``"a, b,,a"`` -> ``["a", "b"]`` (order kept, duplicates dropped)."""
    return list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sgg-bench",
        description="Benchmark sgg_kernels' fused ops against the PyTorch reference, eager and torch.compile'd.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "fwd times a training forward (inputs require grad); fwd+bwd adds\n"
            "torch.autograd.grad(outputs, inputs, fixed random cotangents).\n"
            "Peak MB: memory held at the peak of one call beyond its inputs (MB = 2**20 bytes).\n"
            "Floor MB / GFLOP: bytes that must move and FLOPs that must happen (sgg_kernels/bench/floors.py);\n"
            "on CUDA, % floor = floor time at the copy bandwidth and GEMM rate measured in the same run / median."
        ),
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--ops", default=None, help="comma-separated op names (default: all; --list shows them)")
    p.add_argument("--size", default=None,
                   help="comma-separated size names, or 'all' (default: mid on cpu, paper on cuda)")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated, from {','.join(runner.IMPLS)} (default: all; fused-nochecks on CUDA only)")
    p.add_argument("--passes", default=",".join(runner.PASSES), help="comma-separated, from fwd,fwd+bwd (default: both)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile impl (the slow part on a CPU)")
    p.add_argument("--backend", default=None, choices=("reference", "cpu", "triton", "cuda"),
                   help="force the backend of the fused impl (default: the op's automatic choice)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="input dtype (default: float32)")
    p.add_argument("--min-time", type=float, default=0.3, metavar="SECONDS",
                   help="CPU: minimum run time of each measurement (blocked_autorange; default: 0.3)")
    p.add_argument("--single-call", action="store_true",
                   help="one timed call per row after the peak-memory call (no warm-up, no autorange): for "
                        "full-scale rows that take seconds per call, e.g. relation_head at sgdet on a CPU")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and cotangents (default: 0)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help=f"JSON file (default: {DEFAULT_OUT}, relative to the working directory, git-ignored; "
                        "name benchmarks/results/<device>.json to publish a result; '-' to write none)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also save a speedup bar chart (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the ops and their sizes, then exit")
    return p


def _list_cases() -> str:
    lines = []
    for case in registry.all_cases().values():
        lines.append(f"{case.name}  (family {case.family})")
        for size in case.sizes:
            desc = case.describe(size) if case.describe else ""
            lines.append(f"    {size:<7} {desc}")
    return "\n".join(lines)


def _load_average() -> Optional[float]:
    """The 1-minute load average (other processes competing for the CPU), where the OS has one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _family_sizes(cases, sizes):
    """(family, size, description) for the sizes run, one per family (its first case describes it)."""
    seen = {}
    for case in cases:
        if case.family not in seen:
            seen[case.family] = case
    for family, case in seen.items():
        for size in sizes:
            if size in case.sizes:
                yield family, size, (case.describe(size) if case.describe else str(case.sizes[size]))


def _size_lines(cases, sizes) -> List[str]:
    return [f"size {size} ({family}): {desc}" for family, size, desc in _family_sizes(cases, sizes)]


def _sizes_json(cases, sizes):
    out = {}
    for family, size, desc in _family_sizes(cases, sizes):
        out.setdefault(family, {})[size] = desc
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.list:
        print(_list_cases())
        return 0

    # -- what to run ---------------------------------------------------------------------------
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to this torch "
                f"({torch.__version__}, CUDA {torch.version.cuda or 'not built'})")
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        cases = registry.get_cases(_split(args.ops) if args.ops else None)
    except KeyError as exc:
        p.error(str(exc.args[0]))
    if not cases:
        p.error("no op to run")
    known_sizes = list(dict.fromkeys(s for c in cases for s in c.sizes))
    sizes = _split(args.size or DEFAULT_SIZE[device_type])
    if sizes == ["all"]:
        sizes = known_sizes
    bad = [s for s in sizes if s not in known_sizes]
    if bad:
        p.error(f"unknown size(s) {', '.join(bad)}; known: {', '.join(known_sizes)}")
    default_impls = [i for i in runner.IMPLS if device_type == "cuda" or i != "fused-nochecks"]
    impls = _split(args.impls) if args.impls else default_impls
    if args.no_compile:
        impls = [i for i in impls if i != "compile"]
    passes = _split(args.passes)
    for what, chosen, allowed in (("impl", impls, runner.IMPLS), ("pass", passes, runner.PASSES)):
        wrong = [x for x in chosen if x not in allowed]
        if wrong or not chosen:
            p.error(f"--{what}s: {', '.join(wrong) or 'none given'}; expected some of {', '.join(allowed)}")
    dtype = DTYPES[args.dtype]
    command = report.command_line(None if argv is None else ["sgg-bench", *argv])

    # -- run -----------------------------------------------------------------------------------
    progress = None
    log = print
    if not args.no_progress:
        try:
            from tqdm import tqdm

            progress = tqdm(total=runner.count(cases, sizes, impls, passes), desc="sgg-bench",
                            unit="run", file=sys.stderr, dynamic_ncols=True)
            log = tqdm.write
        except ImportError:
            pass
    load = _load_average()
    if device.type == "cpu" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other processes compete for the CPU and "
            "timings will be noisy (OpenMP threads stall when a core is taken; --threads 1 suffers least)")
    mem_probe = timing.check_cpu_memory_probe() if device.type == "cpu" else None
    if mem_probe is not None and not 3.5 < mem_probe < 4.5:
        log(f"warning: the CPU memory probe measured {mem_probe:.2f} MB for a 3.81 MB tensor; peak MB may be wrong")
    start = time.perf_counter()
    results: List[runner.Result] = []
    floors: dict = {}
    peaks = None
    interrupted = False
    try:
        if device.type == "cuda":  # the copy bandwidth and GEMM rates of the % of floor, in this run
            peaks = floors_mod.measure_peaks(device, tuple(floors_mod.GEMM_DTYPES) + (args.dtype,), log=log)
        runner.run(cases, sizes, impls, passes, device=device, dtype=dtype, seed=args.seed,
                   min_time=args.min_time, backend=args.backend, progress=progress, log=log, results=results,
                   floors=floors, single_call=args.single_call)
    except KeyboardInterrupt:  # show what was measured so far; write no file
        interrupted = True
        runner.add_speedups(results)
    finally:
        if progress is not None:
            progress.close()
    floors_mod.apply_peaks(results, peaks)
    wall_s = time.perf_counter() - start

    # -- report --------------------------------------------------------------------------------
    how = report.methods(device, args.min_time, args.single_call)
    compile_s = sum(r.first_call_s or 0.0 for r in results if r.impl == "compile")
    name = report.device_name(device)
    footer = [
        f"device {name} ({report.cpu_model() if device.type == 'cpu' else torch.cuda.get_device_name(device)}), "
        f"torch {torch.__version__}, {args.dtype}, seed {args.seed}, {torch.get_num_threads()} CPU threads"
        + (f", load average {load:.1f} at start" if load is not None and device.type == "cpu" else ""),
        f"time: {how['timer']}",
        f"peak MB: {how['memory']}",
        "vs eager: eager median / this median (same op, size, pass). fwd = training forward (inputs require grad);",
        "fwd+bwd = forward + torch.autograd.grad with fixed random cotangents. compile = torch.compile(reference, dynamic=False).",
        *report.floor_lines(peaks, device),
        *_size_lines(cases, sizes),
        f"total wall time {wall_s:.0f} s" + (f", of which torch.compile warm-up (first calls) {compile_s:.0f} s" if compile_s else ""),
    ]
    print(report.table(results, footer, percent=device.type == "cuda" and bool(peaks and peaks.get("copy_gbps"))))
    if interrupted:
        print("interrupted: the rows above are what was measured; no JSON written", file=sys.stderr)
        return 130
    if args.out != "-":
        path = args.out or DEFAULT_OUT.format(device=name)
        extra = {
            "timer": how["timer"], "memory": how["memory"],
            "min_time_s": args.min_time if device.type == "cpu" and not args.single_call else None,
            "single_call": args.single_call,
            "forced_backend": args.backend, "seed": args.seed, "sizes": _sizes_json(cases, sizes),
            "wall_s": round(wall_s, 1), "load_average_at_start": None if load is None else round(load, 2),
        }
        if mem_probe is not None:
            extra["memory_probe_mb"] = round(mem_probe, 3) if mem_probe == mem_probe else None  # NaN: no probe
        report.write_json(report.document(results, device, command, extra, floors=floors, peaks=peaks), path)
        print(f"wrote {path}")
    if args.plot:
        try:
            report.plot(results, args.plot, f"sgg_kernels speedup over eager, {name}")
            print(f"wrote {args.plot}")
        except Exception as exc:
            print(f"plot not written: {runner.summarize(exc)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
