"""What the findings are computed from: the study's stored rows as plain DataFrames, merges prepared once.

`StudyInputs` is all the analysis reads (tests build it by hand); `prepare_merges` adds to each (merge, task)
row what every figure needs: the chosen validation accuracy, merged − head in points, and McNemar's outcome.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlvision.store import unpack_correct
from mlvision.tasks import related
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


def _chosen_validation(selection) -> float:
    """`chosen_validation_accuracy` of a merge's selection JSON (NaN when absent)."""
    if selection is None or (isinstance(selection, float) and np.isnan(selection)):
        return float("nan")
    if isinstance(selection, str):
        try:
            selection = json.loads(selection)
        except ValueError:
            return float("nan")
    value = selection.get("chosen_validation_accuracy") if isinstance(selection, dict) else None
    return float(value) if value is not None else float("nan")


def prepare_merges(merges: pd.DataFrame) -> pd.DataFrame:
    """`merge_results` rows plus: validation (chosen validation accuracy), diff_points (merged − head, in
    points), mcnemar_b / mcnemar_c (images only the merged / only the head model got right), mcnemar_p
    and outcome (+1 real win, -1 real loss, 0 neither; NaN where per-image outcomes are not stored)."""
    df = merges.copy().reset_index(drop=True)
    if "selection" not in df:
        df["selection"] = None
    df["validation"] = [_chosen_validation(s) for s in df["selection"]]
    df["diff_points"] = (df["merged_accuracy"] - df["head_accuracy"]) * 100
    b = np.full(len(df), np.nan)
    c = np.full(len(df), np.nan)
    if {"merged_correct", "head_correct"} <= set(df.columns):
        for i, (merged, head, n) in enumerate(zip(df["merged_correct"], df["head_correct"], df["n"])):
            if isinstance(merged, str) and isinstance(head, str) and n and n == n:
                m, h = unpack_correct(merged, int(n)), unpack_correct(head, int(n))
                b[i], c[i] = np.sum(m & ~h), np.sum(~m & h)
    have = np.isfinite(b)
    df["mcnemar_b"], df["mcnemar_c"] = b, c
    df["mcnemar_p"] = np.where(have, mcnemar_exact(np.nan_to_num(b), np.nan_to_num(c)), np.nan)
    df["outcome"] = np.where(have, mcnemar_outcomes(np.nan_to_num(b), np.nan_to_num(c), ALPHA), np.nan)
    if "normalized_gain" not in df:
        df["normalized_gain"] = np.nan
    if "gain_note" not in df:
        df["gain_note"] = None
    df["group_tasks"] = df["tasks"].str.split(",").map(frozenset)
    return df
