"""Layer-wise AdaMerging: per-(task, layer) merge coefficients learned by entropy minimisation.

Yang, Wang, Shen, Liu, Guo, Wang, Tao, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", ICLR 2024 (arXiv 2310.02575); reference code github.com/EnnengYang/AdaMerging
(src/main_layer_wise_adamerging.py). The method record, its defaults and their sources are in
merging/methods/adamerging.py; its `learn` and `rebuild` are the functions of the same names here.

The merged update of layer l is ΔW_l = Σ_i λ[i, l] ΔW_{i,l} (`layerwise_merge`). The coefficients
λ [k, L] are learned (`learn_coefficients`) by minimising Σ_i mean H(softmax(head_i(f_λ(x)))) over
batches x of task i's unlabeled images, where f_λ is the base backbone with the merge folded in
and H the Shannon entropy: each task's images go through the merged backbone and only that task's
head. This is transductive: the images are the test images of the group's tasks, without labels.

The forward is differentiable in λ: the adapted layers' weights are passed to
`torch.func.functional_call` as base + s ⊙ Σ_i λ[i, l] ΔW_{i,l}, exactly what
`FoldedBackbone.fold` writes in place (s: the layer's folded BatchNorm scales, 1 where none was
folded), built from the folded backbone's stored base weights. The backbone's own parameters are
never written, so it is left as it was (whatever merge it held before still holds). The k tasks'
batches go through the backbone in one pass (the merged backbone is the same for every task; with
BatchNorm folded, eval mode, a joint pass computes the same features as k separate ones) and
each task's slice of the features through its own head.

Like the reference, the coefficients used are clamp(λ_raw, 0, 1) of the optimised parameter λ_raw
(the reference clamps on use, in `lambdas()`, not by writing the parameter back after a step), and
the returned coefficients are the clamped ones. Nothing here writes to disk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from mlvision.errors import MergeConfigError
from mlvision.evaluation import FoldedBackbone

if TYPE_CHECKING:
    from merging.deltas import AdapterDeltas


def layerwise_merge(deltas: list[dict[str, Tensor]], coefficients: Tensor, layers: list[str]) -> dict[str, Tensor]:
    """ΔW_l = Σ_i λ[i, l] ΔW_{i,l} for each layer l of `layers` (column l of `coefficients` [k, L]).

    Pure: the inputs are not modified; each merged ΔW has the dtype of the updates it merges
    (differentiable in `coefficients`)."""
    if coefficients.shape != (len(deltas), len(layers)):
        raise MergeConfigError(
            f"AdaMerging coefficients have shape {tuple(coefficients.shape)}, expected "
            f"[{len(deltas)} adapters, {len(layers)} layers]"
        )
    merged = {}
    for column, layer in enumerate(layers):
        updates = [d[layer] for d in deltas]
        total = sum(coefficients[i, column].to(u.dtype) * u for i, u in enumerate(updates))
        merged[layer] = total.to(updates[0].dtype)
    return merged


def softmax_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of softmax(logits) per row."""
    return -(logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1)


class _LayerwiseMergedModel:
    """The folded backbone as a function of λ: its adapted layers' weights rebuilt from λ for each forward."""

    def __init__(self, folded: FoldedBackbone, deltas: list[dict[str, Tensor]], heads: list[nn.Linear]):
        self.folded = folded
        self.layers = list(deltas[0])
        model = folded.prepared.model
        # every parameter from the stored base (not the live weights, which may hold an earlier merge)
        self.base = {f"model.{name}": weight for name, weight in folded._base.items()}
        self.device = next(iter(self.base.values())).device
        self.stacks = []  # per layer: (parameter key, base weight, s ⊙ ΔW_i stacked [k, *weight.shape])
        for layer in self.layers:
            weight = model.get_submodule(layer).weight
            stack = torch.stack([d[layer].detach().to(self.device, weight.dtype).reshape(weight.shape) for d in deltas])
            if layer in folded._scales:  # the same scaling as FoldedBackbone.fold
                stack = stack * folded._scales[layer].to(self.device).reshape(1, -1, *[1] * (weight.dim() - 1))
            key = f"model.{layer}.weight"
            self.stacks.append((key, self.base[key], stack))
        self.heads = [
            (h.weight.detach().to(self.device), None if h.bias is None else h.bias.detach().to(self.device))
            for h in heads
        ]

    def logits(self, coefficients: Tensor, batches: list[Tensor]) -> list[Tensor]:
        """Each task's logits on its batch, through the backbone merged with `coefficients` [k, L]."""
        params = dict(self.base)
        for column, (key, base, stack) in enumerate(self.stacks):
            params[key] = base + torch.tensordot(coefficients[:, column].to(stack.dtype), stack, dims=1)
        images = torch.cat(batches).to(self.device)
        features = functional_call(self.folded.prepared, params, (images,))
        parts = features.split([len(b) for b in batches])
        return [nn.functional.linear(part, weight, bias) for part, (weight, bias) in zip(parts, self.heads)]

    def objective(self, coefficients: Tensor, batches: list[Tensor]) -> Tensor:
        """Σ over tasks of the mean softmax entropy of the task's head on the task's batch."""
        return sum(softmax_entropy(logits).mean() for logits in self.logits(coefficients, batches))


def _check_inputs(deltas, heads, images) -> None:
    if not deltas:
        raise MergeConfigError("AdaMerging needs at least one adapter's updates, got none")
    if not (len(deltas) == len(heads) == len(images)):
        raise MergeConfigError(
            f"AdaMerging needs one head and one image tensor per adapter: got {len(deltas)} adapters, "
            f"{len(heads)} heads, {len(images)} image tensors"
        )
    layers = set(deltas[0])
    for i, d in enumerate(deltas[1:], start=1):
        if set(d) != layers:
            raise MergeConfigError(f"AdaMerging: adapter {i} adapts other layers than adapter 0")
    for i, x in enumerate(images):
        if len(x) == 0:
            raise MergeConfigError(f"AdaMerging: no unlabeled images for adapter {i}")


def learn_coefficients(
    folded: FoldedBackbone,
    deltas: list[dict[str, Tensor]],
    heads: list[nn.Linear],
    images: list[Tensor],
    init: float,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> Tensor:
    """Layer-wise AdaMerging coefficients λ [k, L], columns in the order of `list(deltas[0])`.

    λ starts at `init` everywhere; each of `steps` Adam steps (lr `lr`, betas (0.9, 0.999), no
    weight decay, as the reference) minimises Σ_i mean entropy of head_i on `batch_size` images of
    task i drawn without replacement (all of them when fewer) from `images[i]`; the clamp to [0, 1]
    is applied on use. Deterministic for a given `seed` (a local generator draws the batches).
    `folded`'s parameters are never written."""
    _check_inputs(deltas, heads, images)
    if steps < 0 or batch_size < 1:
        raise MergeConfigError(f"AdaMerging needs steps >= 0 and batch_size >= 1, got {steps} and {batch_size}")
    model = _LayerwiseMergedModel(folded, deltas, heads)
    raw = torch.full((len(deltas), len(model.layers)), float(init), requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="adamerging", unit="step", leave=False, disable=not progress):
        batches = [x[torch.randperm(len(x), generator=generator)[:batch_size]] for x in images]
        loss = model.objective(raw.clamp(0.0, 1.0), batches)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return raw.detach().clamp(0.0, 1.0)


def learn(
    folded: FoldedBackbone, adapters: list[AdapterDeltas], unlabeled: list[Tensor], **hyperparams
) -> tuple[dict[str, Tensor], dict]:
    """AdaMerging's `learn` (merging/methods/adamerging.py): the merge of `adapters` with coefficients learned on
    `unlabeled` (one image tensor per adapter, its task's test images), and what the merge records beside its
    hyperparameters: the mean coefficient per task, and every coefficient per layer ({layer: one per adapter}), from
    which `rebuild` makes the same merge without learning again."""
    layers = list(adapters[0].deltas)
    coefficients = learn_coefficients(
        folded,
        [a.deltas for a in adapters],
        [a.head for a in adapters],
        unlabeled,
        **hyperparams,
        progress=True,  # tens of seconds per merge on a CPU: show the steps (the bar vanishes when done)
    )
    merged = layerwise_merge([a.deltas for a in adapters], coefficients, layers)
    mean = [round(float(c), 4) for c in coefficients.mean(dim=1)]
    learned = {layer: [float(c) for c in coefficients[:, column]] for column, layer in enumerate(layers)}
    return merged, {"mean_coefficient_per_task": mean, "coefficients": learned}


def rebuild(adapters: list[AdapterDeltas], learned: dict[str, list[float]]) -> dict[str, Tensor]:
    """AdaMerging's `rebuild`: the merge from its stored coefficients {layer: [one per adapter, in merge order]}."""
    layers = list(adapters[0].deltas)
    if set(learned) != set(layers) or any(len(values) != len(adapters) for values in learned.values()):
        raise MergeConfigError(
            "the stored AdaMerging coefficients do not fit these adapters (other layers or another number of "
            "adapters): merge them again to learn new ones"
        )
    coefficients = torch.tensor([learned[layer] for layer in layers], dtype=torch.float64).T
    return layerwise_merge([a.deltas for a in adapters], coefficients, layers)


@torch.no_grad()
def entropy_objective(
    folded: FoldedBackbone,
    deltas: list[dict[str, Tensor]],
    heads: list[nn.Linear],
    images: list[Tensor],
    coefficients: Tensor,
    batch_size: int = 256,
) -> float:
    """The objective AdaMerging minimises, on every given image: Σ_i mean entropy of head_i on images[i]."""
    _check_inputs(deltas, heads, images)
    model = _LayerwiseMergedModel(folded, deltas, heads)
    total = 0.0
    for i, x in enumerate(images):
        entropies = []
        for start in range(0, len(x), batch_size):
            batches = [other[:0] for other in images]  # only task i's images, through only its head
            batches[i] = x[start : start + batch_size]
            entropies.append(softmax_entropy(model.logits(coefficients, batches)[i]))
        total += float(torch.cat(entropies).mean())
    return total
