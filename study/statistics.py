"""Pure statistical helpers for the findings stage (study v2), each chosen so that a verdict survives review.

The rules these implement (the findings stage's, see docs/ARCHITECTURE.md):

- Resample the independent unit. The rows of one merged group (its tasks, its seeds) share one merged
  model, so they are not independent draws: CIs of per-(method, k) figures bootstrap *groups*
  (`group_bootstrap_mean`). Statistics over task pairs share tasks (pair (a, b) and pair (a, c) share
  task a), so their CIs bootstrap *tasks* (`task_bootstrap_spearman`).
- With few units, use exact tests: `mantel_permutation` enumerates every relabelling of the tasks,
  `exact_difference_test` every split of the pairs into two classes.
- Paired outcomes on the same images are compared with McNemar's exact test (`mcnemar_exact`).

Every function is deterministic given its inputs (and the `rng` passed in) and has no I/O.
"""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
from scipy import stats

BOOTSTRAP = 2000  # resamples per bootstrap CI
MIN_GROUPS = 3  # a bootstrap over fewer units than this has (almost) no distinct resamples
MAX_EXACT_PERMUTATIONS = 50_000  # above this, permutation tests draw MONTE_CARLO_PERMUTATIONS at random
MONTE_CARLO_PERMUTATIONS = 9_999
_TOL = 1e-12  # "as extreme as observed" allows for floating-point noise in equal statistics


def rng_for(*keys) -> np.random.Generator:
    """A generator seeded from `keys` (stable across runs and processes, unlike hash()).

    Why: each figure gets its own fixed stream, so a figure does not change when another figure is added
    or removed, or when a task is left out of an unrelated analysis (the sensitivity table compares them).
    """
    return np.random.default_rng(zlib.crc32("|".join(map(str, keys)).encode()))


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of `draws`, ignoring NaN draws (degenerate resamples)."""
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(np.asarray(draws, dtype=float), [tail, 100 - tail])
    return float(low), float(high)


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a share successes / n (NaN, NaN when n = 0), by scipy's `binomtest`.

    Why Wilson: unlike the normal approximation it stays inside [0, 1] and keeps its coverage when the
    share is near 0 or 1 (few real wins among many rows).
    """
    if n == 0:
        return float("nan"), float("nan")
    interval = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def group_bootstrap_mean(
    group_values, rng: np.random.Generator, resamples: int = BOOTSTRAP, min_groups: int = MIN_GROUPS
) -> tuple[float, float | None, float | None, str | None]:
    """Mean of per-group values and its percentile bootstrap CI over groups: (mean, low, high, reason).

    `group_values` holds one number per merged group (the group's mean over its seeds and tasks), so a
    resample draws whole groups: rows that share a merged model move together. With fewer than
    `min_groups` groups the CI is (None, None) and `reason` says why; the mean is still returned.
    """
    values = np.asarray(group_values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), None, None, "no groups"
    mean = float(values.mean())
    if len(values) < min_groups:
        word = "group" if len(values) == 1 else "groups"
        return mean, None, None, f"{len(values)} {word}: a CI over groups needs at least {min_groups}"
    draws = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = percentile_interval(draws)
    return mean, low, high, None


def task_bootstrap_mean(
    values, unit_tasks, rng: np.random.Generator, resamples: int = BOOTSTRAP, min_tasks: int = MIN_GROUPS
) -> tuple[float, float | None, float | None, str | None]:
    """Mean of per-unit values and its percentile CI resampling *tasks*: (mean, low, high, reason).

    `values` holds one number per unit (a merged group's mean, or one (merge, task) row's outcome) and
    `unit_tasks` the tasks each unit was built from. Groups are not independent draws: every task is in many
    groups (each of six tasks is in 10 of the 20 groups of three), so a CI over groups understates how much the
    figure would move with other tasks. Each resample draws the tasks with replacement (m_t = how often task t
    was drawn) and weights a unit by the product of its tasks' multiplicities: the figure recomputed on the
    groups the drawn tasks can form, a task drawn twice counting twice. Resamples where no unit has all its
    tasks drawn are degenerate and left out (at k = 6 of six tasks, all but the 1.5 % that draw every task);
    the reason says how many, and with fewer than `min_tasks` tasks, or more than half the resamples
    degenerate, there is no CI.
    """
    values = np.asarray(values, dtype=float)
    keep = np.isfinite(values)
    values, unit_tasks = values[keep], [tuple(t) for t, k in zip(unit_tasks, keep) if k]
    if len(values) == 0:
        return float("nan"), None, None, "no units"
    mean = float(values.mean())
    names = sorted({task for tasks in unit_tasks for task in tasks})
    if len(names) < min_tasks:
        return mean, None, None, f"{len(names)} tasks: a CI over tasks needs at least {min_tasks}"
    index = {name: i for i, name in enumerate(names)}
    drawn = rng.integers(0, len(names), (resamples, len(names)))
    multiplicity = np.stack([np.bincount(row, minlength=len(names)) for row in drawn]).astype(float)
    weights = np.ones((resamples, len(values)))
    for unit, tasks in enumerate(unit_tasks):
        for task in tasks:
            weights[:, unit] *= multiplicity[:, index[task]]
    total = weights.sum(axis=1)
    degenerate = int((total == 0).sum())
    if degenerate > resamples / 2:
        return mean, None, None, f"{degenerate} of {resamples} task resamples form none of these groups"
    draws = np.where(total > 0, (weights @ values) / np.where(total > 0, total, 1), np.nan)
    low, high = percentile_interval(draws)
    note = f"task bootstrap ({len(names)} tasks" + (
        f"; {degenerate} degenerate resamples left out)" if degenerate else ")"
    )
    return mean, low, high, note


def mcnemar_exact(b, c) -> np.ndarray:
    """Two-sided exact McNemar p-values for discordant counts b and c (arrays or numbers).

    b = images only the first model got right, c = images only the second got right. Under the null
    each discordant image is a fair coin, so p = P(|Binomial(b + c, 1/2) - (b+c)/2| >= |b - (b+c)/2|)
    = min(1, 2 * P(X <= min(b, c))), the same as scipy.stats.binomtest(b, b + c, 0.5).pvalue (the null
    distribution is symmetric); p = 1 when there are no discordant images.
    """
    b, c = np.asarray(b, dtype=float), np.asarray(c, dtype=float)
    n = b + c
    p = np.minimum(1.0, 2 * stats.binom.cdf(np.minimum(b, c), n, 0.5))
    return np.where(n == 0, 1.0, p)


def mcnemar_outcomes(b, c, alpha: float = 0.05) -> np.ndarray:
    """+1 real win (p < alpha and b > c), -1 real loss (p < alpha and c > b), 0 otherwise."""
    b, c = np.asarray(b), np.asarray(c)
    significant = mcnemar_exact(b, c) < alpha
    return np.where(significant & (b > c), 1, np.where(significant & (c > b), -1, 0))


# -- rank correlations -----------------------------------------------------------------------------


def weighted_midranks(values, weights) -> np.ndarray:
    """Midranks of `values` when value i occurs weights[..., i] times (rows of `weights` = resamples).

    Equal to the ranks scipy.stats.rankdata gives the data expanded by np.repeat(values, weights), read
    at each value: the copies of value i take the positions after all smaller copies, so its midrank is
    (weight of smaller values) + (weight of values equal to it + 1) / 2.
    """
    values = np.asarray(values, dtype=float)
    weights = np.asarray(weights, dtype=float)
    smaller = (values[:, None] < values[None, :]).astype(float)  # [j, i]: value j < value i
    equal = (values[:, None] == values[None, :]).astype(float)
    return weights @ smaller + (weights @ equal + 1) / 2


def weighted_pearson(x, y, weights) -> np.ndarray:
    """Pearson correlation of x and y (last axis) with observation weights; NaN when a side is constant."""
    x, y, w = (np.asarray(a, dtype=float) for a in (x, y, weights))
    total = w.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = (w * x).sum(-1, keepdims=True) / total, (w * y).sum(-1, keepdims=True) / total
        cov = (w * (x - mx) * (y - my)).sum(-1)
        var_x, var_y = (w * (x - mx) ** 2).sum(-1), (w * (y - my) ** 2).sum(-1)
        r = cov / np.sqrt(var_x * var_y)
    return np.where((var_x > _TOL) & (var_y > _TOL), r, np.nan)


def partial_from_correlations(r_xy, r_xz, r_yz) -> np.ndarray:
    """First-order partial correlation of x and y given z from the three pairwise correlations."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.asarray(r_xy) - np.asarray(r_xz) * r_yz) / np.sqrt((1 - np.square(r_xz)) * (1 - np.square(r_yz)))


def spearman(x, y, z=None) -> float:
    """Spearman ρ of x and y; with z, the partial Spearman ρ controlling for z (Pearson partial of ranks)."""
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    r_xy = float(np.corrcoef(rx, ry)[0, 1])
    if z is None:
        return r_xy
    rz = stats.rankdata(z)
    return float(partial_from_correlations(r_xy, np.corrcoef(rx, rz)[0, 1], np.corrcoef(ry, rz)[0, 1]))


def task_bootstrap_spearman(
    pair_tasks,
    x,
    y,
    z=None,
    rng: np.random.Generator | None = None,
    resamples: int = BOOTSTRAP,
    min_pairs: int | None = None,
) -> tuple[float, float, int]:
    """Percentile CI of Spearman ρ (or partial ρ given z) over pairs, resampling *tasks*: (low, high, degenerate).

    `pair_tasks` is a (P, 2) array of task indices. Each resample draws the tasks with replacement,
    keeps the pairs of two distinct drawn tasks and weights pair (a, b) by m_a * m_b (m = how often each
    task was drawn): the statistic on the pairs formed by the drawn tasks, without self-pairs. A pair
    shares its tasks with other pairs, so pairs are not independent units; tasks are. Resamples with
    fewer than `min_pairs` distinct pairs (default 3 for ρ, which is then at least defined; 4 for the
    partial ρ, since a partial correlation of 3 points is ±1 by construction) or with a constant side
    are degenerate and left out; their count is returned (and reported: the CI is conditional on the
    resamples that can carry the statistic).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    pair_tasks = np.asarray(pair_tasks, dtype=int)
    n_tasks = int(pair_tasks.max()) + 1
    drawn = rng.integers(0, n_tasks, (resamples, n_tasks))
    multiplicity = np.stack([np.bincount(row, minlength=n_tasks) for row in drawn])
    weights = multiplicity[:, pair_tasks[:, 0]] * multiplicity[:, pair_tasks[:, 1]]
    rx, ry = weighted_midranks(x, weights), weighted_midranks(y, weights)
    r_xy = weighted_pearson(rx, ry, weights)
    if z is None:
        draws = r_xy
    else:
        rz = weighted_midranks(z, weights)
        draws = partial_from_correlations(r_xy, weighted_pearson(rx, rz, weights), weighted_pearson(ry, rz, weights))
    min_pairs = min_pairs if min_pairs is not None else (3 if z is None else 4)
    draws = np.where((weights > 0).sum(axis=1) >= min_pairs, draws, np.nan)
    degenerate = int((~np.isfinite(draws)).sum())
    if degenerate == resamples:
        return float("nan"), float("nan"), degenerate
    low, high = percentile_interval(draws)
    return low, high, degenerate


def _permutations(n: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """All permutations of range(n) when few enough (exact), else the identity plus random ones."""
    if math.factorial(n) <= MAX_EXACT_PERMUTATIONS:
        return np.array(list(itertools.permutations(range(n))), dtype=int), True
    random = np.argsort(rng.random((MONTE_CARLO_PERMUTATIONS, n)), axis=1)
    return np.vstack([np.arange(n), random]), False


def mantel_permutation(
    pair_tasks, retention, distance_matrix, z=None, rng: np.random.Generator | None = None
) -> tuple[float, float, int, bool]:
    """Spearman ρ (partial given z) of pair values with a task distance matrix, and its Mantel-style p-value.

    Returns (ρ, p, permutations, exact). The null hypothesis: the distances carry no information about
    which pair merges well, so any relabelling of the tasks in the distance matrix is as likely as the
    observed labelling. The test relabels the matrix's tasks (rows and columns together, as Mantel 1967
    does; for the partial test only the distance matrix is relabelled, Smouse et al. 1986) and counts the
    relabellings whose |ρ| is at least the observed |ρ|, the identity included: p = count / permutations
    (two-sided). With m tasks there are m! relabellings (720 for 6): all are enumerated, so p is exact
    and never below 1/m!; beyond MAX_EXACT_PERMUTATIONS a Monte Carlo sample is drawn instead.
    `distance_matrix` must be defined for every pair of the m tasks; `retention` only for the pairs given.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    pair_tasks = np.asarray(pair_tasks, dtype=int)
    distance_matrix = np.asarray(distance_matrix, dtype=float)
    perms, exact = _permutations(len(distance_matrix), rng)
    permuted = distance_matrix[perms[:, pair_tasks[:, 0]], perms[:, pair_tasks[:, 1]]]  # (permutations, P)
    ranks_d = stats.rankdata(permuted, axis=1)
    ranks_r = np.broadcast_to(stats.rankdata(retention), ranks_d.shape)
    ones = np.ones_like(ranks_d)
    r_rd = weighted_pearson(ranks_r, ranks_d, ones)
    if z is None:
        values = r_rd
    else:
        ranks_z = np.broadcast_to(stats.rankdata(z), ranks_d.shape)
        values = partial_from_correlations(
            r_rd, weighted_pearson(ranks_r, ranks_z, ones), weighted_pearson(ranks_d, ranks_z, ones)
        )
    identity = int(np.flatnonzero((perms == np.arange(perms.shape[1])).all(axis=1))[0])
    observed = float(values[identity])
    if not np.isfinite(observed):
        return float("nan"), float("nan"), len(perms), exact
    extreme = np.abs(np.nan_to_num(values, nan=0.0)) >= abs(observed) - _TOL
    return observed, float(extreme.mean()), len(perms), exact


def exact_difference_test(first, second, rng: np.random.Generator | None = None) -> tuple[float, float, int, bool]:
    """mean(first) - mean(second) and its two-sided permutation p-value: (difference, p, splits, exact).

    The null: the class labels are exchangeable. Every way of choosing len(first) of the pooled values
    as the first class is enumerated (beyond MAX_EXACT_PERMUTATIONS a Monte Carlo sample plus the
    observed split), and p = share of splits with |difference| >= the observed |difference|.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    pooled = np.concatenate([first, second])
    n, k = len(pooled), len(first)
    observed = float(first.mean() - second.mean())
    if math.comb(n, k) <= MAX_EXACT_PERMUTATIONS:
        members = np.zeros((math.comb(n, k), n), dtype=bool)
        for row, chosen in enumerate(itertools.combinations(range(n), k)):
            members[row, list(chosen)] = True
        exact = True
    else:
        order = np.argsort(rng.random((MONTE_CARLO_PERMUTATIONS, n)), axis=1) < k
        members = np.vstack([np.arange(n) < k, order])
        exact = False
    sums = members @ pooled
    differences = sums / k - (pooled.sum() - sums) / (n - k)
    extreme = np.abs(differences) >= abs(observed) - _TOL
    return observed, float(extreme.mean()), len(members), exact


# -- claim 2's pre-registered test: pair values with task main effects removed ------------------------------------


def task_effects_residual_matrix(pair_tasks, n_tasks: int) -> np.ndarray:
    """The (P, P) matrix R with R @ v = the residuals of pair values v after additive task effects.

    A pair's value is modelled as μ + u_a + u_b (least squares over the pairs): a task that is hard to merge, or far
    from every other task, moves all of its pairs, which says nothing about *pairs* of dissimilar tasks merging
    better. R = I - X X⁺ with X the pairs' task-indicator design plus an intercept (the pseudo-inverse handles the
    design's rank deficiency: the intercept is the sum of the indicators over 2). With T tasks and all T(T-1)/2 pairs,
    T of the pairs' degrees of freedom go to the effects: 9 of 15 are left for six tasks, 170 of 190 for twenty.
    """
    pair_tasks = np.asarray(pair_tasks, dtype=int)
    design = np.zeros((len(pair_tasks), n_tasks + 1))
    design[:, 0] = 1.0
    design[np.arange(len(pair_tasks)), pair_tasks[:, 0] + 1] = 1.0
    design[np.arange(len(pair_tasks)), pair_tasks[:, 1] + 1] = 1.0
    return np.eye(len(pair_tasks)) - design @ np.linalg.pinv(design)


def _ranks(values: np.ndarray) -> np.ndarray:
    return stats.rankdata(values, axis=-1)


class ResidualMantel:
    """Claim 2's pre-registered statistic and its null, for one set of pairs and one distance matrix.

    Statistic: the partial Spearman ρ between pair retention and the pair's distance, both with task main effects
    removed (`task_effects_residual_matrix`), controlling for covariates that also have them removed (the update-
    norm ratio |log(norm_a / norm_b)|; pair difficulty, the mean of the two tasks' single accuracies, is additive
    in the tasks and so removed with the effects). With several covariates, the ranks of the retention and the
    distance are both regressed on the covariates' ranks and the residuals correlated (Pearson of ranks).
    Null: the task labels of the distance matrix are exchangeable (Mantel 1967): every relabelling (exact where
    T! <= MAX_EXACT_PERMUTATIONS) or MONTE_CARLO_PERMUTATIONS random ones plus the identity; p = share with |ρ| at
    least the observed (two-sided). The relabelled distances' residuals and ranks are computed once, so testing
    many simulated retentions against them (`power`) costs one product each.
    """

    def __init__(self, pair_tasks, distance_matrix, covariates=(), rng=None, permutations: int | None = None):
        rng = rng if rng is not None else np.random.default_rng(0)
        self.pair_tasks = np.asarray(pair_tasks, dtype=int)
        distance_matrix = np.asarray(distance_matrix, dtype=float)
        n_tasks = len(distance_matrix)
        self.residual = task_effects_residual_matrix(self.pair_tasks, n_tasks)
        if permutations is None:
            self.perms, self.exact = _permutations(n_tasks, rng)
        else:
            random = np.argsort(rng.random((permutations, n_tasks)), axis=1)
            self.perms, self.exact = np.vstack([np.arange(n_tasks), random]), False
        distances = distance_matrix[self.perms[:, self.pair_tasks[:, 0]], self.perms[:, self.pair_tasks[:, 1]]]
        covariate_ranks = [_ranks(self.residual @ np.asarray(c, dtype=float)) for c in covariates]
        basis = np.column_stack([np.ones(len(self.pair_tasks)), *covariate_ranks])
        self.project_out = np.eye(len(self.pair_tasks)) - basis @ np.linalg.pinv(basis)  # covariates' ranks out
        self.null = self._standardise(_ranks(distances @ self.residual.T) @ self.project_out.T)  # (perms, P)

    @staticmethod
    def _standardise(x: np.ndarray) -> np.ndarray:
        x = x - x.mean(axis=-1, keepdims=True)
        norm = np.sqrt((x**2).sum(axis=-1, keepdims=True))
        return np.where(norm > _TOL, x / np.where(norm > _TOL, norm, 1), np.nan)

    def statistics(self, retention) -> np.ndarray:
        """ρ of `retention` (one row of pair values, or many: (S, P)) with every relabelled distance: (S, perms)."""
        y = self._standardise(_ranks(np.atleast_2d(retention) @ self.residual.T) @ self.project_out.T)
        return y @ self.null.T  # row 0 of the permutations is the identity: the observed ρ

    def test(self, retention) -> tuple[float, float, int, bool]:
        """(ρ, two-sided p, permutations, exact) for the observed pair retention."""
        values = self.statistics(retention)[0]
        observed = float(values[0])
        if not np.isfinite(observed):
            return float("nan"), float("nan"), len(self.perms), self.exact
        p = float((np.abs(np.nan_to_num(values)) >= abs(observed) - _TOL).mean())
        return observed, p, len(self.perms), self.exact

    def power(self, rho: float, rng: np.random.Generator, simulations: int = 200, alpha: float = 0.05) -> float:
        """Share of `simulations` in which the test finds a true effect of size ρ (p < alpha, positive sign).

        Each simulated retention is ρ times the pair distances' standardised residual plus sqrt(1 - ρ²) times
        independent normal noise, plus additive task effects (drawn, and removed by the test like real ones): the
        study's own distance matrix and covariates, only the retention simulated."""
        distance_residual = self.null[0]
        tasks = int(self.pair_tasks.max()) + 1
        noise = rng.standard_normal((simulations, len(self.pair_tasks)))
        effects = rng.standard_normal((simulations, tasks))
        y = rho * distance_residual * np.sqrt(len(distance_residual)) + np.sqrt(1 - rho**2) * noise
        y = y + effects[:, self.pair_tasks[:, 0]] + effects[:, self.pair_tasks[:, 1]]
        values = self.statistics(y)
        observed = values[:, :1]
        p = (np.abs(np.nan_to_num(values)) >= np.abs(observed) - _TOL).mean(axis=1)
        return float(((p < alpha) & (observed[:, 0] > 0)).mean())
