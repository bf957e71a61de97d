"""Timing and peak-memory measurement of a zero-argument callable.

Time (median, milliseconds):
- CUDA: ``triton.testing.do_bench(fn, return_mode="median")``: CUDA events around each call, L2
  flushed between calls, after its own warm-up (falls back to a CUDA-event loop without Triton).
- CPU: ``torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time=...)``, median over
  blocks, with ``num_threads=torch.get_num_threads()`` (the Timer's default is ONE thread, which
  would not be what a user gets).

Peak memory (MB = 2**20 bytes): the most memory held at any moment of one call of ``fn`` beyond
what was allocated before it (its inputs): outputs, saved activations, temporaries, gradients.
- CUDA: ``max_memory_allocated() - memory_allocated()`` around one call, after
  ``reset_peak_memory_stats()`` (caching-allocator blocks in use, not reserved ones).
- CPU: one separate, untimed call under ``torch.profiler.profile(profile_memory=True)``; the
  allocator's ``[memory]`` events carry +bytes per allocation and -bytes per free; sorted by time,
  the maximum of their running sum is the peak. Allocations made by worker threads of a parallel
  region are not recorded by the profiler (kernels rarely allocate there).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
from typing import Callable, Iterator, Optional

import torch

MB = float(2 ** 20)


def warmup(fn: Callable[[], None], device: torch.device, iters: int = 3) -> None:
    for _ in range(iters):
        fn()
    synchronize(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], None], device: torch.device, min_time: float = 0.3) -> float:
    """Median time of one call of ``fn`` in milliseconds (see the module docstring)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except Exception:  # no Triton: CUDA events by hand
            return _cuda_event_median_ms(fn, device)
        with torch.cuda.device(device):
            return float(do_bench(fn, return_mode="median"))
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def _cuda_event_median_ms(fn, device, rep_ms: float = 100.0) -> float:
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    n = max(5, min(1000, int(rep_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return float(statistics.median(times))


def peak_memory_mb(fn: Callable[[], None], device: torch.device) -> Optional[float]:
    """Peak memory of one call of ``fn`` beyond what was allocated before it, in MB (2**20 bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MB
    peak = _cpu_peak_bytes(fn)
    return None if peak is None else peak / MB


def _cpu_peak_bytes(fn: Callable[[], None]) -> Optional[int]:
    """Peak of the running sum of the profiler's allocator events; None if this torch lacks them."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw events: FunctionEvent lists fold allocations into the op that made them, which
    # loses their order relative to frees.
    try:
        raw = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch without kineto results: no memory number rather than an error
        return None
    events = [
        e for e in raw
        if e.name() == "[memory]" and e.device_type() in (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
    ]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (Kineto prints "profiler_start/stop" lines there from C++)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (e.g. some notebooks)
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def check_cpu_memory_probe() -> float:
    """What the CPU probe reports for ``torch.empty(1_000_000)`` (expected: 3.81 MB = 4e6 bytes)."""
    peak = _cpu_peak_bytes(lambda: torch.empty(1_000_000))
    return float("nan") if peak is None else peak / MB
