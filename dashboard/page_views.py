"""The seven pages. Each is a function (db path, sidebar filters) that draws one page.

A page reads through `queries`, computes through `analysis`, draws through `charts`; when
its data is not in the database (an older file without the view, or an empty view) it says
so with `st.info` and returns.
"""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from benchmarks.sections import SECTIONS, Chart
from dashboard import analysis, charts, queries
from dashboard.filters import Filters
from mlvision.store import now

RUN_HINT = "`python training/run_all.py`"


def _missing(what: str, view: str, df: pd.DataFrame | None, how: str = RUN_HINT) -> bool:
    """Show why a page has nothing to draw; True when the caller should stop."""
    if df is None:
        st.info(
            f"No {what} in this database yet: it has no `{view}` view (an older or partial "
            f"results file). Run {how} with the current code to add it."
        )
        return True
    if df.empty:
        st.info(f"No {what} stored yet: the `{view}` view is empty. Run {how} to fill it.")
        return True
    return False


def _chart(fig, data: pd.DataFrame | None = None, name: str = "") -> None:
    """A plotly chart and, given its data, a CSV download of them. The toolbar's camera saves the chart as SVG
    (vector: it goes into a paper as it is; a browser or any editor turns it into PNG)."""
    image = {"format": "svg", "filename": name or "chart"}
    st.plotly_chart(fig, width="stretch", config={"displaylogo": False, "toImageButtonOptions": image})
    if data is not None and name:
        st.download_button(
            f"Download the data of this chart (CSV): {name}.csv",
            data.to_csv(index=False),
            f"{name}.csv",
            "text/csv",
            key=f"csv.{name}",
        )


def _table(df: pd.DataFrame, **kwargs) -> None:
    st.dataframe(df, width="stretch", hide_index=True, **kwargs)


# --------------------------------------------------------------------------------- 1 Overview


def overview(db: str, filters: Filters) -> None:
    st.header("Overview")
    results = queries.task_results(db)
    if _missing("trained models", "task_results", results):
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
    if not _missing("findings", "findings", found, "the merge sweep (`python training/run_all.py`)"):
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
            _table(
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
            st.json(_as_json(last["config"]))
    else:
        st.caption(
            f"This database stores no run records; latest run id in task_results: `{results['run_id'].dropna().max()}`"
        )

    st.subheader("Tasks")
    tasks = sorted(results["task"].unique())
    info = queries.task_info(db, tasks).set_index("task")
    accuracy = analysis.describe_accuracy(results).set_index("task")
    for task in tasks:
        row = info.loc[task]
        labels = list(row["label_names"])
        st.markdown(
            f"**{task}** · domain *{_text(row['domain'])}* · {len(labels)} classes  \n{_text(row['description'], '')}"
        )
        if task in accuracy.index:
            st.caption(" · ".join(f"{c}: {v}" for c, v in accuracy.loc[task].dropna().items()))
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


def _as_json(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return {"config": value}
    return value


# ----------------------------------------------------------------------------- 2 Merge count


def merge_count(db: str, filters: Filters) -> None:
    st.header("Accuracy against the number of merged adapters")
    merges = queries.merge_results(db)
    if _missing("merge results", "merge_results", merges):
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
        _chart(charts.merge_count_figure(curve, "accuracy", refs, chosen), curve, "merge_count_accuracy")
    with right:
        curve_norm = analysis.merge_count_curve(rows, "normalized_accuracy")
        refs = {"single adapter (= 1)": 1.0, f"threshold X = {threshold} %": threshold / 100}
        _chart(
            charts.merge_count_figure(curve_norm, "normalized accuracy", refs, chosen),
            curve_norm,
            "merge_count_normalized",
        )
    with st.expander("Data behind the charts"):
        both = curve.merge(curve_norm, on=["method", "k"], suffixes=("_accuracy", "_normalized"))
        _table(both)
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
    _chart(charts.task_multiples_figure(table, "normalized accuracy (1 = single adapter)"), table, "retention_per_task")


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
    _table(marked)
    st.download_button("Download the ranking (CSV)", table.to_csv(index=False), "ranking.csv", "text/csv")
    wins = analysis.chosen_real_wins(found)
    if wins.empty:
        return
    st.subheader("Share of merges beating the head, by k")
    st.caption(
        "Share of (merge, task) rows of the method chosen at k where the merged model is right significantly more "
        "often than the head baseline on the same images (McNemar exact test), with its Wilson 95 % CI (`real_wins`)."
    )
    _chart(
        charts.share_figure(wins, "Merges beating the head baseline (chosen method)", "share of (merge, task) rows"),
        wins,
        "real_wins_by_k",
    )


# --------------------------------------------------------------------------- 3 Dissimilarity


def dissimilarity(db: str, filters: Filters) -> None:
    st.header("Task similarity against merge retention")
    similarity = queries.task_similarity(db)
    merges = queries.merge_results(db)
    if _missing("task similarities", "task_similarity", similarity):
        return
    if _missing("merge results", "merge_results", merges):
        return
    pair_methods = sorted(merges.loc[merges["k"] == 2, "method"].unique())
    if not pair_methods:
        st.info("No merges of two adapters (k = 2) are stored, so no pair has a retention to compare.")
        return
    found = queries.findings(db)
    chosen = analysis.chosen_methods(found) if found is not None else {}
    method = filters.select("Merge method (pairs, k = 2)", "method", pair_methods, default=chosen.get(2))
    measures = filters.multi("Similarity measures", "measure", sorted(similarity["measure"].unique()))
    retention = analysis.pair_retention(merges, method)
    names = sorted(set(similarity["task_a"]) | set(similarity["task_b"]) | set(merges["task"]))
    points = analysis.similarity_points(
        similarity[similarity["measure"].isin(measures)], retention, queries.related_pairs(db, names)
    )
    if points.empty:
        st.info("No pair has both a similarity (for the chosen measures) and a merge retention.")
        return
    st.caption(
        "One point per pair of tasks: x = the measure (mean over seeds), y = retention = mean normalized "
        "accuracy of the pair's merged model over both tasks and seeds. **frechet is a distance** between the "
        "tasks' backbone features (higher = more dissimilar data); **adapter_cosine** and **subspace_alignment** "
        "are similarities of the adapters' updates (higher = more alike)."
    )
    study_method = analysis.study_pairs(found)["method"]
    correlations = analysis.correlation_rows(points, method, found)
    by_measure = correlations.set_index("measure")
    shown = [m for m in measures if m in by_measure.index]
    for start in range(0, len(shown), 2):
        columns = st.columns(2)
        for column, measure in zip(columns, shown[start : start + 2]):
            part = points[points["measure"] == measure]
            with column:
                stats = by_measure.loc[measure].to_dict()
                _chart(charts.similarity_figure(part, measure, stats), part, f"similarity_{measure}")
    st.subheader("Correlation with retention")
    _correlation_note(correlations, found, method, study_method)
    _table(correlations)
    _pair_matrices(retention, similarity[similarity["measure"].isin(measures)], method)
    st.subheader("Pairs related by construction against unrelated pairs")
    st.caption(
        "Related by construction: the same label space in another style (handwritten and printed digits), "
        "or the same style with other labels (printed digits and letters; clothing and animal silhouettes)."
    )
    comparison = analysis.relation_comparison(points)
    _table(comparison)
    st.caption(
        "Error bars: 95 % t-interval of the mean over the pairs of each kind. It describes these pairs only: pairs "
        "share tasks, so they are not independent draws, and no verdict rests on it."
        + _difference_note(comparison, found, method, study_method)
    )
    left, _ = st.columns(2)
    with left:
        _chart(
            charts.interval_figure(comparison, "pairs", "Retention by pair type", "retention (normalized accuracy)"),
            comparison,
            "retention_by_pair_type",
        )


def _correlation_note(correlations: pd.DataFrame, found, method: str, study_method: str | None) -> None:
    """Says where the correlation figures come from: the study's (with their units) or descriptive only."""
    if found is not None and not found.empty:
        (claim,) = [s for s in analysis.claim_statements(found) if s["claim"] == "claim2"]
        st.markdown(f"**The study's verdict on claim 2** ([Overview](?page=overview)):\n\n{claim['line']}")
    studied = correlations[correlations["source"] == analysis.STUDY_SOURCE]
    described = correlations[correlations["source"] != analysis.STUDY_SOURCE]
    if not studied.empty:
        st.caption(
            f"{', '.join(studied['measure'])}: the study's own figures from the findings view (`pair_similarity`), "
            f"because these pairs are the ones it judged ({method}, chosen on validation at k = 2). ρ over the "
            "pairs; ci_low, ci_high: 95 % CI with tasks resampled (pairs share tasks, tasks are the unit); p: "
            "permutation test over task labels. Each measure's units and counts, as stored: ci_note, p_note."
        )
    if not described.empty:
        where = (
            f"the study judged the pairs of {study_method} (chosen on validation at k = 2); select it to see its "
            "figures here"
            if study_method is not None and method != study_method
            else "the findings view holds no figure for exactly these pairs"
        )
        st.caption(
            f"{', '.join(described['measure'])}: ρ is descriptive, with no interval and no p-value ({where}). "
            "The study's verdict uses a CI that resamples tasks (pairs share tasks, so they are not independent) "
            "and a permutation test over task labels, which this page does not recompute."
        )


def _difference_note(comparison: pd.DataFrame, found, method: str, study_method: str | None) -> str:
    """The study's test of related against unrelated pairs, where the page's pairs are the study's."""
    stored = analysis.study_difference(found)
    if stored is None or study_method is None:
        return ""
    if not analysis.is_study_comparison(comparison, method, found):
        return (
            f" The study tests this difference on the pairs of {study_method} (permutation test over pair labels; "
            "Overview, `pair_similarity`)."
        )
    p = f", p = {stored['p']:.3f} ({stored['p_note']})" if pd.notna(stored["p"]) else ""
    return (
        f" The study's test of these pairs (`pair_similarity`): unrelated − related retention = "
        f"{stored['difference']:+.4f}{p}."
    )


def _pair_matrices(retention: pd.DataFrame, similarity: pd.DataFrame, method: str) -> None:
    """Task × task: the pair's merge retention beside each similarity measure, so the eye can match cells."""
    if retention.empty:
        return
    st.subheader("Task × task: pair retention beside the similarities")
    st.caption(
        f"Left: retention of each pair's merged model ({method}, k = 2; mean over both tasks and seeds). Then each "
        "measure's matrix (mean over seeds). Fréchet is a distance (higher = more dissimilar data); the others are "
        "similarities (higher = more alike)."
    )
    panels = [(f"pair retention ({method}, k = 2)", analysis.pair_matrix(retention, "retention"), "retention")]
    for measure, matrix in analysis.similarity_matrices(similarity).items():
        panels.append((measure, matrix, measure))
    for start in range(0, len(panels), 2):
        for column, (title, matrix, value_title) in zip(st.columns(2), panels[start : start + 2]):
            with column:
                scale = "Viridis_r" if value_title == "frechet" else "Viridis"  # bright = alike in every panel
                data = matrix.rename_axis("task").reset_index()
                _chart(charts.matrix_figure(matrix, title, value_title, scale), data, f"matrix_{value_title}")


# ------------------------------------------------------------------ 4 Merges vs head finetuning


def merges_vs_heads(db: str, filters: Filters) -> None:
    st.header("Merged models against head finetuning")
    merges = queries.merge_results(db)
    if merges is None or merges.empty:
        _missing("merge results", "merge_results", merges)
        results = queries.task_results(db)
        if results is not None and not results.empty:
            st.markdown("Meanwhile, each task's single adapter against its head baseline (from `task_results`):")
            _chart(
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
    table = analysis.task_comparison(merges, method, k)
    st.caption(
        "Each task's accuracy with its own adapter, with its head on the frozen backbone, and inside the merged "
        "model; mean ± sd over the groups that contain the task and seeds, all scored on the same images."
    )
    _chart(
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
    _chart(
        charts.gain_heatmap(matrix, f"Normalized gain over head baseline ({method})"),
        matrix.rename_axis("group").reset_index(),
        "normalized_gain",
    )


# --------------------------------------------------------------------------------- 5 Methods


def methods(db: str, filters: Filters) -> None:
    st.header("Merge methods")
    merges = queries.merge_results(db)
    if _missing("merge results", "merge_results", merges):
        return
    labels = {m: analysis.METRIC_LABELS[m] for m in ("normalized_accuracy", "merged_accuracy", "normalized_gain")}
    metric = filters.select("Figure", "metric", list(labels), format_func=labels.get)
    table = analysis.methods_table(merges)
    axis = f"{labels[metric]}, {analysis.METRIC_UNITS[metric]}"
    _chart(charts.methods_figure(table, metric, axis), table, "methods")
    st.caption("The axis spans the data (not 0 to 1), so differences of a few points show.")
    st.caption(
        "Means over merged models (groups × seeds); sd in the *_sd columns; hyperparameters as stored with "
        "every result."
    )
    _table(
        table,
        column_config={
            c: st.column_config.NumberColumn(format="%.3f") for c in table.columns if table[c].dtype.kind == "f"
        },
    )


# ------------------------------------------------------------------------------------ 6 Runs


def runs(db: str, filters: Filters) -> None:
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
        _table(shown)
        st.download_button("Download runs (CSV)", shown.to_csv(index=False), "runs.csv", "text/csv")
        chosen = st.selectbox("Configuration of run", shown["run_id"].tolist(), key="runs.config_run")
        if chosen:
            st.json(_as_json(shown.set_index("run_id").loc[chosen, "config"]), expanded=False)

    st.subheader("Trained models (`task_results`)")
    chosen_tasks = None
    if not _missing("trained models", "task_results", results):
        chosen_tasks = filters.multi("Task", "task", sorted(results["task"].unique()))
        kinds = filters.multi("Model kind", "kind", sorted(results["model_kind"].unique()))
        seeds = filters.multi("Seed", "seed", sorted(int(s) for s in results["seed"].unique()))
        shown = results[
            results["task"].isin(chosen_tasks) & results["model_kind"].isin(kinds) & results["seed"].isin(seeds)
        ]
        if search:
            text = shown[["run_id", "config_hash", "model_id"]].astype(str).agg(" ".join, axis=1)
            shown = shown[text.str.contains(search, case=False, regex=False)]
        st.caption(f"{len(shown)} of {len(results)} models")
        _table(shown)
        st.download_button("Download models (CSV)", shown.to_csv(index=False), "task_results.csv", "text/csv")

    st.subheader("Merge evaluations (`merge_results`)")
    if not _missing("merge results", "merge_results", merges):
        method_options = sorted(merges["method"].unique())
        chosen_methods = filters.multi("Merge method", "method", method_options)
        shown = merges[merges["method"].isin(chosen_methods)]
        if chosen_tasks is not None:
            shown = shown[shown["task"].isin(chosen_tasks)]
        st.caption(f"{len(shown)} of {len(merges)} rows")
        _table(shown.assign(hyperparams=shown["hyperparams"].astype(str)))
        st.download_button("Download merge results (CSV)", shown.to_csv(index=False), "merge_results.csv", "text/csv")


# ------------------------------------------------------------------------------- 7 Performance


def performance(db: str, filters: Filters) -> None:
    """Every registered benchmark section (benchmarks/sections/), drawn from its own chart specs."""
    st.header("Performance")
    bench = queries.benchmarks(db)
    if _missing("benchmarks", "benchmarks", bench, "`python -m training.bench` (or the bench stage of run_all)"):
        return
    devices = sorted(bench["device"].dropna().astype(str).unique())
    device = filters.select("Device", "device", devices) if devices else None
    rows = bench if device is None else bench[bench["device"].astype(str) == device]
    sized = rows["name"].isin([s.name for s in SECTIONS.values() if s.sized])
    pixels = sorted(int(v) for v in rows.loc[sized, "image_size"].dropna().unique()) if "image_size" in rows else []
    if len(pixels) > 1:  # figures at several image sizes are never drawn on one axis
        size = filters.select("Image size (px)", "px", pixels, help="input size the figures were measured at")
        rows = rows[~sized | rows["image_size"].isna() | (rows["image_size"] == size)]
    _machine_caption(rows)
    for section in SECTIONS.values():
        part = _bench_section(rows, section.name, section.title)
        if part is None:
            continue
        if section.facet:
            column, label, key = section.facet
            values = sorted(int(v) for v in part[column].dropna().unique())
            part = part[part[column] == filters.select(label, key, values, help=f"{label.lower()} of the figures")]
        if section.caption:
            st.caption(section.caption)
        for chart_row in section.charts:
            columns = st.columns(len(chart_row)) if len(chart_row) > 1 else [st.container()]
            for column, chart in zip(columns, chart_row):
                with column:
                    _chart(_bench_chart(part, chart), part, f"{section.name}_{chart.y}")
    _table(rows.assign(machine=rows["machine"].astype(str)))


def _bench_chart(rows: pd.DataFrame, chart: Chart):
    if chart.kind == "bar":
        return charts.bar_figure(rows, chart.y, chart.title)
    return charts.benchmark_figure(rows, chart.y, chart.title, x_title=chart.x_title)


def _bench_section(rows: pd.DataFrame, section: str, title: str) -> pd.DataFrame | None:
    """The heading of one benchmark section and its rows; None (after saying how to measure) when it has none."""
    st.subheader(title)
    part = rows[rows["name"] == section]
    if part.empty:
        st.info(f"No {section} figures for this device yet: run `python -m training.bench --bench-sections {section}`.")
        return None
    return part


def _machine_caption(rows: pd.DataFrame) -> None:
    """Which machine the figures come from (the newest measurement's description)."""
    latest = rows.sort_values("measured_at").iloc[-1]
    try:
        machine = json.loads(latest["machine"]) if isinstance(latest["machine"], str) else dict(latest["machine"])
    except (TypeError, ValueError):
        machine = {}
    parts = [str(machine[k]) for k in ("device_name", "cpu_model") if machine.get(k)][:1]
    if machine.get("cpu_count"):
        parts.append(f"{machine['cpu_count']} cores")
    if "threads" in rows and pd.notna(latest.get("threads")):
        parts.append(f"{int(latest['threads'])} torch threads")
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    if "image_size" in rows and pd.notna(latest.get("image_size")):
        parts.append(f"{int(latest['image_size'])} px images")
    st.caption("Measured on: " + ", ".join(parts) + f"; last measured {latest['measured_at']}")


PAGES = {
    "overview": ("Overview", overview),
    "merge_count": ("Merge count", merge_count),
    "dissimilarity": ("Dissimilarity", dissimilarity),
    "merges_vs_heads": ("Merges vs head finetuning", merges_vs_heads),
    "methods": ("Methods", methods),
    "runs": ("Runs", runs),
    "performance": ("Performance", performance),
}
