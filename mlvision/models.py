"""Models built on the backbone: task heads, LoRA adapters, the multi-task model, and their files.

On disk, a trained model is a folder:
- adapter:       `adapter_config.json` + `adapter_model.safetensors` (peft's own format, so
                 `PeftModel.from_pretrained(backbone, folder)` loads it), `head.safetensors`,
                 `task.json`;
- head baseline: `head.safetensors` + `task.json`.
`task.json` holds what is needed to use the model without the database: task name, label names,
backbone config, preprocessing and the full training config with its hash.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from mlvision.backbone import BackboneConfig, Preprocess, create_backbone
from mlvision.errors import AdapterError

META_FILE = "task.json"
HEAD_FILE = "head.safetensors"


class MultiTaskModel(torch.nn.Module):
    """One backbone, one linear head per task: one forward pass returns every task's logits.

    Used for the head baseline (frozen backbone), a single adapter (k = 1) and merged models.
    """

    def __init__(self, backbone: torch.nn.Module, heads: dict[str, torch.nn.Linear]):
        super().__init__()
        self.backbone = backbone
        self.heads = torch.nn.ModuleDict(heads)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        return {task: head(features) for task, head in self.heads.items()}


def make_head(feature_dim: int, num_classes: int) -> torch.nn.Linear:
    return torch.nn.Linear(feature_dim, num_classes)


def add_lora(backbone: torch.nn.Module, rank: int, alpha: float, target_modules: list[str]) -> PeftModel:
    """Wrap the backbone with a fresh peft LoRA; only the LoRA factors are trainable."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, bias="none")
    return get_peft_model(backbone, config)


@dataclass
class LoadedModel:
    """A trained model folder, loaded: `model` answers the folder's one task."""

    meta: dict
    model: MultiTaskModel
    path: Path

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.meta["preprocess"])

    @property
    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(**self.meta["backbone"])


def _atomic_folder(final: Path):
    """A temp folder beside `final`; `commit()` renames it into place (no half-written folder)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))

    def commit():
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)

    return temp, commit


def save_model(folder: Path, meta: dict, head: torch.nn.Linear, peft_model: PeftModel | None = None) -> None:
    """Write a model folder atomically (a crash leaves either the old folder or the new one)."""
    temp, commit = _atomic_folder(Path(folder))
    try:
        if peft_model is not None:
            peft_model.save_pretrained(str(temp))
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(temp / HEAD_FILE))
        (temp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    commit()


def read_meta(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not folder.is_dir():
        raise AdapterError(f"no model folder at {folder}: check the path (adapters live under artifacts/)")
    if not meta_path.exists():
        raise AdapterError(
            f"{folder} is not a Multi-LoRA Vision model folder (no {META_FILE}): "
            "pass a folder written by training/run_all.py"
        )
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{meta_path} is corrupt ({error}): delete the folder and re-run training") from None


def load_head(folder: Path, meta: dict) -> torch.nn.Linear:
    try:
        state = load_file(str(Path(folder) / HEAD_FILE))
    except Exception as error:
        raise AdapterError(
            f"cannot read the task head in {folder} ({error}): delete the folder and re-run training"
        ) from None
    head = make_head(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    if head.out_features != len(meta["label_names"]):
        raise AdapterError(
            f"head in {folder} has {head.out_features} outputs but the task has "
            f"{len(meta['label_names'])} labels: the folder is inconsistent; re-train it"
        )
    return head


def load_model(folder: str | os.PathLike, backbone: torch.nn.Module | None = None) -> LoadedModel:
    """Load an adapter or head-baseline folder (the backbone is built from its meta if not given)."""
    folder = Path(folder)
    meta = read_meta(folder)
    backbone = backbone if backbone is not None else create_backbone(BackboneConfig(**meta["backbone"]))
    head = load_head(folder, meta)
    if meta["model_kind"] == "adapter":
        try:
            backbone = PeftModel.from_pretrained(backbone, str(folder)).eval()
        except Exception as error:
            raise AdapterError(
                f"cannot load the LoRA adapter in {folder} ({error}): it does not fit backbone "
                f"{meta['backbone']['name']}; re-train it or pass the matching backbone"
            ) from None
    return LoadedModel(meta=meta, model=MultiTaskModel(backbone, {meta["task"]: head}).eval(), path=folder)
