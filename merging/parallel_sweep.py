"""Split the merge sweep across worker processes or machines, then load their results in one step.

    python -m merging.parallel_sweep run --workers 4 --parts runs/parts [study options]
    python -m merging.parallel_sweep worker --worker 0 --workers 4 --parts DIR [study options]
    python -m merging.parallel_sweep collect --parts DIR [DIR ...] [--db results.duckdb]

`run` starts N local workers and collects when they finish; on several machines, start
`worker --worker I --workers N` on each (same study options, a copy of results.duckdb and the
adapters), gather their part folders in one place and `collect` once.

Why it works this way:
- DuckDB allows one writer per file, so workers never write results.duckdb: they only read it
  (read-only) for the trained models and the merges stored already, and write their rows to Parquet
  part files of their own. `collect`, the one writer, loads every part in one transaction.
- Worker I of N takes every N-th item of the sweep plan ordered by merge_id (a hash, so every share
  mixes methods and group sizes and the shares come out even). A share depends only on the study
  configuration, never on what is stored, so workers started at different times, or on machines with
  different copies of the database, never overlap and never miss a merge.
- A worker skips merges already in results.duckdb or in any finished part under the parts folder, so a
  re-run or killed worker continues where it stopped. Parts are written a few merges at a time into a
  hidden folder that is then renamed into place (atomic), so a kill never leaves half a part.
- `collect` inserts with the store's key-based skip, so collecting twice, or parts that overlap, adds
  no duplicate rows; a corrupt part stops it with nothing written.
- Each worker loads the adapters and scores the baselines itself (seconds): the price of sharing
  nothing but files. The adapters' update norms (table adapter_updates) go into the first part a
  worker run writes; `collect` skips those stored already, like every row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import duckdb

from mlvision.errors import MLVisionError, run_cli

PART_GLOB = "worker-*/chunk-*"  # finished parts; folders being written are hidden (".tmp-chunk-...")


class PartsError(MLVisionError):
    """A parts folder, part file or worker split that cannot be used."""


# -- part files ----------------------------------------------------------------------------------
def find_parts(folders: list[Path]) -> list[Path]:
    """The finished part folders (one chunk of merges each) under the given parts folders."""
    for folder in folders:
        if not folder.is_dir():
            raise PartsError(f"parts folder {folder} does not exist: pass the --parts folder the workers wrote to")
    return sorted(part for folder in folders for part in folder.glob(PART_GLOB) if part.is_dir())


def read_part(con, part: Path, table: str) -> list[dict]:
    """The rows of one table in one part folder, as dicts (JSON columns as their JSON text)."""
    path = part / f"{table}.parquet"
    try:
        cursor = con.execute("SELECT * FROM read_parquet(?)", [str(path)])
        columns = [column[0] for column in cursor.description]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]
    except duckdb.Error as error:
        raise PartsError(
            f"{path} is not a readable part file ({str(error).splitlines()[0]}): delete the folder "
            f"{part} and run its worker again (it recomputes only what is missing)"
        ) from None


def write_part(folder: Path, merges: list, updates: list[dict] = ()) -> Path:
    """Write the rows of some merges (MergeRows), and any adapter update norms (`MergeSweep.update_rows`),
    as one part folder, which appears only once complete."""
    from merging.sweep import TABLE_KEYS, insert_rows, save_rows
    from mlvision.store import Store

    temp = folder / f".tmp-chunk-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    temp.mkdir(parents=True)
    with Store(":memory:").write() as con:  # the store's own tables, in memory: parts keep its schema
        for rows in merges:
            save_rows(con, rows)
        insert_rows(con, "adapter_updates", list(updates))
        for table in TABLE_KEYS:
            target = str(temp / f"{table}.parquet").replace("'", "''")
            con.execute(f"COPY {table} TO '{target}' (FORMAT parquet)")
    final = folder / temp.name.removeprefix(".tmp-")
    os.replace(temp, final)
    return final


def part_merge_ids(folder: Path) -> set[str]:
    """merge_ids in the finished parts under a parts folder (every worker's)."""
    con = duckdb.connect()
    try:
        return {row["merge_id"] for part in find_parts([folder]) for row in read_part(con, part, "merges")}
    finally:
        con.close()


# -- worker --------------------------------------------------------------------------------------
def check_split(worker: int | None, workers: int, chunk_size: int = 1) -> None:
    if workers < 1:
        raise PartsError(f"--workers must be at least 1, got {workers}")
    if worker is not None and not 0 <= worker < workers:
        raise PartsError(f"--worker must be between 0 and {workers - 1} for --workers {workers}, got {worker}")
    if chunk_size < 1:
        raise PartsError(f"--chunk-size must be at least 1, got {chunk_size}")


def worker_share(sweep, worker: int, workers: int) -> list:
    """Worker `worker`'s items of the sweep plan: every `workers`-th, ordered by merge_id."""
    from merging.sweep import sweep_plan

    return sorted(sweep_plan(sweep.config), key=lambda item: sweep.merge_id(*item))[worker::workers]


def run_worker(config, worker: int, workers: int, parts: Path, chunk_size: int) -> dict:
    """Compute this worker's share of the sweep that is not stored or in parts yet, into Parquet parts."""
    from tqdm.auto import tqdm

    from merging.sweep import MergeSweep, stored_merge_ids
    from mlvision.store import Store

    check_split(worker, workers, chunk_size)
    store = Store(config.db)  # only ever read
    folder = parts / f"worker-{worker}-of-{workers}"
    done = stored_merge_ids(store)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-chunk-*"):  # left by a killed run of this worker
        shutil.rmtree(stale)
    done |= part_merge_ids(parts)
    sweep = MergeSweep(config, store)
    share = worker_share(sweep, worker, workers)
    todo = sweep.missing(share, done)
    sweep.prepare(todo)
    updates = sweep.update_rows()  # go into this run's first part (collect skips those stored already)
    with tqdm(total=len(todo), desc=f"worker {worker} of {workers}", unit="merge", position=worker) as bar:
        for start in range(0, len(todo), chunk_size):
            merges = []
            for item in todo[start : start + chunk_size]:
                merges.append(sweep.compute(*item))
                bar.update()
            write_part(folder, merges, updates)
            updates = []
    return {"merged": len(todo), "skipped": len(share) - len(todo), "folder": folder}


# -- collect -------------------------------------------------------------------------------------
def collect(folders: list[Path], store) -> dict:
    """Load every finished part into the store in one transaction; stored keys are skipped."""
    from tqdm.auto import tqdm

    from merging.sweep import TABLE_KEYS, insert_rows

    parts = find_parts(folders)
    if not parts:
        raise PartsError(f"no finished parts under {', '.join(map(str, folders))}: run the workers first")
    store.initialise()
    counts = {"parts": len(parts), "read": 0, **{table: 0 for table in TABLE_KEYS}}
    with store.write() as con:
        for part in tqdm(parts, desc="collect", unit="part"):
            for table in TABLE_KEYS:
                rows = read_part(con, part, table)
                counts["read"] += len(rows)
                try:
                    counts[table] += insert_rows(con, table, rows)
                except duckdb.Error as error:
                    raise PartsError(
                        f"{part / table}.parquet does not fit the {table} table of {store.path} "
                        f"({str(error).splitlines()[0]}): it was written by another version of the "
                        "code; delete it and run its worker again"
                    ) from None
    return counts


# -- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from mlvision.config import add_study_arguments
    from mlvision.paths import DEFAULT_DB_PATH

    parser = argparse.ArgumentParser(
        prog="python -m merging.parallel_sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "start N local workers, wait for them, then collect"),
        ("worker", "compute one worker's share of the sweep into Parquet parts"),
    ):
        command = commands.add_parser(name, help=text, description=text, allow_abbrev=False)
        if name == "worker":
            command.add_argument("--worker", type=int, required=True, metavar="I", help="this worker's index, 0..N-1")
        command.add_argument("--workers", type=int, required=True, metavar="N", help="how many workers share the sweep")
        command.add_argument("--parts", type=Path, required=True, metavar="DIR", help="folder for the Parquet parts")
        command.add_argument(
            "--chunk-size",
            type=int,
            default=4,
            metavar="M",
            help="merges per part file: at most this much work is lost when a worker is killed (default: 4)",
        )
        add_study_arguments(command)
    command = commands.add_parser(
        "collect",
        help="load the parts into results.duckdb",
        allow_abbrev=False,
        description="load every finished part into results.duckdb (rows stored already are skipped)",
    )
    command.add_argument("--parts", type=Path, nargs="+", required=True, metavar="DIR", help="parts folder(s)")
    command.add_argument(
        "--db", type=Path, default=DEFAULT_DB_PATH, help=f"results database (default: {DEFAULT_DB_PATH})"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    args = build_parser().parse_args(argv)
    return run_cli(
        lambda: COMMANDS[args.command](args, argv), "finished parts are kept; run the same command again to continue"
    )


def print_collected(counts: dict, db) -> None:
    from merging.sweep import TABLE_KEYS

    added = sum(counts[table] for table in TABLE_KEYS)
    print(
        f"collected {counts['parts']} parts: {counts['merges']} merges and {counts['merge_evaluations']} merge "
        f"evaluations added ({counts['adapter_updates']} adapter update norms), {counts['read'] - added} rows "
        f"already stored; results in {db}"
    )


def worker_command(args, argv) -> int:
    from merging.methods import list_methods
    from mlvision.config import config_from_args

    started = time.perf_counter()
    counts = run_worker(
        config_from_args(args, tuple(list_methods())), args.worker, args.workers, args.parts, args.chunk_size
    )
    print(
        f"worker {args.worker} of {args.workers}: {counts['merged']} merges computed, {counts['skipped']} already "
        f"stored or in parts; parts in {counts['folder']} ({time.perf_counter() - started:.0f} s)"
    )
    return 0


def collect_command(args, argv) -> int:
    from mlvision.store import Store

    print_collected(collect(args.parts, Store(args.db)), args.db)
    return 0


def run_command(args, argv) -> int:
    """Start the workers as subprocesses of this very module (argv[0] is "run"), then collect."""
    from merging.methods import list_methods
    from merging.sweep import check_methods, stored_merge_ids
    from mlvision.config import config_from_args
    from mlvision.store import Store

    config = config_from_args(args, tuple(list_methods()))
    check_split(None, args.workers, args.chunk_size)
    check_methods(config)
    stored_merge_ids(Store(config.db))  # a missing or unreadable database fails once, here
    script = [sys.executable, "-m", "merging.parallel_sweep", "worker"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # N workers share the cores
    workers = [subprocess.Popen([*script, "--worker", str(i), *argv[1:]], env=env) for i in range(args.workers)]
    try:
        codes = [worker.wait() for worker in workers]
    finally:
        for worker in workers:  # only still running when interrupted
            if worker.poll() is None:
                worker.terminate()
                worker.wait()
    failed = [i for i, code in enumerate(codes) if code]
    if failed:
        raise PartsError(
            f"worker(s) {', '.join(map(str, failed))} failed (see above); finished parts are kept in "
            f"{args.parts}: run the same command again to continue"
        )
    print_collected(collect([args.parts], Store(config.db)), config.db)
    return 0


COMMANDS = {"run": run_command, "worker": worker_command, "collect": collect_command}

if __name__ == "__main__":
    sys.exit(main())
