"""Per-(method, k) figures: the method chosen per k on validation, each cell's figures and rows, and the
data-aware methods against the best data-free one.

A (method, k) cell's value is the mean over merged groups (task sets) of the group's mean over its seeds and
tasks; its CI bootstraps groups (study/statistics.py: 2,000 resamples, fixed seeds), and with fewer than 3 groups
the CI is NULL with the reason. Merged vs head on the same images: McNemar's exact test per (merge, task) row.
What a method is (transductive, data-aware, data-free) is read from its registered `MergeMethod`, never from its
kind's name.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from merging.methods import MERGE_METHODS
from study.findings.inputs import ALPHA, BASELINE_NAMES, BASELINES, selection_record
from study.findings.rows import ci_row, finding_row
from study.statistics import group_bootstrap_mean, rng_for, task_bootstrap_mean, wilson


def is_transductive(method: str) -> bool:
    """Whether a method learns on the unlabeled test images it is then scored on (AdaMerging)."""
    registered = MERGE_METHODS.get(method)
    return registered is not None and registered.transductive


def is_data_aware(method: str) -> bool:
    """Whether a method merges from more than the updates: training images' statistics, or the test images."""
    registered = MERGE_METHODS.get(method)
    return registered is not None and registered.uses_data


def is_data_free(method: str) -> bool:
    """Whether a method is a function of the updates alone, layer by layer (a reference merges whole adapters)."""
    registered = MERGE_METHODS.get(method)
    return registered is not None and registered.per_layer and not registered.uses_data


# -- the method chosen per k -----------------------------------------------------------------------


def choose_methods(merges: pd.DataFrame) -> dict[int, dict]:
    """Per k: the method with the highest mean chosen validation accuracy over that k's merges.

    Only methods whose every merge at k has a validation accuracy and that merged every (group, seed) at k
    compete (a mean over a subset would not be comparable: AdaMerging runs on a subset), and never a
    transductive method (one that learned on the test images it is scored on). Returns k -> {"method",
    "value", "n", "note", "scores": Series method -> mean}; "method" is None (with the reason in "note")
    when no method qualifies. Test accuracy is never used.
    """
    out = {}
    per_merge = merges.drop_duplicates("merge_id")
    for k, at_k in per_merge.groupby("k"):
        complete = at_k.groupby("method")["validation"].apply(lambda v: bool(np.isfinite(v).all()))
        coverage = at_k.groupby("method")["merge_id"].nunique()
        eligible = [m for m in complete[complete].index if coverage[m] == coverage.max() and not is_transductive(m)]
        scores = at_k[at_k["method"].isin(eligible)].groupby("method")["validation"].mean()
        if scores.empty:
            out[int(k)] = {"method": None, "value": None, "n": 0, "note": "no merge stores its validation accuracy",
                           "scores": scores}  # fmt: skip
            continue
        best = scores.max()
        method = sorted(scores.index[scores >= best - 1e-12])[0]  # ties: the first name, deterministically
        n = int((at_k["method"] == method).sum())
        note = f"highest mean validation accuracy of {len(scores)} methods; unit: merges ({n})"
        out[int(k)] = {"method": method, "value": float(best), "n": n, "note": note, "scores": scores}
    return out


# The method families claim 1 is judged for separately: what a user must have to merge that way.
FAMILIES = {
    "data_free": ("data-free (the adapters alone)", is_data_free),
    "data_aware": ("data-aware (statistics of each task's training images)",
                   lambda m: is_data_aware(m) and not is_transductive(m)),
}  # fmt: skip


def choose_by_family(merges: pd.DataFrame) -> dict[str, dict[int, dict]]:
    """family -> `choose_methods` over that family's merges only."""
    return {
        family: choose_methods(merges[[member(m) for m in merges["method"]]])
        for family, (_, member) in FAMILIES.items()
    }


def validation_rows(merges: pd.DataFrame, chosen: dict[int, dict]) -> list[dict]:
    """The `validation_accuracy` rows (each competing method's mean per k) and the `chosen_method` row per k."""
    out = []
    for k, c in chosen.items():
        for method, score in c["scores"].items():
            n = int(((merges["k"] == k) & (merges["method"] == method)).groupby(merges["merge_id"]).any().sum())
            out.append(
                finding_row(
                    "validation_accuracy",
                    f"{method}/k={k}",
                    score,
                    n=n,
                    note=f"mean chosen_validation_accuracy; unit: merges ({n})",
                )
            )
        if c["method"] is not None:
            out.append(finding_row("chosen_method", f"{c['method']}/k={k}", c["value"], n=c["n"], note=c["note"]))
        else:
            out.append(finding_row("chosen_method", f"none/k={k}", n=0, note=c["note"]))
    return out


# -- one (method, k) cell --------------------------------------------------------------------------


def _unit_note(groups: int, seeds: int, rows: int) -> str:
    return f"unit: merged groups ({groups}); seeds {seeds}; rows {rows}"


def _tasks_of(groups) -> list[tuple[str, ...]]:
    """The tasks of each group key ("a,b,c") of a groupby over `tasks`."""
    return [tuple(key.split(",")) for key in groups]


def baseline_figures(rows: pd.DataFrame, baseline: str, method: str, k: int) -> dict:
    """The merged model against one baseline (`BASELINES`) over a cell's rows: merged − baseline in points with a
    CI over groups and one over tasks, real wins and losses (McNemar per row), and the real-win share with a CI
    that resamples tasks (the rows of one task share its baseline model and its images, so they are not
    independent: the 63 wins at k = 2 of the six-task study came from 14 heads)."""
    diff_column = "diff_points" if baseline == "head" else f"{baseline}_diff_points"
    outcome_column = "outcome" if baseline == "head" else f"{baseline}_outcome"
    mine = rows[rows[diff_column].notna()]
    if mine.empty:
        return {"available": False}
    groups = mine.groupby("tasks")[diff_column].mean()
    outcomes = mine[mine[outcome_column].notna()]
    wins = outcomes[outcome_column] == 1
    return {
        "available": True,
        "diff": group_bootstrap_mean(groups, rng_for(f"diff/{baseline}", method, k)),
        "diff_tasks": task_bootstrap_mean(
            groups.values, _tasks_of(groups.index), rng_for(f"tdiff/{baseline}", method, k)
        ),
        "mcnemar_rows": len(outcomes),
        "wins": int(wins.sum()),
        "losses": int((outcomes[outcome_column] == -1).sum()),
        "win_share_tasks": task_bootstrap_mean(
            wins.to_numpy(float), _tasks_of(outcomes["tasks"]), rng_for(f"wins/{baseline}", method, k)
        ),
    }  # fmt: skip


def cell_figures(rows: pd.DataFrame, method: str, k: int) -> dict:
    """Every figure of one (method, k) cell from its (merge, task) rows (included tasks only)."""
    groups = rows.groupby("tasks")
    n_groups, seeds, n_rows = groups.ngroups, rows["seed"].nunique(), len(rows)
    unit = _unit_note(n_groups, seeds, n_rows)
    group_retention = groups["normalized_accuracy"].mean()
    retention = group_bootstrap_mean(group_retention, rng_for("retention", method, k))
    retention_tasks = task_bootstrap_mean(
        group_retention.values, _tasks_of(group_retention.index), rng_for("retention/tasks", method, k)
    )
    diff = group_bootstrap_mean(groups["diff_points"].mean(), rng_for("diff", method, k))
    # per task: mean over the groups containing it of the group's retention on that task (mean over seeds)
    per_group_task = rows.groupby(["task", "tasks"])["normalized_accuracy"].mean()
    per_task = per_group_task.groupby(level="task").mean().dropna()
    worst_task = per_task.idxmin() if len(per_task) else None
    worst = (
        group_bootstrap_mean(per_group_task.loc[worst_task], rng_for("worst", method, k))
        if worst_task is not None
        else (float("nan"), None, None, "no task")
    )
    defined = rows[rows["normalized_gain"].notna()]
    undefined = rows[rows["normalized_gain"].isna()]
    gain = group_bootstrap_mean(defined.groupby("tasks")["normalized_gain"].mean(), rng_for("gain", method, k))
    reasons = undefined["gain_note"].fillna("single adapter accuracy equals head accuracy").value_counts()
    gain_note = f"defined in {len(defined)} of {n_rows} rows" + (
        f"; {len(undefined)} undefined: " + "; ".join(f"{r} ({c})" for r, c in reasons.items())
        if len(undefined)
        else ""
    )
    outcomes = rows["outcome"].dropna()
    return {
        "method": method, "k": k, "groups": n_groups, "seeds": seeds, "rows": n_rows, "unit": unit,
        "retention": retention, "retention_tasks": retention_tasks, "diff": diff, "gain": gain, "gain_note": gain_note,
        "baselines": {baseline: baseline_figures(rows, baseline, method, k) for baseline in BASELINES},
        "gain_groups": defined["tasks"].nunique(),
        "per_task": per_task, "per_task_groups": per_group_task.groupby(level="task").size(),
        "worst_task": worst_task, "worst": worst,
        "mcnemar_rows": len(outcomes), "wins": int((outcomes == 1).sum()), "losses": int((outcomes == -1).sum()),
    }  # fmt: skip


def cells_of(rows_in: pd.DataFrame, choices: list[dict[int, dict]], full: bool) -> dict[tuple[str, int], dict]:
    """(method, k) -> `cell_figures`: every cell of the kept tasks' rows, or (full=False) only the cells of the
    methods chosen per k in `choices` (overall, data-free, data-aware), which is all the claims need."""
    wanted = (
        sorted(rows_in.groupby(["method", "k"]).groups)
        if full
        else sorted({(c["method"], k) for chosen in choices for k, c in chosen.items() if c["method"] is not None})
    )
    cells = {}
    for method, k in wanted:
        rows = rows_in[(rows_in["method"] == method) & (rows_in["k"] == k)]
        if not rows.empty:
            cells[(method, int(k))] = cell_figures(rows, method, int(k))
    return cells


def cell_rows(cell: dict) -> list[dict]:
    """A cell's rows: retention, worst task, spread and per-task retention, merged − head, normalized gain,
    real wins and losses."""
    stat, unit = f"{cell['method']}/k={cell['k']}", cell["unit"]
    out = [ci_row("retention_vs_k", stat, cell["retention"], cell["groups"], unit)]
    worst = cell["worst_task"]
    if worst is not None:
        groups_with = int(cell["per_task_groups"][worst])
        out.append(
            ci_row(
                "worst_task",
                stat,
                cell["worst"],
                groups_with,
                f"worst task: {worst}; unit: merged groups containing it ({groups_with})",
            )
        )
        spread = cell["per_task"]
        for name, value in (
            ("min", spread.min()),
            ("max", spread.max()),
            ("sd", spread.std(ddof=1) if len(spread) > 1 else np.nan),
        ):
            out.append(
                finding_row(
                    "retention_spread",
                    f"{stat}/{name}",
                    value,
                    n=len(spread),
                    note=f"over tasks' mean retention ({len(spread)} tasks)"
                    if len(spread) > 1 or name != "sd"
                    else "one task: no spread",
                )
            )
        for task, value in spread.items():
            g = int(cell["per_task_groups"][task])
            out.append(
                finding_row(
                    "task_retention",
                    f"{stat}/{task}",
                    value,
                    n=g,
                    note=f"mean over the merged groups containing {task} ({g}) of its retention",
                )
            )
    tasks_note = f"unit: tasks ({len(cell['per_task'])}), a group weighted by its tasks' multiplicities"
    out.append(ci_row("retention_vs_k_tasks", stat, cell["retention_tasks"], len(cell["per_task"]), tasks_note))
    out.append(ci_row("merged_minus_head", stat, cell["diff"], cell["groups"], unit + "; points"))
    for baseline, figures in cell["baselines"].items():
        if not figures["available"]:
            continue
        name = BASELINE_NAMES[baseline]
        if baseline != "head":
            out.append(ci_row(f"merged_minus_{baseline}", stat, figures["diff"], cell["groups"], unit + "; points"))
        out.append(ci_row("merged_minus_baseline_tasks", f"{stat}/{baseline}", figures["diff_tasks"],
                          len(cell["per_task"]), f"merged − {name}, points; {tasks_note}"))  # fmt: skip
        m = figures["mcnemar_rows"]
        out.append(
            ci_row("real_win_share_tasks", f"{stat}/{baseline}", figures["win_share_tasks"], m,
                   f"{figures['wins']} wins, {figures['losses']} losses of {m} rows against the {name} (McNemar exact, "
                   f"p < {ALPHA}); CI: tasks resampled, a row weighted by its group's tasks' multiplicities")
        )  # fmt: skip
    out.append(
        ci_row(
            "normalized_gain",
            stat,
            cell["gain"],
            cell["gain_groups"],
            f"{cell['gain_note']}; unit: merged groups with defined rows ({cell['gain_groups']})",
        )
    )
    m = cell["mcnemar_rows"]
    for name, count in (("real_wins", cell["wins"]), ("real_losses", cell["losses"])):
        word = "merged" if name == "real_wins" else "head"
        out.append(
            finding_row(name, stat, count / m if m else None, wilson(count, m) if m else (None, None), m,
                        f"{count} of {m} rows: {word} right significantly more often (McNemar exact, p < {ALPHA}); "
                        "Wilson CI; unit: (merge, task) rows" if m else "no per-image outcomes stored")
        )  # fmt: skip
    return out


# -- where validation's choice sits on each grid ---------------------------------------------------

EDGE_BAR = 0.20  # a grid whose smallest or largest value is chosen in more merges than this should extend that way


# A grid edge that is also the end of the hyperparameter's range (RegMean's α = 1): the optimum cannot lie beyond.
RANGE_END = "; the end of its range: nothing lies beyond"


def _range_end(method: str, name: str, side: str) -> float | None:
    """The closed end of the registered method's range for `name` on `side` ("low" / "high"), else None."""
    spec = MERGE_METHODS[method].ranges.get(name) if method in MERGE_METHODS else None
    if spec is None:
        return None
    low, high, brackets = spec
    return low if side == "low" and brackets[0] == "[" else high if side == "high" and brackets[1] == "]" else None


def _on_arm(record: dict, name: str) -> bool:
    """Whether a merge's choice says anything about hyperparameter `name`: always on a product grid; on a star
    (`grid_design="star"`: fewer points than the product of each hyperparameter's values) only when every other
    hyperparameter of the choice is at the grid's first point, the default (a choice on another arm holds `name` at
    its default, which says nothing of where its best value lies)."""
    grid = record["grid"]
    product = int(np.prod([len({point[n] for point in grid}) for n in grid[0]]))
    if len(grid) >= product:
        return True
    return all(record["chosen"].get(other) == value for other, value in grid[0].items() if other != name)


def _grid_text(method: str, name: str, grids: list[list[float]]) -> str:
    """How the report names a hyperparameter's grid: its values, or where they fall with k (`scaling_falls_with_k`)
    the pair's values and the law."""
    falls = MERGE_METHODS[method].scaling_falls_with_k if method in MERGE_METHODS and name == "scaling" else 0.0
    if falls and len({tuple(values) for values in grids}) > 1:
        pair = ", ".join(f"{v:g}" for v in MERGE_METHODS[method].grid["scaling"])
        return f"{pair} for a pair, × (2/k)^{falls:g} for k tasks"
    return ", ".join(f"{v:g}" for v in sorted({v for values in grids for v in values}))


def grid_edge_rows(merges: pd.DataFrame) -> list[dict]:
    """Per (method, hyperparameter with at least three values on its grid): the share of the method's tuned merges
    whose validation choice is the grid's smallest value (`grid_edge` '<method>/<name>/low') and largest ('/high').

    Each merge is judged on its own grid (a grid that falls with k has other values at each k). On a star grid a
    hyperparameter's shares are over the merges whose choice lies on its arm (`_on_arm`).
    A choice at an edge in many merges says the best value may lie beyond the grid, unless the edge is the end of the
    hyperparameter's range (`RANGE_END` in the note). A hyperparameter with two values on the grid has every choice
    at an edge; it is listed with no share (the grid is too coarse to tell)."""
    out = []
    per_merge = merges.drop_duplicates("merge_id")
    for method, mine in sorted(per_merge.groupby("method"), key=lambda item: item[0]):
        records = [selection_record(s) for s in mine["selection"]]
        records = [r for r in records if r.get("tuned") and r.get("grid") and isinstance(r.get("chosen"), dict)]
        if not records:
            continue
        names = sorted({name for r in records for point in r["grid"] for name in point})
        for name in names:
            on_arm = [r for r in records if name in r["chosen"] and _on_arm(r, name)]
            if not on_arm:
                continue
            grids = [sorted({point[name] for point in r["grid"] if name in point}) for r in on_arm]
            stat, grid = f"{method}/{name}", _grid_text(method, name, grids)
            if min(len(values) for values in grids) < 3:
                out.append(finding_row("grid_edge", f"{stat}/low", n=len(on_arm),
                                       note=f"grid {grid}: two values, every choice is an edge"))  # fmt: skip
                continue
            for side, at in (("low", 0), ("high", -1)):
                edges = [values[at] for values in grids]
                count = sum(r["chosen"][name] == edge for r, edge in zip(on_arm, edges))
                range_end = _range_end(method, name, side)
                end = RANGE_END if range_end is not None and range_end in edges else ""
                word = "smallest" if side == "low" else "largest"
                value = f" {edges[0]:g}" if len(set(edges)) == 1 else ""
                out.append(
                    finding_row("grid_edge", f"{stat}/{side}", count / len(on_arm), n=len(on_arm),
                                note=f"grid {grid}: {word} value{value} chosen in {count} of {len(on_arm)} merges{end}")
                )  # fmt: skip
    return out


# -- data-aware methods ----------------------------------------------------------------------------


def data_aware_rows(rows_in: pd.DataFrame) -> list[dict]:
    """At the largest k: each data-aware method against the best data-free method on the same merges, per task.

    The data-free method is the one with the highest mean chosen validation accuracy over the very
    (group, seed) merges the data-aware method has (AdaMerging: seed 0 only), among the data-free methods that
    merged every one of them (one swept on a subset competes only where it covers them), so both sides cover
    the same models; values are mean test accuracy over those seeds, differences in points."""
    out = []
    if rows_in.empty:
        return out
    k = int(rows_in["k"].max())
    at_k = rows_in[rows_in["k"] == k]
    free = at_k[[is_data_free(m) for m in at_k["method"]]]
    for method in sorted(m for m in at_k["method"].unique() if is_data_aware(m)):
        mine = at_k[at_k["method"] == method]
        keys = set(zip(mine["tasks"], mine["seed"]))
        same = free[[key in keys for key in zip(free["tasks"], free["seed"])]]
        coverage = same.groupby("method")["merge_id"].nunique()  # one merge per (group, seed), as choose_methods
        same = same[same["method"].isin(coverage.index[coverage == len(keys)])]  # one swept on a subset: not here
        if same.empty:
            continue
        scores = same.drop_duplicates("merge_id").groupby("method")["validation"].mean()
        best = sorted(scores.index[scores >= scores.max() - 1e-12])[0]
        theirs = same[same["method"] == best]
        seeds = sorted(int(s) for s in mine["seed"].unique())
        transductive = " (transductive: learned on these test images)" if is_transductive(method) else ""
        for task, group in mine.groupby("task"):
            other = theirs[theirs["task"] == task]
            value, reference = group["merged_accuracy"].mean(), other["merged_accuracy"].mean()
            out.append(
                finding_row(
                    "data_aware",
                    f"{method}/k={k}/{task}",
                    (value - reference) * 100,
                    n=len(group),
                    note=f"{method} {100 * value:.1f} % vs {best} {100 * reference:.1f} % (best data-free on "
                    f"validation over the same merges); single adapter {100 * group['single_accuracy'].mean():.1f} %; "
                    f"seeds {seeds}; points{transductive}",
                )
            )
        value = mine.groupby("tasks")["normalized_accuracy"].mean().mean()
        reference = theirs.groupby("tasks")["normalized_accuracy"].mean().mean()
        out.append(
            finding_row(
                "data_aware",
                f"{method}/k={k}/mean",
                (value - reference) * 100,
                n=mine["merge_id"].nunique(),
                note=f"mean retention {100 * value:.1f} % vs {best} {100 * reference:.1f} %; merges "
                f"{mine['merge_id'].nunique()}, seeds {seeds}; points{transductive}",
            )
        )
    return out
