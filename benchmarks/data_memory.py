"""Memory of the training data pipeline at paper scale: one preprocessed tensor per split vs images streamed.

    python -m benchmarks.data_memory [--images 5000] [--image-size 224] [--repeats 3]

Builds (once, in the data cache, with progress) a local copy of a hub-shaped dataset: `--images` RGB images of
256x256 px (smooth colour fields with noise; stored as PNG, as `datasets` stores a PIL image) in a DatasetDict
(image + ClassLabel, train/validation/test) saved with `save_to_disk`, the shape `hub:<folder>` tasks are read in.
Then, each in a fresh process so peaks do not mix, reads its train split at the paper profile's size the two
ways mlvision/data.py offers and passes over it in batches of 128 (as adapter training and feature extraction do):
- `tensor`: `split_tensors`, one float32 tensor of the whole split (what the training stage held before);
- `streamed`: `LazyImages`, each batch decoded and preprocessed when asked for.
It prints the peak memory of the pass above what the process held when it began (sampled every 5 ms: allocated,
and resident with the dataset's memory-mapped pages; median of `--repeats` runs), the time of one pass, and the
ratio streamed / tensor. No figure here is asserted by a test; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

BATCH = 128


def dataset_folder(images: int) -> Path:
    from mlvision.paths import cache_dir

    return cache_dir() / "bench" / f"hub_shaped_{images}"


def build_dataset(images: int) -> Path:
    """The local hub-shaped copy (built once; an interrupted build leaves no folder, it is renamed into place)."""
    import datasets
    import numpy as np
    from PIL import Image

    folder = dataset_folder(images)
    if folder.exists():
        return folder
    rng = np.random.default_rng(0)
    classes = [f"class_{i}" for i in range(10)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})

    def split(n: int) -> datasets.Dataset:
        def rows():
            for i in range(n):
                # smooth colour fields with a little noise: neither blank nor incompressible noise
                base = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
                pixels = np.asarray(Image.fromarray(base).resize((256, 256), Image.BICUBIC), dtype=np.int16)
                pixels = np.clip(pixels + rng.integers(-12, 12, size=pixels.shape), 0, 255).astype(np.uint8)
                yield {"image": Image.fromarray(pixels), "label": i % len(classes)}

        return datasets.Dataset.from_generator(rows, features=features)

    dataset = datasets.DatasetDict({"train": split(images), "validation": split(100), "test": split(100)})
    partial = folder.with_name(folder.name + ".partial")
    dataset.save_to_disk(str(partial))
    partial.rename(folder)
    return folder


class RssSampler:
    """The process's memory sampled every 5 ms on a thread: the peaks of a stretch of work above what it held when it
    began, resident in all (`rss`) and anonymous (`anon` = resident minus file-backed pages: the memory the
    pipeline allocates; the dataset's memory-mapped Arrow pages it reads are file-backed and reclaimable). ru_maxrss
    would not do: it keeps the imports' peak, which a streamed pass stays under."""

    def __init__(self):
        self.process = psutil.Process()
        self.start = self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _now(self) -> tuple[float, float]:
        info = self.process.memory_info()
        return info.rss / 2**20, (info.rss - info.shared) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = tuple(map(max, self.peak, self._now()))

    def stop(self) -> dict[str, float]:
        """The peaks above the start, in MB: {"rss": ..., "anon": ...}."""
        self._stop.set()
        self._thread.join()
        self.peak = tuple(map(max, self.peak, self._now()))
        return {"rss": self.peak[0] - self.start[0], "anon": self.peak[1] - self.start[1]}


def measure(mode: str, folder: Path, images: int, image_size: int) -> dict:
    """One pass over the train split the `mode` way, in this process: peak memory above the baseline, seconds."""
    from mlvision.backbone import Preprocess
    from mlvision.data import LazyImages, split_tensors, subset_indices
    from mlvision.tasks import load_task

    preprocess = Preprocess(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    task = f"hub:{folder}"
    train = load_task(task)["train"]  # opening the Arrow files is part of the baseline, not of the pipeline
    sampler = RssSampler()
    start = time.perf_counter()
    if mode == "tensor":
        split, _ = split_tensors(task, "train", preprocess, images)
    else:
        split = LazyImages(train.select(subset_indices(len(train), images)), preprocess)
    checksum = 0.0
    for first in range(0, len(split), BATCH):
        checksum += float(split[first : first + BATCH].sum())  # every pixel read, as a pass of training would
    seconds = time.perf_counter() - start
    return {"mode": mode, **sampler.stop(), "seconds": seconds, "checksum": checksum}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="train images (the paper profile's max_train: 5000)")
    parser.add_argument("--image-size", type=int, default=224, help="the paper profile's image size: 224")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", choices=["tensor", "streamed"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, dataset_folder(args.images), args.images, args.image_size)))
        return 0
    print(f"building or reusing the hub-shaped dataset ({args.images} train images) ...", flush=True)
    folder = build_dataset(args.images)
    results = {"tensor": [], "streamed": []}
    for _ in range(args.repeats):
        for mode in results:  # alternating, so a slow spell of the machine hits both
            command = [sys.executable, "-m", "benchmarks.data_memory", "--measure", mode]
            command += ["--images", str(args.images), "--image-size", str(args.image_size)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    checksums = {mode: {round(r["checksum"], 1) for r in runs} for mode, runs in results.items()}
    size_mb = args.images * 3 * args.image_size**2 * 4 / 2**20
    print(f"{folder} ({args.images} images, {args.image_size} px; one float32 tensor of it: {size_mb:.0f} MB)")
    medians = {}
    for mode, runs in results.items():
        medians[mode] = {key: statistics.median(r[key] for r in runs) for key in ("anon", "rss", "seconds")}
        print(
            f"  {mode:8s}: peak memory of the pass {medians[mode]['anon']:6.0f} MB allocated "
            f"({medians[mode]['rss']:6.0f} MB resident with the mapped dataset pages), one pass "
            f"{medians[mode]['seconds']:.1f} s (median of {len(runs)})"
        )
    same = checksums["tensor"] == checksums["streamed"]
    ratio = {key: medians["streamed"][key] / medians["tensor"][key] for key in ("anon", "rss", "seconds")}
    print(
        f"  streamed / tensor: allocated {ratio['anon']:.3f}x, resident {ratio['rss']:.3f}x, "
        f"time {ratio['seconds']:.2f}x; same pixels: {same}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
