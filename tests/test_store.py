"""The DuckDB store: schema version, transactions, idempotent inserts, read-only readers."""

import json
from dataclasses import replace

import duckdb
import pytest
from conftest import make_newer_schema_db, query_db

from mlvision.config import PROFILES
from mlvision.errors import StoreError
from mlvision.paths import REPO_ROOT
from mlvision.runs import study_run_id
from mlvision.store import SCHEMA_VERSION, Store, config_hash, insert_row


def test_schema_and_views_are_created(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.initialise()
    assert store.query("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    columns = [
        row[0]
        for row in store.query("SELECT column_name FROM information_schema.columns WHERE table_name = 'task_results'")
    ]
    for column in ["task", "model_kind", "seed", "accuracy", "n_test", "backbone", "config_hash", "run_id"]:
        assert column in columns


def test_insert_is_idempotent_and_transactions_roll_back(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.initialise()
    row = {
        "task": "t",
        "label_names": ["a", "b"],
        "domain": "d",
        "source": "s",
        "description": "x",
        "n_train": 1,
        "n_validation": 1,
        "n_test": 1,
    }
    with store.write() as con:
        assert insert_row(con, "tasks", row, key=("task",))
        assert not insert_row(con, "tasks", row, key=("task",))
    with pytest.raises(RuntimeError):
        with store.write() as con:
            insert_row(con, "tasks", {**row, "task": "u"}, key=("task",))
            raise RuntimeError("crash in the middle of a write")
    assert store.query("SELECT task FROM tasks") == [("t",)]


def test_readers_cannot_write(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.initialise()
    with store.read() as con:
        with pytest.raises(duckdb.Error):
            con.execute("DELETE FROM tasks")


def test_newer_schema_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "r.duckdb"
    make_newer_schema_db(path)
    with pytest.raises(StoreError, match="newer than this code's.*update"):
        Store(path).initialise()
    assert (
        duckdb.connect(str(path), read_only=True)
        .execute("SELECT count(*) FROM information_schema.tables")
        .fetchall()[0][0]
        == 1
    )


def test_bad_paths_name_the_problem(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "missing" / "r.duckdb").initialise()
    with pytest.raises(StoreError, match="no results database"):
        Store(tmp_path / "absent.duckdb").query("SELECT 1")
    (tmp_path / "junk.duckdb").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a readable DuckDB file|cannot open"):
        Store(tmp_path / "junk.duckdb").initialise()


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


# --- paths in runs.config ------------------------------------------------------------------------------


def test_a_stored_config_names_no_folder_inside_the_repository(tmp_path):
    """`StudyConfig.to_dict` (what runs.config stores) writes every path inside the repository relative to it; one
    outside stays absolute. The run id hashes the paths that enter it as given (`identity`), so no id changes."""
    inside = PROFILES["quick"].with_methods(("linear",))
    inside = replace(
        inside,
        db=REPO_ROOT / "runs" / "quick" / "results.duckdb",
        artifacts=REPO_ROOT / "artifacts",
        given_adapters=(("mnist", 0, str(REPO_ROOT / "artifacts" / "given" / "a"), "0" * 64),),
        backbone_base=f"local-dir:{REPO_ROOT / 'bases' / 'vit'}",
    )
    stored = inside.to_dict()
    assert str(REPO_ROOT) not in json.dumps(stored), stored
    assert (stored["db"], stored["artifacts"]) == ("runs/quick/results.duckdb", "artifacts")
    assert stored["given_adapters"] == [["mnist", 0, "artifacts/given/a", "0" * 64]]
    assert stored["backbone_base"] == "local-dir:bases/vit"
    assert inside.identity()["given_adapters"][0][2] == str(REPO_ROOT / "artifacts" / "given" / "a")
    assert inside.identity()["backbone_base"] == inside.backbone_base  # also in the model ids: unchanged
    assert "db" not in inside.identity() and "artifacts" not in inside.identity()

    outside = replace(inside, db=tmp_path / "r.duckdb", artifacts=tmp_path / "artifacts")
    assert (outside.to_dict()["db"], outside.to_dict()["artifacts"]) == (
        str(tmp_path / "r.duckdb"),
        str(tmp_path / "artifacts"),
    )
    assert study_run_id(outside) == study_run_id(inside)  # where the results go is no part of the run


def test_runs_stored_with_the_machines_folders_are_rewritten_and_no_id_changes(tmp_path):
    """A runs.config written before paths were stored relative (db and artifacts as this machine's absolute folders)
    is rewritten when the store opens the file for writing; every other column and table is unchanged, and a file
    with nothing to rewrite is not written at all."""
    path = tmp_path / "r.duckdb"
    store = Store(path)
    store.initialise()
    old_config = {"db": str(REPO_ROOT / "results.duckdb"), "artifacts": str(REPO_ROOT / "artifacts"), "steps": 200}
    other_machine = {"db": str(tmp_path / "elsewhere.duckdb"), "artifacts": "artifacts", "steps": 8}
    with store.write() as con:
        for run_id, config in (("run-old", old_config), ("run-other", other_machine)):
            row = {"run_id": run_id, "status": "finished", "command": "python training/run_all.py", "config": config}
            insert_row(con, "runs", row, key=("run_id",))
    columns = "run_id, started_at, finished_at, status, command, machine"
    before = query_db(path, f"SELECT {columns} FROM runs ORDER BY run_id")

    Store(path).initialise()
    configs = dict(query_db(path, "SELECT run_id, config FROM runs"))
    assert json.loads(configs["run-old"]) == {"db": "results.duckdb", "artifacts": "artifacts", "steps": 200}
    assert configs["run-other"] == json.dumps(other_machine, sort_keys=True)  # not this repository's: kept
    assert query_db(path, f"SELECT {columns} FROM runs ORDER BY run_id") == before
    written = path.read_bytes()
    Store(path).initialise()
    assert path.read_bytes() == written  # nothing left to rewrite: not a byte written
