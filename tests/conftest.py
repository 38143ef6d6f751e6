"""Shared fixtures: a tiny real study (real weights, real data, real DuckDB) built once per session.

The tiny study trains on three small offline tasks with the real EfficientNet-Lite0 weights, so
tests of the store, adapter files, merging, dashboard and demo all run against artifacts made by
the project's own code, never against mocks.
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_TASKS = ["uci_digits", "lfw_faces", "textures"]
TINY_METHODS = ["linear", "task_arithmetic", "ties", "peft_cat"]
TINY_ARGS = [
    "--tasks",
    *TINY_TASKS,
    "--seeds",
    "0",
    "--image-size",
    "32",
    "--steps",
    "8",
    "--batch-size",
    "32",
    "--rank",
    "4",
    "--alpha",
    "8",
    "--head-epochs",
    "3",
    "--max-train",
    "128",
    "--max-validation",
    "64",
    "--max-test",
    "96",
    "--merge-methods",
    *TINY_METHODS,
    "--max-k",
    "3",
    "--merge-eval",
    "48",
    "--merge-select",
    "16",
    # benchmarks: few repeats and small batches; the training section has its own test (test_bench.py)
    "--bench-sections",
    "inference",
    "merge",
    "--bench-repeats",
    "3",
    "--bench-batch-sizes",
    "1",
    "4",
    "--bench-merge-repeats",
    "1",
]


def committed_adapter(task: str, seed: int = 0):
    """The committed six-task study's adapter of `task` and `seed` (a folder under artifacts/): the one helper the
    tests that merge real adapters without training any share."""
    from mlvision.paths import REPO_ROOT

    folders = sorted((REPO_ROOT / "artifacts" / "tf_efficientnet_lite0" / task).glob(f"adapter-seed{seed}-*"))
    assert folders, f"no committed adapter of {task} seed {seed} under artifacts/: restore it (git checkout artifacts)"
    return folders[0]


def query_db(db, sql: str, params: list | None = None) -> list[tuple]:
    """Rows of a query on a results database, opened read-only like every reader."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def make_newer_schema_db(path) -> None:
    """A results file that claims a schema version this code does not know yet."""
    import duckdb

    from mlvision.store import SCHEMA_VERSION

    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_version (version INTEGER)")
    con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION + 1])
    con.close()


def run_all(*args: str) -> int:
    from study.run_all import main

    return main([str(a) for a in args])


def call_main(main, argv, capsys) -> tuple[int, str, str]:
    """An entry point's `main(argv)` run in this process: (exit code, stdout, stderr).

    The same code the script runs, argparse's own exits included, without the ~10 s a fresh interpreter spends
    importing torch, timm and peft; each entry point keeps at least one test that runs it as a real process
    (exit status and stderr as a user sees them)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_config(tiny_study):
    """The StudyConfig of the tiny study, rebuilt from its command line."""
    from mlvision.config import config_from_args
    from study.run_all import build_parser

    return config_from_args(build_parser().parse_args([str(a) for a in tiny_study["args"]]), tuple(TINY_METHODS))


@pytest.hookimpl(trylast=True)  # after pytest's own tmp_path plugin has set up its base folder
def pytest_configure(config) -> None:
    """Every test writes under pytest's temporary folders, the code it runs included: the demo's exports and
    examples, Gradio's uploads, Chromium's profiles and torch.distributed's files go to the system temporary
    folder, which is pointed here at one inside this session's base folder (TMPDIR for the processes tests start,
    `tempfile.tempdir` for this one); pytest keeps the last three sessions' folders and removes older ones. The
    base folder itself, not one inside it: Gradio serves files from the system temporary folder, and the tests'
    own `tmp_path` folders (example images) must count as inside it."""
    import tempfile

    scratch = config._tmp_path_factory.getbasetemp()
    os.environ["TMPDIR"] = str(scratch)
    tempfile.tempdir = str(scratch)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items) -> None:
    """Every test that uses the tiny study (directly or through another fixture) is `slow`, however quick its own
    body: the study is built once per session, its ~30 s landing on the first test that asks for it, so a single
    unmarked user would build it in the fast tier (`pytest -m "not slow"`). One rule here instead of a marker on
    each of its users, so a new user of the fixture cannot forget it."""
    for item in items:
        if "tiny_study" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> dict:
    """Paths of a finished tiny study: {'db': Path, 'artifacts': Path, 'args': [...]}."""
    root = tmp_path_factory.mktemp("tiny_study")
    args = [*TINY_ARGS, "--db", root / "results.duckdb", "--artifacts", root / "artifacts"]
    assert run_all(*args) == 0
    return {"db": root / "results.duckdb", "artifacts": root / "artifacts", "args": args, "root": root}
