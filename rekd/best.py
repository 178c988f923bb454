"""`python -m rekd.best`: the best configurations of a search, as a settings file for rekd.final (rekd.evaluate.best)."""
import sys

from rekd.evaluate.best import main

if __name__ == "__main__":
    sys.exit(main())
