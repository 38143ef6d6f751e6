"""The benchmark options: one dataclass and the CLI flags built from it (shared by run_all and the bench command)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch

from benchmarks.sections import SECTIONS
from mlvision.errors import MLVisionError

SECTION_NAMES = tuple(SECTIONS)  # in the order the stage measures them


@dataclass(frozen=True)
class BenchConfig:
    sections: tuple[str, ...] = SECTION_NAMES
    repeats: int = 20  # timed runs per inference figure (after `warmup` untimed ones)
    warmup: int = 3
    batch_sizes: tuple[int, ...] = (1, 64)
    max_k: int | None = None  # None = the study's max_k (largest merged group)
    train_steps: int = 20  # timed optimiser steps per training variant
    merge_repeats: int = 3  # timed merges per (method, k)
    device: str = "auto"
    image_size: int | None = None  # None = the study's; inference and training can run at another size
    again: bool = False  # measure settings already stored for this machine, replacing them


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmarks (the bench stage; python -m training.bench)")
    group.add_argument("--bench-sections", nargs="+", choices=SECTION_NAMES, help="sections to measure (default: all)")
    group.add_argument(
        "--bench-repeats", type=int, help="timed runs per inference figure, after 3 warm-up runs (default: 20)"
    )
    group.add_argument("--bench-batch-sizes", nargs="+", type=int, help="inference batch sizes (default: 1 64)")
    group.add_argument(
        "--bench-max-k",
        type=int,
        help="largest number of tasks served / adapters merged (default: the study's --max-k)",
    )
    group.add_argument("--bench-train-steps", type=int, help="timed optimiser steps per training variant (default: 20)")
    group.add_argument("--bench-merge-repeats", type=int, help="timed merges per method and k (default: 3)")
    group.add_argument(
        "--bench-image-size",
        type=int,
        help="image size for the inference and training sections "
        "(default: the study's --image-size; the adapters are reused as trained)",
    )
    group.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="where to measure (default: auto = cuda if available)"
    )
    group.add_argument(
        "--again", action="store_true", help="measure again settings already stored for this machine (replacing them)"
    )


def bench_config_from_args(args: argparse.Namespace) -> BenchConfig:
    names = {
        "bench_sections": "sections",
        "bench_repeats": "repeats",
        "bench_batch_sizes": "batch_sizes",
        "bench_max_k": "max_k",
        "bench_train_steps": "train_steps",
        "bench_merge_repeats": "merge_repeats",
        "bench_image_size": "image_size",
        "device": "device",
    }
    changes = {
        field: (tuple(value) if isinstance(value, list) else value)
        for option, field in names.items()
        if (value := getattr(args, option, None)) is not None
    }
    config = replace(BenchConfig(), again=bool(getattr(args, "again", False)), **changes)
    if min(config.repeats, config.train_steps, config.merge_repeats, config.max_k or 1, config.image_size or 1) < 1:
        raise MLVisionError(
            "--bench-repeats, --bench-train-steps, --bench-merge-repeats, --bench-max-k and "
            "--bench-image-size must be >= 1"
        )
    if any(size < 1 for size in config.batch_sizes):
        raise MLVisionError(f"--bench-batch-sizes must be >= 1, got {list(config.batch_sizes)}")
    return config


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise MLVisionError("--device cuda: no CUDA device is visible to torch here; use --device cpu (or auto)")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name if name != "auto" else "cpu")
