"""The store: one DuckDB file, `results.duckdb`, the only place results live.

Tables are this module's business; readers use the views of the results contract
(docs/ARCHITECTURE.md): `task_results`, `merge_results`, `task_similarity`, `findings`, `benchmarks`.

Why it is written this way:
- every write is one transaction on a short-lived connection (`Store.write()`), so a crash
  never leaves half a result, and readers (dashboard, demo) can open the file between writes;
- rows are keyed by the hash of their full configuration, and inserts skip keys already
  present, so re-running any stage adds no duplicate rows;
- readers open the file read-only (`Store.read()`), so they can never change it, and only for
  the moment of a query, so the writer finds the file free between their queries;
- a file written by a newer version of the code (higher `schema_version`) is refused with
  a message, never silently mis-read or "upgraded" downwards.

Waiting for a busy file: DuckDB lets one process write a file, or any number of processes read
it, never both at once, and refuses a connection at once when the file is locked. So opening
retries with exponential backoff and jitter (a dashboard refreshing must not kill a run that is
writing, and a run writing must not blank the dashboard), prints a line on stderr every few
seconds naming the file and the process that holds it, and gives up with a one-line
`StoreBusyError` after a limit:
- writers wait up to 120 s, or `$MLV_STORE_WAIT_S` seconds;
- readers wait up to 20 s, or `$MLV_STORE_READ_WAIT_S` seconds (the dashboard then shows the
  last result it read, see dashboard/queries.py).

Every other problem with the file gets its own one-line `StoreError` naming what it is (missing,
not a DuckDB file, truncated or corrupt, newer schema, views holding unexpected types) and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from mlvision.errors import StoreError
from mlvision.paths import REPO_ROOT

WRITE_WAIT_ENV, DEFAULT_WRITE_WAIT_S = "MLV_STORE_WAIT_S", 120.0
READ_WAIT_ENV, DEFAULT_READ_WAIT_S = "MLV_STORE_READ_WAIT_S", 20.0
_FIRST_DELAY_S, _MAX_DELAY_S = 0.05, 0.5  # backoff between tries: doubles from the first up to the max
_FIRST_NOTE_S, _NOTE_EVERY_S = 2.0, 5.0  # a wait shorter than the first goes unmentioned
# How DuckDB's messages (first line, lower case) say that the file is not DuckDB's, or is damaged.
_NOT_DUCKDB = ("not a valid duckdb database file",)
_DAMAGED = ("could not read enough bytes", "corrupt", "checksum")


class StoreBusyError(StoreError):
    """The file stayed locked by another process for longer than the wait limit."""


# 2: benchmark_rows (and the benchmarks view) gained bench_id, section, backbone, image_size, threads,
#    repeats, peak_memory_mb, note, run_id; a version-1 file is upgraded in place (columns added).
# 3: merge_evaluations gained merged_correct, single_correct, head_correct (which images each model got
#    right, `pack_correct`), for paired tests on the same images; table adapter_updates (each adapter's
#    update norm); merge_results exposes them, with normalized_gain NULL (and gain_note saying why) where
#    single and head differ by less than GAIN_MIN_DIFFERENCE.
# 4: evaluations gained `correct` (which images a model got right, `pack_correct`), stored for the multi-layer
#    probe (models.model_kind 'probe', seed NULL: its fit is convex, one per task) on the test images every merge
#    of its task is scored on (split 'merge_test'); view probe_results.
# 5: tables plan_rows (the merge planner's plans, merging/plan.py) and plan_checks (merges of planned groups the
#    sweep did not store, scored to verify a plan); view merge_plans.
SCHEMA_VERSION = 5

# normalized_gain = (merged - head) / (single - head) is a ratio of two small differences when single and
# head are close; below this difference (2 points: 6 images of 300) it is noise divided by noise, so the
# view leaves it NULL with a reason instead of a figure like -18.
GAIN_MIN_DIFFERENCE = 0.02

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
    # Which of the n images each model got right, in image order (`pack_correct`): McNemar's test on the same images.
    *(
        f"ALTER TABLE merge_evaluations ADD COLUMN IF NOT EXISTS {column} VARCHAR"
        for column in ("merged_correct", "single_correct", "head_correct")
    ),
    "ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS correct VARCHAR",
    # The size of each adapter's weight update: sqrt of the sum over adapted layers of ||ΔW||_F^2.
    """CREATE TABLE IF NOT EXISTS adapter_updates (
        model_id VARCHAR PRIMARY KEY, task VARCHAR, seed INTEGER, update_norm DOUBLE, layers INTEGER,
        run_id VARCHAR, created_at TIMESTAMP)""",
    # The merge planner's plans (merging/plan.py), one row per (plan, task): the task's group and its predicted
    # retention. kind 'target': the fewest backbones keeping `target` for every task; kind 'tradeoff': the highest
    # predicted worst-task retention with at most `max_backbones`.
    """CREATE TABLE IF NOT EXISTS plan_rows (
        plan_id VARCHAR, kind VARCHAR, method VARCHAR, target DOUBLE, max_backbones INTEGER, backbones INTEGER,
        exact BOOLEAN, predictor VARCHAR, group_index INTEGER, group_tasks VARCHAR, task VARCHAR, predicted DOUBLE,
        run_id VARCHAR, created_at TIMESTAMP, PRIMARY KEY (plan_id, task))""",
    # A planned group the sweep did not merge, merged and scored as the sweep would (chosen on validation, scored on
    # the same test images) to verify a plan; kept apart from `merges` so the study's sampled groups stay a sample.
    """CREATE TABLE IF NOT EXISTS plan_checks (
        method VARCHAR, group_tasks VARCHAR, seed INTEGER, task VARCHAR, merged_accuracy DOUBLE,
        single_accuracy DOUBLE, n INTEGER, hyperparams JSON, merge_seconds DOUBLE, run_id VARCHAR,
        created_at TIMESTAMP, PRIMARY KEY (method, group_tasks, seed, task))""",
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
               CASE WHEN abs(e.single_accuracy - e.head_accuracy) >= {gain_min}
                    THEN (e.merged_accuracy - e.head_accuracy) / (e.single_accuracy - e.head_accuracy)
               END AS normalized_gain,
               CASE WHEN abs(e.single_accuracy - e.head_accuracy) < {gain_min}
                    THEN 'single adapter and head differ by less than {gain_points:g} points: the gain ratio is noise'
               END AS gain_note,
               g.hyperparams, g.selection, g.backbone, e.n, g.run_id,
               e.merged_correct, e.single_correct, e.head_correct
        FROM merges g JOIN merge_evaluations e ON e.merge_id = g.merge_id AND e.split = 'test'""".format(
        gain_min=GAIN_MIN_DIFFERENCE, gain_points=GAIN_MIN_DIFFERENCE * 100
    ),
    # The multi-layer linear probe of each task (training/probe.py): test and validation accuracy, and which of
    # the merge evaluation's test images it gets right (the images every merge of the task is scored on).
    """CREATE OR REPLACE VIEW probe_results AS
        SELECT m.task, t.accuracy, v.accuracy AS validation_accuracy, t.n AS n_test, x.n AS n_merge_eval,
               x.correct AS merge_eval_correct, m.backbone, m.config, m.model_id, m.run_id
        FROM models m JOIN evaluations t ON t.model_id = m.model_id AND t.split = 'test'
        LEFT JOIN evaluations v ON v.model_id = m.model_id AND v.split = 'validation'
        LEFT JOIN evaluations x ON x.model_id = m.model_id AND x.split = 'merge_test'
        WHERE m.model_kind = 'probe'""",
    # Each planned task's predicted retention beside its measured one (mean over seeds): from the sweep's merge of
    # its group where stored, else from the plan's own check (`plan_checks`); 1 for a task left on its own adapter.
    """CREATE OR REPLACE VIEW merge_plans AS
        WITH swept AS (
            SELECT method, array_to_string(list_sort(string_split(tasks, ',')), ',') AS group_tasks, task,
                   avg(normalized_accuracy) AS measured, count(*) AS seeds
            FROM merge_results GROUP BY ALL),
        checked AS (
            SELECT method, group_tasks, task, avg(merged_accuracy / nullif(single_accuracy, 0)) AS measured,
                   count(*) AS seeds
            FROM plan_checks GROUP BY ALL)
        SELECT p.plan_id, p.kind, p.method, p.target, p.max_backbones, p.backbones, p.exact, p.predictor,
               p.group_index, p.group_tasks, p.task, p.predicted,
               CASE WHEN p.group_tasks = p.task THEN 1.0 ELSE coalesce(s.measured, c.measured) END AS measured,
               CASE WHEN p.group_tasks = p.task THEN 'own adapter' WHEN s.measured IS NOT NULL THEN 'sweep'
                    WHEN c.measured IS NOT NULL THEN 'plan check' END AS measured_from,
               coalesce(s.seeds, c.seeds) AS measured_seeds, p.run_id
        FROM plan_rows p
        LEFT JOIN swept s ON s.method = p.method AND s.group_tasks = p.group_tasks AND s.task = p.task
        LEFT JOIN checked c ON c.method = p.method AND c.group_tasks = p.group_tasks AND c.task = p.task""",
    """CREATE OR REPLACE VIEW adapter_update_norms AS
        SELECT model_id, task, seed, update_norm, layers, run_id FROM adapter_updates""",
    """CREATE OR REPLACE VIEW task_similarity AS
        SELECT task_a, task_b, measure, value, seed, config, run_id FROM similarities""",
    """CREATE OR REPLACE VIEW findings AS
        SELECT finding, statistic, value, ci_low, ci_high, n, note, run_id FROM finding_rows""",
    """CREATE OR REPLACE VIEW benchmarks AS
        SELECT name, variant, k, batch_size, device, median_ms, p95_ms, throughput, ratio_to_backbone,
               machine, measured_at, peak_memory_mb, image_size, threads, repeats, backbone, note, bench_id, run_id
        FROM benchmark_rows""",
]


# What readers rely on in the views' columns: numbers they compute with, text they group and filter
# by. A file whose views hold something else was not written by this code (or was edited by hand);
# readers refuse it with a message instead of failing somewhere inside a chart.
VIEW_COLUMN_KINDS = {
    "task_results": {
        "numbers": ("seed", "accuracy", "n_test", "trainable_params", "backbone_params"),
        "text": ("task", "model_kind", "backbone", "config_hash", "run_id", "model_id"),
    },
    "merge_results": {
        "numbers": (
            "k", "seed", "merged_accuracy", "single_accuracy", "head_accuracy",
            "normalized_accuracy", "normalized_gain", "n",
        ),
        "text": (
            "merge_id", "method", "tasks", "task", "backbone", "run_id", "gain_note",
            "merged_correct", "single_correct", "head_correct",
        ),
    },
    "probe_results": {
        "numbers": ("accuracy", "validation_accuracy", "n_test", "n_merge_eval"),
        "text": ("task", "merge_eval_correct", "backbone", "model_id", "run_id"),
    },
    "adapter_update_norms": {"numbers": ("seed", "update_norm", "layers"), "text": ("model_id", "task", "run_id")},
    "merge_plans": {
        "numbers": ("target", "max_backbones", "backbones", "group_index", "predicted", "measured", "measured_seeds"),
        "text": ("plan_id", "kind", "method", "predictor", "group_tasks", "task", "measured_from", "run_id"),
    },
    "task_similarity": {"numbers": ("value", "seed"), "text": ("task_a", "task_b", "measure", "run_id")},
    "findings": {"numbers": ("value", "ci_low", "ci_high", "n"), "text": ("finding", "statistic", "note", "run_id")},
    "benchmarks": {
        "numbers": (
            "k", "batch_size", "median_ms", "p95_ms", "throughput", "ratio_to_backbone",
            "peak_memory_mb", "image_size", "threads", "repeats",
        ),
        "text": ("name", "variant", "device", "backbone", "note", "bench_id", "run_id"),
    },
}  # fmt: skip
_TYPE_KINDS = {
    **dict.fromkeys(
        ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT",
         "UHUGEINT", "FLOAT", "REAL", "DOUBLE", "DECIMAL"),
        "numbers",
    ),
    "VARCHAR": "text",
    "JSON": "text",
}  # fmt: skip


def wait_limit(read_only: bool) -> float:
    """Seconds to wait for a locked file: readers' and writers' limits, each overridable by its variable."""
    name, default = (READ_WAIT_ENV, DEFAULT_READ_WAIT_S) if read_only else (WRITE_WAIT_ENV, DEFAULT_WRITE_WAIT_S)
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise StoreError(
            f"${name}={raw!r} is not a number of seconds: set it to e.g. {default:g}, or unset it"
        ) from None


def relative_to_repo(path: str | os.PathLike) -> str:
    """Paths are stored relative to the repo when inside it, so a cloned results.duckdb still works."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# The given base's schemes that name a folder (mlvision/backbone.py: local-dir:FOLDER, transformers:FOLDER).
_FOLDER_SCHEMES = ("local-dir:", "transformers:")


def stored_paths(config: dict) -> dict:
    """A study configuration (`StudyConfig.to_dict`) with every absolute path inside the repository written relative
    to it, as `runs.config` stores it: db, artifacts, the given adapters' folders and a given base's folder
    (local-dir:FOLDER, transformers:FOLDER). So a results.duckdb names no folder of the machine that ran it; paths
    outside the repository, and relative ones, are kept as they are. Run ids hash none of these stored forms
    (`StudyConfig.identity`)."""

    def relative(text):
        if not isinstance(text, str) or not Path(text).is_absolute():
            return text
        inside = relative_to_repo(text)
        return inside if not Path(inside).is_absolute() else text

    data = dict(config)
    for key in ("db", "artifacts"):
        if key in data:
            data[key] = relative(data[key])
    if isinstance(data.get("given_adapters"), (list, tuple)):  # (task, seed, folder, sha256) each
        data["given_adapters"] = [
            [*given[:2], relative(given[2]), *given[3:]]
            if isinstance(given, (list, tuple)) and len(given) > 2
            else given
            for given in data["given_adapters"]
        ]
    base = data.get("backbone_base")
    scheme = next((scheme for scheme in _FOLDER_SCHEMES if isinstance(base, str) and base.startswith(scheme)), None)
    if scheme:
        data["backbone_base"] = scheme + relative(base.removeprefix(scheme))
    return data


def _runs_with_machine_paths(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(run_id, config rewritten) for each run whose stored config predates `stored_paths`: it names folders of this
    machine inside the repository (e.g. /work/main/artifacts). The store rewrites them when it opens the file for
    writing (`_ensure_schema`). Only those paths change, and no id: run ids never hashed db or artifacts, and ids are
    stored, never recomputed from this column. Paths outside this repository (another machine's) stay."""
    rows = []
    for run_id, text in con.execute("SELECT run_id, config FROM runs").fetchall():
        try:
            config = json.loads(text)
        except (TypeError, ValueError):
            continue
        if isinstance(config, dict) and stored_paths(config) != config:
            rows.append((run_id, json.dumps(stored_paths(config), sort_keys=True)))
    return rows


def config_hash(config: dict) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def pack_correct(correct) -> str:
    """Which images a model got right (a sequence of bools, in image order) as compact hex text.

    Why: paired tests (McNemar) need the per-image outcomes of the merged model, the single adapter and
    the head on the same images; 300 outcomes take 76 characters this way (np.packbits, then hex).
    """
    import numpy as np

    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def unpack_correct(packed: str, n: int):
    """The bool array of `n` outcomes that `pack_correct` stored."""
    import numpy as np

    return np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8), count=n).astype(bool)


def probe_correct_on(tasks, ns, probes) -> list[str | None]:
    """Per merge row (its task and image count n): its task's multi-layer probe's packed per-image outcomes on the
    merge's very images, None where no probe was scored on them (none stored, a file from before the probes, or
    another evaluation subset: `probe_results.n_merge_eval` differs). One place for the matching the findings
    (study/findings/inputs.py) and the dashboard both rely on."""
    if probes is None or probes.empty:
        return [None] * len(tasks)
    by_task = probes.drop_duplicates("task").set_index("task")
    out = []
    for task, n in zip(tasks, ns):
        mine = by_task.loc[task] if task in by_task.index else None
        matches = mine is not None and isinstance(mine["merge_eval_correct"], str) and mine["n_merge_eval"] == n
        out.append(mine["merge_eval_correct"] if matches else None)
    return out


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Store:
    """Access to one results.duckdb file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._schema_checked = False  # the schema is checked (and created) on the first write only

    # -- opening ---------------------------------------------------------------------------
    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """A connection; while another process holds the file, waits (see the module docstring)."""
        limit = wait_limit(read_only)
        started = time.monotonic()
        delay, next_note = _FIRST_DELAY_S, _FIRST_NOTE_S
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as error:
                text = _first_line(error)
                if not (isinstance(error, duckdb.IOException) and "lock" in text.lower()):
                    raise self.problem(error) from None
            holder = _lock_holder(text)
            waited = time.monotonic() - started
            if waited >= limit:
                variable = READ_WAIT_ENV if read_only else WRITE_WAIT_ENV
                raise StoreBusyError(
                    f"{self.path} is locked by another process ({holder}) and stayed locked for {waited:.1f} s: "
                    f"wait for it to finish or stop it, then try again (${variable} sets how long to wait)"
                )
            if waited >= next_note:
                print(
                    f"waiting for {self.path}: it is locked by {holder} ({waited:.0f} s of at most {limit:g} s)",
                    file=sys.stderr,
                    flush=True,
                )
                next_note = waited + _NOTE_EVERY_S
            time.sleep(min(random.uniform(delay / 2, delay), limit - waited))
            delay = min(2 * delay, _MAX_DELAY_S)

    def problem(self, error: duckdb.Error) -> StoreError:
        """The one-line StoreError for an error DuckDB raised opening or reading the file."""
        text = _first_line(error)
        lower = text.lower()
        if any(sign in lower for sign in _NOT_DUCKDB):
            return StoreError(
                f"{self.path} is not a readable DuckDB file: it holds something else ({text}); pass the path "
                "of a results.duckdb, or move this file away and run `python training/run_all.py` to create one"
            )
        if any(sign in lower for sign in _DAMAGED):
            return self._damaged(text)
        if isinstance(error, duckdb.IOException):
            return StoreError(
                f"cannot open {self.path} ({text}): check the path and that its folder exists and is writable"
            )
        return StoreError(
            f"{self.path} is not a readable DuckDB file ({text}): move it away and run again to create a new one"
        )

    def _damaged(self, detail: str) -> StoreError:
        return StoreError(
            f"{self.path} is not a readable DuckDB file: it is truncated or corrupt ({detail}); restore it "
            "from a copy, or move it away and run `python training/run_all.py` to re-create it"
        )

    def _check_complete(self, con: duckdb.DuckDBPyConnection) -> None:
        """Refuse a file cut short (an interrupted copy, a full disk): it still opens, and would fail
        only on the queries that reach its missing part, so its size is compared with its used blocks."""
        block_size, used_blocks = con.execute(
            "SELECT block_size, used_blocks FROM pragma_database_size() WHERE database_name = current_database()"
        ).fetchall()[0]
        if not used_blocks or str(self.path) == ":memory:":  # nothing stored yet, or no file at all
            return
        size = self.path.stat().st_size
        if size < block_size * used_blocks:
            raise self._damaged(f"{size:,} bytes, while its {used_blocks} blocks need {block_size * used_blocks:,}")

    def check_version(self, version: int | None) -> None:
        """Refuse a file written by a newer version of this code (readers and writers alike)."""
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this code's "
                f"{SCHEMA_VERSION}: update Multi-LoRA Vision (git pull && pip install -r "
                "requirements.txt) or use another --db path"
            )

    def check_view_types(self, view: str, types: dict[str, str]) -> None:
        """Refuse a view whose columns (name -> DuckDB type) hold other kinds than VIEW_COLUMN_KINDS says."""
        for kind, columns in VIEW_COLUMN_KINDS.get(view, {}).items():
            for column in columns:
                found = types.get(column)
                if found is None or found.strip('"') == "NULL":  # absent (an older file) or all NULL
                    continue
                if _TYPE_KINDS.get(found.split("(")[0].upper()) != kind:
                    raise StoreError(
                        f"the `{view}` view of {self.path} holds {found} in column `{column}` where {kind} belong: "
                        "the file was not written by Multi-LoRA Vision (or was edited); re-create it with "
                        "`python training/run_all.py` or pass another --db path"
                    )

    def initialise(self) -> None:
        """Create tables and views if needed; refuse a file from a newer schema."""
        folder = self.path.parent
        if not folder.exists():
            raise StoreError(
                f"folder {folder} for results database does not exist: create it or pass another --db path"
            )
        if not os.access(folder, os.W_OK) or (self.path.exists() and not os.access(self.path, os.W_OK)):
            raise StoreError(f"cannot write {self.path}: permission denied; pass a writable --db path")
        if self._schema_is_current():
            self._schema_checked = True  # nothing to create: a run with nothing to do writes no byte
            return
        with self.write():
            pass  # write() checks the version and creates the schema

    def _schema_is_current(self) -> bool:
        """True when the file already holds this code's schema version and every table and view, and no run's
        config names this machine's folders (`_runs_with_machine_paths`); read-only."""
        if not self.path.exists():
            return False
        names = [statement.split(" EXISTS ")[1].split()[0] for statement in _TABLES if "CREATE TABLE" in statement]
        names += [statement.split(" VIEW ")[1].split()[0] for statement in _VIEWS]
        with self.read() as con:
            present = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if not set(names) <= present:
                return False
            version = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
            stale_paths = bool(_runs_with_machine_paths(con))
            columns = {
                (table, column)
                for table, column in con.execute(
                    "SELECT table_name, column_name FROM information_schema.columns"
                ).fetchall()
            }
        added = {
            (statement.split()[2], statement.split(" EXISTS ")[1].split()[0])
            for statement in _TABLES
            if "ADD COLUMN" in statement
        }
        return version == SCHEMA_VERSION and added <= columns and not stale_paths

    @contextmanager
    def write(self):
        """One transaction: commits at the end of the block, rolls back on any error.

        Waits while readers hold the file (see the module docstring); keep the block short, since
        readers wait for it in turn."""
        con = self._connect(read_only=False)
        try:
            self._check_complete(con)  # writing on would damage a truncated file further
            con.execute("BEGIN TRANSACTION")
            if not self._schema_checked:
                self._ensure_schema(con)
            yield con
            con.execute("COMMIT")
            self._schema_checked = True
        except BaseException as error:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            if isinstance(error, duckdb.Error) and _is_damage(error):
                raise self.problem(error) from None
            raise
        finally:
            con.close()

    @contextmanager
    def read(self):
        """A read-only connection (readers can never change the file); hold it only for a query.

        A truncated or corrupt file often opens and fails only when a query reaches the damage:
        that failure, too, becomes the store's one-line message, and so does a file shorter than its blocks.
        """
        if not self.path.exists():
            raise StoreError(
                f"no results database at {self.path}: run `python training/run_all.py` first "
                "(or pass the path of an existing results.duckdb)"
            )
        con = self._connect(read_only=True)
        try:
            self._check_complete(con)
            yield con
        except duckdb.Error as error:
            if _is_damage(error):
                raise self.problem(error) from None
            raise
        finally:
            con.close()

    def _ensure_schema(self, con) -> None:
        has_version = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
        ).fetchall()[0][0]
        if has_version:
            self.check_version(con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0])
        # Idempotent: also adds tables and views that later stages introduced to an older file.
        for statement in _TABLES:
            con.execute(statement)
        for statement in _VIEWS:
            con.execute(statement)
        for run_id, config in _runs_with_machine_paths(con):  # configs stored with this machine's folders
            con.execute("UPDATE runs SET config = ? WHERE run_id = ?", [config, run_id])
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


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0]


def _lock_holder(text: str) -> str:
    """Who holds the lock, as DuckDB's message names it ("process 1234"), else "another process"."""
    found = re.search(r"\(PID (\d+)\)", text)
    return f"process {found.group(1)}" if found else "another process"


def _is_damage(error: duckdb.Error) -> bool:
    """Whether a query failed because the file itself is damaged (not because of the SQL)."""
    lower = _first_line(error).lower()
    return any(sign in lower for sign in _NOT_DUCKDB + _DAMAGED)


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
