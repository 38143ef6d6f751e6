"""Methods: the merge methods side by side (normalized or merged accuracy, normalized gain) with their
stored hyperparameters.
"""

from __future__ import annotations

import streamlit as st

from dashboard import analysis, charts, queries
from dashboard.filters import Filters
from dashboard.pages import common


def page(db: str, filters: Filters) -> None:
    st.header("Merge methods")
    merges = queries.merge_results(db)
    if common.missing("merge results", "merge_results", merges):
        return
    labels = {m: analysis.METRIC_LABELS[m] for m in ("normalized_accuracy", "merged_accuracy", "normalized_gain")}
    metric = filters.select("Figure", "metric", list(labels), format_func=labels.get)
    table = analysis.methods_table(merges)
    axis = f"{labels[metric]}, {analysis.METRIC_UNITS[metric]}"
    common.chart(charts.methods_figure(table, metric, axis), table, "methods")
    st.caption("The axis spans the data (not 0 to 1), so differences of a few points show.")
    st.caption(
        "Means over merged models (groups × seeds); sd in the *_sd columns; hyperparameters as stored with "
        "every result."
    )
    common.table(
        table,
        column_config={
            c: st.column_config.NumberColumn(format="%.3f") for c in table.columns if table[c].dtype.kind == "f"
        },
    )
