"""Training: images per second and peak memory of one optimiser step, LoRA against head-only and full fine-tuning.

At the study's batch size and image size for `lora` (the study's adapter + head), `head_only`
(frozen backbone forward + head) and `full_finetune` (every weight trained); each in a fresh
process so memory is not shared. `lora_channels_last` is the LoRA step with the backbone and the
images in channels_last memory order, the layout that speeds up evaluation (issue 14's check of
whether it speeds up training too; the trainer keeps the default layout, see the README).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.sections.base import Chart, Section
from benchmarks.timing import PeakMemory, median_p95, time_interleaved
from benchmarks.workers import exit_with_parent
from mlvision.backbone import BackboneConfig, create_backbone, make_preprocess
from mlvision.data import split_tensors
from mlvision.models import add_lora, make_head
from mlvision.tasks import get_task


def train_step_worker(spec: dict) -> dict:
    """One training variant, timed in a fresh process; returns step times (ms) and peak memory (MB).

    Every variant keeps BatchNorm in eval mode (as the adapter trainer does), uses AdamW and
    the same batch of real images, so the only difference is which weights receive gradients.
    """
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    config = BackboneConfig(**spec["backbone"])
    backbone = create_backbone(config)
    images, labels = split_tensors(spec["task"], "train", make_preprocess(config, backbone), spec["batch_size"])
    images, labels = images.to(device), labels.to(device)
    head = make_head(backbone.num_features, get_task(spec["task"]).num_classes)
    variant = spec["variant"]
    if variant.startswith("lora"):
        backbone = add_lora(backbone, rank=spec["rank"], alpha=spec["alpha"], target_modules=spec["target_modules"])
    else:
        backbone.requires_grad_(variant == "full_finetune")
    backbone, head = backbone.to(device).eval(), head.to(device)
    if variant == "lora_channels_last":
        backbone, images = (
            backbone.to(memory_format=torch.channels_last),
            images.contiguous(memory_format=torch.channels_last),
        )
    trainable = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step():
        with torch.set_grad_enabled(variant != "head_only"):
            features = backbone(images)
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with PeakMemory(device) as memory:
        times = time_interleaved({"step": step}, repeats=spec["steps"], warmup=spec["warmup"], device=device)["step"]
    return {"times": times, "peak_mb": memory.peak_mb, "trainable": sum(p.numel() for p in trainable)}


class TrainingSection(Section):
    name = "training"
    title = "Training: LoRA against head-only and full fine-tuning"
    variants = ("lora", "lora_channels_last", "head_only", "full_finetune")
    charts = (
        (
            Chart("throughput", "images per second", kind="bar"),
            Chart("peak_memory_mb", "peak extra memory (MB)", kind="bar"),
        ),
    )

    def repeats(self, stage) -> int:
        return stage.bench.train_steps

    def setting(self, stage) -> dict:
        return {
            "steps": stage.bench.train_steps,
            "batch_size": stage.config.batch_size,
            "rank": stage.config.rank,
            "targets": stage.config.lora_targets,
        }

    def plan(self, stage):
        return [(v, None, stage.config.batch_size) for v in self.variants]

    def measure(self, stage) -> list[dict]:
        spec = {
            "backbone": stage.backbone_config.to_dict(),
            "task": stage.tasks[0],
            "batch_size": stage.config.batch_size,
            "rank": stage.config.rank,
            "alpha": stage.config.alpha,
            "target_modules": stage.config.lora_targets,
            "steps": stage.bench.train_steps,
            "warmup": stage.bench.warmup,
            "device": stage.device.type,
            "threads": torch.get_num_threads(),
        }
        rows = []
        context = multiprocessing.get_context("spawn")  # a fresh process per variant: memory is not shared
        for variant in tqdm(self.variants, desc="bench training", unit="variant"):
            with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=exit_with_parent) as pool:
                result = pool.submit(train_step_worker, {**spec, "variant": variant}).result()
            median, p95 = median_p95(result["times"])
            memory_kind = (
                "device memory allocated"
                if stage.device.type == "cuda"
                else "resident memory (the kernel's peak counter)"
            )
            rows.append(
                {
                    "variant": variant,
                    "k": None,
                    "batch_size": stage.config.batch_size,
                    "median_ms": median,
                    "p95_ms": p95,
                    "throughput": stage.config.batch_size * 1000.0 / median,
                    "peak_memory_mb": result["peak_mb"],
                    "note": f"one AdamW step on task {stage.tasks[0]}; {result['trainable']} trainable parameters; "
                    f"peak = extra {memory_kind} over the {stage.bench.warmup} warm-up + timed steps",
                }
            )
        return rows


SECTION = TrainingSection()
