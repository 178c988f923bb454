"""`python -m rekd.export RUN --out FILE`: a run's student network as a dense or sparse weights file (rekd.train.export)."""
import sys

from rekd.train.export import main

if __name__ == "__main__":
    sys.exit(main())
