"""The DuckDB store: schema version, transactions, idempotent inserts, read-only readers."""

import duckdb
import pytest
from conftest import make_newer_schema_db

from mlvision.errors import StoreError
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
