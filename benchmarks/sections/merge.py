"""Merge: seconds to compute the merged ΔW of 2..max_k adapters with each method of the study.

Data-aware methods (those with `statistics`) are timed with their statistics at hand (RegMean with every
adapter's Gram matrices loaded, as in the sweep); what those cost is its own row, `gram_matrices` (seconds
to compute one adapter's matrices, median over the study's tasks, k = 1). A test-time method (`learn`,
AdaMerging), a whole optimisation per merge, is timed once per k of its study subset instead of
`merge_repeats` interleaved times."""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from benchmarks.sections.base import Chart, Section
from benchmarks.timing import median_p95, time_interleaved
from merging.methods import MethodKind, get_method, list_methods
from merging.sweep import in_study_subset

# The merge methods in registry order and peft's references among them, for the dashboard: it colours each method
# by them (dashboard/charts.py `method_colors`) and may import benchmarks but not merging (tests/test_architecture.py).
REGISTERED_METHODS = tuple(list_methods())
REFERENCE_METHODS = tuple(list_methods(kind=MethodKind.REFERENCE))


class MergeSection(Section):
    name = "merge"
    title = "Merge time per method"
    charts = ((Chart("median_ms", "merge time (ms)", x_title="k (adapters merged)"),),)
    sized = False  # a merge's time does not depend on the image size

    def repeats(self, stage) -> int:
        return stage.bench.merge_repeats

    def applies(self, stage) -> bool:
        return len(stage.tasks) >= 2

    def setting(self, stage) -> dict:
        return {"repeats": stage.bench.merge_repeats, "methods": list(stage.config.merge_methods)}

    def plan(self, stage):
        rows = [
            (m, k, None)
            for k in range(2, len(stage.tasks) + 1)
            for m in stage.config.merge_methods
            if in_study_subset(m, k, subset_methods=stage.config.subset_methods)
        ]
        if any(get_method(m).statistics for m in stage.config.merge_methods):
            rows.append(("gram_matrices", 1, None))
        return rows

    def measure(self, stage) -> list[dict]:
        from merging.deltas import load_deltas
        from merging.grams import GRAM_IMAGES, GramStore, compute_grams, gram_megabytes
        from merging.merged_model import AdapterMerger
        from mlvision.backbone import Preprocess
        from mlvision.data import split_tensors
        from mlvision.evaluation import FoldedBackbone

        adapters = {task: load_deltas(stage.model_folder("adapter", task)) for task in stage.tasks}
        preprocess = Preprocess.from_dict(next(iter(adapters.values())).meta["preprocess"])
        folded = FoldedBackbone(stage.config.backbone_config)
        train = {task: split_tensors(task, "train", preprocess, GRAM_IMAGES)[0] for task in stage.tasks}
        grams = GramStore(folded, train.__getitem__)
        merger = AdapterMerger(
            adapters,
            stage.config.backbone_config,
            grams=grams,
            folded=folded,
            unlabeled_for=lambda task: split_tensors(task, "test", preprocess, stage.config.merge_eval)[0],
        )
        methods = list(stage.config.merge_methods)
        rows = []
        if any(get_method(m).statistics for m in methods):
            seconds, megabytes = [], []
            for task, adapter in tqdm(adapters.items(), desc="bench Gram matrices", unit="adapter", leave=False):
                start = time.perf_counter()
                computed = compute_grams(folded, adapter, train[task])
                seconds.append(time.perf_counter() - start)
                megabytes.append(gram_megabytes({layer: g.float() for layer, g in computed.items()}))
            median, p95 = median_p95(seconds)
            rows.append(
                {"variant": "gram_matrices", "k": 1, "batch_size": None, "median_ms": median * 1000,
                 "p95_ms": p95 * 1000,
                 "note": f"one adapter's Gram matrices on {GRAM_IMAGES} training images, median over "
                 f"{len(seconds)} adapters; {statistics.median(megabytes):.1f} MB each (float32, cached)"}
            )  # fmt: skip
            grams.prepare(list(adapters.values()))
        for k in tqdm(range(2, len(stage.tasks) + 1), desc="bench merge", unit="k"):
            group = stage.tasks[:k]
            timed = [m for m in methods if in_study_subset(m, k, subset_methods=stage.config.subset_methods)]
            calls = {
                method: (lambda m=method: merger.merge(group, m))
                for method in timed
                if get_method(method).learn is None
            }
            times = time_interleaved(calls, stage.bench.merge_repeats, warmup=1, device=torch.device("cpu"))
            for method in (m for m in timed if get_method(m).learn is not None):
                start = time.perf_counter()
                merger.merge(group, method)
                times[method] = [(time.perf_counter() - start) * 1000]
            for method, values in times.items():
                median, p95 = median_p95(values)
                rows.append(
                    {"variant": method, "k": k, "batch_size": None, "median_ms": median, "p95_ms": p95,
                     "note": _note(method)}
                )  # fmt: skip
        return rows


def _note(method: str) -> str:
    merge_method = get_method(method)
    if merge_method.learn is not None:
        start = merge_method.starts_from
        first = f"; the sweep also runs {start.method.replace('_', ' ')}'s validation search first" if start else ""
        return (
            "one run (not repeated): coefficients learned at their defaults on the tasks' unlabeled test images, "
            f"CPU{first}"
        )
    extra = "; Gram matrices already loaded (their cost: row gram_matrices)" if merge_method.statistics else ""
    if merge_method.tuned:
        return (
            "ΔW at the default hyperparameters; the validation search of the sweep (a merge and validation scoring "
            f"per grid point) is not included{extra}"
        )
    return f"merged ΔW of every LoRA layer, CPU{extra}"


SECTION = MergeSection()
