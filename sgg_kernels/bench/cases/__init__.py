"""Benchmark cases, one module per op family (DESIGN.md, Layout).

Each module defines ``CASES``, a list of :class:`sgg_kernels.bench.registry.Case`;
:func:`sgg_kernels.bench.registry.all_cases` imports every module here that does not start with
``_``. To benchmark a new family, add ``<family>.py`` with its cases: nothing else changes.
"""
