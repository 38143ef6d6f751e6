"""The numbers behind each chart: pure functions, DataFrame in, DataFrame (or dict) out.

Kept apart from plotting so tests can compare them with a direct SQL aggregate, and so a
reader sees in one place what a line, a point or a cell of a chart means.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

METRIC_LABELS = {
    "merged_accuracy": "accuracy of the merged model",
    "normalized_accuracy": "normalized accuracy (merged / single adapter)",
    "normalized_gain": "normalized gain over head baseline",
    "single_accuracy": "single adapter accuracy",
    "head_accuracy": "head baseline accuracy",
}


def _spread(values: pd.core.groupby.SeriesGroupBy) -> pd.DataFrame:
    out = values.agg(mean="mean", sd="std", n="count").reset_index()
    out["sd"] = out["sd"].fillna(0.0)
    return out


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


def similarity_points(
    similarity: pd.DataFrame, retention: pd.DataFrame, related: Callable[[str, str], bool]
) -> pd.DataFrame:
    """One row per (measure, pair): similarity (mean over seeds) beside the pair's retention.

    `related(a, b)` says whether the pair is related by construction (the same label space in another
    style, or the same style with other labels: mlvision.tasks.related)."""
    if similarity.empty or retention.empty:
        return pd.DataFrame(columns=["measure", "task_a", "task_b", "value", "retention", "pair", "related"])
    mean_sim = similarity.groupby(["measure", "task_a", "task_b"])["value"].mean().reset_index()
    points = mean_sim.merge(retention[["task_a", "task_b", "retention"]], on=["task_a", "task_b"])
    points["pair"] = points["task_a"] + " + " + points["task_b"]
    points["related"] = [bool(related(a, b)) for a, b in zip(points["task_a"], points["task_b"])]
    return points.sort_values(["measure", "task_a", "task_b"], ignore_index=True)


def spearman(x, y) -> dict:
    """Spearman ρ with a 95% CI (Fisher z, needs n > 3), its p-value and n."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = len(x)
    result = {"rho": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan, "n": n}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    rho, p = stats.spearmanr(x, y)
    result.update(rho=float(rho), p=float(p))
    if n > 3 and abs(rho) < 1:
        z, half = math.atanh(rho), 1.96 / math.sqrt(n - 3)
        result.update(ci_low=math.tanh(z - half), ci_high=math.tanh(z + half))
    return result


def relation_comparison(points: pd.DataFrame) -> pd.DataFrame:
    """Retention of pairs related by construction against unrelated pairs (each pair once)."""
    pairs = points.drop_duplicates(["task_a", "task_b"])
    if pairs.empty:
        return pd.DataFrame(columns=["pairs", "mean", "sd", "n"])
    labels = np.where(pairs["related"], "related by construction", "unrelated")
    return _spread(pairs.assign(pairs=labels).groupby("pairs")["retention"])


def task_comparison(merges: pd.DataFrame, method: str, k: int) -> pd.DataFrame:
    """Per task: single adapter, head baseline and merged accuracy (mean, sd, n) for one method and k."""
    rows = merges[(merges["method"] == method) & (merges["k"] == k)]
    columns = {
        "single_accuracy": "single adapter",
        "head_accuracy": "head baseline",
        "merged_accuracy": f"merged ({method}, k={k})",
    }
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


CLAIM_TITLES = {
    "claim1": "Merging up to three adapters works",
    "claim2": "Adapters trained on dissimilar data merge better",
    "claim3": "Merges sometimes beat head finetuning",
}
VERDICT_WORDS = {1: "supported", 0: "inconclusive", -1: "contradicted"}


def verdict_lines(findings: pd.DataFrame) -> list[str]:
    """One Markdown line per claim from the stored verdicts (`finding = 'claims'`: 1, 0, -1 or NULL).

    The note after the verdict word is the findings stage's own statistics or reason, so the page
    says exactly what the stage concluded and nothing more."""
    claims = findings[findings["finding"] == "claims"].set_index("statistic")
    lines = []
    for claim, title in CLAIM_TITLES.items():
        if claim not in claims.index:
            lines.append(f"- *{title}*: not judged yet (run the findings stage)")
            continue
        row = claims.loc[claim]
        value = row["value"]
        word = "not available" if value is None or pd.isna(value) else VERDICT_WORDS.get(int(value), "?")
        note = str(row["note"]) if isinstance(row["note"], str) else ""
        detail = note.split(": ", 1)[1] if ": " in note else note
        lines.append(f"- *{title}*: **{word}**" + (f" ({detail})" if detail else ""))
    return lines
