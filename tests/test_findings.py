"""Similarity measures and findings: exact formulas, and 'not available' instead of a number when data is thin."""

import itertools
import json
import re
import shutil
import time
from dataclasses import replace

import duckdb
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from conftest import TINY_ARGS, query_db, run_all, tiny_config

from merging.deltas import load_deltas
from merging.methods import get_method
from mlvision.claims import UNTESTABLE
from mlvision.runs import resolve_stored_path
from mlvision.store import pack_correct
from study.findings.analysis import analyse, compute_rows
from study.findings.claims import CLAIMS, CONTRADICTED, INCONCLUSIVE, SUPPORTED, claim1_rule, claim2_rule, claim3_rule
from study.findings.exclusion import ExclusionRules
from study.findings.figures import RANGE_END, cell_figures, grid_edge_rows
from study.findings.inputs import StudyInputs, prepare_merges
from study.findings.report import render_report
from study.similarity import adapter_cosine, frechet_distance, subspace_alignment
from study.statistics import (
    ResidualMantel,
    group_bootstrap_mean,
    percentile_interval,
    rng_for,
    spearman,
    task_effects_residual_matrix,
    wilson,
)


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


def test_the_loss_gradient_is_the_derivative_of_the_loss_through_the_folded_backbone(tiny_study):
    """`loss_gradient` at ΔW = 0 against a central difference of the task's loss along a random ΔW direction,
    the loss computed through `FoldedBackbone.model` (the path every merge is scored through): the gradient is
    taken in ΔW's own coordinates, whatever BatchNorm folding does to the weights."""
    from merging.deltas import load_deltas
    from mlvision.backbone import Preprocess
    from mlvision.data import split_tensors
    from mlvision.evaluation import FoldedBackbone
    from study.similarity import gradient_alignment, loss_gradient

    ((path,),) = query_db(
        tiny_study["db"], "SELECT path FROM models WHERE model_kind = 'adapter' AND task = 'textures'"
    )
    adapter = load_deltas(resolve_stored_path(path))
    folded = FoldedBackbone(tiny_config(tiny_study).backbone_config, fast=False)
    preprocess = Preprocess.from_dict(adapter.meta["preprocess"])
    images, labels = split_tensors("textures", "validation", preprocess, 16)
    gradient = loss_gradient(folded, adapter, images, labels)
    generator = torch.Generator().manual_seed(0)
    direction = {
        layer: torch.randn(delta.shape, generator=generator) for layer, delta in sorted(adapter.deltas.items())
    }
    norm = float(torch.cat([d.flatten() for d in direction.values()]).norm())
    direction = {layer: d / norm for layer, d in direction.items()}  # a unit step: the loss is near-linear along it
    flat = torch.cat([d.flatten() for d in direction.values()]).double()

    def loss(step: float) -> float:
        model = folded.model({layer: step * d for layer, d in direction.items()}, {"textures": adapter.head})
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(images)["textures"], labels).double())

    step = 1e-2
    assert float(gradient @ flat) == pytest.approx((loss(step) - loss(-step)) / (2 * step), rel=2e-2, abs=1e-4)
    assert gradient_alignment(gradient, gradient) == pytest.approx(1.0)
    assert gradient_alignment(gradient, -gradient) == pytest.approx(-1.0)


def test_findings_stage_stores_exclusions_claims_and_report(tiny_study):
    similarity = query_db(tiny_study["db"], "SELECT task_a, task_b, measure, value FROM task_similarity")
    assert len(similarity) == 3 * 4  # three pairs of the three tiny tasks, four measures
    assert all(a < b for a, b, _, _ in similarity)
    assert all(v > 0 for _, _, m, v in similarity if m == "frechet")
    # the tiny study scores 96 test images per task (48 per merge): every task is excluded by rule, with the reason
    excluded = query_db(
        tiny_study["db"], "SELECT statistic, value, note FROM findings WHERE statistic LIKE '%/excluded'"
    )
    assert len(excluded) == 3 and all(v == 1 and "< 350" in note and "< 300" in note for _, v, note in excluded)
    claims = query_db(tiny_study["db"], "SELECT statistic, value, note FROM findings WHERE finding = 'claims'")
    assert {c for c, _, _ in claims} == {"claim1", "claim1_data_aware", "claim2", "claim3"}
    assert all(v is None and "every task is excluded by rule" in note for _, v, note in claims)
    report = (tiny_study["root"] / "findings.md").read_text()
    assert "## The paper's three claims" in report and "Excluded: " in report and "**not available**" in report


def _tiny_inputs(db) -> StudyInputs:
    con = duckdb.connect(str(db), read_only=True)
    try:
        merges = con.execute("SELECT * FROM merge_results").df()
        results = con.execute("SELECT task, model_kind, seed, accuracy, n_test FROM task_results").df()
        norms = con.execute("SELECT task, seed, update_norm FROM adapter_update_norms").df()
        sim = con.execute("SELECT task_a, task_b, measure, avg(value) AS value FROM task_similarity GROUP BY ALL").df()
    finally:
        con.close()
    tasks = tuple(sorted(results["task"].unique()))
    return StudyInputs(prepare_merges(merges), results, norms, sim, tasks, ExclusionRules(1.0, 1.0, 0, 0))


def test_tiny_study_figures_with_relaxed_exclusion_rules(tiny_study):
    """With no task excluded, the tiny study's figures: group means, CI only with 3 or more groups."""
    rows = pd.DataFrame(compute_rows(_tiny_inputs(tiny_study["db"])))
    get = {(r.finding, r.statistic): r for r in rows.itertuples()}
    ((mean,),) = query_db(
        tiny_study["db"], "SELECT avg(normalized_accuracy) FROM merge_results WHERE method = 'linear' AND k = 2"
    )
    k2 = get[("retention_vs_k", "linear/k=2")]  # 3 groups (pairs), one seed, two tasks each: balanced
    assert k2.value == pytest.approx(mean) and k2.n == 3 and "unit: merged groups (3)" in k2.note
    assert k2.ci_low <= k2.value <= k2.ci_high
    k3 = get[("retention_vs_k", "linear/k=3")]  # one group: a mean, no CI, and the reason
    assert pd.isna(k3.ci_low) and "1 group: a CI over groups needs at least 3" in k3.note
    # three pairs are too few for a rank correlation: not available, with the reason
    spearman = rows[rows["statistic"] == "spearman/frechet"]
    assert len(spearman) == 1 and spearman["value"].isna().all() and "fewer than 4 pairs" in spearman["note"].iloc[0]
    assert "n/a (fewer than 4 pairs" in render_report(rows)


# -- synthetic studies: the rules and the sensitivity table on data built by hand -------------------

TASKS = ("t0", "t1", "t2", "t3", "t4", "t5")


def synthetic_inputs(
    tasks=TASKS, methods=("linear", "ties"), seeds=(0, 1, 2), max_k=6, n=300, merged=None, single=None,
    head=None, seed=0, rules=None, related_pairs=(), probe=None,
):  # fmt: skip
    """A study like the real one (every group of 2..max_k tasks; all seeds for pairs, the first above).

    merged(task, k, method_index) -> probability an image is right (default: 3 % lost per extra adapter);
    single / head: task -> accuracy. Per-image outcomes are drawn, so McNemar has real discordant pairs.
    probe: task -> accuracy of a multi-layer probe scored on the same n images (none when omitted).
    """
    rng = np.random.default_rng(seed)
    single, head = single or {}, head or {}
    merged = merged or (lambda t, k, mi: single.get(t, 0.9) * (1 - 0.03 * (k - 1) - 0.01 * mi))
    rows, results, norms, sim = [], [], [], []
    for k in range(2, max_k + 1):
        for group in itertools.combinations(sorted(tasks), k):
            for s in seeds if k == 2 else seeds[:1]:
                for mi, method in enumerate(methods):
                    val = 0.8 - 0.01 * mi - 0.02 * k
                    selection = json.dumps({"tuned": False, "grid": [{}], "validation_accuracy": [val],
                                            "chosen": {}, "chosen_validation_accuracy": val,
                                            "validation_n_per_task": 100})  # fmt: skip
                    for t in group:
                        h = rng.random(n) < head.get(t, 0.85)
                        sc = rng.random(n) < single.get(t, 0.9)
                        m = rng.random(n) < min(1.0, merged(t, k, mi))
                        sa, ha, ma = sc.mean(), h.mean(), m.mean()
                        gain = (ma - ha) / (sa - ha) if abs(sa - ha) >= 0.02 else None
                        rows.append(
                            dict(merge_id=f"{method}-{'-'.join(group)}-{s}", method=method, k=k,
                                 tasks=",".join(group), task=t, seed=s, merged_accuracy=ma, single_accuracy=sa,
                                 head_accuracy=ha, normalized_accuracy=ma / sa, normalized_gain=gain,
                                 gain_note=None if gain is not None else "single adapter and head differ by < 2 points",
                                 selection=selection, n=n, merged_correct=pack_correct(m),
                                 single_correct=pack_correct(sc), head_correct=pack_correct(h))
                        )  # fmt: skip
    for i, t in enumerate(sorted(tasks)):
        for s in seeds:
            results.append(dict(task=t, model_kind="adapter", seed=s, accuracy=single.get(t, 0.9), n_test=1000))
            results.append(dict(task=t, model_kind="head", seed=s, accuracy=head.get(t, 0.85), n_test=1000))
            norms.append(dict(task=t, seed=s, update_norm=1.0 + 0.1 * i))
    for i, (a, b) in enumerate(itertools.combinations(sorted(tasks), 2)):
        for measure in ("frechet", "adapter_cosine", "subspace_alignment"):
            sim.append(dict(task_a=a, task_b=b, measure=measure, value=10.0 + i))
    related = {frozenset(p) for p in related_pairs}
    probes = pd.DataFrame(
        [dict(task=t, accuracy=a, validation_accuracy=a, n_test=1000, n_merge_eval=n,
              merge_eval_correct=pack_correct(rng.random(n) < a), config=json.dumps({"chosen": {"C": 0.1}}))
         for t, a in sorted((probe or {}).items())]
    )  # fmt: skip
    return StudyInputs(
        prepare_merges(pd.DataFrame(rows), probes), pd.DataFrame(results), pd.DataFrame(norms), pd.DataFrame(sim),
        tuple(sorted(tasks)), rules or ExclusionRules(), lambda a, b: frozenset((a, b)) in related, probes=probes,
    )  # fmt: skip


def test_a_cell_bootstraps_groups_and_differs_from_a_row_bootstrap():
    """Rows within a group share one merged model: the cell's CI is the group bootstrap, wider than rows'."""
    inputs = synthetic_inputs(methods=("linear",), max_k=2, seeds=(0, 1, 2))
    rows = inputs.merges[inputs.merges["k"] == 2].copy()
    # make the groups differ a lot and the rows within a group agree
    level = {g: 0.80 + 0.02 * i for i, g in enumerate(sorted(rows["tasks"].unique()))}
    rows["normalized_accuracy"] = rows["tasks"].map(level)
    cell = cell_figures(rows, "linear", 2)
    mean, low, high, reason = cell["retention"]
    expected = group_bootstrap_mean(pd.Series(level).sort_index(), rng_for("retention", "linear", 2))
    assert (mean, low, high, reason) == pytest.approx(expected) and cell["groups"] == 15
    values = rows["normalized_accuracy"].to_numpy()
    rng = np.random.default_rng(0)
    row_low, row_high = percentile_interval(values[rng.integers(0, len(values), (2000, len(values)))].mean(1))
    assert (high - low) > 2 * (row_high - row_low)


def test_claim3_is_judged_against_the_stronger_baseline():
    """A merge that beats a weak head but loses to a strong probe: claim 3 reads the probe (the stronger on the
    merges' images) and says so, with the head's figures beside; without probes it reads the head."""
    single = {t: 0.9 for t in TASKS}
    kwargs = dict(methods=("linear",), max_k=3, seeds=(0,), single=single, head={t: 0.70 for t in TASKS},
                  merged=lambda t, k, mi: 0.85)  # fmt: skip
    with_probe = synthetic_inputs(**kwargs, probe={t: 0.95 for t in TASKS})
    rows, verdicts = analyse(with_probe)
    assert next(r for r in rows if r["finding"] == "baseline")["note"] == "probe"
    verdict, reason = verdicts["claim3"]
    assert (
        verdict == CONTRADICTED and "merged − multi-layer probe" in reason and "against the last-layer head" in reason
    )
    probe_rows = {r["statistic"]: r for r in rows if r["finding"] == "real_win_share_tasks"}
    assert probe_rows["linear/k=2/probe"]["value"] == 0 and probe_rows["linear/k=2/head"]["value"] > 0.5
    assert any(r["statistic"] == "t0/probe_accuracy" for r in rows if r["finding"] == "task")
    verdict, reason = analyse(synthetic_inputs(**kwargs))[1]["claim3"]
    assert verdict == SUPPORTED and "merged − last-layer head" in reason


def test_claim1_is_judged_for_data_free_and_data_aware_methods_apart():
    """RegMean (data-aware) keeps 95 %, TIES (data-free) 80 %: the two claim 1 verdicts differ, each naming its
    family's method chosen on validation."""
    keep = {"ties": 0.80, "regmean": 0.95}
    inputs = synthetic_inputs(methods=("ties", "regmean"), max_k=3, seeds=(0,), n=2000,
                              merged=lambda t, k, mi: 0.9 * (0.80, 0.95)[mi])  # fmt: skip
    verdicts = analyse(inputs)[1]
    assert verdicts["claim1"][0] == CONTRADICTED and "ties" in verdicts["claim1"][1]
    assert verdicts["claim1_data_aware"][0] == SUPPORTED and "regmean" in verdicts["claim1_data_aware"][1]
    assert keep  # the figures above, named


def _claim1(r2, w2, r3, w3):
    return pd.DataFrame(
        {k: dict(method="linear", retention=r[1], retention_low=r[0], retention_high=r[2], worst_task="t0",
                 worst=w[1], worst_low=w[0], worst_high=w[2]) for k, r, w in ((2, r2, w2), (3, r3, w3))}
    ).T  # fmt: skip


def test_claim1_rule_can_come_out_every_way():
    good, bad_worst = (0.85, 0.9, 0.95), (0.6, 0.7, 0.78)
    assert claim1_rule(_claim1((0.91, 0.93, 0.95), good, (0.90, 0.92, 0.94), good))[0] == SUPPORTED
    assert claim1_rule(_claim1((0.91, 0.93, 0.95), good, (0.85, 0.87, 0.89), good))[0] == CONTRADICTED
    assert claim1_rule(_claim1((0.91, 0.93, 0.95), good, (0.90, 0.92, 0.94), bad_worst))[0] == CONTRADICTED
    assert claim1_rule(_claim1((0.88, 0.92, 0.95), good, (0.90, 0.92, 0.94), good))[0] == INCONCLUSIVE
    # worst task's mean under 80 % with a CI reaching above it: not supported, not contradicted
    assert claim1_rule(_claim1((0.91, 0.93, 0.95), (0.7, 0.79, 0.85), (0.9, 0.92, 0.94), good))[0] == INCONCLUSIVE
    verdict, reason = claim1_rule(_claim1((0.91, 0.93, 0.95), good, (0.9, 0.92, 0.94), good).drop(index=3))
    assert verdict is None and "k = 3" in reason


def _claim2(rho, p, power):
    """The pre-registered test's table: ρ, p and the power at 0.2 / 0.4 / 0.6 (`power` at 0.4, the others beside)."""
    row = dict(value=rho, p=p, pairs=15, tasks=6, **{"power_0.2": power / 2, "power_0.4": power, "power_0.6": 1.0})
    return pd.DataFrame([row], index=["preregistered"])


def test_claim2_rule_is_symmetric_and_says_untestable_where_power_is_low():
    assert claim2_rule(_claim2(0.6, 0.01, 0.9))[0] == SUPPORTED
    assert claim2_rule(_claim2(-0.6, 0.01, 0.9))[0] == CONTRADICTED
    # a significant result stands whatever the power; a null result is a verdict only where the test could see
    assert claim2_rule(_claim2(0.6, 0.01, 0.2))[0] == SUPPORTED
    assert claim2_rule(_claim2(0.6, 0.2, 0.9))[0] == INCONCLUSIVE
    verdict, reason = claim2_rule(_claim2(0.6, 0.2, 0.3))
    assert verdict == UNTESTABLE and "power at ρ = 0.2: 15%, 0.4: 30%, 0.6: 100%" in reason
    assert claim2_rule(_claim2(np.nan, np.nan, 0.9))[0] is None


def test_the_preregistered_test_finds_an_effect_planted_in_the_residuals_and_not_task_effects():
    """Twenty tasks: retention that follows the pair distance beyond the tasks' own effects is found (ρ near 1,
    p tiny); retention made of task effects alone (a hard task, a far task) is not, though its plain Spearman ρ
    with the distance is large, because the distance has task effects too."""
    rng = np.random.default_rng(0)
    tasks = 20
    pairs = np.array(list(itertools.combinations(range(tasks), 2)))
    points = rng.random((tasks, 3))
    distance = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    far = distance.sum(1)  # each task's own "far from everything" effect
    d = distance[pairs[:, 0], pairs[:, 1]]
    test = ResidualMantel(pairs, distance, rng=np.random.default_rng(1), permutations=999)
    planted = task_effects_residual_matrix(pairs, tasks) @ d + far[pairs[:, 0]] + far[pairs[:, 1]]
    rho, p, _, _ = test.test(planted)
    assert rho > 0.99 and p <= 0.002
    effects_only = far[pairs[:, 0]] + far[pairs[:, 1]]
    assert spearman(effects_only, d) > 0.3
    rho, p, _, _ = test.test(effects_only + 1e-9 * rng.standard_normal(len(pairs)))
    assert p > 0.05
    assert test.power(0.6, np.random.default_rng(2), 50) > 0.9 and test.power(0.0, np.random.default_rng(3), 200) < 0.1


def _claim3(*cells):
    return pd.DataFrame(
        {k: dict(method="linear", baseline="head", diff=d[1], diff_low=d[0], diff_high=d[2], wins=w, rows=n,
                 wins_low=wilson(w, n)[0], beside="") for k, d, w, n in cells}
    ).T  # fmt: skip


def test_claim3_rule_can_come_out_every_way():
    assert claim3_rule(_claim3((2, (0.5, 1.0, 1.5), 0, 90), (3, (-3, -2, -1), 0, 60)))[0] == SUPPORTED
    # a single real win is not enough: its Wilson lower bound is under the chance rate
    assert wilson(1, 90)[0] < 0.025
    assert claim3_rule(_claim3((2, (-2, -1, -0.5), 1, 90), (3, (-3, -2, -1), 0, 60)))[0] == CONTRADICTED
    # many real wins are: 10 of 90 has a Wilson lower bound of 0.061
    assert claim3_rule(_claim3((2, (-2, -1, -0.5), 10, 90), (3, (-3, -2, -1), 0, 60)))[0] == SUPPORTED
    assert claim3_rule(_claim3((2, (-2, -0.5, 0.5), 1, 90), (3, (-3, -2, -1), 0, 60)))[0] == INCONCLUSIVE
    # k without a CI (fewer than 3 groups) are not judged
    assert claim3_rule(_claim3((6, (np.nan, -9, np.nan), 0, 6)))[0] is None


def test_each_claims_report_text_is_its_claim_objects_rule():
    """The report and the `claim_rules` rows print the very rule text the Claim object carries beside its code,
    so the words a reader sees and the rule the verdict applies cannot drift apart."""
    rows, verdicts = analyse(synthetic_inputs(methods=("linear",), max_k=3))
    report = render_report(pd.DataFrame(rows))
    stored = {r["statistic"]: r["note"] for r in rows if r["finding"] == "claim_rules"}
    assert [claim.name for claim in CLAIMS] == list(verdicts) == list(stored)
    for claim in CLAIMS:
        (line,) = [line for line in report.splitlines() if line.startswith(f"- `{claim.name}` *{claim.statement}*: ")]
        assert f"Rule: {claim.rule}. Statistics: " in line and stored[claim.name] == claim.rule


def test_the_exclusion_sentence_is_formatted_from_the_rules():
    """Other thresholds, other sentence (and the defaults named beside them); the default rules give the
    committed report's sentence."""
    rows = pd.DataFrame(analyse(synthetic_inputs(methods=("linear",), max_k=2))[0])
    default, own = render_report(rows), render_report(rows, ExclusionRules(0.95, 0.9, 100, 50))
    assert (
        "A task is excluded by rule (never by hand) when its single adapter's mean test accuracy is > 99 %, its "
        "head's > 97 %, its smallest test split < 350 images or its merge evaluation < 300 images: such a task says "
        "nothing about merging. Its rows are left out of every figure and claim below.\n" in default
    )
    assert "these are this study's thresholds" not in default.lower()
    assert (
        "when its single adapter's mean test accuracy is > 95 %, its head's > 90 %, its smallest test split "
        "< 100 images or its merge evaluation < 50 images:" in own
    )
    assert (
        "These are this study's thresholds; the defaults are its single adapter's mean test accuracy is > 99 %" in own
    )
    assert ExclusionRules(0.95, 0.9, 100, 50).report_sentence() in own


def test_a_ceiling_task_is_excluded_from_every_claim():
    inputs = synthetic_inputs(methods=("linear",), max_k=3, single={"t5": 0.995}, head={"t5": 0.98})
    rows, _ = analyse(inputs)
    get = {(r["finding"], r["statistic"]): r for r in rows}
    flag = get[("task", "t5/excluded")]
    assert (
        flag["value"] == 1 and "single adapter at the ceiling" in flag["note"] and "head at the ceiling" in flag["note"]
    )
    assert get[("task", "t0/excluded")]["value"] == 0
    assert not any(r["statistic"].endswith("/t5") for r in rows if r["finding"] == "task_retention")
    assert not any(
        r["statistic"].startswith("t5,") or ",t5/" in r["statistic"] for r in rows if r["finding"] == "pairs"
    )
    assert "- t5: single adapter at the ceiling (99.5 % > 99 %)" in render_report(pd.DataFrame(rows))


def test_the_sensitivity_table_reports_a_verdict_that_rests_on_single_tasks():
    """Merges beat the head only on t3, t4 and t5 (weak heads): the real-win share's CI over tasks stays above
    chance while half the tasks win (a resample without any of them is rarer than 2.5 %), not with two of five."""
    weak = {"t3": 0.5, "t4": 0.5, "t5": 0.5}
    merged = lambda t, k, mi: 0.88 if t in weak else 0.84  # noqa: E731
    inputs = synthetic_inputs(methods=("linear",), max_k=3, merged=merged, head={t: 0.9 for t in TASKS} | weak)
    rows = pd.DataFrame(compute_rows(inputs))
    get = {(r.finding, r.statistic): r for r in rows.itertuples()}
    assert get[("claims", "claim3")].value == SUPPORTED
    assert get[("sensitivity", "claim3/without=t5")].value == INCONCLUSIVE
    assert get[("sensitivity", "claim3/without=t0")].value == SUPPORTED
    dependence = get[("sensitivity", "claim3/single_task_dependence")]
    assert dependence.value == 3 and "t5" in dependence.note  # each of the three winning tasks
    report = render_report(rows)
    assert "| claim3 | supported |" in report and "yes: the verdict changes when t3, t4, t5 is left out" in report


def test_findings_of_a_full_size_study_take_well_under_a_minute():
    """~1,200 merges x 2.8 tasks: 14 methods, every group of the six tasks, three seeds for pairs."""
    inputs = synthetic_inputs(methods=tuple(f"method{i:02d}" for i in range(14)), related_pairs=[("t0", "t1")])
    started = time.perf_counter()
    rows = compute_rows(inputs)
    assert time.perf_counter() - started < 60
    assert compute_rows(inputs) == rows  # fixed seeds: the same figures again
    chosen = [r for r in rows if r["finding"] == "chosen_method"]
    assert [r["statistic"] for r in chosen] == [f"method00/k={k}" for k in range(2, 7)]  # best on validation


def test_a_transductive_or_partial_method_is_never_chosen_and_data_aware_methods_are_compared_on_their_merges():
    """AdaMerging (learned on the test images) and any method merged on a subset of the (group, seed) pairs
    never become 'the method chosen on validation', however high their validation accuracy; the data-aware
    comparison sets each of them against the best data-free method over the very same merges."""
    # methods: index 0 is best on validation, so adamerging/regmean (index 0 and 1) would win if eligible
    inputs = synthetic_inputs(methods=("adamerging", "regmean", "ties", "linear"), max_k=3)
    merges = inputs.merges
    partial = merges[(merges["method"] == "regmean") & (merges["tasks"] == "t0,t1") & (merges["seed"] == 1)]
    inputs.merges = merges.drop(partial.index)  # regmean now misses one (group, seed) at k = 2
    rows, _ = analyse(inputs)
    chosen = {r["statistic"] for r in rows if r["finding"] == "chosen_method"}
    assert chosen == {"ties/k=2", "regmean/k=3"}  # adamerging: transductive; regmean at k = 2: incomplete
    compared = {r["statistic"]: r for r in rows if r["finding"] == "data_aware"}
    assert {s.rsplit("/", 1)[0] for s in compared} == {"adamerging/k=3", "regmean/k=3"}
    mean = compared["adamerging/k=3/mean"]
    assert "vs ties" in mean["note"] and "transductive" in mean["note"] and mean["n"] == 20  # 20 groups of 3
    assert compared["regmean/k=3/t0"]["value"] == pytest.approx(
        100 * (merges[(merges["method"] == "regmean") & (merges["k"] == 3) & (merges["task"] == "t0")][
            "merged_accuracy"].mean() - merges[(merges["method"] == "ties") & (merges["k"] == 3) & (
            merges["task"] == "t0")]["merged_accuracy"].mean())
    )  # fmt: skip
    assert "## Data-aware methods against the best data-free method" in render_report(pd.DataFrame(rows))


def test_a_data_free_method_swept_on_a_subset_is_not_the_data_aware_method_s_reference():
    """A data-free method merged on part of the data-aware method's merges (a `subset_methods` one) is not the
    'best data-free method on the same merges', however high its validation accuracy there."""
    inputs = synthetic_inputs(methods=("regmean", "linear", "ties"), max_k=3)  # linear beats ties on validation
    merges = inputs.merges
    inputs.merges = merges.drop(merges[(merges["method"] == "linear") & (merges["tasks"] == "t0,t1,t2")].index)
    compared = {r["statistic"]: r for r in analyse(inputs)[0] if r["finding"] == "data_aware"}
    assert "vs ties" in compared["regmean/k=3/mean"]["note"]
    inputs.merges = merges  # linear on every merge: it is the reference
    compared = {r["statistic"]: r for r in analyse(inputs)[0] if r["finding"] == "data_aware"}
    assert "vs linear" in compared["regmean/k=3/mean"]["note"]


# -- a study of one's own: the exclusion thresholds as options, and the report's names -------------


def _options(note: str) -> dict[str, str]:
    """The options an exclusion note says would include its task: {"--min-test-images": "120", ...}."""
    return dict(re.findall(r"include it with (--[a-z-]+) ([0-9.]+) or", note))


def test_the_report_names_why_each_task_is_excluded_and_the_options_that_include_it():
    """Small data: every task fails a rule under the defaults; the report names each task's rule, its figure
    and the option value that would include it, and that value, given, does include it."""
    inputs = synthetic_inputs(methods=("linear",), max_k=3, n=60, single={"t2": 0.995})
    results = inputs.task_results
    results.loc[results["task"] == "t1", "n_test"] = 120
    rows, verdicts = analyse(inputs)
    flags = {r["statistic"].rsplit("/", 1)[0]: r for r in rows if r["statistic"].endswith("/excluded")}
    assert all(f["value"] == 1 for f in flags.values())
    assert all(v is None for v, _ in verdicts.values())
    report = render_report(pd.DataFrame(rows))
    assert "Excluded: none" not in report and "Excluded: 6 of 6 tasks" in report and "Every task is excluded" in report
    assert (
        "- t0: merge evaluation on 60 images < 300: include it with --min-merge-eval-images 60 or lower, "
        "or with --merge-eval 300 or more" in report
    )
    assert "- t1: test split of 120 images < 350: include it with --min-test-images 120 or lower" in report
    assert "- t2: single adapter at the ceiling (99.5 % > 99 %): include it with --max-adapter-accuracy 0.995" in report
    assert _options(flags["t1"]["note"]) == {"--min-test-images": "120", "--min-merge-eval-images": "60"}
    # the values the notes name, given as thresholds, keep every task: the same study now has verdicts
    wanted = {}
    for flag in flags.values():
        for option, value in _options(flag["note"]).items():
            wanted[option] = min(wanted.get(option, float("inf")), float(value))
    assert wanted.pop("--max-adapter-accuracy") >= 0.995 and set(wanted) == {
        "--min-test-images",
        "--min-merge-eval-images",
    }
    inputs.rules = ExclusionRules(0.995, 0.97, int(wanted["--min-test-images"]), int(wanted["--min-merge-eval-images"]))
    rows, verdicts = analyse(inputs)
    assert not any(r["value"] for r in rows if r["statistic"].endswith("/excluded"))
    assert verdicts["claim1"][0] is not None  # judged now
    report = render_report(pd.DataFrame(rows), inputs.rules)
    assert "Excluded: none." in report
    # the Tasks section states the thresholds in force, and the defaults beside them
    assert (
        "when its single adapter's mean test accuracy is > 99.5 %, its head's > 97 %, its smallest test split "
        "< 120 images or its merge evaluation < 60 images:" in report
    )
    assert "the defaults are its single adapter's mean test accuracy is > 99 %" in report


def test_exclusion_thresholds_are_options_of_the_study_and_keep_the_default_run_id():
    from merging.methods import list_methods
    from mlvision.config import PROFILES, config_from_args
    from mlvision.runs import study_run_id
    from study.run_all import build_parser

    def config(*argv):
        return config_from_args(build_parser().parse_args(list(argv)), tuple(list_methods()))

    default = config()
    assert ExclusionRules.from_config(default) == ExclusionRules()
    assert study_run_id(default) == study_run_id(PROFILES["default"].with_methods(tuple(list_methods())))
    assert not {"min_test_images", "min_merge_eval_images", "max_adapter_accuracy", "max_head_accuracy"} & set(
        default.identity()
    )
    own = config(
        "--min-test-images", "90", "--min-merge-eval-images", "40", "--max-adapter-accuracy", "0.999",
        "--max-head-accuracy", "1",
    )  # fmt: skip
    assert ExclusionRules.from_config(own) == ExclusionRules(0.999, 1.0, 90, 40)
    assert own.identity()["min_test_images"] == 90 and study_run_id(own) != study_run_id(default)
    with pytest.raises(SystemExit):  # a percentage where a fraction is meant: argparse's one-line error
        build_parser().parse_args(["--max-adapter-accuracy", "99"])


def test_hub_task_names_with_slashes_render_whole():
    """hub:./data/pets and hub:user/name are task names, not "hub:" and a figure: one row each, their own n,
    their exclusion named, in every table of the report."""
    tasks = ("hub:./data/pets", "hub:user/name", "t2", "t3", "t4", "t5")
    inputs = synthetic_inputs(tasks=tasks, methods=("linear",), max_k=3)
    results = inputs.task_results
    results.loc[results["task"] == "hub:user/name", "n_test"] = 200
    report = render_report(pd.DataFrame(compute_rows(inputs)))
    table = [line for line in report.splitlines() if line.startswith("| hub:")]
    assert [line.split(" | ")[0] for line in table[:2]] == ["| hub:./data/pets", "| hub:user/name"]
    assert "| hub: |" not in report and "(n=0)" not in report
    assert "| hub:./data/pets | 90.0 % (n=1000) | 85.0 % (n=1000) | not trained | 300 | kept |" in report
    assert "| hub:user/name | 90.0 % (n=200) | 85.0 % (n=200) | not trained | 300 | excluded (below) |" in report
    assert "Excluded: 1 of 6 tasks" in report and "- hub:user/name: test split of 200 images < 350" in report
    assert "| hub:./data/pets | " in report.split("Per-task retention of the chosen method")[1]
    assert "without hub:./data/pets" in report and "hub:./data/pets + t2" in report


def test_two_databases_in_one_folder_keep_two_reports_named_after_them(tiny_study, tmp_path):
    """mine.duckdb -> mine.findings.md beside it, its header naming it; the thresholds given on the command line
    are the ones its report applies and states."""
    from mlvision.paths import DEFAULT_DB_PATH, REPO_ROOT
    from study.findings.report import report_path

    assert report_path(DEFAULT_DB_PATH) == REPO_ROOT / "reports" / "findings.md"  # the committed report
    assert report_path(tmp_path / "results.duckdb") == tmp_path / "findings.md"  # runs/<profile>/findings.md
    for name in ("one", "two"):
        shutil.copy(tiny_study["db"], tmp_path / f"{name}.duckdb")
    study = [*TINY_ARGS, "--artifacts", tiny_study["artifacts"], "--stages", "findings"]
    assert run_all(*study, "--db", tmp_path / "one.duckdb") == 0
    # thresholds for the tiny study's small data (lfw_faces: 40 test images, 100 % for every model): every task kept
    small = ["--min-test-images", "40", "--min-merge-eval-images", "40", "--max-adapter-accuracy", "1",
             "--max-head-accuracy", "1"]  # fmt: skip
    assert run_all(*study, *small, "--db", tmp_path / "two.duckdb") == 0
    assert not (tmp_path / "findings.md").exists()
    one, two = (tmp_path / "one.findings.md").read_text(), (tmp_path / "two.findings.md").read_text()
    assert "from `one.duckdb`" in one and "from `two.duckdb`" in two and "results.duckdb" not in one + two
    assert "Excluded: 3 of 3 tasks" in one and "- textures: test split of 96 images < 350" in one
    assert "Excluded: none." in two and "its smallest test split < 40 images or its merge evaluation < 40" in two
    assert "| lfw_faces | 100.0 % (n=40) |" in two
    assert "every task is excluded by rule" in one and "every task is excluded by rule" not in two
    kept = query_db(tmp_path / "two.duckdb", "SELECT count(*) FROM findings WHERE statistic LIKE '%/excluded'")
    assert kept == [(3,)] and query_db(
        tmp_path / "two.duckdb", "SELECT sum(value) FROM findings WHERE statistic LIKE '%/excluded'"
    ) == [(0.0,)]


def test_grid_edges_count_choices_at_each_end_and_call_two_point_grids_too_coarse():
    """Three merges of a method choosing λ = 0.3 (the smallest), 0.3 and 0.7 of the grid 0.3-1.0: the low edge in 2 of
    3, the high edge in 0; a two-value density is listed without a share."""

    def selection(chosen):
        grid = [{"scaling": s, "density": d} for s in (0.3, 0.5, 0.7, 1.0) for d in (0.2, 0.5)]
        return json.dumps({"tuned": True, "grid": grid, "chosen": chosen})

    merges = pd.DataFrame(
        [dict(merge_id=f"m{i}", method="ties", selection=selection({"scaling": s, "density": 0.2}))
         for i, s in enumerate((0.3, 0.3, 0.7))]
    )  # fmt: skip
    rows = {r["statistic"]: r for r in grid_edge_rows(merges)}
    assert rows["ties/scaling/low"]["value"] == pytest.approx(2 / 3) and rows["ties/scaling/high"]["value"] == 0
    assert "chosen in 2 of 3 merges" in rows["ties/scaling/low"]["note"]
    assert rows["ties/density/low"]["value"] is None and "two values" in rows["ties/density/low"]["note"]
    report = render_report(pd.DataFrame([*analyse(synthetic_inputs(methods=("linear",), max_k=2))[0],
                                         *grid_edge_rows(merges)]))  # fmt: skip
    assert "| ties/scaling | **67% (2 of 3)** | 0% (0 of 3) | 0.3, 0.5, 0.7, 1 |" in report


def test_a_grid_that_falls_with_k_judges_each_merge_on_its_own_k_grid():
    """Task arithmetic's λ grid falls with k: 0.291 is the middle of the k = 6 grid though it lies below every
    pair's value, and 1.4 is the pair's top; a union of the grids would call 0.291 an edge and 0.7 a middle."""
    ta = get_method("task_arithmetic")

    def merge(i, k, chosen):
        return dict(
            merge_id=f"m{i}",
            method="task_arithmetic",
            k=k,
            selection=json.dumps({"tuned": True, "grid": ta.grid_points(k), "chosen": {"scaling": chosen}}),
        )

    merges = pd.DataFrame([merge(0, 6, 0.291), merge(1, 6, 0.581), merge(2, 2, 0.7), merge(3, 2, 1.4)])
    rows = {r["statistic"]: r for r in grid_edge_rows(merges)}
    low, high = rows["task_arithmetic/scaling/low"], rows["task_arithmetic/scaling/high"]
    assert low["value"] == 0 and high["value"] == 0.5 and "chosen in 2 of 4" in high["note"]
    assert "grid 0.3, 0.5, 0.7, 1, 1.4 for a pair, × (2/k)^0.8 for k tasks" in high["note"]


def test_a_grid_edge_at_the_end_of_the_range_is_marked_not_bold():
    """RegMean's α cannot exceed 1: choices at α = 1 sit at the grid's edge and at the range's end, which the report
    says instead of flagging the grid as too narrow; the low edge (0.4) is an ordinary edge."""
    grid = [{"alpha": a} for a in (0.6, 0.4, 0.8, 0.9, 1.0)]
    merges = pd.DataFrame(
        [dict(merge_id=f"m{i}", method="regmean",
              selection=json.dumps({"tuned": True, "grid": grid, "chosen": {"alpha": a}}))
         for i, a in enumerate((1.0, 1.0, 1.0, 0.4))]
    )  # fmt: skip
    rows = {r["statistic"]: r for r in grid_edge_rows(merges)}
    assert RANGE_END in rows["regmean/alpha/high"]["note"] and RANGE_END not in rows["regmean/alpha/low"]["note"]
    report = render_report(pd.DataFrame([*analyse(synthetic_inputs(methods=("linear",), max_k=2))[0], *rows.values()]))
    assert "| regmean/alpha | **25% (1 of 4)** | 75% (3 of 4), the range's end | 0.4, 0.6, 0.8, 0.9, 1 |" in report


def test_the_sensitivity_table_leaves_out_each_relation_kind():
    """A related pair (t0, t1; kind "related": the registry does not know synthetic tasks): every verdict is
    recomputed without every group holding both, which leaves the pairs (t0, t2) and (t1, t2) of the four groups."""
    inputs = synthetic_inputs(tasks=("t0", "t1", "t2"), methods=("linear",), max_k=3, related_pairs=[("t0", "t1")])
    rows = pd.DataFrame(compute_rows(inputs))
    kinds = rows[(rows["finding"] == "sensitivity") & rows["statistic"].str.contains("/without_kind=")]
    assert sorted(kinds["statistic"]) == sorted(f"{c.name}/without_kind=related" for c in CLAIMS)
    assert set(kinds["n"]) == {2}
    kept = inputs.merges[~inputs.merges["group_tasks"].map(lambda g: {"t0", "t1"} <= g)]
    _, by_hand = analyse(replace(inputs, merges=kept), full=False)
    for claim in CLAIMS:
        stored = kinds.loc[kinds["statistic"] == f"{claim.name}/without_kind=related", "value"].iloc[0]
        assert (pd.isna(stored) and by_hand[claim.name][0] is None) or stored == by_hand[claim.name][0]
    assert "| claim | verdict | without related (2) |" in render_report(rows)


def test_on_a_star_grid_an_edge_counts_only_choices_on_that_hyperparameters_arm():
    """A star around (density 0.2, scaling 1.0): a choice on the density arm says nothing about scaling, so scaling's
    shares count only the choices with density at its default (2 of the 4 merges here)."""
    grid = [{"density": 0.2, "scaling": 1.0}, {"density": 0.1, "scaling": 1.0}, {"density": 0.5, "scaling": 1.0},
            {"density": 0.2, "scaling": 0.7}, {"density": 0.2, "scaling": 1.3}]  # fmt: skip
    chosen = [(0.1, 1.0), (0.5, 1.0), (0.2, 0.7), (0.2, 1.0)]
    merges = pd.DataFrame(
        [dict(merge_id=f"m{i}", method="ties",
              selection=json.dumps({"tuned": True, "grid": grid, "chosen": {"density": d, "scaling": s}}))
         for i, (d, s) in enumerate(chosen)]
    )  # fmt: skip
    rows = {r["statistic"]: r for r in grid_edge_rows(merges)}
    assert rows["ties/scaling/low"]["value"] == 0.5 and rows["ties/scaling/low"]["n"] == 2
    assert rows["ties/density/low"]["value"] == pytest.approx(1 / 3) and rows["ties/density/low"]["n"] == 3
    assert rows["ties/density/high"]["value"] == pytest.approx(1 / 3)
