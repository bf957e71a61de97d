"""The benchmark of sgg_kernels: ``python -m sgg_kernels.bench`` (console script ``sgg-bench``).

- :mod:`.registry`: :class:`~.registry.Case` (one op: sizes, inputs, fused and reference
  callables, grad inputs) and the discovery of cases;
- :mod:`.cases`: one module of cases per op family (``cases/cluster.py``, ...);
- :mod:`.runner`: builds the fwd / fwd+bwd steps of each impl (fused, eager, compile) and
  measures them, turning errors into rows;
- :mod:`.timing`: median time (CUDA events via ``triton.testing.do_bench``; CPU via
  ``torch.utils.benchmark``) and peak memory (CUDA allocator stats; CPU profiler memory events);
- :mod:`.floors`: each case's floor (bytes that must move, FLOPs; fwd and bwd) from its inputs,
  the copy bandwidth and GEMM rates measured on CUDA, the "% of floor" (``python -m
  sgg_kernels.bench.floors`` prints the floors at named sizes);
- :mod:`.report`: the table, the JSON file, the optional plot, device names.

The pytest-benchmark suite in ``benchmarks/`` reuses the same cases and steps.
"""
