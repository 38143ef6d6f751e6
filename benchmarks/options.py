"""The benchmark options: one dataclass and the CLI flags built from it (shared by run_all and the bench command)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

import torch

from benchmarks.sections import SECTIONS
from mlvision.errors import MLVisionError
from mlvision.options import add_field_arguments, changes_from_args, check_values

SECTION_NAMES = tuple(SECTIONS)  # in the order the stage measures them


_WARMUP = 3  # untimed runs before the timed ones


@dataclass(frozen=True)
class BenchConfig:
    """What the bench stage measures: every field but `warmup` is an option (`add_bench_arguments`), declared once
    here with its help, its flag and its range (mlvision/options.py says what each metadata key means)."""

    sections: tuple[str, ...] = field(
        default=SECTION_NAMES,
        metadata={"help": "sections to measure", "flag": "--bench-sections", "choices": SECTION_NAMES, "unset": "all"},
    )
    # 10 timed rounds, not 20 (issue 31): the inference section's 20 rounds took 150 s of the default run from empty
    # (49 min 44 s against a 45-minute budget). Pilot (2026-12-06, alone, back to back): 10 rounds took 77 s, 20 took
    # 127 s; their ratios to the backbone differed by a median 2.8 % (batch 64: at most 8.9 %; batch 1, where one
    # call is milliseconds: up to 29 %). `--bench-repeats 20` measures as before.
    repeats: int = field(
        default=10,
        metadata={
            "help": f"timed runs per inference figure, after {_WARMUP} warm-up runs",
            "flag": "--bench-repeats",
            "at_least": 1,
        },
    )
    warmup: int = field(
        default=_WARMUP, metadata={"help": "untimed runs before the timed ones", "cli": False, "at_least": 0}
    )
    batch_sizes: tuple[int, ...] = field(
        default=(1, 64),
        metadata={"help": "inference batch sizes", "flag": "--bench-batch-sizes", "at_least": 1, "not_empty": True},
    )
    max_k: int | None = field(
        default=None,
        metadata={
            "help": "largest number of tasks served / adapters merged",
            "flag": "--bench-max-k",
            "unset": "the study's --max-k",
            "at_least": 1,
        },
    )
    train_steps: int = field(
        default=20,
        metadata={"help": "timed optimiser steps per training variant", "flag": "--bench-train-steps", "at_least": 1},
    )
    merge_repeats: int = field(
        default=3, metadata={"help": "timed merges per method and k", "flag": "--bench-merge-repeats", "at_least": 1}
    )
    device: str = field(
        default="auto",
        metadata={"help": "where to measure: auto = cuda if available", "choices": ("auto", "cpu", "cuda")},
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "image size for the inference and training sections",
            "flag": "--bench-image-size",
            "unset": "the study's --image-size; the adapters are reused as trained",
            "at_least": 1,
        },
    )
    again: bool = field(
        default=False,
        metadata={
            "help": "measure again settings already stored for this machine (replacing them)",
            "action": "store_true",
        },
    )

    def __post_init__(self):
        check_values(self)  # e.g. --bench-repeats 0: one line naming the option, before anything is measured


# A study profile's own benchmark defaults, where they differ from BenchConfig's. A quick run measures a quick bench
# (issue 31): with the default settings the bench took 97 s of the quick run's 155 s on 2 CPU cores (inference 33 s,
# evaluation 13 s, training 46 s: four fresh processes, mostly interpreter and torch start-up, merge < 1 s), so the
# quick profile measures the sections that take seconds at fewer repeats; its training section runs when asked
# (--bench-sections training).
PROFILE_BENCH = {"quick": BenchConfig(sections=("inference", "evaluation", "merge"), repeats=5, warmup=1)}


def profile_bench(profile: str) -> BenchConfig:
    """The benchmark defaults of a study profile (`PROFILE_BENCH`, else BenchConfig's)."""
    return PROFILE_BENCH.get(profile, BenchConfig())


def add_bench_arguments(parser: argparse.ArgumentParser, defaults: BenchConfig | None = None) -> None:
    """One option per BenchConfig field (mlvision/options.py), in a group of their own; `--help` shows `defaults`
    (the chosen profile's, `profile_bench`)."""
    group = parser.add_argument_group("benchmarks (the bench stage; python -m training.bench)")
    add_field_arguments(group, BenchConfig, defaults or BenchConfig())


def bench_config_from_args(args: argparse.Namespace, profile: str = "default") -> BenchConfig:
    """The benchmark options given, on top of the profile's defaults (`profile_bench`); impossible values fail in one
    line."""
    return replace(profile_bench(profile), **changes_from_args(args, BenchConfig))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise MLVisionError("--device cuda: no CUDA device is visible to torch here; use --device cpu (or auto)")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name if name != "auto" else "cpu")
