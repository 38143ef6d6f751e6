"""The model card (README.md) of an exported merge folder: what it is, how well it does, how to load it.

Why a card: an export folder is meant to be shared (copied, zipped, pushed to the Hugging Face Hub with
`merging/merge.py --push`), and a folder of tensors says neither what was merged nor whether the merge
works. The card says which adapters were merged with which method and hyperparameters, the rank and
reconstruction error of the exported LoRA, each task's accuracy merged vs its single adapter vs its head
baseline where one is known ("not measured" where not: a number is never made up), and a loading snippet
that runs as written from inside the folder.

The card is text only: the exporters (`export_merge_as_lora`, `foreign.export_merge`) write it with the
figures the merge CLI looked up (`Figure`); this module opens no database and loads no model.
The metadata header is written with huggingface_hub's own `ModelCardData`, so the Hub reads it as it
reads any card (base_model, library_name, tags, pipeline_tag).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from huggingface_hub import ModelCardData

# The card is written for the Hub (merge.py --push uploads the folder), but pushing is untested here: the tests run
# offline and check only the card's text, its metadata header and that its snippet runs.

KINDS = ("merged", "single", "head")
COLUMN = {"merged": "merged", "single": "single adapter", "head": "head baseline"}
NOT_MEASURED = "not measured"
FOREIGN_NOTE = "not measured (no evaluation data for adapters trained elsewhere)"


@dataclass(frozen=True)
class Figure:
    """One accuracy on a task's test split: its value, on how many images, and where it comes from
    ("stored in results.duckdb", "measured now on 20 test images")."""

    accuracy: float
    n: int
    source: str


def format_accuracy(accuracy: float) -> str:
    """How the card prints an accuracy (tests compare against SQL through this same format)."""
    return f"{accuracy:.4f}"


def model_card(info: dict, label_names: dict[str, list[str]], figures: dict | None = None) -> str:
    """The README.md text of an export folder.

    `info` is the merge.json the exporter writes (method, hyperparams, tasks, export_rank, relative_error,
    and backbone for this project's adapters, or base_model_name_or_path, library and how_to_load for adapters
    trained elsewhere);
    `label_names` maps each task to its labels; `figures` maps task -> {"merged"|"single"|"head": Figure},
    a missing entry printed as "not measured".
    """
    foreign = "base_model_name_or_path" in info  # what merging/foreign.py's export_merge records; ours: backbone
    figures = figures or {}
    method = info["method"]
    base = info["base_model_name_or_path"] if foreign else info["backbone"]["name"]
    metadata = ModelCardData(
        base_model=base,
        library_name="peft",
        tags=["lora", "model-merging", "image-classification", method, "multi-task"],
        pipeline_tag="image-classification",
    )
    tasks = info["tasks"]
    params = ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(info.get("hyperparams", {}).items()))
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# Merge of {len(tasks)} LoRA adapters of {base} ({method})",
        "",
        f"{len(tasks)} LoRA adapters of `{base}`, one per image-classification task, merged into one model with "
        f"**{method}** ({params or 'default hyperparameters'}) by Multi-LoRA Vision (merging/merge.py), and "
        f"exported as one rank-{info['export_rank']} peft LoRA (truncated SVD of each merged weight update) with "
        f"relative reconstruction error {info['relative_error']:.4f}, plus one classification head per task "
        "under `heads/`. One forward pass through the backbone answers every task.",
        "",
        "## Tasks and accuracy (test split)",
        "",
        "| task | labels | merged | single adapter | head baseline |",
        "|---|---|---|---|---|",
    ]
    for task in tasks:
        cells = [_cell(figures.get(task, {}).get(kind), foreign and not figures.get(task)) for kind in KINDS]
        lines.append(f"| {task} | {len(label_names[task])} | {' | '.join(cells)} |")
    sources = sorted({figure.source for task in figures.values() for figure in task.values()})
    lines += ["", _figures_note(foreign, sources), "", "## Loading", ""]
    lines += _foreign_loading(info) if foreign else _own_loading()
    lines += [
        "",
        "## Caveats",
        "",
        f"Merged accuracies (stored, or measured with `--evaluate`) are those of the full merged model; this "
        f"rank-{info['export_rank']} LoRA approximates it with relative reconstruction error "
        f"{info['relative_error']:.4f} (||ΔW - BA||_F / ||ΔW||_F over all layers), so it can score differently "
        f'where that error is not small. A figure marked "{NOT_MEASURED}" was not measured for this merge, and '
        "nothing here stands in for it.",
        "",
    ]
    return "\n".join(lines)


def _cell(figure: Figure | None, foreign: bool) -> str:
    if figure is None:  # adapters from elsewhere measured with --data still have no head baseline here
        return FOREIGN_NOTE if foreign else NOT_MEASURED
    return f"{format_accuracy(figure.accuracy)} (n={figure.n}, {figure.source})"


def _figures_note(foreign: bool, sources: list[str]) -> str:
    if foreign and sources:
        return (
            "These adapters were trained elsewhere: merged and single-adapter accuracies were measured at export on "
            "the datasets given with `--data` (each adapter's own); no head baseline was trained for them here."
        )
    if foreign:
        return (
            "These adapters were trained elsewhere, so this project holds no test data or stored results for them: "
            "score the model on your own data (`--evaluate N --data ADAPTER=DATASET` measures it at export)."
        )
    if not sources:
        return (
            "No accuracy is known for this merge: none is stored in the results database for these adapters, and "
            "none was measured at export (`--evaluate N` measures the merged model)."
        )
    return (
        "Single adapter and head baseline: each task's own models, from the results database of the study that "
        "trained them. Merged: a stored merge with this very method, hyperparameters and tasks (chosen on "
        "validation by the study's sweep), or the merged model scored at export (`--evaluate`). Each figure says "
        "on how many test images it was measured, and where it comes from."
    )


def _own_loading() -> list[str]:
    """A snippet for this project's adapters: the backbone's packaged weights load through mlvision."""
    return [
        "This project's backbone weights are loaded by `mlvision.backbone.create_backbone`, so the snippet needs "
        "Multi-LoRA Vision installed (`pip install -e .` in its repository). Run it from inside this folder:",
        "",
        "```python",
        "import json",
        "from pathlib import Path",
        "",
        "import torch",
        "from peft import PeftModel",
        "from PIL import Image",
        "",
        "from mlvision.backbone import BackboneConfig, Preprocess, create_backbone",
        "from mlvision.models import load_head, read_meta",
        "",
        'info = json.loads(Path("merge.json").read_text())',
        'backbone = PeftModel.from_pretrained(create_backbone(BackboneConfig(**info["backbone"])), ".").eval()',
        'image = Image.new("RGB", (64, 64), "gray")  # one image: use Image.open("photo.jpg") for your own',
        "with torch.no_grad():",
        '    features = backbone(Preprocess.from_dict(info["preprocess"])([image]))',
        '    for folder in sorted(Path("heads").iterdir()):',
        "        meta = read_meta(folder)",
        "        top = load_head(folder, meta)(features).argmax(-1).item()",
        "        print(f\"{meta['task']}: {meta['label_names'][top]}\")",
        "```",
    ]


def _foreign_loading(info: dict) -> list[str]:
    """A snippet for adapters of a transformers model: transformers, peft and safetensors only (timm: below)."""
    if info.get("library") == "timm":
        return _timm_loading()
    head_module = info["head_module"]
    return [
        "Plain transformers + peft load it (the base model must be available to `from_pretrained`). Run from "
        "inside this folder:",
        "",
        "```python",
        "import json",
        "from pathlib import Path",
        "",
        "import torch",
        "from peft import PeftModel",
        "from safetensors.torch import load_file",
        "from transformers import AutoModelForImageClassification",
        "",
        'base = json.loads(Path("merge.json").read_text())["base_model_name_or_path"]',
        'for folder in sorted(Path("heads").iterdir()):',
        '    labels = json.loads((folder / "labels.json").read_text())',
        "    model = AutoModelForImageClassification.from_pretrained(",
        '        base, num_labels=len(labels["label_names"]), ignore_mismatched_sizes=True)',
        '    model = PeftModel.from_pretrained(model, ".").eval()',
        f'    classifier = model.base_model.model.get_submodule("{head_module}")',
        '    classifier.load_state_dict(load_file(str(folder / "head.safetensors")))',
        '    size = getattr(model.config, "image_size", 224)',
        "    torch.manual_seed(0)",
        "    pixels = torch.rand(1, 3, size, size)  # one image; yours: AutoImageProcessor.from_pretrained(base)",
        "    with torch.no_grad():",
        "        top = model(pixel_values=pixels).logits.argmax(-1).item()",
        "    print(f\"{labels['task']}: {labels['label_names'][top]}\")",
        "```",
    ]


def _timm_loading() -> list[str]:
    """A snippet for adapters of a timm model: timm + peft + safetensors only. A base named by a folder loads through
    timm's `local-dir:`, a `timm/...` Hub id through `hf-hub:` (how timm.create_model names Hub repos)."""
    return [
        "Plain timm + peft load it (the base model must be available to `timm.create_model`). Run from inside this "
        "folder:",
        "",
        "```python",
        "import json",
        "from pathlib import Path",
        "",
        "import timm",
        "import torch",
        "from peft import PeftModel",
        "from safetensors.torch import load_file",
        "",
        'base = json.loads(Path("merge.json").read_text())["base_model_name_or_path"]',
        "if Path(base).is_dir():  # a local folder, as timm's save_for_hf writes it",
        '    base = f"local-dir:{base}"',
        'elif base.startswith("timm/"):  # a Hub repo of timm\'s',
        '    base = f"hf-hub:{base}"',
        'for folder in sorted(Path("heads").iterdir()):',
        '    labels = json.loads((folder / "labels.json").read_text())',
        '    model = PeftModel.from_pretrained(timm.create_model(base, pretrained=True), ".").eval()',
        '    model.base_model.model.reset_classifier(len(labels["label_names"]))',
        '    model.base_model.model.get_classifier().load_state_dict(load_file(str(folder / "head.safetensors")))',
        '    size = timm.data.resolve_data_config({}, model=model.base_model.model)["input_size"][-1]',
        "    torch.manual_seed(0)",
        "    pixels = torch.rand(1, 3, size, size)  # one image; yours: timm.data.create_transform(...)",
        "    with torch.no_grad():",
        "        top = model(pixels).argmax(-1).item()",
        "    print(f\"{labels['task']}: {labels['label_names'][top]}\")",
        "```",
    ]


__all__ = ["Figure", "format_accuracy", "model_card"]
