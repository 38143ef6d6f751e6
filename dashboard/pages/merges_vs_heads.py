"""Merges vs head finetuning: each task's accuracy with its own adapter, with a head on the frozen
backbone and inside the merged model, and the normalized gain over the head per merged group.
"""

from __future__ import annotations

import streamlit as st

from dashboard import analysis, charts, queries
from dashboard.filters import Filters
from dashboard.pages import common

# Above this many pairs the gain heatmap shows the pairs as a task x task matrix, not a row each.
MAX_PAIR_ROWS = 30


def page(db: str, filters: Filters) -> None:
    st.header("Merged models against head finetuning")
    merges = queries.merge_results(db)
    if merges is None or merges.empty:
        common.missing("merge results", "merge_results", merges)
        results = queries.task_results(db)
        if results is not None and not results.empty:
            st.markdown("Meanwhile, each task's single adapter against its head baseline (from `task_results`):")
            common.chart(
                charts.grouped_bar_figure(
                    analysis.kind_comparison(results), "Single adapter against head baseline", "test accuracy"
                )
            )
        return
    found = queries.findings(db)
    chosen = analysis.chosen_methods(found) if found is not None else {}
    method = filters.select("Merge method", "method", sorted(merges["method"].unique()), default=chosen.get(2))
    ks = sorted(int(k) for k in merges.loc[merges["method"] == method, "k"].unique())
    k = filters.select("Adapters merged (k)", "k", ks, default=2)
    table = analysis.task_comparison(merges, method, k, queries.probe_results(db))
    stronger = analysis.stronger_baseline(found) if found is not None else None
    st.caption(
        "Each task's accuracy with its own adapter, with a head on the frozen backbone's last layer, with the "
        "multi-layer linear probe (every stage of the frozen backbone, one pass; where trained) and inside the merged "
        "model; mean ± sd over the groups that contain the task and seeds, all scored on the same images."
        + (f" Claim 3 is judged against the {stronger}, the stronger baseline here; the other is shown beside it."
           if stronger else "")
    )  # fmt: skip
    common.chart(
        charts.grouped_bar_figure(
            table, f"Per task: single adapter, head baseline, merged ({method}, k={k})", "test accuracy"
        ),
        table,
        "per_task_accuracy",
    )
    matrix = analysis.gain_matrix(merges, method)
    blank, total, note = analysis.blank_gains(merges, method)
    why = (
        f" Blank cells: the gain is undefined for {blank} of {total} rows of {method}, where the task's single "
        f'adapter and its head baseline differ by less than 2 points (`gain_note`: "{note or "no note stored"}"); '
        "a cell is blank when every seed's row is."
        if blank
        else ""
    )
    st.caption(
        "Normalized gain over the head baseline: 1 = as good as the task's own adapter, 0 = as good as the "
        "frozen backbone with a head, below 0 = worse than the head (mean over seeds)." + why
    )
    pairs = merges[(merges["method"] == method) & (merges["k"] == 2)]["tasks"].nunique()
    if pairs > MAX_PAIR_ROWS:  # a row per pair is unreadable (190 pairs of the twenty-task pool): a task x task matrix
        pair_matrix = analysis.pair_gain_matrix(merges, method)
        common.chart(
            charts.gain_heatmap(
                pair_matrix, f"Normalized gain over head baseline ({method}, k = 2)", "merged with", "task evaluated"
            ),
            pair_matrix.rename_axis("task").reset_index(),
            "normalized_gain_pairs",
        )
        matrix = matrix[~matrix.index.str.startswith("k=2:")]
    if not matrix.empty:
        common.chart(
            charts.gain_heatmap(matrix, f"Normalized gain over head baseline ({method})"),
            matrix.rename_axis("group").reset_index(),
            "normalized_gain",
        )
