"""What a study run has left to do, and about how long that takes on this machine, said before it starts.

Why: a profile sized for one machine (the default study for 2 CPU cores, the paper profile for a GPU) can take
hours on another; a user should know that before the first adapter trains, and know that stopping is safe (every
model and merge is stored as it finishes; the same command continues). `python training/run_all.py --plan` prints
this and runs nothing; a run with much left to do prints it first (`ANNOUNCE_ABOVE_UNITS`).

The estimate is counts x unit costs, each unit cost timed here on this machine in a few seconds (`probe`):
- one adapter training step (the study's backbone with LoRA, real images, AdamW, the trainer's memory order;
  `PROBE_PIXELS` worth of images (the default's whole batch) and scaled to the study's batch size, as a step's cost
  grows about linearly with its images once the batch fills the cores);
- one image scored by the sweep's merged-model path (`FoldedBackbone`, `EVAL_BATCH_SIZE` images per pass).
Counted: each adapter's steps and its scored validation and test images; each head baseline's feature images; each
merge's grid points x validation images per task (x2 where a method re-selects the method it starts from) plus its
test images; a test-time method's learning steps (as training steps over its images); RegMean's Gram images.
Left out, and why: merge arithmetic (RegMean's solves, the SVDs of TSV-M, KnOTS and Iso, TIES' trims), which needs
the adapters the run has yet to train; it was 31 % of a k = 4 merge's time in a profile of the default (2026-12-06),
so the sweep's estimate is low by about that much on a CPU (24 min said, 34.6 measured); loading and task
preparation. A lower bound's order of magnitude, not a promise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.timing import median_p95, time_interleaved
from merging.grams import GRAM_IMAGES
from merging.methods import get_method
from merging.sweep import merge_id_of, stored_merge_ids, sweep_plan
from mlvision.backbone import create_backbone, make_preprocess
from mlvision.config import StudyConfig
from mlvision.data import split_tensors
from mlvision.evaluation import EVAL_BATCH_SIZE, FoldedBackbone, predict
from mlvision.models import add_lora, make_head
from mlvision.store import Store
from mlvision.tasks import get_task, load_task

# Pixels in a probe's training batch (scaled to the study's batch size) and passes timed per probe: 64 images at
# 48 px, the default's own batch. At 16 images, scaled x4, the probe said 0.30 s a step where the default's training
# measured about 0.14 s (a small batch uses a CPU's cores less well); at 224 px this is 2 images.
PROBE_PIXELS = 64 * 48 * 48
PROBE_REPEATS = 3
# A run probes and announces its plan when this many units are left (an adapter is one, ten merges are one): the
# default study from empty has 155, the quick run 10 (its probe would be a tenth of it), a finished study 0.
ANNOUNCE_ABOVE_UNITS = 20


@dataclass(frozen=True)
class Work:
    """What is left to do: models not stored yet and merges not stored yet (the sweep's plan minus the store)."""

    heads: list[tuple[str, int]]  # (task, seed)
    adapters: list[tuple[str, int]]
    merges: list[tuple[tuple[str, ...], int, str]]  # (group, seed, method), as `sweep_plan` lists them

    @property
    def empty(self) -> bool:
        return not (self.heads or self.adapters or self.merges)


@dataclass(frozen=True)
class UnitCosts:
    """Seconds of one training step at the study's batch size, and of one image scored by a merged model."""

    step_s: float
    image_s: float
    device: str


def remaining_work(config: StudyConfig, store: Store | None, stages: list[str]) -> Work:
    """The units of the stages about to run that the store does not hold (all of them without a store)."""

    def stored(model_id: str) -> bool:
        return store is not None and store.has_model(model_id)

    units = [(task, seed) for task in config.tasks for seed in config.seeds]
    training = "train" in stages
    heads = [u for u in units if training and not stored(config.model_id("head", *u))]
    adapters = [u for u in units if training and not stored(config.model_id("adapter", *u))]
    merges = []
    if "merge" in stages and len(config.tasks) >= 2:
        plan = sweep_plan(config)
        done = stored_merge_ids(store) if store is not None else set()
        merges = [item for item in plan if merge_id_of(config, *item) not in done]
    return Work(heads, adapters, merges)


def probe(config: StudyConfig, device: str = "cpu") -> UnitCosts:
    """Time one LoRA training step and one scored image on this machine, with the study's backbone, image size,
    rank and targets on real images of its first task (the median of `PROBE_REPEATS` after one warm-up)."""
    task = config.tasks[0]
    backbone = create_backbone(config.backbone_config)
    preprocess = make_preprocess(config.backbone_config, backbone)
    batch = max(1, min(PROBE_PIXELS // config.image_size**2, config.batch_size))
    images, labels = split_tensors(task, "train", preprocess, batch)
    model = add_lora(backbone, rank=config.rank, alpha=config.alpha, target_modules=config.lora_targets).to(device)
    head = make_head(backbone.num_features, get_task(task).num_classes).to(device)
    model.eval()  # BatchNorm frozen, as the adapter trainer keeps it
    if config.channels_last:  # the trainer's memory order (training/trainers.py), which changes a step's cost
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=config.lr)
    images, labels = images.to(device), labels.to(device)

    def step() -> None:
        loss = F.cross_entropy(head(model(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step_s = _median_seconds(step, device) * config.batch_size / len(images)
    folded = FoldedBackbone(config.backbone_config, device=device)
    scored = split_tensors(task, "validation", preprocess, EVAL_BATCH_SIZE)[0]
    forward = folded.model({}, {task: head})
    image_s = _median_seconds(lambda: predict(forward, scored), device) / len(scored)
    return UnitCosts(step_s, image_s, device)


def _median_seconds(fn, device: str) -> float:
    """Median seconds of `fn` over `PROBE_REPEATS` after one warm-up (benchmarks/timing.py's clock)."""
    times_ms = time_interleaved({"probe": fn}, PROBE_REPEATS, warmup=1, device=torch.device(device))["probe"]
    return median_p95(times_ms)[0] / 1000.0


def estimate_seconds(config: StudyConfig, work: Work, costs: UnitCosts) -> dict[str, float]:
    """{stage: seconds} for `work` at `costs` (what is counted and what is not: the module's docstring)."""

    def images(task: str, split: str, limit: int | None) -> int:
        return split_size(task, split) if limit is None else min(limit, split_size(task, split))

    training = 0.0
    for task, _ in work.adapters:
        scored = images(task, "validation", config.max_validation) + images(task, "test", config.max_test)
        training += config.steps * costs.step_s + scored * costs.image_s
    for task in {task for task, _ in work.heads}:  # a task's features are computed once for all its seeds
        limits = {"train": config.max_train, "validation": config.max_validation, "test": config.max_test}
        training += sum(images(task, split, limit) for split, limit in limits.items()) * costs.image_s
    sweep = 0.0
    gram_adapters = set()
    for group, seed, method in work.merges:
        merge_method = get_method(method)
        points = len(merge_method.grid_points(len(group)))
        start = merge_method.starts_from  # AdaMerging re-selects task arithmetic's λ first
        selections = points + (len(get_method(start.method).grid_points(len(group))) if start is not None else 0)
        for task in group:
            scored = selections * images(task, "validation", config.merge_select)
            sweep += (scored + images(task, "test", config.merge_eval)) * costs.image_s
        if merge_method.learn is not None:  # a test-time method learns on unlabeled images: training steps' cost
            defaults = merge_method.defaults
            learned = points * defaults.get("steps", 0) * defaults.get("batch_size", 0) * len(group)
            sweep += learned * costs.step_s / config.batch_size
        if merge_method.statistics:
            gram_adapters.update((task, seed) for task in group)
    sweep += len(gram_adapters) * GRAM_IMAGES * costs.image_s
    return {"train": training, "merge": sweep}


@functools.cache
def split_size(task: str, split: str) -> int:
    """Images in a prepared task's split (read from the data cache)."""
    return load_task(task)[split].num_rows


def plan_lines(work: Work, seconds: dict[str, float], costs: UnitCosts) -> list[str]:
    """What run_all prints before it starts (and all that `--plan` prints)."""
    total = sum(seconds.values())
    return [
        f"plan: {len(work.heads)} head baselines and {len(work.adapters)} adapters to train, "
        f"{len(work.merges)} merges to score (what is stored already is skipped)",
        f"estimate on this machine ({costs.device}, {_threads()}; one training step "
        f"{costs.step_s:.3f} s, one scored image {costs.image_s * 1000:.2f} ms): "
        f"training {_duration(seconds['train'])}, merge sweep {_duration(seconds['merge'])}, "
        f"about {_duration(total)} in all (not counted: merge arithmetic, about a third of the default's sweep on a "
        "CPU, loading, and the findings and bench stages)",
        "every model and merge is stored as it finishes: Ctrl-C stops the run, and the same command continues "
        "where it stopped",
    ]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def announce_plan(config: StudyConfig, store: Store | None, stages: list[str], device: str, always: bool) -> None:
    """Print the plan and its estimate when asked (`always`, run_all --plan) or when much is left to do."""
    work = remaining_work(config, store, stages)
    units = len(work.adapters) + len(work.merges) / 10
    if work.empty or (not always and units < ANNOUNCE_ABOVE_UNITS):
        if always:
            print("plan: nothing left to do (every model and merge of this study is stored)")
        return
    costs = probe(config, device)
    for line in plan_lines(work, estimate_seconds(config, work, costs), costs):
        print(line)


def _threads() -> str:
    threads = torch.get_num_threads()
    return f"{threads} thread" + ("s" if threads > 1 else "")
