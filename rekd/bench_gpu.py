"""`python -m rekd.bench_gpu`: the GPU measurements of rekd.bench, one variant or all (rekd.bench.gpu)."""
import sys

from rekd.bench.gpu import main

if __name__ == "__main__":
    sys.exit(main())
