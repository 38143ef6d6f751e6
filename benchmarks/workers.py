"""What a benchmark's worker process runs first. Kept free of torch and the project's models, so a spawned
worker (and its test) starts in a fraction of a second."""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent() -> None:
    """In a worker process: exit as soon as the process that started it is gone (killed with SIGKILL, say).

    Why: a spawned worker outlives its parent otherwise, holding the parent's output pipe open and the
    cores busy (seen when `run_all` was killed with -9 during the bench stage). A thread watches the parent's
    id; a reparented process has a new one."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


__all__ = ["exit_with_parent"]
