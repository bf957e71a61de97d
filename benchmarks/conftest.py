"""pytest-benchmark setup shared by every ``benchmarks/test_bench_<family>.py``.

The cases (sizes, inputs, fused and reference callables) come from ``sgg_kernels.bench``, the
same ones the ``sgg-bench`` CLI runs; this file only turns them into pytest-benchmark calls.

Environment:
    SGG_BENCH_SIZE    size name (default ``small``; e.g. ``mid``, ``paper``, ``sgdet``)
    SGG_BENCH_DEVICE  ``cpu`` or ``cuda`` (default: cuda if available, else cpu)
    SGG_KERNELS_BACKEND  forces the fused impl's backend, as everywhere in sgg_kernels

A ``fused`` benchmark skips, with the reason, when the op has no compiled backend for the device
(it would only time the reference again) or when its kernel is not implemented yet
(``NotImplementedError``, e.g. an op schema without a CPU kernel). Any other error fails.
"""
from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

from sgg_kernels import _backend
from sgg_kernels.bench import registry, runner

SIZE = os.environ.get("SGG_BENCH_SIZE", "small")
DEVICE = torch.device(os.environ.get("SGG_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
SEED = 0


def pytest_report_header(config):
    return [
        f"sgg_kernels benchmarks: size {SIZE} (SGG_BENCH_SIZE), device {DEVICE} (SGG_BENCH_DEVICE), "
        f"extension {'loaded' if _backend._C is not None else 'missing: ' + str(_backend.C_ERROR)}, "
        f"{torch.get_num_threads()} CPU threads"
    ]


def make_bench_step(case: registry.Case, impl: str, pass_: str = "fwd+bwd") -> Callable[[], None]:
    """A ready-to-time step of ``case`` at :data:`SIZE` on :data:`DEVICE` (synchronizing on CUDA),
    already run once; skips the test where the fused backend is missing or not implemented."""
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("SGG_BENCH_DEVICE=cuda but no CUDA device is available")
    if SIZE not in case.sizes:
        pytest.skip(f"{case.name} has no size {SIZE!r} (it has {', '.join(case.sizes)})")
    if impl == "fused":
        backend = case.backend(DEVICE.type)
        if "unavailable" in backend:
            pytest.skip(f"{case.name}: the forced backend ({os.environ.get(_backend.ENV_VAR)}) cannot run on {DEVICE.type}")
        if "reference" in backend and _backend._forced() != "reference":
            pytest.skip(f"{case.name} has no compiled backend on {DEVICE.type} here (runs {backend}): nothing fused to time")
    inputs = case.prepare(SIZE, DEVICE, torch.float32, SEED)
    step = runner.make_step(runner.impl_callable(case, impl), inputs, case.grad_inputs, pass_, SEED)
    try:
        step()
    except NotImplementedError as exc:
        pytest.skip(f"{case.name} {impl} on {DEVICE.type} is not implemented: {runner.summarize(exc)}")
    if DEVICE.type != "cuda":
        return step

    def synchronized() -> None:
        step()
        torch.cuda.synchronize(DEVICE)
    synchronized()
    return synchronized


@pytest.fixture
def bench_size() -> str:
    """The size name benchmarked (SGG_BENCH_SIZE, default ``small``)."""
    return SIZE


@pytest.fixture
def bench_device() -> torch.device:
    """The device benchmarked (SGG_BENCH_DEVICE, default cuda if available, else cpu)."""
    return DEVICE


@pytest.fixture
def bench_step():
    """``bench_step(case, impl, pass_="fwd+bwd")`` -> a zero-argument step for ``benchmark(...)``."""
    return make_bench_step
