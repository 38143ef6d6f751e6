"""Evaluation: the fast path every score goes through, against the eager model it replaces.

The merged model of the benchmarked tasks' adapters (one pass, every task's head) scores one batch
of real test images at the evaluation batch size, `eager` (the backbone as timm builds it) and
`fast` (mlvision/evaluation.py: BatchNorm folded, channels_last, torch.compile if MLV_EVAL_COMPILE=1)
interleaved in one loop. The `fast` row's `ratio_to_backbone` is its speed-up over `eager` from
that loop (eager median / fast median), so one query answers "how much faster"; the `eager` row's is 1.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from benchmarks.sections.base import Chart, Section, interleaved_setting
from benchmarks.sections.inference import image_batch
from benchmarks.timing import median_p95, time_interleaved
from mlvision.backbone import make_preprocess
from mlvision.evaluation import EVAL_BATCH_SIZE, FoldedBackbone, compile_requested
from mlvision.models import MultiTaskModel


class EvaluationSection(Section):
    name = "evaluation"
    title = "Evaluation: the fast path against the eager model"
    caption = (
        "images per second of the merged model answering every task, at the evaluation batch size; "
        "eager and fast run interleaved in one loop, and the fast row's ratio is its speed-up over eager"
    )
    variants = ("eager", "fast")
    charts = (
        (
            Chart("throughput", "images per second (every task answered)", kind="bar"),
            Chart("ratio_to_backbone", "speed-up over eager", kind="bar"),
        ),
    )

    def repeats(self, stage) -> int:
        return stage.bench.repeats

    def setting(self, stage) -> dict:
        return {**interleaved_setting(stage), "batch_size": EVAL_BATCH_SIZE, "compile": compile_requested()}

    def plan(self, stage):
        return [(variant, len(stage.tasks), EVAL_BATCH_SIZE) for variant in self.variants]

    @torch.inference_mode()
    def measure(self, stage) -> list[dict]:
        from merging.deltas import load_deltas
        from merging.merged_model import merge_deltas

        adapters = [load_deltas(stage.model_folder("adapter", task)) for task in stage.tasks]
        merged = merge_deltas(adapters, "linear")
        heads = {a.task: a.head.to(stage.device) for a in adapters}
        folded = {variant: FoldedBackbone(stage.backbone_config, fast=(variant == "fast")) for variant in self.variants}
        models = {
            variant: MultiTaskModel(backbone.fold(merged).to(stage.device), heads).eval()
            for variant, backbone in folded.items()
        }
        preprocess = make_preprocess(stage.backbone_config)
        images = image_batch(stage.tasks, preprocess, EVAL_BATCH_SIZE).to(stage.device)
        fold_ms = []
        for _ in range(5):  # what a merge costs the fast path besides its passes: writing base + s ⊙ ΔW
            start = time.perf_counter()
            folded["fast"].fold(merged)
            fold_ms.append((time.perf_counter() - start) * 1000.0)
        with tqdm(total=1, desc=f"bench evaluation {stage.backbone_config.image_size} px", unit="loop") as progress:
            times = time_interleaved(
                {variant: (lambda m=model: m(images)) for variant, model in models.items()},
                stage.bench.repeats,
                stage.bench.warmup,
                stage.device,
            )
            progress.update()
        eager_median = median_p95(times["eager"])[0]
        notes = {
            "eager": "the reference: the backbone as timm builds it",
            "fast": "ratio_to_backbone = speed-up over eager from the same interleaved loop; "
            f"a merge's weight swap takes {median_p95(fold_ms)[0]:.1f} ms",
        }
        rows = []
        for variant, values in times.items():
            median, p95 = median_p95(values)
            rows.append(
                {
                    "variant": variant,
                    "k": len(stage.tasks),
                    "batch_size": EVAL_BATCH_SIZE,
                    "median_ms": median,
                    "p95_ms": p95,
                    "throughput": EVAL_BATCH_SIZE * 1000.0 / median,
                    "ratio_to_backbone": eager_median / median,
                    "note": notes[variant],
                }
            )
        return rows


SECTION = EvaluationSection()
