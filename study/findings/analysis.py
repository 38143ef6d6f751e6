"""The whole analysis in named steps: which tasks are kept, the method chosen per k, the cells' figures, the
pair figures, the claims' verdicts, and the sensitivity table (every verdict recomputed leaving each task out).

`compute_rows` is what the findings stage stores: one list of `findings` rows, in the order the report reads them.
"""

from __future__ import annotations

import itertools
import json

import pandas as pd

from mlvision.claims import VERDICT_WORDS
from study.findings.claims import CLAIMS, Evidence, stronger_baseline
from study.findings.exclusion import task_rows, task_table
from study.findings.figures import (
    cell_rows,
    cells_of,
    choose_by_family,
    choose_methods,
    data_aware_rows,
    grid_edge_rows,
    validation_rows,
)
from study.findings.inputs import StudyInputs
from study.findings.pairs import pair_figures, pair_kind, pair_rows
from study.findings.rows import finding_row


def _left_out(inputs: StudyInputs, task: str | None = None, kind: str | None = None):
    """Whether a group (its tasks) is left out of a sensitivity run: it contains `task`, or holds a pair of tasks of
    relation kind `kind` (`pairs.pair_kind`); None leaves nothing out on that account."""
    return lambda group: (
        (task is not None and task in group) or (kind is not None and kind in _group_kinds(group, inputs))
    )


def _without(merges: pd.DataFrame, left_out) -> pd.DataFrame:
    """`merges` without the groups `left_out` (a `_left_out` predicate) names; one test per distinct group."""
    dropped = {group for group in set(merges["group_tasks"]) if left_out(group)}
    return merges.loc[~merges["group_tasks"].isin(dropped)] if dropped else merges


def _group_kinds(group, inputs: StudyInputs) -> set[str]:
    """The relation kinds of the related pairs in `group` (`pairs.pair_kind`)."""
    return {pair_kind(a, b, inputs) for a, b in itertools.combinations(sorted(group), 2)} - {"unrelated"}


def probe_rows(probes: pd.DataFrame, tasks) -> list[dict]:
    """Each task's multi-layer probe test accuracy (`task` rows '<task>/probe_accuracy'), where one was trained."""
    if probes.empty:
        return []
    by_task = probes.drop_duplicates("task").set_index("task")
    return [
        finding_row(
            "task",
            f"{task}/probe_accuracy",
            by_task.loc[task, "accuracy"],
            n=by_task.loc[task, "n_test"],
            note=f"multi-layer probe, C = {json.loads(by_task.loc[task, 'config'])['chosen']['C']:g} "
            "chosen on validation",
        )  # fmt: skip
        for task in tasks
        if task in by_task.index
    ]


def family_rows(by_family: dict) -> list[dict]:
    """The `chosen_method_family` rows: per family and k, the method chosen on validation among that family's."""
    return [
        finding_row("chosen_method_family", f"{family}/{c['method']}/k={k}", c["value"], n=c["n"], note=c["note"])
        for family, chosen in by_family.items()
        for k, c in sorted(chosen.items())
        if c["method"] is not None
    ]


def judge_claims(evidence: Evidence, included: list[str]) -> dict[str, tuple[int | None, str]]:
    """claim name -> (verdict or None, reason); no verdict at all where every task is excluded."""
    if not included:
        return {claim.name: (None, "every task is excluded by rule") for claim in CLAIMS}
    return {claim.name: claim.judge(evidence) for claim in CLAIMS}


def verdict_rows(verdicts: dict, finding: str, suffix: str, n: int) -> list[dict]:
    """One row per claim: the verdict as its value (NULL when not available), its word and reason as the note."""
    return [
        finding_row(
            finding, claim + suffix, verdict, n=n, note=f"{VERDICT_WORDS.get(verdict, 'not available')}: {reason}"
        )
        for claim, (verdict, reason) in verdicts.items()
    ]


def analyse(
    inputs: StudyInputs, leave_out: str | None = None, full: bool = True, leave_out_kind: str | None = None
) -> tuple[list[dict], dict]:
    """(findings rows, verdicts) for the study; `leave_out` drops every group and pair containing that task,
    `leave_out_kind` every group and pair holding two tasks of that relation kind (`mlvision.tasks.relation_kind`).

    verdicts: claim -> (verdict or None, reason). With full=False only what the verdicts need is computed
    (the sensitivity table runs it once per task), and the rows are those of the claims.
    """
    tasks_info = task_table(inputs.task_results, inputs.merges, inputs.tasks, inputs.rules)
    merges = _without(inputs.merges, _left_out(inputs, leave_out, leave_out_kind))
    included = [t for t in inputs.tasks if not tasks_info.loc[t, "excluded"] and t != leave_out]
    rows_in = merges[merges["task"].isin(included)]
    chosen, by_family = choose_methods(merges), choose_by_family(merges)
    cells = cells_of(rows_in, [chosen, *by_family.values()], full)
    pair = pair_figures(inputs, rows_in, chosen.get(2, {}).get("method"), included, full)
    baseline = stronger_baseline(rows_in) if not rows_in.empty else "head"
    verdicts = judge_claims(Evidence(chosen, cells, pair, by_family, baseline), included)
    out: list[dict] = []
    if full:
        out += task_rows(tasks_info)
        out += probe_rows(inputs.probes, inputs.tasks)
        out += validation_rows(merges, chosen)
        out += family_rows(by_family)
        out += grid_edge_rows(rows_in)
        out.append(finding_row("baseline", "stronger", n=len(included), note=baseline))
        for cell in cells.values():
            out += cell_rows(cell)
        out += pair_rows(pair)
        out += data_aware_rows(rows_in)
        out += [finding_row("claim_rules", claim.name, note=claim.rule) for claim in CLAIMS]  # readers show it too
    out += verdict_rows(verdicts, "claims", "", len(included))
    return out, verdicts


def sensitivity(inputs: StudyInputs, verdicts: dict) -> list[dict]:
    """Every verdict recomputed leaving out each kept task in turn (its groups and pairs dropped), then each relation
    kind in turn (every group holding a pair of that kind dropped)."""
    tasks = task_table(inputs.task_results, inputs.merges, inputs.tasks, inputs.rules)
    kept = [t for t in inputs.tasks if not tasks.loc[t, "excluded"]]
    out = _task_sensitivity(inputs, verdicts, kept)
    kinds = sorted(set().union(*(_group_kinds((a, b), inputs) for a, b in itertools.combinations(kept, 2))))
    for kind in kinds:
        _, without = analyse(inputs, full=False, leave_out_kind=kind)
        groups_left = _without(inputs.merges, _left_out(inputs, kind=kind))["group_tasks"].nunique()
        out += verdict_rows(without, "sensitivity", f"/without_kind={kind}", groups_left)
    return out


def _task_sensitivity(inputs: StudyInputs, verdicts: dict, kept: list[str]) -> list[dict]:
    """The leave-one-task-out rows, and per claim whether one task's removal changes its verdict."""
    out, changed = [], {claim: [] for claim in verdicts}
    for task in kept:
        _, without = analyse(inputs, leave_out=task, full=False)
        out += verdict_rows(without, "sensitivity", f"/without={task}", len(kept) - 1)
        for claim, (verdict, _) in without.items():
            if verdict != verdicts[claim][0]:
                changed[claim].append(task)
    for claim, flips in changed.items():
        note = (
            f"the verdict changes when {', '.join(flips)} is left out"
            if flips
            else "no single task's removal changes the verdict"
            if kept
            else "no kept tasks"
        )
        out.append(
            finding_row(
                "sensitivity", f"{claim}/single_task_dependence", len(flips) if kept else None, n=len(kept), note=note
            )
        )
    return out


def compute_rows(inputs: StudyInputs) -> list[dict]:
    """Every findings row: figures, pair table, claims and the sensitivity table."""
    rows, verdicts = analyse(inputs)
    return rows + sensitivity(inputs, verdicts)
