"""A study of adapters you already have (`run_all --adapters`, study/given.py; issue 18).

The tiny study's adapters are given back to run_all as if they came from elsewhere: the new study must
import them (same test accuracies, new content-based ids), train the same head baselines, merge them
to the very same per-image outcomes as the study that trained them, measure similarity and findings,
resume without writing, and give a file the dashboard reads. Every unusable input is one line, a
non-zero exit and no results file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import call_main, query_db
from streamlit.testing.v1 import AppTest

from mlvision.paths import REPO_ROOT
from study.run_all import main as run_all_main

# The tiny study's limits, so the head baselines and the merge evaluation are the same as there.
LIMITS = ["--head-epochs", "3", "--max-train", "128", "--max-validation", "64", "--max-test", "96",
          "--merge-eval", "48", "--merge-select", "16"]  # fmt: skip


def adapter_folders(tiny_study) -> dict[str, Path]:
    rows = query_db(tiny_study["db"], "SELECT task, path FROM models WHERE model_kind = 'adapter' AND seed = 0")
    return {task: REPO_ROOT / path if not Path(path).is_absolute() else Path(path) for task, path in rows}


@pytest.fixture(scope="module")
def given_study(tiny_study, tmp_path_factory):
    """The tiny study's three adapters studied as given adapters: {'db', 'argv', 'out'}."""
    root = tmp_path_factory.mktemp("given")
    folders = adapter_folders(tiny_study)
    argv = ["--adapters", *[folders[task] for task in sorted(folders)], *LIMITS,
            "--merge-methods", "task_arithmetic", "--max-k", "2", "--stages", "train", "merge", "findings",
            "--db", root / "results.duckdb", "--artifacts", root / "artifacts"]  # fmt: skip
    assert run_all_main([str(a) for a in argv]) == 0  # in this process (a module fixture has no capsys)
    return {"db": root / "results.duckdb", "argv": argv, "root": root, "folders": folders}


def test_given_adapters_keep_their_accuracies_and_get_content_ids(given_study, tiny_study):
    sql = "SELECT task, model_kind, accuracy, model_id FROM task_results ORDER BY task, model_kind"
    given = {(task, kind): (acc, model_id) for task, kind, acc, model_id in query_db(given_study["db"], sql)}
    trained = {(task, kind): (acc, model_id) for task, kind, acc, model_id in query_db(tiny_study["db"], sql)}
    assert set(given) == set(trained) and len(given) == 6
    for key in given:
        assert given[key][0] == trained[key][0], key  # same adapter, same test images; same head training
        same_id = given[key][1] == trained[key][1]
        assert same_id == (key[1] == "head"), key  # a given adapter's identity is its content
    config = json.loads(query_db(given_study["db"], "SELECT config FROM models WHERE model_kind = 'adapter'")[0][0])
    assert config["rank"] == 4 and len(config["given_sha256"]) == 64 and Path(config["source"]).is_dir()


def test_given_adapters_merge_to_the_same_outcomes(given_study, tiny_study):
    sql = (
        "SELECT tasks, task, merged_correct, normalized_accuracy FROM merge_results "
        "WHERE method = 'task_arithmetic' AND k = 2 ORDER BY tasks, task"
    )
    given, trained = query_db(given_study["db"], sql), query_db(tiny_study["db"], sql)
    assert len(given) == 6 and given == trained  # 3 pairs x 2 tasks, image by image
    pairs = query_db(given_study["db"], "SELECT count(DISTINCT (task_a, task_b)) FROM task_similarity")[0][0]
    claims = query_db(given_study["db"], "SELECT count(*) FROM findings WHERE finding = 'claims'")[0][0]
    assert pairs == 3 and claims > 0


def test_given_study_resumes_without_writing(given_study, capsys):
    before = given_study["db"].read_bytes()
    code, out, err = call_main(run_all_main, given_study["argv"], capsys)
    assert code == 0, err
    assert "0 models trained, 6 already stored" in out and "0 merges evaluated" in out
    assert given_study["db"].read_bytes() == before


def test_dashboard_reads_a_given_study(given_study):
    os.environ["MLV_DB"] = str(given_study["db"])
    for page in ("overview", "merge_count", "runs"):
        at = AppTest.from_file(str(REPO_ROOT / "dashboard" / "app.py"), default_timeout=120)
        at.query_params["page"] = page
        at.run()
        assert not at.exception, page
        assert len(at.get("plotly_chart")) >= (1 if page == "merge_count" else 0), page
        if page == "runs":  # the run's command says which adapters it studied
            commands = [str(c) for frame in at.dataframe if "command" in frame.value for c in frame.value["command"]]
            assert any("--adapters" in command for command in commands), commands


def _foreign(tmp_path: Path) -> Path:
    folder = tmp_path / "peft-lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return folder


def _other_backbone(tmp_path: Path, folder: Path) -> Path:
    copy = tmp_path / "bigger"
    shutil.copytree(folder, copy)
    meta = json.loads((copy / "task.json").read_text())
    meta["backbone"]["image_size"] = 64
    (copy / "task.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize(
    "case, expected",
    [
        ("foreign", "another trainer"),
        ("head", "baseline, not an adapter"),
        ("labels", "trained on labels"),
        ("backbones", "different backbones"),
        ("uneven", "same number of adapters"),
        ("tasks_too", "leave out --tasks"),
        ("missing", "no model folder"),
        ("bad_pair", "ADAPTER=TASK"),
    ],
)
def test_unusable_adapters_fail_in_one_line(case, expected, tiny_study, tmp_path, capsys):
    folders = adapter_folders(tiny_study)
    digits, faces = folders["uci_digits"], folders["lfw_faces"]
    head = query_db(tiny_study["db"], "SELECT path FROM models WHERE model_kind = 'head' LIMIT 1")[0][0]
    given = {
        "foreign": [str(digits), str(_foreign(tmp_path))],
        "head": [str(digits), str(REPO_ROOT / head if not Path(head).is_absolute() else head)],
        "labels": [str(digits), f"{faces}=uci_digits"],
        "backbones": [str(digits), str(_other_backbone(tmp_path, faces))],
        "uneven": [str(digits), str(digits), str(faces)],
        "tasks_too": [str(digits), str(faces)],
        "missing": [str(digits), str(tmp_path / "nowhere")],
        "bad_pair": [str(digits), "=uci_digits"],
    }[case]
    extra = ["--tasks", "uci_digits", "lfw_faces"] if case == "tasks_too" else []
    db = tmp_path / "results.duckdb"
    code, out, err = call_main(run_all_main, ["--adapters", *given, *extra, "--db", db], capsys)
    assert code != 0 and expected in err, (case, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not db.exists()
