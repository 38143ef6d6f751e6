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

from mlvision.claims import CLAIM_STATEMENTS, CONTRADICTED, INCONCLUSIVE, SUPPORTED
from study.findings.inputs import ALPHA
from study.statistics import MIN_GROUPS, wilson

# Claim thresholds. 90 %: the usual bar for "normalized accuracy" (merged / individual) in the merging
# literature; 80 %: no task may be sacrificed for the average.
RETENTION_BAR = 0.90
WORST_TASK_BAR = 0.80
# Under the null a two-sided 5 % McNemar test calls a row a real win with probability at most 2.5 %.
CHANCE_WIN_RATE = ALPHA / 2

CLAIM2_MISSING = "ρ or partial ρ (or its CI or p-value) not available"


@dataclass(frozen=True)
class Evidence:
    """What the claims are judged on: the method chosen per k (figures.choose_methods), the (method, k) cells'
    figures (figures.cells_of) and the pair figures at k = 2 (pairs.pair_figures)."""

    chosen: dict[int, dict]
    cells: dict[tuple[str, int], dict]
    pair: dict


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


def claim1_figures(evidence: Evidence) -> pd.DataFrame | str:
    """The chosen method's retention and worst task at k = 2 and 3 (`claim1_rule`'s table)."""
    chosen, figures = evidence.chosen, {}
    for k in (2, 3):
        c = chosen.get(k)
        if c and c["method"] is not None and (c["method"], k) in evidence.cells:
            cell = evidence.cells[(c["method"], k)]
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
    if unchosen:
        return "; ".join(unchosen)
    return pd.DataFrame.from_dict(figures, orient="index").astype(object).fillna(np.nan)


def claim2_figures(evidence: Evidence) -> pd.DataFrame | str:
    """ρ and partial ρ of pair retention with the Fréchet distance (`claim2_rule`'s table), or the reasons they
    are not available."""
    pair = evidence.pair
    if pair["reason"] is not None:
        return pair["reason"]
    correlations = (pair["spearman"]["frechet"], pair["partial"])
    table = pd.DataFrame.from_dict(
        {
            name: {"value": r.get("value", np.nan), "ci_low": r.get("ci", (np.nan,) * 2)[0],
                   "ci_high": r.get("ci", (np.nan,) * 2)[1], "p": r.get("p", np.nan)}
            for name, r in zip(("spearman", "partial"), correlations)
        },
        orient="index",
    )  # fmt: skip
    if not _complete(table):
        reasons = [r["reason"] for r in correlations if r.get("reason")]
        reasons += [r["p_reason"] for r in correlations if r.get("p_reason")]
        return "; ".join(reasons) or CLAIM2_MISSING
    return table


def claim3_figures(evidence: Evidence) -> pd.DataFrame | str:
    """The chosen method's merged − head difference and real wins per k (`claim3_rule`'s table)."""
    figures = {}
    for k, c in sorted(evidence.chosen.items()):
        if c["method"] is not None and (c["method"], k) in evidence.cells:
            cell = evidence.cells[(c["method"], k)]
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
    table = pd.DataFrame.from_dict(figures, orient="index")
    if table.empty:
        return "no merges of a validation-chosen method"
    return table.astype(object).fillna(np.nan)


# -- the rules, as code ----------------------------------------------------------------------------


def _complete(rows: pd.DataFrame) -> bool:
    """Whether each of claim 2's correlations has its value, CI and p-value."""
    return all(_finite(r["value"], r["ci_low"], r["ci_high"], r["p"]) for _, r in rows.iterrows())


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
    if not _complete(rows):
        return None, CLAIM2_MISSING
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


# -- the claims ------------------------------------------------------------------------------------

CLAIMS = (
    Claim(
        "claim1",
        CLAIM_STATEMENTS["claim1"],
        f"for the validation-chosen method at k = 2 and at k = 3: supported if at both k the mean retention's "
        f"group-bootstrap CI lower bound >= {RETENTION_BAR:.2f} and the worst task's mean retention >= "
        f"{WORST_TASK_BAR:.2f}; contradicted if at either k the mean retention's CI upper bound < "
        f"{RETENTION_BAR:.2f} or the worst task's retention CI upper bound < {WORST_TASK_BAR:.2f} (CI over the "
        f"groups containing that task); inconclusive otherwise. {RETENTION_BAR:.0%} of single-adapter accuracy "
        f"is the usual bar of the merging literature's normalized accuracy; {WORST_TASK_BAR:.0%} for the worst task",
        claim1_figures,
        claim1_rule,
    ),
    Claim(
        "claim2",
        CLAIM_STATEMENTS["claim2"],
        "pair retention = the k = 2 validation-chosen method's retention of the pair (mean over seeds and the "
        "pair's two tasks). Spearman ρ of pair retention with the Fréchet distance, and partial Spearman ρ "
        "controlling for |log(norm_a / norm_b)| of the adapters' update norms; CIs resample tasks, p-values "
        f"are exact permutation tests over task labels (two-sided). Supported if both ρ > 0 with CI lower bound "
        f"> 0 and p < {ALPHA}; contradicted if both ρ < 0 with CI upper bound < 0 and p < {ALPHA}; "
        "inconclusive otherwise",
        claim2_figures,
        claim2_rule,
    ),
    Claim(
        "claim3",
        CLAIM_STATEMENTS["claim3"],
        "for the validation-chosen method at each k with a group CI (at least 3 groups): supported if at some "
        "k the mean merged − head accuracy has CI lower bound > 0, or the share of rows that are real wins "
        f"(McNemar exact p < {ALPHA}, merged right more often) has a Wilson lower bound > {CHANCE_WIN_RATE:.3f} "
        "(the rate expected by chance from a two-sided 5 % test); contradicted if at every such k the mean's "
        f"CI upper bound < 0 and the real-win share's Wilson lower bound <= {CHANCE_WIN_RATE:.3f}; inconclusive "
        "otherwise",
        claim3_figures,
        claim3_rule,
    ),
)
