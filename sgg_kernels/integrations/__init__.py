"""Drop-in integrations with scene-graph training code (Scene-Graph-Benchmark.pytorch: ``sgg_kernels.integrations.sgb``)."""
