"""Dissimilarity: task similarity measures against the retention of each pair's merged model (k = 2),
their correlations (the study's figures where its pairs are shown), task x task matrices, and pairs
related by construction against unrelated pairs.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import analysis, charts, queries
from dashboard.filters import Filters
from dashboard.pages import common


def page(db: str, filters: Filters) -> None:
    st.header("Task similarity against merge retention")
    similarity = queries.task_similarity(db)
    merges = queries.merge_results(db)
    if common.missing("task similarities", "task_similarity", similarity):
        return
    if common.missing("merge results", "merge_results", merges):
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
        similarity[similarity["measure"].isin(measures)], retention, queries.pair_relations(db, names)
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
                common.chart(charts.similarity_figure(part, measure, stats), part, f"similarity_{measure}")
    st.subheader("Correlation with retention")
    _correlation_note(correlations, found, method, study_method)
    common.table(correlations)
    _pair_matrices(retention, similarity[similarity["measure"].isin(measures)], method)
    st.subheader("Pairs related by construction against unrelated pairs")
    st.caption(
        "Related by construction: the very same images labelled another way (a spoken digit's value and its "
        "language), the same label space in another style (handwritten and printed digits), or the same style "
        "with other labels (printed digits and letters; clothing and animal silhouettes). Where the pairs have "
        "more than one kind, each kind has its own row (a pair counts under its strongest relation)."
    )
    comparison = analysis.relation_comparison(points)
    common.table(comparison)
    st.caption(
        "Error bars: 95 % t-interval of the mean over the pairs of each kind. It describes these pairs only: pairs "
        "share tasks, so they are not independent draws, and no verdict rests on it."
        + _difference_note(comparison, found, method, study_method)
    )
    left, _ = st.columns(2)
    with left:
        common.chart(
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
    # two matrices a row while their cells hold a readable number; one a row, full width, for larger pools
    per_row = 2 if max(len(m) for _, m, _ in panels) <= charts.MATRIX_TEXT_TASKS else 1
    for start in range(0, len(panels), per_row):
        for column, (title, matrix, value_title) in zip(st.columns(per_row), panels[start : start + per_row]):
            with column:
                scale = "Viridis_r" if value_title == "frechet" else "Viridis"  # bright = alike in every panel
                data = matrix.rename_axis("task").reset_index()
                common.chart(charts.matrix_figure(matrix, title, value_title, scale), data, f"matrix_{value_title}")
