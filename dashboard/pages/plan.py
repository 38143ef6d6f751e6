"""Merge plan: which tasks share a merged backbone (merging/plan.py, run_all's `plan` stage), each task's predicted
retention beside the measured one, and the trade-off "backbones vs worst-task retention".
"""

from __future__ import annotations

import streamlit as st

from dashboard import analysis, charts, queries
from dashboard.filters import Filters
from dashboard.pages import common

HOW = "`python training/run_all.py --stages plan`"


def page(db: str, filters: Filters) -> None:
    st.header("Merge plan")
    plans = queries.merge_plans(db)
    if common.missing("merge plans", "merge_plans", plans, HOW):
        return
    method = filters.select("Method planned for", "method", sorted(plans["method"].unique()))
    mine = plans[plans["method"] == method]
    targets = sorted(mine.loc[mine["kind"] == "target", "target"].dropna().unique())
    target = filters.select("Every task keeps", "keep", targets, format_func=lambda t: f"{t:.0%}")
    st.caption(
        "Retention = a task's accuracy in its merged backbone / its own adapter's, on the same test images. The "
        f"planner predicts it from the pairs' merges (predictor: {mine['predictor'].iloc[0]}; "
        "reports/planner_validation.md scores it on held-out groups), then searches partitions of the tasks into "
        "the fewest backbones that keep the target; measured = the planned group's merge (mean over seeds)."
    )
    if target is not None:
        table = analysis.plan_table(mine, target)
        backbones, missed = table["backbone"].nunique(), table[table["meets_target"] == False]  # noqa: E712
        measured = table["measured"].dropna()
        st.markdown(
            f"**{backbones} backbone(s) for {len(table)} tasks** keep {target:.0%} by prediction (worst task "
            f"{table['predicted'].min():.1%}); measured worst task "
            + (f"{measured.min():.1%}" if len(measured) == len(table) else "not measured for every task")
            + (f"; **below the target when measured:** {', '.join(missed['task'])}" if len(missed) else "")
            + "."
        )
        common.table(
            table,
            column_config={c: st.column_config.NumberColumn(format="%.3f") for c in ("predicted", "measured")},
        )
    curve = analysis.plan_tradeoff(mine)
    if not curve.empty:
        common.chart(charts.tradeoff_figure(curve, method), curve, "plan_tradeoff")
        st.caption(
            "Each point is the plan with the highest predicted worst-task retention using at most that many "
            "backbones; the measured line is where its groups' merges were scored (a gap below the dotted line "
            "is the prediction's error)."
        )
