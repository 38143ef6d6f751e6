"""Where things live on disk: one place, so every stage agrees.

- the data cache (downloaded packages, prepared datasets) is per user, outside the repo:
  `$MLV_CACHE_DIR` or `~/.cache/multilora-vision`;
- results and artifacts default to the repository root, so a clone works out of the box.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DB_PATH = REPO_ROOT / "results.duckdb"
DEFAULT_ARTIFACTS_DIR = REPO_ROOT / "artifacts"


def cache_dir() -> Path:
    """The data cache; created on first use."""
    path = Path(os.environ.get("MLV_CACHE_DIR", Path.home() / ".cache" / "multilora-vision"))
    path.mkdir(parents=True, exist_ok=True)
    return path
