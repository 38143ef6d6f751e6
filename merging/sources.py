"""Where a merge's adapters come from: one interface, `AdapterSource`, over this project's adapters and peft LoRAs
trained elsewhere (FusionBench's model pools are the model).

Why one interface: a merge, a served model and an export need the same five things of a set of adapters, whatever
trained them, and each used to be written twice (the demo had a second service class for adapters from elsewhere).
What a source provides:
- read: `adapters`, one `AdapterDeltas` per task (exact ΔW per layer, the task head, the label names);
- preprocess: `preprocess`, how an image is fed to the backbone (its input size and normalisation);
- merge: `merge(group, method, hyperparams)`, the merged ΔW (with the statistics the source has: `grams`);
- build: `build(merged, group)`, the merged multi-task model answering {task: logits} for a batch;
- export: `export(merged, adapters, rank, folder, info)`, the folder merging/merge.py writes (a rank-r peft LoRA,
  one head per task, merge.json and the model card);
- stored figures or none: `db_path`, the results database that stored its adapters' accuracies and merges (None for
  adapters trained elsewhere), and `trained_here`, whether its tasks' images (validation, test, examples) load here.

Two implementations: `OwnAdapters` (this project's adapters: a timm backbone with ΔW folded in, merging/grams.py's
Gram matrices, `export_own_lora`) and `PeftAdapters` (peft LoRAs of a timm or a transformers model, read by
merging/foreign.py; what differs between the two libraries is the `BaseLibrary` object it holds, merging/bases.py).
"""

from __future__ import annotations

import copy
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from merging.bases import LIBRARIES, BaseLibrary
from merging.deltas import AdapterDeltas, check_compatible, load_deltas
from merging.export import export_own_lora
from merging.foreign import (
    base_model_name,
    build_merged_classifier,
    expand_sources,
    export_merge,
    fill_missing_layers,
    is_foreign,
    load_foreign,
    resolve_adapter,
)
from merging.grams import GRAM_IMAGES, GramStore
from merging.merged_model import AdapterMerger, merge_deltas
from merging.methods import get_method
from mlvision.backbone import BackboneConfig, Preprocess
from mlvision.data import split_tensors
from mlvision.errors import AdapterError, StoreError
from mlvision.evaluation import FoldedBackbone
from mlvision.models import MultiTaskModel
from mlvision.runs import resolve_stored_path
from mlvision.store import Store


class AdapterSource(ABC):
    """A set of adapters of one backbone, one per task, and what a merge of them needs (see the module's docstring).
    A new kind of adapter (another trainer's format, another base library) is one more subclass."""

    adapters: dict[str, AdapterDeltas]  # task -> its adapter
    preprocess: Preprocess
    base: str  # the base model's (backbone's) name
    grams: GramStore | None = None  # RegMean's statistics where the tasks' training images are here, else None
    db_path: Path | None = None  # the results database holding its adapters' stored figures; None: none stored
    seed: int | None = None  # the adapters' training seed where a study recorded one
    trained_here: bool = False  # whether its tasks are this project's: their images load here

    @abstractmethod
    def merge(
        self, group: tuple[str, ...], method: str, hyperparams: dict | None
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """(merged ΔW per layer, the hyperparameters used) of the group's adapters."""

    @abstractmethod
    def build(self, merged: dict[str, torch.Tensor], group: tuple[str, ...]) -> torch.nn.Module:
        """A model answering {task: logits} for a batch of images: the backbone with `merged`, one head per task."""

    @abstractmethod
    def export(self, merged, adapters: list[AdapterDeltas], rank: int, folder: Path, info: dict) -> float:
        """The merge written as merging/merge.py writes it; returns the LoRA's relative reconstruction error."""

    @abstractmethod
    def origin_line(self) -> str:
        """Where the adapters come from, in one phrase (the demo's header)."""

    def missing_statistics(self) -> dict[str, str]:
        """{task: why} for the tasks whose statistics (RegMean's Gram matrices) cannot be had here."""
        return {}


class OwnAdapters(AdapterSource):
    """This project's adapters (task.json beside each): the backbone of their training with ΔW folded in, the sweep's
    Gram matrices (same cache, same images: a RegMean merge with the stored α is the merge the study scored)."""

    trained_here = True

    def __init__(self, adapters: list[AdapterDeltas], db_path: Path | None = None, seed: int | None = None):
        self.adapters = {adapter.task: adapter for adapter in adapters}
        check_compatible(adapters)
        first = adapters[0].meta
        self.preprocess = Preprocess.from_dict(first["preprocess"])
        self.backbone_config = BackboneConfig(**first["backbone"])
        self.base = self.backbone_config.name
        self.db_path, self.seed = db_path, seed
        self.folded = FoldedBackbone(self.backbone_config)
        self.grams = GramStore(self.folded, self._training_images)
        self._merger = AdapterMerger(self.adapters, self.backbone_config, grams=self.grams)
        self._fold_lock = threading.Lock()

    @classmethod
    def from_db(cls, db_path: str | Path) -> OwnAdapters:
        """The adapters of one seed (the smallest stored) of the study stored in `db_path`, one per task."""
        db_path = Path(db_path)
        if not db_path.exists():
            raise StoreError(
                f"no results database at {db_path}: run `python training/run_all.py` first or pass --db PATH"
            )
        rows = Store(db_path).query(
            "SELECT task, seed, path FROM models WHERE model_kind = 'adapter' ORDER BY task, seed"
        )
        if not rows:
            raise StoreError(f"{db_path} holds no trained adapters: run `python training/run_all.py` first")
        seed = min(seed for _, seed, _ in rows)
        adapters: dict[str, AdapterDeltas] = {}
        for task, row_seed, path in rows:
            if row_seed == seed and task not in adapters:
                adapters[task] = load_deltas(resolve_stored_path(path))
        return cls([adapters[task] for task in sorted(adapters)], db_path, seed)

    def _training_images(self, task: str) -> torch.Tensor:
        """The training images RegMean's Gram matrices are computed on (the sweep's: the first GRAM_IMAGES)."""
        return split_tensors(task, "train", self.preprocess, GRAM_IMAGES)[0]

    def merge(self, group, method, hyperparams):
        return self._merger.merge(group, method, hyperparams)

    def build(self, merged, group):
        with self._fold_lock:  # FoldedBackbone rewrites one shared backbone in place
            backbone = self.folded.standalone(merged)
        heads = {task: copy.deepcopy(self.adapters[task].head) for task in group}
        return MultiTaskModel(backbone, heads).eval()

    def export(self, merged, adapters, rank, folder, info):
        return export_own_lora(merged, adapters, rank, folder, info)[0]

    def origin_line(self) -> str:
        return f"One LoRA adapter per task (seed {self.seed}) on `{self.base}`"


class PeftAdapters(AdapterSource):
    """peft LoRAs of one timm or transformers base model, trained elsewhere (merging/foreign.py reads them): the base
    loaded once (copied for every model built, never changed), served as base + merged ΔW with one classifier per
    task. No statistics: their training images are not here."""

    def __init__(self, adapters: list[AdapterDeltas]):
        if len({a.task for a in adapters}) < len(adapters):
            raise AdapterError("two adapters have the same name (their folder or hub id): rename one folder")
        self.base = base_model_name(adapters)
        filled, self.layer_sources = fill_missing_layers(adapters)
        check_compatible(filled)
        self.adapters = {adapter.task: adapter for adapter in filled}
        self.library: BaseLibrary = LIBRARIES[filled[0].meta["library"]]
        self.base_model = self.library.load(self.base)
        self.preprocess = self.library.preprocess(self.base, self.base_model)
        self._build_lock = threading.Lock()

    @classmethod
    def from_arguments(
        cls, sources: list[str], base: str | None = None, labels: dict[str, str] | None = None
    ) -> PeftAdapters:
        """`sources`: adapter folders, folders of adapter folders, or hub:user/adapter ids; `base`: the base model of
        adapters whose config names none (timm); `labels`: {source as given: labels file}."""
        labels_for = {_key(source): file for source, file in (labels or {}).items()}
        adapters = []
        for source in expand_sources(list(sources)):
            folder, hub_id = resolve_adapter(source)
            if not is_foreign(folder):
                raise AdapterError(
                    f"{source} is not an adapter trained elsewhere (no adapter_config.json, or this project's "
                    "task.json): serve this project's adapters from their results database with --db"
                )
            adapters.append(load_foreign(folder, labels_for.pop(_key(source), None), base, hub_id))
        if labels_for:
            raise AdapterError(f"--labels names {next(iter(labels_for))}, which is not one of the adapters served")
        return cls(adapters)

    def merge(self, group, method, hyperparams):
        params = get_method(method).validate(dict(hyperparams or {}))
        return merge_deltas([self.adapters[t] for t in group], method, params), params

    def build(self, merged, group):
        with self._build_lock:  # one deep copy of the base at a time (its memory, not correctness)
            return build_merged_classifier([self.adapters[t] for t in group], merged, self.base_model)

    def export(self, merged, adapters, rank, folder, info):
        tasks = {a.task for a in adapters}
        layers = {layer: names for layer, names in self.layer_sources.items() if set(names) & tasks}
        return export_merge(merged, adapters, rank, folder, {**info, "layers": layers})

    def origin_line(self) -> str:
        return f"LoRA adapters trained elsewhere, one per task, on `{self.base}`"

    def missing_statistics(self) -> dict[str, str]:
        return {
            task: f"adapter {task} was trained elsewhere: its training images are not here" for task in self.adapters
        }


def _key(source: str) -> str:
    """An adapter argument as --labels may name it: a hub id as written, a folder by its absolute path."""
    return source if source.startswith("hub:") else str(Path(source).resolve())


__all__ = ["AdapterSource", "OwnAdapters", "PeftAdapters"]
