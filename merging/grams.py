"""Gram matrices of each adapted layer's inputs, per adapter: the statistics RegMean merges with.

For an adapter of task i, G_i[layer] = (1/N) Σ_n x_n x_nᵀ over every input vector x_n of that
layer (one per image and spatial position for a 1x1 convolution, one per image and token for a
ViT's linear layers) while task i's own adapter is folded into the backbone and task i's training
images go through it — the inputs the adapter was trained on, as RegMean defines them. The mean
(not the sum) keeps tasks with the same number of images on the same footing.

They are computed once per adapter and kept in the data cache (`cache_dir()/grams`, never
committed: they are rebuilt on demand), keyed by the adapter's content (its LoRA factors file),
the backbone, the preprocessing, the task and the number of images, so the sweep never recomputes
them and a retrained adapter never reuses stale ones. Why by hand: no library computes per-layer
input Gram matrices of a timm model with an adapter folded in; forward pre-hooks are all it takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from merging.deltas import AdapterDeltas
from mlvision.errors import AdapterError
from mlvision.evaluation import FoldedBackbone
from mlvision.paths import cache_dir

# Training images per adapter: FusionBench's RegMean configs use 256 examples per task.
GRAM_IMAGES = 256
GRAM_BATCH = 64
GRAM_VERSION = 1  # bump when the computation changes, so cached matrices are rebuilt


def gram_key(adapter: AdapterDeltas, n_images: int) -> str:
    """A digest of everything the matrices depend on: the adapter's factors, backbone, preprocessing, task, n."""
    digest = hashlib.sha256()
    try:
        digest.update((Path(adapter.path) / "adapter_model.safetensors").read_bytes())
    except OSError as error:
        raise AdapterError(
            f"cannot read {adapter.path}/adapter_model.safetensors ({error.strerror or error}) to key its "
            "Gram matrices: re-train that adapter"
        ) from None
    digest.update(
        json.dumps(
            [GRAM_VERSION, adapter.meta["backbone"], adapter.meta["preprocess"], adapter.task, n_images],
            sort_keys=True,
        ).encode()
    )
    return digest.hexdigest()[:24]


def gram_path(adapter: AdapterDeltas, n_images: int) -> Path:
    safe_task = adapter.task.replace("/", "_").replace(":", "_")
    return cache_dir() / "grams" / f"{safe_task}-{gram_key(adapter, n_images)}.safetensors"


@torch.no_grad()
def layer_input_grams(
    model: torch.nn.Module, adapter: AdapterDeltas, run_batches, where: str
) -> dict[str, torch.Tensor]:
    """G[layer] [in, in] (float64, on the CPU) = the mean of x xᵀ over every input vector x of each of the adapter's
    layers in `model` while `run_batches()` sends the images through it: one vector per image and position for a
    1x1 convolution, one per image and token for a linear layer. The one place both RegMean paths (this project's
    adapters, `compute_grams`; adapters from elsewhere, merging/foreign.py) take their statistics; `where` names
    the model in the error for a layer that never ran."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(layer: str):
        def hook(module, inputs):
            x = inputs[0]
            # a 1x1 conv sees one vector per image and position; a linear layer one per token
            x = x.permute(0, 2, 3, 1) if x.dim() == 4 else x
            x = x.reshape(-1, x.shape[-1]).double()
            sums[layer] = sums.get(layer, 0) + x.T @ x
            counts[layer] = counts.get(layer, 0) + x.shape[0]

        return hook

    handles = [model.get_submodule(layer).register_forward_pre_hook(hook_for(layer)) for layer in adapter.deltas]
    try:
        run_batches()
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(adapter.deltas) - set(sums))
    if missing:
        raise AdapterError(f"layer {missing[0]} of {adapter.path} never ran in {where}: its Gram matrix is undefined")
    return {layer: (sums[layer] / counts[layer]).cpu() for layer in adapter.deltas}  # kept and merged on the CPU


@torch.no_grad()
def compute_grams(
    folded: FoldedBackbone, adapter: AdapterDeltas, images: torch.Tensor, batch_size: int = GRAM_BATCH
) -> dict[str, torch.Tensor]:
    """G[layer] [in, in] (float64) of each adapted layer's inputs, with the adapter folded in."""

    def run_batches():
        for start in range(0, len(images), batch_size):  # the eager prepared backbone: hooks run in it
            folded.prepared(images[start : start + batch_size].to(folded.device))

    folded.fold(adapter.deltas)
    try:
        return layer_input_grams(folded.prepared.model, adapter, run_batches, "the backbone")
    finally:
        folded.fold({})


class GramStore:
    """Every adapter's Gram matrices, loaded from the data cache or computed once (with progress).

    `images_for(task)` returns that task's training images; it is only called for adapters whose
    matrices are not cached. Without it, a missing adapter is reported in one line with the fix.
    """

    def __init__(
        self,
        folded: FoldedBackbone,
        images_for: Callable[[str], torch.Tensor] | None,
        n_images: int = GRAM_IMAGES,
    ):
        self.folded = folded
        self.images_for = images_for
        self.n_images = n_images
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}
        self._paths: dict[str, Path] = {}  # adapter folder -> its cache file (the key hashes the factor file)
        self.seconds: dict[str, float] = {}  # adapter path -> seconds spent computing its matrices

    def path(self, adapter: AdapterDeltas) -> Path:
        """The adapter's cache file; its key (a hash of the factor file) is computed once per store, since the
        sweep asks for every adapter's matrices at every merge."""
        folder = str(adapter.path)
        if folder not in self._paths:
            self._paths[folder] = gram_path(adapter, self.n_images)
        return self._paths[folder]

    def get(self, adapter: AdapterDeltas) -> dict[str, torch.Tensor]:
        path = self.path(adapter)
        key = str(path)
        if key in self._loaded:
            return self._loaded[key]
        if path.is_file():
            try:
                grams = load_file(str(path))
            except Exception:  # a damaged cache file is rebuilt, never trusted
                grams = None
            if grams is not None and set(grams) == set(adapter.deltas):
                self._loaded[key] = grams
                return grams
        if self.images_for is None:
            raise AdapterError(
                f"adapter {adapter.path} has no Gram matrices in {path.parent} and its task's training images "
                f"are not available here: run the merge where task {adapter.task!r} can be loaded"
            )
        start = time.perf_counter()
        images = self.images_for(adapter.task)[: self.n_images]
        grams = {layer: g.float() for layer, g in compute_grams(self.folded, adapter, images).items()}
        self.seconds[str(adapter.path)] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(grams, str(temp))
        os.replace(temp, path)  # another process computing the same matrices writes the same bytes
        self._loaded[key] = grams
        return grams

    def products(self, adapter: AdapterDeltas) -> dict[str, torch.Tensor]:
        """ΔW G per layer (float64) of one adapter, kept in memory: RegMean's α-independent part, which a
        sweep would otherwise recompute for every group and grid point the adapter is in."""
        key = "products:" + str(self.path(adapter))
        if key not in self._loaded:
            grams = self.get(adapter)
            self._loaded[key] = {
                layer: delta.double() @ grams[layer].double() for layer, delta in adapter.deltas.items()
            }
        return self._loaded[key]

    def prepare(self, adapters: list[AdapterDeltas]) -> None:
        """Load or compute the matrices of `adapters` up front, with a progress bar for the computed ones."""
        todo = [a for a in adapters if str(self.path(a)) not in self._loaded]
        for adapter in tqdm(todo, desc="Gram matrices", unit="adapter", leave=False):
            self.get(adapter)


def gram_megabytes(grams: dict[str, torch.Tensor]) -> float:
    return sum(g.numel() * g.element_size() for g in grams.values()) / 2**20
