"""study/statistics.py against hand-computable cases and scipy."""

import itertools

import numpy as np
import pytest
from scipy import stats

from study.statistics import (
    BOOTSTRAP,
    exact_difference_test,
    group_bootstrap_mean,
    mantel_permutation,
    mcnemar_exact,
    mcnemar_outcomes,
    percentile_interval,
    spearman,
    task_bootstrap_mean,
    task_bootstrap_spearman,
    weighted_midranks,
    weighted_pearson,
    wilson,
)


def test_wilson_interval_by_hand():
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 30)[0] == 0.0 and all(np.isnan(wilson(0, 0)))


def test_group_bootstrap_needs_three_groups_and_keeps_the_mean():
    rng = np.random.default_rng(0)
    mean, low, high, reason = group_bootstrap_mean([0.8], rng)
    assert mean == 0.8 and low is None and high is None and reason == "1 group: a CI over groups needs at least 3"
    mean, low, high, reason = group_bootstrap_mean([0.8, 0.9], rng)
    assert mean == pytest.approx(0.85) and low is None and reason.startswith("2 groups")
    mean, low, high, reason = group_bootstrap_mean([0.8, 0.9, 1.0], rng)
    assert reason is None and 0.8 <= low <= mean <= high <= 1.0


def test_group_bootstrap_resamples_groups_not_rows():
    """Five groups of 30 identical rows: a row bootstrap sees 150 units and a narrow CI; groups see 5."""
    group_values = np.array([0.80, 0.85, 0.90, 0.95, 1.00])
    rows = np.repeat(group_values, 30)
    _, low, high, _ = group_bootstrap_mean(group_values, np.random.default_rng(1))
    rng = np.random.default_rng(1)
    row_low, row_high = percentile_interval(rows[rng.integers(0, len(rows), (2000, len(rows)))].mean(1))
    assert (high - low) > 3 * (row_high - row_low)
    # by hand: resampling 5 values, the mean's sd is sd(values, ddof=0) / sqrt(5)
    assert (high - low) == pytest.approx(2 * 1.96 * group_values.std() / np.sqrt(5), rel=0.15)


@pytest.mark.parametrize("b, c", [(0, 0), (1, 0), (5, 0), (6, 0), (3, 9), (10, 10), (40, 20), (0, 17), (2, 30)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-10)


def test_mcnemar_outcomes_real_win_and_loss():
    # (6, 0): p = 2 / 64 = 0.03125 < 0.05; (5, 0): p = 0.0625; (0, 8): p = 0.0078
    assert list(mcnemar_outcomes([6, 5, 0, 10], [0, 0, 8, 10])) == [1, 0, -1, 0]
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)


def test_weighted_ranks_equal_ranks_of_the_expanded_data():
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 5, 8).astype(float), rng.normal(size=8)  # ties in x
    weights = np.array([0, 1, 2, 1, 3, 0, 1, 4])
    rx, ry = weighted_midranks(x, weights), weighted_midranks(y, weights)
    expanded_x, expanded_y = np.repeat(x, weights), np.repeat(y, weights)
    ranks = stats.rankdata(expanded_x)
    assert np.allclose(np.repeat(rx, weights), ranks)
    expected = stats.spearmanr(expanded_x, expanded_y).statistic
    assert weighted_pearson(rx, ry, weights) == pytest.approx(expected)


def test_partial_spearman_equals_correlation_of_rank_residuals():
    rng = np.random.default_rng(3)
    z = rng.normal(size=15)
    x, y = z + rng.normal(size=15), z + rng.normal(size=15)
    rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
    residual = lambda a: a - np.polyval(np.polyfit(rz, a, 1), rz)  # noqa: E731
    expected = np.corrcoef(residual(rx), residual(ry))[0, 1]
    assert spearman(x, y, z) == pytest.approx(expected)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def _pairs(m):
    return np.array(list(itertools.combinations(range(m), 2)))


def _brute_force_mantel(pairs, retention, distance, z=None):
    observed = spearman(retention, distance[pairs[:, 0], pairs[:, 1]], z)
    count = 0
    perms = list(itertools.permutations(range(len(distance))))
    for perm in perms:
        perm = np.array(perm)
        value = spearman(retention, distance[perm[pairs[:, 0]], perm[pairs[:, 1]]], z)
        count += abs(value) >= abs(observed) - 1e-12
    return observed, count, len(perms)


def test_mantel_exact_p_for_perfect_rank_agreement_over_six_tasks():
    pairs = _pairs(6)
    positions = np.array([0.0, 1.0, 3.0, 7.0, 15.0, 31.0])  # all 15 distances distinct
    distance = np.abs(positions[:, None] - positions[None, :])
    retention = 0.8 + 0.01 * distance[pairs[:, 0], pairs[:, 1]]  # perfect rank agreement: ρ = 1
    rho, p, perms, exact = mantel_permutation(pairs, retention, distance)
    observed, count, total = _brute_force_mantel(pairs, retention, distance)
    assert rho == pytest.approx(1.0) and observed == pytest.approx(1.0)
    assert exact and perms == total == 720
    assert p == pytest.approx(count / 720) and 1 <= count <= 2  # the identity (and the mirror relabelling)
    assert p < 0.05


def test_mantel_p_and_partial_match_brute_force_on_a_random_matrix():
    rng = np.random.default_rng(4)
    pairs = _pairs(5)
    distance = rng.random((5, 5))
    distance = distance + distance.T
    retention, z = rng.random(len(pairs)), rng.random(len(pairs))
    for zz in (None, z):
        rho, p, perms, _ = mantel_permutation(pairs, retention, distance, zz)
        observed, count, total = _brute_force_mantel(pairs, retention, distance, zz)
        assert rho == pytest.approx(observed) and p == pytest.approx(count / total) and perms == 120


def test_exact_difference_test_by_hand():
    # pooled 3, 4, 0, 1, 2: of the 10 ways to pick two values, {3, 4} (+2.5) and {0, 1} (-2.5) are as extreme
    difference, p, splits, exact = exact_difference_test([3, 4], [0, 1, 2])
    assert difference == pytest.approx(2.5) and p == pytest.approx(0.2) and splits == 10 and exact


def test_task_bootstrap_spearman_interval_contains_the_estimate():
    rng = np.random.default_rng(5)
    pairs = _pairs(6)
    x = rng.random(len(pairs))
    y = x + 0.3 * rng.random(len(pairs))
    low, high, degenerate = task_bootstrap_spearman(pairs, x, y, rng=np.random.default_rng(0))
    assert low <= spearman(x, y) <= high and 0 <= degenerate < 2000
    # a resample that draws every task once is the original data: weights 1 everywhere
    weights = np.ones((1, len(pairs)))
    assert weighted_pearson(weighted_midranks(x, weights), weighted_midranks(y, weights), weights)[0] == pytest.approx(
        spearman(x, y)
    )


def test_task_bootstrap_of_single_task_units_is_the_plain_bootstrap():
    """With one task per unit, weighting units by their task's multiplicity is drawing the units themselves: the
    same CI as a plain bootstrap from the same random draws."""
    values = np.array([0.2, 0.5, 0.9, 0.4, 0.7])
    mean, low, high, _ = task_bootstrap_mean(values, [(t,) for t in "abcde"], np.random.default_rng(3))
    drawn = np.random.default_rng(3).integers(0, 5, (BOOTSTRAP, 5))
    assert mean == pytest.approx(values.mean())
    assert (low, high) == pytest.approx(percentile_interval(values[drawn].mean(axis=1)))


def test_task_bootstrap_is_wider_than_a_group_bootstrap_when_tasks_drive_the_figure():
    """Groups of three of six tasks whose value is their tasks' mean level: the groups look like 20 independent
    draws, but only six tasks vary, so resampling tasks gives the wider (honest) interval."""
    level = dict(zip("abcdef", (0.80, 0.85, 0.90, 0.92, 0.95, 0.97)))
    groups = list(itertools.combinations("abcdef", 3))
    values = np.array([np.mean([level[t] for t in g]) for g in groups])
    _, t_low, t_high, _ = task_bootstrap_mean(values, groups, np.random.default_rng(0))
    _, g_low, g_high, _ = group_bootstrap_mean(values, np.random.default_rng(0))
    assert (t_high - t_low) > 1.5 * (g_high - g_low)


def test_task_bootstrap_has_no_ci_when_few_resamples_form_a_group():
    """All six tasks in one group: only resamples drawing every task (6!/6^6 = 1.5 %) weigh it."""
    mean, low, high, reason = task_bootstrap_mean([0.9], [tuple("abcdef")], np.random.default_rng(0))
    assert mean == 0.9 and low is None and high is None and "form none of these groups" in reason
