"""The numbers behind each chart: pure functions, DataFrame in, DataFrame (or dict) out.

Kept apart from plotting so tests can compare them with a direct SQL aggregate, and so a
reader sees in one place what a line, a point or a cell of a chart means.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Callable

import numpy as np
import pandas as pd

from mlvision.claims import CLAIM_STATEMENTS, VERDICT_WORDS
from mlvision.store import probe_correct_on, unpack_correct

METRIC_LABELS = {
    "merged_accuracy": "accuracy of the merged model",
    "normalized_accuracy": "normalized accuracy (merged / single adapter)",
    "normalized_gain": "normalized gain over head baseline",
    "single_accuracy": "single adapter accuracy",
    "head_accuracy": "head baseline accuracy",
}
METRIC_UNITS = {
    "merged_accuracy": "fraction of test images right",
    "normalized_accuracy": "ratio (1 = single adapter)",
    "normalized_gain": "ratio (0 = head baseline, 1 = single adapter)",
}


def _spread(values: pd.core.groupby.SeriesGroupBy) -> pd.DataFrame:
    out = values.agg(mean="mean", sd="std", n="count").reset_index()
    out["sd"] = out["sd"].fillna(0.0)
    return out


def _with_t_interval(table: pd.DataFrame) -> pd.DataFrame:
    """Adds ci_low / ci_high: a 95 % t-interval of `mean` from its `sd` and `n` (NaN below two values)."""
    from scipy import stats

    half = [
        stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 and np.isfinite(sd) else math.nan
        for n, sd in zip(table["n"], table["sd"])
    ]
    return table.assign(ci_low=table["mean"] - half, ci_high=table["mean"] + half)


def merge_count_curve(merges: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (method, k): mean, sd and n of `metric` over merged models.

    A merged model (one group of tasks, one seed) counts once: its value is the mean of the
    metric over the tasks it serves (those left after filtering); mean and sd are then taken
    over groups and seeds, which is the spread drawn as a band.
    """
    if merges.empty:
        return pd.DataFrame(columns=["method", "k", "mean", "sd", "n"])
    unit = merges.groupby(["method", "k", "tasks", "seed"])[metric].mean().rename("value")
    unit = unit.dropna().reset_index()
    return _spread(unit.groupby(["method", "k"])["value"]).sort_values(["method", "k"], ignore_index=True)


def pair_retention(merges: pd.DataFrame, method: str, metric: str = "normalized_accuracy") -> pd.DataFrame:
    """Retention of every merged pair (k = 2) of `method`: mean metric over both tasks and seeds."""
    pairs = merges[(merges["k"] == 2) & (merges["method"] == method)]
    if pairs.empty:
        return pd.DataFrame(columns=["task_a", "task_b", "retention", "n"])
    split = pairs["tasks"].str.split(",", n=1, expand=True)
    pairs = pairs.assign(task_a=split[0], task_b=split[1])
    out = pairs.groupby(["task_a", "task_b"])[metric].agg(retention="mean", n="count").reset_index()
    return out


def task_retention_curve(merges: pd.DataFrame, metric: str = "normalized_accuracy") -> pd.DataFrame:
    """One row per (task, method, k): the task's `metric` over the merged groups that contain it.

    A group (its tasks) counts once: its value is the mean over seeds. mean, sd and n are over those
    groups; ci_low / ci_high a 95 % t-interval of the mean over them (None below two groups). The groups
    of one task share other tasks, so the interval describes the spread, it is not the study's verdict."""
    columns = ["task", "method", "k", "mean", "sd", "n", "ci_low", "ci_high"]
    if merges.empty:
        return pd.DataFrame(columns=columns)
    unit = merges.groupby(["task", "method", "k", "tasks"])[metric].mean().dropna().reset_index()
    out = _with_t_interval(unit.groupby(["task", "method", "k"])[metric].agg(mean="mean", sd="std", n="count"))
    return out.reset_index()[columns].sort_values(["task", "method", "k"], ignore_index=True)


def pair_matrix(pairs: pd.DataFrame, value: str) -> pd.DataFrame:
    """Task × task matrix of a pair quantity (`value` of rows task_a, task_b), symmetric, diagonal empty."""
    names = sorted(set(pairs["task_a"]) | set(pairs["task_b"]))
    matrix = pd.DataFrame(np.nan, index=names, columns=names)
    for a, b, v in zip(pairs["task_a"], pairs["task_b"], pairs[value]):
        matrix.loc[a, b] = matrix.loc[b, a] = v
    return matrix


def similarity_matrices(similarity: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per measure: the task × task matrix of the pair's similarity, mean over seeds."""
    mean = similarity.groupby(["measure", "task_a", "task_b"])["value"].mean().reset_index()
    return {measure: pair_matrix(part, "value") for measure, part in mean.groupby("measure")}


def similarity_points(
    similarity: pd.DataFrame, retention: pd.DataFrame, relation: Callable[[str, str], str]
) -> pd.DataFrame:
    """One row per (measure, pair): similarity (mean over seeds) beside the pair's retention.

    `relation(a, b)` names the pair's designed relation (mlvision.tasks.relation_kind: the same images labelled
    another way, the same label space in another style, the same style with other labels, or "unrelated");
    `related` is any of them."""
    if similarity.empty or retention.empty:
        return pd.DataFrame(
            columns=["measure", "task_a", "task_b", "value", "retention", "pair", "relation", "related"]
        )
    mean_sim = similarity.groupby(["measure", "task_a", "task_b"])["value"].mean().reset_index()
    kept = [c for c in ("task_a", "task_b", "retention", "n") if c in retention]  # n: merge rows of the pair
    points = mean_sim.merge(retention[kept], on=["task_a", "task_b"])
    points["pair"] = points["task_a"] + " + " + points["task_b"]
    points["relation"] = [relation(a, b) for a, b in zip(points["task_a"], points["task_b"])]
    points["related"] = points["relation"] != "unrelated"
    return points.sort_values(["measure", "task_a", "task_b"], ignore_index=True)


def spearman(x, y) -> dict:
    """Spearman ρ of the points with both values, and their number n: a descriptive figure, nothing more.

    No interval and no p-value: the points are pairs of tasks, which share tasks, so neither a Fisher-z
    interval nor the usual p-value (both treat pairs as independent) has the right unit. The study's own
    figures (task-resampled CI, exact permutation p over task labels) come from the findings view:
    `study_correlation`."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": math.nan, "n": n}
    return {"rho": float(stats.spearmanr(x, y)[0]), "n": n}


_SAME = 1e-9  # the page's pair figures and the study's are the same numbers, computed twice


def study_pairs(findings: pd.DataFrame | None) -> dict:
    """The study's k = 2 pairs (claim 2): {"method": the method chosen at k = 2 or None, "retention": {"a,b": value}}
    from the 'pairs' rows ('<a>,<b>/retention')."""
    if findings is None or findings.empty:
        return {"method": None, "retention": {}}
    rows = findings[(findings["finding"] == "pairs") & findings["statistic"].str.endswith("/retention")]
    retention = {s.rsplit("/", 1)[0]: v for s, v in zip(rows["statistic"], rows["value"]) if pd.notna(v)}
    return {"method": chosen_methods(findings).get(2), "retention": retention}


def study_correlation(findings: pd.DataFrame | None, measure: str) -> dict | None:
    """The study's Spearman ρ of pair retention with `measure` ('pair_similarity' rows 'spearman/<measure>' and
    '.../p'): rho, ci_low, ci_high, p, tasks, pairs, permutations and the two notes; None when not stored or
    without a ρ."""
    if findings is None or findings.empty:
        return None
    rows = findings[findings["finding"] == "pair_similarity"].set_index("statistic")
    stat = f"spearman/{measure}"
    if stat not in rows.index or pd.isna(rows.loc[stat, "value"]):
        return None
    row = rows.loc[stat]
    p_row = rows.loc[f"{stat}/p"] if f"{stat}/p" in rows.index else None
    note = str(row["note"]) if isinstance(row["note"], str) else ""
    pairs = re.search(r"(\d+) pairs", note)
    return {
        "rho": float(row["value"]),
        "ci_low": _number(row["ci_low"]),
        "ci_high": _number(row["ci_high"]),
        "p": math.nan if p_row is None else _number(p_row["value"]),
        "tasks": None if pd.isna(row["n"]) else int(row["n"]),
        "pairs": int(pairs.group(1)) if pairs else None,
        "permutations": None if p_row is None or pd.isna(p_row["n"]) else int(p_row["n"]),
        "note": note,
        "p_note": "" if p_row is None or not isinstance(p_row["note"], str) else p_row["note"],
    }


def _number(value) -> float:
    return math.nan if value is None or pd.isna(value) else float(value)


def is_study_selection(points: pd.DataFrame, method: str, findings: pd.DataFrame | None, measure: str) -> bool:
    """Whether `points` (one measure's pairs on the page, for `method`) are exactly the pairs the study correlated
    for `measure`: the method chosen at k = 2, the same pairs with the same retention, and the same ρ. Only then
    may the page show the study's interval and p-value beside them."""
    study, stored = study_pairs(findings), study_correlation(findings, measure)
    if stored is None or study["method"] is None or method != study["method"]:
        return False
    keys = points["task_a"] + "," + points["task_b"]
    if keys.duplicated().any() or not set(keys) <= set(study["retention"]):
        return False
    if stored["pairs"] is not None and stored["pairs"] != len(points):
        return False
    if any(abs(study["retention"][key] - r) > _SAME for key, r in zip(keys, points["retention"])):
        return False
    rho = spearman(points["value"], points["retention"])["rho"]
    return bool(np.isfinite(rho) and abs(rho - stored["rho"]) <= _SAME)


STUDY_SOURCE = "the study (findings: pair_similarity)"
DESCRIPTIVE_SOURCE = "descriptive (this selection)"


def correlation_rows(points: pd.DataFrame, method: str, findings: pd.DataFrame | None) -> pd.DataFrame:
    """Per measure on the page: Spearman ρ of similarity with pair retention and n (pairs). Where the points are
    the study's (`is_study_selection`): the study's stored ρ, its task-resampled CI and its permutation p, source
    STUDY_SOURCE, with the stored notes that name their units (ci_note, p_note); elsewhere ρ alone (no CI, no p),
    source DESCRIPTIVE_SOURCE."""
    columns = ["measure", "rho", "n", "ci_low", "ci_high", "p", "source", "ci_note", "p_note"]
    out = []
    for measure, part in points.groupby("measure", sort=True):
        row = {"measure": measure, "n": len(part), "ci_low": math.nan, "ci_high": math.nan, "p": math.nan}
        if is_study_selection(part, method, findings, measure):
            stored = study_correlation(findings, measure)
            row.update({c: stored[c] for c in ("rho", "ci_low", "ci_high", "p")}, source=STUDY_SOURCE)
            row.update(ci_note=stored["note"], p_note=stored["p_note"])
        else:
            row.update(spearman(part["value"], part["retention"]), source=DESCRIPTIVE_SOURCE)
        out.append(row)
    return pd.DataFrame(out, columns=columns)


def study_difference(findings: pd.DataFrame | None) -> dict | None:
    """The study's test of related against unrelated pairs ('pair_similarity' rows 'unrelated_minus_related' and
    '.../p', its means 'related_retention' and 'unrelated_retention'); None when the difference is not stored."""
    if findings is None or findings.empty:
        return None
    rows = findings[findings["finding"] == "pair_similarity"].set_index("statistic")
    if "unrelated_minus_related" not in rows.index or pd.isna(rows.loc["unrelated_minus_related", "value"]):
        return None
    p = rows.loc["unrelated_minus_related/p"] if "unrelated_minus_related/p" in rows.index else None

    def value(stat):
        return _number(rows.loc[stat, "value"]) if stat in rows.index else math.nan

    return {
        "difference": value("unrelated_minus_related"),
        "related": value("related_retention"),
        "unrelated": value("unrelated_retention"),
        "p": math.nan if p is None else _number(p["value"]),
        "p_note": "" if p is None or not isinstance(p["note"], str) else p["note"],
    }


def is_study_comparison(comparison: pd.DataFrame, method: str, findings: pd.DataFrame | None) -> bool:
    """Whether the page's related / unrelated means (`relation_comparison`, for `method`) are the study's: the method
    chosen at k = 2 and the same two means as 'related_retention' and 'unrelated_retention'."""
    stored = study_difference(findings)
    if stored is None or method != study_pairs(findings)["method"]:
        return False
    means = dict(zip(comparison["pairs"], comparison["mean"]))
    wanted = {"related by construction": stored["related"], "unrelated": stored["unrelated"]}
    return all(name in means and abs(means[name] - value) <= _SAME for name, value in wanted.items())


def relation_comparison(points: pd.DataFrame) -> pd.DataFrame:
    """Retention of pairs related by construction against unrelated pairs (each pair once), and of each kind of
    relation the pairs have (`relation`: same images, same labels, same style): mean, sd, n and a 95 % t-interval
    over pairs (pairs share tasks, so the interval describes them; claim 2 is judged otherwise)."""
    pairs = points.drop_duplicates(["task_a", "task_b"])
    if pairs.empty:
        return pd.DataFrame(columns=["pairs", "mean", "sd", "n", "ci_low", "ci_high"])
    labels = np.where(pairs["related"], "related by construction", "unrelated")
    both = _with_t_interval(_spread(pairs.assign(pairs=labels).groupby("pairs")["retention"]))
    related = pairs[pairs["related"]]
    if "relation" not in related or related["relation"].nunique() < 2:  # one kind: the row above says it all
        return both
    kinds = related.assign(pairs=related["relation"].str.replace("_", " ") + " (related)")
    return pd.concat([both, _with_t_interval(_spread(kinds.groupby("pairs")["retention"]))], ignore_index=True)


def probe_accuracy(rows: pd.DataFrame, probes: pd.DataFrame | None) -> pd.Series:
    """Per merge row: its task's multi-layer probe accuracy on the row's very images (NaN where no probe was scored
    on them: a file from before the probes, or another evaluation subset; `mlvision.store.probe_correct_on`)."""
    packed = probe_correct_on(rows["task"], rows["n"], probes)
    return pd.Series(
        [float(unpack_correct(p, int(n)).mean()) if p is not None else float("nan") for p, n in zip(packed, rows["n"])],
        index=rows.index,
    )


def stronger_baseline(findings: pd.DataFrame) -> str | None:
    """The baseline the findings judged claim 3 against ('baseline'/'stronger' row), in words; None before v3."""
    row = findings[(findings["finding"] == "baseline") & (findings["statistic"] == "stronger")]
    if row.empty or not isinstance(row["note"].iloc[0], str):
        return None
    return {"probe": "multi-layer probe", "head": "last-layer head"}.get(row["note"].iloc[0], row["note"].iloc[0])


def task_comparison(merges: pd.DataFrame, method: str, k: int, probes: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per task: single adapter, head baseline, multi-layer probe (where stored) and merged accuracy (mean, sd, n)
    for one method and k, all on the merges' images."""
    rows = merges[(merges["method"] == method) & (merges["k"] == k)].copy()
    rows["probe_accuracy"] = probe_accuracy(rows, probes)
    columns = {
        "single_accuracy": "single adapter",
        "head_accuracy": "head baseline",
        "probe_accuracy": "multi-layer probe",
        "merged_accuracy": f"merged ({method}, k={k})",
    }
    if rows["probe_accuracy"].isna().all():
        del columns["probe_accuracy"]
    parts = []
    for column, model in columns.items():
        part = _spread(rows.groupby("task")[column])
        part.insert(1, "model", model)
        parts.append(part)
    if not parts or rows.empty:
        return pd.DataFrame(columns=["task", "model", "mean", "sd", "n"])
    return pd.concat(parts, ignore_index=True)


def gain_matrix(merges: pd.DataFrame, method: str, metric: str = "normalized_gain") -> pd.DataFrame:
    """Mean `metric` over seeds for every (group, task) of `method`; rows ordered by k then group."""
    rows = merges[merges["method"] == method]
    if rows.empty:
        return pd.DataFrame()
    matrix = rows.groupby(["k", "tasks", "task"])[metric].mean().unstack("task").sort_index()
    matrix.index = [f"k={k}: {tasks}" for k, tasks in matrix.index]
    return matrix


def pair_gain_matrix(merges: pd.DataFrame, method: str, metric: str = "normalized_gain") -> pd.DataFrame:
    """Mean `metric` over seeds of each task (rows) merged with one other task (columns) by `method`, k = 2: the
    pairs as a task x task matrix, readable where a row per pair is not (190 pairs of the twenty-task pool)."""
    rows = merges[(merges["method"] == method) & (merges["k"] == 2)]
    if rows.empty:
        return pd.DataFrame()
    partner = [next(t for t in str(group).split(",") if t != task) for group, task in zip(rows["tasks"], rows["task"])]
    matrix = rows.assign(partner=partner).groupby(["task", "partner"])[metric].mean().unstack("partner")
    names = sorted(set(matrix.index) | set(matrix.columns))
    return matrix.reindex(index=names, columns=names)


def kind_comparison(task_results: pd.DataFrame) -> pd.DataFrame:
    """Per task: head baseline against single adapter accuracy (mean, sd, n over seeds)."""
    if task_results.empty:
        return pd.DataFrame(columns=["task", "model", "mean", "sd", "n"])
    out = _spread(task_results.groupby(["task", "model_kind"])["accuracy"])
    out = out.rename(columns={"model_kind": "model"})
    out["model"] = out["model"].map({"head": "head baseline", "adapter": "single adapter"}).fillna(out["model"])
    return out


def methods_table(merges: pd.DataFrame) -> pd.DataFrame:
    """Every method at every k: counts, mean ± sd of the figures, and the hyperparameters used."""
    if merges.empty:
        return pd.DataFrame()
    unit = (
        merges.groupby(["method", "k", "tasks", "seed"])
        .agg(
            merged_accuracy=("merged_accuracy", "mean"),
            normalized_accuracy=("normalized_accuracy", "mean"),
            normalized_gain=("normalized_gain", "mean"),
        )
        .reset_index()
    )
    grouped = unit.groupby(["method", "k"])
    table = grouped.agg(
        merged_models=("tasks", "size"),
        groups=("tasks", "nunique"),
        seeds=("seed", "nunique"),
        merged_accuracy=("merged_accuracy", "mean"),
        normalized_accuracy=("normalized_accuracy", "mean"),
        normalized_accuracy_sd=("normalized_accuracy", "std"),
        normalized_gain=("normalized_gain", "mean"),
        normalized_gain_sd=("normalized_gain", "std"),
    ).reset_index()
    hyper = merges.groupby(["method", "k"])["hyperparams"].agg(
        lambda values: " | ".join(sorted({str(v) for v in values if v is not None}))
    )
    table = table.merge(hyper.reset_index(), on=["method", "k"])
    return table.sort_values(["method", "k"], ignore_index=True)


def describe_accuracy(task_results: pd.DataFrame) -> pd.DataFrame:
    """Per task: mean ± sd accuracy of head baselines and adapters, and the number of seeds."""
    if task_results.empty:
        return pd.DataFrame(columns=["task"])
    stats = task_results.groupby(["task", "model_kind"])["accuracy"].agg(["mean", "std", "count"])
    out = {}
    for (task, kind), row in stats.iterrows():
        sd = 0.0 if pd.isna(row["std"]) else row["std"]
        out.setdefault(task, {})[f"{kind} accuracy"] = f"{row['mean']:.3f} ± {sd:.3f} (n={int(row['count'])})"
    return pd.DataFrame([{"task": t, **v} for t, v in out.items()])


# The page that shows each claim's evidence (a dashboard page slug) and what to look at there.
CLAIM_EVIDENCE = {
    "claim1": ("merge_count", "Merge count: the ranking table and the per-task panels at k = 2 and 3"),
    "claim1_data_aware": ("merge_count", "Merge count: the ranking table and the per-task panels at k = 2 and 3"),
    "claim2": ("dissimilarity", "Dissimilarity: the Fréchet scatter and the task × task matrices"),
    "claim3": ("merges_vs_heads", "Merges vs heads, and the real-wins chart on Merge count"),
}


def claim_statements(findings: pd.DataFrame) -> list[dict]:
    """Per claim: its Markdown verdict line, the rule that decided it ('claim_rules' rows, None in a file written
    before they were stored) and the page with its evidence (slug, label).

    The note after the verdict word is the findings stage's own statistics or reason, so the page
    says exactly what the stage concluded and nothing more."""
    claims = findings[findings["finding"] == "claims"].set_index("statistic")
    rules = findings[findings["finding"] == "claim_rules"].set_index("statistic")["note"]
    out = []
    for claim, title in CLAIM_STATEMENTS.items():
        page, label = CLAIM_EVIDENCE[claim]
        statement = {"claim": claim, "rule": rules.get(claim), "page": page, "evidence": label}
        if claim not in claims.index:
            out.append({**statement, "line": f"- *{title}*: not judged yet (run the findings stage)"})
            continue
        row = claims.loc[claim]
        value = row["value"]
        word = "not available" if value is None or pd.isna(value) else VERDICT_WORDS.get(int(value), "?")
        note = str(row["note"]) if isinstance(row["note"], str) else ""
        detail = note.split(": ", 1)[1] if ": " in note else note
        out.append({**statement, "line": f"- *{title}*: **{word}**" + (f" ({detail})" if detail else "")})
    return out


def verdict_lines(findings: pd.DataFrame) -> list[str]:
    """One Markdown line per claim from the stored verdicts (`finding = 'claims'`: 1, 0, -1 or NULL)."""
    return [statement["line"] for statement in claim_statements(findings)]


# -- the study's own figures (the `findings` view), per (method, k) --------------------------------------


def split_figures(findings: pd.DataFrame, finding: str) -> pd.DataFrame:
    """The rows of one finding whose statistic reads '<method>/k=<k>[/<rest>]', with method, k and rest split out."""
    rows = findings[findings["finding"] == finding]
    parts = rows["statistic"].str.extract(r"^(?P<method>[^/]+)/k=(?P<k>\d+)(?:/(?P<rest>.*))?$")
    out = pd.concat([rows.reset_index(drop=True), parts.reset_index(drop=True)], axis=1).dropna(subset=["k"])
    out["k"] = out["k"].astype(int)
    return out.sort_values(["method", "k"], ignore_index=True)


def chosen_methods(findings: pd.DataFrame) -> dict[int, str]:
    """k -> the method the study chooses on validation at k ('chosen_method'; a k where none was chosen is left out)."""
    chosen = split_figures(findings, "chosen_method")
    return {int(k): m for k, m in zip(chosen["k"], chosen["method"]) if m != "none"}


def percent(value, low, high) -> str:
    if value is None or pd.isna(value):
        return ""
    ci = f" [{100 * low:.1f}, {100 * high:.1f}]" if pd.notna(low) and pd.notna(high) else " [no CI]"
    return f"{100 * value:.1f} %{ci}"


CHOSEN_MARK = "★"


def ranking_table(findings: pd.DataFrame) -> pd.DataFrame:
    """Method × k: retention (mean normalized accuracy, %) with its group CI from 'retention_vs_k'; the cell of
    the method chosen on validation at that k ends with CHOSEN_MARK."""
    retention = split_figures(findings, "retention_vs_k")
    if retention.empty:
        return pd.DataFrame(columns=["method"])
    chosen = chosen_methods(findings)
    cells = retention.assign(
        cell=[
            percent(r.value, r.ci_low, r.ci_high) + (f" {CHOSEN_MARK}" if chosen.get(r.k) == r.method else "")
            for r in retention.itertuples()
        ]
    )
    table = cells.pivot(index="method", columns="k", values="cell").fillna("")
    table.columns = [f"k={k}" for k in table.columns]
    return table.reset_index()


def largest_k_keeping(findings: pd.DataFrame, threshold: float) -> dict | None:
    """The largest k whose chosen method keeps at least `threshold` (a fraction) of every task's single-adapter
    accuracy: the lowest per-task retention ('task_retention' of that method at k) is >= threshold.

    Returns k, method, the worst task and its retention, the number of tasks, and the method's mean retention
    with its CI at k (the evidence); None when no k qualifies."""
    chosen = chosen_methods(findings)
    per_task = split_figures(findings, "task_retention")
    retention = split_figures(findings, "retention_vs_k").set_index(["method", "k"])
    for k in sorted(chosen, reverse=True):
        tasks = per_task[(per_task["method"] == chosen[k]) & (per_task["k"] == k)].dropna(subset=["value"])
        if tasks.empty or tasks["value"].min() < threshold:
            continue
        worst = tasks.loc[tasks["value"].idxmin()]
        mean = retention.loc[(chosen[k], k)] if (chosen[k], k) in retention.index else None
        return {
            "k": k,
            "method": chosen[k],
            "worst_task": worst["rest"],
            "worst": float(worst["value"]),
            "tasks": len(tasks),
            "retention": None if mean is None else (mean["value"], mean["ci_low"], mean["ci_high"]),
        }
    return None


def largest_k_beating_head(findings: pd.DataFrame) -> dict | None:
    """The largest k whose chosen method beats the head baseline: the lower end of the CI of merged − head accuracy
    ('merged_minus_head', points) is above 0. A k whose CI could not be computed does not count. None if no k."""
    chosen = chosen_methods(findings)
    diff = split_figures(findings, "merged_minus_head").set_index(["method", "k"])
    for k in sorted(chosen, reverse=True):
        if (chosen[k], k) not in diff.index:
            continue
        row = diff.loc[(chosen[k], k)]
        if pd.notna(row["ci_low"]) and row["ci_low"] > 0:
            return {
                "k": k,
                "method": chosen[k],
                "value": row["value"],
                "ci_low": row["ci_low"],
                "ci_high": row["ci_high"],
            }
    return None


def chosen_real_wins(findings: pd.DataFrame) -> pd.DataFrame:
    """Per k: the chosen method's share of (merge, task) rows that are significant wins over the head ('real_wins'),
    its Wilson CI and the number of rows."""
    chosen = chosen_methods(findings)
    wins = split_figures(findings, "real_wins")
    wins = wins[[chosen.get(k) == m for m, k in zip(wins["method"], wins["k"])]].dropna(subset=["value"])
    columns = ["k", "method", "value", "ci_low", "ci_high", "n", "note"]
    return wins[columns].rename(columns={"value": "share", "n": "rows"}).sort_values("k", ignore_index=True)


# -- runs ------------------------------------------------------------------------------------------------

STALE_RUN_HOURS = 24
INTERRUPTED = "interrupted (no finish recorded)"


def run_states(runs: pd.DataFrame, now: datetime) -> pd.Series:
    """The status to show for each stored run. A run records 'running' when it starts and 'finished' when it ends;
    one that died in between keeps 'running' forever. Such a run (no finish time) is shown as INTERRUPTED when it
    started more than STALE_RUN_HOURS before `now` (UTC, as the store records times), or when a run that started
    after it has already finished."""
    started = pd.to_datetime(runs["started_at"])
    finished = pd.to_datetime(runs["finished_at"])
    done_after = [bool(((started > s) & finished.notna()).any()) if pd.notna(s) else False for s in started]
    old = (started < pd.Timestamp(now) - pd.Timedelta(hours=STALE_RUN_HOURS)).fillna(False)
    interrupted = finished.isna() & (runs["status"] == "running") & (old | pd.Series(done_after, index=runs.index))
    return runs["status"].where(~interrupted, INTERRUPTED)


def default_methods(findings: pd.DataFrame | None, available: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    """The methods a method filter starts with: those the study chooses at some k (plus `extra`), among
    `available`; every available method when the study chose none of them (no findings yet)."""
    chosen = set(chosen_methods(findings).values()) if findings is not None and not findings.empty else set()
    picked = [m for m in available if m in chosen]
    return picked + [m for m in available if m in extra and m not in picked] if picked else list(available)


def blank_gains(merges: pd.DataFrame, method: str) -> tuple[int, int, str]:
    """(rows of `method` without a normalized gain, its rows, the store's reason from `gain_note`)."""
    rows = merges[merges["method"] == method]
    blank = rows["normalized_gain"].isna()
    notes = rows.loc[blank, "gain_note"].dropna() if "gain_note" in rows else pd.Series(dtype=str)
    return int(blank.sum()), len(rows), (notes.iloc[0] if len(notes) else "")


def plan_tradeoff(plans: pd.DataFrame) -> pd.DataFrame:
    """Per allowed number of backbones (one method's trade-off plans): the backbones the best plan uses, its worst
    predicted and worst measured task retention (NaN where a planned group was not measured) and the tasks it
    merges into shared backbones."""
    curve = plans[plans["kind"] == "tradeoff"]
    out = curve.groupby("max_backbones", as_index=False).agg(
        backbones=("backbones", "first"),
        worst_predicted=("predicted", "min"),
        worst_measured=("measured", lambda m: m.min() if m.notna().all() else np.nan),
        mean_measured=("measured", "mean"),
    )
    return out.sort_values("max_backbones").reset_index(drop=True)


def plan_table(plans: pd.DataFrame, target: float) -> pd.DataFrame:
    """One method's plan at `target`: a row per task with its backbone, group, predicted and measured retention and
    whether the measured one meets the target (None where not measured)."""
    plan = plans[(plans["kind"] == "target") & np.isclose(plans["target"], target)]
    table = plan[["group_index", "group_tasks", "task", "predicted", "measured", "measured_from", "measured_seeds"]]
    table = table.rename(columns={"group_index": "backbone", "group_tasks": "group"})
    meets = [None if pd.isna(m) else bool(m >= target - 1e-12) for m in table["measured"]]
    return table.assign(meets_target=meets).sort_values(["backbone", "task"]).reset_index(drop=True)
