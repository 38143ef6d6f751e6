"""Real-browser helpers shared by the dashboard and demo tests: headless Chromium over DevTools.

Chromium's own --screenshot/--dump-dom do not wait for websocket-driven pages (Streamlit, Gradio),
so the tests drive the browser through the DevTools protocol and wait for the page to draw.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float, process: subprocess.Popen | None = None, expect: bytes | None = None) -> bytes:
    """The body at `url` once it answers (and equals `expect`, if given); fails if `process` dies first."""
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                body = reply.read()
                if expect is None or body.strip() == expect:
                    return body
        except OSError:
            pass
        assert process is None or process.poll() is None, f"process exited early: {process.args[0]}"
        assert time.time() < deadline, f"{url} did not answer in {seconds:.0f} s"
        time.sleep(0.3)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_chromium(profile: Path, window: str = "1400,1000") -> tuple[subprocess.Popen, int]:
    """Headless Chromium with remote debugging on a free port; fails (never skips) when it is missing."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it (`apt-get install -y chromium`) "
            "or point $CHROMIUM at a Chromium/Chrome binary"
        )
    port = free_port()
    browser = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            f"--window-size={window}",
            f"--remote-debugging-port={port}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{port}/json/version", 60, browser)
    return browser, port


class DevTools:
    """The smallest DevTools-protocol client: send a command, wait for its answer."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.socket = connect(ws_url, max_size=None, open_timeout=30)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, seconds: float, what: str):
        deadline = time.time() + seconds
        while not self.evaluate(expression):
            assert time.time() < deadline, f"{what} did not happen in {seconds:.0f} s"
            time.sleep(0.25)
