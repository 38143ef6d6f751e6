"""From k adapters to one multi-task model: merge ΔW layer by layer, fold into the base weights.

The merged model is the base backbone with the merged ΔW added to its weights plus the k task
heads, so one forward pass answers every task (`MultiTaskModel`). A merge can also be exported
as a peft LoRA adapter of a chosen rank (truncated SVD of each merged ΔW).
"""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path

import torch

from merging.deltas import AdapterDeltas, check_compatible
from merging.methods import get_method
from merging.peft_reference import PeftMerger
from mlvision.backbone import BackboneConfig, create_backbone
from mlvision.models import MultiTaskModel, add_lora, save_model


def layer_seed(seed: int, layer: str) -> int:
    """A per-layer seed for random methods (DARE): stable across runs and machines."""
    return (seed * 1_000_003 + zlib.crc32(layer.encode())) % (2**31)


def merge_deltas(
    adapters: list[AdapterDeltas], method: str, hyperparams: dict | None = None
) -> dict[str, torch.Tensor]:
    """Merged ΔW per layer with `method`; hyperparameters are validated (defaults filled) first."""
    check_compatible(adapters)
    merge_method = get_method(method)
    params = merge_method.validate(hyperparams or {})
    merged = {}
    for layer in adapters[0].deltas:
        layer_params = {**params, "seed": layer_seed(params["seed"], layer)} if "seed" in params else params
        merged[layer] = merge_method([a.deltas[layer] for a in adapters], **layer_params)
    return merged


class AdapterMerger:
    """Merges any subset of a fixed set of adapters with any registered method: the one merge entry.

    Data-free methods run per layer on the adapters' exact ΔW (`merge_deltas`); reference methods
    (peft's add_weighted_adapter) run through one PeftModel holding every adapter, loaded on first use.
    `merge` returns the merged ΔW per layer and the hyperparameters to store with it.
    """

    def __init__(self, adapters: dict[str, AdapterDeltas], backbone_config: BackboneConfig):
        self.adapters = adapters
        self.backbone_config = backbone_config
        self._peft: PeftMerger | None = None

    def merge(
        self, keys: list[str], method: str, hyperparams: dict | None = None
    ) -> tuple[dict[str, torch.Tensor], dict]:
        if get_method(method).kind == "reference":
            if self._peft is None:
                self._peft = PeftMerger(self.backbone_config, {key: str(a.path) for key, a in self.adapters.items()})
            return self._peft.merge(method, list(keys)), self._peft.hyperparams(method, len(keys))
        params = get_method(method).validate(hyperparams or {})
        return merge_deltas([self.adapters[key] for key in keys], method, params), params


class FoldedBackbone:
    """One base backbone whose weights are swapped to base + ΔW for each merge (no rebuild per merge)."""

    def __init__(self, config: BackboneConfig):
        self.config = config
        self.backbone = create_backbone(config)
        self._base = {name: p.detach().clone() for name, p in self.backbone.named_parameters()}

    @torch.no_grad()
    def fold(self, merged: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Set the weights to base + ΔW for the layers in `merged`, base elsewhere; returns the backbone."""
        for name, parameter in self.backbone.named_parameters():
            parameter.copy_(self._base[name])
        for layer, delta in merged.items():
            weight = self.backbone.get_submodule(layer).weight
            weight.add_(delta.to(weight.dtype).reshape(weight.shape))
        return self.backbone

    def model(self, merged: dict[str, torch.Tensor], heads: dict[str, torch.nn.Linear]) -> MultiTaskModel:
        return MultiTaskModel(self.fold(merged), heads).eval()


def build_merged_model(adapters: list[AdapterDeltas], method: str, hyperparams: dict | None = None) -> MultiTaskModel:
    """A standalone merged multi-task model (its own backbone copy): one forward pass, k answers."""
    merged = merge_deltas(adapters, method, hyperparams)
    folded = FoldedBackbone(BackboneConfig(**adapters[0].meta["backbone"]))
    return MultiTaskModel(copy.deepcopy(folded.fold(merged)), {a.task: copy.deepcopy(a.head) for a in adapters}).eval()


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B [out, r], A [r, in] with B A the best rank-r approximation of delta (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def export_merge_as_lora(
    merged: dict[str, torch.Tensor], adapters: list[AdapterDeltas], rank: int, folder: str | Path, merge_info: dict
) -> float:
    """Save a merge as a peft LoRA (alpha = rank, so scaling 1) plus the k heads; returns the relative error.

    The folder loads with `PeftModel.from_pretrained(backbone, folder)`; heads are saved as
    `heads/<task>/` model folders. The returned figure is ||ΔW - B A||_F / ||ΔW||_F over all layers.
    """
    folder = Path(folder)
    meta0 = adapters[0].meta
    backbone = create_backbone(BackboneConfig(**meta0["backbone"]))
    targets = sorted({layer.rsplit(".", 1)[-1] for layer in merged})
    peft_model = add_lora(backbone, rank=rank, alpha=rank, target_modules=targets)
    error_sq, total_sq = 0.0, 0.0
    with torch.no_grad():
        for layer, delta in merged.items():
            module = peft_model.base_model.model.get_submodule(layer)
            b, a = low_rank_factors(delta, rank)
            r = a.shape[0]
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            lora_a.zero_(), lora_b.zero_()
            lora_a[:r].copy_(a.reshape(lora_a[:r].shape))
            lora_b[:, :r].copy_(b.reshape(lora_b[:, :r].shape))
            error_sq += float((delta.double() - b.double() @ a.double()).pow(2).sum())
            total_sq += float(delta.double().pow(2).sum())
    relative_error = (error_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(folder))
    for adapter in adapters:
        save_model(
            folder / "heads" / adapter.task.replace(":", "_").replace("/", "_"),
            {**adapter.meta, "model_kind": "head", "training": {"from_adapter": str(adapter.path)}},
            adapter.head,
        )
    info = {
        **merge_info,
        "export_rank": rank,
        "relative_error": relative_error,
        "tasks": [a.task for a in adapters],
        "backbone": meta0["backbone"],
        "preprocess": meta0["preprocess"],
    }
    (folder / "merge.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return relative_error


__all__ = [
    "AdapterMerger",
    "FoldedBackbone",
    "build_merged_model",
    "export_merge_as_lora",
    "merge_deltas",
    "low_rank_factors",
]
