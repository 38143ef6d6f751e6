"""The two trainers: a head on a frozen backbone, and a LoRA adapter trained with its head.

Both loops fit on one screen on purpose (nanoGPT style): a reader sees every step.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs
from tqdm.auto import tqdm

from mlvision.errors import MLVisionError
from mlvision.models import add_lora, make_head


def train_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> torch.nn.Linear:
    """A linear head on cached features (the head baseline): AdamW, cosine schedule."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = make_head(features.shape[1], num_classes)
    steps = epochs * max(1, -(-len(features) // batch_size))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        for batch in torch.randperm(len(features), generator=generator).split(batch_size):
            loss = F.cross_entropy(head(features[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


class AdapterWithHead(torch.nn.Module):
    """The peft model and its task head as one module, so DDP sees (and all-reduces) both."""

    def __init__(self, peft_model: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.peft_model = peft_model
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.peft_model(images))


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1) -> Accelerator:
    """The one Accelerator of a process: a single CPU/GPU under `python`, DDP under `accelerate launch`.

    run_all's own options (not the launcher's flags) decide precision and accumulation, because they
    are recorded with the study; a launcher flag that disagrees is refused rather than ignored.
    """
    for variable, ours, option in (
        ("ACCELERATE_MIXED_PRECISION", mixed_precision, "--mixed-precision"),
        ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", str(grad_accum), "--grad-accum"),
    ):
        theirs = os.environ.get(variable)
        if theirs is not None and theirs.lower() != ours:
            raise MLVisionError(
                f"accelerate launch asked for {variable.split('_', 1)[1].lower()} = {theirs} but run_all has "
                f"{option} {ours}: give run_all's {option} {theirs} instead (it is recorded with the study)"
            )
    # The other ranks wait at a barrier while the main process evaluates and stores each adapter
    # (and trains the head baselines): allow that longer than torch's default 10 minutes.
    patience = InitProcessGroupKwargs(timeout=timedelta(hours=2))
    return Accelerator(
        mixed_precision=mixed_precision,
        kwargs_handlers=[patience],
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum),
    )


def train_adapter(
    backbone: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    rank: int,
    alpha: float,
    target_modules: list[str],
    steps: int,
    batch_size: int,
    lr: float,
    head_lr: float,
    seed: int,
    progress_label: str = "adapter",
    accelerator: Accelerator | None = None,
    channels_last: bool = False,
):
    """Train a fresh LoRA on `backbone` together with a new linear head; returns (peft_model, head, seconds).

    BatchNorm layers stay in eval mode (base running statistics), because statistics are not part
    of the LoRA update and merged adapters must share them. One-cycle schedule: short warm-up
    then cosine decay, which reaches a good adapter in few steps.

    Under `accelerate launch` every rank draws the same global batch of `batch_size` indices (same
    seeded generator) and trains on its own slice of it; DDP averages the gradients, so one step
    sees the same global batch as a single process would. Each slice is further cut into
    `accelerator.gradient_accumulation_steps` micro-batches (memory, not maths). With one process,
    no accumulation and no mixed precision the steps and random draws are exactly those of a plain
    loop, so the weights are bit-identical to training without accelerate. The returned modules are
    unwrapped and on the CPU, where evaluation and saving expect them. `channels_last` runs the steps
    in NHWC memory order (faster convolutions on CPUs; the same maths rounded in another order).
    """
    accelerator = accelerator or make_accelerator()
    shards = accelerator.num_processes * accelerator.gradient_accumulation_steps
    if batch_size % shards:
        raise MLVisionError(f"--batch-size {batch_size} must be divisible by processes x --grad-accum = {shards}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    peft_model = add_lora(backbone, rank=rank, alpha=alpha, target_modules=target_modules)
    head = make_head(backbone.num_features, num_classes)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    peft_model.to(memory_format=memory_format)
    lora_params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": lora_params, "lr": lr}, {"params": head.parameters(), "lr": head_lr}], weight_decay=0.0
    )
    # Stepped by hand once per optimizer step: accelerate's prepared scheduler would step once per process.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[lr, head_lr], total_steps=steps, pct_start=0.1)
    model, optimizer = accelerator.prepare(AdapterWithHead(peft_model, head), optimizer)
    model.eval()  # BN statistics frozen; gradients still flow into the LoRA factors
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=progress_label, leave=False, unit="step", disable=not accelerator.is_main_process)
    for _ in bar:
        batch = torch.randint(0, len(images), (batch_size,), generator=generator)
        shard = batch.chunk(accelerator.num_processes)[accelerator.process_index]
        for micro in shard.chunk(accelerator.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                x, y = images[micro].to(accelerator.device), labels[micro].to(accelerator.device)
                x = x.contiguous(memory_format=memory_format)
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()  # step and zero_grad are no-ops until the step's last micro-batch
                optimizer.zero_grad()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    unwrapped = accelerator.unwrap_model(model).cpu().to(memory_format=torch.contiguous_format)
    accelerator.free_memory()
    return unwrapped.peft_model.eval(), unwrapped.head.eval(), time.perf_counter() - start
