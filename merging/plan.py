"""Which of a study's adapters to merge into how few backbones, every task keeping a share of its own accuracy.

    python merging/plan.py --keep 0.9                                  # the committed study, RegMean
    python merging/plan.py --db reports/wide_pilot.duckdb --method ties --keep 0.85 --max-backbones 6
    python merging/plan.py --keep 0.95 --validate                      # the predictor's held-out figures first

Why: merging every group of N adapters to see which hold together is 2^N merges; the N(N-1)/2 pairs are cheap. The
planner predicts each task's retention in any group from its pairs (`merging/predict.py`: the fitted model of pair
interference, fitted on the study's stored groups of k >= 3), then searches partitions of the tasks into groups
whose every task is predicted to keep at least `--keep` of its own adapter's accuracy, with the fewest backbones
(ties: the highest predicted worst-task retention). Exact for up to EXACT_MAX tasks (every set partition, by dynamic
programming over subsets); beyond, greedy (grow each group by the task that keeps its predicted worst retention
highest, while every task still meets the target), which may use more backbones than needed.

Verification: where the study stored the planned groups' merges (the default study merges every group), their
measured test retention (mean over seeds) is printed beside the prediction, and the tasks below the target are
named. Merging groups the study did not store, and adapters from elsewhere, are not done here yet (issue 34).
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.predict import evaluate, fit, group_retention, pair_losses, task_rows  # noqa: E402
from mlvision.errors import MLVisionError  # noqa: E402
from mlvision.paths import DEFAULT_DB_PATH  # noqa: E402
from mlvision.store import Store  # noqa: E402

EXACT_MAX = 10  # Bell(10) = 115,975 partitions: exact in seconds; Bell(12) = 4.2 million is not
PREDICTOR = "fitted"  # the predictor the planner uses (the held-out figures in its closing note chose it)


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

    def __init__(self, merges: pd.DataFrame, method: str):
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

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one planner per run; the cache is its point
    def retention(self, group: tuple[str, ...]) -> dict[str, float]:
        """Each task's predicted retention in `group` (sorted tuple)."""
        return group_retention(group, self.losses, self.fitted, PREDICTOR)

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
        return max(fitting, key=lambda p: p.worst) if fitting else self._plan(self._greedy(tasks, {}), False)

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


def measured(merges: pd.DataFrame, method: str, groups) -> dict[str, float]:
    """Each task's measured test retention in its planned group (mean over seeds), where the study stored it."""
    rows = task_rows(merges, method)
    by_key = {(g, t): r for g, t, r in zip(rows["group"], rows["task"], rows["retention"])}
    return {
        task: by_key[(group, task)] for group in groups if len(group) > 1 for task in group if (group, task) in by_key
    }


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python merging/plan.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=DEFAULT_DB_PATH, help="a study's results database")
    parser.add_argument("--method", default="regmean", help="the merge method planned for (the study must store it)")
    parser.add_argument("--keep", type=float, default=0.9, help="retention every task must keep (0-1; default 0.9)")
    parser.add_argument("--max-backbones", type=int, help="at most this many backbones")
    parser.add_argument("--tasks", nargs="+", help="plan for these of the study's tasks (default: all)")
    parser.add_argument("--validate", action="store_true", help="print the predictor's held-out figures first")
    args = parser.parse_args(argv)
    try:
        if not 0 < args.keep <= 1:
            raise MLVisionError(f"--keep {args.keep}: give the share of accuracy to keep, in (0, 1]")
        if not args.db.exists():
            raise MLVisionError(f"{args.db}: no such results database (run `python training/run_all.py` first)")
        merges = Store(args.db).query_df("SELECT method, k, tasks, task, seed, normalized_accuracy FROM merge_results")
        planner = Planner(merges, args.method)
        tasks = tuple(args.tasks or planner.tasks)
        unknown = sorted(set(tasks) - set(planner.tasks))
        if unknown:
            raise MLVisionError(f"the study has no task {', '.join(unknown)}; it has {', '.join(planner.tasks)}")
        if args.validate:
            scores = evaluate(planner.rows)
            print(scores[scores["k"] == "all"].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        keep = dict.fromkeys(tasks, args.keep)
        plan = planner.plan(tasks, keep, args.max_backbones)
        if plan is None:
            limit = args.max_backbones or len(tasks)
            best = planner.best_with(tasks, limit)
            print(f"no plan keeps {args.keep:.0%} for every task within {limit} backbone(s); the best predicted "
                  f"worst-task retention with {limit} is {best.worst:.1%}:")  # fmt: skip
            print(plan_text(best, measured(merges, args.method, best.groups), keep))
            return 1
        print(plan_text(plan, measured(merges, args.method, plan.groups), keep))
    except MLVisionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
