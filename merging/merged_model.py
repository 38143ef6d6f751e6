"""From k adapters to one multi-task model: merge ΔW layer by layer, fold into the base weights.

The merged model is the base backbone with the merged ΔW added to its weights plus the k task
heads, so one forward pass answers every task (`MultiTaskModel`). `AdapterMerger` merges with any
registered method; how each kind of method is run is `RUNNERS`, the one code that branches on a
method's kind (what a method needs is a field of its record, merging/methods/_base.py). Writing a
merge out as a peft LoRA is merging/export.py.
"""

from __future__ import annotations

import copy
import zlib

import torch

from merging.deltas import AdapterDeltas, check_compatible
from merging.grams import GramStore
from merging.methods import MergeMethod, MethodKind, get_method
from merging.peft_reference import PeftMerger
from mlvision.backbone import BackboneConfig
from mlvision.errors import MergeConfigError
from mlvision.evaluation import FoldedBackbone
from mlvision.models import MultiTaskModel


def layer_seed(seed: int, layer: str) -> int:
    """A per-layer seed for random methods (DARE): stable across runs and machines."""
    return (seed * 1_000_003 + zlib.crc32(layer.encode())) % (2**31)


def merge_deltas(
    adapters: list[AdapterDeltas],
    method: str,
    hyperparams: dict | None = None,
    grams: list[dict[str, torch.Tensor]] | None = None,
    **statistics: list[dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Merged ΔW per layer with `method`; hyperparameters are validated (defaults filled) first.

    A data-aware method also needs the per-task statistics it names (`MergeMethod.statistics`), each one
    {layer: tensor} per adapter: RegMean's `grams` (its Gram matrices, merging/grams.py; the one argument callers
    give by position) and, to skip work, its optional `gram_products`. A method defined on the whole model
    (`merge_model`) gets every layer at once."""
    check_compatible(adapters)
    merge_method = get_method(method)
    params = merge_method.validate(hyperparams or {})
    if merge_method.merge_model is not None:
        layer_deltas = {layer: [a.deltas[layer] for a in adapters] for layer in adapters[0].deltas}
        for layer, deltas in layer_deltas.items():
            merge_method.check_deltas(deltas)
        with torch.no_grad():
            return merge_method.merge_model(layer_deltas, **params)
    taken = (*merge_method.statistics, *merge_method.optional_statistics)
    given = {name: values for name, values in {"grams": grams, **statistics}.items() if values and name in taken}
    merged = {}
    for layer in adapters[0].deltas:
        layer_params = {**params, "seed": layer_seed(params["seed"], layer)} if "seed" in params else params
        layer_statistics = {name: [values[layer] for values in per_adapter] for name, per_adapter in given.items()}
        merged[layer] = merge_method([a.deltas[layer] for a in adapters], **layer_statistics, **layer_params)
    return merged


# Where each per-task statistic a method names (`statistics`, `optional_statistics`) comes from: the GramStore
# function that gives it for one adapter, {layer: tensor} (loaded from the cache, or computed once).
# (By name, not GramStore's own functions: adapters from elsewhere bring a store of the same shape, ForeignGrams.)
STATISTIC_SOURCES = {
    "grams": lambda store, adapter: store.get(adapter),
    "gram_products": lambda store, adapter: store.products(adapter),
}


class AdapterMerger:
    """Merges any subset of a fixed set of adapters with any registered method: the one merge entry.

    `merge` returns the merged ΔW per layer and the hyperparameters to store with it (and what the method records
    beside them, `recorded_outputs`); `RUNNERS` runs each kind of method. Per-layer methods run on the adapters'
    exact ΔW (`merge_deltas`), a data-aware one (RegMean) with each adapter's statistics from `grams`; a test-time
    method (AdaMerging) learns through `folded` on the unlabeled images `unlabeled_for(task)` gives (the group's test
    images: transductive); reference methods (peft's add_weighted_adapter) run through one PeftModel holding every
    adapter, loaded on first use.
    """

    def __init__(
        self,
        adapters: dict[str, AdapterDeltas],
        backbone_config: BackboneConfig,
        grams: GramStore | None = None,
        folded: FoldedBackbone | None = None,
        unlabeled_for=None,
    ):
        self.adapters = adapters
        self.backbone_config = backbone_config
        self.grams = grams
        self.folded = folded
        self.unlabeled_for = unlabeled_for
        self._peft: PeftMerger | None = None

    def merge(
        self, keys: list[str], method: str, hyperparams: dict | None = None
    ) -> tuple[dict[str, torch.Tensor], dict]:
        merge_method = get_method(method)
        return RUNNERS[merge_method.kind](self, merge_method, list(keys), dict(hyperparams or {}))

    def statistics(self, merge_method: MergeMethod, adapters: list[AdapterDeltas]) -> dict[str, list[dict]]:
        """Every statistic `merge_method` takes (those it needs and those it can skip work with), one
        {layer: tensor} per adapter, from the GramStore (`STATISTIC_SOURCES`); {} for a data-free method."""
        names = (*merge_method.statistics, *merge_method.optional_statistics)
        if names and self.grams is None:
            raise MergeConfigError(
                f"merge method '{merge_method.name}' needs each adapter's Gram matrices "
                f"({', '.join(merge_method.statistics)}): build the AdapterMerger with a GramStore (merging/grams.py)"
            )
        return {name: [STATISTIC_SOURCES[name](self.grams, adapter) for adapter in adapters] for name in names}

    def peft(self) -> PeftMerger:
        """The PeftModel holding every adapter, for the reference methods (loaded on first use)."""
        if self._peft is None:
            self._peft = PeftMerger(self.backbone_config, {key: str(a.path) for key, a in self.adapters.items()})
        return self._peft


def _merge_per_layer(merger: AdapterMerger, method: MergeMethod, keys: list[str], hyperparams: dict):
    """A data-free or data-aware method: its `fn` layer by layer (`merge_deltas`) with the statistics it takes; what
    it records (`record`, e.g. RegMean's singular channels) is stored beside its hyperparameters."""
    params = method.validate(method.inputs(hyperparams))
    adapters = [merger.adapters[key] for key in keys]
    statistics = merger.statistics(method, adapters)
    needed = {name: statistics[name] for name in method.statistics}
    recorded = method.record([a.deltas for a in adapters], **needed) if method.record is not None else {}
    return merge_deltas(adapters, method.name, params, **statistics), {**params, **recorded}


def _merge_test_time(merger: AdapterMerger, method: MergeMethod, keys: list[str], hyperparams: dict):
    """A test-time method: where `hyperparams` hold its `rebuilt_from` output (a stored merge), rebuilt from it and
    never learned again; otherwise learned (`learn`) through the folded backbone on each task's unlabeled images."""
    params = method.validate(method.inputs(hyperparams))
    adapters = [merger.adapters[key] for key in keys]
    stored = hyperparams.get(method.rebuilt_from) if method.rebuilt_from is not None else None
    if stored is not None:
        return method.rebuild(adapters, stored), {**params, method.rebuilt_from: stored}
    if merger.folded is None or merger.unlabeled_for is None:
        raise MergeConfigError(
            f"{method.name} learns on the unlabeled test images of the group's tasks: build the AdapterMerger with "
            "a FoldedBackbone and unlabeled_for"
        )
    check_compatible(adapters)
    unlabeled = [merger.unlabeled_for(adapter.task) for adapter in adapters]
    merged, recorded = method.learn(merger.folded, adapters, unlabeled, **params)
    return merged, {**params, **recorded}


def _merge_reference(merger: AdapterMerger, method: MergeMethod, keys: list[str], hyperparams: dict):
    """Another library's merge of whole adapters at the method's fixed `options` (peft's add_weighted_adapter)."""
    peft = merger.peft()
    return peft.merge(method.name, keys), peft.hyperparams(method.name, len(keys))


# How each kind of method is run: runner(merger, method, adapter keys, hyperparameters) -> (merged ΔW per layer,
# hyperparameters to store). The one code that branches on a method's kind; a new kind adds its runner here.
RUNNERS = {
    MethodKind.DATA_FREE: _merge_per_layer,
    MethodKind.DATA_AWARE: _merge_per_layer,
    MethodKind.TEST_TIME: _merge_test_time,
    MethodKind.REFERENCE: _merge_reference,
}


def build_merged_model(adapters: list[AdapterDeltas], method: str, hyperparams: dict | None = None) -> MultiTaskModel:
    """A standalone merged multi-task model (its own backbone copy): one forward pass, k answers."""
    merged = merge_deltas(adapters, method, hyperparams)
    backbone = FoldedBackbone(BackboneConfig(**adapters[0].meta["backbone"])).standalone(merged)
    return MultiTaskModel(backbone, {a.task: copy.deepcopy(a.head) for a in adapters}).eval()


__all__ = ["RUNNERS", "STATISTIC_SOURCES", "AdapterMerger", "build_merged_model", "layer_seed", "merge_deltas"]
