"""The two trainers: a head on a frozen backbone, and a LoRA adapter trained with its head.

Both loops fit on one screen on purpose (nanoGPT style): a reader sees every step.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mlvision.models import add_lora, make_head


@torch.inference_mode()
def extract_features(backbone: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Frozen-backbone features for a tensor of images (computed once per task, reused by every seed)."""
    backbone.eval()
    return torch.cat([backbone(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def train_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int, lr: float,
               batch_size: int, seed: int) -> torch.nn.Linear:
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


def train_adapter(backbone: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                  rank: int, alpha: float, target_modules: list[str], steps: int, batch_size: int, lr: float,
                  head_lr: float, seed: int, progress_label: str = "adapter"):
    """Train a fresh LoRA on `backbone` together with a new linear head; returns (peft_model, head, seconds).

    BatchNorm layers stay in eval mode (base running statistics), because statistics are not part
    of the LoRA update and merged adapters must share them. One-cycle schedule: short warm-up
    then cosine decay, which reaches a good adapter in few steps.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    peft_model = add_lora(backbone, rank=rank, alpha=alpha, target_modules=target_modules)
    head = make_head(backbone.num_features, num_classes)
    lora_params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": lora_params, "lr": lr}, {"params": head.parameters(), "lr": head_lr}],
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[lr, head_lr], total_steps=steps, pct_start=0.1)
    peft_model.eval()  # BN statistics frozen; gradients still flow into the LoRA factors
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=progress_label, leave=False, unit="step")
    for _ in bar:
        batch = torch.randint(0, len(images), (batch_size,), generator=generator)
        loss = F.cross_entropy(head(peft_model(images[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return peft_model.eval(), head.eval(), time.perf_counter() - start
