"""`python -m rekd.bench` (__main__): rows of measured ratios (rows), on CPUs (cpu), of the search strategy
on a synthetic multi-fidelity benchmark (search_efficiency) and of multi-objective strategies on a synthetic
Pareto problem (pareto_efficiency), and on a GPU (gpu, also `python -m rekd.bench_gpu`). The tabular
benchmark of rekd's own learning curves, `python -m rekd.bench.tabular` (tabular): the recorded table (table),
its replay through the real searcher and ASHA (replay) and the strategies compared on it (search_quality)."""
