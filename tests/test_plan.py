"""The merge planner (issue 34): the retention predictors, their held-out scoring, the partition search, the CLI."""

import dataclasses
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_TASKS, call_main, committed_adapter, tiny_config

from merging.plan import EXACT_MAX, Planner, PlanStage
from merging.plan import main as plan_main
from merging.predict import evaluate, fit, group_retention, pair_losses, predict, task_rows
from mlvision.paths import DEFAULT_DB_PATH, REPO_ROOT
from mlvision.store import Store

TASKS = ("a", "b", "c", "d", "e", "f")


def interference_merges(loss, tasks=TASKS, noise=0.0, seed=0, weights=(0.99, -0.8, -0.5, -0.01)):
    """Every group of 2..len(tasks) of one method: a pair keeps 1 - loss(t, u); a larger group keeps
    w0 + w1 * sum of pair losses + w2 * largest + w3 * (k - 1) (+ noise): the fitted model's own form."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(2, len(tasks) + 1):
        for group in itertools.combinations(tasks, k):
            for task in group:
                losses = [loss(task, u) for u in group if u != task]
                value = 1 - losses[0] if k == 2 else weights[0] + weights[1] * sum(losses) + weights[2] * max(losses)
                value += (weights[3] * (k - 1) if k > 2 else 0) + noise * rng.standard_normal()
                rows.append(dict(method="m", k=k, tasks=",".join(group), task=task, seed=0, normalized_accuracy=value))
    return pd.DataFrame(rows)


def random_loss(seed=0, tasks=TASKS):
    ordered = list(itertools.permutations(tasks, 2))
    values = np.random.default_rng(seed).uniform(0.0, 0.08, len(ordered))
    table = {pair: float(value) for pair, value in zip(ordered, values)}
    return lambda t, u: table[(t, u)]


def test_the_fitted_model_recovers_the_interference_weights_and_pairs_are_measured():
    rows = task_rows(interference_merges(random_loss()), "m")
    losses = pair_losses(rows)
    fitted = fit(rows, losses)
    assert fitted["weights"] == pytest.approx([0.99, -0.8, -0.5, -0.01], abs=1e-3)
    assert group_retention(("a", "b"), losses, fitted, "fitted") == pytest.approx(
        {"a": 1 - random_loss()("a", "b"), "b": 1 - random_loss()("b", "a")}
    )
    group = ("a", "c", "e")
    expected = (
        0.99 - 0.8 * (losses[("c", "a")] + losses[("c", "e")]) - 0.5 * max(losses[("c", "a")], losses[("c", "e")])
    )
    assert group_retention(group, losses, fitted, "fitted")["c"] == pytest.approx(expected - 0.02, abs=1e-3)
    row = pd.DataFrame({"task": ["c"], "group": [group], "k": [3]})
    for name in ("fitted", "additive", "worst_pair", "mean_at_k", "task_mean_at_k"):  # the two paths agree
        assert group_retention(group, losses, fitted, name)["c"] == pytest.approx(predict(row, losses, fitted, name)[0])


def test_held_out_scores_rank_the_true_model_above_the_baselines():
    """On data the pair-interference model generated (plus noise), the fitted predictor's held-out error is below
    every baseline's, for held-out groups and held-out tasks; an undefined ρ is NaN, not an error."""
    scores = evaluate(task_rows(interference_merges(random_loss(1), noise=0.005), "m"))
    overall = scores[scores["k"] == "all"].set_index(["scheme", "predictor"])["mae_points"]
    for scheme in ("groups", "tasks"):
        assert overall[(scheme, "fitted")] < min(overall[(scheme, b)] for b in ("mean_at_k", "worst_pair"))
    assert set(scores["k"]) == {3, 4, 5, 6, "all"}


def partitions(items):
    """Every set partition of `items` (brute force, for checking the planner's dynamic programme)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in partitions(rest):
        yield [[first], *partition]
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_exact_plan_is_the_best_of_every_partition(seed):
    planner = Planner(interference_merges(random_loss(seed)), "m")
    for keep in (0.9, 0.93, 0.96):
        target = dict.fromkeys(TASKS, keep)
        feasible = [
            (len(p), -min(min(planner.retention(tuple(sorted(g))).values()) for g in p))
            for p in partitions(list(TASKS))
            if all(planner.meets(tuple(sorted(g)), target) for g in p)
        ]
        plan = planner.plan(TASKS, target)
        assert (plan.backbones, -plan.worst) == pytest.approx(min(feasible)) and plan.exact
        assert all(value >= keep for value in plan.predicted.values())
        assert sorted(t for g in plan.groups for t in g) == list(TASKS)
    best_two = planner.best_with(TASKS, 2)
    brute = max(min(min(planner.retention(tuple(sorted(g))).values()) for g in p)
                for p in partitions(list(TASKS)) if len(p) <= 2)  # fmt: skip
    assert best_two.backbones <= 2 and best_two.worst == pytest.approx(brute)


def test_a_plan_that_no_partition_meets_within_the_backbones_is_none():
    planner = Planner(interference_merges(lambda t, u: 0.2), "m")  # every pair loses 20 %
    assert planner.plan(TASKS, dict.fromkeys(TASKS, 0.9), max_backbones=5) is None
    alone = planner.plan(TASKS, dict.fromkeys(TASKS, 0.9))
    assert alone.backbones == 6 and alone.worst == 1.0  # each task its own adapter


def wide_planner(tasks: tuple[str, ...]) -> Planner:
    """A planner over more tasks than the exact search takes: every pair, and the groups of k >= 3 of six of them."""
    loss = random_loss(3, tasks)
    pairs_only = interference_merges(loss, tasks=tasks[:6])  # groups of k >= 3 for the weights: six tasks
    pairs = [dict(method="m", k=2, tasks=f"{a},{b}", task=t, seed=0, normalized_accuracy=1 - loss(t, u))
             for a, b in itertools.combinations(tasks, 2) for t, u in ((a, b), (b, a))]  # fmt: skip
    return Planner(pd.concat([pairs_only[pairs_only["k"] > 2], pd.DataFrame(pairs)], ignore_index=True), "m")


def test_beyond_exact_size_the_greedy_plan_meets_the_target():
    tasks = tuple(f"t{i:02d}" for i in range(EXACT_MAX + 2))
    plan = wide_planner(tasks).plan(tasks, dict.fromkeys(tasks, 0.92))
    assert not plan.exact and sorted(t for g in plan.groups for t in g) == sorted(tasks)
    assert plan.worst >= 0.92 and plan.backbones < len(tasks)


def test_beyond_exact_size_the_tradeoff_has_a_plan_for_every_count_of_backbones():
    """The plan stage's curve on a wide pool (the twenty-task study's plan stage once failed here: its fallback, the
    one backbone holding every task, was asked for a target it had none of)."""
    tasks = tuple(f"t{i:02d}" for i in range(EXACT_MAX + 2))
    planner = wide_planner(tasks)
    curve = planner.tradeoff(tasks)
    assert sorted(curve) == list(range(1, len(tasks) + 1))
    assert curve[1].groups == (tasks,) and not curve[1].exact  # one backbone: every task in it
    for backbones, plan in curve.items():
        assert plan.backbones <= backbones and sorted(t for g in plan.groups for t in g) == sorted(tasks)
    worst = [curve[b].worst for b in sorted(curve)]
    assert worst == sorted(worst) and worst[-1] > worst[0]  # more backbones never hurt, and here they help
    assert planner.best_with(tasks, 1).groups == (tasks,)


def test_a_study_missing_a_pair_is_refused_in_one_line():
    merges = interference_merges(random_loss())
    merges = merges[merges["tasks"] != "a,b"]
    with pytest.raises(Exception, match="no m merge of 1 pair"):
        Planner(merges, "m")


def plan_cli(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "merging" / "plan.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)  # fmt: skip


def test_the_cli_plans_the_committed_study_and_checks_the_plan_against_stored_merges():
    done = plan_cli("--db", str(DEFAULT_DB_PATH), "--keep", "0.9")
    assert done.returncode == 0, done.stderr
    assert "backbone(s) for 6 tasks (exact search)" in done.stdout and "measured below the target:" in done.stdout
    assert "/ measured " in done.stdout  # the default study stores every group: the plan is checked against them


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--keep", "1.5"], 2, "--keep 1.5: give the share of accuracy to keep, in (0, 1]"),
        (["--method", "no_such"], 2, "the study stores no merge of 'no_such'"),
        (["--db", "nowhere.duckdb"], 2, "nowhere.duckdb: no such results database"),
        (["--tasks", "mnist", "nope"], 2, "the study has no task nope"),
        (["--keep", "0.999", "--max-backbones", "1"], 1, "no plan keeps 100% for every task within 1 backbone(s)"),
    ],
)
def test_the_cli_says_what_is_wrong_in_one_line(args, code, message, capsys):
    returned, out, err = call_main(plan_main, ["--db", DEFAULT_DB_PATH, *args], capsys)
    assert returned == code and message in out + err
    assert "Traceback" not in err


def committed_adapters(*tasks: str) -> list[str]:
    return [str(committed_adapter(task)) for task in tasks]


def test_adapters_no_study_stored_are_planned_from_their_pairs_and_checked_on_test_images(capsys):
    """Three committed adapters given as folders: each pair merged with TIES and scored on 40 validation images per
    task, the weights lent by the committed study's groups of three or more, the planned groups scored on test."""
    adapters = committed_adapters("mnist", "fashion_mnist", "uci_digits")
    args = [*adapters, "--method", "ties", "--keep", "0.85", "--images", "40", "--db", DEFAULT_DB_PATH]
    code, out, err = call_main(plan_main, args, capsys)
    assert code == 0, err
    assert (
        "pairs merged and scored on 40 validation images per task (the fewest of any task); predictor: fitted, " in out
    )
    assert "weights from another study" in out
    assert "backbone(s) for 3 tasks (exact search)" in out
    planned = [line for line in out.splitlines() if line.startswith("  backbone ")]
    merged = [line for line in planned if "(its own adapter)" not in line]
    assert merged, "at 85 % TIES keeps some pair of these three (the committed study: every pair above 90 %)"
    assert all(line.count("/ measured ") == line.count(",") + 1 for line in merged)  # every merged task checked


def test_given_adapters_pairs_are_every_pair_on_validation():
    from merging.merge import build_parser as merge_parser
    from merging.merge import read_source, resolve_sources
    from merging.plan import GivenAdapters

    args = merge_parser().parse_args(committed_adapters("mnist", "uci_digits", "animals"))
    given = GivenAdapters(read_source(args, *resolve_sources(args)), "task_arithmetic", images=24)
    pairs = given.pairs()
    assert sorted(pairs["tasks"].unique()) == ["animals,mnist", "animals,uci_digits", "mnist,uci_digits"]
    assert len(pairs) == 6 and pairs["k"].eq(2).all()
    assert pairs["normalized_accuracy"].between(0.3, 1.5).all()
    assert {len(labels) for _, labels in given.validation.values()} == {24}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "mnist"], "--tasks plans a stored study: give no ADAPTER"),
        (["--images", "0"], "--images 0: give at least 1 image per task"),
        (["--max-backbones", "0"], "--max-backbones 0: give at least 1"),
    ],
)
def test_adapter_planning_refuses_bad_options_in_one_line(extra, message, capsys):
    code, out, err = call_main(plan_main, [*committed_adapters("mnist", "uci_digits"), *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_one_adapter_is_not_a_plan(capsys):
    code, _, err = call_main(plan_main, committed_adapters("mnist"), capsys)
    assert code == 2 and "give at least two adapters to plan" in err


def test_the_tradeoff_is_the_best_plan_per_number_of_backbones_and_falls_back_without_larger_groups():
    merges = interference_merges(random_loss(3))
    planner = Planner(merges, "m")
    curve = planner.tradeoff(planner.tasks)
    assert sorted(curve) == list(range(1, len(TASKS) + 1))
    for backbones, plan in curve.items():
        assert plan.backbones <= backbones
        assert plan == planner.best_with(planner.tasks, backbones)
    worst = [curve[b].worst for b in sorted(curve)]
    assert worst == sorted(worst) and worst[-1] == 1.0  # more backbones never hurt; one per task keeps all
    pairs_only = Planner(merges[merges["k"] == 2], "m")  # nothing of k >= 3 to fit the weights on
    assert planner.predictor == "fitted" and pairs_only.predictor == "additive"
    loss = random_loss(3)
    assert pairs_only.retention(("a", "b", "c"))["a"] == pytest.approx(1 - loss("a", "b") - loss("a", "c"))


def test_the_plan_stage_stores_plans_and_merges_the_planned_groups_the_sweep_did_not(tiny_study, tmp_path):
    """The tiny study merged every group; with its three-task ties merge deleted, the stage must merge that group
    again to check the plan that uses it, exactly as the sweep did (same choice, same test images), store it apart
    from the sweep's merges, and show it in `merge_plans`; run again, it writes nothing."""

    db = tmp_path / "results.duckdb"
    shutil.copy(tiny_study["db"], db)
    store = Store(db)
    stored = store.query_df("SELECT * FROM merge_plans")
    assert set(stored["method"]) == {"linear", "task_arithmetic", "ties"}  # run_all's plan stage ran (no peft_cat)
    assert set(stored["measured_from"]) <= {"sweep", "own adapter"}
    group = ",".join(sorted(TINY_TASKS))
    deleted = store.query_df(
        "SELECT task, merged_accuracy, single_accuracy, hyperparams FROM merge_results WHERE method = 'ties' AND k = 3"
    )
    assert len(deleted) == len(TINY_TASKS)
    with store.write() as con:
        ids = "SELECT merge_id FROM merges WHERE method = 'ties' AND k = 3"
        con.execute(f"DELETE FROM merge_evaluations WHERE merge_id IN ({ids})")
        con.execute(f"DELETE FROM merges WHERE merge_id IN ({ids})")
    stage = PlanStage(dataclasses.replace(tiny_config(tiny_study), db=db), store)
    counts = stage.run()
    assert counts["checked"] == 1 and counts["plans"] > 0  # the ties plans changed: their inputs did
    checks = store.query_df("SELECT * FROM plan_checks ORDER BY task")
    assert set(checks["group_tasks"]) == {group}
    by_task = deleted.set_index("task")
    for row in checks.itertuples():
        assert row.merged_accuracy == by_task.loc[row.task, "merged_accuracy"]  # the sweep's own merge, again
        assert row.single_accuracy == by_task.loc[row.task, "single_accuracy"]
    plans = store.query_df("SELECT * FROM merge_plans WHERE method = 'ties' AND group_tasks = ?", [group])
    assert len(plans) and set(plans["measured_from"]) == {"plan check"}
    for row in plans.itertuples():
        expected = by_task.loc[row.task, "merged_accuracy"] / by_task.loc[row.task, "single_accuracy"]
        assert row.measured == pytest.approx(expected)
    assert set(store.query_df("SELECT predictor FROM merge_plans WHERE method = 'ties'")["predictor"]) == {"additive"}
    before = store.query("SELECT count(*), max(created_at) FROM plan_rows")
    assert stage.run() == {"plans": 0, "skipped": counts["plans"] + counts["skipped"], "checked": 0, "not_planned": ""}
    assert store.query("SELECT count(*), max(created_at) FROM plan_rows") == before


def test_adapters_of_different_backbones_or_image_sizes_are_refused_in_one_line(tiny_study, capsys):
    """A committed adapter (48 px) beside one of the tiny study's (32 px): one line naming both, nothing merged."""
    tiny = next(Path(tiny_study["artifacts"]).rglob("adapter-seed0-*"))
    code, out, err = call_main(plan_main, [*committed_adapters("mnist", "fashion_mnist"), str(tiny)], capsys)
    assert code == 2 and "merge adapters of one backbone only" in err and "Traceback" not in err
    assert str(tiny) in err and "merges" not in out
