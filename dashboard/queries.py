"""Every read the dashboard makes of results.duckdb: one function per question, each a DataFrame.

Rules kept here, so the pages need not think about them:
- results are read through the views of the results contract (docs/ARCHITECTURE.md) only; the one
  exception is the `runs` table (run id, command, config), which no view exposes yet and
  which is read only when present;
- connections are read-only (`Store.read()`): the dashboard can never change the file;
- every question is answered from one snapshot of the file, read in one short connection per
  version of the file (path, modification time and size of the file and of its write-ahead log).
  Opening the file costs more than all the queries together, a run writing the file finds it
  free between snapshots, and every page sees one consistent state. A page re-renders from
  memory until the pipeline writes something new;
- a view that an older database lacks gives `None` (the page says "not there yet"), an
  empty view gives an empty DataFrame; a missing, corrupt or newer file, or a view whose columns
  hold unexpected types, raises `StoreError`, whose message the page shows as it is;
- while a run writes, the file is locked: `Store.read()` waits (up to $MLV_STORE_READ_WAIT_S), and
  if the file is still locked, the last snapshot read (kept in memory) answers instead, and
  `stale_since()` tells the app to say from when. Only a file never read before shows the lock as
  an error.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import duckdb
import pandas as pd
import streamlit as st

from mlvision.errors import StoreError
from mlvision.store import Store, StoreBusyError

# Every question the pages ask: name -> (the view or table it reads, its SQL).
QUESTIONS = {
    "task_results": ("task_results", "SELECT * FROM task_results ORDER BY task, model_kind, seed"),
    "merge_results": ("merge_results", "SELECT * FROM merge_results ORDER BY method, k, tasks, seed, task"),
    "task_similarity": ("task_similarity", "SELECT * FROM task_similarity ORDER BY measure, task_a, task_b, seed"),
    "findings": ("findings", "SELECT * FROM findings ORDER BY finding, statistic"),
    "benchmarks": ("benchmarks", "SELECT * FROM benchmarks ORDER BY name, variant, k, batch_size"),
    "runs": ("runs", "SELECT * FROM runs ORDER BY started_at DESC NULLS LAST"),
    "merge_summary": (
        "merge_results",
        """SELECT method, k, count(DISTINCT merge_id) AS merges, count(DISTINCT tasks) AS groups,
                  count(DISTINCT seed) AS seeds, count(*) AS rows
           FROM merge_results GROUP BY method, k ORDER BY method, k""",
    ),
    "tasks": ("tasks", "SELECT task, domain, label_names, description, source FROM tasks"),
    "probe_results": (
        "probe_results",
        "SELECT task, accuracy, n_merge_eval, merge_eval_correct FROM probe_results ORDER BY task",
    ),
    "merge_plans": (
        "merge_plans",
        "SELECT * FROM merge_plans ORDER BY method, kind, target, max_backbones, group_index, task",
    ),
}


@dataclass
class Snapshot:
    """What the file held at one moment: enough to answer every question in QUESTIONS."""

    columns: dict[str, dict[str, str]]  # table or view -> {column: DuckDB type}
    schema_version: int | None
    answers: dict[str, pd.DataFrame | str | None]  # question -> rows; None: no such view; str: why it failed


# db -> (its last snapshot, when it was read); shared by every session of this server.
_last_good: dict[str, tuple[Snapshot, datetime]] = {}
# Per script run (each runs in its own thread): when the last-good snapshot this render used was read.
_render = threading.local()


def db_version(db: str) -> tuple:
    """Cache key part that changes whenever the file (or its WAL) changes; None parts where absent."""
    key = []
    for path in (Path(db), Path(str(db) + ".wal")):
        try:
            stat = path.stat()
            key.append((stat.st_mtime_ns, stat.st_size))
        except FileNotFoundError:
            key.append(None)
    return tuple(key)


def start_render() -> None:
    """Forget what the previous render served from memory (the app calls this before drawing a page)."""
    _render.stale_since = None


def stale_since() -> datetime | None:
    """When the results this render served from memory were read; None when they were read now."""
    return getattr(_render, "stale_since", None)


@st.cache_data(show_spinner=False, max_entries=16)
def _read_snapshot(db: str, version: tuple) -> Snapshot:
    """Every answer, read in one read-only connection (cached per version of the file)."""
    with Store(db).read() as con:
        columns: dict[str, dict[str, str]] = {}
        for table, column, kind in con.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
        ).fetchall():
            columns.setdefault(table, {})[column] = kind
        schema_version = None
        if "schema_version" in columns:
            schema_version = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
        answers: dict[str, pd.DataFrame | str | None] = {}
        for name, (relation, sql) in QUESTIONS.items():
            if relation not in columns:
                answers[name] = None
                continue
            try:
                answers[name] = con.execute(sql).df()
            except (duckdb.CatalogException, duckdb.BinderException) as error:  # e.g. a view over a dropped table
                answers[name] = str(error).splitlines()[0]
    return Snapshot(columns, schema_version, answers)


def snapshot(db: str) -> Snapshot:
    """The file's current snapshot, or while it stays locked the last one read; raises StoreError if
    it cannot be read (and was never read before) or was written by a newer version of the code."""
    try:
        snap = _read_snapshot(str(db), db_version(db))
        _last_good[str(db)] = (snap, datetime.now())
    except StoreBusyError:
        if str(db) not in _last_good:
            raise
        snap, _render.stale_since = _last_good[str(db)]
    Store(db).check_version(snap.schema_version)
    return snap


def relations(db: str) -> frozenset[str]:
    """Names of the tables and views the file holds (raises StoreError if it cannot be read)."""
    return frozenset(snapshot(db).columns)


def _answer(db: str, question: str) -> pd.DataFrame | None:
    snap = snapshot(db)
    relation, _ = QUESTIONS[question]
    answer = snap.answers[question]
    if answer is None:
        return None
    Store(db).check_view_types(relation, snap.columns[relation])
    if isinstance(answer, str):
        raise StoreError(
            f"the `{relation}` view of {db} cannot be read ({answer}): it refers to tables or columns the file "
            "lacks (an incompatible or edited file); re-create it with `python training/run_all.py`"
        )
    return answer.copy()


# -- the questions the pages ask -----------------------------------------------------------


def task_results(db: str) -> pd.DataFrame | None:
    """One row per trained model (head baseline or adapter) with its test accuracy."""
    return _answer(db, "task_results")


def merge_results(db: str) -> pd.DataFrame | None:
    """One row per (merged model, task it serves)."""
    return _answer(db, "merge_results")


def probe_results(db: str) -> pd.DataFrame | None:
    """One row per task's multi-layer probe (None in a file from before the probes)."""
    return _answer(db, "probe_results")


def merge_plans(db: str) -> pd.DataFrame | None:
    """One row per (stored merge plan, task): its group, predicted and measured retention (None before plans)."""
    return _answer(db, "merge_plans")


def task_similarity(db: str) -> pd.DataFrame | None:
    return _answer(db, "task_similarity")


def findings(db: str) -> pd.DataFrame | None:
    return _answer(db, "findings")


def benchmarks(db: str) -> pd.DataFrame | None:
    return _answer(db, "benchmarks")


def runs(db: str) -> pd.DataFrame | None:
    """Stored pipeline runs (the `runs` table: no contract view exposes it yet), newest first."""
    return _answer(db, "runs")


def merge_summary(db: str) -> pd.DataFrame | None:
    """Per (method, k): number of merged models, groups, seeds and evaluated rows."""
    return _answer(db, "merge_summary")


# -- facts about tasks (labels, domain) ----------------------------------------------------


def pair_relations(db: str, names: list[str]) -> Callable[[str, str], str]:
    """A function naming the designed relation of two of `names` (mlvision.tasks.relation_kind: "same_images",
    "same_labels", "same_style" or "unrelated").

    Built-in tasks answer from the registry (image set, label space, style); a task the registry does not know
    (a hub task) is "same_domain" with another when the file's `tasks` table gives both the same domain.
    """
    from mlvision.tasks import HUB_PREFIX, relation_kind

    domains = task_info(db, names).set_index("task")["domain"].to_dict()

    def kind(a: str, b: str) -> str:
        if not (a.startswith(HUB_PREFIX) or b.startswith(HUB_PREFIX)):  # a hub name would load the dataset
            try:
                return relation_kind(a, b)
            except Exception:  # noqa: BLE001 - a name this version's registry does not know
                pass
        same = domains.get(a, "unknown") == domains.get(b, "unknown") != "unknown"
        return "same_domain" if same else "unrelated"

    return kind


def task_info(db: str, names: list[str]) -> pd.DataFrame:
    """task, domain, label_names (list), description, source for each name.

    The `tasks` table of the file is used when present (it knows hub tasks too); otherwise the
    built-in registry. Unknown names get domain "unknown" rather than an error.
    """
    stored = _answer(db, "tasks")
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
