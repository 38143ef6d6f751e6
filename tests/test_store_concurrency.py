"""One writer, many readers: the store waits for a busy file instead of dying.

DuckDB lets one process write a file or several read it, never both; a second process is refused at
once. The store retries (backoff with jitter, a progress line on stderr) up to a limit, then gives
its one-line StoreBusyError. Tested here:
- a process holding the file for ~3 s makes another process's write (and read) wait, then succeed;
- holding it past a tiny limit gives the one-line error, from the library and from `run_all`;
- the real pipeline (`run_all --quick`) runs to the end while five simulated dashboard viewers (separate
  processes reading through dashboard/queries.py, as the app does) refresh all the time, and no viewer
  sees an error.

This file is also the viewer: `python tests/test_store_concurrency.py DB STOP_FILE OUT_JSON`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlvision.errors import StoreError
from mlvision.paths import REPO_ROOT
from mlvision.store import READ_WAIT_ENV, WRITE_WAIT_ENV, Store, StoreBusyError, insert_row

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
VIEWERS = 5
VIEWER_PAUSE_S = 1.0  # between two refreshes of one viewer (a person pressing reload, often)
VIEWER_MAX_REFRESHES = 400  # each viewer stops by itself after this many, or after VIEWER_MAX_S
VIEWER_MAX_S = 420
# The quick profile on three of its six tasks: every stage that writes (train, merge, findings) runs, for about
# half a minute beside the viewers; four and six tasks took longer and wrote the same kinds of rows.
RUN_TASKS = ["mnist", "uci_digits", "animals"]
RUN_ARGS = ["--quick", "--tasks", *RUN_TASKS, "--stages", "train", "merge", "findings"]


def hold(db: Path, read_only: bool = False, seconds: float | None = None) -> subprocess.Popen:
    """Another process holding `db` open: for `seconds`, or until its stdin closes."""
    wait = f"time.sleep({seconds})" if seconds is not None else "sys.stdin.read()"
    code = (
        f"import duckdb, sys, time\ncon = duckdb.connect({str(db)!r}, read_only={read_only})\n"
        f"print('held', flush=True)\n{wait}\ncon.close()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def task_row(name: str) -> dict:
    return {
        "task": name,
        "label_names": ["a"],
        "domain": "d",
        "source": "s",
        "description": "",
        "n_train": 1,
        "n_validation": 1,
        "n_test": 1,
    }


@pytest.fixture
def db(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv(WRITE_WAIT_ENV, raising=False)
    monkeypatch.delenv(READ_WAIT_ENV, raising=False)
    path = tmp_path / "r.duckdb"
    Store(path).initialise()
    return path


# ------------------------------------------------------------------------ waiting and giving up


@pytest.mark.multiprocess
def test_write_waits_for_a_writer_holding_the_file_then_succeeds(db, capfd):
    holder = hold(db, seconds=3)
    started = time.monotonic()
    with Store(db).write() as con:
        insert_row(con, "tasks", task_row("t"), key=("task",))
    waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert 1.5 < waited < 30
    assert Store(db).query("SELECT task FROM tasks") == [("t",)]
    note = capfd.readouterr().err
    assert f"waiting for {db}: it is locked by process {holder.pid}" in note, note


@pytest.mark.slow
@pytest.mark.multiprocess
def test_read_waits_for_a_writer_and_write_waits_for_a_reader(db):
    holder = hold(db, seconds=3)
    started = time.monotonic()
    assert Store(db).query("SELECT count(*) FROM tasks") == [(0,)]
    assert time.monotonic() - started > 1.5
    holder.wait(timeout=30)
    reader = hold(db, read_only=True, seconds=3)
    started = time.monotonic()
    with Store(db).write() as con:
        insert_row(con, "tasks", task_row("u"), key=("task",))
    assert time.monotonic() - started > 1.5
    reader.wait(timeout=30)


@pytest.mark.multiprocess
@pytest.mark.parametrize("read_only", [False, True], ids=["writer", "reader"])
def test_past_the_limit_the_error_is_one_line(db, monkeypatch, read_only):
    variable = READ_WAIT_ENV if read_only else WRITE_WAIT_ENV
    monkeypatch.setenv(variable, "0.5")
    holder = hold(db)
    try:
        started = time.monotonic()
        with pytest.raises(StoreBusyError) as caught:
            if read_only:
                Store(db).query("SELECT 1")
            else:
                with Store(db).write():
                    pass
        assert time.monotonic() - started < 10
    finally:
        holder.communicate("", timeout=30)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{db} is locked by another process (process {holder.pid})" in message
    assert f"${variable} sets how long to wait" in message


def test_a_wait_limit_that_is_not_a_number_is_named(db, monkeypatch):
    monkeypatch.setenv(WRITE_WAIT_ENV, "soon")
    with pytest.raises(StoreError, match="MLV_STORE_WAIT_S='soon' is not a number of seconds"):
        with Store(db).write():  # (initialise writes nothing on a file whose schema is current)
            pass


@pytest.mark.slow
@pytest.mark.multiprocess
def test_run_all_gives_up_with_one_line_and_exit_2(db, tmp_path):
    holder = hold(db)
    try:
        done = subprocess.run(
            [sys.executable, "training/run_all.py", *RUN_ARGS, "--db", db, "--artifacts", tmp_path / "a"],
            cwd=REPO_ROOT,
            env={**ENV, WRITE_WAIT_ENV: "1", READ_WAIT_ENV: "1"},  # both: run_all reads the file before it writes
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.communicate("", timeout=30)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "is locked by another process" in last
    assert "Traceback" not in done.stderr


# ----------------------------------------------------- the real pipeline beside five viewers


def expected_rows() -> dict[str, int]:
    """Rows an undisturbed `run_all --quick` stores: the plan its own config makes."""
    from merging.methods import list_methods
    from merging.sweep import sweep_plan
    from mlvision.config import config_from_args
    from study.run_all import build_parser

    config = config_from_args(build_parser().parse_args(RUN_ARGS), tuple(list_methods()))
    plan = sweep_plan(config)
    return {
        # a head baseline and an adapter per (task, seed), and one multi-layer probe per task
        "task_results": len(config.tasks) * len(config.seeds) * 2 + len(config.tasks),
        "merges": len(plan),
        "merge_results": sum(len(group) for group, _, _ in plan),  # one row per task of each merged model
    }


@pytest.mark.slow
@pytest.mark.multiprocess
def test_run_all_finishes_while_five_viewers_refresh(tmp_path):
    db, stop_file = tmp_path / "r.duckdb", tmp_path / "stop"
    expected = expected_rows()
    assert expected["merges"] > 0 and expected["task_results"] > 0
    logs = [open(tmp_path / f"viewer{i}.log", "w") for i in range(VIEWERS)]  # a viewer's traceback, if any
    viewers = [
        subprocess.Popen(
            [sys.executable, __file__, str(db), str(stop_file), str(tmp_path / f"viewer{i}.json")],
            cwd=REPO_ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        for i, log in enumerate(logs)
    ]
    for log in logs:
        log.close()  # each viewer writes through its own copy
    started = time.monotonic()
    try:
        run = subprocess.run(
            [sys.executable, "training/run_all.py", *RUN_ARGS, "--db", db, "--artifacts", tmp_path / "a"],
            cwd=REPO_ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=480,
        )
    finally:
        stop_file.touch()
        for viewer in viewers:
            viewer.wait(timeout=120)
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-3000:]
    counts = {
        "task_results": Store(db).query("SELECT count(*) FROM task_results")[0][0],
        "merges": Store(db).query("SELECT count(*) FROM merges")[0][0],
        "merge_results": Store(db).query("SELECT count(*) FROM merge_results")[0][0],
    }
    assert counts == expected

    stats = [json.loads((tmp_path / f"viewer{i}.json").read_text()) for i in range(VIEWERS)]
    writer_waits = [line for line in run.stderr.splitlines() if line.startswith("waiting for")]
    print(
        f"\nrun_all --quick: {seconds:.0f} s, rows {counts}; writer progress lines: {len(writer_waits)}"
        + "".join(
            f"\nviewer {i}: {s['refreshes']} refreshes, {s['opens']} file opens, {s['refused']} tries refused "
            f"(file locked), longest open {s['longest_open_s']:.2f} s, {s['stale']} refreshes served last-good "
            f"results, {len(s['errors'])} errors"
            for i, s in enumerate(stats)
        )
    )
    for i, s in enumerate(stats):
        assert not s["errors"], (i, s["errors"][:3])
        assert s["refreshes"] >= 10 and s["opens"] > 0, (i, s)  # it really read while the run wrote


# --------------------------------------------------------------------------------- the viewer


def viewer(db: str, stop_file: str, out: str) -> None:
    """One dashboard viewer pressing reload: every page's questions through dashboard/queries.py."""
    import duckdb

    from dashboard import queries
    from mlvision import store

    stats = {"refreshes": 0, "opens": 0, "refused": 0, "longest_open_s": 0.0, "stale": 0, "errors": []}
    duckdb_connect, store_connect = duckdb.connect, store.Store._connect

    def counted_duckdb_connect(*args, **kwargs):  # every try: refused (file locked) or opened
        try:
            con = duckdb_connect(*args, **kwargs)
        except duckdb.IOException as error:
            stats["refused"] += "lock" in str(error).lower()
            raise
        stats["opens"] += 1
        return con

    def timed_store_connect(self, read_only):  # the time to open, waits included
        began = time.monotonic()
        con = store_connect(self, read_only)
        stats["longest_open_s"] = max(stats["longest_open_s"], time.monotonic() - began)
        return con

    duckdb.connect, store.Store._connect = counted_duckdb_connect, timed_store_connect
    deadline = time.monotonic() + VIEWER_MAX_S
    while not Path(stop_file).exists() and time.monotonic() < deadline:  # until the run has created the file
        if Path(db).exists() and Path(db).stat().st_size >= 12288:  # DuckDB's three header blocks
            break
        time.sleep(0.1)
    while stats["refreshes"] < VIEWER_MAX_REFRESHES and not Path(stop_file).exists() and time.monotonic() < deadline:
        queries.start_render()
        try:
            queries.relations(db)
            results = queries.task_results(db)
            for question in (queries.merge_results, queries.merge_summary, queries.task_similarity):
                question(db)
            for question in (queries.findings, queries.benchmarks, queries.runs):
                question(db)
            if results is not None and not results.empty:
                queries.task_info(db, sorted(results["task"].unique()))
        except StoreError as error:
            stats["errors"].append(str(error))
        stats["stale"] += queries.stale_since() is not None
        stats["refreshes"] += 1
        time.sleep(VIEWER_PAUSE_S)
    Path(out).write_text(json.dumps(stats))


if __name__ == "__main__":
    viewer(*sys.argv[1:4])
