"""The demo answering one prediction on a device, as a visitor's request would: part of scripts/device_check.sh.

    python scripts/device_demo_check.py RESULTS_DB DEVICE

Starts `demo/app.py --device DEVICE` on a free port over RESULTS_DB's adapters, sends one image through the
named endpoint `predict` with gradio_client, prints where it ran and how long the forward pass took, and
stops the app. Exits 1 (one line) if the app does not start, the answer is an error, or it ran elsewhere.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
START_S = 300  # loading the adapters and calibrating every task, on a cold machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(db: str, device: str) -> int:
    port = free_port()
    command = [sys.executable, "demo/app.py", "--db", db, "--device", device, "--port", str(port)]
    app = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        started, lines = time.monotonic(), []
        for line in app.stdout:  # the app prints "[demo] ready: URL" once it serves
            lines.append(line.rstrip())
            if line.startswith("[demo] ready"):
                break
            if time.monotonic() - started > START_S:
                break
        if not lines or not lines[-1].startswith("[demo] ready"):
            print(f"error: the demo did not start on {device}: {' | '.join(lines[-3:])}", file=sys.stderr)
            return 1
        print(f"demo: started on {device} in {time.monotonic() - started:.1f} s")
        threading.Thread(target=lines.extend, args=(app.stdout,), daemon=True).start()  # keep the pipe drained
        from gradio_client import Client, handle_file

        image = Path(tempfile.mkdtemp()) / "check.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with duckdb.connect(db, read_only=True) as con:  # every task with an adapter: the demo's default choice
            tasks = [row[0] for row in con.execute("SELECT DISTINCT task FROM task_results ORDER BY task").fetchall()]
        try:
            answer = client.predict(handle_file(str(image)), tasks, "auto", False, api_name="/predict")
        except Exception as error:  # noqa: BLE001 - the app's own log says why
            tail = " | ".join(line.rstrip() for line in lines[-5:])
            print(f"error: the demo failed to answer ({type(error).__name__}); its log ends: {tail}", file=sys.stderr)
            return 1
        if not answer.get("ok") or answer.get("device") != device:
            print(
                f"error: the demo answered {answer.get('error') or 'on ' + str(answer.get('device'))}", file=sys.stderr
            )
            return 1
        print(
            f"demo: one forward pass for {len(answer['tasks'])} tasks took {answer['elapsed_ms']:.1f} ms on "
            f"{answer['device']} (method {answer['method']})"
        )
        return 0
    finally:
        app.terminate()
        app.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
