"""A study of adapters trained elsewhere: `run_all --adapters ADAPTER[=TASK] ...` (issue 18).

Someone who already has adapters (written by this project's training on another machine, shared as a
folder or a Hub repo) wants the rest of the study on them: head baselines on the same backbone, the merge
sweep with every method, similarity and findings, in a results file the dashboard reads. This module turns
the `--adapters` list into a StudyConfig: the tasks, seeds and backbone come from the adapters, and
`given_adapters` tells the training stage to import each adapter (scored and copied like a trained one)
instead of training it. Everything downstream reads the store and the artifacts as it always does.

An adapter's identity is the sha256 of its weight files, so the same files give the same model and
merge ids wherever they lie, and a second run with the same adapters only does what is missing.

Adapters from other trainers (a peft LoRA of a transformers or timm model) are merged and scored by
`merging/merge.py` (`--data ... --evaluate`); the whole study needs this project's evaluation path,
which folds a timm backbone, so it refuses them with one line saying so.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from merging.foreign import resolve_adapter
from mlvision.config import StudyConfig
from mlvision.errors import AdapterError, UnknownNameError
from mlvision.models import HEAD_FILE, META_FILE, read_meta
from mlvision.tasks import get_task, set_hub_domains

# The files whose bytes are a given adapter: the LoRA factors, their configuration and the task head.
IDENTITY_FILES = ("adapter_config.json", "adapter_model.safetensors", HEAD_FILE)
# Options the adapters decide: giving them as well would contradict the adapters.
DECIDED_BY_ADAPTERS = ("tasks", "seeds", "backbone", "backbone_weights", "image_size")


def parse_given(item: str) -> tuple[str, str | None]:
    """ "ADAPTER=TASK" -> (ADAPTER, TASK); "ADAPTER" -> (ADAPTER, None). The first "=" splits: task names
    (hub:<id>) may hold one only where a path does, and a folder name with "=" is rarer still."""
    adapter, sep, task = item.partition("=")
    if sep and (not adapter or not task):
        raise UnknownNameError(f"--adapters expects ADAPTER or ADAPTER=TASK, got {item!r}")
    return adapter, (task if sep else None)


def content_sha256(folder: Path) -> str:
    """The sha256 of an adapter's identity files, in a fixed order."""
    digest = hashlib.sha256()
    for name in IDENTITY_FILES:
        path = folder / name
        if not path.is_file():
            raise AdapterError(f"{folder} has no {name}: the adapter folder is incomplete; copy it again whole")
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def read_given(adapter: str) -> tuple[Path, dict]:
    """(local folder, task.json) of one given adapter; one line for anything this study cannot use."""
    folder, _ = resolve_adapter(adapter)
    if folder.is_dir() and not (folder / META_FILE).exists() and (folder / "adapter_config.json").exists():
        raise AdapterError(
            f"{adapter} is a peft LoRA from another trainer (no {META_FILE}): a whole study runs on adapters "
            f"written by this project's training; merge and score it with python merging/merge.py {adapter} ... "
            "--data ADAPTER=DATASET --evaluate N"
        )
    meta = read_meta(folder)
    if meta.get("model_kind") != "adapter":
        raise AdapterError(f"{adapter} is a {meta.get('model_kind')} baseline, not an adapter: pass adapter folders")
    return folder, meta


def given_config(config: StudyConfig, items: list[str], explicit: set[str]) -> StudyConfig:
    """`config` with its tasks, seeds and backbone taken from the given adapters and `given_adapters` set.

    `explicit`: the option names the user gave; any of DECIDED_BY_ADAPTERS among them is refused. Checks,
    each one line naming the adapters: one backbone for all, each adapter's labels equal to its task's, the
    same number of adapters for every task (the sweep merges adapters of one seed across tasks)."""
    clash = sorted(explicit & set(DECIDED_BY_ADAPTERS))
    if clash:
        options = " ".join("--" + name.replace("_", "-") for name in clash)
        raise UnknownNameError(f"--adapters decides the tasks, seeds and backbone: leave out {options}")
    set_hub_domains(dict(config.task_domains))
    given, per_task, first = [], {}, None
    for item in items:
        adapter, task = parse_given(item)
        folder, meta = read_given(adapter)
        task = task or meta["task"]
        labels = list(get_task(task).label_names)  # an unknown task fails here, naming the known ones
        if list(meta["label_names"]) != labels:
            raise AdapterError(
                f"adapter {adapter} was trained on labels {_short(meta['label_names'])} but task {task} has "
                f"{_short(labels)}: score it on a task with the same labels in the same order (ADAPTER=TASK)"
            )
        if first is None:
            first = (adapter, meta["backbone"])
        elif meta["backbone"] != first[1]:
            raise AdapterError(
                f"adapters {first[0]} and {adapter} were trained on different backbones ({_backbone(first[1])} vs "
                f"{_backbone(meta['backbone'])}): a study merges adapters of one backbone; pass those of one"
            )
        seed = per_task.get(task, 0)
        per_task[task] = seed + 1
        given.append((task, seed, str(folder.resolve()), content_sha256(folder)))
    counts = set(per_task.values())
    if len(counts) > 1:
        listing = ", ".join(f"{task}: {n}" for task, n in per_task.items())
        raise AdapterError(
            f"every task needs the same number of adapters (the sweep merges one seed's adapters across tasks); "
            f"given {listing}"
        )
    backbone = first[1]
    return replace(
        config,
        tasks=tuple(per_task),
        seeds=tuple(range(counts.pop())),
        backbone=backbone["name"],
        backbone_weights=backbone["weights"],
        image_size=backbone["image_size"],
        given_adapters=tuple(given),
    )


def _short(labels) -> str:
    labels = list(labels)
    return "[" + ", ".join(labels[:4]) + (", ..." if len(labels) > 4 else "") + f"] ({len(labels)})"


def _backbone(backbone: dict) -> str:
    return f"{backbone['name']} {backbone['weights']} weights at {backbone['image_size']} px"
