"""Merge count: accuracy and normalized accuracy against the number of merged adapters (k), the direct
answers (largest k keeping X % of every task, largest k beating the head), each task's retention against k,
and the study's ranking of methods by k.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import analysis, charts, queries
from dashboard.filters import Filters
from dashboard.pages import common


def page(db: str, filters: Filters) -> None:
    st.header("Accuracy against the number of merged adapters")
    merges = queries.merge_results(db)
    if common.missing("merge results", "merge_results", merges):
        return
    found = queries.findings(db)
    found = found if found is not None else pd.DataFrame(columns=["finding", "statistic"])
    chosen = analysis.chosen_methods(found)
    available = sorted(merges["method"].unique())
    methods = filters.multi(
        "Methods",
        "method",
        available,
        default=analysis.default_methods(found, available, extra=("task_arithmetic",)),
        help="Starts with the methods the study chooses on validation at some k, and task arithmetic",
    )
    threshold = filters.slider(
        "Retention threshold X (%)", "x", 50, 100, 90, help="Share of each task's single-adapter accuracy to keep"
    )
    _answers(found, threshold)
    tasks = filters.multi(
        "Tasks evaluated",
        "task",
        sorted(merges["task"].unique()),
        help="Only these tasks' accuracies count; a merged group counts with the mean over them",
    )
    rows = merges[merges["method"].isin(methods) & merges["task"].isin(tasks)]
    if rows.empty:
        st.info("No merge results match the filters: select at least one method and one task.")
        return
    st.caption(
        "Line: mean over merged models (every group of k tasks and seed; a model's value is the mean over "
        "the tasks it serves). Band: ±1 standard deviation over those models; hover shows n. Star: the method "
        "the study chooses on validation at that k (where it is shown). Dotted and dashed lines: references, "
        "named in the legend."
    )
    left, right = st.columns(2)
    with left:
        curve = analysis.merge_count_curve(rows, "merged_accuracy")
        refs = {
            "single adapter (mean)": rows["single_accuracy"].mean(),
            "head baseline (mean)": rows["head_accuracy"].mean(),
        }
        common.chart(charts.merge_count_figure(curve, "accuracy", refs, chosen), curve, "merge_count_accuracy")
    with right:
        curve_norm = analysis.merge_count_curve(rows, "normalized_accuracy")
        refs = {"single adapter (= 1)": 1.0, f"threshold X = {threshold} %": threshold / 100}
        common.chart(
            charts.merge_count_figure(curve_norm, "normalized accuracy", refs, chosen),
            curve_norm,
            "merge_count_normalized",
        )
    with st.expander("Data behind the charts"):
        both = curve.merge(curve_norm, on=["method", "k"], suffixes=("_accuracy", "_normalized"))
        common.table(both)
    _per_task(rows)
    _ranking(found)


def _per_task(rows: pd.DataFrame) -> None:
    """Small multiples: each task's retention against k, so a task that breaks first shows as itself."""
    table = analysis.task_retention_curve(rows)
    if table.empty:
        return
    st.subheader("Per task: retention against k")
    st.caption(
        "One panel per task: the task's normalized accuracy (merged / its single adapter) in the merged groups "
        "that contain it, mean over groups (a group's value is its mean over seeds); error bars: 95 % t-interval "
        "over those groups, which share other tasks, so it describes the spread rather than deciding a claim (claim 1 "
        "is judged on the findings stage's group bootstrap: the ranking below, Overview). Hover shows n (groups)."
    )
    common.chart(
        charts.task_multiples_figure(table, "normalized accuracy (1 = single adapter)"), table, "retention_per_task"
    )


def _answers(found: pd.DataFrame, threshold: int) -> None:
    """The direct answers: the largest k that keeps X % of every task, and the largest k that beats the head."""
    if analysis.split_figures(found, "chosen_method").empty:
        st.info("No method chosen on validation is stored yet (the findings stage has not run on this database).")
        return
    kept = analysis.largest_k_keeping(found, threshold / 100)
    if kept is None:
        st.markdown(
            f"**No k** at which the method chosen on validation keeps at least {threshold} % of every task's "
            "single-adapter accuracy: at every k some task keeps less (`task_retention`)."
        )
    else:
        mean = kept["retention"]
        evidence = f"; mean retention {analysis.percent(*mean)}" if mean is not None else ""
        st.markdown(
            f"The largest k at which **{kept['method']}** (chosen on validation at that k) keeps at least "
            f"{threshold} % of every task's single-adapter accuracy is **k = {kept['k']}**: its worst of "
            f"{kept['tasks']} tasks, {kept['worst_task']}, keeps {100 * kept['worst']:.1f} % (`task_retention`"
            f"{evidence}, `retention_vs_k`)."
        )
    beats = analysis.largest_k_beating_head(found)
    if beats is None:
        st.markdown(
            "**No k** at which the method chosen on validation beats the head baseline: at every k the CI of "
            "merged − head accuracy reaches 0 or below, or could not be computed (`merged_minus_head`)."
        )
    else:
        st.markdown(
            f"The largest k at which **{beats['method']}** (chosen on validation at that k) beats the head "
            f"baseline is **k = {beats['k']}**: merged − head = {beats['value']:+.2f} points, CI "
            f"[{beats['ci_low']:+.2f}, {beats['ci_high']:+.2f}] above 0 (`merged_minus_head`)."
        )


def _ranking(found: pd.DataFrame) -> None:
    """The ranking table (method × k retention with CI, the chosen method marked) and the real-win share by k."""
    table = analysis.ranking_table(found)
    if len(table) == 0:
        return
    st.subheader("Retention by method and k (the study's figures)")
    st.caption(
        f"Mean normalized accuracy (merged / single adapter) over merged groups, with its CI over groups, from "
        f"the findings stage (`retention_vs_k`). {analysis.CHOSEN_MARK} and bold: the method the study chooses on "
        "validation at that k (`chosen_method`), never on test. Empty: the method did not run at that k."
    )
    marked = table.style.map(lambda v: "font-weight: bold" if str(v).endswith(analysis.CHOSEN_MARK) else "")
    common.table(marked)
    st.download_button("Download the ranking (CSV)", table.to_csv(index=False), "ranking.csv", "text/csv")
    wins = analysis.chosen_real_wins(found)
    if wins.empty:
        return
    st.subheader("Share of merges beating the head, by k")
    st.caption(
        "Share of (merge, task) rows of the method chosen at k where the merged model is right significantly more "
        "often than the head baseline on the same images (McNemar exact test), with its Wilson 95 % CI (`real_wins`)."
    )
    common.chart(
        charts.share_figure(wins, "Merges beating the head baseline (chosen method)", "share of (merge, task) rows"),
        wins,
        "real_wins_by_k",
    )
