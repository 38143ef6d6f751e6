"""Timing and memory primitives for the benchmarks: device-aware clocks, interleaved runs, peaks.

Why these are hand-written: `torch.utils.benchmark.Timer` times one statement at a time, but the
ratios we report (merged model / plain backbone) need the variants *interleaved* in one loop, so
that drift of a shared machine (frequency scaling, a neighbour's job) hits every variant alike
and cancels in the ratio. On CUDA a kernel launch returns before the work is done, so every
clock reading is preceded by `torch.cuda.synchronize()`.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import threading
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (a no-op on CPU) so a clock reading means 'done'."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Milliseconds of each call over `repeats` rounds; each round runs every call once, in a rotated order.

    Rotation (round r starts at call r mod n) keeps any one variant from always following the
    same neighbour (cache state, allocator state).
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def median_p95(times_ms: list[float]) -> tuple[float, float]:
    """Median and 95th percentile (nearest rank) of a list of timings."""
    ordered = sorted(times_ms)
    rank = math.ceil(0.95 * len(ordered))  # 1-based nearest rank
    return statistics.median(ordered), ordered[rank - 1]


def _rss_bytes() -> int:
    import psutil  # a dependency of accelerate; pinned in requirements.txt

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    """Reset the kernel's record of this process's peak resident size to its current size (Linux: writing 5 to
    /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        _peak_rss_bytes()  # and the peak can be read back
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """The kernel's peak resident size of this process's memory since `_reset_peak_rss` (VmHWM of /proc/self/status).

    Not `getrusage`'s ru_maxrss: it is the larger of that and a figure the kernel keeps across exec, so in a
    process started by multiprocessing's spawn (fork, then exec) it never falls below the parent's size at the
    fork (680 MB under pytest), whatever is reset."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class PeakMemory:
    """Peak extra memory (MB) used inside a `with` block: device memory on CUDA, resident memory on CPU.

    CUDA: exact, from the caching allocator's peak counter. CPU: the kernel's own peak-resident counter
    (VmHWM), reset when the block starts, so the figure is the block's peak minus the size when
    it started, exact (no sampling can miss a short peak). Where the counter cannot be reset (not Linux), a
    thread samples the resident size every millisecond instead. Run it in a fresh process (see training/bench.py)
    so memory freed by earlier work is not reused and hidden.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device = device
        self.interval_s = interval_s
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif _reset_peak_rss():
            self._start = _rss_bytes()
        else:
            self._start = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is None:
            peak = max(_peak_rss_bytes(), _rss_bytes())
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_mb = (peak - self._start) / 2**20


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> dict:
    """What a benchmark figure depends on: stored with every row, and part of its identity."""
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
    }
