"""Does the fast evaluation path predict what the eager model predicts? Checked on the committed study.

    python -m benchmarks.exactness                 # every test image of every task (minutes on 2 cores)
    python -m benchmarks.exactness --per-task 400  # the first 400 test images of each task

For the base backbone with the adapters' heads (on every task), each task's own adapter (on its
task), and the task-arithmetic merge of all six (on every task), it scores the test images
through `FoldedBackbone` prepared for speed and through the eager one, and prints per task how
many argmax agree and the largest logit difference. tests/test_evaluation.py runs the same comparison on a subset.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mlvision.backbone import BackboneConfig, Preprocess
from mlvision.config import PROFILES
from mlvision.data import split_tensors
from mlvision.evaluation import EVAL_BATCH_SIZE, LOGIT_TOLERANCE, FoldedBackbone
from mlvision.models import MultiTaskModel
from mlvision.paths import DEFAULT_DB_PATH
from mlvision.runs import stored_model_folder
from mlvision.store import Store


def study_adapters(seed: int = 0) -> dict:
    """The committed default study's adapters of `seed`, as ΔW, by task (read from results.duckdb)."""
    from merging.deltas import load_deltas

    config = PROFILES["default"]
    store = Store(DEFAULT_DB_PATH)
    return {task: load_deltas(stored_model_folder(store, config, "adapter", task, seed)) for task in config.tasks}


@torch.inference_mode()
def compare_fast_with_eager(
    adapters: dict, merged: dict[str, torch.Tensor], per_task: int | None, tasks: list[str] | None = None
) -> dict[str, tuple[int, int, float]]:
    """Per task (default: every adapter's): (images whose argmax agrees, images, max |logit difference|)
    of the fast and eager paths, with `merged` folded into the backbone and every adapter's head."""
    first = next(iter(adapters.values()))
    config, preprocess = BackboneConfig(**first.meta["backbone"]), Preprocess.from_dict(first.meta["preprocess"])
    heads = {task: adapter.head for task, adapter in adapters.items()}
    fast = MultiTaskModel(FoldedBackbone(config).fold(merged), heads).eval()
    eager = MultiTaskModel(FoldedBackbone(config, fast=False).fold(merged), heads).eval()
    report = {}
    for task in tasks or list(adapters):
        images, _ = split_tensors(task, "test", preprocess, per_task)
        same, max_diff = 0, 0.0
        for start in range(0, len(images), EVAL_BATCH_SIZE):
            batch = images[start : start + EVAL_BATCH_SIZE]
            fast_logits, eager_logits = fast(batch)[task], eager(batch)[task]
            same += int((fast_logits.argmax(-1) == eager_logits.argmax(-1)).sum())
            max_diff = max(max_diff, float((fast_logits - eager_logits).abs().max()))
        report[task] = (same, len(images), max_diff)
    return report


def main(argv: list[str] | None = None) -> int:
    from merging.merged_model import merge_deltas

    parser = argparse.ArgumentParser(prog="python -m benchmarks.exactness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-task", type=int, default=None, help="test images per task (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="which seed's adapters (default 0)")
    args = parser.parse_args(argv)
    adapters = study_adapters(args.seed)
    merges = {  # label -> (merged ΔW, tasks scored; None = every task)
        "base + heads": ({}, None),
        **{f"adapter {task}": (adapter.deltas, [task]) for task, adapter in adapters.items()},
        "task_arithmetic of all six": (merge_deltas(list(adapters.values()), "task_arithmetic"), None),
    }
    failures = 0
    for label, (merged, tasks) in merges.items():
        report = compare_fast_with_eager(adapters, merged, args.per_task, tasks)
        for task, (same, total, max_diff) in report.items():
            ok = same == total and max_diff < LOGIT_TOLERANCE
            failures += not ok
            verdict = "" if ok else "DIFFERS"
            print(f"{label:28s} {task:14s} argmax equal {same}/{total}  max |Δlogit| {max_diff:.2e}  {verdict}")
    print("the fast path agrees with the eager model" if not failures else f"{failures} (model, task) pairs differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
