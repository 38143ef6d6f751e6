"""Overview: what is stored (tasks, adapters, heads, merged models, seeds, runs), the study's verdict on each claim
with its rule and a link to its evidence, the last run, and each task with sample images.
"""

from __future__ import annotations

import contextlib

import pandas as pd
import streamlit as st

from dashboard import analysis, queries
from dashboard.filters import Filters
from dashboard.pages import common
from mlvision.store import now

# More tasks than this (the twenty-task pool) and each task is one folded line, its images a click away.
UNFOLDED_TASKS = 8


def page(db: str, filters: Filters) -> None:
    st.header("Overview")
    results = queries.task_results(db)
    if common.missing("trained models", "task_results", results):
        return
    merges = queries.merge_results(db)
    n_merges = "not stored yet" if merges is None else f"{merges['merge_id'].nunique():,}"
    columns = st.columns(6)
    columns[0].metric("Tasks", results["task"].nunique())
    columns[1].metric("Adapters", int((results["model_kind"] == "adapter").sum()))
    columns[2].metric("Head baselines", int((results["model_kind"] == "head").sum()))
    columns[3].metric("Merged models", n_merges)
    columns[4].metric("Seeds", results["seed"].nunique())
    columns[5].metric("Runs", results["run_id"].nunique())
    st.markdown("**Backbone:** " + ", ".join(f"`{b}`" for b in sorted(results["backbone"].dropna().unique())))

    st.subheader("The paper's claims: verdicts of this study")
    found = queries.findings(db)
    if not common.missing("findings", "findings", found, "the merge sweep (`python training/run_all.py`)"):
        for statement in analysis.claim_statements(found):
            rule = statement["rule"] or "stated in reports/findings.md (this file predates stored rules)"
            st.markdown(
                f"{statement['line']}  \n  *Rule:* {rule}.  \n  *Evidence:* "
                f"[{statement['evidence']}](?page={statement['page']})"
            )
        st.caption(
            "Each verdict follows its rule, which can come out either way; 'inconclusive' means the data cannot "
            "decide. Every figure here comes from the findings stage (the table below)."
        )
        with st.expander("Every figure of the findings stage"):
            shown = found[["finding", "statistic", "value", "ci_low", "ci_high", "n", "note"]]
            common.table(
                shown,
                column_config={c: st.column_config.NumberColumn(format="%.3f") for c in ("value", "ci_low", "ci_high")},
            )

    st.subheader("Last run")
    runs = queries.runs(db)
    if runs is not None and not runs.empty:
        last = runs.assign(status=analysis.run_states(runs, now())).iloc[0]
        st.markdown(
            f"`{last['run_id']}`: **{_text(last['status'])}**, started {_text(last['started_at'])}, "
            f"finished {_text(last['finished_at'])}  \ncommand: `{_text(last['command'])}`"
        )
        with st.expander("Configuration of the last run"):
            st.json(common.as_json(last["config"]))
    else:
        st.caption(
            f"This database stores no run records; latest run id in task_results: `{results['run_id'].dropna().max()}`"
        )

    st.subheader("Tasks")
    tasks = sorted(results["task"].unique())
    info = queries.task_info(db, tasks).set_index("task")
    accuracy = analysis.describe_accuracy(results).set_index("task")
    folded = len(tasks) > UNFOLDED_TASKS  # the twenty-task pool: one line each, its images a click away
    for task in tasks:
        row = info.loc[task]
        labels = list(row["label_names"])
        heading = f"**{task}** · domain *{_text(row['domain'])}* · {len(labels)} classes"
        figures = (
            " · ".join(f"{c}: {v}" for c, v in accuracy.loc[task].dropna().items()) if task in accuracy.index else ""
        )
        with st.expander(f"{heading} · {figures}" if figures else heading) if folded else contextlib.nullcontext():
            _task_details(task, heading, labels, _text(row["description"], ""), figures, folded)


def _task_details(task: str, heading: str, labels: list, description: str, figures: str, folded: bool) -> None:
    """A task's description, its adapter and head accuracy, and one sample image per class (at most ten)."""
    st.markdown(description if folded else f"{heading}  \n{description}")
    if figures and not folded:
        st.caption(figures)
    try:
        images = queries.sample_images(task)
    except Exception as error:  # a broken cache must not break the page
        images, note = None, f"sample images unavailable ({error})"
    else:
        note = "sample images: the task is not prepared in the local cache on this machine"
    if images:
        st.image([image for image, _ in images], caption=[label for _, label in images], width=72)
    else:
        st.caption(note + "; labels: " + ", ".join(labels))


def _text(value, missing: str = "—") -> str:
    return missing if value is None or (not isinstance(value, (list, dict)) and pd.isna(value)) else str(value)
