"""The dashboard on broken, busy and odd databases: every problem named for what it is, in one line.

Each database is made inside the test from a copy of the committed results.duckdb (never the file
itself). For every page: no traceback (`at.exception` empty), and the `st.error` line names the
problem — missing file, not a DuckDB file, truncated, locked, newer schema, a view holding
unexpected types — or, for an older file without some views, the page says so with `st.info`.
While a writer holds the file, a page that was drawn before shows its last good results with a
note, instead of an error.

Also: the server listens on 127.0.0.1 only (.streamlit/config.toml).
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import tomllib
from browser import free_port, stop, wait_http
from streamlit.testing.v1 import AppTest

from dashboard.pages import PAGES
from mlvision.paths import DEFAULT_DB_PATH, REPO_ROOT
from mlvision.store import READ_WAIT_ENV, SCHEMA_VERSION

APP = str(REPO_ROOT / "dashboard" / "app.py")
# Pages that read the merge_results view (all but Performance); a new page of dashboard/pages/__init__.py that reads it
# is listed here too (docs/ARCHITECTURE.md, "A dashboard page").
MERGE_PAGES = {"overview", "merge_count", "dissimilarity", "merges_vs_heads", "methods", "runs"}


@pytest.fixture(autouse=True)
def _restore_env():
    saved = {name: os.environ.get(name) for name in ("MLV_DB", READ_WAIT_ENV)}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def render(db: Path, page: str) -> AppTest:
    os.environ["MLV_DB"] = str(db)
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["page"] = page
    at.run()
    assert not at.exception, (page, [e.value for e in at.exception])
    return at


def committed_copy(tmp_path: Path) -> Path:
    assert DEFAULT_DB_PATH.exists(), "the committed results.duckdb is missing: restore it (git checkout results.duckdb)"
    db = tmp_path / "results.duckdb"
    shutil.copy(DEFAULT_DB_PATH, db)
    return db


# ------------------------------------------------------------------ files that cannot be read


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nowhere.duckdb"


def _random_bytes(tmp_path: Path) -> Path:
    db = tmp_path / "results.duckdb"
    db.write_bytes(random.Random(0).randbytes(300_000))
    return db


def _truncated(tmp_path: Path) -> Path:
    db = committed_copy(tmp_path)
    with open(db, "r+b") as file:
        file.truncate(db.stat().st_size // 2)
    return db


def _newer_schema(tmp_path: Path) -> Path:
    db = committed_copy(tmp_path)
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE schema_version SET version = ?", [SCHEMA_VERSION + 1])
    return db


@pytest.mark.parametrize(
    "make, expected",
    [
        (_missing, "no results database at"),
        (_random_bytes, "is not a readable DuckDB file: it holds something else"),
        (_truncated, "is not a readable DuckDB file: it is truncated or corrupt"),
        (_newer_schema, f"has schema version {SCHEMA_VERSION + 1}, newer than this code's"),
    ],
    ids=["missing", "random bytes", "truncated to half", "newer schema"],
)
def test_unreadable_file_is_named_on_every_page(tmp_path, make, expected):
    db = make(tmp_path)
    before = db.read_bytes() if db.exists() else None
    for page in PAGES:
        at = render(db, page)
        assert len(at.error) == 1 and expected in at.error[0].value, (page, [e.value for e in at.error])
        assert "\n" not in at.error[0].value  # one line
    assert (db.read_bytes() if db.exists() else None) == before  # reading never writes


def test_view_with_text_where_numbers_belong_is_named(tmp_path):
    db = committed_copy(tmp_path)
    with duckdb.connect(str(db)) as con:  # merged accuracy as text, "94.7%"
        con.execute("ALTER VIEW merge_results RENAME TO merge_results_stored")
        con.execute(
            "CREATE VIEW merge_results AS SELECT * REPLACE "
            "(printf('%.1f%%', 100 * merged_accuracy) AS merged_accuracy) FROM merge_results_stored"
        )
    for page in PAGES:
        at = render(db, page)
        if page in MERGE_PAGES:
            assert len(at.error) == 1, (
                page,
                "a page in MERGE_PAGES (tests/test_dashboard_robustness.py) that does not read merge_results: "
                "remove it there",
            )
            assert "`merge_results` view" in at.error[0].value
            assert "holds VARCHAR in column `merged_accuracy` where numbers belong" in at.error[0].value
        else:
            assert not at.error, (
                page,
                [e.value for e in at.error],
                "a page that reads merge_results is listed in MERGE_PAGES (tests/test_dashboard_robustness.py)",
            )


def test_view_with_numbers_where_text_belongs_is_named(tmp_path):
    db = committed_copy(tmp_path)
    with duckdb.connect(str(db)) as con:  # tasks as a number
        con.execute("ALTER VIEW task_results RENAME TO task_results_stored")
        con.execute("CREATE VIEW task_results AS SELECT * REPLACE (length(task) AS task) FROM task_results_stored")
    at = render(db, "overview")
    assert "holds BIGINT in column `task` where text belong" in at.error[0].value


def test_view_without_a_column_a_page_needs_gives_one_line(tmp_path):
    db = committed_copy(tmp_path)
    with duckdb.connect(str(db)) as con:  # the last resort in app.py: no traceback even for the unforeseen
        con.execute("ALTER VIEW task_results RENAME TO task_results_stored")
        con.execute("CREATE VIEW task_results AS SELECT * EXCLUDE (backbone) FROM task_results_stored")
    at = render(db, "overview")
    assert len(at.error) == 1
    assert at.error[0].value.startswith("This page could not be drawn (KeyError: 'backbone')")
    assert "re-create it with `python training/run_all.py`" in at.error[0].value
    assert "otherwise it is a bug of the page: the server's log holds the details" in at.error[0].value


def test_older_file_without_views_says_what_is_missing(tmp_path):
    db = committed_copy(tmp_path)
    with duckdb.connect(str(db)) as con:
        for view in ("merge_plans", "merge_results", "task_similarity", "findings", "benchmarks"):
            con.execute(f"DROP VIEW {view}")
    for page in PAGES:
        at = render(db, page)
        assert not at.error, (page, [e.value for e in at.error])
        if page != "overview":
            assert at.info, (
                page,
                "this page still shows data without the views dropped above: if it reads another view, drop that "
                "one too in this test (test_older_file_without_views_says_what_is_missing, "
                "tests/test_dashboard_robustness.py)",
            )
    overview = {m.label: m.value for m in render(db, "overview").metric}
    assert overview["Merged models"] == "not stored yet"


# ------------------------------------------------------------------------- a busy file


def hold_write_lock(db: Path, change: bool = False) -> subprocess.Popen:
    """Another process holding the file open for writing until its stdin closes (as a run does while
    it writes); with `change`, it first writes a row, so the file's WAL (and the dashboard's cache key) changes."""
    code = (
        "import duckdb, sys\n"
        f"con = duckdb.connect({str(db)!r})\n"
        + ("con.execute('CREATE TABLE held AS SELECT 1 AS x')\n" if change else "")
        + "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
@pytest.mark.multiprocess
def test_locked_file_without_last_result_says_locked_by_whom(tmp_path):
    db = committed_copy(tmp_path)
    os.environ[READ_WAIT_ENV] = "1"
    holder = hold_write_lock(db)
    try:
        for page in PAGES:
            at = render(db, page)
            assert len(at.error) == 1, page
            message = at.error[0].value
            assert f"is locked by another process (process {holder.pid})" in message, message
            assert f"${READ_WAIT_ENV} sets how long to wait" in message
    finally:
        holder.communicate("", timeout=30)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_locked_file_shows_last_good_results_with_a_note(tmp_path):
    db = committed_copy(tmp_path)
    pages = ["overview", "merge_count", "runs"]
    first = {page: render(db, page) for page in pages}
    for at in first.values():
        assert not at.error and not at.warning
    os.environ[READ_WAIT_ENV] = "1"
    holder = hold_write_lock(db, change=True)
    try:
        for page in pages:
            at = render(db, page)
            assert not at.error, (page, [e.value for e in at.error])
            assert len(at.warning) == 1, page
            note = at.warning[0].value
            assert note.startswith("Showing results from ") and "the database is busy being written" in note
            assert [m.value for m in at.metric] == [m.value for m in first[page].metric]
            assert [len(d.value) for d in at.dataframe] == [len(d.value) for d in first[page].dataframe]
    finally:
        holder.communicate("", timeout=30)
    at = render(db, "overview")  # free again: fresh results, no note
    assert not at.warning and not at.error


# ------------------------------------------------------------------- listening address


def test_config_binds_the_dashboard_to_loopback():
    config = tomllib.loads((REPO_ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert config["server"]["headless"] is True


def non_loopback_addresses() -> list[str]:
    """This machine's own addresses other than loopback (IPv4 and global IPv6)."""
    psutil = pytest.importorskip("psutil")
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(address.address.split("%")[0])
            if not (ip.is_loopback or ip.is_link_local):
                found.append(str(ip))
    return found


@pytest.mark.multiprocess
def test_started_dashboard_is_not_reachable_from_other_interfaces(tmp_path):
    addresses = non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no non-loopback address to try")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless", "true"]
        + ["--server.port", str(port)],
        cwd=REPO_ROOT,  # where Streamlit finds .streamlit/config.toml, as `streamlit run` from the repo root does
        env={**os.environ, "MLV_DB": str(committed_copy(tmp_path))},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", 90, server, b"ok")
        for address in addresses:
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=3).close()
    finally:
        stop(server)
