"""The reliability set, run on this checkout: hostile uploads and values, a bounded upload folder, concurrent
visitors, kill -9 in every stage of a run, readers during a run, and a run with nothing to do.

    OMP_NUM_THREADS=1 python scripts/reliability.py [--out FOLDER] [--only crafted,hostile,disk,load,kill,noop]

Run it with nothing else on the machine: it prints figures (seconds, percentiles, megabytes), and a figure taken
beside other work is not a measurement. Everything it writes goes under --out (default: a new temporary
folder); the checkout's own results.duckdb and artifacts are only read (the last section checks that a plain
`python training/run_all.py` leaves `git status` as it was).

Sections:
- crafted: `python -m demo.crafted`: how long `load_image` takes on each crafted file (median of 3).
- hostile: the demo (its own process, on the committed study) sent values of the wrong type to every event,
  crafted files through gradio_client, and requests Gradio itself fails on; printed: answers that were not a
  clean refusal, log lines per refusal, tracebacks in the server's log.
- disk: 50 uploads of 8 MB sent to the upload route (400 MB); printed: the most the upload folder held and what
  it holds 5 s later (the janitor's cap is 256 MB).
- load: `demo/load_test.py` with 50 and with 100 simultaneous clients.
- kill: `run_all --quick` once uninterrupted (the reference), then on a second file four runs each killed with
  SIGKILL half-way through the next stage (train, merge, findings, bench) and a last run to the end, while a
  reader queries the file every 0.2 s; printed: whether the last file holds exactly the reference's models,
  merges (and their accuracies), similarities, findings and benchmark sections (the primary keys forbid
  duplicates), whether temporary folders were left, and how many reads failed.
- noop: `python training/run_all.py` on the committed results: seconds, and whether `git status` changed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlvision.config import STAGES  # run_all's stages, in order (a key of ENDED each)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# The line each of run_all's stages prints when it ends (study/run_all.py), so the next stage has begun.
ENDED = {
    "train": "training:", "merge": "merge sweep:", "findings": "findings:", "plan": "merge plans:",
    "bench": "benchmarks:",
}  # fmt: skip


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def crafted() -> None:
    section("crafted files: load_image time (median of 3)")
    subprocess.run([PYTHON, "-m", "demo.crafted", "--repeats", "3"], cwd=REPO, check=True)


def start_demo(out: Path, name: str) -> tuple[subprocess.Popen, str, Path, Path]:
    """The demo on the committed study in its own process with its own Gradio upload folder."""
    from demo.load_test import start_server

    uploads = out / f"{name}_gradio"
    uploads.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)  # inherited by the server
    log = out / f"{name}_server.log"
    process, url = start_server("", log, 600)
    return process, url, log, uploads


def hostile(out: Path) -> None:
    import httpx
    from gradio_client import Client, handle_file

    from demo.crafted import write_crafted
    from demo.load_test import make_images, stop_server

    section("hostile values, requests and crafted files through the demo")
    process, url, log, _ = start_demo(out, "hostile")
    try:
        client = Client(url, verbose=False, ssl_verify=False)
        good = handle_file(str(make_images(out)[0]))
        values = [
            (good, "mnist", "auto", False),
            (good, [1, 2], "auto", False),
            (good, ["no_such_task"], "auto", False),
            (good, [], 123, False),
            (good, [], "a" * 100_000, False),
            (good, [], "auto", "yes"),
            (None, [], "auto", False),
        ]
        unclean = 0
        answers = 0
        for args in values:
            answer = client.predict(*args, api_name="/predict")
            answers += 1
            unclean += not (isinstance(answer, dict) and answer.get("ok") is False and answer.get("error"))
        for rank in ("abc", 10**9, -1, 2.5e300):
            zip_path, line = client.predict([], "auto", rank, api_name="/export_merged")
            answers += 1
            unclean += zip_path is not None
        crafted_files = write_crafted(out / "crafted")
        for path in crafted_files.values():
            answer = client.predict(handle_file(str(path)), [], "auto", False, api_name="/predict")
            answers += 1
            unclean += not (isinstance(answer, dict) and answer.get("ok") is False)
        http = httpx.Client(base_url=url, timeout=30)
        raw = [
            http.post("gradio_api/queue/join", json={"data": [], "fn_index": 999, "session_hash": "abcde"}),
            http.post("gradio_api/queue/join", json={"data": [1], "fn_index": 0, "trigger_id": 1, "session_hash": "x"}),
            http.post("gradio_api/upload", content=b"garbage", headers={"content-type": "multipart/form-data; b=z"}),
            http.get("gradio_api/file=/etc/passwd"),
        ]
        try:
            http.get("gradio_api/queue/data", params={"session_hash": "nobody"}, timeout=5)
        except httpx.HTTPError:
            pass
        time.sleep(2)
        still = client.predict(good, [], "auto", False, api_name="/predict")
    finally:
        stop_server(process)
    text = log.read_text(errors="replace")
    print(f"  {answers} bad values and crafted files: {unclean} answered other than with a clean refusal")
    print(f"  raw requests: HTTP {', '.join(str(r.status_code) for r in raw)}; a good prediction after: {still['ok']}")
    print(f"  server log: {text.count('[demo] refused')} '[demo] refused' lines, {text.count('Traceback')} tracebacks")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def disk(out: Path) -> None:
    import httpx

    from demo.load_test import stop_server

    section("upload folder under 50 uploads of 8 MB (400 MB)")
    process, url, _, uploads = start_demo(out, "disk")
    most = 0
    try:
        before = folder_bytes(uploads)
        for index in range(50):
            data = os.urandom(8 * 2**20)
            response = httpx.post(url + "gradio_api/upload", files=[("files", (f"u{index}.png", data, "image/png"))])
            response.raise_for_status()
            most = max(most, folder_bytes(uploads) - before)
        time.sleep(5)
        after = folder_bytes(uploads) - before
    finally:
        stop_server(process)
    print(f"  most held while uploading: {most / 2**20:.0f} MB; 5 s after the last: {after / 2**20:.0f} MB")


def load() -> None:
    section("concurrent visitors (demo/load_test.py)")
    for n in (50, 100):
        run = subprocess.run([PYTHON, "demo/load_test.py", "--n", str(n)], cwd=REPO, capture_output=True, text=True)
        keep = [line for line in run.stdout.splitlines() if re.search(r"n: |latency|CPU used|load average", line)]
        print("\n".join(keep), flush=True)


def run_all_command(db: Path, artifacts: Path) -> list[str]:
    db.parent.mkdir(parents=True, exist_ok=True)
    return [PYTHON, "training/run_all.py", "--quick", "--db", str(db), "--artifacts", str(artifacts)]


def stored(db: Path) -> dict[str, list]:
    """What a finished study holds, for comparing runs (ids and figures, never timings)."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        return {
            "models": con.execute("SELECT model_id, accuracy FROM task_results ORDER BY ALL").fetchall(),
            "merges": con.execute("SELECT merge_id, task, merged_accuracy FROM merge_results ORDER BY ALL").fetchall(),
            "similarities": con.execute(
                "SELECT task_a, task_b, measure, seed, value FROM task_similarity ORDER BY ALL"
            ).fetchall(),
            "findings": con.execute("SELECT finding, statistic, value FROM findings ORDER BY ALL").fetchall(),
            "bench sections": con.execute("SELECT DISTINCT name FROM benchmarks ORDER BY ALL").fetchall(),
        }
    finally:
        con.close()


def reader(db: Path, stop: threading.Event, counts: dict) -> None:
    """Queries the file as the dashboard does (read-only, waiting for a writer) every 0.2 s."""
    from mlvision.store import Store

    while not stop.is_set():
        if db.exists():
            try:
                Store(db).query("SELECT count(*) FROM merge_results")
                counts["ok"] += 1
            except Exception as error:  # noqa: BLE001 - a failed read is the figure
                counts["failed"] += 1
                counts["last"] = str(error)[:200]
        stop.wait(0.2)


def timed_run(command: list[str], kill_stage: str | None = None, kill_after: float = 0.0) -> tuple[int, str, dict]:
    """Run `command`; with `kill_stage`, SIGKILL it `kill_after` s after that stage began. (exit, output, stage s)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, began, seconds = [], {"train": time.perf_counter()}, {}
    timer = None

    def arm(stage: str) -> None:
        nonlocal timer
        if stage == kill_stage:
            timer = threading.Timer(kill_after, lambda: process.send_signal(signal.SIGKILL))
            timer.start()

    arm("train")
    for line in process.stdout:
        output.append(line)
        for index, stage in enumerate(STAGES):
            if line.startswith(ENDED[stage]):
                seconds[stage] = time.perf_counter() - began[stage]
                if index + 1 < len(STAGES):
                    began[STAGES[index + 1]] = time.perf_counter()
                    arm(STAGES[index + 1])
    code = process.wait()
    if timer is not None:
        timer.cancel()
    return code, "".join(output), seconds


def leftovers(artifacts: Path) -> list[str]:
    """Temporary siblings of model folders (mlvision/models.py writes `.<name>.<random>` and renames it)."""
    return [str(p) for p in artifacts.rglob(".*")] if artifacts.exists() else []


def kill(out: Path) -> None:
    section("kill -9 in every stage of run_all --quick, with a reader querying every 0.2 s")
    reference_db, reference_artifacts = out / "reference" / "results.duckdb", out / "reference" / "artifacts"
    stop, counts = threading.Event(), {"ok": 0, "failed": 0}
    watcher = threading.Thread(target=reader, args=(reference_db, stop, counts), daemon=True)
    watcher.start()
    start = time.perf_counter()
    code, text, seconds = timed_run(run_all_command(reference_db, reference_artifacts))
    stop.set()
    watcher.join()
    print(
        f"  reference run: exit {code} in {time.perf_counter() - start:.0f} s; stages "
        + ", ".join(f"{s} {v:.0f} s" for s, v in seconds.items())
        + f"; reads during it: {counts['ok']} ok, {counts['failed']} failed"
    )
    if code != 0:
        print(text[-2000:])
        return
    reference = stored(reference_db)
    # One file killed in each stage in turn: run 1 is killed half-way through training, run 2 (which finishes the
    # training) half-way through the merge sweep, and so on; a last run finishes. Then it must equal the reference.
    db, artifacts = out / "killed" / "results.duckdb", out / "killed" / "artifacts"
    stop, counts = threading.Event(), {"ok": 0, "failed": 0}
    watcher = threading.Thread(target=reader, args=(db, stop, counts), daemon=True)
    watcher.start()
    for stage in STAGES:
        code, text, _ = timed_run(run_all_command(db, artifacts), stage, seconds[stage] / 2)
        print(f"  run killed half-way through {stage}: exit {code} ({-code if code < 0 else 'not'} by a signal)")
    resumed, text, _ = timed_run(run_all_command(db, artifacts))
    stop.set()
    watcher.join()
    again = stored(db) if resumed == 0 else {}
    print(
        f"  last run: exit {resumed}; equal to the reference: "
        + ", ".join(f"{name} {'yes' if again.get(name) == rows else 'NO'}" for name, rows in reference.items())
        + f"; temporary files left: {len(leftovers(artifacts))}; reads during the runs: {counts['ok']} ok, "
        f"{counts['failed']} failed"
    )
    if resumed != 0:
        print(text[-2000:])


def noop() -> None:
    section("python training/run_all.py on the committed results (nothing should be new)")
    before = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    start = time.perf_counter()
    run = subprocess.run([PYTHON, "training/run_all.py"], cwd=REPO, capture_output=True, text=True)
    after = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    print(f"  exit {run.returncode} in {time.perf_counter() - start:.0f} s; git status unchanged: {before == after}")
    print("  " + "\n  ".join(run.stdout.strip().splitlines()[-6:]))


SECTIONS = {"crafted": crafted, "hostile": hostile, "disk": disk, "load": load, "kill": kill, "noop": noop}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where everything is written (default: a temp folder)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections (default: all)")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        print(f"error: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="mlv_reliability_"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"reliability set on {REPO} (writing under {out}); load average before: {os.getloadavg()[0]:.1f}")
    for name in chosen:
        if name in ("crafted", "load", "noop"):
            SECTIONS[name]()
        else:
            SECTIONS[name](out)
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
