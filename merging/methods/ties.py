"""TIES-Merging: trim, elect sign, disjoint mean.

Paper: Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging
Models", NeurIPS 2023 (arXiv 2306.01708).

Algorithm: (1) trim: keep each ΔW_i's top-`density` fraction of entries by magnitude, zero the
rest; (2) elect: per entry, the sign of the sum of the trimmed values (the sign with the larger
total mass; a zero sum takes the layer's overall sign, as in the reference code); (3) disjoint
mean: average only the trimmed values that are non-zero and agree with the elected sign;
(4) ΔW = λ · result.
Hyperparameters:
  density: default 0.2, range (0, 1]. The paper keeps the top 20% ("k = 20") in all its main
    experiments and shows 20% keeps almost all of each task's accuracy. Trimming is per layer and
    per task here (the paper trims over each whole flattened task vector) since we merge one
    layer at a time.
  scaling (λ): default 1.0, range (0, 4]. The disjoint mean already keeps each entry's scale;
    the paper's recommended λ without validation is 1 (it searches 0.8-1.8 with validation).
Validation grid (study v2, 2 x 2 = 4 points like every method's): density in {0.2 (default), 0.5}
  x scaling in {0.7, 1.0 (default)}; default point (0.2, 1.0) from the paper. λ is a pure output
  multiplier, so the sweep merges once per density and rescales.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ._base import MergeMethod
from ._common import elect_and_disjoint_mean, stack, topk_mask


def ties(deltas: Sequence[Tensor], density: float = 0.2, scaling: float = 1.0) -> Tensor:
    x = stack(deltas)
    x = x * topk_mask(x, density)
    return (scaling * elect_and_disjoint_mean(x)).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="ties",
    fn=ties,
    paper=(
        "Yadav, Tam, Choshen, Raffel, Bansal, 'TIES-Merging: Resolving Interference When Merging "
        "Models', NeurIPS 2023, arXiv:2306.01708"
    ),
    defaults={"density": 0.2, "scaling": 1.0},
    ranges={"density": (0.0, 1.0, "(]"), "scaling": (0.0, 4.0, "(]")},
    description="Trim to top-density magnitudes, elect sign per entry, disjoint mean, times λ.",
    grid={"density": (0.2, 0.5), "scaling": (0.7, 1.0)},
    default_source="density 0.2 and scaling 1.0: Yadav et al. 2023 (top 20%; λ = 1 without validation)",
    scaling_is_output_multiplier=True,
)
