"""The study's and the benchmarks' configuration, declared once per field (mlvision/options.py): the options built
from the declarations, the checks of impossible values, config files, and the identities the committed results
hold. All in this process, without training anything."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest
from conftest import TINY_ARGS, call_main, query_db

from benchmarks.options import BenchConfig, bench_config_from_args
from merging.methods import list_methods
from mlvision.config import PROFILES, StudyConfig, config_from_args, profile_name
from mlvision.errors import MLVisionError, UnknownNameError
from mlvision.options import flag
from mlvision.paths import REPO_ROOT
from mlvision.runs import study_run_id
from study.run_all import build_parser, main

REGISTERED = tuple(list_methods())
DEFAULT = PROFILES["default"].with_methods(REGISTERED)  # every registered method, nine of them on the subset


def help_of(*argv) -> str:
    """run_all's help as `--help ARGV` shows it, its lines joined (argparse wraps them)."""
    return " ".join(build_parser([str(a) for a in argv]).format_help().split())


def parse(*argv) -> StudyConfig:
    return config_from_args(build_parser().parse_args([str(a) for a in argv]), REGISTERED)


# -- one declaration per field ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [StudyConfig, BenchConfig])
def test_every_field_has_help(cls):
    assert [f.name for f in fields(cls) if not f.metadata.get("help")] == []


def test_help_lists_every_field_s_option_with_the_chosen_profile_s_default(capsys):
    code, out, _ = call_main(main, ["--help"], capsys)
    assert code == 0
    for cls in (StudyConfig, BenchConfig):
        missing = [flag(f) for f in fields(cls) if f.metadata.get("cli", True) and flag(f) not in out]
        assert missing == []
    assert "--bench-sections" in out and "--again" in out and "--config" in out and "--stages" in out
    assert f"adapter training steps (default: {DEFAULT.steps})" in " ".join(out.split())
    quick = help_of("--config", "quick")
    assert (
        f"adapter training steps (default: {PROFILES['quick'].steps})" in quick and "runs/quick/results.duckdb" in quick
    )
    assert "(default: every registered method)" in help_of("--config", "paper")


def test_fields_added_later_are_left_out_of_the_identity_at_their_old_value():
    """The list `identity()` used to keep by hand, now each field's `identity_default`."""
    added_later = {
        f.name: f.metadata["identity_default"] for f in fields(StudyConfig) if "identity_default" in f.metadata
    }
    assert set(added_later) == {
        "task_domains", "mixed_precision", "grad_accum", "channels_last", "given_adapters", "backbone_base",
        "min_test_images", "min_merge_eval_images", "max_adapter_accuracy", "max_head_accuracy", "subset_methods",
    }  # fmt: skip
    old = replace(DEFAULT, channels_last=False, subset_methods=())  # each at the value its old identity had
    assert not set(added_later) & set(old.identity())
    assert replace(DEFAULT, grad_accum=2).identity()["grad_accum"] == 2


def test_subset_methods_default_to_the_profile_s_and_may_be_given_empty():
    """The default sweeps every registered method, eleven of them on the subset; `--subset-methods` alone, or methods
    named with `--merge-methods`, sweep every method in full, and names replace the profile's list."""
    assert DEFAULT.merge_methods == REGISTERED and set(DEFAULT.subset_methods) < set(REGISTERED)
    assert parse().subset_methods == DEFAULT.subset_methods and len(DEFAULT.subset_methods) == 13
    assert parse("--subset-methods").subset_methods == ()
    assert parse("--subset-methods", "ties").subset_methods == ("ties",)
    assert parse("--merge-methods", "linear", "ties").subset_methods == ()  # the methods a user names: in full
    assert parse("--merge-methods", "linear", "ties", "--subset-methods", "linear").subset_methods == ("linear",)
    assert "subset_methods" not in replace(DEFAULT, subset_methods=()).identity()  # runs before it keep their ids


def test_the_committed_study_keeps_its_run_id():
    committed = {row[0] for row in query_db(REPO_ROOT / "results.duckdb", "SELECT run_id FROM runs")}
    assert study_run_id(DEFAULT) in committed
    assert study_run_id(parse()) == study_run_id(DEFAULT)


# -- impossible values -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        ({"rank": 0}, "--rank must be >= 1, got 0"),
        ({"alpha": 0.0}, "--alpha must be > 0"),
        ({"steps": 0}, "--steps must be >= 1"),
        ({"batch_size": -1}, "--batch-size must be >= 1"),
        ({"image_size": 0}, "--image-size must be >= 1"),
        ({"head_epochs": 0}, "--head-epochs must be >= 1"),
        ({"max_k": 0}, "--max-k must be >= 1"),
        ({"seeds": ()}, "--seeds needs at least one value"),
        ({"seeds": (0, -1)}, "--seeds must be >= 0, got -1"),
        ({"tasks": ()}, "--tasks needs at least one value"),
        ({"max_train": 0}, "--max-train must be >= 1, got 0 (a split's subset needs one image at least"),
        ({"max_validation": 0}, "--max-validation must be >= 1"),
        ({"max_test": 0}, "--max-test must be >= 1"),
        ({"merge_eval": 0}, "--merge-eval must be >= 1"),
        ({"merge_select": 0}, "--merge-select must be >= 1"),
        ({"max_groups_per_k": 0}, "--max-groups-per-k must be >= 1"),
        ({"grad_accum": 0}, "--grad-accum must be >= 1"),
        ({"max_head_accuracy": 97.0}, "--max-head-accuracy must be between 0 and 1, got 97.0"),
    ],
)
def test_impossible_values_are_refused_in_one_line(change, message):
    with pytest.raises(MLVisionError) as refused:
        replace(DEFAULT, **change)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_small_configs_in_use_pass_the_checks():
    """quick, tiny-vit and the tests' tiny study run on small values: none of them may be refused."""
    # each profile is built (and checked) at import
    assert set(PROFILES) == {"default", "quick", "wide", "wide-cpu", "paper", "tiny-vit"}
    tiny = parse(*TINY_ARGS)
    assert (tiny.steps, tiny.max_train, tiny.merge_select) == (8, 128, 16)
    assert replace(tiny, max_train=1, max_validation=1, max_test=1, merge_eval=1, merge_select=1, max_k=1).max_k == 1
    assert replace(tiny, max_train=None, max_test=None, merge_eval=None).max_train is None  # None: all of the split


def test_rank_0_fails_in_one_line_before_any_work(tmp_path, capsys):
    db = tmp_path / "x.duckdb"
    code, _, err = call_main(main, ["--rank", "0", "--db", db], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == "error: --rank must be >= 1, got 0"
    assert not db.exists()  # nothing opened, nothing trained


def test_unknown_profile_is_refused_in_one_line(capsys):
    code, _, err = call_main(main, ["--config", "papr"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown profile 'papr'" in err and "tiny-vit" in err


def test_bench_options_map_to_their_fields_and_are_checked():
    args = build_parser().parse_args(["--bench-sections", "merge", "--bench-max-k", "2", "--max-k", "3", "--again"])
    bench = bench_config_from_args(args)
    assert (bench.sections, bench.max_k, bench.again) == (("merge",), 2, True)
    assert config_from_args(args, ("ties",)).max_k == 3  # the study's max_k is another option
    assert bench_config_from_args(build_parser().parse_args([])) == BenchConfig()
    with pytest.raises(MLVisionError, match="--bench-train-steps must be >= 1"):
        BenchConfig(train_steps=0)
    assert BenchConfig(warmup=0).warmup == 0  # no warm-up is allowed (the tests time without one)


def test_a_quick_run_measures_a_quick_bench_and_options_given_still_win(capsys):
    """The quick profile's bench leaves out the training section (fresh processes) and repeats less; --help shows it,
    and an option given on the command line still wins over the profile's."""
    quick = build_parser(["--quick"]).parse_args(["--quick"])
    bench = bench_config_from_args(quick, profile_name(quick))
    assert "training" not in bench.sections and bench.repeats < BenchConfig().repeats
    given = build_parser().parse_args(["--quick", "--bench-sections", "training", "--bench-repeats", "7"])
    chosen = bench_config_from_args(given, profile_name(given))
    assert (chosen.sections, chosen.repeats, chosen.warmup) == (("training",), 7, bench.warmup)
    default = build_parser().parse_args([])
    assert bench_config_from_args(default, profile_name(default)) == BenchConfig()
    assert "(default: inference evaluation merge)" in " ".join(build_parser(["--quick"]).format_help().split())
    from benchmarks.cli import main as bench_main  # the bench command's --help says the same

    code, out, _ = call_main(bench_main, ["--quick", "--help"], capsys)
    assert code == 0 and "(default: inference evaluation merge)" in " ".join(out.split())


# -- config files ------------------------------------------------------------------------------------------
def test_a_json_file_sets_fields_on_the_default_profile(tmp_path):
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"max_train": 500, "seeds": [0, 1], "lr": 0.001, "db": str(tmp_path / "mine.duckdb")}))
    config = parse("--config", path)
    assert (config.max_train, config.seeds, config.lr) == (500, (0, 1), 0.001)
    assert config.rank == DEFAULT.rank and config.merge_methods == DEFAULT.merge_methods
    assert config.artifacts == tmp_path / "mine.artifacts"  # a file's db keeps its models beside it, as --db does
    assert parse("--config", path, "--max-train", "300").max_train == 300  # options still override


def test_a_yaml_file_sets_fields_on_the_profile_it_names(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        "profile: quick\n"
        "steps: 30\n"
        "lr: 3e-3  # YAML reads this as text; it is still a float\n"
        "target_modules: [conv_pw, conv_head]\n"
        "task_domains: {'hub:a/b': digits}\n"
        "max_test: null\n"
    )
    args = build_parser().parse_args(["--config", str(path)])
    config = config_from_args(args, ("ties",))
    assert profile_name(args) == "quick"
    assert (config.steps, config.lr, config.image_size) == (30, 0.003, PROFILES["quick"].image_size)
    assert config.target_modules == ("conv_pw", "conv_head") and config.task_domains == (("hub:a/b", "digits"),)
    assert config.max_test is None and config.db == PROFILES["quick"].db
    assert "adapter training steps (default: 30)" in help_of("--config", path)  # the help shows the file's


@pytest.mark.parametrize(
    "text, message",
    [
        ("rnak: 4\n", "unknown key 'rnak'; valid keys: profile, tasks, seeds"),
        ("profile: papr\n", "profile: unknown profile 'papr'"),
        ("rank: 0\n", "--rank must be >= 1, got 0"),
        ("rank: four\n", "rank: expected int, got 'four'"),
        ("mixed_precision: fp16\n", "mixed_precision: 'fp16' is not one of no, bf16"),
        ("- rank\n", "expected a mapping"),
        ("rank: [1\n", "cannot read it"),
    ],
)
def test_a_bad_file_is_refused_in_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    code, _, err = call_main(main, ["--config", path, "--db", tmp_path / "x.duckdb"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert message in err
    assert not (tmp_path / "x.duckdb").exists()


def test_an_unknown_key_names_every_valid_field(tmp_path):
    path = tmp_path / "unknown.json"
    path.write_text(json.dumps({"x": 1}))
    with pytest.raises(UnknownNameError) as refused:
        parse("--config", path)
    assert all(f.name in str(refused.value) for f in fields(StudyConfig))
