"""Every read the dashboard makes of results.duckdb: one function per question, each a DataFrame.

Rules kept here, so the pages need not think about them:
- results are read through the views of the results contract (docs/ARCHITECTURE.md) only; the one
  exception is the `runs` table (run id, command, config), which no view exposes yet and
  which is read only when present;
- connections are read-only (`Store.read()`): the dashboard can never change the file;
- a view that an older database lacks gives `None` (the page says "not there yet"), an
  empty view gives an empty DataFrame; a missing, locked or corrupt file raises
  `StoreError`, whose message the page shows as it is;
- results are cached by (path, modification time of the file and of its write-ahead log), so
  a page re-renders from memory until the pipeline writes something new.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pandas as pd
import streamlit as st

from mlvision.errors import StoreError
from mlvision.store import Store

VIEWS = ("task_results", "merge_results", "task_similarity", "findings", "benchmarks")


def db_version(db: str) -> tuple:
    """Cache key part that changes whenever the file (or its WAL) changes; () if absent."""
    key = []
    for path in (Path(db), Path(str(db) + ".wal")):
        try:
            stat = path.stat()
            key.append((stat.st_mtime_ns, stat.st_size))
        except FileNotFoundError:
            key.append(None)
    return tuple(key)


@st.cache_data(show_spinner=False, max_entries=256)
def _relations(db: str, version: tuple) -> frozenset[str]:
    with Store(db).read() as con:
        rows = con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    return frozenset(name for (name,) in rows)


@st.cache_data(show_spinner=False, max_entries=256)
def _query(db: str, version: tuple, sql: str) -> pd.DataFrame:
    with Store(db).read() as con:
        return con.execute(sql).df()


def relations(db: str) -> frozenset[str]:
    """Names of the tables and views the file holds (raises StoreError if it cannot be read)."""
    return _relations(str(db), db_version(db))


def _read(db: str, relation: str, sql: str) -> pd.DataFrame | None:
    if relation not in relations(db):
        return None
    try:
        return _query(str(db), db_version(db), sql).copy()
    except duckdb.Error as error:  # e.g. a view over a table an incompatible version dropped
        raise StoreError(
            f"the `{relation}` view of {db} cannot be read ({str(error).splitlines()[0]}): the file "
            "may come from an incompatible version; re-create it with `python training/run_all.py`"
        ) from None


# -- the questions the pages ask -----------------------------------------------------------


def task_results(db: str) -> pd.DataFrame | None:
    """One row per trained model (head baseline or adapter) with its test accuracy."""
    return _read(db, "task_results", "SELECT * FROM task_results ORDER BY task, model_kind, seed")


def merge_results(db: str) -> pd.DataFrame | None:
    """One row per (merged model, task it serves)."""
    return _read(db, "merge_results", "SELECT * FROM merge_results ORDER BY method, k, tasks, seed, task")


def task_similarity(db: str) -> pd.DataFrame | None:
    return _read(db, "task_similarity", "SELECT * FROM task_similarity ORDER BY measure, task_a, task_b, seed")


def findings(db: str) -> pd.DataFrame | None:
    return _read(db, "findings", "SELECT * FROM findings ORDER BY finding, statistic")


def benchmarks(db: str) -> pd.DataFrame | None:
    return _read(db, "benchmarks", "SELECT * FROM benchmarks ORDER BY name, variant, k, batch_size")


def runs(db: str) -> pd.DataFrame | None:
    """Stored pipeline runs (the `runs` table: no contract view exposes it yet), newest first."""
    return _read(db, "runs", "SELECT * FROM runs ORDER BY started_at DESC NULLS LAST")


def merge_summary(db: str) -> pd.DataFrame | None:
    """Per (method, k): number of merged models, groups, seeds and evaluated rows."""
    return _read(
        db,
        "merge_results",
        """
        SELECT method, k, count(DISTINCT merge_id) AS merges, count(DISTINCT tasks) AS groups,
               count(DISTINCT seed) AS seeds, count(*) AS rows
        FROM merge_results GROUP BY method, k ORDER BY method, k""",
    )


# -- facts about tasks (labels, domain) ----------------------------------------------------


def task_info(db: str, names: list[str]) -> pd.DataFrame:
    """task, domain, label_names (list), description, source for each name.

    The `tasks` table of the file is used when present (it knows hub tasks too); otherwise the
    built-in registry. Unknown names get domain "unknown" rather than an error.
    """
    stored = _read(db, "tasks", "SELECT task, domain, label_names, description, source FROM tasks")
    rows = {}
    if stored is not None:
        for record in stored.to_dict("records"):
            labels = record["label_names"]
            record["label_names"] = json.loads(labels) if isinstance(labels, str) else list(labels or [])
            rows[record["task"]] = record
    from mlvision.tasks import HUB_PREFIX, get_task

    for name in names:
        if name in rows:
            continue
        record = {"task": name, "domain": "unknown", "label_names": [], "description": "", "source": ""}
        if not name.startswith(HUB_PREFIX):  # a hub name would load the dataset: never here
            try:
                task = get_task(name)
                record.update(
                    domain=task.domain,
                    label_names=list(task.label_names),
                    description=task.description,
                    source=task.source,
                )
            except Exception:  # an unknown name: keep the placeholder
                pass
        rows[name] = record
    columns = ["task", "domain", "label_names", "description", "source"]
    return pd.DataFrame([rows[n] for n in names], columns=columns)


@st.cache_data(show_spinner=False, max_entries=64)
def sample_images(name: str, per_class: int = 1, max_images: int = 10, size: int = 72):
    """A few test images of a task (one per class first), as (PIL image, label name) pairs.

    Only a task already prepared in the local cache is read: the dashboard never triggers a
    download. Returns None when the task is not cached.
    """
    from PIL import Image

    from mlvision.tasks import HUB_PREFIX, load_task, task_cache_path

    if name.startswith(HUB_PREFIX) or not task_cache_path(name).exists():
        return None
    split = load_task(name)["test"]
    names = split.features["label"].names
    labels = split["label"]
    chosen, seen = [], {}
    for index, label in enumerate(labels):
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            chosen.append(index)
        if len(chosen) >= max_images:
            break
    images = []
    for index in chosen:
        row = split[index]
        image = row["image"].convert("RGB").resize((size, size), Image.NEAREST)
        images.append((image, names[row["label"]]))
    return images


def default_db() -> str:
    from mlvision.paths import DEFAULT_DB_PATH

    return os.environ.get("MLV_DB") or str(DEFAULT_DB_PATH)
