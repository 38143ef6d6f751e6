"""Adapters as exact per-layer weight updates: ΔW = scaling · B A, read straight from peft's files.

Why by hand: peft computes ΔW only inside a built model (`get_delta_weight`), which costs a model
per adapter; reading the factors from `adapter_model.safetensors` is the same arithmetic, exact,
and lets a sweep hold k adapters as plain tensors. 1x1 convolutions are flattened to 2-D
[out, in] so merge methods see one shape for every layer kind.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from mlvision.errors import AdapterError
from mlvision.models import load_head, read_meta

_PREFIX = "base_model.model."


@dataclass
class AdapterDeltas:
    """One adapter as data: its per-layer updates, its task head and its metadata."""

    path: Path
    meta: dict
    deltas: dict[str, torch.Tensor]  # layer name (timm module path) -> ΔW [out, in], float32
    head: torch.nn.Linear

    @property
    def task(self) -> str:
        return self.meta["task"]


def _pattern_value(layer: str, pattern: dict, default):
    """peft's rank/alpha patterns: the first key that the layer name ends with."""
    for key, value in pattern.items():
        if layer == key or layer.endswith("." + key):
            return value
    return default


def load_deltas(folder: str | os.PathLike) -> AdapterDeltas:
    """Read an adapter folder (written by training) into exact per-layer ΔW."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta.get("model_kind") != "adapter":
        raise AdapterError(
            f"{folder} holds a {meta.get('model_kind')} model, not a LoRA adapter: pass an adapter folder"
        )
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        factors = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, json.JSONDecodeError, Exception) as error:
        raise AdapterError(f"cannot read the LoRA files in {folder} ({error}): re-train that adapter") from None
    if config.get("use_dora"):
        raise AdapterError(f"{folder} is a DoRA adapter: its update is not B·A, so it cannot be merged here")
    deltas = {}
    for key, a in factors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key[len(_PREFIX) : -len(".lora_A.weight")] if key.startswith(_PREFIX) else key[: -len(".lora_A.weight")]
        b = factors.get(key.replace("lora_A", "lora_B"))
        if b is None:
            raise AdapterError(f"{folder}: layer {layer} has a LoRA A factor but no B factor: re-train that adapter")
        rank = a.shape[0]
        alpha = _pattern_value(layer, config.get("alpha_pattern") or {}, config["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        deltas[layer] = scaling * (b.flatten(1).double() @ a.flatten(1).double()).float()
    if not deltas:
        raise AdapterError(f"{folder} contains no LoRA factors: re-train that adapter")
    return AdapterDeltas(path=folder, meta=meta, deltas=deltas, head=load_head(folder, meta))


def check_compatible(adapters: list[AdapterDeltas]) -> None:
    """Adapters merged together must share backbone, preprocessing and target layers.

    Different LoRA ranks are fine (they merge in ΔW space); a different backbone or a different
    set of adapted layers is not, and the message names the adapter that differs.
    """
    if not adapters:
        raise AdapterError("no adapters given: pass at least one adapter folder")
    first = adapters[0]
    for other in adapters[1:]:
        if other.meta["backbone"] != first.meta["backbone"]:
            raise AdapterError(
                f"adapter {other.path} was trained on backbone {other.meta['backbone']} but "
                f"{first.path} on {first.meta['backbone']}: merge adapters of one backbone only"
            )
        if other.meta["preprocess"] != first.meta["preprocess"]:
            raise AdapterError(
                f"adapter {other.path} uses preprocessing {other.meta['preprocess']} but {first.path} "
                f"uses {first.meta['preprocess']}: merge adapters trained at one image size"
            )
        if set(other.deltas) != set(first.deltas):
            missing = sorted(set(first.deltas) ^ set(other.deltas))[:3]
            raise AdapterError(
                f"adapter {other.path} adapts other layers than {first.path} (e.g. {', '.join(missing)}): "
                "merge adapters trained with the same target modules"
            )
    tasks = [a.task for a in adapters]
    if len(set(tasks)) != len(tasks):
        raise AdapterError(
            f"two adapters for the same task in one merge ({', '.join(tasks)}): "
            "a merged model has one head per task; pass one adapter per task"
        )
