"""The merge sweep: every group of 2..max_k tasks x every method x seeds, each merged model scored.

For each (group, method, seed) the adapters' ΔW are merged layer by layer, folded into one base
backbone (weights swapped in place, no model rebuilt from disk), and the merged model is scored
on each of its tasks' fixed evaluation subset. Beside it, each task's own adapter and head
baseline are scored on the very same images once per sweep, so normalized accuracy compares like
with like. A merge is keyed by the hash of (method, hyperparameters or selection rule, adapter
ids, evaluation sizes) and skipped when already stored: the sweep is idempotent and resumable.

Computing a merge's rows (`MergeSweep.compute`) is kept apart from storing them (`save_rows`), so
the same computation can either go straight into results.duckdb (`MergeSweep.run`, serial) or into
Parquet part files written by parallel workers and loaded later (merging/parallel_sweep.py).

A method with a validation grid in the registry (task arithmetic's λ) has that hyperparameter
picked on the validation subset (mean accuracy over the group's tasks); the grid, the validation
scores and the choice are stored.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from merging.deltas import AdapterDeltas, load_deltas
from merging.merged_model import AdapterMerger
from merging.methods import get_method
from mlvision.backbone import Preprocess
from mlvision.config import StudyConfig
from mlvision.data import split_tensors
from mlvision.evaluation import FoldedBackbone, accuracy, task_accuracies
from mlvision.models import load_head, read_meta
from mlvision.runs import stored_model_folder, study_run_id
from mlvision.store import Store, config_hash, insert_row, now


def merge_seeds(config: StudyConfig, k: int) -> tuple[int, ...]:
    """Seeds swept for groups of size k: all of them up to `merge_all_seeds_up_to_k`, else the first."""
    return tuple(config.seeds) if k <= config.merge_all_seeds_up_to_k else tuple(config.seeds[:1])


def sweep_plan(config: StudyConfig) -> list[tuple[tuple[str, ...], int, str]]:
    """Every (group, seed, method) the sweep covers, smallest groups first."""
    plan = []
    for k in range(2, min(config.max_k, len(config.tasks)) + 1):
        for group in itertools.combinations(sorted(config.tasks), k):
            for seed in merge_seeds(config, k):
                plan.extend((group, seed, method) for method in config.merge_methods)
    return plan


# Computed merges are stored in one transaction at least this often: opening the store for each
# merge cost about 0.07 s (a tenth of a merge), and a crash loses at most this much work (Ctrl-C none).
SAVE_EVERY_S = 10.0

# The tables one merge writes, each with the key its rows are skipped by when already present.
TABLE_KEYS = {"merges": ("merge_id",), "merge_evaluations": ("merge_id", "task", "split")}


@dataclass
class MergeRows:
    """One merge's results as the store keeps them: its `merges` row and one `merge_evaluations` row per task."""

    merge: dict
    evaluations: list[dict] = field(default_factory=list)

    def tables(self) -> dict[str, list[dict]]:
        return {"merges": [self.merge], "merge_evaluations": self.evaluations}


def insert_rows(con, table: str, rows: list[dict]) -> int:
    """Insert rows into one of TABLE_KEYS' tables in an open transaction, skipping stored keys.

    Returns how many went in."""
    return sum(insert_row(con, table, row, key=TABLE_KEYS[table]) for row in rows)


def save_rows(con, rows: MergeRows) -> int:
    """Insert one merge's rows in an open transaction (keys already stored are skipped); returns rows inserted."""
    return sum(insert_rows(con, table, table_rows) for table, table_rows in rows.tables().items())


def stored_merge_ids(store: Store) -> set[str]:
    """merge_ids already in the store (read-only)."""
    return {row[0] for row in store.query("SELECT merge_id FROM merges")}


@dataclass
class Baseline:
    single: float  # the task's own adapter on the evaluation subset
    head: float  # the frozen backbone + trained head on the same images


def check_methods(config: StudyConfig) -> None:
    """Unknown merge method names fail before any work."""
    for method in config.merge_methods:
        get_method(method)


class MergeSweep:
    def __init__(self, config: StudyConfig, store: Store):
        check_methods(config)
        self.config = config
        self.store = store
        self.run_id = study_run_id(config)
        self.folded = FoldedBackbone(config.backbone_config)
        self.adapters: dict[tuple[str, int], AdapterDeltas] = {}
        self.folders: dict[tuple[str, int], str] = {}
        self.baselines: dict[tuple[str, int], Baseline] = {}
        self._mergers: dict[int, AdapterMerger] = {}

    # -- inputs -----------------------------------------------------------------------------------
    def _stored_path(self, kind: str, task: str, seed: int) -> str:
        return str(stored_model_folder(self.store, self.config, kind, task, seed))

    def eval_tensors(self, task: str, split: str = "test"):
        limit = self.config.merge_eval if split == "test" else self.config.merge_select
        return split_tensors(task, split, self.preprocess, limit)

    def load_inputs(self, seeds: set[int]) -> None:
        """Load each needed adapter's ΔW and score its single adapter and head baseline once."""
        first = None
        for task in self.config.tasks:
            for seed in sorted(seeds):
                folder = self._stored_path("adapter", task, seed)
                adapter = load_deltas(folder)
                self.adapters[(task, seed)], self.folders[(task, seed)] = adapter, folder
                first = first or adapter
        self.preprocess = Preprocess.from_dict(first.meta["preprocess"])
        for (task, seed), adapter in tqdm(self.adapters.items(), desc="baselines", unit="adapter", leave=False):
            images, labels = self.eval_tensors(task)
            single_model = self.folded.model(adapter.deltas, {task: adapter.head})
            single = accuracy(single_model, task, images, labels)
            head_folder = self._stored_path("head", task, seed)
            head_model = self.folded.model({}, {task: load_head(head_folder, read_meta(head_folder))})
            self.baselines[(task, seed)] = Baseline(single=single, head=accuracy(head_model, task, images, labels))

    # -- one merge --------------------------------------------------------------------------------
    def merge_id(self, group, seed, method) -> str:
        adapter_ids = [self.config.model_id("adapter", task, seed) for task in group]
        selection = get_method(method).selection_rule()
        rule = {"select": selection, "select_n": self.config.merge_select} if selection else {}
        hyper = {} if selection else get_method(method).validate({})  # a reference has none
        return "merge-" + config_hash(
            {
                "method": method,
                "hyperparams": hyper,
                "rule": rule,
                "adapters": adapter_ids,
                "eval_n": self.config.merge_eval,
            }
        )

    def merger(self, seed: int) -> AdapterMerger:
        """The merger of every task's adapter of `seed` (peft references load them once, on first use)."""
        if seed not in self._mergers:
            adapters = {task: self.adapters[(task, seed)] for task in self.config.tasks}
            self._mergers[seed] = AdapterMerger(adapters, self.config.backbone_config)
        return self._mergers[seed]

    def _merged_deltas(self, group, seed, method):
        """(merged ΔW per layer, hyperparams, selection record)."""
        merger = self.merger(seed)
        selection = get_method(method).selection_rule()
        if selection is None:
            return (*merger.merge(group, method), None)
        name, grid = selection
        heads = {task: self.adapters[(task, seed)].head for task in group}
        scores = {}
        for value in grid:
            merged, _ = merger.merge(group, method, {name: value})
            model = self.folded.model(merged, heads)
            validation = task_accuracies(model, {t: self.eval_tensors(t, "validation") for t in group})
            scores[value] = sum(validation[t] for t in group) / len(group)
        best = max(grid, key=lambda v: (scores[v], -v))
        selection_record = {
            "parameter": name,
            "grid": list(grid),
            "validation_accuracy": {str(v): s for v, s in scores.items()},
            "chosen": best,
            "validation_n_per_task": self.config.merge_select,
        }
        merged, params = merger.merge(group, method, {name: best})
        return merged, params, selection_record

    def compute(self, group: tuple[str, ...], seed: int, method: str) -> MergeRows:
        """Merge the group's adapters with `method` and score the merged model; stores nothing."""
        merge_id = self.merge_id(group, seed, method)
        start = time.perf_counter()
        merged, params, selection = self._merged_deltas(group, seed, method)
        seconds = time.perf_counter() - start
        heads = {task: self.adapters[(task, seed)].head for task in group}
        model = self.folded.model(merged, heads)
        rows = MergeRows(
            {
                "merge_id": merge_id,
                "method": method,
                "k": len(group),
                "tasks": ",".join(group),
                "seed": seed,
                "adapter_ids": [self.config.model_id("adapter", t, seed) for t in group],
                "hyperparams": params,
                "backbone": self.config.backbone,
                "merge_seconds": seconds,
                "selection": selection,
                "run_id": self.run_id,
                "created_at": now(),
            }
        )
        test_data = {task: self.eval_tensors(task) for task in group}
        merged_accuracy = task_accuracies(model, test_data)
        for task in group:
            baseline = self.baselines[(task, seed)]
            rows.evaluations.append(
                {
                    "merge_id": merge_id,
                    "task": task,
                    "split": "test",
                    "merged_accuracy": merged_accuracy[task],
                    "single_accuracy": baseline.single,
                    "head_accuracy": baseline.head,
                    "n": len(test_data[task][1]),
                    "run_id": self.run_id,
                    "created_at": now(),
                }
            )
        return rows

    def save(self, computed: list[MergeRows]) -> int:
        """Store computed merges in one transaction (a merge another process stored meanwhile is skipped);
        returns how many merges went in."""
        if not computed:
            return 0
        stored = 0
        with self.store.write() as con:
            for rows in computed:
                stored += insert_rows(con, "merges", [rows.merge])
                insert_rows(con, "merge_evaluations", rows.evaluations)
        return stored

    def missing(self, items: list, done: set[str]) -> list:
        """The plan items whose merge_id is not in `done`."""
        return [item for item in items if self.merge_id(*item) not in done]

    def prepare(self, todo: list) -> None:
        """Load the adapters and score the baselines that the plan items `todo` need (nothing if none)."""
        if todo:
            self.load_inputs({seed for _, seed, _ in todo})

    def run(self) -> dict:
        plan = sweep_plan(self.config)
        todo = self.missing(plan, stored_merge_ids(self.store))
        self.prepare(todo)
        counts = {"merged": 0, "skipped": len(plan) - len(todo)}
        computed: list[MergeRows] = []
        last_save = time.monotonic()
        try:
            for group, seed, method in tqdm(todo, desc="merge sweep", unit="merge"):
                computed.append(self.compute(group, seed, method))
                if time.monotonic() - last_save >= SAVE_EVERY_S:
                    counts["merged"] += self.save(computed)
                    computed, last_save = [], time.monotonic()
        except KeyboardInterrupt:  # keep what was computed; the next run continues after it
            self.save(computed)
            raise
        counts["merged"] += self.save(computed)
        return counts
