"""`python -m rekd.reproduce`: the paper's Tables 1-2 as paired seeded runs (rekd.evaluate.reproduce)."""
import sys

from rekd.evaluate.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
