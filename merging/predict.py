"""Predict each task's retention in a merged group before merging it, from its pairs (issue 34, the merge planner).

Why: a user with N adapters cannot merge all 2^N groups to find out which ones hold together; pairs (k = 2 merges) are
cheap, N(N-1)/2 of them. What a pair costs a task is taken as the interference that partner brings, and a group's
cost for the task is built from its partners' (the "additive model of pairwise interference" the issue starts from).
No library predicts merge retention (FusionBench, peft and mergekit merge what they are given), hence by hand.

Retention = the task's merged accuracy / its own adapter's accuracy on the same images (`normalized_accuracy` of
`merge_results`). A pair's "loss" for task t with partner u is 1 - retention(t | {t, u}), mean over seeds.

Predictors, each `predict(rows, pairs, fitted)` over rows holding (task, group) with `fitted` learned on other rows:
- `mean_at_k` (baseline): the mean retention at that k of the fitting rows; knows nothing about the task or group.
- `task_mean_at_k` (baseline): the task's own mean retention at that k in the fitting rows (`mean_at_k` where the
  fitting rows have none: a held-out task); knows the task, not the group.
- `worst_pair` (baseline, the nearest-pair heuristic): the task's retention with its worst partner in the group.
- `additive`: 1 - the sum of the task's pair losses over its partners (interference adds up).
- `fitted`: least squares on [1, sum of pair losses, largest pair loss, k - 1] (the additive
  model's terms, their weights learned from the fitting rows' groups of k >= 3).
`evaluate` scores them on held-out groups and held-out tasks (a task's groups predicted by a model fitted without
any group containing it; its pairs are inputs, as they would be for a new adapter: merging its pairs is the cheap
step).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

PREDICTORS = ("mean_at_k", "task_mean_at_k", "worst_pair", "additive", "fitted")
BASELINE_PREDICTORS = ("mean_at_k", "task_mean_at_k", "worst_pair")  # what a predictor must beat to be advice


def task_rows(merges: pd.DataFrame, method: str) -> pd.DataFrame:
    """One row per (group, task) of `method`: task, group (a sorted tuple), k and retention (mean over seeds)."""
    mine = merges[merges["method"] == method]
    out = mine.assign(group=mine["tasks"].map(lambda t: tuple(sorted(t.split(",")))))
    return out.groupby(["group", "task"], as_index=False).agg(
        k=("k", "first"), retention=("normalized_accuracy", "mean")
    )


def pair_losses(rows: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(task, partner) -> 1 - the task's retention in the pair (rows of k = 2)."""
    pairs = rows[rows["k"] == 2]
    return {
        (task, next(u for u in group if u != task)): 1.0 - retention
        for group, task, retention in zip(pairs["group"], pairs["task"], pairs["retention"])
    }


def _features(task: str, group: tuple[str, ...], losses: dict) -> tuple[float, float, int]:
    """(sum of the task's pair losses over its partners, the largest, k - 1); NaN where a pair is not stored."""
    partner_losses = [losses.get((task, u), np.nan) for u in group if u != task]
    return float(np.sum(partner_losses)), float(np.max(partner_losses)), len(group) - 1


def design(rows: pd.DataFrame, losses: dict) -> np.ndarray:
    """The fitted model's design matrix [1, sum loss, max loss, k - 1], one line per row."""
    features = np.array([_features(t, g, losses) for t, g in zip(rows["task"], rows["group"])], dtype=float)
    return np.column_stack([np.ones(len(rows)), features]) if len(rows) else np.zeros((0, 4))


def fit(rows: pd.DataFrame, losses: dict) -> dict:
    """What the predictors learn from the fitting rows: mean retention per k and the fitted model's weights (from
    the groups of k >= 3 whose pairs are all stored)."""
    mean_at_k = rows.groupby("k")["retention"].mean().to_dict()
    task_mean_at_k = rows.groupby(["task", "k"])["retention"].mean().to_dict()
    large = rows[rows["k"] >= 3]
    x = design(large, losses)
    usable = np.isfinite(x).all(axis=1)
    x, y = x[usable], large["retention"].to_numpy()[usable]
    # least squares; the minimum-norm solution where too few groups determine every weight (e.g. a single k)
    weights = np.linalg.lstsq(x, y, rcond=None)[0] if len(y) else np.full(4, np.nan)
    return {"mean_at_k": mean_at_k, "task_mean_at_k": task_mean_at_k, "weights": weights}


def predict(rows: pd.DataFrame, losses: dict, fitted: dict, predictor: str) -> np.ndarray:
    """Each row's predicted retention under `predictor` (one of PREDICTORS)."""
    if predictor in ("mean_at_k", "task_mean_at_k"):
        overall = np.mean(list(fitted["mean_at_k"].values()))
        at_k = [fitted["mean_at_k"].get(k, overall) for k in rows["k"]]
        if predictor == "mean_at_k":
            return np.array(at_k, dtype=float)
        own = fitted["task_mean_at_k"]
        return np.array([own.get((t, k), m) for t, k, m in zip(rows["task"], rows["k"], at_k)], dtype=float)
    x = design(rows, losses)
    if predictor == "worst_pair":
        return 1.0 - x[:, 2]
    if predictor == "additive":
        return 1.0 - x[:, 1]
    if predictor == "fitted":
        return x @ fitted["weights"]
    raise ValueError(f"unknown predictor {predictor!r}; one of {', '.join(PREDICTORS)}")


def evaluate(rows: pd.DataFrame, folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Every predictor on held-out rows of k >= 3, two ways: `groups` (the groups split into `folds` folds, each
    predicted by a model fitted on the others) and `tasks` (each task's rows predicted by a model fitted on the
    groups without it). Pair losses are inputs throughout (every pair is merged in the planner's first step).
    Returns one row per (scheme, predictor, k): n rows, Spearman ρ, mean absolute error in points."""
    losses = pair_losses(rows)
    large = rows[rows["k"] >= 3].reset_index(drop=True)
    predictions = []
    groups = sorted(set(large["group"]))
    order = np.random.default_rng(seed).permutation(len(groups))
    fold_of = {groups[i]: n % folds for n, i in enumerate(order)}
    for fold in range(folds):
        held = large["group"].map(fold_of) == fold
        fitted = fit(rows[~rows["group"].map(lambda g: fold_of.get(g) == fold)], losses)
        predictions.append(_predicted(large[held], losses, fitted, "groups"))
    for task in sorted(set(large["task"])):
        held = large["task"] == task
        fitted = fit(rows[~rows["group"].map(lambda g: task in g) | (rows["k"] == 2)], losses)
        predictions.append(_predicted(large[held], losses, fitted, "tasks"))
    return _scores(pd.concat(predictions, ignore_index=True))


def _predicted(rows: pd.DataFrame, losses: dict, fitted: dict, scheme: str) -> pd.DataFrame:
    out = [
        rows.assign(scheme=scheme, predictor=name, predicted=predict(rows, losses, fitted, name)) for name in PREDICTORS
    ]
    return pd.concat(out, ignore_index=True)


def _scores(predicted: pd.DataFrame) -> pd.DataFrame:
    """Per (scheme, predictor, k) and over every k ("all"): n, Spearman ρ and MAE (points) of predicted vs measured."""
    out = []
    for (scheme, predictor), mine in predicted.groupby(["scheme", "predictor"], sort=False):
        for k, at_k in [*mine.groupby("k"), ("all", mine)]:
            ok = at_k[np.isfinite(at_k["predicted"])]
            varies = len(ok) > 2 and ok["predicted"].nunique() > 1 and ok["retention"].nunique() > 1
            rho = spearmanr(ok["predicted"], ok["retention"]).statistic if varies else np.nan  # else undefined
            mae = float(np.mean(np.abs(ok["predicted"] - ok["retention"]))) * 100 if len(ok) else np.nan
            out.append({"scheme": scheme, "predictor": predictor, "k": k, "n": len(ok), "rho": rho, "mae_points": mae})
    return pd.DataFrame(out)


def group_retention(tasks: tuple[str, ...], losses: dict, fitted: dict, predictor: str) -> dict[str, float]:
    """Each task's predicted retention in the group `tasks`: 1.0 for a group of one (the task's own adapter), the
    measured retention for a pair, and for k >= 3 the figures `predict` gives on rows of this group, without building
    them (the planner asks for thousands)."""
    if len(tasks) == 1:
        return {tasks[0]: 1.0}
    if len(tasks) == 2:  # a pair is measured, not predicted: the planner's input
        a, b = tasks
        return {a: 1.0 - losses[(a, b)], b: 1.0 - losses[(b, a)]}
    out = {}
    for task in tasks:
        total, largest, partners = _features(task, tasks, losses)
        if predictor == "fitted":
            out[task] = float(fitted["weights"] @ [1.0, total, largest, partners])
        elif predictor == "additive":
            out[task] = 1.0 - total
        elif predictor == "worst_pair":
            out[task] = 1.0 - largest
        else:
            rows = pd.DataFrame({"task": [task], "group": [tuple(sorted(tasks))], "k": [len(tasks)]})
            out[task] = float(predict(rows, losses, fitted, predictor)[0])
    return out


def subsets(tasks: tuple[str, ...]):
    """Every non-empty subset of `tasks`, as sorted tuples (2^N - 1 of them)."""
    for size in range(1, len(tasks) + 1):
        yield from itertools.combinations(sorted(tasks), size)


def transfer(source: pd.DataFrame, target: pd.DataFrame) -> pd.DataFrame:
    """Every predictor fitted on one study's rows (`source`) and scored on another's groups of k >= 3 (`target`), from
    the target's own pairs: the case of a user whose adapters are not in any stored study (they merge their pairs;
    the weights come from a study of other tasks)."""
    fitted = fit(source, pair_losses(source))
    large = target[target["k"] >= 3].reset_index(drop=True)
    return _scores(_predicted(large, pair_losses(target), fitted, "transfer"))
