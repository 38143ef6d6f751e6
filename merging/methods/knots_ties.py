"""KnOTS-TIES: align the updates with one SVD, then TIES-merge the task-specific factors.

Paper: Stoica, Ramesh, Ecsedi, Choshen, Hoffman, "Model merging with SVD to tie the KnOTS",
ICLR 2025 (arXiv 2410.19735); reference code github.com/gstoica27/KnOTS.

Algorithm: M = [ΔW_1 | ... | ΔW_k] = U Σ [V_1ᵀ | ... | V_kᵀ] (thin SVD, numerical rank q);
each task is represented by Σ V_iᵀ ([q, in]); merge those k matrices with TIES (trim to the top
`density` by magnitude per task, elect sign, disjoint mean); ΔW = λ · U · merged.
Hyperparameters:
  density: default 0.2, range (0, 1] — the reference ViT config ('topK': 20).
  whole_vector_trim: 0 or 1 — 1 trims over each task's factors of every layer together, as the
    reference code does (it concatenates the whole model's factors); 0 per layer and task.
    Default 0: validation preferred per layer when both were swept once over every group of the
    study at seed 0 (`python -m study.trim_scope`, reports/trim_scope.md: whole vector -0.61 points
    mean chosen validation accuracy, better in 13 of 57 groups, worse in 37; test -0.25 points).
  scaling (λ): default 0.6, range (0, 4] — the reference ViT-B LoRA config's value
    ('scaling_coeffs': .6, found by its validation search); tune on validation.
Validation grid (issue 33): density fixed at 0.2 and λ in {0.6 (default), 0.5, 0.8, 1.0, 1.3} for a pair, each value
  times (2/k)^0.35 for k tasks (at k = 6: 0.34-0.88); default point (0.2, 0.6) from the reference config. The first v3
  star (density {0.2, 0.5, 0.8}, λ {0.6, 1.0, 1.4}) chose the low end of its density arm in 3 of 7 merges and of its λ
  arm in 3 of 12; in issue 33's k-pilot (seed 0 of the six-task study, 8 pairs and the group of six, 200 validation
  images per task, a product grid) mean validation accuracy at the best λ was within a point across densities for
  pairs (83.5 / 83.7 / 83.8 % at 0.2 / 0.5 / 0.8; the group of six 75.7 / 75.6 / 76.7 %), a flat surface where a
  star's arm chooses an end as noise does, so the five points go to λ, whose optimum at density 0.2 fell from 0.8-1.0
  for pairs to 0.6 for the group of six (3^0.35 is 1.47). λ is a pure output multiplier, so the sweep aligns and
  merges once and rescales.
With k = 1 the single update is returned up to trimming (density 1, λ 1: exactly).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._common import elect_and_disjoint_mean, magnitude_thresholds
from ._knots import knots_align
from .ties import trim

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


def knots_ties(
    deltas: Sequence[Tensor], density: float = 0.2, scaling: float = 0.6, whole_vector_trim: int = 0
) -> Tensor:
    return knots_ties_model({"layer": list(deltas)}, density, scaling, whole_vector_trim)["layer"]


def knots_ties_model(
    layer_deltas: dict[str, list[Tensor]], density: float = 0.2, scaling: float = 0.6, whole_vector_trim: int = 0
) -> dict[str, Tensor]:
    """KnOTS-TIES over a whole model: align each layer, trim (per layer or over every layer's factors), merge."""
    import torch

    aligned = {}
    for layer, deltas in layer_deltas.items():
        u, s, vhs = knots_align(deltas)
        aligned[layer] = (u, torch.stack([s[:, None] * vh for vh in vhs]))  # [k, q, in]
    nonempty = [sv for _, sv in aligned.values() if sv.shape[1] > 0]
    threshold = magnitude_thresholds(nonempty, density) if whole_vector_trim and nonempty else None
    merged = {}
    for layer, (u, sv) in aligned.items():
        first = layer_deltas[layer][0]
        if sv.shape[1] == 0:
            merged[layer] = torch.zeros_like(first)
            continue
        merged[layer] = (scaling * (u @ elect_and_disjoint_mean(trim(sv, threshold, density)))).to(first.dtype)
    return merged


METHOD = MergeMethod(
    name="knots_ties",
    fn=knots_ties,
    paper=(
        "Stoica, Ramesh, Ecsedi, Choshen, Hoffman, 'Model merging with SVD to tie the KnOTS', "
        "ICLR 2025, arXiv:2410.19735"
    ),
    defaults={"density": 0.2, "scaling": 0.6, "whole_vector_trim": 0},
    ranges={"density": (0.0, 1.0, "(]"), "scaling": (0.0, 4.0, "(]"), "whole_vector_trim": (0, 1, "[]")},
    description="SVD-align the concatenated updates, TIES-merge the task factors ΣV_iᵀ, times λ.",
    grid={"scaling": (0.5, 0.6, 0.8, 1.0, 1.3)},  # for a pair; density at its default
    scaling_falls_with_k=0.35,
    default_source="density 0.2 and scaling 0.6: the KnOTS reference ViT-B LoRA config (Stoica et al. 2025)",
    scaling_is_output_multiplier=True,
    added_later={"whole_vector_trim": 0},
    merge_model=knots_ties_model,
)
