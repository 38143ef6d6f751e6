"""Load test for the demo: N simultaneous `gradio_client` predictions, the way N visitors arrive at once.

    OMP_NUM_THREADS=1 python demo/load_test.py [--n 100] [--db results.duckdb] [--url http://127.0.0.1:7860/]

Without --url the script starts `python demo/app.py` itself on 127.0.0.1 with a free port (a separate
process, so the clients' threads do not share the server's interpreter) and stops it afterwards.
Only loopback addresses are accepted: this is a tool for one's own machine, not for someone else's
server.

Each of the N threads makes its own `Client` with the client's default settings (its default time-outs,
which is what a visitor's script gets; the "Loaded as API" printing and, unless --verify-tls, certificate
checks are turned off: the URL is plain http on loopback, and with checks on gradio_client loads the CA
bundle for each of its httpx clients, about 50 ms of CPU per upload, queue join and event stream, which on
these 2 cores took 21.7 s of CPU for 100 predictions and set a 13 s floor that is the clients' cost, not the
server's), waits at a barrier, then sends one prediction at the same moment as the others. Several distinct small PNGs
(about 3 KB, made here) are used, so a batch mixes images, and every answer is checked against the
answer for the same image asked alone afterwards: a batched answer that came back for the wrong
image counts as a failure.

Printed: n, failures (with their first reasons), p50 / p95 / max latency of the predictions, the CPU
seconds the clients and the server used meanwhile, the server's settings (the line the app prints at
start-up), the machine (cores, torch threads) and the load average before the run. The CPU line is
there because the clients share the machine with the server and are not free: gradio_client makes a
new httpx client (which loads the CA bundle) for the upload, the queue and the event stream of every
prediction, so 50 simultaneous clients cost several CPU seconds in this process alone.
Figures taken while other work runs on the machine are not measurements.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SETTINGS_PREFIX = "[demo] settings:"  # the line demo/app.py prints at start-up
N_IMAGES = 5
TARGET_P95_S = 5.0


def is_loopback(url: str) -> bool:
    """Whether `url` points at this machine (127.0.0.0/8, ::1 or localhost): the only targets allowed."""
    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(folder: Path) -> list[Path]:
    """A few distinct, deterministic small PNGs (about 3 KB each): stripes and blocks of different colours."""
    import numpy as np
    from PIL import Image

    paths = []
    for index in range(N_IMAGES):
        rng = np.random.default_rng(index)
        base = rng.integers(0, 256, size=(1, 1, 3))
        pixels = np.zeros((40, 40, 3), dtype=np.int64) + base
        pixels[:, index * 6 : index * 6 + 10] = 255 - base  # a stripe that moves with the index
        pixels += rng.integers(0, 24, size=(40, 40, 3))  # a little noise so PNG cannot squeeze it to nothing
        path = folder / f"load_{index}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(path)
        paths.append(path)
    return paths


def start_server(db: str, log_path: Path, seconds: float) -> tuple[subprocess.Popen, str]:
    """`python demo/app.py` on 127.0.0.1 and a free port; returns (process, url) once it answers HTTP."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, str(REPO_ROOT / "demo" / "app.py"), "--host", "127.0.0.1", "--port", str(port)]
    if db:
        command += ["--db", db]
    with open(log_path, "w") as log:  # the child keeps its own handle; the log is read back by name
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: the demo exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return process, url
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"error: the demo did not answer within {seconds:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def server_settings(log_path: Path | None) -> str:
    if log_path is None:
        return "unknown (a server given by --url; start it with demo/app.py to see its settings line)"
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith(SETTINGS_PREFIX):
            return line[len(SETTINGS_PREFIX) :].strip()
    return "not printed by the server (an older demo/app.py?)"


def make_client(url: str, verify: bool):
    """A gradio_client Client as a visitor's script makes it, but with certificate checks off unless `verify`: the URL
    is plain http on loopback (nothing to check), and with them on gradio_client loads the CA bundle for each of its
    httpx clients (one per upload, queue join and event stream: about 50 ms of CPU each here, 2 ms without)."""
    from gradio_client import Client

    return Client(url, verbose=False, ssl_verify=verify)


def ask(client, image: Path, tasks: list[str], method: str) -> dict:
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)), tasks, method, False, api_name="/predict")


def top_labels(answer: dict) -> dict:
    return {task: [label for label, _ in top] for task, top in answer["predictions"].items()}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time (user + system) used so far by this process, or by process `pid` (Linux /proc); None if unknown."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run(
    url: str, n: int, images: list[Path], tasks: list[str], method: str, server_pid: int | None, verify: bool = False
) -> dict:
    """N threads, each its own Client; all predict at once.

    Returns latencies (s) of the answered predictions, failure reasons, and the CPU seconds the
    clients (this process) and the server used from the moment all N asked until the last answer.
    """
    marks: dict[str, float | None] = {}

    def server_cpu() -> float | None:
        return cpu_seconds(server_pid) if server_pid is not None else None

    def all_ready() -> None:  # run by the barrier once, when every thread has its Client
        marks.update(wall=time.perf_counter(), client_cpu=cpu_seconds(), server_cpu=server_cpu())

    barrier = threading.Barrier(n, action=all_ready)
    latencies: list[float | None] = [None] * n
    failures: list[str] = []
    answers: list[tuple[int, dict] | None] = [None] * n
    lock = threading.Lock()

    def fail(reason: str) -> None:
        with lock:
            failures.append(reason)

    def visitor(index: int) -> None:
        client = None
        try:
            client = make_client(url, verify)
        except Exception as error:  # noqa: BLE001 - a failure to connect is one of the figures
            fail(f"client start: {type(error).__name__}: {error}")
        try:
            barrier.wait(timeout=300)
        except threading.BrokenBarrierError:
            pass
        if client is None:
            return
        image_index = index % len(images)
        start = time.perf_counter()
        try:
            answer = ask(client, images[image_index], tasks, method)
            elapsed = time.perf_counter() - start
            if not isinstance(answer, dict) or not answer.get("ok"):
                fail(f"answer not ok: {answer.get('error') if isinstance(answer, dict) else answer!r}")
                return
            latencies[index] = elapsed
            answers[index] = (image_index, answer)
        except Exception as error:  # noqa: BLE001
            fail(f"predict: {type(error).__name__}: {error}")
        finally:
            client.close()

    threads = [threading.Thread(target=visitor, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    end_wall, end_client, end_server = time.perf_counter(), cpu_seconds(), server_cpu()
    for thread in threads:
        if thread.is_alive():
            fail("no answer within 600 s")

    # Each answer must be the answer for its own image (a batch must not mix rows up).
    alone = make_client(url, verify)
    expected = {i: top_labels(ask(alone, image, tasks, method)) for i, image in enumerate(images)}
    alone.close()
    for item in answers:
        if item is not None and top_labels(item[1]) != expected[item[0]]:
            fail(f"wrong answer for image {item[0]} (differs from the same image asked alone)")

    def spent(key: str, end: float | None) -> float | None:
        return None if end is None or marks.get(key) is None else end - marks[key]

    return {
        "latencies": [v for v in latencies if v is not None],
        "failures": failures,
        "wall": spent("wall", end_wall),
        "client_cpu": spent("client_cpu", end_client),
        "server_cpu": spent("server_cpu", end_server),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50, help="simultaneous predictions (threads), default 50")
    parser.add_argument("--url", default=None, help="a running demo on a loopback address (default: start one)")
    parser.add_argument("--db", default=None, help="results database for the started server (default: the app's)")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for the server")
    parser.add_argument(
        "--verify-tls",
        action="store_true",
        help="keep gradio_client's certificate checks on (its default): it then loads the CA bundle for every upload, "
        "queue join and event stream (about 50 ms of CPU each here), a cost each visitor's own machine pays, which "
        "on 2 shared cores competes with the server; off by default (the URL is plain http on loopback)",
    )
    args = parser.parse_args(argv)
    if args.url is not None and not is_loopback(args.url):
        print(f"error: {args.url} is not a loopback address; this script only loads 127.0.0.1 / ::1 / localhost")
        return 2

    import torch

    load_before = os.getloadavg()  # before this script adds its own load
    folder = Path(tempfile.mkdtemp(prefix="mlv_load_test_"))
    images = make_images(folder)
    log_path = None
    process = None
    try:
        if args.url is None:
            log_path = folder / "server.log"
            process, url = start_server(args.db, log_path, args.start_timeout)
        else:
            url = args.url
        verify = args.verify_tls
        warm = make_client(url, verify)  # one request first: the default merge is built before the clock runs
        tasks: list[str] = []  # [] = every task the server has
        first = ask(warm, images[0], tasks, args.method)
        warm.close()
        if not first.get("ok"):
            print(f"error: the warm-up prediction failed: {first.get('error')}")
            return 1
        result = run(url, args.n, images, tasks, args.method, process.pid if process is not None else None, verify)
    except Exception:  # noqa: BLE001 - print what went wrong, then stop the server we started
        traceback.print_exc()
        return 1
    finally:
        if process is not None:
            stop_server(process)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    latencies, failures = result["latencies"], result["failures"]
    checks = "on" if args.verify_tls else "off"
    print(
        f"demo load test: {args.n} simultaneous gradio_client predictions against {url} (certificate checks {checks})"
    )
    print(f"  n: {args.n}; answered: {len(latencies)}; failures: {len(failures)}")
    for reason in sorted(set(failures))[:5]:
        print(f"    {failures.count(reason)} x {reason[:300]}")
    if latencies:
        print(
            f"  latency (s), from the moment all {args.n} ask at once: p50 {statistics.median(latencies):.2f}, "
            f"p95 {percentile(latencies, 95):.2f}, max {max(latencies):.2f}"
        )
    if latencies:
        met = not failures and percentile(latencies, 95) <= TARGET_P95_S
        print(
            f"  target (0 failures, p95 <= {TARGET_P95_S:.0f} s with up to 100 clients on 2 quiet cores): "
            f"{'met' if met else 'NOT met'} in this run"
        )
    cpu = f"  CPU used from 'all ask' to the last answer ({result['wall']:.2f} s): clients (this process, one GIL) "
    cpu += f"{result['client_cpu']:.2f} s"
    cpu += f", server {result['server_cpu']:.2f} s" if result["server_cpu"] is not None else ", server unknown (--url)"
    print(cpu)
    if result["client_cpu"] is not None and result["wall"] and result["client_cpu"] >= 0.8 * result["wall"]:
        print(
            "  the clients kept a core or more busy the whole time: their own cost (one GIL, a new httpx client "
            "per upload, queue join and stream) sets a floor under these latencies, whatever the server does."
        )
    print(f"  server settings: {server_settings(log_path)}")
    print(
        f"  machine: {cores} cores usable ({os.cpu_count()} in all); this script's torch threads "
        f"{torch.get_num_threads()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        "load average before the run " + " / ".join(f"{v:.1f}" for v in load_before) + " (1 / 5 / 15 min)"
    )
    print(
        "  note: figures taken while other work runs on this machine are not measurements; "
        "the clients run on the same cores as the server."
    )
    if load_before[0] > 0.5 * (cores or 1):
        print(
            f"  warning: the load average before the run ({load_before[0]:.1f}) says other work was running: "
            "treat these figures as noise."
        )
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
