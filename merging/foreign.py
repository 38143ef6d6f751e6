"""Adapters this project did not train: a peft LoRA of a `transformers` image-classification model.

The recipe of peft's image-classification guide: `AutoModelForImageClassification.from_pretrained(base,
num_labels=n, ignore_mismatched_sizes=True)`, `LoraConfig(target_modules=[...], modules_to_save=["classifier"])`,
`save_pretrained(folder)`. Such a folder holds adapter_config.json (naming `base_model_name_or_path`) and
adapter_model.safetensors (the LoRA factors plus the saved classifier), and no task.json. It becomes the same
`AdapterDeltas` the merge methods take: exact ΔW per layer (read by merging/deltas.py, with all of its
checks), the classifier as the task head, the label names, and the base model as its "backbone".

The merged model for evaluation is the base model with the merged ΔW added to its adapted weights and
its classifier replaced by one head per task, all applied to the classifier's usual input (for ViT, the
final layernorm's CLS token): `build_merged_model`. `export_merge` writes it as a plain peft LoRA of the
base model plus one head per task.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from merging.deltas import AdapterDeltas, deltas_from_factors, read_factors, read_lora_config
from merging.merged_model import (
    MERGE_INFO_FILE,
    check_export_rank,
    check_merge_fits,
    check_output_folder,
    lora_from_merge,
    write_folder_atomically,
)
from mlvision.errors import AdapterError
from mlvision.models import HEAD_FILE, META_FILE
from mlvision.runs import relative_to_repo

SOURCE = "peft-transformers"
LABELS_FILE = "labels.json"
_PREFIX = "base_model.model."


def is_foreign(folder: str | os.PathLike) -> bool:
    """A peft adapter folder of another origin: adapter_config.json and no task.json (this project's marker)."""
    folder = Path(folder)
    return (folder / "adapter_config.json").is_file() and not (folder / META_FILE).exists()


def _base_name(folder: Path, config: dict) -> str:
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise AdapterError(
            f"{folder / 'adapter_config.json'} names no base_model_name_or_path: "
            "set it to the transformers model the adapter was trained on"
        )
    return base


def _classifier(folder: Path, config: dict, factors: dict[str, torch.Tensor]) -> tuple[str, torch.nn.Linear]:
    """The module name and weights of the one Linear classifier peft saved through `modules_to_save`."""
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    found = [name for name in saved if f"{_PREFIX}{name}.weight" in factors]
    if len(found) != 1:
        raise AdapterError(
            f"{folder} saves {'no' if not found else 'more than one'} classifier through modules_to_save "
            f"(got {saved}): train it with modules_to_save=['classifier'] so its task head is saved with it"
        )
    name = found[0]
    weight, bias = factors[f"{_PREFIX}{name}.weight"], factors.get(f"{_PREFIX}{name}.bias")
    if weight.dim() != 2 or (bias is not None and bias.shape != weight.shape[:1]):
        raise AdapterError(
            f"{folder}: the saved {name} is not a Linear layer (weight {list(weight.shape)}): "
            "only a Linear classifier can be a task head here"
        )
    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise AdapterError(f"{folder}: the saved {name} has NaN or infinite weights: re-train that adapter")
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return name, head


def _refuse_other_weights(folder: Path, config: dict, factors: dict[str, torch.Tensor], head_module: str) -> None:
    """Refuse what a merge of B·A updates would silently drop or misread: trained biases (bias="all" or
    "lora_only", lora_bias), other modules_to_save, and transposed factors (fan_in_fan_out, GPT-2's Conv1D)."""
    if config.get("fan_in_fan_out"):
        raise AdapterError(
            f"{folder} was trained with fan_in_fan_out (transposed weights): only adapters of Linear layers "
            "can be merged here"
        )
    for key in factors:
        if key.endswith((".lora_A.weight", ".lora_B.weight")) or key.startswith(f"{_PREFIX}{head_module}."):
            continue
        raise AdapterError(
            f"{folder} saves {key}, which is neither a LoRA factor nor its classifier (trained biases or another "
            "module in modules_to_save): a merge would drop it; train with bias='none' and only the classifier "
            "in modules_to_save"
        )


def read_labels_file(path: str | os.PathLike) -> list[str]:
    """Label names from a JSON list, a JSON {id: name} object (or one under "id2label"), or one name per line."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise AdapterError(f"cannot read labels file {path} ({error}): pass a readable file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):  # labels.json as this module writes it, or a transformers-style id2label
        data = data.get("label_names", data.get("id2label", data))
    if isinstance(data, dict):
        try:
            data = [data[key] for key in sorted(data, key=int)]
        except (TypeError, ValueError):
            data = None
    if not isinstance(data, list) or not data or not all(isinstance(name, str) for name in data):
        raise AdapterError(
            f"labels file {path} holds no list of label names: write a JSON list, an id2label object, "
            "or one name per line"
        )
    return data


def _config_labels(config_path: Path) -> list[str] | None:
    """id2label of a transformers config.json, unless it holds transformers' placeholders (LABEL_0, ...)."""
    try:
        id2label = json.loads(config_path.read_text()).get("id2label")
        names = [id2label[key] for key in sorted(id2label, key=int)]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None
    # transformers fills id2label with LABEL_i when none was given: those name nothing
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return [str(name) for name in names]


def _label_names(folder: Path, base: str, n_classes: int, labels_file: Path | None) -> list[str]:
    """Label names in the order: --labels for this adapter, labels.json or config.json beside it, the base model's
    config.json (a local folder) when its size matches the classifier. A size that does not match is refused."""
    candidates = []
    if labels_file is not None:
        candidates.append((str(labels_file), read_labels_file(labels_file)))
    elif (folder / LABELS_FILE).is_file():
        candidates.append((str(folder / LABELS_FILE), read_labels_file(folder / LABELS_FILE)))
    elif (folder / "config.json").is_file():
        candidates.append((str(folder / "config.json"), _config_labels(folder / "config.json")))
    for source, names in candidates:
        if names is not None and len(names) != n_classes:
            raise AdapterError(
                f"{source} names {len(names)} labels but the classifier of {folder} has {n_classes} outputs: "
                "give one name per class"
            )
        if names is not None:
            return names
    base_names = _config_labels(Path(base) / "config.json")
    if base_names is not None and len(base_names) == n_classes:
        return base_names
    raise AdapterError(
        f"adapter {folder} has no label names for its {n_classes} classes: save them beside it as {LABELS_FILE} "
        f"(a JSON list) or pass --labels {folder}=FILE"
    )


def load_foreign(folder: str | os.PathLike, labels_file: str | os.PathLike | None = None) -> AdapterDeltas:
    """Read a transformers peft LoRA folder into exact per-layer ΔW, its classifier as head, and its labels.

    The checks are deltas.py's (peft type, DoRA, rank and alpha patterns, rsLoRA, finite values, orphan
    factors, damaged file), so an adapter from elsewhere is held to the same rules as this project's own.
    The task is named after the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"no adapter folder at {folder}: check the path")
    config = read_lora_config(folder)
    base = _base_name(folder, config)
    factors = read_factors(folder)
    deltas = deltas_from_factors(folder, config, factors)
    head_module, head = _classifier(folder, config, factors)
    _refuse_other_weights(folder, config, factors, head_module)
    labels = _label_names(folder, base, head.out_features, Path(labels_file) if labels_file else None)
    meta = {
        "task": folder.name,
        "label_names": labels,
        "backbone": {"base_model_name_or_path": base},
        "preprocess": {},
        "model_kind": "adapter",
        "source": SOURCE,
        "head_module": head_module,
    }
    return AdapterDeltas(path=folder, meta=meta, deltas=deltas, head=head)


def base_model_name(adapters: list[AdapterDeltas]) -> str:
    """The one base model the adapters share, or one line naming two adapters whose bases differ."""
    first = adapters[0]
    base = first.meta["backbone"]["base_model_name_or_path"]
    for other in adapters[1:]:
        theirs = other.meta["backbone"]["base_model_name_or_path"]
        if theirs != base:
            raise AdapterError(
                f"adapter {other.path} was trained on base model {theirs} but {first.path} on {base}: "
                "merge adapters of one base model only"
            )
        if other.meta["head_module"] != first.meta["head_module"]:
            raise AdapterError(
                f"adapter {other.path} saves its classifier as {other.meta['head_module']} but {first.path} as "
                f"{first.meta['head_module']}: merge adapters of one model class only"
            )
    return base


def fill_missing_layers(adapters: list[AdapterDeltas]) -> tuple[list[AdapterDeltas], dict[str, list[str]]]:
    """Adapters over the union of their layers, a layer an adapter does not adapt given ΔW = 0.

    Why zero: every data-free method here is defined on task vectors τ_i = θ_i − θ_0 of whole models, and
    a fine-tuned model whose adapter leaves a layer alone has θ_i = θ_0 there, so τ_i is exactly 0 on that
    layer; merging over only the adapters that have it would instead change the method (a mean over fewer
    tasks). Returns the filled adapters and, per layer, the tasks that adapted it (for the merge record).
    Two adapters with different shapes for one layer are refused by `check_compatible` afterwards.
    """
    layers: dict[str, list[str]] = {}
    shapes: dict[str, torch.Size] = {}
    for adapter in adapters:
        for layer, delta in adapter.deltas.items():
            layers.setdefault(layer, []).append(adapter.task)
            shapes.setdefault(layer, delta.shape)
    filled = []
    for adapter in adapters:
        deltas = {layer: adapter.deltas.get(layer, torch.zeros(shapes[layer])) for layer in layers}
        filled.append(AdapterDeltas(path=adapter.path, meta=adapter.meta, deltas=deltas, head=adapter.head))
    return filled, {layer: tasks for layer, tasks in sorted(layers.items())}


def load_base_model(name: str) -> torch.nn.Module:
    """The base transformers model, offline (a local folder or the local Hugging Face cache), in eval mode."""
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging

    shown, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    # a command's output is its own lines: no progress bar per load, and no load report about the base's own
    # classifier (missing or resized), which is replaced by the task heads anyway
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        return AutoModelForImageClassification.from_pretrained(name, local_files_only=True).eval()
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for a missing or odd model
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterError(
            f"cannot load base model {name} offline ({reason}): download it first or point "
            "base_model_name_or_path at a local folder"
        ) from None
    finally:
        logging.set_verbosity(verbosity)
        if shown:
            logging.enable_progress_bar()


class MergedClassifier(torch.nn.Module):
    """The base model with the merged ΔW in its weights and one classifier per task on its pooled features.

    The base's own classifier is replaced by Identity, so the model's "logits" are exactly the classifier's
    input (ViTForImageClassification: the final layernorm's CLS token); each task head is applied to them.
    """

    def __init__(self, model: torch.nn.Module, head_module: str, heads: dict[str, torch.nn.Linear]):
        super().__init__()
        model.set_submodule(head_module, torch.nn.Identity())
        self.model = model
        self.heads = torch.nn.ModuleDict({task.replace(".", "_"): head for task, head in heads.items()})
        self.tasks = {task: task.replace(".", "_") for task in heads}

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.model(pixel_values=pixel_values).logits
        return {task: self.heads[key](features) for task, key in self.tasks.items()}


def build_merged_model(adapters: list[AdapterDeltas], merged: dict[str, torch.Tensor]) -> MergedClassifier:
    """The merged multi-task model: base weights + merged ΔW (float64 sum, cast back), one head per task."""
    base = base_model_name(adapters)
    model = load_base_model(base)
    check_merge_fits(model, merged, f"base model {base}")
    with torch.no_grad():
        for layer, delta in merged.items():
            weight = model.get_submodule(layer).weight
            weight.copy_((weight.double() + delta.double()).to(weight.dtype))
    heads = {a.task: a.head for a in adapters}
    return MergedClassifier(model, adapters[0].meta["head_module"], heads).eval()


def head_folder_name(task: str) -> str:
    return task.replace(":", "_").replace("/", "_")


def export_merge(
    merged: dict[str, torch.Tensor],
    adapters: list[AdapterDeltas],
    rank: int,
    folder: str | Path,
    merge_info: dict,
    overwrite: bool = False,
) -> float:
    """Save a merge of transformers adapters as a peft LoRA of the base model plus one head per task.

    The folder loads with `PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base,
    num_labels=n, ignore_mismatched_sizes=True), folder)`; `heads/<task>/head.safetensors` is that task's
    classifier (load it into the model's classifier) and `heads/<task>/labels.json` its label names. The LoRA is
    the truncated SVD of each merged ΔW (`lora_from_merge`); returns its relative reconstruction error. Checked
    with `check_output_folder` and written atomically: nothing is left at `folder` on an error.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    check_output_folder(folder, [a.path for a in adapters], overwrite)
    check_export_rank(rank, merged)
    base = base_model_name(adapters)
    model = load_base_model(base)
    check_merge_fits(model, merged, f"base model {base}")
    with warnings.catch_warnings():
        # transformers 5 warns from inside peft's wrapping of its models about its own renamed attribute
        # (is_gradient_checkpointing): nothing the user can act on, so not part of the command's output
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model, relative_error = lora_from_merge(model, merged, rank)
    head_module = adapters[0].meta["head_module"]
    info = {
        **merge_info,
        "source": SOURCE,
        "base_model_name_or_path": base,
        "head_module": head_module,
        "export_rank": rank,
        "relative_error": relative_error,
        "tasks": [a.task for a in adapters],
        "labels": {a.task: a.meta["label_names"] for a in adapters},
        "how_to_load": (
            "PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base, num_labels=n, "
            f"ignore_mismatched_sizes=True), folder), then load heads/<task>/{HEAD_FILE} into its {head_module}"
        ),
    }

    def write(temp: Path) -> None:
        peft_model.save_pretrained(str(temp))
        for adapter in adapters:
            head_dir = temp / "heads" / head_folder_name(adapter.task)
            head_dir.mkdir(parents=True)
            state = {key: value.detach().contiguous() for key, value in adapter.head.state_dict().items()}
            save_file(state, str(head_dir / HEAD_FILE))
            labels = {
                "task": adapter.task,
                "label_names": adapter.meta["label_names"],
                "from_adapter": relative_to_repo(adapter.path),
            }
            (head_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2))
        (temp / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))

    write_folder_atomically(folder, write)
    return relative_error


__all__ = [
    "MergedClassifier",
    "build_merged_model",
    "export_merge",
    "fill_missing_layers",
    "is_foreign",
    "load_foreign",
    "read_labels_file",
]
