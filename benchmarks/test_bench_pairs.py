"""pytest-benchmark: pair feature ops (LinkNet, family ``pairs``), fused vs eager, fwd+bwd.

    python -m pytest benchmarks -q                        # size small
    SGG_BENCH_SIZE=mid python -m pytest benchmarks -q

The cases are ``sgg_kernels.bench.cases.pairs``'s, the same as ``sgg-bench --ops ...``'s; each
benchmark is one forward plus ``torch.autograd.grad`` with fixed random cotangents. Results are
grouped per op so pytest-benchmark compares fused with eager side by side.
"""
import pytest

from sgg_kernels.bench import registry

CASES = registry.get_cases(family="pairs")


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pairs_fwd_bwd(benchmark, bench_step, bench_size, bench_device, case, impl):
    step = bench_step(case, impl, "fwd+bwd")
    benchmark.group = f"{case.name} [{bench_size}, {bench_device.type}] fwd+bwd"
    benchmark.extra_info.update(op=case.name, size=bench_size, device=str(bench_device), impl=impl,
                                backend=case.backend(bench_device.type) if impl == "fused" else "reference")
    benchmark(step)
