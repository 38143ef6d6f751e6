"""Benchmarks: what merging buys at inference, what LoRA costs in training, what each merge costs.

    python -m training.bench                      # the default study's adapters, stored in results.duckdb
    python -m training.bench --device cuda        # the same on a GPU (clocks synchronised)
    python -m training.bench --bench-sections inference --bench-repeats 50 --again

Also the `bench` stage of `python training/run_all.py` (skip it with `--stages train merge findings`).
Three sections, each stored in the `benchmarks` view with the machine it ran on:

- inference: latency (median, p95 over `--bench-repeats` timed runs after warm-up) and throughput
  at each batch size, for k = 1..max_k tasks, of (a) `merged`: the k adapters' merged ΔW folded
  into one backbone, one pass and k heads; (b) `separate_adapters`: k peft models, one pass each;
  (c) `peft_switch`: one peft model holding k unmerged adapters, `set_adapter` then one pass per
  task; (d) `head_baseline`: the frozen backbone, one pass and k heads; and the plain `backbone`
  (features only). All five run interleaved in one loop, so `ratio_to_backbone` = median / the
  backbone's median from that same loop, and drift of the machine cancels.
- training: images per second and peak memory of one optimiser step at the study's batch size and
  image size for `lora` (the study's adapter + head), `head_only` (frozen backbone forward + head)
  and `full_finetune` (every weight trained); each in a fresh process so memory is not shared.
- merge: seconds to compute the merged ΔW of 2..max_k adapters with each method of the study.

A figure is identified by its setting and the machine (CPU model, cores, threads, torch, device);
a setting already measured on this machine is skipped (`--again` measures and replaces it).
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mlvision.backbone import BackboneConfig, create_backbone, make_preprocess
from mlvision.data import split_tensors
from mlvision.errors import MLVisionError, run_cli
from mlvision.models import MultiTaskModel, add_lora, load_head, load_model, make_head, read_meta
from mlvision.store import Store, config_hash, insert_row, now
from mlvision.tasks import get_task
from training.config import StudyConfig
from training.pipeline import stored_model_folder, study_run_id
from training.timing import PeakMemory, machine_description, median_p95, time_interleaved

SECTIONS = ("inference", "training", "merge")
INFERENCE_VARIANTS = ("backbone", "merged", "separate_adapters", "peft_switch", "head_baseline")
TRAINING_VARIANTS = ("lora", "head_only", "full_finetune")


@dataclass(frozen=True)
class BenchConfig:
    sections: tuple[str, ...] = SECTIONS
    repeats: int = 20             # timed runs per inference figure (after `warmup` untimed ones)
    warmup: int = 3
    batch_sizes: tuple[int, ...] = (1, 64)
    max_k: int | None = None      # None = the study's max_k (largest merged group)
    train_steps: int = 20         # timed optimiser steps per training variant
    merge_repeats: int = 3        # timed merges per (method, k)
    device: str = "auto"
    image_size: int | None = None  # None = the study's; inference and training can run at another size
    again: bool = False           # measure settings already stored for this machine, replacing them


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmarks (the bench stage; python -m training.bench)")
    group.add_argument("--bench-sections", nargs="+", choices=SECTIONS, help="sections to measure (default: all)")
    group.add_argument("--bench-repeats", type=int, help="timed runs per inference figure, after 3 warm-up runs (default: 20)")
    group.add_argument("--bench-batch-sizes", nargs="+", type=int, help="inference batch sizes (default: 1 64)")
    group.add_argument("--bench-max-k", type=int, help="largest number of tasks served / adapters merged (default: the study's --max-k)")
    group.add_argument("--bench-train-steps", type=int, help="timed optimiser steps per training variant (default: 20)")
    group.add_argument("--bench-merge-repeats", type=int, help="timed merges per method and k (default: 3)")
    group.add_argument("--bench-image-size", type=int, help="image size for the inference and training sections "
                       "(default: the study's --image-size; the adapters are reused as trained)")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to measure (default: auto = cuda if available)")
    group.add_argument("--again", action="store_true", help="measure again settings already stored for this machine (replacing them)")


def bench_config_from_args(args: argparse.Namespace) -> BenchConfig:
    names = {"bench_sections": "sections", "bench_repeats": "repeats", "bench_batch_sizes": "batch_sizes",
             "bench_max_k": "max_k", "bench_train_steps": "train_steps", "bench_merge_repeats": "merge_repeats",
             "bench_image_size": "image_size", "device": "device"}
    changes = {field: (tuple(value) if isinstance(value, list) else value)
               for option, field in names.items() if (value := getattr(args, option, None)) is not None}
    config = replace(BenchConfig(), again=bool(getattr(args, "again", False)), **changes)
    if min(config.repeats, config.train_steps, config.merge_repeats, config.max_k or 1, config.image_size or 1) < 1:
        raise MLVisionError("--bench-repeats, --bench-train-steps, --bench-merge-repeats, --bench-max-k and "
                            "--bench-image-size must be >= 1")
    if any(size < 1 for size in config.batch_sizes):
        raise MLVisionError(f"--bench-batch-sizes must be >= 1, got {list(config.batch_sizes)}")
    return config


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise MLVisionError("--device cuda: no CUDA device is visible to torch here; use --device cpu (or auto)")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name if name != "auto" else "cpu")


def image_batch(tasks, preprocess, size: int) -> torch.Tensor:
    """`size` real test images (taken from the tasks in turn, repeated if they hold fewer)."""
    pool = torch.cat([split_tensors(task, "test", preprocess, size)[0] for task in tasks])
    return pool.repeat((size + len(pool) - 1) // len(pool), 1, 1, 1)[:size]


# ------------------------------------------------------------------------------ training worker

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
    if variant == "lora":
        backbone = add_lora(backbone, rank=spec["rank"], alpha=spec["alpha"], target_modules=spec["target_modules"])
    else:
        backbone.requires_grad_(variant == "full_finetune")
    backbone, head = backbone.to(device).eval(), head.to(device)
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


# ------------------------------------------------------------------------------ the stage

class BenchStage:
    def __init__(self, config: StudyConfig, store: Store, bench: BenchConfig):
        self.config = config
        self.store = store
        self.bench = bench
        self.device = resolve_device(bench.device)
        self.machine = machine_description(self.device)
        self.run_id = study_run_id(config)
        self.tasks = list(config.tasks)[:bench.max_k or config.max_k]
        self.seed = config.seeds[0]
        # the backbone as benchmarked: the study's, possibly at another image size
        self.backbone_config = replace(config.backbone_config, image_size=bench.image_size or config.image_size)

    # -- inputs ---------------------------------------------------------------------------------
    def model_folder(self, kind: str, task: str) -> Path:
        return stored_model_folder(self.store, self.config, kind, task, self.seed)

    # -- identity and storage ---------------------------------------------------------------------
    def setting(self, section: str) -> dict:
        """What a section's figures depend on (besides variant, k and batch size)."""
        common = {"section": section, "machine": self.machine, "backbone": self.backbone_config.to_dict(),
                  "tasks": self.tasks, "seed": self.seed}
        if section == "inference":
            return {**common, "repeats": self.bench.repeats, "warmup": self.bench.warmup,
                    "adapters": [self.config.model_id("adapter", t, self.seed) for t in self.tasks]}
        if section == "training":
            return {**common, "steps": self.bench.train_steps, "batch_size": self.config.batch_size,
                    "rank": self.config.rank, "targets": self.config.lora_targets}
        return {**common, "repeats": self.bench.merge_repeats, "methods": list(self.config.merge_methods)}

    def bench_id(self, section: str, variant: str, k: int | None, batch_size: int | None) -> str:
        return "bench-" + config_hash({**self.setting(section), "variant": variant, "k": k, "batch_size": batch_size})

    def planned(self, section: str) -> list[tuple[str, int | None, int | None]]:
        """Every (variant, k, batch size) a section measures."""
        if section == "inference":
            return [(v, k, b) for b in self.bench.batch_sizes for k in range(1, len(self.tasks) + 1) for v in INFERENCE_VARIANTS]
        if section == "training":
            return [(v, None, self.config.batch_size) for v in TRAINING_VARIANTS]
        return [(m, k, None) for k in range(2, len(self.tasks) + 1) for m in self.config.merge_methods]

    def already_stored(self, section: str) -> bool:
        if self.bench.again or not self.store.path.exists():
            return False
        wanted = {self.bench_id(section, *item) for item in self.planned(section)}
        stored = {row[0] for row in self.store.query("SELECT bench_id FROM benchmark_rows WHERE name = ?", [section])}
        return wanted <= stored

    def save(self, section: str, rows: list[dict], repeats: int) -> None:
        """One transaction per section; a figure measured again replaces the old one (same bench_id)."""
        measured_at = now()
        with self.store.write() as con:
            for row in rows:
                bench_id = self.bench_id(section, row["variant"], row["k"], row["batch_size"])
                con.execute("DELETE FROM benchmark_rows WHERE bench_id = ?", [bench_id])
                record = {"name": section, "device": self.device.type, "machine": self.machine, "measured_at": measured_at,
                          "bench_id": bench_id, "backbone": self.config.backbone, "image_size": self.backbone_config.image_size,
                          "threads": torch.get_num_threads(), "repeats": repeats, "run_id": self.run_id,
                          "ratio_to_backbone": None, "throughput": None, "peak_memory_mb": None, "note": None, **row}
                insert_row(con, "benchmark_rows", record, key=("bench_id",))

    # -- sections ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def measure_inference(self) -> list[dict]:
        from merging.deltas import load_deltas
        from merging.merged_model import FoldedBackbone, merge_deltas
        from peft import PeftModel

        adapter_folders = [self.model_folder("adapter", task) for task in self.tasks]
        head_folders = [self.model_folder("head", task) for task in self.tasks]
        backbone_config = self.backbone_config
        plain = create_backbone(backbone_config)
        preprocess = make_preprocess(backbone_config, plain)
        adapters = [load_deltas(folder) for folder in adapter_folders]
        separate = [load_model(folder, create_backbone(backbone_config)).model for folder in adapter_folders]
        folded = FoldedBackbone(backbone_config)
        baseline_heads = {task: load_head(folder, read_meta(folder)) for task, folder in zip(self.tasks, head_folders)}
        switch = PeftModel.from_pretrained(create_backbone(backbone_config), str(adapter_folders[0]), adapter_name=self.tasks[0])
        for task, folder in zip(self.tasks[1:], adapter_folders[1:]):
            switch.load_adapter(str(folder), adapter_name=task)
        adapter_heads = {a.task: a.head for a in adapters}
        device = self.device
        plain, switch = plain.to(device).eval(), switch.to(device).eval()
        separate = [model.to(device).eval() for model in separate]
        adapter_heads = {t: h.to(device) for t, h in adapter_heads.items()}
        head_model_backbone = copy.deepcopy(plain)

        def switched(images, tasks):
            outputs = {}
            for task in tasks:
                switch.set_adapter(task)
                outputs[task] = adapter_heads[task](switch(images))
            return outputs

        rows = []
        progress = tqdm(total=len(self.bench.batch_sizes) * len(self.tasks), desc="bench inference", unit="setting")
        for batch_size in self.bench.batch_sizes:
            images = image_batch(self.tasks, preprocess, batch_size).to(device)
            for k in range(1, len(self.tasks) + 1):
                tasks = self.tasks[:k]
                merged = folded.model(merge_deltas(adapters[:k], "linear"), {t: adapter_heads[t] for t in tasks}).to(device)
                head_model = MultiTaskModel(head_model_backbone, {t: baseline_heads[t] for t in tasks}).to(device).eval()
                calls = {"backbone": lambda: plain(images),
                         "merged": lambda: merged(images),
                         "separate_adapters": lambda: [model(images) for model in separate[:k]],
                         "peft_switch": lambda: switched(images, tasks),
                         "head_baseline": lambda: head_model(images)}
                times = time_interleaved(calls, self.bench.repeats, self.bench.warmup, device)
                base_median = median_p95(times["backbone"])[0]
                for variant, values in times.items():
                    median, p95 = median_p95(values)
                    rows.append({"variant": variant, "k": k, "batch_size": batch_size, "median_ms": median, "p95_ms": p95,
                                 "throughput": batch_size * 1000.0 / median, "ratio_to_backbone": median / base_median})
                progress.update()
        progress.close()
        return rows

    def measure_training(self) -> list[dict]:
        spec = {"backbone": self.backbone_config.to_dict(), "task": self.tasks[0], "batch_size": self.config.batch_size,
                "rank": self.config.rank, "alpha": self.config.alpha, "target_modules": self.config.lora_targets,
                "steps": self.bench.train_steps, "warmup": self.bench.warmup, "device": self.device.type,
                "threads": torch.get_num_threads()}
        rows = []
        context = multiprocessing.get_context("spawn")  # a fresh process per variant: memory is not shared
        for variant in tqdm(TRAINING_VARIANTS, desc="bench training", unit="variant"):
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                result = pool.submit(train_step_worker, {**spec, "variant": variant}).result()
            median, p95 = median_p95(result["times"])
            memory_kind = "device memory allocated" if self.device.type == "cuda" else "resident memory (RSS) sampled every 1 ms"
            rows.append({"variant": variant, "k": None, "batch_size": self.config.batch_size, "median_ms": median,
                         "p95_ms": p95, "throughput": self.config.batch_size * 1000.0 / median,
                         "peak_memory_mb": result["peak_mb"],
                         "note": f"one AdamW step on task {self.tasks[0]}; {result['trainable']} trainable parameters; "
                                 f"peak = extra {memory_kind} over the {self.bench.warmup} warm-up + timed steps"})
        return rows

    def measure_merge(self) -> list[dict]:
        from merging.deltas import load_deltas
        from merging.merged_model import merge_deltas
        from merging.methods import get_method
        from merging.peft_reference import PEFT_METHODS, PeftMerger

        folders = {task: str(self.model_folder("adapter", task)) for task in self.tasks}
        adapters = [load_deltas(folders[task]) for task in self.tasks]
        peft_merger = None
        if any(m in PEFT_METHODS for m in self.config.merge_methods):
            peft_merger = PeftMerger(self.config.backbone_config, folders)
        rows = []
        for k in tqdm(range(2, len(self.tasks) + 1), desc="bench merge", unit="k"):
            calls = {}
            for method in self.config.merge_methods:
                if method in PEFT_METHODS:
                    calls[method] = lambda m=method: peft_merger.merge(m, self.tasks[:k])
                else:
                    params = get_method(method).validate({})
                    calls[method] = lambda m=method, p=params: merge_deltas(adapters[:k], m, p)
            times = time_interleaved(calls, self.bench.merge_repeats, warmup=1, device=torch.device("cpu"))
            for method, values in times.items():
                median, p95 = median_p95(values)
                note = ("ΔW at the default λ; the λ search of the sweep (one merge and validation scoring per grid value) "
                        "is not included") if method == "task_arithmetic" else "merged ΔW of every LoRA layer, CPU"
                rows.append({"variant": method, "k": k, "batch_size": None, "median_ms": median, "p95_ms": p95, "note": note})
        return rows

    def run(self) -> dict:
        """Measure each requested section not yet stored for this machine; returns counts."""
        counts = {"measured": 0, "skipped": 0}
        measure = {"inference": (self.measure_inference, self.bench.repeats),
                   "training": (self.measure_training, self.bench.train_steps),
                   "merge": (self.measure_merge, self.bench.merge_repeats)}
        for section in self.bench.sections:
            if section == "merge" and len(self.tasks) < 2:
                continue
            if self.already_stored(section):
                counts["skipped"] += 1
                continue
            function, repeats = measure[section]
            self.save(section, function(), repeats)
            counts["measured"] += 1
        return counts


def summary(store: Store, run_id: str, device: str, image_size: int) -> str:
    """The headline figures of the stored benchmarks of this study on `device` at `image_size`, as printable lines."""
    lines = []
    where = "run_id = ? AND device = ? AND image_size = ?"
    params = [run_id, device, image_size]
    rows = store.query(f"""SELECT batch_size, variant, k, median_ms, ratio_to_backbone FROM benchmarks
                           WHERE name = 'inference' AND {where} AND k = (
                               SELECT max(k) FROM benchmarks WHERE name = 'inference' AND {where})
                           ORDER BY batch_size, variant""", params + params)
    for batch_size in sorted({r[0] for r in rows}):
        parts = [f"{variant} {median:.1f} ms ({ratio:.2f}x)" for b, variant, k, median, ratio in rows if b == batch_size]
        lines.append(f"inference, {image_size} px, batch {batch_size}, k={rows[0][2]}: " + ", ".join(parts))
    for variant, throughput, memory in store.query(
            f"SELECT variant, throughput, peak_memory_mb FROM benchmarks WHERE name = 'training' AND {where} "
            "ORDER BY variant", params):
        lines.append(f"training {variant}, {image_size} px: {throughput:.0f} images/s, peak +{memory:.0f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from training.config import add_study_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser)
    add_bench_arguments(parser)
    args = parser.parse_args(argv)

    def bench() -> int:
        config = config_from_args(args)
        store = Store(config.db)
        store.initialise()
        stage = BenchStage(config, store, bench_config_from_args(args))
        counts = stage.run()
        print(f"benchmarks: {counts['measured']} sections measured, {counts['skipped']} already stored for this machine")
        print(summary(store, stage.run_id, stage.device.type, stage.backbone_config.image_size))
        return 0

    return run_cli(bench, "sections finished so far are stored; run the same command again to continue")


if __name__ == "__main__":
    sys.exit(main())
