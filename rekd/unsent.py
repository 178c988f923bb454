"""`python -m rekd.unsent`: send the MLflow calls a search kept while its store was unreachable (rekd.search.unsent)."""
import sys

from rekd.search.unsent import main

if __name__ == "__main__":
    sys.exit(main())
