"""RegMean: the merge that best reproduces every task's layer outputs on that task's own inputs.

Paper: Jin, Ren, Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of
Language Models", ICLR 2023 (arXiv 2212.09849); reference code github.com/bloomberg/dataless-model-merging.

Algorithm: for a linear layer y = W x, RegMean solves min_W Σ_i ||X_i Wᵀ - X_i W_iᵀ||², whose
closed form is Wᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ with G_i = X_iᵀ X_i, the Gram matrix of the layer's
inputs on task i's training images (under task i's own adapter). Every W_i = W_0 + ΔW_i shares
the base weights, so (Σ G_i)⁻¹ Σ G_i (W_0 + ΔW_i)ᵀ = W_0ᵀ + (Σ G_i)⁻¹ Σ G_i ΔW_iᵀ exactly: the
merge is done on the updates, ΔW = (Σ_i ΔW_i G_i)(Σ_i G_i)⁻¹ (the G_i are symmetric). Before
summing, each G_i's off-diagonal entries are multiplied by α (the paper's regularisation of the
inner-product matrices: α = 1 is the exact regression, α -> 0 a per-input-channel weighted mean).
Hyperparameters:
  alpha: default 0.6, range [0, 1] — FusionBench's CLIP-ViT RegMean config
    (`reduce_non_diagonal_ratio: 0.6`); the paper picks α on validation.
Validation grid (study v3; 5 points like every method's): alpha in {0.6 (default), 0.4, 0.8, 0.9, 1.0}. Study
v2's {0.2, 0.4, 0.6, 0.9} had validation choose its largest value in 64 % of merges; on a wider grid of 200
images per task (issue 33's pilot) the optima sat at 0.6-1.0, never below, so 0.2 gave way to 0.8 and 1.0 (the
end of α's range: a choice there cannot lie beyond it).
Singular sums: an input channel that no task's images ever use (a zero row of Σ G_i, e.g. a dead
ReLU6 channel; the study's EfficientNet has hundreds) makes Σ G_i singular, and the data say
nothing about the merged update's column there. It is regularized with a ridge on exactly those
channels, the same for every task (G_i[c, c] = 1), which makes that column the plain mean of the
updates' columns: so one adapter, or k copies of one, is returned exactly, as on every other
channel. `singular_channels` counts them and the merge records the count (`record`).
With one adapter, or k copies of one adapter with one Gram matrix, the adapter is returned exactly
(up to solver rounding). The Gram matrices are computed once per adapter (merging/statistics.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod, MethodKind

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


def reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """α · G with G's own diagonal kept: the paper's regularisation of the inner-product matrix."""
    import torch

    diagonal = torch.diagonal(gram)
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(diagonal)


def dead_channels(grams: Sequence[Tensor]) -> Tensor:
    """Mask of the input channels that carry no signal in any task: zero diagonal in Σ G_i (a PSD matrix's
    zero diagonal entry has a zero row)."""
    import torch

    return torch.stack([torch.diagonal(g).double() for g in grams]).sum(dim=0) <= 0


def singular_channels(grams: Sequence[Tensor]) -> int:
    """How many input channels RegMean regularizes (`dead_channels`)."""
    return int(dead_channels(grams).sum())


def record(deltas: Sequence[dict[str, Tensor]], grams: Sequence[dict[str, Tensor]]) -> dict:
    """What a RegMean merge records beside its hyperparameters: `singular_channels`, the input channels over all
    layers that it regularized (`dead_channels`), when there are any (a merge without them records nothing)."""
    singular = sum(singular_channels([g[layer] for g in grams]) for layer in deltas[0])
    return {"singular_channels": singular} if singular else {}


def regmean(
    deltas: Sequence[Tensor],
    grams: Sequence[Tensor],
    alpha: float = 0.6,
    gram_products: Sequence[Tensor] | None = None,
) -> Tensor:
    """`gram_products` (optional): ΔW_i G_i per task, when the caller keeps them across merges (the sweep
    does, merging/grams.py): Σ_i ΔW_i G̃_i(α) = α Σ_i ΔW_i G_i + (1 - α) Σ_i ΔW_i diag(G_i), so only the
    cheap diagonal part and the solve depend on α and on the group."""
    import torch

    dtype, out_dtype = torch.float64, deltas[0].dtype
    deltas = [d.detach().to(dtype) for d in deltas]
    diagonals = [torch.diagonal(g).to(dtype) for g in grams]
    ridge = dead_channels(grams).to(dtype)  # the same for every task (see the module docstring)
    if gram_products is None:
        gram_products = [d @ g.detach().to(dtype) for d, g in zip(deltas, grams)]
    weighted = sum(
        alpha * p.detach().to(dtype) + d * ((1.0 - alpha) * diagonal + ridge)
        for d, p, diagonal in zip(deltas, gram_products, diagonals)
    )
    # Σ_i G̃_i = α Σ_i G_i + (1 - α) diag(Σ_i G_i), plus the ridge of every task
    gram_sum = torch.stack([g.detach() for g in grams]).sum(dim=0).to(dtype)
    total = alpha * gram_sum + torch.diag_embed((1.0 - alpha) * torch.diagonal(gram_sum) + len(grams) * ridge)
    merged = torch.linalg.solve(total, weighted, left=False)  # ΔW · Σ G̃_i = Σ ΔW_i G̃_i
    return merged.to(out_dtype)


METHOD = MergeMethod(
    name="regmean",
    fn=regmean,
    paper=(
        "Jin, Ren, Preotiuc-Pietro, Cheng, 'Dataless Knowledge Fusion by Merging Weights of Language "
        "Models', ICLR 2023, arXiv:2212.09849"
    ),
    defaults={"alpha": 0.6},
    ranges={"alpha": (0.0, 1.0, "[]")},
    description="Least-squares merge per layer: ΔW = (Σ ΔW_i G_i)(Σ G_i)⁻¹, Gram matrices G_i of each task's inputs.",
    grid={"alpha": (0.4, 0.6, 0.8, 0.9, 1.0)},
    default_source="alpha 0.6: FusionBench's CLIP-ViT RegMean config (reduce_non_diagonal_ratio); the paper tunes it",
    kind=MethodKind.DATA_AWARE,
    statistics=("grams",),
    optional_statistics=("gram_products",),
    recorded_outputs=("singular_channels",),
    record=record,
)
