"""The model card (README.md) of every exported merge, and merge.py --push, offline.

This project's adapters and their stored accuracies come from the session's tiny study (tests/conftest.py);
adapters trained elsewhere from test_foreign_adapters.py's zoo (a tiny random ViT and three peft LoRAs) and
test_foreign_timm.py's (a tiny timm ViT, two LoRAs, a local Hub cache). The card's figures are checked against SQL
on the tiny study's results.duckdb and against the written folder reloaded with plain peft; its metadata header is
read back with huggingface_hub's own parsers (`ModelCard`, `model_index_to_eval_results`, `validate_repo_id`: the
Hub's server-side validation needs a network); its loading snippet is run as written, in a fresh process, from
inside the export folder and from another folder. Pushing to the Hub is untested here (no network): only the
offline failure is, which must keep the folder and say how to push it later.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import call_main, query_db
from huggingface_hub import ModelCard, metadata_save
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id
from peft import PeftModel
from test_foreign_adapters import TASKS as FOREIGN_TASKS
from test_foreign_adapters import (
    cli_args,
    label_names,
    zoo,  # noqa: F401 (a module fixture, built once here)
)

from merging.card import FOREIGN_NOTE, NOT_MEASURED, format_accuracy
from merging.deltas import load_deltas
from merging.merge import main as merge_main
from merging.merged_model import merge_deltas
from mlvision.backbone import BackboneConfig, Preprocess, create_backbone
from mlvision.data import split_tensors
from mlvision.evaluation import FoldedBackbone, accuracy_of, task_correct
from mlvision.models import MultiTaskModel, load_head, read_meta
from mlvision.paths import REPO_ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def metadata(folder: Path) -> dict:
    """The card's YAML header, as the Hub reads it."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n"), text[:100]
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)])


def table(folder: Path) -> dict[str, list[str]]:
    """The task table: task -> [labels, merged (full), exported (rank r), single adapter, head baseline]."""
    text = (folder / "README.md").read_text()
    rows = {}
    for line in text[text.index("## Tasks and accuracy") :].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] != "task":
            rows[cells[0]] = cells[1:]
    return rows


def hub_metadata(folder: Path) -> dict:
    """The header read back by huggingface_hub's own card parser (what the Hub reads), checked the way it can be
    offline: a ModelCardData round trip equal to the YAML, repo ids that are valid, a model-index that parses into
    EvalResults."""
    card = ModelCard((folder / "README.md").read_text())
    header = metadata(folder)
    assert card.data.to_dict() == header
    if "base_model" in header:
        validate_repo_id(header["base_model"])
    for dataset in header.get("datasets", []):
        validate_repo_id(dataset)
    if "model-index" in header:
        name, results = model_index_to_eval_results(header["model-index"])
        assert name and results == card.data.eval_results
    return header


def snippet_code(folder: Path) -> str:
    text = (folder / "README.md").read_text()
    start = text.index("```python\n") + len("```python\n")
    return text[start : text.index("```", start)]


def backbone_passes(code: str) -> tuple[int, int]:
    """(calls of the model in the snippet, those inside a loop): one pass for every head is (1, 0)."""
    tree = ast.parse(code)
    names = {"model", "backbone"}

    def calls(node) -> int:
        return sum(
            isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in names for n in ast.walk(node)
        )

    in_loops = sum(calls(loop) for loop in ast.walk(tree) if isinstance(loop, (ast.For, ast.While)))
    return calls(tree), in_loops


def cell(accuracy: float, n: int, source: str) -> str:
    return f"{format_accuracy(accuracy)} (n={n}, {source})"


def start_snippet(folder: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """The card's python block run as written, in a fresh process with cwd = the folder (started, not awaited:
    the test goes on meanwhile, since a fresh interpreter spends seconds importing torch); `env` adds variables.
    With `cwd` (another folder) it runs from there, its `folder = Path(".")` line given the folder's path as the
    card says."""
    code = snippet_code(folder)
    if cwd is not None:
        line = 'folder = Path(".")  # this folder'
        assert line in code, code
        code = code.replace(line, f"folder = Path({str(folder)!r})")
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=cwd or folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, **(env or {})},
    )


def snippet_output(process: subprocess.Popen) -> dict[str, str]:
    """What the snippet printed, as {task: top label}; it must exit 0."""
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return dict(line.split(": ", 1) for line in stdout.strip().splitlines())


def adapter_folder(tiny_study, task: str, seed: int) -> Path:
    (folder,) = (tiny_study["artifacts"] / "tf_efficientnet_lite0" / task).glob(f"adapter-seed{seed}-*")
    return folder


def stored_merge(db: Path) -> tuple[str, list[str], int, dict]:
    """A stored task_arithmetic merge of two tasks: (merge_id, tasks, seed, hyperparams)."""
    merge_id, tasks, seed, hyperparams = query_db(
        db,
        "SELECT DISTINCT merge_id, tasks, seed, hyperparams FROM merge_results "
        "WHERE method = 'task_arithmetic' AND k = 2 ORDER BY merge_id LIMIT 1",
    )[0]
    return merge_id, tasks.split(","), seed, json.loads(hyperparams)


def exported_accuracies(out: Path, data: dict) -> dict[str, float]:
    """The written folder reloaded as the card's snippet loads it (plain peft on the backbone, the heads from heads/),
    eager, scored on `data` ({task: (images, labels)}): what the exported LoRA itself gets right."""
    info = json.loads((out / "merge.json").read_text())
    backbone = PeftModel.from_pretrained(create_backbone(BackboneConfig(**info["backbone"])), str(out)).eval()
    heads = {}
    for folder in (out / "heads").iterdir():
        meta = read_meta(folder)
        heads[meta["task"]] = load_head(folder, meta)
    correct = task_correct(MultiTaskModel(backbone, heads).eval(), data)
    return {task: accuracy_of(values) for task, values in correct.items()}


@pytest.mark.multiprocess
def test_own_merge_card_holds_the_stored_accuracies_and_its_snippet_runs(tiny_study, tmp_path, capsys):
    """Issue 29.5: Hub metadata that huggingface_hub reads back (no base_model for packaged weights, no
    pipeline_tag, eval results of the export), the exported rank-r LoRA's test accuracy beside the full merge's
    (the written folder reloaded with peft gets the same), and a snippet that runs from anywhere with one backbone
    pass for every head."""
    db = tiny_study["db"]
    merge_id, tasks, seed, hyperparams = stored_merge(db)
    adapters = [adapter_folder(tiny_study, task, seed) for task in tasks]
    params = [arg for key, value in hyperparams.items() for arg in ("--param", f"{key}={json.dumps(value)}")]
    out = tmp_path / "merged"
    argv = [*adapters, "--method", "task_arithmetic", *params, "--rank", "4", "--db", db, "--out", out]
    code, _, err = call_main(merge_main, argv, capsys)
    assert code == 0, err
    snippet = start_snippet(out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    snippet_elsewhere = start_snippet(out, cwd=elsewhere)
    assert backbone_passes(snippet_code(out)) == (1, 0)

    header = hub_metadata(out)
    (backbone,) = {row[0] for row in query_db(db, "SELECT backbone FROM task_results")}
    assert backbone == "tf_efficientnet_lite0" and "base_model" not in header  # packaged weights: no Hub id known
    assert "pipeline_tag" not in header and "license" not in header and "datasets" not in header
    assert header["library_name"] == "peft"
    assert {"task_arithmetic", "lora", "model-merging", "multi-task", "timm"} <= set(header["tags"])
    text = (out / "README.md").read_text()
    assert "no `base_model`" in text and "No license" in text and "No `pipeline_tag`" in text
    _, results = model_index_to_eval_results(header["model-index"])

    rows = table(out)
    assert list(rows) == tasks
    preprocess = Preprocess.from_dict(json.loads((adapters[0] / "task.json").read_text())["preprocess"])
    for task, folder in zip(tasks, adapters):
        meta = json.loads((folder / "task.json").read_text())
        ((single, n_single),) = query_db(
            db, "SELECT accuracy, n_test FROM task_results WHERE model_id = ?", [meta["config_hash"]]
        )
        ((head, n_head),) = query_db(
            db,
            "SELECT accuracy, n_test FROM task_results WHERE model_kind = 'head' AND task = ? AND seed = ?",
            [task, seed],
        )
        ((merged, n_merged),) = query_db(
            db, "SELECT merged_accuracy, n FROM merge_results WHERE merge_id = ? AND task = ?", [merge_id, task]
        )
        exported = exported_accuracies(out, {task: split_tensors(task, "test", preprocess, n_merged)})[task]
        source = "stored in results.duckdb"
        assert rows[task] == [
            str(len(meta["label_names"])),
            cell(merged, n_merged, source),
            cell(exported, n_merged, "measured now on the same images"),
            cell(single, n_single, source),
            cell(head, n_head, source),
        ]
        (result,) = [r for r in results if r.dataset_name == task]
        assert (result.metric_type, result.dataset_split) == ("accuracy", "test")
        assert result.metric_value == round(exported, 4) and "rank-4" in result.metric_name
    choice = json.loads((out / "merge.json").read_text())["rank_choice"]
    assert choice["requested"] == 4 and [step["rank"] for step in choice["ladder"]] == [4]
    assert "given with `--rank 4 as given`" in text and "| full merge | 0 |" in text

    # another scaling: no stored merge matches, so merged is "not measured" unless --evaluate measures it now
    other = {**hyperparams, "scaling": hyperparams["scaling"] + 0.2}
    params = [arg for key, value in other.items() for arg in ("--param", f"{key}={json.dumps(value)}")]
    base = [*adapters, "--method", "task_arithmetic", *params, "--rank", "4", "--db", db]
    code, _, err = call_main(merge_main, [*base, "--out", tmp_path / "other"], capsys)
    assert code == 0, err
    assert [row[1:3] for row in table(tmp_path / "other").values()] == [[NOT_MEASURED] * 2] * len(tasks)
    assert [row[3:] for row in table(tmp_path / "other").values()] == [row[3:] for row in rows.values()]
    assert "model-index" not in hub_metadata(tmp_path / "other")  # nothing measured, nothing claimed

    code, stdout, err = call_main(merge_main, [*base, "--evaluate", "8", "--out", tmp_path / "evaluated"], capsys)
    assert code == 0, err
    evaluated = table(tmp_path / "evaluated")
    for task in tasks:
        line = next(line for line in stdout.splitlines() if line.strip().startswith(f"{task}: merged accuracy"))
        value = line.split("merged accuracy ")[1].split()[0]
        assert evaluated[task][1] == f"{value} (n=8, measured now)", (evaluated[task], line)
        exported = exported_accuracies(tmp_path / "evaluated", {task: split_tensors(task, "test", preprocess, 8)})
        assert evaluated[task][2] == cell(exported[task], 8, "measured now on the same images")

    for process in (snippet, snippet_elsewhere):
        printed = snippet_output(process)
        assert sorted(printed) == sorted(tasks)
        for task, folder in zip(tasks, adapters):
            assert printed[task] in json.loads((folder / "task.json").read_text())["label_names"], printed


def test_rank_auto_is_the_smallest_rank_whose_export_keeps_every_validation_accuracy(tiny_study, tmp_path, capsys):
    """Issue 29.5: the default `--rank auto` walks 4, 8, 16, ... and keeps the first rank whose exported LoRA's
    validation accuracy moves by at most 0.5 points on every task; the figures it records are those of the full
    merge (scored here independently) and of the written folder (reloaded with peft)."""
    db = tiny_study["db"]
    merge_id, tasks, seed, hyperparams = stored_merge(db)
    adapters = [adapter_folder(tiny_study, task, seed) for task in tasks]
    params = [arg for key, value in hyperparams.items() for arg in ("--param", f"{key}={json.dumps(value)}")]
    out = tmp_path / "merged"
    code, stdout, err = call_main(merge_main, [*adapters, "--method", "task_arithmetic", *params, "--out", out], capsys)
    assert code == 0, err
    info = json.loads((out / "merge.json").read_text())
    choice = info["rank_choice"]
    ladder = choice["ladder"]
    assert choice["requested"] == "auto" and info["export_rank"] == choice["chosen"] == ladder[-1]["rank"]
    assert [step["rank"] for step in ladder] == [4, 8, 16, 32, 64, 128, 256, 320][: len(ladder)]
    assert all(step["max_change"] > 0.005 for step in ladder[:-1]) and ladder[-1]["max_change"] <= 0.005
    assert f"rank {info['export_rank']} chosen by --rank auto" in stdout

    loaded = [load_deltas(folder) for folder in adapters]
    preprocess = Preprocess.from_dict(loaded[0].meta["preprocess"])
    validation = {task: split_tensors(task, "validation", preprocess, 500) for task in tasks}
    assert choice["validation_n"] == max(len(labels) for _, labels in validation.values())
    folded = FoldedBackbone(BackboneConfig(**loaded[0].meta["backbone"]))
    merged = merge_deltas(loaded, "task_arithmetic", hyperparams)
    full = task_correct(folded.model(merged, {a.task: a.head for a in loaded}), validation)
    exported = exported_accuracies(out, validation)
    for task in tasks:
        assert choice["full_accuracy"][task] == pytest.approx(accuracy_of(full[task]), abs=1e-6)
        assert ladder[-1]["accuracy"][task] == pytest.approx(exported[task], abs=1e-6)
        assert abs(exported[task] - accuracy_of(full[task])) <= 0.005 + 1e-6
    text = (out / "README.md").read_text()
    assert f"Rank {info['export_rank']}, chosen by `--rank auto`" in text


def test_without_a_results_database_every_accuracy_is_not_measured(tiny_study, tmp_path, capsys):
    _, tasks, seed, _ = stored_merge(tiny_study["db"])
    adapters = [adapter_folder(tiny_study, task, seed) for task in tasks]
    missing = tmp_path / "no_such.duckdb"
    out = tmp_path / "merged"
    code, _, err = call_main(merge_main, [*adapters, "--rank", "4", "--db", missing, "--out", out], capsys)
    assert code == 0, err
    assert not missing.exists()  # read-only: a missing database is not created
    assert [cells[1:] for cells in table(out).values()] == [[NOT_MEASURED] * 4] * len(tasks)
    assert metadata(out)["tags"][3] == "ties"  # the default method


@pytest.mark.slow
@pytest.mark.multiprocess
def test_foreign_merge_card_says_nothing_was_measured_and_its_snippet_runs(zoo, tmp_path, capsys):  # noqa: F811
    """Without --data nothing is measured: no eval results, a rank whose accuracy is said to be unmeasured (32 by
    default), a local base named in the text and not as `base_model`; the snippet makes one backbone pass."""
    out = tmp_path / "merged"
    code, _, err = call_main(
        merge_main, [*cli_args(zoo, *FOREIGN_TASKS), "--method", "ties", "--rank", "8", "--out", out], capsys
    )
    assert code == 0, err
    snippet = start_snippet(out)
    assert backbone_passes(snippet_code(out)) == (1, 0)
    header = hub_metadata(out)
    assert "base_model" not in header and "model-index" not in header and "pipeline_tag" not in header
    assert {"ties", "transformers"} <= set(header["tags"])
    text = (out / "README.md").read_text()
    assert f"the local folder `{zoo['base']}`" in text and "Its accuracy was not measured" in text
    rows = table(out)
    assert list(rows) == list(FOREIGN_TASKS)
    for task, (classes, _, _) in FOREIGN_TASKS.items():
        assert rows[task] == [str(classes), *[FOREIGN_NOTE] * 4]
    printed = snippet_output(snippet)
    assert sorted(printed) == sorted(FOREIGN_TASKS)
    for task in FOREIGN_TASKS:
        assert printed[task] in label_names(task), printed

    code, _, err = call_main(merge_main, [*cli_args(zoo, *FOREIGN_TASKS), "--out", tmp_path / "auto"], capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "auto" / "merge.json").read_text())
    assert info["export_rank"] == 32 and "--data" in info["rank_choice"]["not_measured"]


def test_the_license_is_the_adapters_own_when_their_cards_agree(zoo, tmp_path, capsys):  # noqa: F811
    """license comes from the merged adapters' own model cards (their README.md metadata), and only when every one
    names the same; otherwise the header names none and the text says which said what."""
    folders = {}
    for task in ("shapes", "colors"):
        folders[task] = tmp_path / task
        shutil.copytree(zoo["adapters"][task], folders[task])
        metadata_save(folders[task] / "README.md", {"license": "apache-2.0", "library_name": "peft"})
    out = tmp_path / "merged"
    assert call_main(merge_main, [*folders.values(), "--rank", "8", "--out", out], capsys)[0] == 0
    assert hub_metadata(out)["license"] == "apache-2.0"
    metadata_save(folders["colors"] / "README.md", {"license": "mit", "library_name": "peft"})
    out = tmp_path / "mixed"
    assert call_main(merge_main, [*folders.values(), "--rank", "8", "--out", out], capsys)[0] == 0
    assert "license" not in hub_metadata(out)
    assert "shapes: apache-2.0, colors: mit" in (out / "README.md").read_text()


@pytest.mark.multiprocess
def test_push_offline_fails_in_one_line_and_keeps_the_folder(tiny_study, tmp_path):
    """A real process with HF_HUB_OFFLINE=1: the export is complete, the push fails, exit 2, one line."""
    _, tasks, seed, _ = stored_merge(tiny_study["db"])
    adapters = [str(adapter_folder(tiny_study, task, seed)) for task in tasks]
    out = tmp_path / "merged"
    repo = "someone/merged-adapters"
    command = [sys.executable, "merging/merge.py", *adapters, "--rank", "4", "--db", str(tmp_path / "none.duckdb")]
    result = subprocess.run(
        [*command, "--out", str(out), "--push", repo],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot push"), result.stderr
    for word in (repo, str(out), "offline", f"hf upload {repo} {out}"):
        assert word in lines[0], lines[0]
    assert f"saved to {out}" in result.stdout
    files = {"README.md", "merge.json", "adapter_config.json", "adapter_model.safetensors"}
    assert files <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in (out / "heads").iterdir()) == sorted(tasks)


def test_a_bad_repo_id_is_refused_before_merging(tiny_study, tmp_path, capsys):
    _, tasks, seed, _ = stored_merge(tiny_study["db"])
    adapters = [adapter_folder(tiny_study, task, seed) for task in tasks]
    out = tmp_path / "merged"
    code, _, err = call_main(merge_main, [*adapters, "--out", out, "--push", "not a repo!"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--push not a repo!" in err, err
    assert not out.exists()
