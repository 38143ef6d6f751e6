"""The store: one DuckDB file, `results.duckdb`, the only place results live.

Tables are this module's business; readers use the views of the results contract
(docs/ARCHITECTURE.md): `task_results`, `merge_results`, `task_similarity`, `findings`, `benchmarks`.

Why it is written this way:
- every write is one transaction on a short-lived connection (`Store.write()`), so a crash
  never leaves half a result, and readers (dashboard, demo) can open the file between writes;
- rows are keyed by the hash of their full configuration, and inserts skip keys already
  present, so re-running any stage adds no duplicate rows;
- readers open the file read-only (`Store.read()`), so they can never change it;
- a file written by a newer version of the code (higher `schema_version`) is refused with
  a message, never silently mis-read or "upgraded" downwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from mlvision.errors import StoreError

# 2: benchmark_rows (and the benchmarks view) gained bench_id, section, backbone, image_size, threads,
#    repeats, peak_memory_mb, note, run_id; a version-1 file is upgraded in place (columns added).
SCHEMA_VERSION = 2

_TABLES = [
    """CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, started_at TIMESTAMP, finished_at TIMESTAMP,
        status VARCHAR, command VARCHAR, config JSON, machine JSON)""",
    """CREATE TABLE IF NOT EXISTS tasks (
        task VARCHAR PRIMARY KEY, label_names JSON, domain VARCHAR, source VARCHAR,
        description VARCHAR, n_train INTEGER, n_validation INTEGER, n_test INTEGER)""",
    # One trained model: a head baseline or an adapter (with its own head).
    """CREATE TABLE IF NOT EXISTS models (
        model_id VARCHAR PRIMARY KEY, task VARCHAR, model_kind VARCHAR, seed INTEGER,
        backbone VARCHAR, config JSON, config_hash VARCHAR, path VARCHAR,
        trainable_params BIGINT, backbone_params BIGINT, train_seconds DOUBLE,
        run_id VARCHAR, created_at TIMESTAMP)""",
    # Accuracy of one model on one split (n = number of images scored).
    """CREATE TABLE IF NOT EXISTS evaluations (
        model_id VARCHAR, split VARCHAR, accuracy DOUBLE, n INTEGER, eval_config_hash VARCHAR,
        run_id VARCHAR, created_at TIMESTAMP, PRIMARY KEY (model_id, split))""",
    # One merged multi-task model: a method applied to the adapters of a group of tasks.
    """CREATE TABLE IF NOT EXISTS merges (
        merge_id VARCHAR PRIMARY KEY, method VARCHAR, k INTEGER, tasks VARCHAR, seed INTEGER,
        adapter_ids JSON, hyperparams JSON, backbone VARCHAR, merge_seconds DOUBLE,
        selection JSON, run_id VARCHAR, created_at TIMESTAMP)""",
    # Accuracy of a merged model on one of its tasks, beside that task's single adapter and head
    # baseline scored on the very same images.
    """CREATE TABLE IF NOT EXISTS merge_evaluations (
        merge_id VARCHAR, task VARCHAR, split VARCHAR, merged_accuracy DOUBLE, single_accuracy DOUBLE,
        head_accuracy DOUBLE, n INTEGER, run_id VARCHAR, created_at TIMESTAMP,
        PRIMARY KEY (merge_id, task, split))""",
    """CREATE TABLE IF NOT EXISTS similarities (
        task_a VARCHAR, task_b VARCHAR, measure VARCHAR, value DOUBLE, seed INTEGER, config JSON,
        run_id VARCHAR, created_at TIMESTAMP, PRIMARY KEY (task_a, task_b, measure, seed))""",
    # value is NULL when the statistic is not available; `note` then says why.
    """CREATE TABLE IF NOT EXISTS finding_rows (
        finding VARCHAR, statistic VARCHAR, value DOUBLE, ci_low DOUBLE, ci_high DOUBLE, n INTEGER,
        note VARCHAR, run_id VARCHAR, created_at TIMESTAMP, PRIMARY KEY (finding, statistic))""",
    # One benchmark figure (training/bench.py). `name` is the section (inference | training | merge),
    # `variant` what was timed; throughput is images per second; peak_memory_mb is NULL where not measured.
    """CREATE TABLE IF NOT EXISTS benchmark_rows (
        name VARCHAR, variant VARCHAR, k INTEGER, batch_size INTEGER, device VARCHAR, median_ms DOUBLE,
        p95_ms DOUBLE, throughput DOUBLE, ratio_to_backbone DOUBLE, machine JSON, measured_at TIMESTAMP)""",
    *(
        f"ALTER TABLE benchmark_rows ADD COLUMN IF NOT EXISTS {column}"
        for column in (
            "bench_id VARCHAR",
            "backbone VARCHAR",
            "image_size INTEGER",
            "threads INTEGER",
            "repeats INTEGER",
            "peak_memory_mb DOUBLE",
            "note VARCHAR",
            "run_id VARCHAR",
        )
    ),
]

_VIEWS = [
    """CREATE OR REPLACE VIEW task_results AS
        SELECT m.task, m.model_kind, m.seed, e.accuracy, e.n AS n_test, m.backbone,
               m.config_hash, m.run_id, m.model_id, m.trainable_params, m.backbone_params
        FROM models m JOIN evaluations e ON e.model_id = m.model_id AND e.split = 'test'""",
    """CREATE OR REPLACE VIEW merge_results AS
        SELECT g.merge_id, g.method, g.k, g.tasks, e.task, g.seed, e.merged_accuracy, e.single_accuracy,
               e.head_accuracy, e.merged_accuracy / nullif(e.single_accuracy, 0) AS normalized_accuracy,
               (e.merged_accuracy - e.head_accuracy)
                   / nullif(e.single_accuracy - e.head_accuracy, 0) AS normalized_gain,
               g.hyperparams, g.backbone, e.n, g.run_id
        FROM merges g JOIN merge_evaluations e ON e.merge_id = g.merge_id AND e.split = 'test'""",
    """CREATE OR REPLACE VIEW task_similarity AS
        SELECT task_a, task_b, measure, value, seed, config, run_id FROM similarities""",
    """CREATE OR REPLACE VIEW findings AS
        SELECT finding, statistic, value, ci_low, ci_high, n, note, run_id FROM finding_rows""",
    """CREATE OR REPLACE VIEW benchmarks AS
        SELECT name, variant, k, batch_size, device, median_ms, p95_ms, throughput, ratio_to_backbone,
               machine, measured_at, peak_memory_mb, image_size, threads, repeats, backbone, note, bench_id, run_id
        FROM benchmark_rows""",
]


def config_hash(config: dict) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Store:
    """Access to one results.duckdb file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._schema_checked = False  # the schema is checked (and created) on the first write only

    # -- opening ---------------------------------------------------------------------------
    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        try:
            return duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as error:
            text = str(error)
            if "lock" in text.lower():
                raise StoreError(
                    f"{self.path} is locked by another process ({text.splitlines()[0]}): "
                    "wait for it to finish or stop it, then try again"
                ) from None
            raise StoreError(
                f"cannot open {self.path} ({text.splitlines()[0]}): check the path and "
                "that its folder exists and is writable"
            ) from None
        except duckdb.Error as error:
            raise StoreError(
                f"{self.path} is not a readable DuckDB file ({str(error).splitlines()[0]}): "
                "move it away and run again to create a new one"
            ) from None

    def initialise(self) -> None:
        """Create tables and views if needed; refuse a file from a newer schema."""
        folder = self.path.parent
        if not folder.exists():
            raise StoreError(
                f"folder {folder} for results database does not exist: create it or pass another --db path"
            )
        if not os.access(folder, os.W_OK) or (self.path.exists() and not os.access(self.path, os.W_OK)):
            raise StoreError(f"cannot write {self.path}: permission denied; pass a writable --db path")
        with self.write():
            pass  # write() checks the version and creates the schema

    @contextmanager
    def write(self):
        """One transaction: commits at the end of the block, rolls back on any error."""
        con = self._connect(read_only=False)
        try:
            con.execute("BEGIN TRANSACTION")
            if not self._schema_checked:
                self._ensure_schema(con)
            yield con
            con.execute("COMMIT")
            self._schema_checked = True
        except BaseException:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            raise
        finally:
            con.close()

    @contextmanager
    def read(self):
        """A read-only connection (readers can never change the file)."""
        if not self.path.exists():
            raise StoreError(
                f"no results database at {self.path}: run `python training/run_all.py` first "
                "(or pass the path of an existing results.duckdb)"
            )
        con = self._connect(read_only=True)
        try:
            yield con
        finally:
            con.close()

    def _ensure_schema(self, con) -> None:
        has_version = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
        ).fetchall()[0][0]
        if has_version:
            rows = con.execute("SELECT max(version) FROM schema_version").fetchall()
            version = rows[0][0]
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this code's "
                    f"{SCHEMA_VERSION}: update Multi-LoRA Vision (git pull && pip install -r "
                    "requirements.txt) or use another --db path"
                )
        # Idempotent: also adds tables and views that later stages introduced to an older file.
        for statement in _TABLES:
            con.execute(statement)
        for statement in _VIEWS:
            con.execute(statement)
        con.execute("DELETE FROM schema_version")
        con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])

    # -- small helpers used by the stages ----------------------------------------------------
    def query(self, sql: str, params: list | None = None):
        """Rows of a read-only query (list of tuples)."""
        with self.read() as con:
            return con.execute(sql, params or []).fetchall()

    def query_df(self, sql: str, params: list | None = None):
        with self.read() as con:
            return con.execute(sql, params or []).df()

    def has_model(self, model_id: str) -> bool:
        """True when the model and its test evaluation are stored (the unit of skipping)."""
        if not self.path.exists():
            return False
        with self.read() as con:
            return bool(
                con.execute(
                    "SELECT count(*) FROM evaluations WHERE model_id = ? AND split = 'test'", [model_id]
                ).fetchall()[0][0]
            )


def insert_row(con, table: str, row: dict, key: tuple[str, ...]) -> bool:
    """Insert `row` unless a row with the same key exists; returns whether it inserted."""
    where = " AND ".join(f"{column} = ?" for column in key)
    exists = con.execute(f"SELECT count(*) FROM {table} WHERE {where}", [row[c] for c in key]).fetchall()[0][0]
    if exists:
        return False
    columns = ", ".join(row)
    placeholders = ", ".join("?" for _ in row)
    values = [json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v for v in row.values()]
    con.execute(f"INSERT INTO {table} ({columns}) VALUES ({placeholders})", values)
    return True
