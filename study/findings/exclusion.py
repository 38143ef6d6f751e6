"""Which tasks are left out of every figure and claim: the exclusion rules and the per-task table they judge.

A task at the ceiling (its single adapter or its head almost always right) or measured on too few images says
nothing about merging; it is excluded by rule, never by hand, and the report states the rule, the task's figure
and the option value that would include it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlvision.config import StudyConfig
from study.findings.rows import finding_row


@dataclass(frozen=True)
class ExclusionRules:
    """When a task is left out of every claim: it is at the ceiling, or measured on too few images.

    The defaults are the default study's; a study's own come from its config (`from_config`: the options
    --max-adapter-accuracy, --max-head-accuracy, --min-test-images and --min-merge-eval-images)."""

    max_adapter_accuracy: float = 0.99  # single adapter's mean test accuracy above this: ceiling
    max_head_accuracy: float = 0.97  # head baseline's mean test accuracy above this: ceiling
    min_test_n: int = 350  # smallest full test split (task_results) below this: too few images
    min_merge_n: int = 300  # merge evaluation subset below this: too few images for McNemar and retention

    @classmethod
    def from_config(cls, config: StudyConfig) -> "ExclusionRules":
        return cls(
            config.max_adapter_accuracy, config.max_head_accuracy, config.min_test_images, config.min_merge_eval_images
        )

    def reasons(self, adapter: float, head: float, test_n: float, merge_n: float) -> list[str]:
        """Each rule the task fails: the rule, the task's figure, and what would include it."""
        out = []
        if adapter > self.max_adapter_accuracy:
            out.append(
                f"single adapter at the ceiling ({_above(adapter, self.max_adapter_accuracy)} > "
                f"{_threshold_pct(self.max_adapter_accuracy)}): include it with --max-adapter-accuracy "
                f"{_at_least(adapter)} or higher"
            )
        if head > self.max_head_accuracy:
            out.append(
                f"head at the ceiling ({_above(head, self.max_head_accuracy)} > "
                f"{_threshold_pct(self.max_head_accuracy)}): include it with --max-head-accuracy {_at_least(head)} "
                "or higher"
            )
        if test_n < self.min_test_n:
            out.append(
                f"test split of {test_n:.0f} images < {self.min_test_n}: include it with --min-test-images "
                f"{math.floor(test_n)} or lower, or with a test split of at least {self.min_test_n} images"
            )
        if merge_n < self.min_merge_n:
            out.append(
                f"merge evaluation on {merge_n:.0f} images < {self.min_merge_n}: include it with "
                f"--min-merge-eval-images {math.floor(merge_n)} or lower, or with --merge-eval {self.min_merge_n} or "
                "more (as many test images as the task has)"
            )
        return out

    def text(self) -> str:
        """The rules in force, as one clause."""
        return (
            f"its single adapter's mean test accuracy is > {_threshold_pct(self.max_adapter_accuracy)}, its head's > "
            f"{_threshold_pct(self.max_head_accuracy)}, its smallest test split < {self.min_test_n} images or its "
            f"merge evaluation < {self.min_merge_n} images"
        )

    def report_sentence(self) -> str:
        """The report's Tasks section's statement of the rules: formatted from these thresholds (never typed in the
        report), and, for a study with its own thresholds, the defaults beside them."""
        own = (
            ""
            if self == ExclusionRules()
            else f" These are this study's thresholds; the defaults are {ExclusionRules().text()}."
        )
        return (
            f"A task is excluded by rule (never by hand) when {self.text()}: such a task says nothing about merging. "
            f"Its rows are left out of every figure and claim below.{own}"
        )


def _threshold_pct(value: float) -> str:
    """0.99 -> '99 %', 0.995 -> '99.5 %': a threshold as given, without rounding it."""
    return f"{value * 100:.6g} %"


def _above(value: float, threshold: float) -> str:
    """`value` in percent with as many decimals as it takes to read as more than `threshold` (1 at least)."""
    for digits in range(1, 7):
        text = f"{value * 100:.{digits}f}"
        if float(text) > threshold * 100:
            break
    return text + " %"


def _at_least(value: float) -> str:
    """A bound no smaller than `value`, as an option takes it: `value` itself where 2 to 4 decimals spell it
    exactly, else rounded up to 4 decimals."""
    for places in (2, 3, 4):
        text = f"{value:.{places}f}"
        if float(text) == value:
            return text
    bound = math.ceil(value * 10**4) / 10**4
    return f"{bound if bound >= value else bound + 1e-4:.4f}"


def task_table(
    task_results: pd.DataFrame, merges: pd.DataFrame, tasks: tuple[str, ...], rules: ExclusionRules
) -> pd.DataFrame:
    """Per task: mean adapter and head test accuracy (over seeds) with the smallest n, the smallest merge
    evaluation n, and the exclusion reasons (empty = kept)."""
    rows = []
    for task in tasks:
        mine = task_results[task_results["task"] == task]
        adapter, head = mine[mine["model_kind"] == "adapter"], mine[mine["model_kind"] == "head"]
        merge_n = merges.loc[merges["task"] == task, "n"]
        figures = {
            "adapter_accuracy": adapter["accuracy"].mean(),
            "adapter_n": adapter["n_test"].min(),
            "adapter_seeds": adapter["seed"].nunique(),
            "head_accuracy": head["accuracy"].mean(),
            "head_n": head["n_test"].min(),
            "head_seeds": head["seed"].nunique(),
            "test_n": mine["n_test"].min(),
            "merge_n": merge_n.min() if len(merge_n) else np.nan,
            "merge_rows": len(merge_n),
        }
        reasons = rules.reasons(
            *(figures[k] for k in ("adapter_accuracy", "head_accuracy", "test_n", "merge_n"))
        )  # NaN (nothing stored) compares False: a task is never excluded for lack of data
        rows.append({"task": task, **figures, "reasons": reasons, "excluded": bool(reasons)})
    return pd.DataFrame(rows).set_index("task")


def task_rows(table: pd.DataFrame) -> list[dict]:
    """The `task` findings rows of a `task_table`: each task's accuracies, merge evaluation size and exclusion."""
    out = []
    for task, r in table.iterrows():
        for kind in ("adapter", "head"):
            out.append(
                finding_row(
                    "task",
                    f"{task}/{kind}_accuracy",
                    r[f"{kind}_accuracy"],
                    n=r[f"{kind}_n"],
                    note=f"mean test accuracy over {r[f'{kind}_seeds']} seeds; n = smallest test split",
                )
            )
        out.append(
            finding_row(
                "task",
                f"{task}/merge_eval_n",
                r["merge_n"],
                n=r["merge_rows"],
                note="smallest number of test images a merged model was scored on; n = rows",
            )
        )
        out.append(
            finding_row(
                "task",
                f"{task}/excluded",
                1.0 if r["excluded"] else 0.0,
                n=1,
                note="; ".join(r["reasons"]) if r["excluded"] else "kept: no exclusion rule applies",
            )
        )
    return out
