"""The merge sweep split across workers: Parquet parts, one collect step, the serial sweep's numbers.

Each test starts from a copy of the tiny study's database with its merge rows deleted, so the workers
recompute the sweep from the very adapters the serial sweep merged, and compares with the serial rows.
"""

import shutil

import duckdb
import pytest
from conftest import TINY_ARGS, query_db

from merging.parallel_sweep import main

# Accuracies are (correct images) / n, so equal predictions give equal floats: 1e-9 means "exact".
TOLERANCE = 1e-9
RESULTS = (
    "SELECT merge_id, method, k, tasks, task, seed, merged_accuracy, single_accuracy, head_accuracy, n, "
    "hyperparams, backbone, run_id FROM merge_results ORDER BY merge_id, task"
)
MERGES = (
    "SELECT merge_id, method, k, tasks, seed, adapter_ids, hyperparams, selection, run_id FROM merges ORDER BY merge_id"
)


def study_args() -> list[str]:
    """The tiny study's options, less run_all's benchmark options (the sweep does not take them)."""
    kept, skipping = [], False
    for arg in TINY_ARGS:
        if arg.startswith("--"):
            skipping = arg.startswith("--bench")
        if not skipping:
            kept.append(arg)
    return kept


def emptied_study(tiny_study, tmp_path) -> tuple:
    """A copy of the tiny study's database without merge rows, and the study options that point at it."""
    tmp_path.mkdir(exist_ok=True)
    db = tmp_path / "results.duckdb"
    shutil.copy(tiny_study["db"], db)
    con = duckdb.connect(str(db))
    con.execute("DELETE FROM merge_evaluations")
    con.execute("DELETE FROM merges")
    con.close()
    return db, [*study_args(), "--db", db, "--artifacts", tiny_study["artifacts"]]


def assert_same_results(rows, serial_rows):
    assert [r[:6] for r in rows] == [r[:6] for r in serial_rows]  # same merges, tasks and seeds
    for row, serial in zip(rows, serial_rows):
        assert all(abs(a - b) <= TOLERANCE for a, b in zip(row[6:9], serial[6:9])), (row, serial)
        assert row[9:] == serial[9:]


def part_folders(parts):
    return sorted(p for p in parts.glob("worker-*/chunk-*"))


@pytest.fixture(scope="module")
def parallel_run(tiny_study, tmp_path_factory) -> dict:
    """`run --workers 2`: two worker subprocesses write parts, then one collect loads them."""
    db, args = emptied_study(tiny_study, tmp_path_factory.mktemp("parallel"))
    parts = db.parent / "parts"
    code = main(["run", "--workers", "2", "--parts", parts, "--chunk-size", "2", *args])
    return {"code": code, "db": db, "args": args, "parts": parts}


def test_two_workers_equal_the_serial_sweep(tiny_study, parallel_run):
    assert parallel_run["code"] == 0
    serial = query_db(tiny_study["db"], RESULTS)
    assert len(serial) == 36  # 3 pairs and 1 triple x 4 methods, k rows each
    assert_same_results(query_db(parallel_run["db"], RESULTS), serial)
    assert query_db(parallel_run["db"], MERGES) == query_db(tiny_study["db"], MERGES)  # λ selection records too
    # each worker wrote its own parts, and the two shares split the sweep without overlap
    con = duckdb.connect()
    shares = [
        {
            row[0]
            for row in con.execute(
                f"SELECT merge_id FROM read_parquet('{parallel_run['parts']}/worker-{i}-of-2/*/merges.parquet')"
            ).fetchall()
        }
        for i in range(2)
    ]
    assert len(shares[0]) == len(shares[1]) == 8 and not shares[0] & shares[1]
    assert shares[0] | shares[1] == {r[0] for r in serial}
    assert len(part_folders(parallel_run["parts"])) == 8  # 8 merges per worker, 2 per part


def test_rerun_and_recollect_add_no_rows_and_a_killed_worker_resumes(tiny_study, parallel_run, tmp_path, capsys):
    db, args, parts = parallel_run["db"], parallel_run["args"], tmp_path / "parts"
    shutil.copytree(parallel_run["parts"], parts)
    finished = part_folders(parts)

    # re-running a worker computes nothing (its merges are stored); collecting again adds nothing
    assert main(["worker", "--worker", "0", "--workers", "2", "--parts", parts, *args]) == 0
    assert "0 merges computed, 8 already stored or in parts" in capsys.readouterr().out
    assert part_folders(parts) == finished
    shutil.copytree(finished[0], parts / "worker-0-of-2" / "chunk-copied")  # overlapping parts
    assert main(["collect", "--parts", parts, "--db", db]) == 0
    assert "0 merges and 0 merge evaluations added" in capsys.readouterr().out
    assert query_db(db, "SELECT count(*), count(DISTINCT (merge_id, task)) FROM merge_results") == [(36, 36)]

    # a worker killed before its last part: only the missing merges are recomputed, from the parts alone
    fresh_db, fresh_args = emptied_study(tiny_study, tmp_path / "fresh")
    lost = part_folders(parts)[-1]
    n_lost = len(duckdb.connect().execute(f"SELECT * FROM read_parquet('{lost}/merges.parquet')").fetchall())
    shutil.rmtree(lost)
    (lost.parent / ".tmp-chunk-half-written").mkdir()  # what a kill leaves: a hidden folder
    worker = lost.parent.name.split("-")[1]
    assert main(["worker", "--worker", worker, "--workers", "2", "--parts", parts, *fresh_args]) == 0
    assert f"{n_lost} merges computed, {8 - n_lost} already stored or in parts" in capsys.readouterr().out
    assert not list(lost.parent.glob(".tmp-*"))
    assert query_db(fresh_db, "SELECT count(*) FROM merges") == [(0,)]  # workers never write the database
    assert main(["collect", "--parts", parts, "--db", fresh_db]) == 0
    assert "16 merges and 36 merge evaluations added" in capsys.readouterr().out
    assert_same_results(query_db(fresh_db, RESULTS), query_db(tiny_study["db"], RESULTS))


def test_bad_parts_and_splits_name_the_problem(tiny_study, tmp_path, capsys):
    db, args = emptied_study(tiny_study, tmp_path)
    parts = tmp_path / "parts"
    assert main(["collect", "--parts", tmp_path / "nowhere", "--db", db]) == 2
    assert "parts folder" in capsys.readouterr().err
    parts.mkdir()
    assert main(["collect", "--parts", parts, "--db", db]) == 2
    assert "no finished parts" in capsys.readouterr().err
    assert main(["worker", "--worker", "2", "--workers", "2", "--parts", parts, *args]) == 2
    assert "--worker must be between 0 and 1" in capsys.readouterr().err
    assert main(["run", "--workers", "0", "--parts", parts, *args]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err

    assert main(["worker", "--worker", "0", "--workers", "8", "--parts", parts, *args]) == 0
    part = part_folders(parts)[0]
    (part / "merge_evaluations.parquet").write_bytes(b"not parquet")
    assert main(["collect", "--parts", parts, "--db", db]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # above it only progress bars
    assert last.startswith("error: ") and "merge_evaluations.parquet is not a readable part file" in last
    assert query_db(db, "SELECT count(*) FROM merges") == [(0,)]  # nothing half-collected
    (part / "merges.parquet").write_bytes(b"not parquet")
    assert main(["worker", "--worker", "1", "--workers", "8", "--parts", parts, *args]) == 2  # workers read parts too
    assert "merges.parquet is not a readable part file" in capsys.readouterr().err
