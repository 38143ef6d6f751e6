"""Magnitude pruning: keep each update's largest entries, then the plain mean.

Papers: the trim step of Yadav et al., "TIES-Merging: Resolving Interference When Merging
Models", NeurIPS 2023 (arXiv 2306.01708) without its sign election; used as a merging baseline
("magnitude pruning") in Tang et al., "FusionBench: A Comprehensive Benchmark of Deep Model
Fusion", 2024 (arXiv 2406.03280).

Algorithm: zero all but the top-`density` fraction (by |value|) of each ΔW_i, per layer;
ΔW = λ · (1/k) Σ_i pruned_i.
Hyperparameters:
  density: default 0.2, range (0, 1]. The same 20% as TIES, so magnitude_prune vs ties isolates
    what sign election + disjoint mean add (the TIES paper's ablation).
  scaling (λ): default 1.0, range (0, 4]. Plain mean, as asked; note that pruned entries count
    as zeros in the mean, so the merged magnitude shrinks with k — tune λ on validation.
Validation grid (study v3, a star of 5 points like every method's (the default and each hyperparameter's other two
  values with the other at its default)): density in {0.2 (default), 0.5, 0.8}, scaling in {1.0 (default), 2.0, 3.0}
  (issue 33's 200-image pilot chose density 0.2-0.5 and λ = 2 most often) — λ upwards, not down as for TIES, because
  the pruned mean shrinks (with 1/k and with the density). λ is a pure output multiplier: one merge per density.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._common import stack, topk_mask

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


def magnitude_prune(deltas: Sequence[Tensor], density: float = 0.2, scaling: float = 1.0) -> Tensor:
    x = stack(deltas)
    x = x * topk_mask(x, density)
    return (scaling * x.mean(dim=0)).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="magnitude_prune",
    fn=magnitude_prune,
    paper=(
        "Tang et al., 'FusionBench: A Comprehensive Benchmark of Deep Model Fusion', 2024, "
        "arXiv:2406.03280 (magnitude-pruning baseline); trim step of Yadav et al., "
        "'TIES-Merging', NeurIPS 2023, arXiv:2306.01708"
    ),
    defaults={"density": 0.2, "scaling": 1.0},
    ranges={"density": (0.0, 1.0, "(]"), "scaling": (0.0, 4.0, "(]")},
    description="Keep each update's top-density magnitudes, then mean, times λ.",
    grid={"density": (0.2, 0.5, 0.8), "scaling": (1.0, 2.0, 3.0)},
    grid_design="star",
    default_source="density 0.2: TIES's trim (Yadav et al. 2023); scaling 1.0: the plain mean (FusionBench)",
    scaling_is_output_multiplier=True,
)
