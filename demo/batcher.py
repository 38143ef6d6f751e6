"""The demo's request batcher: concurrent requests, one forward pass per model.

Kept apart from the service (demo/service.py) because it knows nothing of adapters or merges: it takes
`(model, images)` pairs from any number of caller threads and runs them on one worker thread, batched.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

BATCH_MAX = 16  # images in one forward pass at most (a pass of 16 costs far less than 16 passes of 1)
BATCH_WAIT_S = 0.005  # how long the first request of a batch waits for others to join it


@dataclass
class _Job:
    model: torch.nn.Module
    images: torch.Tensor  # [n, 3, S, S] on the CPU
    future: Future


class Batcher:
    """Runs the forward passes of concurrent requests on one worker thread, batched per model.

    Why: a forward pass of 16 images costs little more than one of 1 (on a CPU and on a GPU), while
    passes run one after the other make the 50th of 50 simultaneous visitors wait for 49 passes.
    A caller hands over `(model, images)` and waits for its rows; the worker takes the first waiting
    request, waits up to `wait_s` for more, then runs ONE pass per model (the merged model of one
    (tasks, method), or one task's own adapter) for up to `max_batch` of the requests that share it,
    and gives each request its rows. Only this thread runs forward passes, so passes never fight
    over the cores and the models need no lock; callers decode and preprocess in parallel.
    """

    def __init__(self, forward, max_batch: int = BATCH_MAX, wait_s: float = BATCH_WAIT_S):
        self._forward = forward  # (model, images) -> (logits per task, elapsed ms)
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.passes = 0  # forward passes run so far (for tests and the curious)
        self.largest = 0  # most requests in one pass so far
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="demo-batcher", daemon=True)
        self._thread.start()

    def submit(self, model: torch.nn.Module, images: torch.Tensor) -> Future:
        """Queue `images` for `model`; the future gives (logits per task for these rows, elapsed ms of the pass)."""
        job = _Job(model, images, Future())
        self._queue.put(job)
        return job.future

    def run(self, model: torch.nn.Module, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        return self.submit(model, images).result()

    def _gather(self) -> list[_Job]:
        """The first waiting job, plus those that arrive within `wait_s` of it or are waiting when it ends.

        Bounded without a cap: the callers wait for their answers, so no more jobs can be waiting than
        there are callers (the app's concurrency limit) times the passes one request asks for.
        """
        jobs = [self._queue.get()]
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return jobs

    def _loop(self) -> None:
        while True:
            by_model: dict[int, list[_Job]] = {}
            for job in self._gather():
                by_model.setdefault(id(job.model), []).append(job)
            for jobs in by_model.values():
                for start in range(0, len(jobs), self.max_batch):
                    self._run(jobs[start : start + self.max_batch])

    def _run(self, jobs: list[_Job]) -> None:
        """One forward pass for `jobs` (same model); each job's future gets its own rows, or the error."""
        try:
            logits, elapsed = self._forward(jobs[0].model, torch.cat([job.images for job in jobs]))
        except Exception as error:  # noqa: BLE001 - the callers see the error; the worker keeps serving
            for job in jobs:
                job.future.set_exception(error)
            return
        self.passes += 1
        self.largest = max(self.largest, len(jobs))
        row = 0
        for job in jobs:
            rows = len(job.images)
            job.future.set_result(({task: value[row : row + rows] for task, value in logits.items()}, elapsed))
            row += rows


__all__ = ["BATCH_MAX", "BATCH_WAIT_S", "Batcher"]
