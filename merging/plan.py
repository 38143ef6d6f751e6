"""Which of a study's adapters to merge into how few backbones, every task keeping a share of its own accuracy.

    python merging/plan.py --keep 0.9                                  # the committed study, RegMean
    python merging/plan.py --db reports/wide.duckdb --method ties --keep 0.85 --max-backbones 6
    python merging/plan.py --keep 0.95 --validate                      # the predictor's held-out figures first
    python merging/plan.py ADAPTER... --method ties --keep 0.9         # adapters no study stored (any source)

Why: merging every group of N adapters to see which hold together is 2^N merges; the N(N-1)/2 pairs are cheap. The
planner predicts each task's retention in any group from its pairs (`merging/predict.py`: the fitted model of pair
interference, fitted on the study's stored groups of k >= 3), then searches partitions of the tasks into groups
whose every task is predicted to keep at least `--keep` of its own adapter's accuracy, with the fewest backbones
(ties: the highest predicted worst-task retention). Exact for up to EXACT_MAX tasks (every set partition, by dynamic
programming over subsets); beyond, greedy (grow each group by the task that keeps its predicted worst retention
highest, while every task still meets the target), which may use more backbones than needed.

Verification: where the study stored the planned groups' merges (the default study merges every group), their
measured test retention (mean over seeds) is printed beside the prediction, and the tasks below the target are
named. run_all's `plan` stage (`PlanStage`) stores the plans at PLAN_TARGETS and the trade-off curve (the best plan
with 1, 2, ... backbones) in results.duckdb (view `merge_plans`), and merges the planned groups the sweep did not
store (up to the study's --max-k), as the sweep would, to measure them (`plan_checks`).

Adapters no study stored (ADAPTER..., read like the merge CLI's: this project's folders, peft LoRAs from elsewhere
with --data, Hub ids): every pair is merged (the method's grid chosen on validation) and scored on --images
validation images per task; the model's weights come from the --db study's larger groups (a pair-only set has none
to fit on; the committed study by default, else the additive model); the planned groups are then merged the same way
and scored on as many test images, which the plan never saw.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.export import RANK_VALIDATION_IMAGES  # noqa: E402
from merging.methods import get_method  # noqa: E402
from merging.predict import evaluate, fit, group_retention, pair_losses, task_rows  # noqa: E402
from merging.sweep import MergeSweep, in_study_subset, insert_rows, merge_seeds  # noqa: E402
from mlvision.config import StudyConfig  # noqa: E402
from mlvision.errors import MLVisionError, run_cli  # noqa: E402
from mlvision.paths import DEFAULT_DB_PATH  # noqa: E402
from mlvision.runs import study_run_id  # noqa: E402
from mlvision.store import Store, config_hash, now  # noqa: E402

EXACT_MAX = 10  # Bell(10) = 115,975 partitions: exact in seconds; Bell(12) = 4.2 million is not
PREDICTOR = "fitted"  # the predictor the planner uses (the held-out figures in its closing note chose it)
FALLBACK_PREDICTOR = "additive"  # where the study stores no group of k >= 3 to fit on (e.g. --max-k 2)
PLAN_TARGETS = (0.9, 0.95)  # the retention every task keeps in the plans run_all stores (issue 34's X)


@dataclass(frozen=True)
class Plan:
    """Groups (each merged into one backbone; a group of one is the task's own adapter) and each task's predicted
    retention; `exact` says whether the search was exhaustive."""

    groups: tuple[tuple[str, ...], ...]
    predicted: dict[str, float]
    exact: bool

    @property
    def backbones(self) -> int:
        return len(self.groups)

    @property
    def worst(self) -> float:
        return min(self.predicted.values())


class Planner:
    """Predicted retention of any group from a study's stored merges of one method, and the partition search."""

    def __init__(self, merges: pd.DataFrame, method: str, weights_from: pd.DataFrame | None = None):
        """`weights_from`: another study's merges to fit the model's weights on where `merges` holds no group of
        k >= 3 (adapters from elsewhere: only their pairs are merged; the committed study lends the weights)."""
        self.rows = task_rows(merges, method)
        if self.rows.empty:
            raise MLVisionError(f"the study stores no merge of {method!r}: plan with a method it merged (--method)")
        self.tasks = tuple(sorted(set(self.rows["task"])))
        self.losses = pair_losses(self.rows)
        missing = [(a, b) for a in self.tasks for b in self.tasks if a != b and (a, b) not in self.losses]
        if missing:
            raise MLVisionError(
                f"the study stores no {method} merge of {len(missing) // 2} pair(s), e.g. {missing[0]}: the planner "
                "predicts from every pair (merge them first)"
            )
        self.fitted = fit(self.rows, self.losses)
        self.predictor = self.predictor_label = PREDICTOR
        if not np.isfinite(self.fitted["weights"]).all() and weights_from is not None:
            lent = task_rows(weights_from, method)
            if (lent["k"] >= 3).any():
                self.fitted["weights"] = fit(lent, pair_losses(lent))["weights"]
                self.predictor_label = f"{PREDICTOR}, weights from another study"
        if not np.isfinite(self.fitted["weights"]).all():
            # no group of k >= 3 to learn the weights from: interference adds up, unweighted
            self.predictor = self.predictor_label = FALLBACK_PREDICTOR

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one planner per run; the cache is its point
    def retention(self, group: tuple[str, ...]) -> dict[str, float]:
        """Each task's predicted retention in `group` (sorted tuple)."""
        return group_retention(group, self.losses, self.fitted, self.predictor)

    def worst(self, group: tuple[str, ...]) -> float:
        return min(self.retention(group).values())

    def meets(self, group: tuple[str, ...], keep: dict[str, float]) -> bool:
        return all(value >= keep[task] for task, value in self.retention(group).items())

    def plan(self, tasks: tuple[str, ...], keep: dict[str, float], max_backbones: int | None = None) -> Plan | None:
        """The partition of `tasks` with the fewest groups whose every task meets `keep` (ties: the highest predicted
        worst-task retention), None where none meets it within `max_backbones`."""
        tasks = tuple(sorted(tasks))
        exact = len(tasks) <= EXACT_MAX
        groups = self._exact(tasks, keep) if exact else self._greedy(tasks, keep)
        if groups is None or (max_backbones is not None and len(groups) > max_backbones):
            return None
        return self._plan(groups, exact)

    def best_with(self, tasks: tuple[str, ...], backbones: int) -> Plan:
        """The partition into at most `backbones` groups with the highest predicted worst-task retention (exact up to
        EXACT_MAX tasks; greedy beyond: the greedy plans' best over targets)."""
        tasks = tuple(sorted(tasks))
        if len(tasks) <= EXACT_MAX:
            return self._plan(self._max_min(tasks, backbones)[1], True)
        plans = [self.plan(tasks, dict.fromkeys(tasks, target)) for target in [i / 100 for i in range(100, 0, -1)]]
        fitting = [p for p in plans if p is not None and p.backbones <= backbones]
        return max(fitting, key=lambda p: p.worst) if fitting else self._plan([tasks], False)

    def tradeoff(self, tasks: tuple[str, ...]) -> dict[int, Plan]:
        """The best plan (highest predicted worst-task retention) with at most 1, 2, ..., N backbones: the curve
        "backbones vs worst-task retention"."""
        tasks = tuple(sorted(tasks))
        if len(tasks) <= EXACT_MAX:
            return {b: self.best_with(tasks, b) for b in range(1, len(tasks) + 1)}
        plans = [self.plan(tasks, dict.fromkeys(tasks, target)) for target in [i / 100 for i in range(100, 0, -1)]]
        # one backbone holding every task: the plan with no target, so that every count of backbones has one
        plans = [p for p in plans if p is not None] + [self._plan([tasks], False)]
        return {
            b: max((p for p in plans if p.backbones <= b), key=lambda p: p.worst, default=plans[-1])
            for b in range(1, len(tasks) + 1)
        }

    def measured(self, groups) -> dict[str, float]:
        """Each task's measured test retention in its planned group (mean over seeds), where the study stored it."""
        by_key = {(g, t): r for g, t, r in zip(self.rows["group"], self.rows["task"], self.rows["retention"])}
        return {task: by_key[(g, task)] for g in groups if len(g) > 1 for task in g if (g, task) in by_key}

    def _plan(self, groups, exact: bool) -> Plan:
        predicted = {task: value for group in groups for task, value in self.retention(group).items()}
        return Plan(tuple(groups), predicted, exact)

    def _exact(self, tasks, keep):
        """Fewest groups, then highest worst retention, over every set partition (dynamic programming on subsets)."""

        @functools.lru_cache(maxsize=None)
        def best(remaining: tuple[str, ...]):  # -> (groups, -worst, partition) or None
            if not remaining:
                return (0, -2.0, ())
            first, rest = remaining[0], remaining[1:]
            options = []
            for mask in range(1 << len(rest)):
                group = (first, *(t for i, t in enumerate(rest) if mask >> i & 1))
                if not self.meets(tuple(sorted(group)), keep):
                    continue
                tail = best(tuple(t for t in rest if t not in group))
                if tail is not None:
                    worst = min(self.worst(tuple(sorted(group))), -tail[1] if tail[2] else 2.0)
                    options.append((1 + tail[0], -worst, (tuple(sorted(group)), *tail[2])))
            return min(options) if options else None

        found = best(tasks)
        return None if found is None else found[2]

    def _max_min(self, tasks, backbones):
        """(worst retention, partition) of the best partition into at most `backbones` groups."""

        @functools.lru_cache(maxsize=None)
        def best(remaining: tuple[str, ...], left: int):
            if not remaining:
                return (2.0, ())
            if left == 0:
                return (-1.0, None)
            first, rest = remaining[0], remaining[1:]
            top = (-1.0, None)
            for mask in range(1 << len(rest)):
                group = tuple(sorted((first, *(t for i, t in enumerate(rest) if mask >> i & 1))))
                worst = self.worst(group)
                if worst <= top[0]:
                    continue
                tail = best(tuple(t for t in rest if t not in group), left - 1)
                if tail[1] is not None and min(worst, tail[0]) > top[0]:
                    top = (min(worst, tail[0]), (group, *tail[1]))
            return top

        return best(tasks, backbones)

    def _greedy(self, tasks, keep):
        """Grow one group at a time from the task with the most partners it meets the target with, adding the task
        that keeps the group's predicted worst retention highest while every task still meets `keep`."""
        remaining, groups = list(tasks), []
        while remaining:

            def partners(t):
                return sum(self.meets(tuple(sorted((t, u))), keep) for u in remaining if u != t)

            group = [max(remaining, key=lambda t: (partners(t), t))]
            while True:
                candidates = [
                    (self.worst(tuple(sorted((*group, u)))), u)
                    for u in remaining
                    if u not in group and self.meets(tuple(sorted((*group, u))), keep)
                ]
                if not candidates:
                    break
                group.append(max(candidates)[1])
            groups.append(tuple(sorted(group)))
            remaining = [t for t in remaining if t not in group]
        return groups


def stored_merges(db: Path) -> pd.DataFrame:
    """Every merge a study stored, one row per (merge, task), as the planner reads them (`task_rows`)."""
    return Store(db).query_df("SELECT merge_id, method, k, tasks, task, seed, normalized_accuracy FROM merge_results")


def planned_methods(config: StudyConfig) -> list[str]:
    """The methods run_all plans for: swept on every group size (not only on a subset, so every pair and the
    larger groups to fit on are stored) and servable (a plan is something to serve)."""
    sizes = range(2, min(config.max_k, len(config.tasks)) + 1)
    return [
        method
        for method in config.merge_methods
        if get_method(method).servable and all(in_study_subset(method, k, None, config.subset_methods) for k in sizes)
    ]


class PlanStage:
    """run_all's `plan` stage: for each planned method, the plans at PLAN_TARGETS and the trade-off curve, stored in
    `plan_rows`; the planned groups the sweep did not merge (up to --max-k) merged and scored as the sweep would and
    stored in `plan_checks`, so view `merge_plans` holds every planned task's measured retention beside the
    prediction. A plan already stored for the same stored merges is skipped; the checks are saved one by one, so an
    interrupted stage continues where it stopped."""

    def __init__(self, config: StudyConfig, store: Store, accelerator=None):
        self.config, self.store, self.accelerator = config, store, accelerator
        self.run_id = study_run_id(config)
        self._sweep: MergeSweep | None = None  # built (a backbone loaded) only when a group needs checking

    def run(self) -> dict:
        # every merge the database stores, as the findings read them: a study's merges span the runs that made them
        merges = stored_merges(self.store.path)
        stored = {row[0] for row in self.store.query("SELECT DISTINCT plan_id FROM plan_rows")}
        counts = {"plans": 0, "skipped": 0, "checked": 0, "not_planned": ""}
        rows, skipped_methods = [], []
        for method in planned_methods(self.config):
            try:
                planner = Planner(merges, method)
            except MLVisionError as error:  # e.g. a pair not merged yet: said, and the other methods planned
                skipped_methods.append(f"{method} ({error})")
                continue
            inputs = sorted(merges.loc[merges["method"] == method, "merge_id"].unique())
            for kind, parameter, plan in self.plans(planner):
                plan_id = config_hash({"method": method, "kind": kind, "parameter": parameter,
                                       "predictor": planner.predictor_label, "merges": inputs})[:16]  # fmt: skip
                if plan_id in stored:
                    counts["skipped"] += 1
                    continue
                rows.append((plan_id, kind, method, parameter, planner.predictor_label, plan))
        counts["checked"] = self.check([(method, plan) for _, _, method, _, _, plan in rows])
        counts["plans"] = self.save(rows)
        counts["not_planned"] = "; not planned: " + ", ".join(skipped_methods) if skipped_methods else ""
        return counts

    def plans(self, planner: Planner):
        """(kind, parameter, Plan): the fewest backbones at each target, and the best plan per number of backbones."""
        tasks = planner.tasks
        for target in PLAN_TARGETS:
            yield "target", target, planner.plan(tasks, dict.fromkeys(tasks, target))
        for backbones, plan in planner.tradeoff(tasks).items():
            yield "tradeoff", backbones, plan

    def unmeasured(self, planned: list[tuple[str, Plan]]) -> list[tuple[tuple[str, ...], int, str]]:
        """(group in the study's task order, seed, method) of each planned group of 2..max_k tasks that neither the
        sweep nor an earlier check stored, for the seeds the sweep merges groups of that size with."""
        done = {
            (method, tuple(sorted(tasks.split(","))), seed)
            for method, tasks, seed in self.store.query(
                "SELECT DISTINCT method, tasks, seed FROM merge_results UNION "
                "SELECT DISTINCT method, group_tasks, seed FROM plan_checks"
            )
        }
        todo = set()
        for method, plan in planned:
            for group in plan.groups:
                if not 2 <= len(group) <= self.config.max_k:
                    continue
                for seed in merge_seeds(self.config, len(group)):
                    if (method, group, seed) not in done:
                        todo.add((tuple(t for t in self.config.tasks if t in group), seed, method))
        return sorted(todo, key=lambda item: (len(item[0]), item))

    def check(self, planned: list[tuple[str, Plan]]) -> int:
        """Merge and score the planned groups nothing stored yet; each stored as soon as it is scored."""
        todo = self.unmeasured(planned)
        if not todo:
            return 0
        self._sweep = self._sweep or MergeSweep(self.config, self.store, self.accelerator)
        self._sweep.prepare(todo)
        for group, seed, method in tqdm(todo, desc="plan checks", unit="merge"):
            merged = self._sweep.compute(group, seed, method)
            rows = [
                {
                    "method": method,
                    "group_tasks": ",".join(sorted(group)),
                    "seed": seed,
                    "task": evaluation["task"],
                    "merged_accuracy": evaluation["merged_accuracy"],
                    "single_accuracy": evaluation["single_accuracy"],
                    "n": evaluation["n"],
                    "hyperparams": merged.merge["hyperparams"],
                    "merge_seconds": merged.merge["merge_seconds"],
                    "run_id": self.run_id,
                    "created_at": now(),
                }
                for evaluation in merged.evaluations
            ]
            with self.store.write() as con:
                insert_rows(con, "plan_checks", rows)
        return len(todo)

    def save(self, rows) -> int:
        """Store the new plans in one transaction, replacing the same (method, kind, parameter)'s older plan (made
        from other stored merges); returns how many plans went in."""
        if not rows:
            return 0
        with self.store.write() as con:
            for plan_id, kind, method, parameter, predictor, plan in rows:
                column = "target" if kind == "target" else "max_backbones"
                con.execute(
                    f"DELETE FROM plan_rows WHERE method = ? AND kind = ? AND {column} = ?", [method, kind, parameter]
                )
                insert_rows(con, "plan_rows", [
                    {"plan_id": plan_id, "kind": kind, "method": method,
                     "target": parameter if kind == "target" else None,
                     "max_backbones": parameter if kind == "tradeoff" else None,
                     "backbones": plan.backbones, "exact": plan.exact, "predictor": predictor, "group_index": index,
                     "group_tasks": ",".join(group), "task": task, "predicted": plan.predicted[task],
                     "run_id": self.run_id, "created_at": now()}
                    for index, group in enumerate(plan.groups, 1) for task in group
                ])  # fmt: skip
        return len(rows)


ADAPTER_IMAGES = 200  # validation images per task for the pairs (and test images per task for the check)


class GivenAdapters:
    """Planning adapters no study stored (`python merging/plan.py ADAPTER...`): each pair merged with the method,
    its hyperparameters chosen on validation images as the sweep chooses them, and each task's retention in it
    scored on the same validation images (the planner's input); the planned groups (pairs included) then merged the
    same way and scored on test images (the check: images the plan never saw)."""

    def __init__(self, source, method: str, images: int = ADAPTER_IMAGES):
        source.check_method(get_method(method))  # e.g. RegMean without images: one line before any work
        self.source, self.method, self.tasks = source, method, tuple(sorted(source.adapters))
        validation, why = source.rank_validation(list(self.tasks))
        if validation is None:
            raise MLVisionError(f"planning needs each adapter's validation images: {why}")
        self.validation = {task: _first(validation[task], images) for task in self.tasks}
        self.images = images
        # what the pairs were scored on: `rank_validation` loads at most RANK_VALIDATION_IMAGES, a small split fewer
        self.validation_images = min(len(labels) for _, labels in self.validation.values())

    def retention(self, groups, data: dict) -> pd.DataFrame:
        """merge_results-shaped rows: each task's accuracy in each merged group over its own adapter's, on `data`."""
        from merging.merge import merge_on_validation

        tasks = sorted({task for group in groups for task in group})  # each own adapter scored once, where needed
        single = {t: self.source.score(self.source.adapters[t].deltas, {t: data[t]})[t] for t in tasks}
        rows = []
        for group in tqdm(groups, desc=f"{self.method} merges", unit="merge"):
            validation = ({task: self.validation[task] for task in group}, "")
            merged, _, _ = merge_on_validation(self.source, list(group), self.method, {}, validation)
            for task, accuracy in self.source.score(merged, {task: data[task] for task in group}).items():
                rows.append({"method": self.method, "k": len(group), "tasks": ",".join(group), "task": task, "seed": 0,
                             "normalized_accuracy": accuracy / single[task] if single[task] else np.nan})  # fmt: skip
        return pd.DataFrame(rows)

    def pairs(self) -> pd.DataFrame:
        """Every pair's retention on validation: the N(N-1)/2 cheap merges the planner predicts from."""
        return self.retention(list(itertools.combinations(self.tasks, 2)), self.validation)

    def check(self, groups) -> dict[str, float]:
        """Each planned task's retention measured on test images (its group merged as above)."""
        groups = [group for group in groups if len(group) > 1]
        if not groups:
            return {}
        test = self.source.split("test", dict.fromkeys(self.tasks, self.images))
        rows = self.retention(groups, test)
        return dict(zip(rows["task"], rows["normalized_accuracy"]))


def _first(split: tuple, n: int) -> tuple:
    """The first n images and labels of a split (validation images are already a seeded, fixed subset)."""
    images, labels = split
    return images[:n], labels[:n]


def plan_text(plan: Plan, measured_retention: dict[str, float], keep: dict[str, float]) -> str:
    """The plan as lines: one per backbone with each task's predicted (and measured) retention; misses named."""
    lines = [f"{plan.backbones} backbone(s) for {len(plan.predicted)} tasks ({'exact' if plan.exact else 'greedy'} "
             f"search); predicted worst-task retention {plan.worst:.1%}"]  # fmt: skip
    misses = []
    for i, group in enumerate(plan.groups, 1):
        parts = []
        for task in group:
            if len(group) == 1:
                parts.append(f"{task} (its own adapter)")
                continue
            got = measured_retention.get(task)
            parts.append(f"{task} {plan.predicted[task]:.1%}" + (f" / measured {got:.1%}" if got is not None else ""))
            if got is not None and got < keep[task]:
                misses.append(f"{task} {got:.1%} < {keep[task]:.0%}")
        lines.append(f"  backbone {i}: " + ", ".join(parts))
    if measured_retention:
        lines.append("  measured below the target: " + ("; ".join(misses) if misses else "none"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from merging.merge import add_adapter_arguments

    parser = argparse.ArgumentParser(prog="python merging/plan.py", description=__doc__.split("\n\n")[0])
    add_adapter_arguments(parser)
    parser.add_argument(
        "--db",
        type=Path,
        default=DEFAULT_DB_PATH,
        help="a study's results database: planned from (no ADAPTER given), or, with ADAPTERs, the study whose "
        "groups of three or more lend the model's weights",
    )
    parser.add_argument("--method", default="regmean", help="the merge method planned for (the study must store it)")
    parser.add_argument("--keep", type=float, default=0.9, help="retention every task must keep (0-1; default 0.9)")
    parser.add_argument("--max-backbones", type=int, help="at most this many backbones")
    parser.add_argument("--tasks", nargs="+", help="plan for these of the study's tasks (default: all)")
    parser.add_argument("--validate", action="store_true", help="print the predictor's held-out figures first")
    parser.add_argument(
        "--images",
        type=int,
        default=ADAPTER_IMAGES,
        help=f"with ADAPTERs: validation images per task for the pairs (at most {RANK_VALIDATION_IMAGES}), test images "
        f"per task for the check (default {ADAPTER_IMAGES})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), "nothing was stored; run the same command again")


def run(args) -> int:
    if not 0 < args.keep <= 1:
        raise MLVisionError(f"--keep {args.keep}: give the share of accuracy to keep, in (0, 1]")
    if args.max_backbones is not None and args.max_backbones < 1:
        raise MLVisionError(f"--max-backbones {args.max_backbones}: give at least 1")
    if args.adapters:
        return run_adapters(args)
    if not args.db.exists():
        raise MLVisionError(f"{args.db}: no such results database (run `python training/run_all.py` first)")
    merges = stored_merges(args.db)
    planner = Planner(merges, args.method)
    tasks = tuple(args.tasks or planner.tasks)
    unknown = sorted(set(tasks) - set(planner.tasks))
    if unknown:
        raise MLVisionError(f"the study has no task {', '.join(unknown)}; it has {', '.join(planner.tasks)}")
    if args.validate:
        scores = evaluate(planner.rows)
        print(scores[scores["k"] == "all"].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return report(planner, tasks, args, planner.measured)


def run_adapters(args) -> int:
    """ADAPTER...: every pair merged and scored on validation, the plan made from them, its groups checked on test."""
    from merging.merge import read_source, resolve_sources

    if args.images < 1:
        raise MLVisionError(f"--images {args.images}: give at least 1 image per task")
    if args.tasks or args.validate:
        raise MLVisionError(f"{'--tasks' if args.tasks else '--validate'} plans a stored study: give no ADAPTER")
    source = read_source(args, *resolve_sources(args))
    if len(source.adapters) < 2:
        raise MLVisionError("give at least two adapters to plan")
    given = GivenAdapters(source, args.method, args.images)
    lent = None
    if args.db.exists():
        lent = stored_merges(args.db)
    planner = Planner(given.pairs(), args.method, weights_from=lent)
    print(
        f"pairs merged and scored on {given.validation_images} validation images per task (the fewest of any task); "
        f"predictor: {planner.predictor_label}"
    )
    return report(planner, given.tasks, args, given.check)


def report(planner: Planner, tasks: tuple[str, ...], args, measure) -> int:
    """Print the plan at --keep (or, where none meets it, the best within the backbones allowed) with each planned
    task's measured retention from `measure(groups)`; exit 1 where no plan meets the target."""
    keep = dict.fromkeys(tasks, args.keep)
    plan = planner.plan(tasks, keep, args.max_backbones)
    if plan is None:
        limit = args.max_backbones or len(tasks)
        best = planner.best_with(tasks, limit)
        print(f"no plan keeps {args.keep:.0%} for every task within {limit} backbone(s); the best predicted "
              f"worst-task retention with {limit} is {best.worst:.1%}:")  # fmt: skip
        print(plan_text(best, measure(best.groups), keep))
        return 1
    measured = measure(plan.groups)
    print(plan_text(plan, measured, keep))
    missed = [task for task, value in measured.items() if value < keep[task]]
    if missed and plan.backbones < len(tasks):  # the next-best plan: the best with one backbone more
        better = planner.best_with(tasks, plan.backbones + 1)
        print(f"next best (for {', '.join(missed)}): the best plan with {plan.backbones + 1} backbone(s)")
        print(plan_text(better, measure(better.groups), keep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
