"""`python training/run_all.py`, as the README runs it: the whole study (see study/run_all.py).

This file is an entry shim, not part of the training package's code: run by path (also under
`accelerate launch`), it makes the repo root importable and hands over to `study.run_all`, the
orchestration layer above training/ and merging/ (docs/ARCHITECTURE.md, "Entry points").
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: the repo root, not training/, must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study.run_all import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
