"""The model card (README.md) of every exported merge, and merge.py --push, offline.

This project's adapters and their stored accuracies come from the session's tiny study (tests/conftest.py);
adapters trained elsewhere from test_foreign_adapters.py's zoo (a tiny random ViT and three peft LoRAs). The
card's figures are checked against SQL on the tiny study's results.duckdb, and its loading snippet is run as
written, in a fresh process inside the export folder. Pushing to the Hub is untested here (no network): only
the offline failure is, which must keep the folder and say how to push it later.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import call_main, query_db
from test_foreign_adapters import TASKS as FOREIGN_TASKS
from test_foreign_adapters import (
    cli_args,
    label_names,
    zoo,  # noqa: F401 (a module fixture, built once here)
)

from merging.card import FOREIGN_NOTE, NOT_MEASURED, format_accuracy
from merging.merge import main as merge_main
from mlvision.paths import REPO_ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def metadata(folder: Path) -> dict:
    """The card's YAML header, as the Hub reads it."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n"), text[:100]
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)])


def table(folder: Path) -> dict[str, list[str]]:
    """The task table: task -> [labels, merged, single adapter, head baseline]."""
    rows = {}
    for line in (folder / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] != "task":
            rows[cells[0]] = cells[1:]
    return rows


def cell(accuracy: float, n: int, source: str) -> str:
    return f"{format_accuracy(accuracy)} (n={n}, {source})"


def start_snippet(folder: Path, env: dict | None = None) -> subprocess.Popen:
    """The card's python block run as written, in a fresh process with cwd = the folder (started, not awaited:
    the test goes on meanwhile, since a fresh interpreter spends seconds importing torch); `env` adds variables."""
    text = (folder / "README.md").read_text()
    start = text.index("```python\n") + len("```python\n")
    code = text[start : text.index("```", start)]
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=folder,
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


def test_own_merge_card_holds_the_stored_accuracies_and_its_snippet_runs(tiny_study, tmp_path, capsys):
    db = tiny_study["db"]
    merge_id, tasks, seed, hyperparams = stored_merge(db)
    adapters = [adapter_folder(tiny_study, task, seed) for task in tasks]
    params = [arg for key, value in hyperparams.items() for arg in ("--param", f"{key}={json.dumps(value)}")]
    out = tmp_path / "merged"
    argv = [*adapters, "--method", "task_arithmetic", *params, "--rank", "4", "--db", db, "--out", out]
    code, _, err = call_main(merge_main, argv, capsys)
    assert code == 0, err
    snippet = start_snippet(out)

    header = metadata(out)
    (backbone,) = {row[0] for row in query_db(db, "SELECT backbone FROM task_results")}
    assert header["base_model"] == backbone == "tf_efficientnet_lite0"
    assert header["library_name"] == "peft" and header["pipeline_tag"] == "image-classification"
    assert {"task_arithmetic", "lora", "model-merging", "multi-task"} <= set(header["tags"])

    rows = table(out)
    assert list(rows) == tasks
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
        source = "stored in results.duckdb"
        assert rows[task] == [
            str(len(meta["label_names"])),
            cell(merged, n_merged, source),
            cell(single, n_single, source),
            cell(head, n_head, source),
        ]

    # another scaling: no stored merge matches, so merged is "not measured" unless --evaluate measures it now
    other = {**hyperparams, "scaling": hyperparams["scaling"] + 0.2}
    params = [arg for key, value in other.items() for arg in ("--param", f"{key}={json.dumps(value)}")]
    base = [*adapters, "--method", "task_arithmetic", *params, "--rank", "4", "--db", db]
    code, _, err = call_main(merge_main, [*base, "--out", tmp_path / "other"], capsys)
    assert code == 0, err
    assert [row[1] for row in table(tmp_path / "other").values()] == [NOT_MEASURED] * len(tasks)
    assert [row[2:] for row in table(tmp_path / "other").values()] == [row[2:] for row in rows.values()]

    code, stdout, err = call_main(merge_main, [*base, "--evaluate", "8", "--out", tmp_path / "evaluated"], capsys)
    assert code == 0, err
    evaluated = table(tmp_path / "evaluated")
    for task in tasks:
        line = next(line for line in stdout.splitlines() if line.strip().startswith(f"{task}: merged accuracy"))
        value = line.split("merged accuracy ")[1].split()[0]
        assert evaluated[task][1] == f"{value} (n=8, measured now)", (evaluated[task], line)

    printed = snippet_output(snippet)
    assert sorted(printed) == sorted(tasks)
    for task, folder in zip(tasks, adapters):
        assert printed[task] in json.loads((folder / "task.json").read_text())["label_names"], printed


def test_without_a_results_database_every_accuracy_is_not_measured(tiny_study, tmp_path, capsys):
    _, tasks, seed, _ = stored_merge(tiny_study["db"])
    adapters = [adapter_folder(tiny_study, task, seed) for task in tasks]
    missing = tmp_path / "no_such.duckdb"
    out = tmp_path / "merged"
    code, _, err = call_main(merge_main, [*adapters, "--rank", "4", "--db", missing, "--out", out], capsys)
    assert code == 0, err
    assert not missing.exists()  # read-only: a missing database is not created
    assert [cells[1:] for cells in table(out).values()] == [[NOT_MEASURED] * 3] * len(tasks)
    assert metadata(out)["tags"][3] == "ties"  # the default method


def test_foreign_merge_card_says_nothing_was_measured_and_its_snippet_runs(zoo, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "merged"
    code, _, err = call_main(
        merge_main, [*cli_args(zoo, *FOREIGN_TASKS), "--method", "ties", "--rank", "8", "--out", out], capsys
    )
    assert code == 0, err
    snippet = start_snippet(out)
    header = metadata(out)
    assert header["base_model"] == str(zoo["base"]) and "ties" in header["tags"]
    rows = table(out)
    assert list(rows) == list(FOREIGN_TASKS)
    for task, (classes, _, _) in FOREIGN_TASKS.items():
        assert rows[task] == [str(classes), FOREIGN_NOTE, FOREIGN_NOTE, FOREIGN_NOTE]
    printed = snippet_output(snippet)
    assert sorted(printed) == sorted(FOREIGN_TASKS)
    for task in FOREIGN_TASKS:
        assert printed[task] in label_names(task), printed


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
