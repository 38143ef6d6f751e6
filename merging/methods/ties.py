"""TIES-Merging: trim, elect sign, disjoint mean.

Paper: Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging
Models", NeurIPS 2023 (arXiv 2306.01708).

Algorithm: (1) trim: keep each task's top-`density` fraction of entries by magnitude, zero the
rest; (2) elect: per entry, the sign of the sum of the trimmed values (the sign with the larger
total mass; a zero sum takes the layer's overall sign, as in the reference code); (3) disjoint
mean: average only the trimmed values that are non-zero and agree with the elected sign;
(4) ΔW = λ · result.
Hyperparameters:
  density: default 0.2, range (0, 1]. The paper keeps the top 20% ("k = 20") in all its main
    experiments and shows 20% keeps almost all of each task's accuracy.
  whole_vector_trim: 0 or 1 — where the top-density fraction is counted. 1 (the paper's reference
    code): over each task's whole flattened task vector, every adapted layer together, so a layer
    with large updates keeps more than `density` of its entries and one with small updates less.
    0: per layer and task. The two give a 43-70 % relative difference in the merged update.
    Default 1: validation preferred it when both were swept once over every group of the study at
    seed 0 (`python -m study.trim_scope`, reports/trim_scope.md: +0.73 points mean chosen validation
    accuracy, better in 38 of 57 groups, worse in 11; test +0.13 points). Merges stored before the
    option existed were per layer (`added_later`).
  scaling (λ): default 1.0, range (0, 4]. The disjoint mean already keeps each entry's scale;
    the paper's recommended λ without validation is 1 (it searches 0.8-1.8 with validation).
Validation grid (issue 33): density fixed at 0.2 and λ in {1.0 (default), 0.6, 0.8, 1.3, 1.7} for a pair, each
  value times (2/k)^0.25 for k tasks (at k = 6: 0.46-1.29). Study v3's first grid, a star of density {0.1, 0.2, 0.5}
  and λ {0.7, 1.0, 1.3}, put density at an end in 100 of the wide study's 161 merges on its arm and 73 of 92 of
  the six-task study's, where a wider pilot had found the best density anywhere in 0.1-0.8 (a flat surface: which
  end wins is noise); λ sat at its top for the wide study's pairs (39 of 190) and at its bottom for the six-task
  study's groups of three or more (64 of 118). On 200 validation images per task (seed 0, density 0.2) the best
  λ sat at 1.0 for the wide study's pairs (10 of 16), about 0.9 for its groups of four and 0.75 for its groups of
  six (4 of 4): the disjoint mean is already an average, so λ falls only slowly with k, about 3^0.25 from k = 2 to
  6. λ is a pure output multiplier, so the sweep merges once and rescales.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._common import elect_and_disjoint_mean, magnitude_thresholds, stack, topk_mask

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


def trim(x: Tensor, threshold: Tensor | None, density: float) -> Tensor:
    """x [k, ...] trimmed: per task to its top-density entries, or to entries >= a whole-vector threshold."""
    return x * topk_mask(x, density, threshold)


def ties(deltas: Sequence[Tensor], density: float = 0.2, scaling: float = 1.0, whole_vector_trim: int = 1) -> Tensor:
    return ties_model({"layer": list(deltas)}, density, scaling, whole_vector_trim)["layer"]


def ties_model(
    layer_deltas: dict[str, list[Tensor]], density: float = 0.2, scaling: float = 1.0, whole_vector_trim: int = 1
) -> dict[str, Tensor]:
    """TIES over a whole model: {layer: [ΔW_1..ΔW_k]} -> {layer: merged ΔW}; trim per layer or over the whole vector."""
    stacked = {layer: stack(deltas) for layer, deltas in layer_deltas.items()}
    threshold = magnitude_thresholds(list(stacked.values()), density) if whole_vector_trim else None
    return {
        layer: (scaling * elect_and_disjoint_mean(trim(x, threshold, density))).to(layer_deltas[layer][0].dtype)
        for layer, x in stacked.items()
    }


METHOD = MergeMethod(
    name="ties",
    fn=ties,
    paper=(
        "Yadav, Tam, Choshen, Raffel, Bansal, 'TIES-Merging: Resolving Interference When Merging "
        "Models', NeurIPS 2023, arXiv:2306.01708"
    ),
    defaults={"density": 0.2, "scaling": 1.0, "whole_vector_trim": 1},
    ranges={"density": (0.0, 1.0, "(]"), "scaling": (0.0, 4.0, "(]"), "whole_vector_trim": (0, 1, "[]")},
    description="Trim to top-density magnitudes, elect sign per entry, disjoint mean, times λ.",
    grid={"scaling": (0.6, 0.8, 1.0, 1.3, 1.7)},  # for a pair; density at its default
    scaling_falls_with_k=0.25,
    default_source="density 0.2 and scaling 1.0: Yadav et al. 2023 (top 20%; λ = 1 without validation)",
    scaling_is_output_multiplier=True,
    added_later={"whole_vector_trim": 0},
    merge_model=ties_model,
)
