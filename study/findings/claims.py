"""The paper's three claims: each one object holding its statement, its rule in words and the code that judges it.

The report and the `claim_rules` rows print `Claim.rule`; `Claim.judge` applies the same thresholds, named once
above the rules (RETENTION_BAR, WORST_TASK_BAR, ALPHA, CHANCE_WIN_RATE), so the text and the verdict cannot
drift apart. The method a claim is judged on is the one chosen per k on validation, never on test. The rules
themselves (`claim1_rule`, ...) are pure: small DataFrames in, (verdict, reason) out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from mlvision.claims import CLAIM_STATEMENTS, CONTRADICTED, INCONCLUSIVE, SUPPORTED, UNTESTABLE
from study.findings.figures import FAMILIES
from study.findings.inputs import ALPHA, BASELINE_NAMES
from study.findings.pairs import POWER_BAR, POWER_RHO, POWER_RHOS, p_text

# Claim thresholds. 90 %: the usual bar for "normalized accuracy" (merged / individual) in the merging
# literature; 80 %: no task may be sacrificed for the average.
RETENTION_BAR = 0.90
WORST_TASK_BAR = 0.80
# Under the null a two-sided 5 % McNemar test calls a row a real win with probability at most 2.5 %.
CHANCE_WIN_RATE = ALPHA / 2

CLAIM2_MISSING = "the pre-registered test's ρ or p-value is not available"


@dataclass(frozen=True)
class Evidence:
    """What the claims are judged on: the method chosen per k (figures.choose_methods), overall and per family
    (figures.choose_by_family), the (method, k) cells' figures (figures.cells_of), the pair figures at k = 2
    (pairs.pair_figures) and the stronger baseline (`stronger_baseline`)."""

    chosen: dict[int, dict]
    cells: dict[tuple[str, int], dict]
    pair: dict
    by_family: dict[str, dict[int, dict]] = None
    baseline: str = "head"


@dataclass(frozen=True)
class Claim:
    """One claim: what the report states, the rule it states, and the code that applies that rule."""

    name: str  # the statistic of its `claims`, `claim_rules` and `sensitivity` rows ("claim1")
    statement: str  # the paper's words (mlvision/claims.py), the report's title for it
    rule: str  # the rule in words, printed by the report and stored as the `claim_rules` row's note
    figures: Callable[[Evidence], pd.DataFrame | str]  # the table its rule reads, or why there is none
    decide: Callable[[pd.DataFrame], tuple[int | None, str]]  # the rule as code: (verdict or None, reason)

    def judge(self, evidence: Evidence) -> tuple[int | None, str]:
        """(verdict or None, reason): the rule applied to this study's figures, or why it cannot be."""
        figures = self.figures(evidence)
        if isinstance(figures, str):
            return None, figures
        return self.decide(figures)


# -- the figures each rule reads, from the evidence ------------------------------------------------


def claim1_figures(evidence: Evidence, family: str) -> pd.DataFrame | str:
    """The family's validation-chosen method's retention (CI over tasks) and worst task at k = 2 and 3
    (`claim1_rule`'s table)."""
    chosen, figures = (evidence.by_family or {}).get(family, {}), {}
    for k in (2, 3):
        c = chosen.get(k)
        if c and c["method"] is not None and (c["method"], k) in evidence.cells:
            cell = evidence.cells[(c["method"], k)]
            mean, low, high, _ = cell["retention_tasks"]
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
            return f"k = {k}: no merges of a {FAMILIES[family][0]} method"
        if chosen[k]["method"] is None:
            return f"k = {k}: {chosen[k]['note']}"
        return f"k = {k}: no rows of kept tasks for {chosen[k]['method']}"

    unchosen = [why_missing(k) for k in (2, 3) if k not in figures]
    if unchosen:
        return "; ".join(unchosen)
    return pd.DataFrame.from_dict(figures, orient="index").astype(object).fillna(np.nan)


def claim2_figures(evidence: Evidence) -> pd.DataFrame | str:
    """The pre-registered test's ρ, p-value and power (`claim2_rule`'s table: one row), or why it is not
    available."""
    pair = evidence.pair
    if pair["reason"] is not None:
        return pair["reason"]
    pre = pair["preregistered"]
    if pre["reason"] is not None:
        return pre["reason"]
    row = {"value": pre["value"], "p": pre["p"], "pairs": pre["pairs"], "tasks": pre["tasks"]}
    row.update({f"power_{rho}": pre["power"][rho] for rho in POWER_RHOS})
    return pd.DataFrame([row], index=["preregistered"])


def stronger_baseline(rows: pd.DataFrame) -> str:
    """The baseline claim 3 is judged against: of those scored on every kept task's merge images, the one with the
    higher mean accuracy over tasks (each task's mean over its rows). Chosen on test accuracy, which can only make
    the claim harder: a merge must beat whichever baseline is better on the images it is scored on."""
    means = {"head": rows.groupby("task")["head_accuracy"].mean()}
    if "probe_accuracy" in rows and rows["probe_accuracy"].notna().all():
        means["probe"] = rows.groupby("task")["probe_accuracy"].mean()
    return max(means, key=lambda name: (float(means[name].mean()), name == "probe"))


def claim3_figures(evidence: Evidence) -> pd.DataFrame | str:
    """The chosen method against the stronger baseline per k (`claim3_rule`'s table): merged − baseline with a CI
    over tasks, real wins and the task-resampled CI of the real-win share; the weaker baseline's figures beside."""
    figures = {}
    for k, c in sorted(evidence.chosen.items()):
        if c["method"] is not None and (c["method"], k) in evidence.cells:
            cell = evidence.cells[(c["method"], k)]
            against = cell["baselines"][evidence.baseline]
            if not against["available"]:
                continue
            mean, low, high, _ = against["diff_tasks"]
            share, share_low, share_high, _ = against["win_share_tasks"]
            others = [b for b, f in cell["baselines"].items() if b != evidence.baseline and f["available"]]
            figures[k] = {
                "method": c["method"],
                "baseline": evidence.baseline,
                "diff": mean,
                "diff_low": low,
                "diff_high": high,
                "wins": against["wins"],
                "rows": against["mcnemar_rows"],
                "wins_low": share_low,
                "beside": "; ".join(
                    f"against the {BASELINE_NAMES[b]}: {cell['baselines'][b]['diff_tasks'][0]:+.1f} points, "
                    f"real wins {cell['baselines'][b]['wins']} of {cell['baselines'][b]['mcnemar_rows']}"
                    for b in others
                ),
            }
    table = pd.DataFrame.from_dict(figures, orient="index")
    if table.empty:
        return "no merges of a validation-chosen method"
    return table.astype(object).fillna(np.nan)


# -- the rules, as code ----------------------------------------------------------------------------


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
    """Claim 2 from the pre-registered test: `figures` has one row with value (ρ), p, pairs, tasks and
    power_<ρ> for each of POWER_RHOS. Symmetric: the same evidence is needed either way."""
    r = figures.iloc[0]
    if not _finite(r["value"], r["p"]):
        return None, CLAIM2_MISSING
    powers = ", ".join(f"{rho}: {r[f'power_{rho}']:.0%}" for rho in POWER_RHOS)
    text = (f"ρ {r['value']:.2f}, p = {p_text(r['p'])} ({int(r['pairs'])} pairs of {int(r['tasks'])} tasks); power at "
            f"ρ = {powers}")  # fmt: skip
    if r["p"] < ALPHA:
        return (SUPPORTED if r["value"] > 0 else CONTRADICTED), text
    if r[f"power_{POWER_RHO}"] < POWER_BAR:
        return UNTESTABLE, text + (f": below {POWER_BAR:.0%} at ρ = {POWER_RHO}, a study this size would miss a "
                                   "real effect of that size more often than not")  # fmt: skip
    return INCONCLUSIVE, text


def claim3_rule(figures: pd.DataFrame) -> tuple[int | None, str]:
    """Claim 3 from the chosen method's figures per k against the stronger baseline: index k; columns method,
    baseline, diff, diff_low, diff_high (points; CI over tasks, NaN where there is none), wins, rows, wins_low
    (lower bound of the real-win share's CI over tasks; NaN without per-image outcomes), beside (the weaker
    baseline's figures, text). Only k with a CI are judged."""
    rows = figures[figures["diff_low"].notna() & figures["diff_high"].notna()]
    if rows.empty:
        return None, "no k with a CI over tasks"
    text = "; ".join(
        f"k = {k} ({r['method']}): merged − {BASELINE_NAMES[r['baseline']]} {r['diff']:+.1f} points "
        f"[{r['diff_low']:+.1f}, {r['diff_high']:+.1f}], "
        + (
            f"real wins {int(r['wins'])} of {int(r['rows'])} (share's lower bound {r['wins_low']:.3f})"
            if _finite(r["wins_low"])
            else "no per-image outcomes"
        )
        + (f" ({r['beside']})" if r.get("beside") else "")
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


# -- the claims ------------------------------------------------------------------------------------


def _claim1_rule_text(family: str) -> str:
    return (
        f"for the {FAMILIES[family][0]} method chosen on validation at k = 2 and at k = 3: supported if at both k "
        f"the mean retention's CI over tasks (tasks resampled, a group weighted by its tasks' multiplicities) has "
        f"lower bound >= {RETENTION_BAR:.2f} and the worst task's mean retention >= {WORST_TASK_BAR:.2f}; "
        f"contradicted if at either k that CI's upper bound < {RETENTION_BAR:.2f} or the worst task's retention CI "
        f"upper bound < {WORST_TASK_BAR:.2f} (CI over the groups containing that task); inconclusive otherwise. "
        f"{RETENTION_BAR:.0%} of single-adapter accuracy is the usual bar of the merging literature's normalized "
        f"accuracy; {WORST_TASK_BAR:.0%} for the worst task"
    )


CLAIMS = (
    Claim(
        "claim1",
        CLAIM_STATEMENTS["claim1"],
        _claim1_rule_text("data_free"),
        lambda evidence: claim1_figures(evidence, "data_free"),
        claim1_rule,
    ),
    Claim(
        "claim1_data_aware",
        CLAIM_STATEMENTS["claim1_data_aware"],
        _claim1_rule_text("data_aware"),
        lambda evidence: claim1_figures(evidence, "data_aware"),
        claim1_rule,
    ),
    Claim(
        "claim2",
        CLAIM_STATEMENTS["claim2"],
        "pre-registered before the twenty-task study ran (issue 33). Pair retention = the k = 2 validation-chosen "
        "method's retention of the pair (mean over seeds and the pair's two tasks). Pair retention, the pair's "
        "Fréchet distance and the covariate |log(norm_a / norm_b)| of the adapters' update norms each have additive "
        "task main effects removed (least squares: a task hard to merge or far from every task moves all its pairs; "
        "pair difficulty, the mean of the two single accuracies, is additive and goes with them); the statistic is "
        "the partial Spearman ρ of the two residuals given the covariate's; its p-value a permutation test over "
        f"task labels of the distance matrix (exact up to 8 tasks, else 9,999 relabellings; two-sided). Supported "
        f"if ρ > 0 and p < {ALPHA}; contradicted if ρ < 0 and p < {ALPHA}; otherwise untestable at this size if "
        f"the test's power at a true ρ = {POWER_RHO} (simulated on this study's own distance matrix and "
        f"covariate, {', '.join(map(str, POWER_RHOS))} reported) is below {POWER_BAR:.0%}, else inconclusive. "
        "Related pairs by kind (same images, labels, style) are reported beside, not judged",
        claim2_figures,
        claim2_rule,
    ),
    Claim(
        "claim3",
        CLAIM_STATEMENTS["claim3"],
        "for the validation-chosen method at each k with a CI over tasks, against the stronger of the two one-pass "
        "baselines (the last-layer head and the multi-layer linear probe: the one with the higher mean test "
        "accuracy over tasks on the merges' images; the weaker's figures are shown beside): supported if at some k "
        "the mean merged − baseline accuracy has CI lower bound > 0, or the share of (merge, task) rows that are "
        f"real wins (McNemar exact p < {ALPHA}, merged right more often) has a CI lower bound > "
        f"{CHANCE_WIN_RATE:.3f} (the rate expected by chance from a two-sided 5 % test); contradicted if at every "
        f"such k the mean's CI upper bound < 0 and the real-win share's CI lower bound <= {CHANCE_WIN_RATE:.3f}; "
        "inconclusive otherwise. Both CIs resample tasks (a row weighted by its group's tasks' multiplicities): "
        "rows of one task share its baseline model and images",
        claim3_figures,
        claim3_rule,
    ),
)
