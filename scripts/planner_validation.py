"""How well the merge planner's predictor forecasts retention, and what the planner costs (issue 34).

    python scripts/planner_validation.py      # the committed six-task study and the twenty-task pilot;
                                              # writes reports/planner_validation.md

For each study and method: every predictor of `merging/predict.py` scored on held-out groups (5 folds), held-out
tasks (a task's groups predicted by a model fitted without them) and across studies (fitted on the other study's
tasks), as Spearman ρ and mean absolute error of predicted vs measured per-task test retention, beside the baselines
(mean retention at that k; the task's own mean at that k; its worst pair). Then the plans at 90 % and 95 % with
predicted vs measured retention where the study stored the planned groups, and the planner's time (median of 5
runs, alone) for 6, 12 and 20 tasks against the merges an exhaustive search would need.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merging.plan import EXACT_MAX, Planner, plan_text  # noqa: E402
from merging.predict import PREDICTORS, evaluate, task_rows, transfer  # noqa: E402
from mlvision.paths import DEFAULT_DB_PATH, REPO_ROOT  # noqa: E402
from mlvision.store import Store  # noqa: E402

STUDIES = {"six-task study": DEFAULT_DB_PATH, "twenty-task pilot": REPO_ROOT / "reports" / "wide_pilot.duckdb"}
METHODS = ("regmean", "ties", "task_arithmetic")


def load(db: Path) -> pd.DataFrame:
    return Store(db).query_df("SELECT method, k, tasks, task, seed, normalized_accuracy FROM merge_results")


def score_table(scores: pd.DataFrame) -> list[str]:
    """One line per predictor: ρ and MAE (points) over every k >= 3 for each scheme."""
    schemes = list(dict.fromkeys(scores["scheme"]))
    lines = ["| predictor | " + " | ".join(f"{s}: ρ / MAE" for s in schemes) + " |", "|---|" + "---|" * len(schemes)]
    overall = scores[scores["k"] == "all"].set_index(["scheme", "predictor"])
    for predictor in PREDICTORS:
        cells = []
        for scheme in schemes:
            r = overall.loc[(scheme, predictor)]
            cells.append(f"{r['rho']:.2f} / {r['mae_points']:.1f}")
        lines.append(f"| {predictor} | " + " | ".join(cells) + " |")
    return lines


def by_k_table(scores: pd.DataFrame, scheme: str) -> list[str]:
    """MAE (points) by k for one scheme, every predictor."""
    mine = scores[(scores["scheme"] == scheme) & (scores["k"] != "all")]
    ks = sorted(set(mine["k"]))
    lines = [f"| MAE by k ({scheme}) | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for predictor in PREDICTORS:
        at = mine[mine["predictor"] == predictor].set_index("k")["mae_points"]
        lines.append(f"| {predictor} | " + " | ".join(f"{at[k]:.1f}" for k in ks) + " |")
    return lines


def timing(planner: Planner, tasks: tuple[str, ...], keep: float, repeats: int = 5) -> float:
    """Median seconds of planning from scratch (the prediction cache cleared each time)."""
    times = []
    for _ in range(repeats):
        planner.retention.cache_clear()
        start = time.perf_counter()
        planner.plan(tasks, dict.fromkeys(tasks, keep))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=DEFAULT_DB_PATH, help="the six-task study's results database")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "planner_validation.md")
    args = parser.parse_args(argv)
    studies = {**STUDIES, "six-task study": args.db}
    merges = {name: load(db) for name, db in studies.items()}
    lines = ["# The merge planner's predictor: held-out figures, plans, cost", "", __doc__.split("\n\n")[2], ""]
    for method in METHODS:
        rows = {name: task_rows(m, method) for name, m in merges.items()}
        for name, mine in rows.items():
            other = next(o for o in rows if o != name)
            scores = pd.concat([evaluate(mine), transfer(rows[other], mine)], ignore_index=True)
            lines += [f"## {method}, {name} (transfer: fitted on the {other})", ""]
            lines += score_table(scores) + [""] + by_k_table(scores, "tasks") + [""]
    lines += ["## Plans (RegMean; measured = the stored merge's test retention, mean over seeds)", ""]
    for name, m in merges.items():
        planner = Planner(m, "regmean")
        for keep in (0.9, 0.95):
            plan = planner.plan(planner.tasks, dict.fromkeys(planner.tasks, keep))
            lines += [f"{name}, keep {keep:.0%}:", "", "```", plan_text(plan, planner.measured(plan.groups),
                      dict.fromkeys(planner.tasks, keep)), "```", ""]  # fmt: skip
    wide = Planner(merges["twenty-task pilot"], "regmean")
    lines += [
        "## Cost",
        "",
        f"Planner time from scratch at keep 90 % (median of 5, this machine, nothing else running; exact search up "
        f"to {EXACT_MAX} tasks, greedy beyond) against the merges each approach needs:",
        "",
        "| tasks | search | time | merges the planner needs (pairs) | groups of k >= 2 exhaustive search merges |",
        "|---|---|---|---|---|",
    ]
    for n in (6, 12, 20):
        tasks = wide.tasks[:n]
        seconds = timing(wide, tasks, 0.9)
        search = "exact" if n <= EXACT_MAX else "greedy"
        lines.append(f"| {n} | {search} | {seconds * 1000:.1f} ms | {n * (n - 1) // 2} | {2**n - n - 1:,} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
