"""`python -m rekd.bench` (__main__): rows of measured ratios (rows), on CPUs (cpu), of the search strategy
on a synthetic multi-fidelity benchmark (search_efficiency), and on a GPU (gpu, also `python -m rekd.bench_gpu`)."""
