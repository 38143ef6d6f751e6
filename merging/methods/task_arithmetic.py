"""Task arithmetic: λ times the sum of the k updates.

Paper: Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi, "Editing models
with task arithmetic", ICLR 2023 (arXiv 2212.04089).

Algorithm: ΔW = λ · Σ_i ΔW_i (the "task vectors" are our ΔW_i).
Hyperparameters:
  scaling (λ): default 0.3, range (0, 2]. Ilharco et al. choose λ on held-out validation data
    from {0, 0.05, ..., 1}; for adding several vision tasks the chosen values are around
    0.3-0.4 (and follow-ups, e.g. TIES, report 0.3-0.4 as TA's best), so 0.3 is the default a
    sweep starts from. Note λ = 1/k gives `linear`.
    Validation grid (study v3): scaling in TASK_ARITHMETIC_GRID = {0.3 (default), 0.2, 0.5, 0.7, 1.0},
    5 points like every method's. Study v2's {0.3, 0.5, 0.7, 1.0} had validation (50 images per task)
    choose its smallest value in 38 % of merges, so 0.2 came back (KnOTS's ViT-B LoRA config uses 0.1
    for 8 tasks); on a wider grid of 200 images per task (issue 33's pilot, 14 groups of seed 0) the
    optimum fell from 0.7 at k = 2 to 0.5 at k = 3, 0.4-0.5 at k = 4 and 0.3 at k = 6, never at 0.1
    or 0.15. λ is a pure output multiplier (the sweep merges once and rescales).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._common import stack

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor

TASK_ARITHMETIC_GRID = (0.2, 0.3, 0.5, 0.7, 1.0)


def task_arithmetic(deltas: Sequence[Tensor], scaling: float = 0.3) -> Tensor:
    return (scaling * stack(deltas).sum(dim=0)).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="task_arithmetic",
    fn=task_arithmetic,
    paper=(
        "Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi, 'Editing models "
        "with task arithmetic', ICLR 2023, arXiv:2212.04089"
    ),
    defaults={"scaling": 0.3},
    ranges={"scaling": (0.0, 2.0, "(]")},
    description="λ · Σ ΔW_i (λ chosen on validation from TASK_ARITHMETIC_GRID).",
    grid={"scaling": TASK_ARITHMETIC_GRID},
    default_source="scaling 0.3: Ilharco et al. 2023 (λ chosen on validation for multi-task vision is about 0.3-0.4)",
    scaling_is_output_multiplier=True,
)
