"""What the `paper` profile's shapes cost on this machine: a ViT-B/16 at 224 px through the study's hot paths.

    python -m benchmarks.paper_shapes --device cuda        # on a GPU (scripts/device_check.sh vit-b16 runs it)
    python -m benchmarks.paper_shapes --device cpu --train-batch 4 --steps 2 --images 16 --gram-images 16 --k 2

A user choosing `--config paper` wants to know before starting what a training step, the Gram matrices, a k = 6
RegMean merge, the sweep's scoring of a merged model and the demo's batch answer cost at that scale. The model is
**randomly initialised** (timm's `vit_base_patch16_224` without weights, so nothing is downloaded) and the images
and adapters are random tensors of the right shapes: the figures say what the shapes cost (time, throughput, peak
memory), never anything about accuracy.

Each figure is the median of `--repeats` timed runs after one warm-up (torch.cuda.synchronize around each on a
GPU); peak memory is benchmarks/timing.py's `PeakMemory` (device memory allocated on a GPU, the resident-size
peak on a CPU) over the timed block. The study's paper settings are the defaults: LoRA rank 16 on qkv, proj, fc1
and fc2, training batch 128, 256 Gram images per adapter, k = 6.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.timing import PeakMemory, median_p95, time_interleaved
from merging.deltas import AdapterDeltas
from merging.grams import compute_grams
from merging.merged_model import merge_deltas
from mlvision.backbone import BackboneConfig, create_backbone
from mlvision.evaluation import FoldedBackbone, predict
from mlvision.models import add_lora, make_head

PAPER_BACKBONE = "vit_base_patch16_224"  # the paper profile's architecture (its weights: AugReg ImageNet-21k)
TARGETS = ["qkv", "proj", "fc1", "fc2"]
CLASSES = 10


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbone",
        default=PAPER_BACKBONE,
        help=f"a timm ViT, randomly initialised (default: {PAPER_BACKBONE}; the tests use vit_tiny)",
    )
    parser.add_argument("--image-size", type=int, default=224, help="input size in pixels (default: 224)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-batch", type=int, default=128, help="images per training step (default: 128)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (default: 5)")
    parser.add_argument("--images", type=int, default=1024, help="images the merged model scores (default: 1024)")
    parser.add_argument("--gram-images", type=int, default=256, help="images per adapter's Gram matrices (256)")
    parser.add_argument("--k", type=int, default=6, help="adapters merged (default: 6)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    parser.add_argument("--demo-batch", type=int, default=8, help="images in the demo's batched answer (default: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure after a warm-up (default: 3)")
    return parser


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(median seconds, peak memory MB over the timed runs) of `fn()` after one warm-up run."""
    fn()
    with PeakMemory(device) as memory:
        times_ms = time_interleaved({"run": fn}, repeats, warmup=0, device=device)["run"]
    return median_p95(times_ms)[0] / 1000.0, memory.peak_mb


def backbone_config(args) -> BackboneConfig:
    return BackboneConfig(name=args.backbone, weights="random", image_size=args.image_size)


def random_adapters(k: int, rank: int, folded: FoldedBackbone) -> list[AdapterDeltas]:
    """k adapters of rank `rank` on every targeted layer: ΔW = B A with entries of LoRA's trained size (1e-2)."""
    model = folded.prepared.model
    layers = {
        name: module.weight.shape
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, torch.nn.Linear)
    }
    generator = torch.Generator().manual_seed(0)
    adapters = []
    for i in range(k):
        deltas = {
            layer: (torch.randn(out, rank, generator=generator) @ torch.randn(rank, inp, generator=generator)) * 1e-2
            for layer, (out, inp) in layers.items()
        }
        head = make_head(model.num_features, CLASSES)
        adapters.append(
            AdapterDeltas(
                Path(f"random-{i}"),
                {"task": f"task{i}", "backbone": folded.config.to_dict(), "preprocess": {}},
                deltas,
                head,
            )
        )
    return adapters


def training_step(args, device: torch.device) -> tuple[float, float | None]:
    """An adapter training step: LoRA on qkv/proj/fc1/fc2 and a head, AdamW, the backbone in eval mode (as the
    trainer keeps BatchNorm; a ViT has none, so this is only the trainer's setting)."""
    model = add_lora(
        create_backbone(backbone_config(args)), rank=args.rank, alpha=2.0 * args.rank, target_modules=TARGETS
    )
    model = model.to(device).eval()
    head = make_head(model.num_features, CLASSES).to(device)
    images = torch.randn(args.train_batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, CLASSES, (args.train_batch,), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(head.parameters()))

    def step():
        loss = F.cross_entropy(head(model(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return timed(step, device, args.steps)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    rows: list[tuple[str, str, str]] = []  # (what, figure, peak memory)

    def row(what: str, figure: str, peak: float | None) -> None:
        rows.append((what, figure, "n/a" if peak is None else f"{peak:,.0f} MB"))
        print(f"{what}: {figure} (peak memory {rows[-1][2]})", flush=True)

    threads = torch.get_num_threads()
    print(f"{args.backbone} (random weights: cost only, no accuracy) at {args.image_size} px on {device}, {threads} "
          "CPU threads", flush=True)  # fmt: skip
    seconds, peak = training_step(args, device)
    row(
        f"training step, batch {args.train_batch}", f"{seconds:.3f} s, {args.train_batch / seconds:,.1f} images/s", peak
    )
    # 2. Gram matrices of each adapter (RegMean's statistics), 3. a RegMean merge of k, 4. the sweep's scoring
    folded = FoldedBackbone(backbone_config(args), device=device)
    adapters = random_adapters(args.k, args.rank, folded)
    gram_images = torch.randn(args.gram_images, 3, args.image_size, args.image_size)
    seconds, peak = timed(lambda: compute_grams(folded, adapters[0], gram_images), device, args.repeats)
    row(f"Gram matrices, one adapter, {args.gram_images} images", f"{seconds:.2f} s ({args.k} adapters: "
        f"{seconds * args.k:.1f} s)", peak)  # fmt: skip
    grams = [compute_grams(folded, adapter, gram_images) for adapter in adapters]
    seconds, peak = timed(lambda: merge_deltas(adapters, "regmean", {}, grams=grams), device, args.repeats)
    row(f"RegMean merge, k = {args.k}", f"{seconds:.2f} s", peak)
    merged = merge_deltas(adapters, "regmean", {}, grams=grams)
    heads = {adapter.task: adapter.head for adapter in adapters}
    scored = torch.randn(args.images, 3, args.image_size, args.image_size)
    seconds, peak = timed(lambda: predict(folded.model(merged, heads), scored), device, args.repeats)
    row(f"sweep scoring: fold + {args.images} images, {args.k} heads", f"{seconds:.2f} s, "
        f"{args.images / seconds:,.1f} images/s", peak)  # fmt: skip
    # 5. the demo's batched answer: one forward of a batch through the merged multi-task model
    served = folded.model(merged, heads)
    batch = torch.randn(args.demo_batch, 3, args.image_size, args.image_size, device=device)
    seconds, peak = timed(lambda: predict(served, batch), device, args.repeats)
    per_image = seconds * 1000 / args.demo_batch
    row(f"demo answer, batch of {args.demo_batch}", f"{seconds * 1000:.0f} ms ({per_image:.0f} ms per image)", peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
