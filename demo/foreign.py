"""The demo serving adapters this project did not train: `python demo/app.py --adapters DIR_OR_HUB_ID ...`.

`ForeignDemoService` is `DemoService` with the three steps that depend on the adapters' origin replaced
(`_merge`, `_build`, `_export`) by merging/foreign.py's: the adapters are peft LoRAs of one transformers or
timm base model (folders, folders of folders, or `hub:user/adapter`), merged with the per-layer methods, served
as the base model + merged ΔW with one classifier per task, and exported as merging/merge.py exports them.
Uploads, batching, the compare mode and the download are DemoService's own, unchanged.

What such adapters do not bring, the page says instead of guessing: no stored accuracies (nothing was
evaluated), no method chosen on validation ("auto" is the fallback method), no RegMean (its statistics need
the training images), no out-of-domain check (no validation images to calibrate on), no example images and no
native image size.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from demo.service import SERVED_KINDS, DemoService
from merging.deltas import AdapterDeltas, check_compatible
from merging.foreign import (
    base_model_name,
    base_preprocess,
    build_merged_model,
    expand_sources,
    export_merge,
    fill_missing_layers,
    is_foreign,
    load_base_model,
    load_foreign,
    resolve_adapter,
)
from merging.merged_model import merge_deltas
from merging.methods import get_method, list_methods
from mlvision.errors import AdapterError

NO_DATA = "adapters trained elsewhere: no validation images here"


def _key(source: str) -> str:
    """An adapter argument as --labels may name it: a hub id as written, a folder by its absolute path."""
    return source if source.startswith("hub:") else str(Path(source).resolve())


class ForeignDemoService(DemoService):
    """Adapters of one transformers or timm base model, loaded once from folders or the Hub."""

    PREPROCESSING = "the base model's size and normalisation"

    def __init__(
        self,
        sources: list[str],
        base: str | None = None,
        labels: dict[str, str] | None = None,
        device: str | None = None,
    ):
        """`sources`: adapter folders, folders of adapter folders, or hub:user/adapter ids; `base`: the base model of
        adapters whose config names none (timm); `labels`: {source as given: labels file}."""
        self.db_path = None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
        if len({a.task for a in adapters}) < len(adapters):
            raise AdapterError("two adapters have the same name (their folder or hub id): rename one folder")
        self.base = base_model_name(adapters)
        filled, self.layer_sources = fill_missing_layers(adapters)
        check_compatible(filled)
        self.adapters: dict[str, AdapterDeltas] = {a.task: a for a in filled}
        self.tasks = sorted(self.adapters)
        self.labels = {t: list(a.meta["label_names"]) for t, a in self.adapters.items()}
        self.methods = [name for kind in SERVED_KINDS for name in list_methods(kind=kind)]
        # nothing was stored for these adapters, and they bring no training images for RegMean's statistics
        self._no_statistics = {task: f"adapter {task} was trained elsewhere: its training images are not here"
                               for task in self.tasks}  # fmt: skip
        self._study_choice = {}
        self.seed = None
        self._base_model = load_base_model(self.base)  # copied for every model served, never changed
        self.preprocess = base_preprocess(self.base, self._base_model)
        self._results, self._hyperparams, self._validation = [], {}, {}  # nothing stored for these adapters
        self._start_serving()
        self._build_lock = threading.Lock()

    def _merge(self, group: tuple[str, ...], method: str) -> tuple[dict[str, torch.Tensor], dict]:
        params = get_method(method).validate({})
        return merge_deltas([self.adapters[t] for t in group], method, params), params

    def _build(self, deltas: dict[str, torch.Tensor], group: tuple[str, ...]) -> torch.nn.Module:
        with self._build_lock:  # one deep copy of the base at a time (its memory, not correctness)
            model = build_merged_model([self.adapters[t] for t in group], deltas, self._base_model)
        return model.to(self.device)

    def _export(self, merged, adapters: list[AdapterDeltas], rank: int, folder: Path, info: dict) -> float:
        layers = {
            layer: tasks for layer, tasks in self.layer_sources.items() if set(tasks) & {a.task for a in adapters}
        }
        return export_merge(merged, adapters, rank, folder, {**info, "layers": layers})

    def origin_line(self) -> str:
        return f"LoRA adapters trained elsewhere, one per task, on `{self.base}`"

    def results_line(self) -> str:
        return "No stored results for these adapters: their accuracies were not measured here."

    def calibrate(self, model: torch.nn.Module, tasks) -> dict[str, dict]:
        return {task: {"threshold": None, "n_validation": 0, "why": NO_DATA} for task in tasks}

    def example_image(self, task: str) -> None:
        return None

    def native_size(self, task: str) -> str:
        return "native size unknown (adapter trained elsewhere)"

    def task_info(self, task: str) -> dict:
        adapter = self.adapters[task]
        origin = f"hub:{adapter.meta['hub_id']}" if adapter.meta.get("hub_id") else adapter.path.name
        return {
            "task": task,
            "classes": len(self.labels[task]),
            "input_size": self.preprocess.image_size,
            "description": "",
            "source": f"adapter {origin} on {self.base}",
            "domain": "",
            "native_size": self.native_size(task),
        }


__all__ = ["ForeignDemoService"]
