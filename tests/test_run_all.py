"""run_all end to end on real data: stored rows, skipping, resuming after a kill, adapters peft can load."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from conftest import TINY_ARGS, TINY_TASKS, call_main, make_newer_schema_db, run_all
from peft import PeftModel

from mlvision.backbone import BackboneConfig, create_backbone
from mlvision.data import split_tensors
from mlvision.evaluation import accuracy
from mlvision.models import MultiTaskModel, load_head, load_model, read_meta
from mlvision.paths import REPO_ROOT
from mlvision.runs import resolve_stored_path
from mlvision.store import unpack_correct
from study.run_all import main

RESULT_COLUMNS = "task, model_kind, seed, accuracy, n_test, backbone, config_hash"


def rows(db: Path, sql: str = f"SELECT {RESULT_COLUMNS} FROM task_results ORDER BY ALL"):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_tiny_study_stores_every_model(tiny_study):
    stored = rows(tiny_study["db"])
    assert len(stored) == len(TINY_TASKS) * 3  # one seed: a head, an adapter and a (seedless) probe per task
    assert {(r[0], r[1]) for r in stored} == {(t, k) for t in TINY_TASKS for k in ("head", "adapter", "probe")}
    for task, kind, seed, acc, n_test, backbone, _ in stored:
        assert 0.0 <= acc <= 1.0 and n_test > 0 and backbone == "tf_efficientnet_lite0"
        assert (seed is None) == (kind == "probe")
    # each probe is scored on the very test images each merge of its task is scored on, image by image
    probes = rows(tiny_study["db"], "SELECT task, n_merge_eval, merge_eval_correct, config FROM probe_results")
    merge_n = dict(rows(tiny_study["db"], "SELECT DISTINCT task, n FROM merge_results"))
    stored_merge_test = dict(
        rows(tiny_study["db"], "SELECT m.task, e.accuracy FROM models m JOIN evaluations e USING (model_id) "
                               "WHERE e.split = 'merge_test'")
    )  # fmt: skip
    for task, n, packed, config in probes:
        assert n == merge_n[task] and unpack_correct(packed, n).mean() == pytest.approx(stored_merge_test[task])
        chosen = json.loads(config)["chosen"]
        assert chosen["C"] in chosen["C_grid"] and max(chosen["validation_accuracy"]) == pytest.approx(
            chosen["validation_accuracy"][chosen["C_grid"].index(chosen["C"])]
        )
    configs = rows(tiny_study["db"], "SELECT config FROM models")
    assert all(json.loads(c[0])["backbone"]["name"] == "tf_efficientnet_lite0" for c in configs)
    assert rows(tiny_study["db"], "SELECT status FROM runs") == [("finished",)]


def test_second_run_adds_nothing(tiny_study, capsys):
    before = rows(tiny_study["db"], "SELECT * FROM models ORDER BY model_id")
    assert run_all(*tiny_study["args"]) == 0
    assert "0 models trained, 9 already stored" in capsys.readouterr().out
    assert rows(tiny_study["db"], "SELECT * FROM models ORDER BY model_id") == before


def test_a_run_with_nothing_to_do_leaves_the_committed_database_byte_identical(tmp_path, capsys):
    """The README's first command on a fresh clone: everything is stored, so not one byte may change.

    Every stage runs; the benchmarks, whose figures are keyed by the machine, measure a new machine only when
    asked (`--stages bench`), not in a run that stored nothing else.
    """
    db = tmp_path / "results.duckdb"
    shutil.copy(REPO_ROOT / "results.duckdb", db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    capsys.readouterr()
    assert run_all("--db", db) == 0
    assert "benchmarks: not measured" in capsys.readouterr().out
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    # the report it wrote beside that copy is the committed report, word for word
    assert (tmp_path / "findings.md").read_text() == (REPO_ROOT / "reports" / "findings.md").read_text()


def test_adapter_folder_loads_with_peft_and_reproduces_its_accuracy(tiny_study):
    ((path, stored_accuracy, n_test),) = rows(
        tiny_study["db"],
        "SELECT m.path, r.accuracy, r.n_test FROM task_results r "
        "JOIN models m USING (model_id) WHERE r.task = 'textures' AND r.model_kind = 'adapter'",
    )
    folder = resolve_stored_path(path)
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "task.json"} <= {
        p.name for p in folder.iterdir()
    }
    meta = read_meta(folder)
    backbone = create_backbone(BackboneConfig(**meta["backbone"]))
    peft_model = PeftModel.from_pretrained(backbone, str(folder)).eval()  # peft's own loader
    model = MultiTaskModel(peft_model, {"textures": load_head(folder, meta)})
    loaded = load_model(folder)
    images, labels = split_tensors("textures", "test", loaded.preprocess, n_test)
    assert accuracy(model, "textures", images, labels) == pytest.approx(stored_accuracy)
    assert accuracy(loaded.model, "textures", images, labels) == pytest.approx(stored_accuracy)
    assert meta["label_names"] and meta["training"]["rank"] == 4


@pytest.mark.multiprocess
def test_killed_run_resumes_to_the_same_rows(tiny_study, tmp_path):
    """SIGKILL a real run as soon as its first model folder appears, run again: same rows as uninterrupted.

    Only the training stage runs, twice: it is the stage the kill interrupts, and the rows compared are its
    task_results (an interrupted merge sweep resuming is tests/test_scale.py's two-process kill test)."""
    db, artifacts = tmp_path / "r.duckdb", tmp_path / "artifacts"
    args = [*TINY_ARGS, "--db", str(db), "--artifacts", str(artifacts), "--stages", "train"]
    command = [sys.executable, str(REPO_ROOT / "training" / "run_all.py"), *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if artifacts.exists() and any(p.name.startswith(("head-", "adapter-")) for p in artifacts.rglob("*")):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be interrupted"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    partial = rows(db) if db.exists() else []
    assert len(partial) < len(TINY_TASKS) * 3
    assert run_all(*args) == 0
    assert rows(db) == rows(tiny_study["db"])  # same configs, same seeds, same accuracies, no duplicates


def test_hub_dataset_and_any_timm_backbone(tmp_path):
    """The online path, offline: a dataset saved to disk and a randomly initialised tiny ViT."""
    import datasets
    from PIL import Image

    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["dark", "light"])})
    images = [Image.new("L", (20, 20), 10 + i) for i in range(20)] + [
        Image.new("L", (20, 20), 200 + i) for i in range(20)
    ]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"img": images, "fine_label": [0] * 20 + [1] * 20}, features=features)}
    ).save_to_disk(str(tmp_path / "ds"))
    task = f"hub:{tmp_path / 'ds'}"
    assert (
        run_all(
            "--tasks",
            task,
            "--seeds",
            "0",
            "--backbone",
            "vit_tiny_patch16_224",
            "--backbone-weights",
            "random",
            "--image-size",
            "32",
            "--steps",
            "3",
            "--head-epochs",
            "2",
            "--db",
            tmp_path / "r.duckdb",
            "--artifacts",
            tmp_path / "artifacts",
            "--stages",
            "train",
        )
        == 0
    )
    stored = rows(tmp_path / "r.duckdb")
    assert [(r[0], r[1], r[5]) for r in stored] == [
        (task, "adapter", "vit_tiny_patch16_224"),
        (task, "head", "vit_tiny_patch16_224"),
        (task, "probe", "vit_tiny_patch16_224"),  # a ViT's blocks pooled as NCHW maps (forward_intermediates)
    ]
    meta = read_meta(
        resolve_stored_path(rows(tmp_path / "r.duckdb", "SELECT path FROM models WHERE model_kind='adapter'")[0][0])
    )
    assert meta["training"]["target_modules"] == ["qkv", "proj", "fc1", "fc2"]


def test_help_documents_the_options(capsys):
    code, out, _ = call_main(main, ["--help"], capsys)
    assert code == 0
    for option in ["--tasks", "--backbone", "--seeds", "--image-size", "--steps", "--db", "--artifacts", "--quick"]:
        assert option in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "mnits"], "unknown task 'mnits'"),
        (["--backbone", "resnet_9000"], "unknown backbone 'resnet_9000'"),
        (["--db", "/nonexistent-dir/r.duckdb"], "does not exist"),
    ],
)
def test_bad_input_gets_one_line_and_nonzero_exit(args, message, capsys):
    """In this process (the script itself ends the same way: test_newer_database_is_refused_and_left_untouched)."""
    code, _, err = call_main(main, [*TINY_ARGS, *args], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_newer_database_is_refused_and_left_untouched(tmp_path):
    db = tmp_path / "r.duckdb"
    make_newer_schema_db(db)
    before = db.read_bytes()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "training" / "run_all.py"), *TINY_ARGS, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "newer than this code's" in result.stderr and "Traceback" not in result.stderr
    assert db.read_bytes() == before


# -- issue 29.7: a user's study and the committed artifacts ---------------------------------------------
def test_a_study_with_its_own_db_keeps_its_models_beside_it():
    from mlvision.config import config_from_args
    from study.run_all import build_parser

    def artifacts(*argv):
        return config_from_args(build_parser().parse_args([str(a) for a in argv]), ("ties",)).artifacts

    assert artifacts("--db", "/x/mine.duckdb") == Path("/x/mine.artifacts")
    assert artifacts("--db", "/x/results.duckdb") == Path("/x/artifacts")
    assert artifacts("--db", "/x/mine.duckdb", "--artifacts", "/y") == Path("/y")
    assert Path(artifacts("--db", REPO_ROOT / "results.duckdb")).resolve() == (REPO_ROOT / "artifacts").resolve()


def test_models_already_in_the_artifacts_folder_are_reused_never_retrained_over(tiny_study, tmp_path, capsys):
    """A second results file with the first one's artifacts folder: every model folder there is scored and recorded
    as it is (another results file points to it; a retrained model would not be bit-identical), none rewritten."""
    artifacts = Path(tiny_study["artifacts"])
    before = {str(p): p.read_bytes() for p in sorted(artifacts.rglob("*")) if p.is_file()}
    other = tmp_path / "other.duckdb"
    args = list(tiny_study["args"])
    db_at = args.index("--db")
    args[db_at + 1] = other
    capsys.readouterr()
    assert run_all(*args, "--stages", "train") == 0
    out = capsys.readouterr().out
    models = 2 * len(TINY_TASKS)
    # the probes keep no folder (a seconds-long convex fit): they are fitted again, to the same accuracies (below)
    assert f"{len(TINY_TASKS)} models trained, {models} found in the artifacts folder and reused" in out, out
    assert {str(p): p.read_bytes() for p in sorted(artifacts.rglob("*")) if p.is_file()} == before
    query = "SELECT model_id, accuracy, n_test FROM task_results ORDER BY model_id"
    first = duckdb.connect(str(tiny_study["db"]), read_only=True).execute(query).fetchall()
    second = duckdb.connect(str(other), read_only=True).execute(query).fetchall()
    assert second == first
