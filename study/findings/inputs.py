"""What the findings are computed from: the study's stored rows as plain DataFrames, merges prepared once.

`StudyInputs` is all the analysis reads (tests build it by hand); `prepare_merges` adds to each (merge, task)
row what every figure needs: the chosen validation accuracy, merged − head in points, and McNemar's outcome.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlvision.store import probe_correct_on, unpack_correct
from mlvision.tasks import related, relation_kind
from study.findings.exclusion import ExclusionRules
from study.statistics import mcnemar_exact, mcnemar_outcomes

# The significance level of every test of the findings: a real win or loss (McNemar), the claims' p-values.
ALPHA = 0.05


@dataclass
class StudyInputs:
    """What the findings are computed from, as plain DataFrames (tests build them by hand).

    merges: `merge_results` rows (through `prepare_merges`); task_results: task, model_kind, seed, accuracy,
    n_test; norms: task, seed, update_norm (adapters); similarity: task_a, task_b, measure, value (mean over seeds).
    """

    merges: pd.DataFrame
    task_results: pd.DataFrame
    norms: pd.DataFrame
    similarity: pd.DataFrame
    tasks: tuple[str, ...]
    rules: ExclusionRules = field(default_factory=ExclusionRules)
    related: object = related  # (task_a, task_b) -> bool: related by construction
    relation_kind: object = relation_kind  # (task_a, task_b) -> "same_images" | "same_labels" | "same_style" | ...
    # `probe_results` rows of the study's multi-layer probes (task, accuracy, validation_accuracy, n_merge_eval,
    # merge_eval_correct); empty where none was trained (a study of given adapters, a store from before them)
    probes: pd.DataFrame = field(default_factory=pd.DataFrame)


def selection_record(selection) -> dict:
    """A merge's `selection` record (JSON text or dict) as a dict; {} when absent or unreadable."""
    if isinstance(selection, str):
        try:
            selection = json.loads(selection)
        except ValueError:
            return {}
    return selection if isinstance(selection, dict) else {}


def _chosen_validation(selection) -> float:
    """`chosen_validation_accuracy` of a merge's selection JSON (NaN when absent)."""
    value = selection_record(selection).get("chosen_validation_accuracy")
    return float(value) if value is not None else float("nan")


# The two baselines a merge is compared with, each one backbone pass per image: the trained last-layer head (per
# seed, in `merge_results`) and the multi-layer linear probe (per task, `probe_results`). Column prefixes below.
BASELINES = ("head", "probe")
BASELINE_NAMES = {"head": "last-layer head", "probe": "multi-layer probe"}


def _paired_outcomes(merged_packed, baseline_packed, ns) -> tuple[np.ndarray, np.ndarray]:
    """McNemar's discordant counts (b: images only the merged model got right, c: only the baseline) per row;
    NaN where either side's per-image outcomes are not stored."""
    b, c = np.full(len(ns), np.nan), np.full(len(ns), np.nan)
    for i, (merged, baseline, n) in enumerate(zip(merged_packed, baseline_packed, ns)):
        if isinstance(merged, str) and isinstance(baseline, str) and n and n == n:
            m, h = unpack_correct(merged, int(n)), unpack_correct(baseline, int(n))
            b[i], c[i] = np.sum(m & ~h), np.sum(~m & h)
    return b, c


def prepare_merges(merges: pd.DataFrame, probes: pd.DataFrame | None = None) -> pd.DataFrame:
    """`merge_results` rows plus: validation (chosen validation accuracy), diff_points (merged − head, in
    points), mcnemar_b / mcnemar_c (images only the merged / only the head model got right), mcnemar_p
    and outcome (+1 real win, -1 real loss, 0 neither; NaN where per-image outcomes are not stored); and the same
    against the task's multi-layer probe (`probes`, `probe_results` rows) on the same images: probe_accuracy,
    probe_diff_points, probe_outcome (NaN where no probe was scored on the merge's images)."""
    df = merges.copy().reset_index(drop=True)
    if "selection" not in df:
        df["selection"] = None
    df["validation"] = [_chosen_validation(s) for s in df["selection"]]
    df["diff_points"] = (df["merged_accuracy"] - df["head_accuracy"]) * 100
    if {"merged_correct", "head_correct"} <= set(df.columns):
        b, c = _paired_outcomes(df["merged_correct"], df["head_correct"], df["n"])
    else:
        b, c = np.full(len(df), np.nan), np.full(len(df), np.nan)
    have = np.isfinite(b)
    df["mcnemar_b"], df["mcnemar_c"] = b, c
    df["mcnemar_p"] = np.where(have, mcnemar_exact(np.nan_to_num(b), np.nan_to_num(c)), np.nan)
    df["outcome"] = np.where(have, mcnemar_outcomes(np.nan_to_num(b), np.nan_to_num(c), ALPHA), np.nan)
    df["probe_correct"] = probe_correct_on(df["task"], df["n"], probes) if "merged_correct" in df else None
    df["probe_accuracy"] = [
        float(unpack_correct(packed, int(n)).mean()) if isinstance(packed, str) else np.nan
        for packed, n in zip(df["probe_correct"], df["n"])
    ]
    df["probe_diff_points"] = (df["merged_accuracy"] - df["probe_accuracy"]) * 100
    b, c = _paired_outcomes(df.get("merged_correct", [None] * len(df)), df["probe_correct"], df["n"])
    have = np.isfinite(b)
    df["probe_outcome"] = np.where(have, mcnemar_outcomes(np.nan_to_num(b), np.nan_to_num(c), ALPHA), np.nan)
    if "normalized_gain" not in df:
        df["normalized_gain"] = np.nan
    if "gain_note" not in df:
        df["gain_note"] = None
    df["group_tasks"] = df["tasks"].str.split(",").map(frozenset)
    return df
