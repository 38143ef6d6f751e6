"""Merge: seconds to compute the merged ΔW of 2..max_k adapters with each method of the study."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from benchmarks.sections.base import Chart, Section
from benchmarks.timing import median_p95, time_interleaved


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
        return [(m, k, None) for k in range(2, len(stage.tasks) + 1) for m in stage.config.merge_methods]

    def measure(self, stage) -> list[dict]:
        from merging.deltas import load_deltas
        from merging.merged_model import AdapterMerger
        from merging.methods import get_method

        adapters = {task: load_deltas(stage.model_folder("adapter", task)) for task in stage.tasks}
        merger = AdapterMerger(adapters, stage.config.backbone_config)
        rows = []
        for k in tqdm(range(2, len(stage.tasks) + 1), desc="bench merge", unit="k"):
            group = stage.tasks[:k]
            calls = {method: (lambda m=method: merger.merge(group, m)) for method in stage.config.merge_methods}
            times = time_interleaved(calls, stage.bench.merge_repeats, warmup=1, device=torch.device("cpu"))
            for method, values in times.items():
                median, p95 = median_p95(values)
                if get_method(method).selection_rule():
                    note = (
                        "ΔW at the default λ; the λ search of the sweep (one merge and validation scoring per grid "
                        "value) is not included"
                    )
                else:
                    note = "merged ΔW of every LoRA layer, CPU"
                rows.append(
                    {"variant": method, "k": k, "batch_size": None, "median_ms": median, "p95_ms": p95, "note": note}
                )
        return rows


SECTION = MergeSection()
