"""`python -m training.bench`, as the README has always run it: the benchmarks live in `benchmarks/`.

This module is an entry shim, not part of the training package's code: it only hands over to
`benchmarks.cli` (docs/ARCHITECTURE.md, "Entry points").
"""

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
