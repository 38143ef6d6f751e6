"""Similarity per task pair and the paper's three claims, measured from the stored merges (study v2).

Writes the `task_similarity` rows, the `findings` rows (one row per figure: value, 95 % CI, n = the
number of resampling units, and a note naming the unit, or NULL with the reason when the data cannot
support the figure), and `reports/findings.md`, rendered from the `findings` view alone: no number in
it is typed by hand.

How the figures are made (the statistics themselves live in study/statistics.py):

- Tasks are excluded by rule, never by hand (`ExclusionRules`): a task at the ceiling (single adapter
  > 99 % or head > 97 % mean test accuracy) or measured on too few images says nothing about merging;
  its rows are left out of every figure and claim, and pairs containing it out of the pair analysis.
- A (method, k) cell's value is the mean over merged groups (task sets) of the group's mean over its
  seeds and tasks; its CI bootstraps groups (2,000 resamples, fixed seeds); with fewer than 3 groups
  the CI is NULL with the reason.
- Pair statistics (claim 2) resample tasks, and their p-values come from exact Mantel-style
  permutation tests over task labels.
- Merged vs head on the same images: McNemar's exact test per (merge, task) row.
- The method a claim is judged on is chosen per k on validation accuracy, never on test.
- Every verdict is recomputed leaving each task out in turn (the sensitivity table).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from merging.deltas import load_deltas
from merging.methods import MERGE_METHODS
from mlvision.backbone import create_backbone, make_preprocess
from mlvision.config import StudyConfig
from mlvision.data import split_tensors
from mlvision.evaluation import extract_features, prepared_copy
from mlvision.paths import DEFAULT_DB_PATH, REPO_ROOT
from mlvision.runs import resolve_stored_path, study_run_id
from mlvision.store import Store, insert_row, now, unpack_correct
from mlvision.tasks import related
from study.similarity import adapter_cosine, frechet_distance, pairs, subspace_alignment
from study.statistics import (
    BOOTSTRAP,
    MIN_GROUPS,
    exact_difference_test,
    group_bootstrap_mean,
    mantel_permutation,
    mcnemar_exact,
    mcnemar_outcomes,
    rng_for,
    spearman,
    task_bootstrap_spearman,
    wilson,
)

MIN_PAIRS = 4
MEASURES = ("frechet", "adapter_cosine", "subspace_alignment")
ALPHA = 0.05
# Claim thresholds. 90 %: the usual bar for "normalized accuracy" (merged / individual) in the merging
# literature; 80 %: no task may be sacrificed for the average.
RETENTION_BAR = 0.90
WORST_TASK_BAR = 0.80
# Under the null a two-sided 5 % McNemar test calls a row a real win with probability at most 2.5 %.
CHANCE_WIN_RATE = ALPHA / 2

SUPPORTED, INCONCLUSIVE, CONTRADICTED = 1, 0, -1
VERDICT_WORDS = {SUPPORTED: "supported", INCONCLUSIVE: "inconclusive", CONTRADICTED: "contradicted"}
CLAIMS = {
    "claim1": "Merging up to three adapters works",
    "claim2": "Adapters trained on dissimilar data merge better",
    "claim3": "Merges sometimes beat head finetuning",
}
RULES = {
    "claim1": (
        f"for the validation-chosen method at k = 2 and at k = 3: supported if at both k the mean retention's "
        f"group-bootstrap CI lower bound >= {RETENTION_BAR:.2f} and the worst task's mean retention >= "
        f"{WORST_TASK_BAR:.2f}; contradicted if at either k the mean retention's CI upper bound < "
        f"{RETENTION_BAR:.2f} or the worst task's retention CI upper bound < {WORST_TASK_BAR:.2f} (CI over the "
        f"groups containing that task); inconclusive otherwise. {RETENTION_BAR:.0%} of single-adapter accuracy "
        f"is the usual bar of the merging literature's normalized accuracy; {WORST_TASK_BAR:.0%} for the worst task"
    ),
    "claim2": (
        "pair retention = the k = 2 validation-chosen method's retention of the pair (mean over seeds and the "
        "pair's two tasks). Spearman ρ of pair retention with the Fréchet distance, and partial Spearman ρ "
        "controlling for |log(norm_a / norm_b)| of the adapters' update norms; CIs resample tasks, p-values "
        f"are exact permutation tests over task labels (two-sided). Supported if both ρ > 0 with CI lower bound "
        f"> 0 and p < {ALPHA}; contradicted if both ρ < 0 with CI upper bound < 0 and p < {ALPHA}; "
        "inconclusive otherwise"
    ),
    "claim3": (
        "for the validation-chosen method at each k with a group CI (at least 3 groups): supported if at some "
        "k the mean merged − head accuracy has CI lower bound > 0, or the share of rows that are real wins "
        f"(McNemar exact p < {ALPHA}, merged right more often) has a Wilson lower bound > {CHANCE_WIN_RATE:.3f} "
        "(the rate expected by chance from a two-sided 5 % test); contradicted if at every such k the mean's "
        f"CI upper bound < 0 and the real-win share's Wilson lower bound <= {CHANCE_WIN_RATE:.3f}; inconclusive "
        "otherwise"
    ),
}


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
        """The rules in force, as the report's Tasks section states them."""
        return (
            f"its single adapter's mean test accuracy is > {_threshold_pct(self.max_adapter_accuracy)}, its head's > "
            f"{_threshold_pct(self.max_head_accuracy)}, its smallest test split < {self.min_test_n} images or its "
            f"merge evaluation < {self.min_merge_n} images"
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


@dataclass
class StudyInputs:
    """What the findings are computed from, as plain DataFrames (tests build them by hand).

    merges: `merge_results` rows; task_results: task, model_kind, seed, accuracy, n_test; norms: task,
    seed, update_norm (adapters); similarity: task_a, task_b, measure, value (mean over seeds).
    """

    merges: pd.DataFrame
    task_results: pd.DataFrame
    norms: pd.DataFrame
    similarity: pd.DataFrame
    tasks: tuple[str, ...]
    rules: ExclusionRules = field(default_factory=ExclusionRules)
    related: object = related  # (task_a, task_b) -> bool: related by construction


# -- preparation -----------------------------------------------------------------------------------


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


def task_table(inputs: StudyInputs, merges: pd.DataFrame) -> pd.DataFrame:
    """Per task: mean adapter and head test accuracy (over seeds) with the smallest n, the smallest merge
    evaluation n, and the exclusion reasons (empty = kept)."""
    results = inputs.task_results
    rows = []
    for task in inputs.tasks:
        mine = results[results["task"] == task]
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
        reasons = inputs.rules.reasons(
            *(figures[k] for k in ("adapter_accuracy", "head_accuracy", "test_n", "merge_n"))
        )  # NaN (nothing stored) compares False: a task is never excluded for lack of data
        rows.append({"task": task, **figures, "reasons": reasons, "excluded": bool(reasons)})
    return pd.DataFrame(rows).set_index("task")


# -- per (method, k) figures -----------------------------------------------------------------------


def choose_methods(merges: pd.DataFrame) -> dict[int, dict]:
    """Per k: the method with the highest mean chosen validation accuracy over that k's merges.

    Only methods whose every merge at k has a validation accuracy and that merged every (group, seed) at k
    compete (a mean over a subset would not be comparable: AdaMerging runs on a subset), and never a
    transductive method (one that learned on the test images it is scored on). Returns k -> {"method",
    "value", "n", "note", "scores": Series method -> mean}; "method" is None (with the reason in "note")
    when no method qualifies. Test accuracy is never used.
    """
    out = {}
    per_merge = merges.drop_duplicates("merge_id")
    for k, at_k in per_merge.groupby("k"):
        complete = at_k.groupby("method")["validation"].apply(lambda v: bool(np.isfinite(v).all()))
        coverage = at_k.groupby("method")["merge_id"].nunique()
        eligible = [m for m in complete[complete].index if coverage[m] == coverage.max() and not is_transductive(m)]
        scores = at_k[at_k["method"].isin(eligible)].groupby("method")["validation"].mean()
        if scores.empty:
            out[int(k)] = {"method": None, "value": None, "n": 0, "note": "no merge stores its validation accuracy",
                           "scores": scores}  # fmt: skip
            continue
        best = scores.max()
        method = sorted(scores.index[scores >= best - 1e-12])[0]  # ties: the first name, deterministically
        n = int((at_k["method"] == method).sum())
        note = f"highest mean validation accuracy of {len(scores)} methods; unit: merges ({n})"
        out[int(k)] = {"method": method, "value": float(best), "n": n, "note": note, "scores": scores}
    return out


def is_transductive(method: str) -> bool:
    """Whether a method learns on the unlabeled test images it is then scored on (AdaMerging)."""
    registered = MERGE_METHODS.get(method)
    return registered is not None and registered.kind == "test_time"


def is_data_aware(method: str) -> bool:
    registered = MERGE_METHODS.get(method)
    return registered is not None and registered.kind in ("data_aware", "test_time")


def data_aware_rows(rows_in: pd.DataFrame) -> list[dict]:
    """At the largest k: each data-aware method against the best data-free method on the same merges, per task.

    The data-free method is the one with the highest mean chosen validation accuracy over the very
    (group, seed) merges the data-aware method has (AdaMerging: seed 0 only), so both sides cover the
    same models; values are mean test accuracy over those seeds, differences in points."""
    out = []
    if rows_in.empty:
        return out
    k = int(rows_in["k"].max())
    at_k = rows_in[rows_in["k"] == k]
    free = at_k[[m in MERGE_METHODS and MERGE_METHODS[m].kind == "data_free" for m in at_k["method"]]]
    for method in sorted(m for m in at_k["method"].unique() if is_data_aware(m)):
        mine = at_k[at_k["method"] == method]
        keys = set(zip(mine["tasks"], mine["seed"]))
        same = free[[key in keys for key in zip(free["tasks"], free["seed"])]]
        if same.empty:
            continue
        scores = same.drop_duplicates("merge_id").groupby("method")["validation"].mean()
        best = sorted(scores.index[scores >= scores.max() - 1e-12])[0]
        theirs = same[same["method"] == best]
        seeds = sorted(int(s) for s in mine["seed"].unique())
        transductive = " (transductive: learned on these test images)" if is_transductive(method) else ""
        for task, group in mine.groupby("task"):
            other = theirs[theirs["task"] == task]
            value, reference = group["merged_accuracy"].mean(), other["merged_accuracy"].mean()
            out.append(
                _row(
                    "data_aware",
                    f"{method}/k={k}/{task}",
                    (value - reference) * 100,
                    n=len(group),
                    note=f"{method} {100 * value:.1f} % vs {best} {100 * reference:.1f} % (best data-free on "
                    f"validation over the same merges); single adapter {100 * group['single_accuracy'].mean():.1f} %; "
                    f"seeds {seeds}; points{transductive}",
                )
            )
        value = mine.groupby("tasks")["normalized_accuracy"].mean().mean()
        reference = theirs.groupby("tasks")["normalized_accuracy"].mean().mean()
        out.append(
            _row(
                "data_aware",
                f"{method}/k={k}/mean",
                (value - reference) * 100,
                n=mine["merge_id"].nunique(),
                note=f"mean retention {100 * value:.1f} % vs {best} {100 * reference:.1f} %; merges "
                f"{mine['merge_id'].nunique()}, seeds {seeds}; points{transductive}",
            )
        )
    return out


def _unit_note(groups: int, seeds: int, rows: int) -> str:
    return f"unit: merged groups ({groups}); seeds {seeds}; rows {rows}"


def cell_figures(rows: pd.DataFrame, method: str, k: int) -> dict:
    """Every figure of one (method, k) cell from its (merge, task) rows (included tasks only)."""
    groups = rows.groupby("tasks")
    n_groups, seeds, n_rows = groups.ngroups, rows["seed"].nunique(), len(rows)
    unit = _unit_note(n_groups, seeds, n_rows)
    retention = group_bootstrap_mean(groups["normalized_accuracy"].mean(), rng_for("retention", method, k))
    diff = group_bootstrap_mean(groups["diff_points"].mean(), rng_for("diff", method, k))
    # per task: mean over the groups containing it of the group's retention on that task (mean over seeds)
    per_group_task = rows.groupby(["task", "tasks"])["normalized_accuracy"].mean()
    per_task = per_group_task.groupby(level="task").mean().dropna()
    worst_task = per_task.idxmin() if len(per_task) else None
    worst = (
        group_bootstrap_mean(per_group_task.loc[worst_task], rng_for("worst", method, k))
        if worst_task is not None
        else (float("nan"), None, None, "no task")
    )
    defined = rows[rows["normalized_gain"].notna()]
    undefined = rows[rows["normalized_gain"].isna()]
    gain = group_bootstrap_mean(defined.groupby("tasks")["normalized_gain"].mean(), rng_for("gain", method, k))
    reasons = undefined["gain_note"].fillna("single adapter accuracy equals head accuracy").value_counts()
    gain_note = f"defined in {len(defined)} of {n_rows} rows" + (
        f"; {len(undefined)} undefined: " + "; ".join(f"{r} ({c})" for r, c in reasons.items())
        if len(undefined)
        else ""
    )
    outcomes = rows["outcome"].dropna()
    return {
        "method": method, "k": k, "groups": n_groups, "seeds": seeds, "rows": n_rows, "unit": unit,
        "retention": retention, "diff": diff, "gain": gain, "gain_note": gain_note,
        "gain_groups": defined["tasks"].nunique(),
        "per_task": per_task, "per_task_groups": per_group_task.groupby(level="task").size(),
        "worst_task": worst_task, "worst": worst,
        "mcnemar_rows": len(outcomes), "wins": int((outcomes == 1).sum()), "losses": int((outcomes == -1).sum()),
    }  # fmt: skip


# -- pairs (claim 2) -------------------------------------------------------------------------------


def pair_figures(inputs: StudyInputs, rows: pd.DataFrame, method: str | None, tasks: list[str], full: bool) -> dict:
    """Claim 2's statistics from the k = 2 rows of `method` (pairs of included tasks only)."""
    out: dict = {"method": method, "table": pd.DataFrame(), "reason": None}
    if method is None:
        out["reason"] = "no validation-chosen method at k = 2"
        return out
    at2 = rows[(rows["k"] == 2) & (rows["method"] == method)]
    at2 = at2.loc[at2["group_tasks"].map(lambda g: g <= set(tasks)).astype(bool)]
    retention = at2.groupby("tasks")["normalized_accuracy"].mean()
    sim = inputs.similarity
    measures = {
        m: {
            f"{a},{b}": v
            for a, b, v in sim.loc[sim["measure"] == m, ["task_a", "task_b", "value"]].itertuples(index=False)
        }
        for m in MEASURES
    }
    norms = inputs.norms.groupby("task")["update_norm"].mean() if len(inputs.norms) else pd.Series(dtype=float)
    table = pd.DataFrame({"retention": retention})
    table["a"] = [p.split(",")[0] for p in table.index]
    table["b"] = [p.split(",")[1] for p in table.index]
    for m in MEASURES:
        table[m] = [measures[m].get(p, np.nan) for p in table.index]
    table["log_norm_ratio"] = [
        abs(np.log(norms[a] / norms[b])) if a in norms and b in norms and norms[a] > 0 and norms[b] > 0 else np.nan
        for a, b in zip(table["a"], table["b"])
    ]
    table["related"] = [bool(inputs.related(a, b)) for a, b in zip(table["a"], table["b"])]
    out["table"] = table
    usable = table.dropna(subset=["retention", "frechet"])
    out["pairs"] = len(usable)
    if len(usable) < MIN_PAIRS:
        out["reason"] = f"fewer than {MIN_PAIRS} pairs with both figures ({len(usable)})"
        return out
    names = sorted(set(usable["a"]) | set(usable["b"]))
    index = {t: i for i, t in enumerate(names)}
    out["tasks"] = len(names)

    def matrix(measure):
        values = measures[measure]
        d = np.full((len(names), len(names)), np.nan)
        np.fill_diagonal(d, 0.0)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                key = f"{a},{b}" if a < b else f"{b},{a}"
                if a != b and key in values:
                    d[i, j] = values[key]
        return d

    def correlate(measure, z=None, label=""):
        sub = usable if z is None else usable.dropna(subset=["log_norm_ratio"])
        if z is not None and len(sub) < len(usable):
            return {"reason": f"adapter update norms missing for {len(usable) - len(sub)} of {len(usable)} pairs"}
        sub = sub.dropna(subset=[measure])
        if len(sub) < MIN_PAIRS:
            return {"reason": f"fewer than {MIN_PAIRS} pairs with both figures ({len(sub)})"}
        idx = np.array([[index[a], index[b]] for a, b in zip(sub["a"], sub["b"])])
        x, y = sub["retention"].to_numpy(), sub[measure].to_numpy()
        zz = sub["log_norm_ratio"].to_numpy() if z is not None else None
        rho = spearman(x, y, zz)
        low, high, degenerate = task_bootstrap_spearman(idx, x, y, zz, rng_for("pair", label, measure))
        d = matrix(measure)
        if np.isnan(d).any():
            p, perms, exact, note = float("nan"), 0, False, f"{measure} missing for some pair of the {len(names)} tasks"
        else:
            _, p, perms, exact = mantel_permutation(idx, x, d, zz, rng_for("mantel", label, measure))
            note = None
        return {"value": rho, "ci": (low, high), "p": p, "permutations": perms, "exact": exact,
                "degenerate": degenerate, "pairs": len(sub), "p_reason": note}  # fmt: skip

    out["spearman"] = {m: correlate(m, label="rho") for m in (MEASURES if full else ("frechet",))}
    out["partial"] = correlate("frechet", z=True, label="partial")
    related_r = usable.loc[usable["related"], "retention"].to_numpy()
    unrelated_r = usable.loc[~usable["related"], "retention"].to_numpy()
    out["related"] = {"related": related_r, "unrelated": unrelated_r}
    if full and len(related_r) and len(unrelated_r):
        diff, p, splits, exact = exact_difference_test(unrelated_r, related_r, rng_for("related"))
        out["related"].update(difference=diff, p=p, splits=splits, exact=exact)
    distances = usable["frechet"]
    out["distance_spread"] = (distances.min(), distances.max())
    return out


# -- the claims' rules (pure: small DataFrames in, (verdict, reason) out) ---------------------------


def _finite(*values) -> bool:
    return all(v is not None and np.isfinite(v) for v in values)


def claim1_rule(figures: pd.DataFrame) -> tuple[int | None, str]:
    """Claim 1 from the chosen method's figures at k = 2 and 3.

    `figures`: index k; columns method, retention, retention_low, retention_high, worst_task, worst,
    worst_low, worst_high (NaN where a CI is not available). Returns (verdict or None, reason).
    """
    missing = [k for k in (2, 3) if k not in figures.index]
    if missing:
        return None, "no merges at " + " and ".join(f"k = {k}" for k in missing)
    rows = figures.loc[[2, 3]]
    for k, r in rows.iterrows():
        if r["retention_high"] < RETENTION_BAR or r["worst_high"] < WORST_TASK_BAR:
            return CONTRADICTED, f"at k = {k}: " + _claim1_text(r)
    if all(_finite(r["retention_low"], r["worst"]) for _, r in rows.iterrows()):
        if all(r["retention_low"] >= RETENTION_BAR and r["worst"] >= WORST_TASK_BAR for _, r in rows.iterrows()):
            return SUPPORTED, "; ".join(f"k = {k}: " + _claim1_text(r) for k, r in rows.iterrows())
        return INCONCLUSIVE, "; ".join(f"k = {k}: " + _claim1_text(r) for k, r in rows.iterrows())
    unavailable = [k for k, r in rows.iterrows() if not _finite(r["retention_low"], r["retention_high"])]
    return None, "retention CI not available at " + ", ".join(f"k = {k}" for k in unavailable)


def _claim1_text(r) -> str:
    return (
        f"{r['method']} retention {_pct(r['retention'])} [{_pct(r['retention_low'])}, {_pct(r['retention_high'])}], "
        f"worst task {r['worst_task']} {_pct(r['worst'])} [{_pct(r['worst_low'])}, {_pct(r['worst_high'])}]"
    )


def claim2_rule(figures: pd.DataFrame) -> tuple[int | None, str]:
    """Claim 2 from ρ and partial ρ: `figures` has index ("spearman", "partial") and columns value,
    ci_low, ci_high, p. Symmetric: the same evidence is needed either way."""
    if not {"spearman", "partial"} <= set(figures.index):
        return None, "ρ or partial ρ not available"
    rows = figures.loc[["spearman", "partial"]]
    if not all(_finite(r["value"], r["ci_low"], r["ci_high"], r["p"]) for _, r in rows.iterrows()):
        return None, "ρ or partial ρ (or its CI or p-value) not available"
    text = "; ".join(
        f"{name} {r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}], p = {r['p']:.3f}"
        for name, r in zip(("ρ", "partial ρ"), (rows.loc["spearman"], rows.loc["partial"]))
    )
    significant = (rows["p"] < ALPHA).all()
    if significant and ((rows["value"] > 0) & (rows["ci_low"] > 0)).all():
        return SUPPORTED, text
    if significant and ((rows["value"] < 0) & (rows["ci_high"] < 0)).all():
        return CONTRADICTED, text
    return INCONCLUSIVE, text


def claim3_rule(figures: pd.DataFrame) -> tuple[int | None, str]:
    """Claim 3 from the chosen method's figures per k: index k; columns method, diff, diff_low, diff_high
    (points; NaN CI where fewer than 3 groups), wins, rows, wins_low (Wilson lower bound of the real-win
    share; NaN without per-image outcomes). Only k with a CI are judged."""
    rows = figures[figures["diff_low"].notna() & figures["diff_high"].notna()]
    if rows.empty:
        return None, f"no k with a CI over merged groups (needs at least {MIN_GROUPS} groups)"
    text = "; ".join(
        f"k = {k} ({r['method']}): merged − head {r['diff']:+.1f} points "
        f"[{r['diff_low']:+.1f}, {r['diff_high']:+.1f}], "
        + (
            f"real wins {int(r['wins'])} of {int(r['rows'])} (Wilson lower bound {r['wins_low']:.3f})"
            if _finite(r["wins_low"])
            else "no per-image outcomes"
        )
        for k, r in rows.iterrows()
    )
    wins_above = rows["wins_low"].fillna(-np.inf) > CHANCE_WIN_RATE
    if ((rows["diff_low"] > 0) | wins_above).any():
        return SUPPORTED, text
    wins_at_chance = rows["wins_low"].notna() & (rows["wins_low"] <= CHANCE_WIN_RATE)
    if ((rows["diff_high"] < 0) & wins_at_chance).all():
        return CONTRADICTED, text
    return INCONCLUSIVE, text


def _pct(value) -> str:
    return f"{value * 100:.1f} %" if _finite(value) else "n/a"


# -- the whole analysis ----------------------------------------------------------------------------


def _row(finding, statistic, value=None, ci=(None, None), n=0, note=None) -> dict:
    ok = value is not None and np.isfinite(value)
    low, high = ci
    return {
        "finding": finding,
        "statistic": statistic,
        "value": float(value) if ok else None,
        "ci_low": float(low) if ok and low is not None and np.isfinite(low) else None,
        "ci_high": float(high) if ok and high is not None and np.isfinite(high) else None,
        "n": int(n) if n == n else 0,
        "note": note if ok or note else "not available",
    }


def _ci_figure(finding, statistic, figure, n, unit) -> dict:
    """A row from a group_bootstrap_mean result: the reason for a NULL CI goes into the note."""
    mean, low, high, reason = figure
    return _row(finding, statistic, mean, (low, high), n, f"{unit}; CI: {reason}" if reason else unit)


def analyse(inputs: StudyInputs, leave_out: str | None = None, full: bool = True) -> tuple[list[dict], dict]:
    """(findings rows, verdicts) for the study; `leave_out` drops every group and pair containing that task.

    verdicts: claim -> (verdict or None, reason). With full=False only what the verdicts need is computed
    (the sensitivity table runs it once per task), and the rows are those of the claims.
    """
    merges = inputs.merges
    tasks_info = task_table(inputs, merges)
    if leave_out is not None:
        merges = merges.loc[~merges["group_tasks"].map(lambda g: leave_out in g).astype(bool)]
    included = [t for t in inputs.tasks if not tasks_info.loc[t, "excluded"] and t != leave_out]
    rows_in = merges[merges["task"].isin(included)]
    out: list[dict] = []
    if full:
        for task, r in tasks_info.iterrows():
            for kind in ("adapter", "head"):
                out.append(
                    _row(
                        "task",
                        f"{task}/{kind}_accuracy",
                        r[f"{kind}_accuracy"],
                        n=r[f"{kind}_n"],
                        note=f"mean test accuracy over {r[f'{kind}_seeds']} seeds; n = smallest test split",
                    )
                )
            out.append(
                _row(
                    "task",
                    f"{task}/merge_eval_n",
                    r["merge_n"],
                    n=r["merge_rows"],
                    note="smallest number of test images a merged model was scored on; n = rows",
                )
            )
            out.append(
                _row(
                    "task",
                    f"{task}/excluded",
                    1.0 if r["excluded"] else 0.0,
                    n=1,
                    note="; ".join(r["reasons"]) if r["excluded"] else "kept: no exclusion rule applies",
                )
            )
    chosen = choose_methods(merges)
    if full:
        for k, c in chosen.items():
            for method, score in c["scores"].items():
                n = int(((merges["k"] == k) & (merges["method"] == method)).groupby(merges["merge_id"]).any().sum())
                out.append(
                    _row(
                        "validation_accuracy",
                        f"{method}/k={k}",
                        score,
                        n=n,
                        note=f"mean chosen_validation_accuracy; unit: merges ({n})",
                    )
                )
            if c["method"] is not None:
                out.append(_row("chosen_method", f"{c['method']}/k={k}", c["value"], n=c["n"], note=c["note"]))
            else:
                out.append(_row("chosen_method", f"none/k={k}", n=0, note=c["note"]))
    wanted = (
        sorted(rows_in.groupby(["method", "k"]).groups)
        if full
        else [(c["method"], k) for k, c in sorted(chosen.items()) if c["method"] is not None]
    )
    cells = {}
    for method, k in wanted:
        rows = rows_in[(rows_in["method"] == method) & (rows_in["k"] == k)]
        if rows.empty:
            continue
        cell = cells[(method, int(k))] = cell_figures(rows, method, int(k))
        if not full:
            continue
        stat, unit = f"{method}/k={k}", cell["unit"]
        out.append(_ci_figure("retention_vs_k", stat, cell["retention"], cell["groups"], unit))
        worst = cell["worst_task"]
        if worst is not None:
            groups_with = int(cell["per_task_groups"][worst])
            out.append(
                _ci_figure(
                    "worst_task",
                    stat,
                    cell["worst"],
                    groups_with,
                    f"worst task: {worst}; unit: merged groups containing it ({groups_with})",
                )
            )
            spread = cell["per_task"]
            for name, value in (
                ("min", spread.min()),
                ("max", spread.max()),
                ("sd", spread.std(ddof=1) if len(spread) > 1 else np.nan),
            ):
                out.append(
                    _row(
                        "retention_spread",
                        f"{stat}/{name}",
                        value,
                        n=len(spread),
                        note=f"over tasks' mean retention ({len(spread)} tasks)"
                        if len(spread) > 1 or name != "sd"
                        else "one task: no spread",
                    )
                )
            for task, value in spread.items():
                g = int(cell["per_task_groups"][task])
                out.append(
                    _row(
                        "task_retention",
                        f"{stat}/{task}",
                        value,
                        n=g,
                        note=f"mean over the merged groups containing {task} ({g}) of its retention",
                    )
                )
        out.append(_ci_figure("merged_minus_head", stat, cell["diff"], cell["groups"], unit + "; points"))
        out.append(
            _ci_figure(
                "normalized_gain",
                stat,
                cell["gain"],
                cell["gain_groups"],
                f"{cell['gain_note']}; unit: merged groups with defined rows ({cell['gain_groups']})",
            )
        )
        m = cell["mcnemar_rows"]
        for name, count in (("real_wins", cell["wins"]), ("real_losses", cell["losses"])):
            word = "merged" if name == "real_wins" else "head"
            out.append(
                _row(name, stat, count / m if m else None, wilson(count, m) if m else (None, None), m,
                     f"{count} of {m} rows: {word} right significantly more often (McNemar exact, p < {ALPHA}); "
                     "Wilson CI; unit: (merge, task) rows" if m else "no per-image outcomes stored")
            )  # fmt: skip
    verdicts = {}
    # claim 1
    figures = {}
    for k in (2, 3):
        c = chosen.get(k)
        if c and c["method"] is not None and (c["method"], k) in cells:
            cell = cells[(c["method"], k)]
            mean, low, high, _ = cell["retention"]
            worst, wlow, whigh, _ = cell["worst"]
            figures[k] = {
                "method": c["method"],
                "retention": mean,
                "retention_low": low,
                "retention_high": high,
                "worst_task": cell["worst_task"],
                "worst": worst,
                "worst_low": wlow,
                "worst_high": whigh,
            }

    def why_missing(k):
        if k not in chosen:
            return f"k = {k}: no merges"
        if chosen[k]["method"] is None:
            return f"k = {k}: {chosen[k]['note']}"
        return f"k = {k}: no rows of kept tasks for {chosen[k]['method']}"

    unchosen = [why_missing(k) for k in (2, 3) if k not in figures]
    verdicts["claim1"] = (
        (None, "; ".join(unchosen))
        if unchosen
        else claim1_rule(pd.DataFrame.from_dict(figures, orient="index").astype(object).fillna(np.nan))
    )
    # claim 2
    pair = pair_figures(inputs, rows_in, chosen.get(2, {}).get("method"), included, full)
    if pair["reason"] is None:
        fig2 = {
            name: {"value": r.get("value", np.nan), "ci_low": r.get("ci", (np.nan,) * 2)[0],
                   "ci_high": r.get("ci", (np.nan,) * 2)[1], "p": r.get("p", np.nan)}
            for name, r in (("spearman", pair["spearman"]["frechet"]), ("partial", pair["partial"]))
        }  # fmt: skip
        verdicts["claim2"] = claim2_rule(pd.DataFrame.from_dict(fig2, orient="index"))
        if verdicts["claim2"][0] is None:
            reasons = [r["reason"] for r in (pair["spearman"]["frechet"], pair["partial"]) if r.get("reason")]
            reasons += [r["p_reason"] for r in (pair["spearman"]["frechet"], pair["partial"]) if r.get("p_reason")]
            verdicts["claim2"] = (None, "; ".join(reasons) or verdicts["claim2"][1])
    else:
        verdicts["claim2"] = (None, pair["reason"])
    # claim 3
    figures = {}
    for k, c in sorted(chosen.items()):
        if c["method"] is not None and (c["method"], k) in cells:
            cell = cells[(c["method"], k)]
            mean, low, high, _ = cell["diff"]
            m = cell["mcnemar_rows"]
            figures[k] = {
                "method": c["method"],
                "diff": mean,
                "diff_low": low,
                "diff_high": high,
                "wins": cell["wins"],
                "rows": m,
                "wins_low": wilson(cell["wins"], m)[0] if m else np.nan,
            }
    table3 = pd.DataFrame.from_dict(figures, orient="index")
    if table3.empty:
        verdicts["claim3"] = (None, "no merges of a validation-chosen method")
    else:
        verdicts["claim3"] = claim3_rule(table3.astype(object).fillna(np.nan))
    if full:
        out += _pair_rows(pair)
        out += data_aware_rows(rows_in)
        out += [_row("claim_rules", claim, note=RULES[claim]) for claim in CLAIMS]  # readers show the rule too
    if not included:
        for claim in verdicts:
            verdicts[claim] = (None, "every task is excluded by rule")
    for claim, (verdict, reason) in verdicts.items():
        word = VERDICT_WORDS.get(verdict, "not available")
        out.append(_row("claims", claim, verdict, n=len(included), note=f"{word}: {reason}"))
    return out, verdicts


def _pair_rows(pair: dict) -> list[dict]:
    out = []
    table = pair["table"]
    for p, r in table.iterrows():
        out.append(
            _row(
                "pairs",
                f"{p}/retention",
                r["retention"],
                n=1,
                note=f"{pair['method']} at k = 2: mean over seeds and the pair's two tasks",
            )
        )
        out.append(_row("pairs", f"{p}/frechet", r["frechet"], n=1, note="Fréchet distance, mean over seeds"))
        out.append(
            _row(
                "pairs",
                f"{p}/log_norm_ratio",
                r["log_norm_ratio"],
                n=1,
                note="|log(norm_a / norm_b)|, update norms mean over seeds"
                if np.isfinite(r["log_norm_ratio"])
                else "no adapter update norms stored",
            )
        )
        out.append(
            _row("pairs", f"{p}/related", float(r["related"]), n=1, note="related by construction (1) or not (0)")
        )
    if pair["reason"] is not None:
        for stat in ("spearman/frechet", "partial_spearman/frechet", "unrelated_minus_related"):
            out.append(_row("pair_similarity", stat, n=pair.get("pairs", len(table)), note=pair["reason"]))
        return out
    tasks = pair["tasks"]

    def correlation_rows(stat, r):
        if r.get("reason"):
            return [_row("pair_similarity", stat, n=tasks, note=r["reason"])]
        kind = "exact" if r["exact"] else "Monte Carlo"
        note = f"unit: tasks ({tasks}); {r['pairs']} pairs; CI: task bootstrap" + (
            f" ({r['degenerate']} degenerate resamples left out)" if r["degenerate"] else ""
        )
        p_note = (
            (r["p_reason"] or "")
            if not np.isfinite(r["p"])
            else (f"{kind} permutation test over task labels ({r['permutations']} permutations), two-sided")
        )
        return [
            _row("pair_similarity", stat, r["value"], r["ci"], tasks, note),
            _row("pair_similarity", f"{stat}/p", r["p"], n=r["permutations"], note=p_note or "not available"),
        ]

    for measure, r in pair["spearman"].items():
        out += correlation_rows(f"spearman/{measure}", r)
    out += correlation_rows("partial_spearman/frechet", pair["partial"])
    rel = pair["related"]
    counts = f"{len(rel['related'])} related pairs, {len(rel['unrelated'])} unrelated pairs"
    out.append(
        _row(
            "pair_similarity",
            "related_retention",
            rel["related"].mean() if len(rel["related"]) else None,
            n=len(rel["related"]),
            note="mean pair retention of pairs related by construction" if len(rel["related"]) else "no related pairs",
        )
    )
    out.append(
        _row(
            "pair_similarity",
            "unrelated_retention",
            rel["unrelated"].mean() if len(rel["unrelated"]) else None,
            n=len(rel["unrelated"]),
            note="mean pair retention of unrelated pairs" if len(rel["unrelated"]) else "no unrelated pairs",
        )
    )
    if "difference" in rel:
        kind = "exact" if rel["exact"] else "Monte Carlo"
        out.append(
            _row(
                "pair_similarity",
                "unrelated_minus_related",
                rel["difference"],
                n=len(rel["related"]) + len(rel["unrelated"]),
                note=counts,
            )
        )
        out.append(
            _row(
                "pair_similarity",
                "unrelated_minus_related/p",
                rel["p"],
                n=rel["splits"],
                note=f"{kind} permutation test over pair labels ({rel['splits']} splits), two-sided",
            )
        )
    else:
        out.append(
            _row(
                "pair_similarity",
                "unrelated_minus_related",
                n=len(rel["related"]) + len(rel["unrelated"]),
                note=f"needs related and unrelated pairs ({counts})",
            )
        )
    low, high = pair["distance_spread"]
    out.append(_row("pair_similarity", "frechet/min", low, n=pair["pairs"], note="smallest Fréchet distance of a pair"))
    out.append(_row("pair_similarity", "frechet/max", high, n=pair["pairs"], note="largest Fréchet distance of a pair"))
    out.append(
        _row(
            "pair_similarity",
            "frechet/ratio",
            high / low if low > 0 else None,
            n=pair["pairs"],
            note="largest / smallest Fréchet distance" if low > 0 else "smallest distance is 0",
        )
    )
    return out


def sensitivity(inputs: StudyInputs, verdicts: dict) -> list[dict]:
    """Every verdict recomputed leaving out each kept task in turn (its groups and pairs dropped)."""
    tasks = task_table(inputs, inputs.merges)
    kept = [t for t in inputs.tasks if not tasks.loc[t, "excluded"]]
    out, changed = [], {claim: [] for claim in verdicts}
    for task in kept:
        _, without = analyse(inputs, leave_out=task, full=False)
        for claim, (verdict, reason) in without.items():
            word = VERDICT_WORDS.get(verdict, "not available")
            out.append(
                _row("sensitivity", f"{claim}/without={task}", verdict, n=len(kept) - 1, note=f"{word}: {reason}")
            )
            if verdict != verdicts[claim][0]:
                changed[claim].append(task)
    for claim, flips in changed.items():
        note = (
            f"the verdict changes when {', '.join(flips)} is left out"
            if flips
            else "no single task's removal changes the verdict"
            if kept
            else "no kept tasks"
        )
        out.append(
            _row("sensitivity", f"{claim}/single_task_dependence", len(flips) if kept else None, n=len(kept), note=note)
        )
    return out


def compute_rows(inputs: StudyInputs) -> list[dict]:
    """Every findings row: figures, pair table, claims and the sensitivity table."""
    rows, verdicts = analyse(inputs)
    return rows + sensitivity(inputs, verdicts)


def report_path(db) -> Path:
    """Where the findings of the database `db` are written: reports/findings.md for the default study's
    results.duckdb; beside any other database, named after it (`mine.duckdb` -> `mine.findings.md`), except a
    database called results.duckdb, whose report keeps the name findings.md (runs/<profile>/findings.md). So two
    studies in one folder keep two reports."""
    db = Path(db)
    if db.resolve() == DEFAULT_DB_PATH:
        return REPO_ROOT / "reports" / "findings.md"
    if db.name == "results.duckdb":
        return db.parent / "findings.md"
    return db.parent / (db.name.removesuffix(".duckdb") + ".findings.md")


class FindingsStage:
    def __init__(self, config: StudyConfig, store: Store, report: Path | None = None, device: str = "cpu"):
        """`report`: the Markdown file written (default: `report_path(config.db)`); `device`: where the similarity
        stage's image features are computed (run_all passes its process's)."""
        self.config, self.store = config, store
        self.report = Path(report) if report is not None else report_path(config.db)
        self.device = device
        self.run_id = study_run_id(config)
        self.rules = ExclusionRules.from_config(config)

    # -- similarity ------------------------------------------------------------------------------
    def compute_similarity(self) -> int:
        stored = {tuple(r) for r in self.store.query("SELECT task_a, task_b, measure, seed FROM similarities")}
        todo = [
            (a, b, seed)
            for a, b in pairs(self.config.tasks)
            for seed in self.config.seeds
            if any((a, b, m, seed) not in stored for m in MEASURES)
        ]
        if not todo:
            return 0
        backbone = create_backbone(self.config.backbone_config)
        preprocess = make_preprocess(self.config.backbone_config, backbone)
        fast_backbone = prepared_copy(backbone)
        features = {
            t: extract_features(
                fast_backbone, split_tensors(t, "test", preprocess, self.config.merge_eval)[0], device=self.device
            )
            for t in self.config.tasks
        }
        adapters = {}
        for task in self.config.tasks:
            for seed in self.config.seeds:
                path = self.store.query(
                    "SELECT path FROM models WHERE model_id = ?", [self.config.model_id("adapter", task, seed)]
                )
                adapters[(task, seed)] = load_deltas(resolve_stored_path(path[0][0])) if path else None
        config = {"backbone": self.config.backbone_config.to_dict(), "frechet_images_per_task": self.config.merge_eval}
        frechet = {}  # data-level: depends on the pair only, not on the seed
        for a, b, seed in tqdm(todo, desc="similarity", unit="pair"):
            if (a, b) not in frechet:
                frechet[(a, b)] = frechet_distance(features[a], features[b])
            values = {"frechet": frechet[(a, b)]}
            if adapters[(a, seed)] is not None and adapters[(b, seed)] is not None:
                values["adapter_cosine"] = adapter_cosine(adapters[(a, seed)], adapters[(b, seed)])
                values["subspace_alignment"] = subspace_alignment(adapters[(a, seed)], adapters[(b, seed)])
            with self.store.write() as con:
                for measure, value in values.items():
                    insert_row(
                        con,
                        "similarities",
                        {
                            "task_a": a,
                            "task_b": b,
                            "measure": measure,
                            "value": value,
                            "seed": seed,
                            "config": config,
                            "run_id": self.run_id,
                            "created_at": now(),
                        },
                        key=("task_a", "task_b", "measure", "seed"),
                    )
        return len(todo)

    # -- findings --------------------------------------------------------------------------------
    def load_inputs(self) -> StudyInputs:
        """The study's rows from the store: its tasks' merges, its own models' test results and norms."""
        tasks = tuple(sorted(self.config.tasks))
        merges = self.store.query_df("SELECT * FROM merge_results")
        merges = merges.loc[merges["tasks"].map(lambda g: set(g.split(",")) <= set(tasks)).astype(bool)]
        ids = {
            self.config.model_id(kind, task, seed): kind
            for kind in ("adapter", "head")
            for task in tasks
            for seed in self.config.seeds
        }
        results = self.store.query_df("SELECT task, model_kind, seed, accuracy, n_test, model_id FROM task_results")
        results = results[results["model_id"].isin(ids)]
        norms = self.store.query_df("SELECT model_id, task, seed, update_norm FROM adapter_update_norms")
        norms = norms[norms["model_id"].isin(ids)]
        similarity = self.store.query_df(
            "SELECT task_a, task_b, measure, avg(value) AS value FROM task_similarity GROUP BY ALL"
        )
        return StudyInputs(prepare_merges(merges), results, norms, similarity, tasks, self.rules)

    def compute_findings(self) -> list[dict]:
        return compute_rows(self.load_inputs())

    def stored_findings(self) -> dict[tuple, tuple]:
        """(finding, statistic) -> (value, ci_low, ci_high, n, note, run_id) as stored now."""
        columns = "finding, statistic, value, ci_low, ci_high, n, note, run_id"
        return {(r[0], r[1]): tuple(r[2:]) for r in self.store.query(f"SELECT {columns} FROM finding_rows")}

    def store_findings(self, rows: list[dict]) -> bool:
        """Replace the stored findings with `rows`; returns False (and writes nothing) when they are the same.

        A run with nothing new computes exactly the stored figures again (fixed bootstrap seed), and
        leaving the file untouched keeps a fresh clone's results.duckdb byte-identical.
        """
        fields = ("value", "ci_low", "ci_high", "n", "note")
        wanted = {(r["finding"], r["statistic"]): (*(r[f] for f in fields), self.run_id) for r in rows}
        if wanted == self.stored_findings():
            return False
        with self.store.write() as con:  # derived figures: replaced as a whole, in one transaction
            con.execute("DELETE FROM finding_rows")
            for row in rows:
                insert_row(
                    con,
                    "finding_rows",
                    {**row, "run_id": self.run_id, "created_at": now()},
                    key=("finding", "statistic"),
                )
        return True

    # -- report ----------------------------------------------------------------------------------
    def write_report(self) -> None:
        findings = self.store.query_df("SELECT * FROM findings")
        text = render_report(findings, self.rules, Path(self.config.db).name)
        if self.report.exists() and self.report.read_text() == text:
            return  # unchanged: the file (and its timestamp) is left alone
        self.report.parent.mkdir(parents=True, exist_ok=True)
        self.report.write_text(text)

    def run(self) -> dict:
        computed = self.compute_similarity()
        rows = self.compute_findings()
        changed = self.store_findings(rows)
        self.write_report()
        return {"pairs": computed, "findings": len(rows), "changed": changed}


# -- report ----------------------------------------------------------------------------------------


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or pd.isna(value)


def _cell(row, scale=100.0, digits=1, unit=" %", show_n=False) -> str:
    """'value [low, high]' (or 'n/a (reason)'); the CI part is left out where it is NULL."""
    if row is None:
        return ""
    if _is_null(row["value"]):
        return f"n/a ({row['note']})"
    text = f"{row['value'] * scale:.{digits}f}{unit}"
    if not _is_null(row["ci_low"]):
        text += f" [{row['ci_low'] * scale:.{digits}f}, {row['ci_high'] * scale:.{digits}f}]"
    return text + (f" (n={row['n']})" if show_n else "")


def _split_stat(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows named "method/k=K[/rest]" with `method`, `k` and `rest` columns."""
    rows = rows.copy()
    parts = rows["statistic"].str.extract(r"^(.+?)/k=(\d+)(?:/(.+))?$")
    rows["method"], rows["k"], rows["rest"] = parts[0], parts[1].astype(int), parts[2]
    return rows


def _task_of(statistic: str) -> str:
    """The task of a "task" finding's statistic "<task>/<figure>": everything before the last "/", so a task
    name with slashes (hub:user/name, hub:./data/pets) stays whole."""
    return statistic.rsplit("/", 1)[0]


def render_report(findings: pd.DataFrame, rules: ExclusionRules | None = None, database: str = "results.duckdb") -> str:
    """The findings as Markdown; every figure comes from the `findings` view. `rules`: the exclusion rules in
    force (the text states them; default: ExclusionRules()); `database`: the file's name, as the header gives it."""
    rules = rules or ExclusionRules()
    f = findings.copy()
    lookup = {(r["finding"], r["statistic"]): r for _, r in f.iterrows()}

    def get(finding, statistic):
        return lookup.get((finding, statistic))

    def of(finding):
        return f[f["finding"] == finding]

    lines = [
        "# Findings",
        "",
        f"Generated by `python training/run_all.py` (stage `findings`) from `{database}`; do not edit by hand. "
        f"Brackets: 95 % CI. CIs of per-(method, k) figures bootstrap merged groups (task sets; {BOOTSTRAP} "
        "resamples, fixed seeds), a group's value being its mean over its seeds and tasks; pair statistics "
        "resample tasks and take exact permutation p-values. Retention = merged / single-adapter accuracy on "
        "the same images.",
        "",
    ]
    tasks = of("task")
    if tasks.empty:
        return "\n".join(lines + ["No merges stored yet."]) + "\n"
    names = sorted({_task_of(s) for s in tasks["statistic"]})
    own_rules = (
        ""
        if rules == ExclusionRules()
        else f" These are this study's thresholds; the defaults are {ExclusionRules().text()}."
    )
    lines += [
        "## Tasks",
        "",
        f"A task is excluded by rule (never by hand) when {rules.text()}: such a task says nothing about merging. "
        f"Its rows are left out of every figure and claim below.{own_rules}",
        "",
        "| task | adapter accuracy | head accuracy | merge evaluation images | flag |",
        "|---|---|---|---|---|",
    ]
    excluded = []
    for name in names:
        adapter, head = get("task", f"{name}/adapter_accuracy"), get("task", f"{name}/head_accuracy")
        merge_n, flag = get("task", f"{name}/merge_eval_n"), get("task", f"{name}/excluded")
        is_out = flag is not None and flag["value"] == 1
        if is_out:
            excluded.append(f"- {name}: {flag['note']}.")
        lines.append(
            f"| {name} | {_cell(adapter)} (n={adapter['n'] if adapter is not None else 0}) "
            f"| {_cell(head)} (n={head['n'] if head is not None else 0}) "
            f"| {_cell(merge_n, scale=1, digits=0, unit='')} "
            f"| {'excluded (below)' if is_out else 'kept'} |"
        )
    if not excluded:
        lines += ["", "Excluded: none.", ""]
    else:
        every = (
            " Every task is excluded, so no figure or claim below can be computed: the options named here include "
            "a task in a study of few or easy images."
            if len(excluded) == len(names)
            else ""
        )
        lines += [
            "",
            f"Excluded: {len(excluded)} of {len(names)} tasks; for each, the rule it fails, its figure and what "
            f"would include it (an option of `python training/run_all.py`, or more images).{every}",
            "",
            *excluded,
            "",
        ]

    retention = of("retention_vs_k")
    if retention.empty:
        lines += ["No (method, k) figures: no merge rows of kept tasks.", ""]
    else:
        retention = _split_stat(retention)
        lines += [
            "## Retention by method and group size",
            "",
            "Worst task: the task with the lowest mean retention (mean over the groups containing it); its CI "
            "bootstraps those groups. min / max / sd: over the tasks' mean retentions.",
            "",
            "| method | k | retention [CI] | unit | worst task [CI] | min | max | sd |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for _, r in retention.sort_values(["method", "k"]).iterrows():
            stat = r["statistic"]
            worst = get("worst_task", stat)
            worst_text = (
                f"{worst['note'].split(';')[0].removeprefix('worst task: ')}: {_cell(worst)}"
                if worst is not None
                else ""
            )
            spread = [get("retention_spread", f"{stat}/{s}") for s in ("min", "max", "sd")]
            lines.append(
                f"| {r['method']} | {r['k']} | {_cell(r)} | {r['note']} | {worst_text} | "
                + " | ".join(_cell(s) if s is not None else "" for s in spread)
                + " |"
            )
        lines.append("")
    chosen = of("chosen_method")
    if not chosen.empty:
        chosen = _split_stat(chosen).sort_values("k")
        lines += [
            "## Method chosen per k on validation",
            "",
            "The method with the highest mean `chosen_validation_accuracy` over the k's merges (validation "
            "split, never test); the claims are judged on it.",
            "",
            "| k | chosen method | mean validation accuracy | merges |",
            "|---|---|---|---|",
        ]
        for _, r in chosen.iterrows():
            lines.append(f"| {r['k']} | {r['method']} | {_cell(r)} | {r['n']} |")
        lines.append("")
        per_task = of("task_retention")
        if not per_task.empty:
            per_task = _split_stat(per_task)
            picked = {(r["method"], r["k"]) for _, r in chosen.iterrows()}
            per_task = per_task[[(m, k) in picked for m, k in zip(per_task["method"], per_task["k"])]]
            ks = sorted(per_task["k"].unique())
            lines += [
                "Per-task retention of the chosen method (mean over the groups containing the task; n = groups):",
                "",
                "| task | " + " | ".join(f"k={k}" for k in ks) + " |",
                "|---|" + "---|" * len(ks),
            ]
            for task, group in per_task.groupby("rest"):
                by_k = {r["k"]: f"{_cell(r)} (n={r['n']})" for _, r in group.iterrows()}
                lines.append(f"| {task} | " + " | ".join(by_k.get(k, "") for k in ks) + " |")
            lines.append("")
    diff = of("merged_minus_head")
    if not diff.empty:
        diff = _split_stat(diff)
        lines += [
            "## Merged minus head accuracy",
            "",
            "Points of accuracy, merged model minus head baseline on the same images, group CI. Real wins / "
            f"losses: (merge, task) rows where McNemar's exact test gives p < {ALPHA} in favour of the merged "
            "model / of the head. Normalized gain = (merged − head) / (single − head), averaged only over rows "
            "where it is defined.",
            "",
            "| method | k | merged − head, points [CI] | real wins | real losses | normalized gain [CI] |",
            "|---|---|---|---|---|---|",
        ]
        for _, r in diff.sort_values(["method", "k"]).iterrows():
            stat = r["statistic"]
            wins, losses, gain = get("real_wins", stat), get("real_losses", stat), get("normalized_gain", stat)
            count = lambda row: row["note"].split(":")[0] if row is not None and not _is_null(row["value"]) else "n/a"  # noqa: E731
            lines.append(
                f"| {r['method']} | {r['k']} | {_cell(r, scale=1, unit='')} | {count(wins)} | {count(losses)} "
                f"| {_cell(gain, scale=1, digits=2, unit='')}"
                + (f"; {gain['note'].split('; unit')[0]}" if gain is not None else "")
                + " |"
            )
        lines.append("")
    lines += _data_aware_section(of)
    lines += _pair_section(of, get)
    lines += ["## The paper's three claims", ""]
    for i, (claim, title) in enumerate(CLAIMS.items(), start=1):
        row = get("claims", claim)
        verdict = "not available" if row is None or _is_null(row["value"]) else VERDICT_WORDS[int(row["value"])]
        detail = row["note"].split(": ", 1)[1] if row is not None and ": " in row["note"] else ""
        lines.append(f"{i}. *{title}*: **{verdict}**. Rule: {RULES[claim]}. Statistics: {detail}.")
    lines.append("")
    sens = of("sensitivity")
    left_out = sorted({s.partition("/without=")[2] for s in sens["statistic"] if "/without=" in s})
    if not sens.empty and not left_out:
        lines += [
            "## Sensitivity: each verdict with one task left out",
            "",
            "No task is kept, so none is left out.",
            "",
        ]
    elif not sens.empty:
        lines += [
            "## Sensitivity: each verdict with one task left out",
            "",
            "Every verdict recomputed without each kept task in turn (all groups and pairs containing it dropped).",
            "",
            "| claim | verdict | " + " | ".join(f"without {t}" for t in left_out) + " | depends on a single task? |",
            "|---|---|" + "---|" * len(left_out) + "---|",
        ]
        word = lambda row: "n/a" if row is None or _is_null(row["value"]) else VERDICT_WORDS[int(row["value"])]  # noqa: E731
        for claim in CLAIMS:
            dep = get("sensitivity", f"{claim}/single_task_dependence")
            depends = (
                "n/a"
                if dep is None or _is_null(dep["value"])
                else (("yes: " if dep["value"] > 0 else "no: ") + dep["note"])
            )
            lines.append(
                f"| {claim} | {word(get('claims', claim))} | "
                + " | ".join(word(get("sensitivity", f"{claim}/without={t}")) for t in left_out)
                + f" | {depends} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _data_aware_section(of) -> list[str]:
    rows = of("data_aware")
    if rows.empty:
        return []
    lines = [
        "## Data-aware methods against the best data-free method, at the largest k",
        "",
        "Each data-aware method (RegMean: Gram matrices of training images; AdaMerging: coefficients learned "
        "on the unlabeled TEST images it is then scored on, i.e. transductive, as in its paper) against the "
        "data-free method with the best mean validation accuracy over the very same merges (AdaMerging runs "
        "on seed 0 only). Difference in points of test accuracy; positive = the data-aware method is better.",
        "",
        "| method / k / task | difference, points | detail |",
        "|---|---|---|",
    ]
    for _, r in rows.iterrows():
        lines.append(f"| {r['statistic']} | {_cell(r, scale=1, digits=1, unit='')} | {r['note']} |")
    return lines + [""]


def _pair_section(of, get) -> list[str]:
    pairs_rows = of("pairs")
    stats_rows = of("pair_similarity")
    lines = [
        "## Pair merges (k = 2) against task similarity",
        "",
        "Pair retention: the k = 2 chosen method's retention of the pair, mean over seeds and the pair's two "
        "tasks. Norm ratio: |log(norm_a / norm_b)| of the adapters' update norms (mean over seeds). Related: "
        "related by construction (same label space or same style).",
        "",
    ]
    if not pairs_rows.empty:
        names = sorted({s.rsplit("/", 1)[0] for s in pairs_rows["statistic"]})
        lines += ["| pair | related | Fréchet distance | norm ratio | retention |", "|---|---|---|---|---|"]
        for p in names:
            rel = get("pairs", f"{p}/related")
            fmt = lambda row, d=2: "n/a" if row is None or _is_null(row["value"]) else f"{row['value']:.{d}f}"  # noqa: E731
            retention = get("pairs", f"{p}/retention")
            lines.append(
                f"| {p.replace(',', ' + ')} | {'yes' if rel is not None and rel['value'] == 1 else 'no'} "
                f"| {fmt(get('pairs', f'{p}/frechet'))} | {fmt(get('pairs', f'{p}/log_norm_ratio'), 3)} "
                f"| {_cell(retention)} |"
            )
        lines.append("")
    for _, r in stats_rows.iterrows():
        stat = r["statistic"]
        if stat.endswith("/p"):
            continue
        percent = stat in ("related_retention", "unrelated_retention", "unrelated_minus_related")
        if _is_null(r["value"]):
            text = f"n/a ({r['note']})"
        elif percent:
            text = _cell(r) + (" points" if stat == "unrelated_minus_related" else "")
            text = text.replace(" % points", " points")
        else:
            text = f"{r['value']:.2f}" + (
                f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if not _is_null(r["ci_low"]) else ""
            )
        p = get("pair_similarity", f"{stat}/p")
        if p is not None and not _is_null(p["value"]):
            text += f", p = {p['value']:.4f} ({p['note']})"
        lines.append(f"- {stat}: {text} (n={r['n']}; {r['note']})" if not _is_null(r["value"]) else f"- {stat}: {text}")
    return lines + [""]
