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
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

from mlvision.errors import AdapterError
from mlvision.models import META_FILE, load_head, read_meta

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


def _pattern_value(folder: Path, layer: str, name: str, config: dict, default):
    """A layer's r or alpha as peft's LoRA model sets it when it creates the layer: each `rank_pattern` /
    `alpha_pattern` key is a regular expression matched against the end of the module path (`get_pattern_key`).

    Why peft's own function: reading the keys as plain suffixes gives a wrong scaling, without any error, for an
    adapter whose pattern is a regex (e.g. `layers\\.[01]\\.attention\\.q_proj`).
    """
    pattern = config.get(name) or {}
    try:
        return pattern.get(get_pattern_key(pattern.keys(), layer), default)
    except re.error as error:  # peft itself cannot load such an adapter
        raise AdapterError(
            f"{folder}: a key of {name} in adapter_config.json is not a regular expression ({error}): "
            "re-train that adapter"
        ) from None


def _is_target(layer: str, target_modules) -> bool:
    """peft's own rule: a list names module suffixes, a string is a regex the whole name must match."""
    if isinstance(target_modules, str):
        try:
            return re.fullmatch(target_modules, layer) is not None
        except re.error:  # a broken pattern matches nothing, so the layer is reported as not targeted
            return False
    return any(layer == name or layer.endswith("." + name) for name in target_modules)


def read_lora_config(folder: Path) -> dict:
    """adapter_config.json, refused unless it has the fields the ΔW arithmetic relies on.

    A config that does not describe its factors would give a wrong scaling (alpha / r) without
    any error, so the fields are checked here rather than trusted.
    """
    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"cannot read {path} ({error}): re-train that adapter") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} is not a JSON object: re-train that adapter")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":  # IA3, LoHa, LoKr, ... have no B·A factors: their update is not a LoRA ΔW
        raise AdapterError(
            f"{folder} is a {peft_type} adapter (peft_type in adapter_config.json), not LoRA: "
            "only LoRA adapters can be merged here; train a LoRA adapter"
        )
    r, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{path} has no valid LoRA rank r (got {r!r}): re-train that adapter")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{path} has no valid lora_alpha (got {alpha!r}): re-train that adapter")
    if not targets or not (isinstance(targets, str) or all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"{path} has no valid target_modules (got {targets!r}): re-train that adapter")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(pattern) or {}, dict):
            raise AdapterError(f"{path} has a {pattern} that is not a JSON object: re-train that adapter")
    if config.get("use_dora"):
        raise AdapterError(f"{folder} is a DoRA adapter: its update is not B·A, so it cannot be merged here")
    return config


def _read_meta(folder: Path) -> dict:
    """task.json of an adapter, refused unless it is an object with the fields a merge reads."""
    try:
        meta = read_meta(folder)
    except (OSError, UnicodeDecodeError) as error:  # read_meta names a missing or corrupt file, not these
        raise AdapterError(f"cannot read {folder / META_FILE} ({error}): check the folder's permissions") from None
    if not isinstance(meta, dict):
        raise AdapterError(
            f"{folder / META_FILE} is not a JSON object (it holds a {type(meta).__name__}): "
            "delete the folder and re-run training"
        )
    if meta.get("model_kind") != "adapter":
        raise AdapterError(
            f"{folder} holds a {meta.get('model_kind')} model, not a LoRA adapter: pass an adapter folder"
        )
    missing = [key for key in ("task", "label_names", "backbone", "preprocess") if key not in meta]
    if missing or not isinstance(meta["backbone"], dict) or not isinstance(meta["preprocess"], dict):
        raise AdapterError(
            f"{folder / META_FILE} lacks {', '.join(missing) or 'a valid backbone or preprocess'}: "
            "delete the folder and re-run training"
        )
    return meta


def read_factors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of adapter_model.safetensors, or one line saying the file cannot be read."""
    try:
        return load_file(str(folder / "adapter_model.safetensors"))
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise AdapterError(f"cannot read the LoRA files in {folder} ({error}): re-train that adapter") from None


def deltas_from_factors(folder: Path, config: dict, factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact ΔW = scaling · B A per layer (module path without peft's prefix) from checked factor pairs.

    Every factor pair is checked against adapter_config.json (rank r, target_modules) and against
    itself (A and B of one rank, finite values): a folder whose config and factors disagree would
    otherwise merge silently with a wrong scaling, and one NaN spreads into every merged layer.
    Tensors that are not LoRA factors (a classifier in peft's modules_to_save) are left to the caller.
    """
    orphans = [
        key for key in factors if key.endswith(".lora_B.weight") and key.replace("lora_B", "lora_A") not in factors
    ]
    if orphans:
        raise AdapterError(f"{folder}: {orphans[0]} has no matching lora_A factor: re-train that adapter")
    deltas = {}
    for key, a in factors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key[len(_PREFIX) : -len(".lora_A.weight")] if key.startswith(_PREFIX) else key[: -len(".lora_A.weight")]
        b = factors.get(key.replace("lora_A", "lora_B"))
        if b is None:
            raise AdapterError(f"{folder}: layer {layer} has a LoRA A factor but no B factor: re-train that adapter")
        if a.dim() < 2 or b.dim() < 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{folder}: layer {layer} has lora_A of shape {list(a.shape)} but lora_B of shape {list(b.shape)} "
                "(their ranks differ): re-train that adapter"
            )
        rank = a.shape[0]
        expected = _pattern_value(folder, layer, "rank_pattern", config, config["r"])
        if rank != expected:
            raise AdapterError(
                f"{folder}: layer {layer} has rank-{rank} factors but adapter_config.json says r={expected}: "
                "the config does not belong to these factors; re-train that adapter"
            )
        if not _is_target(layer, config["target_modules"]):
            raise AdapterError(
                f"{folder}: layer {layer} has LoRA factors but is not in target_modules "
                f"{config['target_modules']} of adapter_config.json: re-train that adapter"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{folder}: layer {layer} has NaN or infinite LoRA factors: re-train that adapter")
        alpha = _pattern_value(folder, layer, "alpha_pattern", config, config["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        deltas[layer] = scaling * (b.flatten(1).double() @ a.flatten(1).double()).float()
    if not deltas:
        raise AdapterError(f"{folder} contains no LoRA factors: re-train that adapter")
    return deltas


def load_deltas(folder: str | os.PathLike) -> AdapterDeltas:
    """Read an adapter folder (written by training) into exact per-layer ΔW (`deltas_from_factors`)."""
    folder = Path(folder)
    meta = _read_meta(folder)
    config = read_lora_config(folder)
    deltas = deltas_from_factors(folder, config, read_factors(folder))
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
        for layer, delta in first.deltas.items():
            if other.deltas[layer].shape != delta.shape:
                raise AdapterError(
                    f"adapter {other.path} has a {list(other.deltas[layer].shape)} update for layer {layer} but "
                    f"{first.path} a {list(delta.shape)} one: merge adapters of one backbone only"
                )
    tasks = [a.task for a in adapters]
    if len(set(tasks)) != len(tasks):
        raise AdapterError(
            f"two adapters for the same task in one merge ({', '.join(tasks)}): "
            "a merged model has one head per task; pass one adapter per task"
        )
