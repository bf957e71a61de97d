"""pytest-benchmark: every op of ``sgg-bench`` (all families), fused vs eager, fwd+bwd.

    python -m pytest benchmarks -q                        # size small
    SGG_BENCH_SIZE=mid python -m pytest benchmarks -q
    python -m pytest benchmarks -q -k pairs               # one family

The cases are ``sgg_kernels.bench.cases.<family>``'s, the same as ``sgg-bench --ops ...``'s; each
benchmark is one forward plus ``torch.autograd.grad`` with fixed random cotangents. Results are
grouped per op so pytest-benchmark compares fused with eager side by side; each benchmark's
``extra_info`` carries the case's floor (bytes, FLOPs; fwd and bwd). A new family's cases appear
here by themselves.
"""
import pytest

from sgg_kernels.bench import registry

CASES = registry.get_cases()


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}-{c.name}" for c in CASES])
def test_fwd_bwd(benchmark, bench_step, bench_size, bench_device, case, impl):
    # the case's floor (sgg_kernels/bench/floors.py), from inputs of its own, freed before the step builds its
    floor = case.compute_floor(case.prepare(bench_size, bench_device)) if bench_size in case.sizes else None
    step = bench_step(case, impl, "fwd+bwd")
    benchmark.group = f"{case.name} [{bench_size}, {bench_device.type}] fwd+bwd"
    benchmark.extra_info.update(op=case.name, family=case.family, size=bench_size, device=str(bench_device), impl=impl,
                                backend=case.backend(bench_device.type) if impl == "fused" else "reference",
                                floor=None if floor is None else floor.to_json())
    benchmark(step)
