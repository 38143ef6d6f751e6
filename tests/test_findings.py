"""Similarity measures and findings: exact formulas, and 'not available' instead of a number when data is thin."""

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import query_db

from merging.deltas import load_deltas
from mlvision.runs import resolve_stored_path
from study.findings import wilson
from study.similarity import adapter_cosine, frechet_distance, subspace_alignment


def test_frechet_distance_matches_the_textbook_formula():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 12, generator=generator), torch.randn(200, 12, generator=generator) * 2 + 1
    x, y = a.double().numpy(), b.double().numpy()
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(
        cov_x + cov_y - 2 * scipy.linalg.sqrtm(cov_x @ cov_y).real
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_wilson_interval():
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)


def test_adapter_similarity_of_an_adapter_with_itself(tiny_study):
    ((path,),) = query_db(
        tiny_study["db"], "SELECT path FROM models WHERE model_kind = 'adapter' AND task = 'textures'"
    )
    adapter = load_deltas(resolve_stored_path(path))
    assert adapter_cosine(adapter, adapter) == pytest.approx(1.0)
    assert subspace_alignment(adapter, adapter) == pytest.approx(1.0)


def test_findings_stage_stores_similarity_findings_and_report(tiny_study):
    similarity = query_db(tiny_study["db"], "SELECT task_a, task_b, measure, value FROM task_similarity")
    assert len(similarity) == 3 * 3  # three pairs of the three tiny tasks, three measures
    assert all(a < b for a, b, _, _ in similarity)
    assert all(v > 0 for _, _, m, v in similarity if m == "frechet")
    # three pairs are too few for a rank correlation: stored as not available, with the reason
    spearman = query_db(tiny_study["db"], "SELECT value, n, note FROM findings WHERE statistic LIKE 'spearman/%'")
    assert len(spearman) == 3 and all(v is None and n == 3 and "fewer than" in note for v, n, note in spearman)
    retention = query_db(
        tiny_study["db"], "SELECT statistic, value, ci_low, ci_high, n FROM findings WHERE finding = 'retention_vs_k'"
    )
    assert retention and all(low <= value <= high for _, value, low, high, _ in retention if value is not None)
    report = (tiny_study["root"] / "findings.md").read_text()
    assert "## The paper's three claims" in report and "n/a (fewer than 4 pairs" in report
    ((mean,),) = query_db(
        tiny_study["db"], "SELECT avg(normalized_accuracy) FROM merge_results WHERE method = 'linear' AND k = 2"
    )
    ((stored,),) = query_db(
        tiny_study["db"], "SELECT value FROM findings WHERE finding = 'retention_vs_k' AND statistic = 'linear/k=2'"
    )
    assert stored == pytest.approx(mean)
