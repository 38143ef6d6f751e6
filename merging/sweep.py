"""The merge sweep: every group of 2..max_k tasks x every method x seeds, each merged model scored.

For each (group, method, seed) the adapters' ΔW are merged layer by layer, folded into one base
backbone (weights swapped in place, no model rebuilt from disk), and the merged model is scored
on each of its tasks' fixed evaluation subset. Beside it, each task's own adapter and head
baseline are scored on the very same images once per sweep, so normalized accuracy compares like
with like; which images each of the three got right is stored too (`pack_correct`), for paired
tests. A merge is keyed by the hash of (method, defaults, validation grid and size, adapter ids,
evaluation size) and skipped when already stored: the sweep is idempotent and resumable.

Selection (study v2; v3's grids): every merge, of every method, is scored on the validation subset
(`merge_select` images per task) at each point of its method's grid (`MergeMethod.grid_points`: 5
points for every tuned method, the default first; one point, its fixed setting, for an untuned
peft reference); the point with the best mean validation accuracy over the group's tasks is kept
(ties: the earlier grid point) and `merges.selection` stores {"tuned", "grid", "validation_accuracy",
"chosen", "chosen_validation_accuracy", "validation_n_per_task"}. Where a method's `scaling` is a
pure multiplier of its output (`scaling_is_output_multiplier`), ΔW is merged once per combination of
the other hyperparameters and multiplied per scaling, not re-merged. `merge_seconds` is the time from
the first grid merge to the chosen ΔW: every grid merge and its validation scoring.

Computing a merge's rows (`MergeSweep.compute`) is kept apart from storing them (`MergeSweep.save`), so
that under `accelerate launch` every process computes its share and the main process alone stores the
rows gathered from all of them (`MergeSweep.run_distributed`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from merging.deltas import AdapterDeltas, load_deltas
from merging.grams import GRAM_IMAGES, GramStore
from merging.merged_model import AdapterMerger
from merging.methods import MERGE_METHODS, STUDY_SUBSET, get_method
from mlvision.backbone import Preprocess
from mlvision.config import StudyConfig
from mlvision.data import split_tensors
from mlvision.errors import MLVisionError
from mlvision.evaluation import FoldedBackbone, accuracy_of, task_correct
from mlvision.models import load_head, read_meta
from mlvision.runs import stored_model_folder, study_run_id
from mlvision.store import Store, config_hash, insert_row, now, pack_correct


def merge_seeds(config: StudyConfig, k: int) -> tuple[int, ...]:
    """Seeds swept for groups of size k: every seed (`merge_all_seeds_up_to_k` None, the default), or
    every seed up to that k and the first one above it."""
    up_to = config.merge_all_seeds_up_to_k
    return tuple(config.seeds) if up_to is None or k <= up_to else tuple(config.seeds[:1])


def sample_groups(tasks, k: int, max_groups: int | None) -> list[tuple[str, ...]]:
    """The groups of size k merged: every combination of the sorted tasks, or for k >= 3 with
    `max_groups` set a fixed sample of that many (all when fewer exist), in combination order.

    The sample is a pure function of (sorted tasks, k, max_groups): its random generator is seeded by a
    hash of them, so every run, seed, method and worker gets the same groups and nothing extra is stored."""
    tasks = sorted(tasks)
    groups = list(itertools.combinations(tasks, k))
    if max_groups is None or k < 3 or len(groups) <= max_groups:
        return groups
    digest = hashlib.sha256(json.dumps([tasks, k, max_groups]).encode()).hexdigest()
    chosen = sorted(random.Random(int(digest[:16], 16)).sample(range(len(groups)), max_groups))
    return [groups[i] for i in chosen]


def in_study_subset(method: str, k: int, seed: int | None = None, subset_methods: tuple[str, ...] = ()) -> bool:
    """Whether the part of the sweep `method` runs on holds k (and `seed`, when given): its own stated subset
    (`MergeMethod.study_subset`, e.g. AdaMerging's), STUDY_SUBSET where the study names it in `subset_methods`,
    else all of it."""
    subset = get_method(method).study_subset or (STUDY_SUBSET if method in subset_methods else None)
    return subset is None or (k in subset.get("k", (k,)) and (seed is None or seed in subset.get("seeds", (seed,))))


def sweep_plan(config: StudyConfig) -> list[tuple[tuple[str, ...], int, str]]:
    """Every (group, seed, method) the sweep covers, smallest groups first (a costly method only on its subset)."""
    if config.max_groups_per_k is not None and config.max_groups_per_k < 1:
        raise MLVisionError(f"--max-groups-per-k must be at least 1, got {config.max_groups_per_k}")
    plan = []
    for k in range(2, min(config.max_k, len(config.tasks)) + 1):
        for group in sample_groups(config.tasks, k, config.max_groups_per_k):
            for seed in merge_seeds(config, k):
                plan.extend(
                    (group, seed, method)
                    for method in config.merge_methods
                    if in_study_subset(method, k, seed, config.subset_methods)
                )
    return plan


# Computed merges are stored in one transaction at least this often: opening the store for each
# merge cost about 0.07 s (a tenth of a merge), and a crash loses at most this much work (Ctrl-C none).
SAVE_EVERY_S = 10.0
# Under several processes: merges each process computes between two gathers to the main process, which
# stores them; a killed launch loses at most this many merges per process.
ROUND_MERGES = 2

# The tables one merge writes, each with the key its rows are skipped by when already present.
TABLE_KEYS = {
    "merges": ("merge_id",),
    "merge_evaluations": ("merge_id", "task", "split"),
    "adapter_updates": ("model_id",),  # written once per loaded adapter, not per merge (`update_rows`)
    "plan_rows": ("plan_id", "task"),  # the merge planner's (merging/plan.py)
    "plan_checks": ("method", "group_tasks", "seed", "task"),
}


@dataclass
class MergeRows:
    """One merge's results as the store keeps them: its `merges` row and one `merge_evaluations` row per task."""

    merge: dict
    evaluations: list[dict] = field(default_factory=list)


def insert_rows(con, table: str, rows: list[dict]) -> int:
    """Insert rows into one of TABLE_KEYS' tables in an open transaction, skipping stored keys.

    Returns how many went in."""
    return sum(insert_row(con, table, row, key=TABLE_KEYS[table]) for row in rows)


def merge_id_of(config: StudyConfig, group: tuple[str, ...], seed: int, method: str) -> str:
    """The id of the sweep's merge of `group`'s adapters of `seed` with `method`: what decides its figures (the
    method, its defaults and grid, the validation and test subsets, the adapters), so a merge is never repeated."""
    merge_method = get_method(method)
    start = merge_method.starts_from  # AdaMerging starts from task arithmetic's choice: that grid decides it too
    return "merge-" + config_hash(
        {
            "method": method,
            "hyperparams": merge_method.identity_defaults(),  # the defaults (a reference has none)
            "grid": merge_method.grid_points(len(group)),
            **({"start_grid": get_method(start.method).grid_points(len(group))} if start is not None else {}),
            "select_n": config.merge_select,
            "adapters": [config.model_id("adapter", task, seed) for task in group],
            "eval_n": config.merge_eval,
        }
    )


def superseded_merges(config: StudyConfig, store: Store) -> dict[str, str]:
    """{merge_id: method} of stored merges of this study's tasks and seeds whose id differs from the one the study's
    current settings give the same (group, seed, method): made under an older grid, other defaults or another
    validation size. The sweep merges the groups it plans again under the new id, and without forgetting the old
    merge the findings would read both; a merge no plan makes any more (a method since moved to the subset, a group
    size the subset dropped) would be read as if made by the current rules. run_all --forget-superseded deletes them."""
    tasks, seeds = set(config.tasks), set(config.seeds)
    superseded = {}
    for merge_id, method, group, seed in store.query("SELECT merge_id, method, tasks, seed FROM merges"):
        group = tuple(group.split(","))
        if method not in MERGE_METHODS or seed not in seeds or not set(group) <= tasks:
            continue  # another study's merge in the same file, or a method no longer registered: not ours to judge
        if merge_id_of(config, group, seed, method) != merge_id:
            superseded[merge_id] = method
    return superseded


def forget_superseded(config: StudyConfig, store: Store) -> int:
    """Delete the superseded merges (`superseded_merges`) with their evaluations, and the planner's checks of their
    methods (each chose its hyperparameters by the old rule); the plans themselves are keyed by the merges they read
    and so are made again. One transaction: an interrupted delete deletes nothing. Returns how many merges went."""
    superseded = superseded_merges(config, store)
    if not superseded:
        return 0
    ids, methods = sorted(superseded), sorted(set(superseded.values()))
    with store.write() as con:
        for table in ("merge_evaluations", "merges"):
            con.execute(f"DELETE FROM {table} WHERE merge_id IN (SELECT unnest(?::VARCHAR[]))", [ids])
        con.execute("DELETE FROM plan_checks WHERE method IN (SELECT unnest(?::VARCHAR[]))", [methods])
    return len(ids)


def stored_merge_ids(store: Store) -> set[str]:
    """merge_ids already in the store (read-only)."""
    return {row[0] for row in store.query("SELECT merge_id FROM merges")}


@dataclass
class Baseline:
    single_correct: np.ndarray  # which evaluation images the task's own adapter gets right
    head_correct: np.ndarray  # ... and the frozen backbone + trained head, on the same images

    @property
    def single(self) -> float:
        return accuracy_of(self.single_correct)

    @property
    def head(self) -> float:
        return accuracy_of(self.head_correct)


def update_norm(adapter: AdapterDeltas) -> float:
    """sqrt(sum over the adapted layers of ||ΔW||_F^2), in float64, on ΔW exactly as merged."""
    return math.sqrt(sum(float(delta.double().pow(2).sum()) for delta in adapter.deltas.values()))


@dataclass
class Selection:
    """The outcome of scoring a merge's grid on validation: the chosen ΔW, its hyperparameters, the record."""

    merged: dict
    params: dict
    record: dict


def select_on_validation(merge_method, k: int, grid_merges, score, n_per_task: int) -> Selection:
    """The study's rule for choosing a merge on validation, for the sweep and the merge CLI alike: `grid_merges`
    yields (grid index, merged ΔW, hyperparameters) for every point of the method's grid for k tasks,
    `score(merged)` is the merge's mean validation accuracy over the group's tasks; the best is kept (ties: the
    earlier grid point) and the record holds grid, curve and choice (`merges.selection`)."""
    points = merge_method.grid_points(k)
    scores: list[float | None] = [None] * len(points)
    best = None  # (score, index, merged, params)
    for index, merged, params in grid_merges:
        scores[index] = score(merged)
        if best is None or (scores[index], -index) > (best[0], -best[1]):
            best = (scores[index], index, merged, params)
    score_, index, merged, params = best
    record = {
        "tuned": merge_method.tuned,
        "grid": points,
        "validation_accuracy": scores,
        "chosen": points[index],
        "chosen_validation_accuracy": score_,
        "validation_n_per_task": n_per_task,
    }
    return Selection(merged, params, record)


def check_methods(config: StudyConfig) -> None:
    """Unknown merge method names fail before any work."""
    for method in (*config.merge_methods, *config.subset_methods):
        get_method(method)


class MergeSweep:
    """`accelerator`: under `accelerate launch` with several processes, every process builds its own MergeSweep
    and calls `run`; they split the sweep between them (`run_distributed`). Omitted, or one process: the
    serial sweep, unchanged."""

    def __init__(self, config: StudyConfig, store: Store, accelerator=None):
        check_methods(config)
        self.config = config
        self.store = store
        self.accelerator = accelerator
        self.run_id = study_run_id(config)
        device = accelerator.device if accelerator is not None else "cpu"
        self.folded = FoldedBackbone(config.backbone_config, device=device)
        self.adapters: dict[tuple[str, int], AdapterDeltas] = {}
        self.folders: dict[tuple[str, int], str] = {}
        self.model_folders: dict[tuple[str, str, int], str] = {}  # (kind, task, seed) -> folder
        self.baselines: dict[tuple[str, int], Baseline] = {}
        self._mergers: dict[int, AdapterMerger] = {}
        # RegMean's statistics: each adapter's Gram matrices on GRAM_IMAGES of its task's training images
        self.grams = GramStore(self.folded, lambda task: split_tensors(task, "train", self.preprocess, GRAM_IMAGES)[0])

    # -- inputs -----------------------------------------------------------------------------------
    def _stored_path(self, kind: str, task: str, seed: int) -> str:
        """The folder of a stored model, asked of the store once (the other processes of a distributed sweep get
        them from the main process and never open the store)."""
        key = (kind, task, seed)
        if key not in self.model_folders:
            self.model_folders[key] = str(stored_model_folder(self.store, self.config, kind, task, seed))
        return self.model_folders[key]

    def eval_tensors(self, task: str, split: str = "test"):
        limit = self.config.merge_eval if split == "test" else self.config.merge_select
        return split_tensors(task, split, self.preprocess, limit)

    def load_inputs(self, seeds: set[int]) -> None:
        """Load each needed adapter's ΔW and score its single adapter and head baseline once."""
        self.load_adapters(seeds)
        self.baselines.update(self.score_baselines(sorted(self.adapters)))

    def load_adapters(self, seeds: set[int]) -> None:
        """Load the ΔW of every task's adapter of these seeds (and the preprocessing they were trained with)."""
        first = None
        for task in self.config.tasks:
            for seed in sorted(seeds):
                folder = self._stored_path("adapter", task, seed)
                adapter = load_deltas(folder)
                self.adapters[(task, seed)], self.folders[(task, seed)] = adapter, folder
                first = first or adapter
        self.preprocess = Preprocess.from_dict(first.meta["preprocess"])

    def score_baselines(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], Baseline]:
        """Which evaluation images the single adapter and the head baseline of each (task, seed) get right."""
        baselines = {}
        for task, seed in tqdm(keys, desc="baselines", unit="adapter", leave=False):
            adapter, data = self.adapters[(task, seed)], {task: self.eval_tensors(task)}
            single_model = self.folded.model(adapter.deltas, {task: adapter.head})
            single = task_correct(single_model, data)[task]
            head_folder = self._stored_path("head", task, seed)
            head_model = self.folded.model({}, {task: load_head(head_folder, read_meta(head_folder))})
            baselines[(task, seed)] = Baseline(single_correct=single, head_correct=task_correct(head_model, data)[task])
        return baselines

    def update_rows(self) -> list[dict]:
        """One `adapter_updates` row per loaded adapter: its update norm and number of adapted layers."""
        return [
            {
                "model_id": self.config.model_id("adapter", task, seed),
                "task": task,
                "seed": seed,
                "update_norm": update_norm(adapter),
                "layers": len(adapter.deltas),
                "run_id": self.run_id,
                "created_at": now(),
            }
            for (task, seed), adapter in self.adapters.items()
        ]

    # -- one merge --------------------------------------------------------------------------------
    def merge_id(self, group, seed, method) -> str:
        return merge_id_of(self.config, group, seed, method)

    def merger(self, seed: int) -> AdapterMerger:
        """The merger of every task's adapter of `seed` (peft references load them once, on first use)."""
        if seed not in self._mergers:
            adapters = {task: self.adapters[(task, seed)] for task in self.config.tasks}
            self._mergers[seed] = AdapterMerger(
                adapters,
                self.config.backbone_config,
                grams=self.grams,
                folded=self.folded,
                unlabeled_for=lambda task: self.eval_tensors(task)[0],  # AdaMerging: the test images, unlabeled
            )
        return self._mergers[seed]

    def grid_merges(self, group, seed, method):
        """(grid index, merged ΔW, full hyperparameters) for every point of the method's grid.

        A method that starts from another's choice (`starts_from`) has that value set at every point. Where
        `scaling` is an output multiplier, ΔW is merged once at scaling 1 per combination of the other
        hyperparameters and multiplied per scaling value; otherwise each point is merged. Yielded one at a
        time (bucket by bucket), so only the merges in use are held."""
        merge_method, merger = get_method(method), self.merger(seed)
        points = merge_method.grid_points(len(group))
        start = merge_method.starts_from
        if start is not None:  # AdaMerging: at task arithmetic's λ chosen on validation for this group and seed
            value = self.select(group, seed, start.method).params[start.chosen]
            points = [{**point, start.sets: value} for point in points]
        if not merge_method.scaling_is_output_multiplier:
            for index, point in enumerate(points):
                yield (index, *merger.merge(group, method, point))
            return
        buckets: dict[str, list[int]] = {}
        for index, point in enumerate(points):
            rest = {name: value for name, value in point.items() if name != "scaling"}
            buckets.setdefault(json.dumps(rest, sort_keys=True), []).append(index)
        for key, indices in buckets.items():
            base, params = merger.merge(group, method, {**json.loads(key), "scaling": 1.0})
            for index in indices:
                scaling = points[index].get("scaling", merge_method.defaults["scaling"])
                merged = base if scaling == 1.0 else {layer: scaling * delta for layer, delta in base.items()}
                yield index, merged, {**params, "scaling": float(scaling)}

    def select(self, group, seed, method) -> Selection:
        """Score every grid point's merge on the validation subset and keep the best (ties: grid order)."""
        heads = {task: self.adapters[(task, seed)].head for task in group}
        validation = {task: self.eval_tensors(task, "validation") for task in group}

        def score(merged) -> float:
            correct = task_correct(self.folded.model(merged, heads), validation)
            return sum(accuracy_of(correct[task]) for task in group) / len(group)

        n_per_task = min(len(labels) for _, labels in validation.values())
        return select_on_validation(
            get_method(method), len(group), self.grid_merges(group, seed, method), score, n_per_task
        )

    def compute(self, group: tuple[str, ...], seed: int, method: str) -> MergeRows:
        """Merge the group's adapters with `method` (chosen on validation) and score it; stores nothing."""
        merge_id = self.merge_id(group, seed, method)
        start = time.perf_counter()
        selection = self.select(group, seed, method)
        seconds = time.perf_counter() - start
        heads = {task: self.adapters[(task, seed)].head for task in group}
        model = self.folded.model(selection.merged, heads)
        rows = MergeRows(
            {
                "merge_id": merge_id,
                "method": method,
                "k": len(group),
                "tasks": ",".join(group),
                "seed": seed,
                "adapter_ids": [self.config.model_id("adapter", t, seed) for t in group],
                "hyperparams": selection.params,
                "backbone": self.config.backbone,
                "merge_seconds": seconds,
                "selection": selection.record,
                "run_id": self.run_id,
                "created_at": now(),
            }
        )
        test_data = {task: self.eval_tensors(task) for task in group}
        merged_correct = task_correct(model, test_data)
        for task in group:
            baseline = self.baselines[(task, seed)]
            rows.evaluations.append(
                {
                    "merge_id": merge_id,
                    "task": task,
                    "split": "test",
                    "merged_accuracy": accuracy_of(merged_correct[task]),
                    "single_accuracy": baseline.single,
                    "head_accuracy": baseline.head,
                    "n": len(test_data[task][1]),
                    "merged_correct": pack_correct(merged_correct[task]),
                    "single_correct": pack_correct(baseline.single_correct),
                    "head_correct": pack_correct(baseline.head_correct),
                    "run_id": self.run_id,
                    "created_at": now(),
                }
            )
        return rows

    def save_updates(self) -> int:
        """Store the loaded adapters' update norms (those stored already are skipped); returns rows inserted."""
        rows = self.update_rows()
        if not rows:
            return 0
        with self.store.write() as con:
            return insert_rows(con, "adapter_updates", rows)

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
        """Load the adapters and score the baselines that the plan items `todo` need (nothing if none); load or
        compute (once, cached) the Gram matrices of the adapters a data-aware method (`statistics`) will merge."""
        if todo:
            self.load_inputs({seed for _, seed, _ in todo})
            self.prepare_grams(todo)

    def prepare_grams(self, todo: list) -> None:
        """Load or compute (once, cached) the Gram matrices of the adapters a method in `todo` takes statistics of."""
        needed = {(task, seed) for group, seed, method in todo if get_method(method).statistics for task in group}
        self.grams.prepare([self.adapters[key] for key in sorted(needed)])

    def run(self) -> dict:
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            return self.run_distributed()
        plan = sweep_plan(self.config)
        todo = self.missing(plan, stored_merge_ids(self.store))
        self.prepare(todo)
        self.save_updates()
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

    def run_distributed(self) -> dict:
        """The sweep split over the processes of `accelerate launch`; every process calls it.

        The main process reads which merges are stored and shares the to-do list and the model folders
        (`broadcast_object_list`), so every process plans the same work and only the main process opens the
        store (another machine needs the artifacts at the same path, not the database); it also computes any
        missing Gram matrices first (the others then read them from the cache instead of racing to write them).
        The baselines (each adapter and head on the evaluation images) are scored once, a share per process, and
        gathered to every process. Process i takes every n-th merge of the list (methods differ in cost, so
        interleaving balances better than contiguous slices), merges and scores it on its own device, and after
        every ROUND_MERGES merges the rows are gathered (`gather_object`); the main process alone writes
        results.duckdb. A killed launch
        keeps every gathered round; run again, it does only the merges still missing. Each merge is computed
        exactly as the serial sweep computes it (the same per-layer seeds), so the rows do not depend on which
        process made them."""
        from accelerate.utils import broadcast_object_list, gather_object

        accelerator = self.accelerator
        main = accelerator.is_main_process
        plan = sweep_plan(self.config)
        shared = [None, None]
        if main:
            todo = self.missing(plan, stored_merge_ids(self.store))
            for kind, task, seed in itertools.product(("adapter", "head"), self.config.tasks, {s for _, s, _ in todo}):
                self._stored_path(kind, task, seed)
            shared = [todo, self.model_folders]
        broadcast_object_list(shared)
        todo, self.model_folders = shared
        if todo:  # every process holds the adapters; each scores a share of the baselines, and all get them all
            self.load_adapters({seed for _, seed, _ in todo})
            keys = sorted(self.adapters)[accelerator.process_index :: accelerator.num_processes]
            for scored in gather_object([self.score_baselines(keys)]):
                self.baselines.update(scored)
        if main:
            self.prepare_grams(todo)
            self.save_updates()
        accelerator.wait_for_everyone()
        if not main:
            self.prepare_grams(todo)
        mine = todo[accelerator.process_index :: accelerator.num_processes]
        rounds = math.ceil(math.ceil(len(todo) / accelerator.num_processes) / ROUND_MERGES)
        merged = 0
        for index in tqdm(range(rounds), desc="merge sweep (rounds)", unit="round", disable=not main):
            computed = [self.compute(*item) for item in mine[index * ROUND_MERGES : (index + 1) * ROUND_MERGES]]
            gathered = gather_object(computed)
            if main:
                merged += self.save(gathered)
        shares = gather_object([len(mine)])
        if main:
            print(
                f"merge sweep split over {accelerator.num_processes} processes: {' + '.join(map(str, shares))} merges"
            )
        return {
            "merged": merged,
            "skipped": len(plan) - len(todo),
        }
