"""`python -m rekd.final`: final runs of chosen configurations over several seeds (rekd.evaluate.final)."""
import sys

from rekd.evaluate.final import main

if __name__ == "__main__":
    sys.exit(main())
