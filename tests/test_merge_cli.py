"""The merge CLI on hostile input: every refusal is one line with exit code 2, and nothing is written; and the export
of a merge a study stored (`--from-db`), checked against the stored per-image outcomes of the session's tiny study.

The inputs are copies of the committed adapters (artifacts/tf_efficientnet_lite0/<task>/adapter-seed0-*),
damaged in tmp_path where a case needs it; the originals are never passed to the CLI. Each refusal
also checks that the output folder was not created (or is unchanged) and that the input adapters'
files are byte-identical afterwards.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import call_main, committed_adapter, query_db
from peft import PeftModel
from safetensors.torch import load_file, save_file

import merging.export
from merging.card import format_accuracy
from merging.deltas import load_deltas
from merging.merge import main as merge_main
from merging.merged_model import merge_deltas
from mlvision.backbone import BackboneConfig, Preprocess, create_backbone
from mlvision.data import split_tensors
from mlvision.evaluation import FoldedBackbone, task_correct
from mlvision.models import load_head, read_meta
from mlvision.paths import REPO_ROOT
from mlvision.store import unpack_correct

TASKS = ["mnist", "fashion_mnist"]
LAYER = "base_model.model.blocks.1.0.conv_pwl"  # a layer every committed adapter factors (rank 8)


@pytest.fixture
def adapters(tmp_path) -> list[Path]:
    """Copies of two committed adapters, free to damage."""
    copies = []
    for task in TASKS:
        copy = tmp_path / "adapters" / task
        shutil.copytree(committed_adapter(task), copy)
        copies.append(copy)
    return copies


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file under the folders with its bytes: equal snapshots mean nothing was touched."""
    return {str(f): f.read_bytes() for folder in folders for f in sorted(folder.rglob("*")) if f.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temporary siblings an interrupted export could leave beside --out."""
    return [p.name for p in parent.iterdir() if p.name.endswith((".tmp", ".old"))] if parent.is_dir() else []


def refused(argv: list[str], capsys, *words: str) -> str:
    """Run the CLI; it must exit 2 with one line on stderr that contains every word."""
    capsys.readouterr()
    code = merge_main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def damage_factors(folder: Path, change) -> None:
    path = folder / "adapter_model.safetensors"
    factors = load_file(str(path))
    change(factors)
    save_file(factors, str(path), metadata={"format": "pt"})


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


# --- the output folder -------------------------------------------------------------------------------


def test_out_that_is_an_input_adapter_is_refused_and_the_adapter_is_untouched(adapters, capsys):
    before = snapshot(*adapters)
    refused([*adapters, "--out", adapters[0], "--rank", "4"], capsys, "is the input adapter", str(adapters[0]))
    refused([*adapters, "--out", adapters[0], "--rank", "4", "--overwrite"], capsys, "is the input adapter")
    assert snapshot(*adapters) == before


def test_out_inside_an_input_adapter_is_refused(adapters, capsys):
    before = snapshot(*adapters)
    refused([*adapters, "--out", adapters[1] / "merged", "--rank", "4"], capsys, "is inside the input adapter")
    assert snapshot(*adapters) == before and not (adapters[1] / "merged").exists()


def test_out_that_contains_an_input_adapter_is_refused_even_with_overwrite(adapters, capsys):
    parent = adapters[0].parent
    (parent / "merge.json").write_text("{}")  # looks like a previous merge, but holds the inputs
    before = snapshot(parent)
    refused([*adapters, "--out", parent, "--rank", "4", "--overwrite"], capsys, "contains the input adapter")
    assert snapshot(parent) == before


def test_out_that_is_a_file_is_refused(adapters, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    refused([*adapters, "--out", out, "--rank", "4"], capsys, "is a file", str(out))
    assert out.read_text() == "keep me"


def test_out_under_a_file_is_refused(adapters, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    refused([*adapters, "--out", blocker / "sub" / "merged", "--rank", "4"], capsys, "lies under the file", "notes.txt")
    assert blocker.read_text() == "keep me"


@pytest.fixture
def unwritable(tmp_path):
    """A folder nothing can be created in: read-only for a normal user; /proc for root, who writes anywhere else."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "probe").touch()
    except OSError:
        yield folder
    else:
        (folder / "probe").unlink()
        if not Path("/proc").is_dir():
            pytest.skip("running as root without /proc: no folder is unwritable")
        yield Path("/proc")
    finally:
        folder.chmod(0o700)


def test_unwritable_out_is_one_line_and_writes_nothing(adapters, unwritable, capsys):
    out = unwritable / "mlv-merge-test-out"
    before = snapshot(*adapters)
    refused([*adapters, "--out", out, "--rank", "4"], capsys, "cannot write output folder", str(out))
    assert not out.exists() and snapshot(*adapters) == before
    if unwritable.name == "read_only":
        assert list(unwritable.iterdir()) == []


def test_non_empty_folder_that_is_not_a_merge_is_never_replaced(adapters, tmp_path, capsys):
    """The hostile run's `DIR/heads is a file` left a half-written DIR; now DIR is refused as it is."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "heads").write_text("a file where the heads would go")
    before = snapshot(out)
    refused([*adapters, "--out", out, "--rank", "4"], capsys, "is not empty and is not a previous merge output")
    refused([*adapters, "--out", out, "--rank", "4", "--overwrite"], capsys, "not a previous merge output")
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_overwrite_never_replaces_an_adapter(adapters, tmp_path, capsys):
    other = tmp_path / "other_adapter"
    shutil.copytree(committed_adapter("uci_digits"), other)
    before = snapshot(other)
    refused([*adapters, "--out", other, "--rank", "4", "--overwrite"], capsys, "holds a trained model")
    assert snapshot(other) == before


@pytest.mark.slow
def test_reusing_a_merge_output_needs_overwrite_and_leaves_no_stale_heads(adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    assert merge_main([*map(str, adapters), "--out", str(out), "--rank", "4"]) == 0
    before = snapshot(out)
    refused([adapters[0], "--out", out, "--rank", "4"], capsys, "already holds a merge", "--overwrite")
    assert snapshot(out) == before
    assert merge_main([str(adapters[0]), "--out", str(out), "--rank", "4", "--overwrite"]) == 0
    assert json.loads((out / "merge.json").read_text())["tasks"] == [TASKS[0]]
    assert sorted(p.name for p in (out / "heads").iterdir()) == [TASKS[0]]  # the second task's head is gone
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_failure_while_writing_leaves_nothing_at_out(adapters, tmp_path, capsys, monkeypatch):
    """A crash half-way through the export (here: the second head) removes the temporary folder."""
    real_save_model, calls = merging.export.save_model, []

    def fail_on_second_head(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save_model(folder, *args, **kwargs)

    monkeypatch.setattr(merging.export, "save_model", fail_on_second_head)
    out = tmp_path / "new" / "merged"
    refused([*adapters, "--out", out, "--rank", "4"], capsys, "cannot write output folder", "No space left")
    assert not (tmp_path / "new").exists()  # neither the folder nor the parent made for it

    previous = tmp_path / "previous"
    monkeypatch.setattr(merging.export, "save_model", real_save_model)
    assert merge_main([*map(str, adapters), "--out", str(previous), "--rank", "4"]) == 0
    before = snapshot(previous)
    calls.clear()
    monkeypatch.setattr(merging.export, "save_model", fail_on_second_head)
    refused([*adapters, "--out", previous, "--rank", "4", "--overwrite"], capsys, "No space left")
    assert snapshot(previous) == before and leftovers(tmp_path) == []


# A real file system too small for the export at rank 4 (the LoRA ~370 KB, each head ~50 KB): 256 KiB fills up
# while the LoRA is written, 400 KiB while the first head is.
SMALL_DISKS = {"the LoRA": "256k", "a head": "400k"}


def merge_on_small_disk(adapters: list[Path], tmp_path: Path, size: str, capsys) -> tuple[int, str, Path, list[str]]:
    """The merge CLI with --out a new folder (under a new parent) on a real tmpfs of `size`: (exit code, stderr,
    --out, every path left on that file system afterwards).

    Mounted here where the tests may mount (root, as in CI), the CLI then running in this process; elsewhere the
    CLI runs as a process in its own user and mount namespace (`unshare --user --map-root-user --mount`), where
    anyone may mount a tmpfs. Where neither is allowed the test is skipped: the disk is never mocked.
    """
    disk, listing = tmp_path / "small_disk", tmp_path / "left_on_disk.txt"
    disk.mkdir()
    out = disk / "new" / "merged"
    argv = [*map(str, adapters), "--method", "ties", "--rank", "4", "--out", str(out)]
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]
    if shutil.which("mount") and subprocess.run(mount, capture_output=True).returncode == 0:
        try:
            code, _, err = call_main(merge_main, argv, capsys)
            left = sorted(str(path.relative_to(disk)) for path in disk.rglob("*"))
        finally:
            subprocess.run(["umount", "--lazy", str(disk)], check=True)
        return code, err, out, left
    script = (
        'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 97; disk=$2; listing=$3; shift 3; "$@"; code=$?; '
        'find "$disk" -mindepth 1 -printf "%P\\n" > "$listing"; exit $code'
    )
    unshare = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", size, disk, listing]
    command = [*map(str, unshare), sys.executable, "merging/merge.py", *argv]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if not listing.exists():
        pytest.skip(f"no small file system can be mounted here, as root or in a user namespace: {result.stderr}")
    return result.returncode, result.stderr, out, sorted(listing.read_text().split())


@pytest.mark.multiprocess
@pytest.mark.parametrize("fills_on", list(SMALL_DISKS))
def test_a_full_disk_is_one_line_and_leaves_nothing_on_it(adapters, tmp_path, capsys, fills_on):
    """A real ENOSPC, raised by safetensors as its own SafetensorError (not an OSError): one line, exit 2, and neither
    --out, its temporary sibling nor the parent made for it is left on the disk."""
    before = snapshot(*adapters)
    code, err, out, left = merge_on_small_disk(adapters, tmp_path, SMALL_DISKS[fills_on], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for words in ("cannot write output folder", str(out), "No space left on device", "free space"):
        assert words in lines[0], lines[0]
    assert left == [] and snapshot(*adapters) == before


# --- the hyperparameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, param, allowed",
    [
        pytest.param("ties", "density=" + "9" * 5000, "(0.0, 1.0]", id="past int()'s 4300-digit limit"),
        pytest.param("ties", "density=-" + "9" * 5000, "(0.0, 1.0]", id="negative, past the limit"),
        pytest.param("ties", "density=nan", "(0.0, 1.0]", id="nan"),
        pytest.param("ties", "density=inf", "(0.0, 1.0]", id="inf"),
        pytest.param("ties", "density=-inf", "(0.0, 1.0]", id="-inf"),
        pytest.param("ties", "density=1e999", "(0.0, 1.0]", id="a float literal that overflows to inf"),
        pytest.param("ties", "scaling=" + "9" * 400, "(0.0, 4.0]", id="an int past float's range"),
        pytest.param("dare_ties", "seed=" + "9" * 5000, "[0, 9223372036854775807]", id="an integer hyperparameter"),
    ],
)
def test_an_absurd_number_is_refused_by_the_range_check(adapters, tmp_path, capsys, method, param, allowed):
    """Whatever number --param writes, the method's range check refuses it in one line naming the allowed range."""
    name = param.split("=")[0]
    line = refused(
        [*adapters, "--method", method, "--param", param, "--out", tmp_path / "merged"], capsys, name, allowed
    )
    assert len(line) < 200 and not (tmp_path / "merged").exists()


# --- the rank ------------------------------------------------------------------------------------------


def test_rank_above_the_largest_layer_bound_is_refused(adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    refused([*adapters, "--out", out, "--rank", "100000"], capsys, "--rank 100000", "320", "--rank 320 or less")
    assert not out.exists()


def test_exported_rank_is_bounded_per_layer_and_loads_in_peft(adapters, tmp_path):
    """Rank 20 exceeds blocks.0.0.conv_pw's min(16, 32): that layer gets rank 16, and the export is still exact."""
    out = tmp_path / "merged"
    assert merge_main([*map(str, adapters), "--method", "linear", "--out", str(out), "--rank", "20"]) == 0
    factors = load_file(str(out / "adapter_model.safetensors"))
    for key, a in factors.items():
        if key.endswith("lora_A.weight"):
            b = factors[key.replace("lora_A", "lora_B")]
            assert a.shape[0] == b.shape[1] == min(20, a.shape[1], b.shape[0]), key
    assert factors["base_model.model.blocks.0.0.conv_pw.lora_A.weight"].shape[0] == 16
    loaded = [load_deltas(folder) for folder in adapters]
    config = BackboneConfig(**loaded[0].meta["backbone"])
    peft_model = PeftModel.from_pretrained(create_backbone(config), str(out)).eval()
    folded = FoldedBackbone(config).fold(merge_deltas(loaded, "linear"))  # two rank-8 updates: rank <= 16 < 20
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(peft_model(images), folded(images), atol=1e-4)


# --- the adapters --------------------------------------------------------------------------------------


def test_task_json_that_is_not_an_object_is_refused(adapters, tmp_path, capsys):
    (adapters[0] / "task.json").write_text("[]")
    before = snapshot(*adapters)
    refused([*adapters, "--out", tmp_path / "merged", "--rank", "4"], capsys, "task.json is not a JSON object")
    assert snapshot(*adapters) == before and not (tmp_path / "merged").exists()


def test_lora_factors_of_different_ranks_are_refused(adapters, tmp_path, capsys):
    def drop_a_column(factors):
        factors[f"{LAYER}.lora_B.weight"] = factors[f"{LAYER}.lora_B.weight"][:, :7].contiguous()

    damage_factors(adapters[1], drop_a_column)
    before = snapshot(*adapters)
    refused([*adapters, "--out", tmp_path / "merged", "--rank", "4"], capsys, "blocks.1.0.conv_pwl", "ranks differ")
    assert snapshot(*adapters) == before and not (tmp_path / "merged").exists()


def test_non_finite_factors_are_refused(adapters, tmp_path, capsys):
    def poison(factors):
        factors[f"{LAYER}.lora_A.weight"][0, 0] = float("nan")

    damage_factors(adapters[0], poison)
    before = snapshot(*adapters)
    refused([*adapters, "--out", tmp_path / "merged", "--rank", "4"], capsys, "blocks.1.0.conv_pwl", "NaN")
    assert snapshot(*adapters) == before and not (tmp_path / "merged").exists()


def test_config_rank_that_disagrees_with_the_factors_is_refused(adapters, tmp_path, capsys):
    edit_json(adapters[1] / "adapter_config.json", lambda config: {**config, "r": 4})
    before = snapshot(*adapters)
    refused(
        [*adapters, "--out", tmp_path / "merged", "--rank", "4"],
        capsys,
        "rank-8 factors",
        "adapter_config.json says r=4",
    )
    assert snapshot(*adapters) == before and not (tmp_path / "merged").exists()


def test_config_target_modules_that_miss_a_factored_layer_are_refused(adapters, tmp_path, capsys):
    edit_json(
        adapters[0] / "adapter_config.json", lambda config: {**config, "target_modules": ["conv_pw", "conv_head"]}
    )
    before = snapshot(*adapters)
    refused([*adapters, "--out", tmp_path / "merged", "--rank", "4"], capsys, "conv_pwl", "not in target_modules")
    assert snapshot(*adapters) == before and not (tmp_path / "merged").exists()


# --- the other arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", ["-5", "0"])
def test_evaluate_below_one_is_refused(adapters, tmp_path, capsys, n):
    refused([*adapters, "--out", tmp_path / "merged", "--rank", "4", "--evaluate", n], capsys, "--evaluate", n)
    assert not (tmp_path / "merged").exists()


def test_a_bad_argument_value_is_one_line(adapters, tmp_path, capsys):
    refused([*adapters, "--out", tmp_path / "merged", "--rank", "four"], capsys, "--rank", "'four' is not a rank")
    refused([*adapters, "--out", tmp_path / "merged", "--rank", "0"], capsys, "--rank must be at least 1")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_script_prints_one_line_and_exits_2(adapters):
    """Run as the README does: `python merging/merge.py ...`; no traceback, the adapter unchanged."""
    before = snapshot(*adapters)
    result = subprocess.run(
        [sys.executable, "merging/merge.py", *map(str, adapters), "--out", str(adapters[0]), "--rank", "4"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert "is the input adapter" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(*adapters) == before


# --- a valid merge -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_valid_merge_writes_a_complete_folder_and_overwrite_replaces_it(adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    before = snapshot(*adapters)
    assert merge_main([*map(str, adapters), "--method", "ties", "--out", str(out), "--rank", "4"]) == 0
    assert "relative reconstruction error" in capsys.readouterr().out
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    for task in TASKS:
        assert (out / "heads" / task / "head.safetensors").is_file()
        assert json.loads((out / "heads" / task / "task.json").read_text())["model_kind"] == "head"
    info = json.loads((out / "merge.json").read_text())
    assert info["tasks"] == TASKS and info["method"] == "ties" and info["export_rank"] == 4
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    args = [*map(str, adapters), "--method", "linear", "--out", str(out), "--rank", "4", "--overwrite"]
    assert merge_main(args) == 0
    assert json.loads((out / "merge.json").read_text())["method"] == "linear"
    assert sorted(p.name for p in (out / "heads").iterdir()) == sorted(TASKS)
    assert snapshot(*adapters) == before and leftovers(tmp_path) == []


# --- a stored merge (--from-db) --------------------------------------------------------------------------------


def stored_outcomes(db: Path, merge_id: str) -> dict:
    """{task: (per-image outcomes, n)} of a stored merge, as merge_results holds them."""
    rows = query_db(db, "SELECT task, merged_correct, n FROM merge_results WHERE merge_id = ?", [merge_id])
    return {task: (unpack_correct(packed, n), n) for task, packed, n in rows}


def exported_outcomes(out: Path, tasks: list[str], n: dict[str, int]) -> dict:
    """Which test images the exported folder gets right: its LoRA factors read back (ΔW = B A, scaling 1 as written),
    folded into the evaluation path with the heads under heads/, scored on each task's fixed test subset of n."""
    info = json.loads((out / "merge.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and set(config["alpha_pattern"]) == set(config["rank_pattern"])
    factors = load_file(str(out / "adapter_model.safetensors"))
    prefix = "base_model.model."
    deltas = {}
    for key, a in factors.items():
        if key.endswith(".lora_A.weight"):
            b = factors[key.replace("lora_A", "lora_B")]
            deltas[key[len(prefix) : -len(".lora_A.weight")]] = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    heads = {}
    for folder in (out / "heads").iterdir():
        meta = read_meta(folder)
        heads[meta["task"]] = load_head(folder, meta)
    preprocess = Preprocess.from_dict(info["preprocess"])
    data = {task: split_tensors(task, "test", preprocess, n[task]) for task in tasks}
    return task_correct(FoldedBackbone(BackboneConfig(**info["backbone"])).model(deltas, heads), data)


@pytest.mark.parametrize("method", ["ties", "peft_cat"])
def test_from_db_exports_the_merge_the_study_scored(tiny_study, tmp_path, capsys, method):
    """Issue 29.6: `--from-db DB --merge-id ID` rebuilds the stored merge (ties: scaling 0.7 chosen on validation,
    applied as the sweep does; peft_cat: peft's own merge) from its stored adapters and hyperparameters; the exported
    folder at full rank gets exactly the test images right that the stored merge got right."""
    db = tiny_study["db"]
    ((merge_id, hyperparams),) = query_db(
        db,
        "SELECT merge_id, hyperparams FROM merges WHERE method = ? AND k = 3",
        [method],
    )
    out = tmp_path / "merged"
    code, stdout, err = call_main(
        merge_main, ["--from-db", db, "--merge-id", merge_id, "--rank", "full", "--out", out], capsys
    )
    assert code == 0, err
    assert f"rebuilt stored merge {merge_id}" in stdout
    info = json.loads((out / "merge.json").read_text())
    assert info["method"] == method and info["hyperparams"] == json.loads(hyperparams)
    assert info["from_db"]["merge_id"] == merge_id and info["export_rank"] == 320 and info["relative_error"] < 1e-5
    stored = stored_outcomes(db, merge_id)
    outcomes = exported_outcomes(out, info["tasks"], {task: n for task, (_, n) in stored.items()})
    assert sorted(outcomes) == sorted(stored)
    for task, (correct, _) in stored.items():
        assert outcomes[task].tolist() == correct.tolist(), task
    text = (out / "README.md").read_text()
    assert f"This is merge `{merge_id}`" in text
    for task, merged, n in query_db(
        db, "SELECT task, merged_accuracy, n FROM merge_results WHERE merge_id = ?", [merge_id]
    ):
        assert f"| {format_accuracy(merged)} (n={n}, stored in results.duckdb) |" in text


def test_from_db_k_exports_the_findings_chosen_method(tiny_study, tmp_path, capsys):
    """`--from-db DB --k K`: the findings' chosen method for K (its one group here at k=3; at k=2 --tasks names one
    of three groups)."""
    db = tiny_study["db"]
    ((statistic,),) = query_db(
        db, "SELECT statistic FROM findings WHERE finding = 'chosen_method' AND statistic LIKE '%/k=3'"
    )
    method = statistic.rpartition("/k=")[0]
    ((merge_id,),) = query_db(db, "SELECT merge_id FROM merges WHERE method = ? AND k = 3", [method])
    out = tmp_path / "k3"
    code, _, err = call_main(merge_main, ["--from-db", db, "--k", "3", "--rank", "8", "--out", out], capsys)
    assert code == 0, err
    info = json.loads((out / "merge.json").read_text())
    assert info["method"] == method and info["from_db"]["merge_id"] == merge_id and info["export_rank"] == 8

    refused(["--from-db", db, "--k", "2", "--out", tmp_path / "k2"], capsys, "merges of 2 tasks", "--tasks")
    ((group,),) = query_db(db, "SELECT tasks FROM merges WHERE method = ? AND k = 2 ORDER BY tasks LIMIT 1", [method])
    out = tmp_path / "k2"
    argv = ["--from-db", db, "--k", "2", "--tasks", ",".join(reversed(group.split(","))), "--rank", "8", "--out", out]
    code, _, err = call_main(merge_main, argv, capsys)
    assert code == 0, err
    assert json.loads((out / "merge.json").read_text())["tasks"] == group.split(",")


def test_from_db_refusals_are_one_line(tiny_study, adapters, tmp_path, capsys):
    db = tiny_study["db"]
    out = tmp_path / "merged"
    refused(["--from-db", db, "--merge-id", "merge-nope", "--out", out], capsys, "stores no merge merge-nope")
    refused([*adapters, "--from-db", db, "--merge-id", "x", "--out", out], capsys, "drop adapter folders")
    refused(["--from-db", db, "--merge-id", "x", "--method", "ties", "--out", out], capsys, "drop --method")
    refused(["--merge-id", "x", "--out", out], capsys, "add --from-db")
    refused(["--from-db", db, "--out", out], capsys, "--merge-id ID or --k K")
    refused(["--from-db", tmp_path / "none.duckdb", "--k", "2", "--out", out], capsys, "no results database")
    refused(["--from-db", db, "--k", "9", "--out", out], capsys, "no chosen method for groups of 9 tasks")
    assert not out.exists()


# --- issue 29.7: conventions ----------------------------------------------------------------------------
def test_a_folder_of_adapter_folders_merges_every_adapter_in_it(adapters, tmp_path):
    """As the demo does: a folder holding adapter folders stands for each adapter in it (sorted)."""
    one, both = tmp_path / "one", tmp_path / "both"
    common = ["--method", "task_arithmetic", "--rank", "8"]
    assert merge_main([str(adapters[0].parent), *common, "--out", str(one)]) == 0
    assert merge_main([*(str(a) for a in sorted(adapters)), *common, "--out", str(both)]) == 0
    assert (one / "adapter_model.safetensors").read_bytes() == (both / "adapter_model.safetensors").read_bytes()
    assert sorted(json.loads((one / "merge.json").read_text())["tasks"]) == sorted(TASKS)


def test_labels_and_data_take_several_pairs_after_one_flag():
    from merging.merge import build_parser

    args = build_parser().parse_args(
        ["a/", "b/", "--labels", "a/=x.json", "b/=y.json", "--data", "a/=d1", "--data", "b/=d2"]
    )
    assert args.labels == ["a/=x.json", "b/=y.json"] and args.data == ["a/=d1", "b/=d2"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("flag", ["--help", "--list-methods"])
def test_help_and_the_method_list_import_no_torch(flag):
    """They answer before torch, peft and timm are imported (seconds each): the registry and the parser need none."""
    probe = (
        "import sys\n"
        "from merging.merge import main\n"
        f"try:\n    main([{flag!r}])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'peft', 'timm', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
    assert ("ties:" in result.stdout) == (flag == "--list-methods")


# --- compress then merge (--compress-first) -----------------------------------------------------------------------


@pytest.mark.slow
def test_compress_first_merges_at_the_rank_the_lora_holds_exactly(adapters, tmp_path, capsys):
    """TIES merged in the pair's rank-8 Core Space: the rank-8 export reconstructs it exactly, merge.json and the
    card say which pipeline made it; the usual export of a full TIES merge truncates (TIES is not low rank)."""
    out, plain = tmp_path / "compressed", tmp_path / "plain"
    fixed = ["--method", "ties", "--param", "density=0.2", "--rank", "8"]
    assert merge_main([*map(str, adapters), *fixed, "--compress-first", "--out", str(out)]) == 0
    info = json.loads((out / "merge.json").read_text())
    assert info["method"] == "ties@rank8" and info["pipeline"] == "compress-then-merge"
    assert info["relative_error"] < 1e-5
    assert "compress then merge: merged in the rank-r Core Space" in (out / "README.md").read_text()
    assert merge_main([*map(str, adapters), *fixed, "--out", str(plain)]) == 0
    info = json.loads((plain / "merge.json").read_text())
    assert info["method"] == "ties" and info["pipeline"] == "merge-then-compress" and info["relative_error"] > 0.05
    capsys.readouterr()
    refused([*adapters, "--out", tmp_path / "x", "--compress-first"], capsys, "--compress-first", "--rank N")
    refused([*adapters, "--out", tmp_path / "x", "--method", "adamerging", "--rank", "8", "--compress-first"], capsys,
            "adamerging", "drop --compress-first")  # fmt: skip
    assert not (tmp_path / "x").exists()
