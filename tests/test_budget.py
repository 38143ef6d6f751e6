"""The plan a run announces (study/budget.py): what is left to do, counted against the store, and its estimate."""

from __future__ import annotations

import re
from dataclasses import replace

import duckdb
from conftest import TINY_ARGS, TINY_METHODS, TINY_TASKS, call_main, tiny_config

from merging.methods import get_method
from merging.sweep import sweep_plan
from mlvision.config import PROFILES, config_from_args
from mlvision.store import Store
from study.budget import UnitCosts, Work, estimate_seconds, remaining_work, split_size
from study.run_all import build_parser
from study.run_all import main as run_all_main


def _counts(out: str) -> tuple[int, int, int]:
    match = re.search(r"plan: (\d+) head baselines and (\d+) adapters to train, (\d+) merges to score", out)
    assert match, out
    return tuple(int(group) for group in match.groups())


def test_plan_of_an_empty_database_counts_every_unit_estimates_and_creates_nothing(tmp_path, capsys):
    db = tmp_path / "new.duckdb"
    code, out, err = call_main(run_all_main, [*TINY_ARGS, "--db", db, "--plan"], capsys)
    assert code == 0, err
    assert _counts(out) == (len(TINY_TASKS), len(TINY_TASKS), len(sweep_plan(_config(db))))
    minutes = re.search(r"about (\d+) (s|min|h) in all", out)
    assert minutes and "Ctrl-C stops the run, and the same command continues" in out, out
    assert not db.exists() and not (tmp_path / "new.artifacts").exists()  # --plan runs and writes nothing


def _config(db):
    args = build_parser().parse_args([str(a) for a in [*TINY_ARGS, "--db", db]])
    return config_from_args(args, tuple(TINY_METHODS))


def test_plan_of_a_finished_study_skips_what_is_stored(tiny_study, capsys):
    """The tiny study is stored whole: its plan is empty; one more method leaves exactly that method's merges."""
    runs_before = duckdb.connect(str(tiny_study["db"]), read_only=True).execute("SELECT count(*) FROM runs").fetchone()
    code, out, err = call_main(run_all_main, [*tiny_study["args"], "--plan"], capsys)
    assert code == 0, err
    assert "plan: nothing left to do" in out
    config = tiny_config(tiny_study)
    work = remaining_work(config, Store(tiny_study["db"]), ["train", "merge"])
    assert work.empty
    wider = replace(config, merge_methods=(*config.merge_methods, "dare_linear"))
    work = remaining_work(wider, Store(tiny_study["db"]), ["train", "merge"])
    assert not work.heads and not work.adapters
    assert sorted(work.merges) == sorted(item for item in sweep_plan(wider) if item[2] == "dare_linear")
    runs_after = duckdb.connect(str(tiny_study["db"]), read_only=True).execute("SELECT count(*) FROM runs").fetchone()
    assert runs_after == runs_before  # --plan recorded no run


def test_estimate_is_the_counted_units_times_their_costs():
    """Each term by hand: a step cost alone counts the adapters' steps and AdaMerging's learning; an image cost
    alone counts the scored images (grid x validation + test per task, features, Gram images)."""
    config = PROFILES["default"].with_methods(("task_arithmetic",))
    task = config.tasks[0]
    work = Work(heads=[], adapters=[(task, 0), (task, 1)], merges=[])
    assert estimate_seconds(config, work, UnitCosts(step_s=1.0, image_s=0.0, device="cpu")) == {
        "train": 2 * config.steps,
        "merge": 0.0,
    }
    group = tuple(config.tasks[:2])
    points = len(get_method("task_arithmetic").grid_points(len(group)))
    per_task = [
        points * min(config.merge_select, split_size(t, "validation")) + min(config.merge_eval, split_size(t, "test"))
        for t in group
    ]
    work = Work(heads=[], adapters=[], merges=[(group, 0, "task_arithmetic")])
    assert estimate_seconds(config, work, UnitCosts(step_s=0.0, image_s=1.0, device="cpu"))["merge"] == sum(per_task)
    adamerging = get_method("adamerging")
    work = Work(heads=[], adapters=[], merges=[(group, 0, "adamerging")])
    defaults = adamerging.defaults
    learned = len(adamerging.grid_points(len(group))) * defaults["steps"] * defaults["batch_size"] * 2
    assert estimate_seconds(config, work, UnitCosts(step_s=1.0, image_s=0.0, device="cpu"))["merge"] == (
        learned / config.batch_size
    )
