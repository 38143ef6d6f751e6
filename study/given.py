"""A study of adapters trained elsewhere: `run_all --adapters ADAPTER[=TASK] ...` (issue 18).

Someone who already has adapters (written by this project's training on another machine, shared as a
folder or a Hub repo) wants the rest of the study on them: head baselines on the same backbone, the merge
sweep with every method, similarity and findings, in a results file the dashboard reads. This module turns
the `--adapters` list into a StudyConfig: the tasks, seeds and backbone come from the adapters, and
`given_adapters` tells the training stage to import each adapter (scored and copied like a trained one)
instead of training it. Everything downstream reads the store and the artifacts as it always does.

An adapter's identity is the sha256 of its weight files, so the same files give the same model and
merge ids wherever they lie, and a second run with the same adapters only does what is missing.

A peft LoRA from another trainer (peft's image-classification guide on a `transformers` model, or its
custom-models recipe on a timm model with `--base` naming the base, as for merging/merge.py) is converted
into this project's format first (`convert_foreign_adapter`, in the data cache) and scored on the dataset
named for it (`ADAPTER=hub:DATASET`): its base becomes the study's backbone (`BackboneConfig.base`; a
transformers base answers its classifier's input, so the evaluation path treats it like a timm backbone).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from safetensors.torch import save_file

from merging.bases import LIBRARIES, BaseLibrary
from merging.deltas import load_deltas, read_factors, read_lora_config
from merging.foreign import is_foreign, load_foreign, resolve_adapter
from merging.methods import get_method
from mlvision.backbone import BackboneConfig, create_backbone, make_preprocess
from mlvision.config import StudyConfig
from mlvision.errors import AdapterError, MergeConfigError, UnknownNameError
from mlvision.models import HEAD_FILE, META_FILE, read_meta
from mlvision.paths import cache_dir
from mlvision.store import Store
from mlvision.tasks import HUB_PREFIX, TASK_NAMES, get_task, set_hub_domains

# The files whose bytes are a given adapter: the LoRA factors, their configuration and the task head.
IDENTITY_FILES = ("adapter_config.json", "adapter_model.safetensors", HEAD_FILE)
# A peft LoRA from another trainer may also hold these (its classifier beside it, its label names).
FOREIGN_OPTIONAL_FILES = (HEAD_FILE, "labels.json")
# Options the adapters decide: giving them as well would contradict the adapters.
DECIDED_BY_ADAPTERS = ("tasks", "seeds", "backbone", "backbone_weights", "image_size")


def parse_given(item: str) -> tuple[str, str | None]:
    """ "ADAPTER=TASK" -> (ADAPTER, TASK); "ADAPTER" -> (ADAPTER, None). The first "=" splits: task names
    (hub:<id>) may hold one only where a path does, and a folder name with "=" is rarer still. A TASK that is no
    task name but a local dataset folder (a `save_to_disk` folder, as merge.py's --data takes it) is read as
    `hub:FOLDER`, the study's name for it."""
    adapter, sep, task = item.partition("=")
    if sep and (not adapter or not task):
        raise UnknownNameError(f"--adapters expects ADAPTER or ADAPTER=TASK, got {item!r}")
    if sep and not task.startswith(HUB_PREFIX) and task not in TASK_NAMES and Path(task).is_dir():
        task = HUB_PREFIX + task
    return adapter, (task if sep else None)


def content_sha256(folder: Path, optional: tuple[str, ...] = ()) -> str:
    """The sha256 of an adapter's identity files, in a fixed order (those named in `optional` where they exist)."""
    digest = hashlib.sha256()
    for name in dict.fromkeys((*IDENTITY_FILES, *optional)):
        path = folder / name
        if name in optional and not path.is_file():
            continue
        if not path.is_file():
            raise AdapterError(f"{folder} has no {name}: the adapter folder is incomplete; copy it again whole")
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def read_given(adapter: str, task: str | None, base: str | None) -> tuple[Path, dict]:
    """(local folder, task.json) of one given adapter, one from another trainer converted first; one line for
    anything this study cannot use."""
    folder, _ = resolve_adapter(adapter)
    if is_foreign(folder):
        folder = convert_foreign_adapter(adapter, folder, task, base)
    meta = read_meta(folder)
    if meta.get("model_kind") != "adapter":
        raise AdapterError(f"{adapter} is a {meta.get('model_kind')} baseline, not an adapter: pass adapter folders")
    return folder, meta


def convert_foreign_adapter(adapter: str, folder: Path, task: str | None, base: str | None) -> Path:
    """A peft LoRA from another trainer written as this project's adapter folder, in the data cache: its LoRA
    factors and config without the classifier, the classifier as head.safetensors, and a task.json naming the
    task, its labels and the base at the base's own input size and normalisation. Two recipes: peft on a timm
    model (the classifier in modules_to_save=["head"] or a head.safetensors beside it; the base `local-dir:` of
    its folder) and peft's image-classification guide on a transformers model (the classifier in
    modules_to_save=["classifier"]; the base `transformers:` of its folder, answering its classifier's input).

    All of merging/foreign.py's checks apply (LoRA only, no DoRA, no trained biases, a Linear classifier).
    Written once per (adapter files, base, task); a second study reads the cached folder."""
    if task is None:
        raise AdapterError(
            f"adapter {adapter} comes from another trainer and names no task of this project: give the dataset to "
            f"score it on as {adapter}=hub:DATASET (a save_to_disk folder or a Hub dataset id)"
        )
    adapter_deltas = load_foreign(folder, base=base, fallback_labels=list(get_task(task).label_names))
    base = adapter_deltas.meta["backbone"]["base_model_name_or_path"]
    library = LIBRARIES[adapter_deltas.meta["library"]]
    if library.study_classifier not in (None, adapter_deltas.meta["head_module"]):
        raise AdapterError(
            f"{adapter} does not keep its classifier in modules_to_save=['{library.study_classifier}'] (peft's "
            f"image-classification guide), where a study of a {library.name} model reads it: train it that way"
        )
    lora_config = read_lora_config(folder)
    factors = {key: value for key, value in read_factors(folder).items() if ".lora_" in key}
    base_folder = library.folder(base).resolve()
    # the resolved base folder is part of the key: a conversion never points at a base that has since moved
    # ... and so are the label names task.json gets: a rule for them that changes is never read from an old conversion
    labels = adapter_deltas.meta["label_names"]
    identity = [content_sha256(folder, optional=FOREIGN_OPTIONAL_FILES), base, str(base_folder), task, labels]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    target = cache_dir() / "given" / key[:20]
    if (target / META_FILE).is_file():
        return target
    architecture = _architecture(base_folder, library)
    spec = library.backbone_spec(base_folder)
    probe = create_backbone(BackboneConfig(architecture, "base", 0, spec))
    image_size = library.preprocess(str(base_folder), probe).image_size
    backbone = BackboneConfig(architecture, "base", image_size, spec)
    meta = {
        "model_kind": "adapter",
        "task": task,
        "label_names": labels,
        "domain": get_task(task).domain,
        "backbone": backbone.to_dict(),
        "preprocess": make_preprocess(backbone, probe).to_dict(),
        "training": {
            "rank": lora_config["r"],
            "alpha": lora_config.get("lora_alpha", lora_config["r"]),
            "target_modules": lora_config.get("target_modules"),
            "source": library.source,
            "adapter": adapter,
        },
        "config_hash": key,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        save_file(
            {name: value.contiguous() for name, value in factors.items()}, str(staging / "adapter_model.safetensors")
        )
        head = adapter_deltas.head.state_dict()
        save_file({name: value.contiguous() for name, value in head.items()}, str(staging / HEAD_FILE))
        written_config = {**lora_config, "modules_to_save": None, "base_model_name_or_path": base}
        (staging / "adapter_config.json").write_text(json.dumps(written_config, indent=2, sort_keys=True))
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(staging, target)  # atomic: an interrupted conversion is never read as a finished one
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / META_FILE).is_file():  # another process finishing first is fine
            raise
    return target


def _architecture(base_folder: Path, library: BaseLibrary) -> str:
    """The architecture named by a base folder's config.json: timm's "architecture" (save_for_hf), transformers'
    first "architectures" entry (save_pretrained)."""
    try:
        config = json.loads((base_folder / "config.json").read_text())
        return library.architecture(config)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise AdapterError(
            f"{base_folder} holds no config.json naming its architecture: give the base as the folder timm's "
            "save_for_hf or transformers' save_pretrained wrote, or its Hub id"
        ) from None


def given_config(config: StudyConfig, items: list[str], explicit: set[str], base: str | None = None) -> StudyConfig:
    """`config` with its tasks, seeds and backbone taken from the given adapters and `given_adapters` set.

    `explicit`: the option names the user gave; any of DECIDED_BY_ADAPTERS among them is refused. Checks,
    each one line naming the adapters: one backbone for all, each adapter's labels equal to its task's, the
    same number of adapters for every task (the sweep merges adapters of one seed across tasks), then what the
    merge sweep would refuse (`_check_mergeable`) and a --db holding other adapters for these tasks and seeds
    (`_check_store`): all before anything is stored."""
    clash = sorted(explicit & set(DECIDED_BY_ADAPTERS))
    if clash:
        options = " ".join("--" + name.replace("_", "-") for name in clash)
        raise UnknownNameError(f"--adapters decides the tasks, seeds and backbone: leave out {options}")
    set_hub_domains(dict(config.task_domains))
    given, per_task, first, folders = [], {}, None, []
    for item in items:
        adapter, task = parse_given(item)
        folder, meta = read_given(adapter, task, base)
        task = task or meta["task"]
        labels = list(get_task(task).label_names)  # an unknown task fails here, naming the known ones
        if list(meta["label_names"]) != labels:
            sources = {library.source for library in LIBRARIES.values()}
            if (meta.get("training") or {}).get("source") in sources:  # from another trainer
                raise AdapterError(
                    f"adapter {adapter} names its classes {_short(meta['label_names'])} in the labels.json or "
                    f"config.json beside it but dataset {task} has {_short(labels)}: score it on the dataset it was "
                    "trained on, or correct the names beside it"
                )
            raise AdapterError(
                f"adapter {adapter} was trained on labels {_short(meta['label_names'])} but task {task} has "
                f"{_short(labels)}: score it on a task with the same labels in the same order (ADAPTER=TASK)"
            )
        if first is None:
            first = (adapter, meta)
        elif meta["backbone"] != first[1]["backbone"]:
            raise AdapterError(
                f"adapters {first[0]} and {adapter} were trained on different backbones "
                f"({_backbone(first[1]['backbone'])} vs "
                f"{_backbone(meta['backbone'])}): a study merges adapters of one backbone; pass those of one"
            )
        seed = per_task.get(task, 0)
        per_task[task] = seed + 1
        given.append((task, seed, str(folder.resolve()), content_sha256(folder)))
        folders.append((adapter, folder))
    counts = set(per_task.values())
    if len(counts) > 1:
        listing = ", ".join(f"{task}: {n}" for task, n in per_task.items())
        raise AdapterError(
            f"every task needs the same number of adapters (the sweep merges one seed's adapters across tasks); "
            f"given {listing}"
        )
    _check_mergeable(folders, config.merge_methods or ())
    backbone = first[1]["backbone"]
    config = replace(
        config,
        tasks=tuple(per_task),
        seeds=tuple(range(counts.pop())),
        backbone=backbone["name"],
        backbone_weights=backbone["weights"],
        image_size=backbone["image_size"],
        backbone_base=backbone.get("base", ""),
        target_modules=_target_modules(first[1]) or config.target_modules,
        given_adapters=tuple(given),
    )
    _check_store(config)
    return config


# peft's add_weighted_adapter refuses adapters of different ranks for these combination types
_ONE_RANK_COMBINATIONS = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")


def _check_mergeable(folders: list[tuple[str, Path]], methods) -> None:
    """Refuse what the merge sweep would refuse only after the adapters were imported and the heads trained.

    Adapters that adapt different layers are refused, although merging/merge.py merges them with ΔW = 0 where a
    layer is missing: the sweep's methods are not all defined that way yet (RegMean's Gram matrices and
    AdaMerging's coefficients exist per adapted layer, peft's references load the adapters as they are), so the
    study takes adapters of one set of layers. Also read here as the sweep reads them (`load_deltas`: finite
    factors of the ranks their config states, ...), and checked for peft's reference merges (one rank for
    `linear` and `ties`, one kind of target_modules), which peft refuses with an exception of its own."""
    first, ranks, kinds = None, {}, {}
    for adapter, folder in folders:
        layers = set(load_deltas(folder).deltas)
        if first is None:
            first = (adapter, layers)
        elif layers != first[1]:
            example = sorted(layers ^ first[1])[0]
            raise AdapterError(
                f"adapters {first[0]} and {adapter} adapt different layers (e.g. {example}): the study's merge sweep "
                "needs adapters of the same target modules (merging/merge.py merges such adapters, a missing layer "
                "as ΔW = 0); pass adapters trained with the same target modules"
            )
        config = read_lora_config(folder)  # peft's own rank for add_weighted_adapter: r, or the largest pattern's
        ranks[adapter] = max([config["r"], *(config.get("rank_pattern") or {}).values()])
        kinds[adapter] = "a regex" if isinstance(config["target_modules"], str) else "a list"
    for method in methods:
        options = get_method(method).options  # peft's settings: a reference merge's only
        if not options:
            continue
        if options["combination_type"] in _ONE_RANK_COMBINATIONS and len(set(ranks.values())) > 1:
            shown = ", ".join(f"{adapter}: r={rank}" for adapter, rank in ranks.items())
            raise MergeConfigError(
                f"merge method {method} (peft's add_weighted_adapter) needs adapters of one rank, given {shown}: "
                f"leave {method} out of --merge-methods"
            )
        if len(set(kinds.values())) > 1:
            shown = ", ".join(f"{adapter}: {kind}" for adapter, kind in kinds.items())
            raise MergeConfigError(
                f"merge method {method} (peft's add_weighted_adapter) needs adapters whose target_modules are all "
                f"lists or all regexes, given {shown}: leave {method} out of --merge-methods"
            )


def _check_store(config: StudyConfig) -> None:
    """Refuse a --db that already holds another adapter for one of this study's (task, seed)s.

    Why: a given adapter's model id is the hash of its files, so a different adapter for the same task and seed
    (a corrected list after a failed run, or the same adapters in another order: a task's adapters are its seeds
    in the order given) would be stored beside the first, and `task_results` and every reader that groups by
    task and seed (the dashboard) would mix the two. Models are shared between the runs of one file by design (a
    later run with other merge options reuses them), so a view of "the current run's rows" would hide those."""
    path = Path(config.db)
    if not path.is_file():
        return
    with Store(path).read() as con:
        tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        rows = [] if "models" not in tables else con.execute(
            "SELECT task, seed, model_id, run_id FROM models WHERE model_kind = 'adapter' ORDER BY created_at"
        ).fetchall()  # fmt: skip
    ours = {(task, seed): config.model_id("adapter", task, seed) for task, seed, _, _ in config.given_adapters}
    for task, seed, model_id, run_id in rows:
        if (task, seed) in ours and model_id != ours[(task, seed)]:
            raise AdapterError(
                f"{path} already holds another adapter for task {task} seed {seed} ({model_id}, run {run_id}; a "
                f"task's adapters are its seeds in the order given): study these adapters into a new --db"
            )


def _target_modules(meta: dict) -> tuple[str, ...] | None:
    """The layers an adapter's LoRA targets, as its training recorded them (a list; peft's regex form is not one)."""
    targets = (meta.get("training") or {}).get("target_modules")
    return tuple(targets) if isinstance(targets, list) and targets else None


def _short(labels) -> str:
    labels = list(labels)
    return "[" + ", ".join(labels[:4]) + (", ..." if len(labels) > 4 else "") + f"] ({len(labels)})"


def _backbone(backbone: dict) -> str:
    return f"{backbone['name']} {backbone['weights']} weights at {backbone['image_size']} px"
