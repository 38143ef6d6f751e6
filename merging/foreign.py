"""Adapters this project did not train: peft LoRAs of a `transformers` or a timm image-classification model.

Two recipes are read:
- peft's image-classification guide: `AutoModelForImageClassification.from_pretrained(base, num_labels=n,
  ignore_mismatched_sizes=True)`, `LoraConfig(target_modules=[...], modules_to_save=["classifier"])`,
  `save_pretrained(folder)`; adapter_config.json names `base_model_name_or_path`;
- peft on a timm model (peft's custom-models guide): `timm.create_model(base, pretrained=True, num_classes=n)`,
  LoRA on e.g. `qkv`, the classifier in `modules_to_save=["head"]` or saved beside the adapter as
  `head.safetensors` (weight, bias). peft writes no base model name for timm models (they have no
  `name_or_path`), so it is given with `--base` (a timm hub id such as `timm/vit_base_patch16_224.augreg_in21k`,
  `hf-hub:...`, `local-dir:FOLDER`, or a folder holding timm's config.json).
Either folder holds no task.json (this project's marker). It becomes the same `AdapterDeltas` the merge methods
take: exact ΔW per layer (read by merging/deltas.py, with all of its checks), the classifier as the task head,
the label names, and the base model as its "backbone". A folder may also come from the Hugging Face Hub:
`hub:user/adapter` (`resolve_adapter`), read from the local Hub cache or downloaded.

The merged model for evaluation is the base model with the merged ΔW added to its adapted weights and
its classifier replaced by one head per task, all applied to the classifier's usual input (for ViT, the
final layernorm's CLS token): `build_merged_classifier`. `export_merge` writes it as a plain peft LoRA of the
base model plus one head per task.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

from merging.bases import LIBRARIES, BaseLibrary, hub_snapshot, library_of
from merging.deltas import AdapterDeltas, deltas_from_factors, read_factors, read_lora_config
from merging.export import adapter_origin, check_merge_fits, write_export
from mlvision.backbone import Preprocess
from mlvision.errors import AdapterError
from mlvision.models import HEAD_FILE, META_FILE

LABELS_FILE = "labels.json"
HUB_PREFIX = "hub:"
_PREFIX = "base_model.model."


def is_foreign(folder: str | os.PathLike) -> bool:
    """A peft adapter folder of another origin: adapter_config.json and no task.json (this project's marker)."""
    folder = Path(folder)
    return (folder / "adapter_config.json").is_file() and not (folder / META_FILE).exists()


def _base_name(folder: Path, config: dict, given: str | None) -> str:
    """The adapter's base model: adapter_config.json's base_model_name_or_path, else `given` (--base)."""
    named = config.get("base_model_name_or_path")
    if isinstance(named, str) and named:
        if given and given != named:
            raise AdapterError(
                f"--base {given} contradicts {folder / 'adapter_config.json'}, which names base model {named}: "
                "leave --base out for adapters that name their base"
            )
        return named
    if given:
        return given
    raise AdapterError(
        f"{folder / 'adapter_config.json'} names no base_model_name_or_path (peft writes none for timm models): "
        "pass --base with the model it was trained on (e.g. --base timm/vit_base_patch16_224.augreg_in21k)"
    )


def _classifier(folder: Path, config: dict, factors: dict[str, torch.Tensor]) -> tuple[str | None, torch.nn.Linear]:
    """The task head: the one Linear classifier peft saved through `modules_to_save` (its module name), or else
    a `head.safetensors` beside the adapter (module name None: timm names it, `model.get_classifier()`)."""
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    found = [name for name in saved if f"{_PREFIX}{name}.weight" in factors]
    if len(found) > 1 or (not found and not (folder / HEAD_FILE).is_file()):
        raise AdapterError(
            f"{folder} saves {'no' if not found else 'more than one'} classifier through modules_to_save "
            f"(got {saved}) and no {HEAD_FILE}: train it with modules_to_save=['classifier'] (timm: ['head']) "
            f"or save the classifier's weight and bias beside it as {HEAD_FILE}"
        )
    if found:
        name = found[0]
        return name, _linear(
            f"{folder}: the saved {name}", factors[f"{_PREFIX}{name}.weight"], factors.get(f"{_PREFIX}{name}.bias")
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(folder / HEAD_FILE))
    except (OSError, SafetensorError) as error:
        raise AdapterError(f"cannot read {folder / HEAD_FILE} ({error}): save the classifier again") from None
    if "weight" not in state or set(state) - {"weight", "bias"}:
        raise AdapterError(
            f"{folder / HEAD_FILE} holds {sorted(state)}: it must hold the classifier's 'weight' (and 'bias') only"
        )
    return None, _linear(str(folder / HEAD_FILE), state["weight"], state.get("bias"))


def _linear(where: str, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """A Linear head with these weights, or one line saying why they cannot be one."""
    if weight.dim() != 2 or (bias is not None and bias.shape != weight.shape[:1]):
        raise AdapterError(
            f"{where} is not a Linear layer (weight {list(weight.shape)}): only a Linear classifier can be a task head"
        )
    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise AdapterError(f"{where} has NaN or infinite weights: re-train that adapter")
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            head.bias.copy_(bias.float())
    return head


def _refuse_other_weights(
    folder: Path, config: dict, factors: dict[str, torch.Tensor], head_module: str | None
) -> None:
    """Refuse what a merge of B·A updates would silently drop or misread: trained biases (bias="all" or
    "lora_only", lora_bias), other modules_to_save, and transposed factors (fan_in_fan_out, GPT-2's Conv1D)."""
    if config.get("fan_in_fan_out"):
        raise AdapterError(
            f"{folder} was trained with fan_in_fan_out (transposed weights): only adapters of Linear layers "
            "can be merged here"
        )
    for key in factors:
        if key.endswith((".lora_A.weight", ".lora_B.weight")) or (
            head_module and key.startswith(f"{_PREFIX}{head_module}.")
        ):
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


def _label_names(
    folder: Path, base: str, n_classes: int, labels_file: Path | None, fallback: list[str] | None = None
) -> list[str]:
    """Label names in the order: --labels for this adapter, labels.json or config.json beside it, `fallback` (the
    class names of the dataset it is scored on), and last the base model's config.json (a local folder) when its
    size matches the classifier. A size that does not match is refused.

    Why the base's names come last, with a warning: they name the classes the base was trained on, which an
    adapter with a fresh classifier of the same size (peft's guide) need not share; used silently, they were
    stamped onto adapters whose classes were others.
    """
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
    if fallback is not None:
        if len(fallback) != n_classes:
            raise AdapterError(
                f"the classifier of {folder} has {n_classes} outputs but the task it is scored on has "
                f"{len(fallback)} labels: name the dataset it was trained on (ADAPTER=hub:DATASET)"
            )
        return list(fallback)
    base_names = _config_labels(Path(base) / "config.json")
    if base_names is not None and len(base_names) == n_classes:
        print(
            f"warning: adapter {folder} has no label names of its own; using those of base model {base} "
            f"({_preview(base_names)}), which may not be its classes: pass --labels {folder}=FILE or save "
            f"{LABELS_FILE} beside it to give the right ones",
            file=sys.stderr,
        )
        return base_names
    raise AdapterError(
        f"adapter {folder} has no label names for its {n_classes} classes: save them beside it as {LABELS_FILE} "
        f"(a JSON list) or pass --labels {folder}=FILE"
    )


def _preview(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def load_foreign(
    folder: str | os.PathLike,
    labels_file: str | os.PathLike | None = None,
    base: str | None = None,
    hub_id: str | None = None,
    fallback_labels: list[str] | None = None,
) -> AdapterDeltas:
    """Read a peft LoRA folder of a transformers or timm model into exact per-layer ΔW, its head and its labels.

    The checks are deltas.py's (peft type, DoRA, rank and alpha patterns, rsLoRA, finite values, orphan
    factors, damaged file), so an adapter from elsewhere is held to the same rules as this project's own.
    `base` (--base) names the base model of an adapter whose config names none. The task is named after the
    adapter's Hub repo id (`hub_id`, when it came from the Hub) or its folder. `fallback_labels`: the class names of
    the dataset the adapter is scored on (a study passes its task's; `dataset_label_names`), used when the adapter's
    files give none, before the base model's (`_label_names`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"no adapter folder at {folder}: check the path")
    config = read_lora_config(folder)
    base = _base_name(folder, config, base)
    factors = read_factors(folder)
    deltas = deltas_from_factors(folder, config, factors)
    head_module, head = _classifier(folder, config, factors)
    _refuse_other_weights(folder, config, factors, head_module)
    labels = _label_names(folder, base, head.out_features, Path(labels_file) if labels_file else None, fallback_labels)
    library = library_of(base)
    meta = {
        "task": hub_id or folder.name,
        "hub_id": hub_id,
        "label_names": labels,
        "backbone": {"base_model_name_or_path": base},
        "preprocess": {},
        "model_kind": "adapter",
        "source": library.source,
        "library": library.name,
        "head_module": head_module,
    }
    return AdapterDeltas(path=folder, meta=meta, deltas=deltas, head=head)


def resolve_adapter(text: str | os.PathLike) -> tuple[Path, str | None]:
    """An adapter argument as (local folder, task name or None): `hub:user/adapter` is looked up in the local
    Hugging Face cache first (no network), then downloaded; its task is named after the repo id. A local path
    is returned as it is."""
    text = str(text)
    if not text.startswith(HUB_PREFIX):
        return Path(text), None
    repo_id = text[len(HUB_PREFIX) :]
    return hub_snapshot(repo_id, f"adapter {text}"), repo_id


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
        if (
            LIBRARIES[first.meta["library"]].classifier_by_name
            and other.meta["head_module"] != first.meta["head_module"]
        ):
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


def expand_sources(sources: list[str]) -> list[str]:
    """Adapter arguments with each folder of adapter folders replaced by its adapter subfolders (sorted), so
    `--adapters my_adapters/` serves every adapter kept there; Hub ids and adapter folders stay as they are."""
    expanded = []
    for source in sources:
        folder = Path(source)
        if (
            source.startswith(HUB_PREFIX)
            or not folder.is_dir()
            or (folder / "adapter_config.json").exists()
            or (folder / "task.json").exists()  # this project's model folder (an adapter, or a head to be refused)
        ):
            expanded.append(source)
            continue
        inside = sorted(str(sub) for sub in folder.iterdir() if (sub / "adapter_config.json").is_file())
        if not inside:
            raise AdapterError(f"{folder} holds no adapter (no adapter_config.json in it or its subfolders)")
        expanded.extend(inside)
    return expanded


class MergedClassifier(torch.nn.Module):
    """The base model with the merged ΔW in its weights and one classifier per task on its pooled features.

    The base's own classifier is removed, so the model's output is exactly the classifier's input
    (ViTForImageClassification: the final layernorm's CLS token, as "logits"; timm: its pre-logits features,
    `reset_classifier(0)`: `BaseLibrary.remove_classifier`); each task head is applied to them.
    """

    def __init__(self, model: torch.nn.Module, library: BaseLibrary, head_module: str | None, heads: dict):
        super().__init__()
        library.remove_classifier(model, head_module)
        self.model, self.library = model, library
        self.heads = torch.nn.ModuleDict({task.replace(".", "_"): head for task, head in heads.items()})
        self.tasks = {task: task.replace(".", "_") for task in heads}

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.library.features(self.model, pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixel_values)
        return {task: self.heads[key](features) for task, key in self.tasks.items()}


def build_merged_classifier(
    adapters: list[AdapterDeltas], merged: dict[str, torch.Tensor], base_model: torch.nn.Module | None = None
) -> MergedClassifier:
    """The merged multi-task model: base weights + merged ΔW (float64 sum, cast back), one head per task.

    `base_model`, the base already loaded (the demo keeps one), is copied, never changed; without it the base
    is loaded from its name."""
    base = base_model_name(adapters)
    library = LIBRARIES[adapters[0].meta["library"]]
    model = copy.deepcopy(base_model) if base_model is not None else library.load(base)
    check_merge_fits(model, merged, f"base model {base}")
    with torch.no_grad():
        for layer, delta in merged.items():
            weight = model.get_submodule(layer).weight
            weight.copy_((weight.double() + delta.double().reshape(weight.shape)).to(weight.dtype))
    heads = {a.task: a.head for a in adapters}
    return MergedClassifier(model, library, adapters[0].meta["head_module"], heads).eval()


def dataset_label_names(source: str) -> list[str]:
    """The ClassLabel names of a dataset given as --data (a `save_to_disk` folder or a Hub dataset id), read as the
    study's `hub:` tasks are: what `load_foreign(fallback_labels=...)` takes for an adapter scored on it."""
    from mlvision.tasks import HUB_PREFIX as DATA_PREFIX
    from mlvision.tasks import get_task

    return list(get_task(source if source.startswith(DATA_PREFIX) else f"{DATA_PREFIX}{source}").label_names)


def evaluation_data(
    adapters: list[AdapterDeltas], datasets_for: dict[str, str], preprocess: Preprocess, n: int, split: str = "test"
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{task: (images, labels)}: up to `n` images of `split` (test, validation or train) of each adapter's own
    dataset (`datasets_for[task]`: a `save_to_disk` folder or a Hub dataset id, read as this project's `hub:` tasks
    are: image and ClassLabel columns found, a missing test or validation split carved from train, seeded, so the
    three never share an image), preprocessed for the base model.

    The dataset's class names must be the adapter's label names in the same order (an adapter's output i is
    its label i); otherwise one line shows both, since a silent mismatch would score the wrong classes."""
    from mlvision.data import split_tensors
    from mlvision.tasks import HUB_PREFIX as DATA_PREFIX

    data = {}
    for adapter in adapters:
        if adapter.task not in datasets_for:
            raise AdapterError(
                f"no evaluation data for adapter {adapter.task}: pass --data {adapter.path}=DATASET "
                "(a save_to_disk folder or a Hub dataset id)"
            )
        source = datasets_for[adapter.task]
        name = source if source.startswith(DATA_PREFIX) else f"{DATA_PREFIX}{source}"
        names = dataset_label_names(source)
        if names != adapter.meta["label_names"]:
            raise AdapterError(
                f"dataset {source} has classes {names[:6]}{'...' if len(names) > 6 else ''} but adapter {adapter.task} "
                f"has labels {adapter.meta['label_names'][:6]}: give the adapter its own dataset, or its label names "
                "in the dataset's order with --labels"
            )
        data[adapter.task] = split_tensors(name, split, preprocess, n)
    return data


@torch.no_grad()
def foreign_grams(
    adapter: AdapterDeltas, base_model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """RegMean's statistics for an adapter from elsewhere: G[layer] [in, in] = the mean of x xᵀ over every input
    vector x of each adapted layer (one per image and token), with the adapter's own ΔW in the base model and its
    task's training `images` going through it (what merging/grams.py computes for this project's adapters, here
    through `build_merged_classifier`, the foreign models' evaluation path). float32, as GramStore keeps them."""
    from merging.grams import layer_input_grams

    model = build_merged_classifier([adapter], adapter.deltas, base_model)

    def run_batches():
        for start in range(0, len(images), batch_size):
            model.features(images[start : start + batch_size])

    grams = layer_input_grams(model.model, adapter, run_batches, "the base model")
    return {layer: gram.float() for layer, gram in grams.items()}


class ForeignGrams:
    """The Gram matrices of adapters from elsewhere, computed once per adapter on `images_for(task)` (its dataset's
    training images, --data) through `foreign_grams`: what `AdapterMerger` asks a GramStore for (`get`, `products`).
    Kept in memory only: these adapters' data is the user's, not the project's cache's."""

    def __init__(self, base_model: torch.nn.Module, images_for):
        self.base_model = base_model
        self.images_for = images_for
        self._grams: dict[str, dict[str, torch.Tensor]] = {}
        self._products: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, adapter: AdapterDeltas) -> dict[str, torch.Tensor]:
        key = str(adapter.path)
        if key not in self._grams:
            self._grams[key] = foreign_grams(adapter, self.base_model, self.images_for(adapter.task))
        return self._grams[key]

    def products(self, adapter: AdapterDeltas) -> dict[str, torch.Tensor]:
        """ΔW G per layer (float64), RegMean's α-independent part, kept across the grid's merges."""
        key = str(adapter.path)
        if key not in self._products:
            grams = self.get(adapter)
            self._products[key] = {layer: d.double() @ grams[layer].double() for layer, d in adapter.deltas.items()}
        return self._products[key]


def recorded_base(base: str) -> str:
    """The base model's name as an export records it: a local folder as an absolute path (the card's snippet then
    loads it from any working directory, whatever --base was relative to), a Hub id as it is."""
    if base.startswith("local-dir:"):
        return f"local-dir:{Path(base[len('local-dir:') :]).resolve()}"
    return str(Path(base).resolve()) if Path(base).exists() else base


def export_merge(
    merged: dict[str, torch.Tensor],
    adapters: list[AdapterDeltas],
    rank: int,
    folder: str | Path,
    merge_info: dict,
    overwrite: bool = False,
    figures: dict | None = None,
    base_model: torch.nn.Module | None = None,
) -> float:
    """Save a merge of transformers or timm adapters as a peft LoRA of the base model plus one head per task.
    `base_model`: the base already loaded (copied, never changed), else it is loaded from its name.

    The folder loads with `PeftModel.from_pretrained(base model, folder)` (`how_to_load` in merge.json says how
    for its library); `heads/<task>/head.safetensors` is that task's classifier (load it into the model's
    classifier) and `heads/<task>/labels.json` its label names; the rest is `write_export`'s (the LoRA by
    truncated SVD, merge.json, the model card, atomic). Returns the LoRA's relative reconstruction error.
    """
    from safetensors.torch import save_file

    base = recorded_base(base_model_name(adapters))
    head_module, library = adapters[0].meta["head_module"], LIBRARIES[adapters[0].meta["library"]]
    info = {
        **merge_info,
        "source": library.source,
        "library": library.name,
        "base_model_name_or_path": base,
        "head_module": head_module,
        "labels": {a.task: a.meta["label_names"] for a in adapters},
        "how_to_load": library.how_to_load(head_module),
    }

    def write_head(head_dir: Path, adapter: AdapterDeltas) -> None:
        head_dir.mkdir(parents=True)
        state = {key: value.detach().contiguous() for key, value in adapter.head.state_dict().items()}
        save_file(state, str(head_dir / HEAD_FILE))
        origin = adapter_origin(adapter)
        labels = {"task": adapter.task, "label_names": adapter.meta["label_names"], "from_adapter": origin}
        (head_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2))

    return write_export(
        folder,
        adapters,
        merged,
        rank,
        # loaded by write_export after its cheap checks
        lambda: copy.deepcopy(base_model) if base_model is not None else library.load(base),
        f"base model {base}",
        info,
        write_head,
        figures,
        overwrite,
    )


__all__ = [
    "ForeignGrams",
    "MergedClassifier",
    "build_merged_classifier",
    "dataset_label_names",
    "expand_sources",
    "export_merge",
    "fill_missing_layers",
    "foreign_grams",
    "is_foreign",
    "load_foreign",
    "read_labels_file",
    "resolve_adapter",
]
