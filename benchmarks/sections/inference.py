"""Inference: one merged pass against one pass per task, and against the plain backbone.

Latency (median, p95 over `--bench-repeats` timed runs after warm-up) and throughput at each batch
size, for k = 1..max_k tasks, of (a) `merged`: the k adapters' merged ΔW folded into one backbone,
one pass and k heads; (b) `separate_adapters`: k peft models, one pass each; (c) `peft_switch`: one
peft model holding k unmerged adapters, `set_adapter` then one pass per task; (d) `head_baseline`:
the frozen backbone, one pass and k heads; and the plain `backbone` (features only). All five run
interleaved in one loop, so `ratio_to_backbone` = median / the backbone's median from that same
loop, and drift of the machine cancels.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from benchmarks.sections.base import Chart, Section, interleaved_setting
from benchmarks.timing import median_p95, time_interleaved
from mlvision.backbone import create_backbone, make_preprocess
from mlvision.data import split_tensors
from mlvision.models import MultiTaskModel, load_head, load_model, read_meta


def image_batch(tasks, preprocess, size: int) -> torch.Tensor:
    """`size` real test images (taken from the tasks in turn, repeated if they hold fewer)."""
    pool = torch.cat([split_tensors(task, "test", preprocess, size)[0] for task in tasks])
    return pool.repeat((size + len(pool) - 1) // len(pool), 1, 1, 1)[:size]


class InferenceSection(Section):
    name = "inference"
    title = "Inference: one merged pass against one pass per task"
    caption = (
        "median of the timed runs; every variant and the plain backbone run interleaved in one loop, "
        "so the ratio to the backbone cancels drift of the machine"
    )
    variants = ("backbone", "merged", "separate_adapters", "peft_switch", "head_baseline")
    charts = (
        (Chart("median_ms", "median latency (ms)"), Chart("ratio_to_backbone", "latency / plain backbone")),
        (Chart("throughput", "throughput (images/s, every task answered)"),),
    )
    facet = ("batch_size", "Batch size", "batch")

    def repeats(self, stage) -> int:
        return stage.bench.repeats

    def setting(self, stage) -> dict:
        return interleaved_setting(stage)

    def plan(self, stage):
        return [
            (v, k, b) for b in stage.bench.batch_sizes for k in range(1, len(stage.tasks) + 1) for v in self.variants
        ]

    @torch.inference_mode()
    def measure(self, stage) -> list[dict]:
        from peft import PeftModel

        from merging.deltas import load_deltas
        from merging.merged_model import merge_deltas
        from mlvision.evaluation import FoldedBackbone

        tasks_all = stage.tasks
        adapter_folders = [stage.model_folder("adapter", task) for task in tasks_all]
        head_folders = [stage.model_folder("head", task) for task in tasks_all]
        backbone_config = stage.backbone_config
        plain = create_backbone(backbone_config)
        preprocess = make_preprocess(backbone_config, plain)
        adapters = [load_deltas(folder) for folder in adapter_folders]
        separate = [load_model(folder, create_backbone(backbone_config)).model for folder in adapter_folders]
        folded = FoldedBackbone(backbone_config, fast=False)  # eager, like every other variant here
        baseline_heads = {task: load_head(folder, read_meta(folder)) for task, folder in zip(tasks_all, head_folders)}
        switch = PeftModel.from_pretrained(
            create_backbone(backbone_config), str(adapter_folders[0]), adapter_name=tasks_all[0]
        )
        for task, folder in zip(tasks_all[1:], adapter_folders[1:]):
            switch.load_adapter(str(folder), adapter_name=task)
        device = stage.device
        plain, switch = plain.to(device).eval(), switch.to(device).eval()
        separate = [model.to(device).eval() for model in separate]
        adapter_heads = {a.task: a.head.to(device) for a in adapters}
        head_model_backbone = copy.deepcopy(plain)

        def switched(images, tasks):
            outputs = {}
            for task in tasks:
                switch.set_adapter(task)
                outputs[task] = adapter_heads[task](switch(images))
            return outputs

        rows = []
        progress = tqdm(total=len(stage.bench.batch_sizes) * len(tasks_all), desc="bench inference", unit="setting")
        for batch_size in stage.bench.batch_sizes:
            images = image_batch(tasks_all, preprocess, batch_size).to(device)
            for k in range(1, len(tasks_all) + 1):
                tasks = tasks_all[:k]
                merged = folded.model(merge_deltas(adapters[:k], "linear"), {t: adapter_heads[t] for t in tasks}).to(
                    device
                )
                head_model = (
                    MultiTaskModel(head_model_backbone, {t: baseline_heads[t] for t in tasks}).to(device).eval()
                )
                calls = {
                    "backbone": lambda: plain(images),
                    "merged": lambda: merged(images),
                    "separate_adapters": lambda: [model(images) for model in separate[:k]],
                    "peft_switch": lambda: switched(images, tasks),
                    "head_baseline": lambda: head_model(images),
                }
                times = time_interleaved(calls, stage.bench.repeats, stage.bench.warmup, device)
                base_median = median_p95(times["backbone"])[0]
                for variant, values in times.items():
                    median, p95 = median_p95(values)
                    rows.append(
                        {
                            "variant": variant,
                            "k": k,
                            "batch_size": batch_size,
                            "median_ms": median,
                            "p95_ms": p95,
                            "throughput": batch_size * 1000.0 / median,
                            "ratio_to_backbone": median / base_median,
                        }
                    )
                progress.update()
        progress.close()
        return rows


SECTION = InferenceSection()
