"""Runs: the pipeline's run records, the trained models (`task_results`) and the merge evaluations
(`merge_results`), searchable and downloadable.
"""

from __future__ import annotations

import streamlit as st

from dashboard import analysis, queries
from dashboard.filters import Filters
from dashboard.pages import common
from mlvision.store import now


def page(db: str, filters: Filters) -> None:
    st.header("Runs and stored results")
    runs_df = queries.runs(db)
    results = queries.task_results(db)
    merges = queries.merge_results(db)
    search = filters.text("Search (run id, command, config)", "q")

    st.subheader("Pipeline runs")
    if runs_df is None or runs_df.empty:
        st.info("This database stores no run records (no `runs` table, or it is empty).")
    else:
        shown = runs_df.assign(
            status=analysis.run_states(runs_df, now()),
            config=runs_df["config"].astype(str),
            machine=runs_df["machine"].astype(str),
        )
        st.caption(
            "A run records 'running' when it starts and 'finished' when it ends; a run whose process died keeps "
            f"'running'. A run with no finish time is shown as '{analysis.INTERRUPTED}' when it started more "
            f"than {analysis.STALE_RUN_HOURS} h ago, or when a run started after it has already finished."
        )
        if search:
            text = shown[["run_id", "command", "config"]].astype(str).agg(" ".join, axis=1)
            shown = shown[text.str.contains(search, case=False, regex=False)]
        common.table(shown)
        st.download_button("Download runs (CSV)", shown.to_csv(index=False), "runs.csv", "text/csv")
        chosen = st.selectbox("Configuration of run", shown["run_id"].tolist(), key="runs.config_run")
        if chosen:
            st.json(common.as_json(shown.set_index("run_id").loc[chosen, "config"]), expanded=False)

    st.subheader("Trained models (`task_results`)")
    chosen_tasks = None
    if not common.missing("trained models", "task_results", results):
        chosen_tasks = filters.multi("Task", "task", sorted(results["task"].unique()))
        kinds = filters.multi("Model kind", "kind", sorted(results["model_kind"].unique()))
        # a multi-layer probe has no seed (its fit is convex: one per task); it is shown with every seed choice
        seeds = filters.multi("Seed", "seed", sorted(int(s) for s in results["seed"].dropna().unique()))
        seed_ok = results["seed"].isin(seeds) | results["seed"].isna()
        shown = results[results["task"].isin(chosen_tasks) & results["model_kind"].isin(kinds) & seed_ok]
        if search:
            text = shown[["run_id", "config_hash", "model_id"]].astype(str).agg(" ".join, axis=1)
            shown = shown[text.str.contains(search, case=False, regex=False)]
        st.caption(f"{len(shown)} of {len(results)} models")
        common.table(shown)
        st.download_button("Download models (CSV)", shown.to_csv(index=False), "task_results.csv", "text/csv")

    st.subheader("Merge evaluations (`merge_results`)")
    if not common.missing("merge results", "merge_results", merges):
        method_options = sorted(merges["method"].unique())
        chosen_methods = filters.multi("Merge method", "method", method_options)
        shown = merges[merges["method"].isin(chosen_methods)]
        if chosen_tasks is not None:
            shown = shown[shown["task"].isin(chosen_tasks)]
        st.caption(f"{len(shown)} of {len(merges)} rows")
        common.table(shown.assign(hyperparams=shown["hyperparams"].astype(str)))
        st.download_button("Download merge results (CSV)", shown.to_csv(index=False), "merge_results.csv", "text/csv")
