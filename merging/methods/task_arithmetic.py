"""Task arithmetic: λ times the sum of the k updates.

Paper: Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi, "Editing models
with task arithmetic", ICLR 2023 (arXiv 2212.04089).

Algorithm: ΔW = λ · Σ_i ΔW_i (the "task vectors" are our ΔW_i).
Hyperparameters:
  scaling (λ): default 0.3, range (0, 2]. Ilharco et al. choose λ on held-out validation data
    from {0, 0.05, ..., 1}; for adding several vision tasks the chosen values are around
    0.3-0.4 (and follow-ups, e.g. TIES, report 0.3-0.4 as TA's best), so 0.3 is the default a
    sweep starts from. Note λ = 1/k gives `linear`.
    Validation grid (study v3, issue 33): for a pair, scaling in TASK_ARITHMETIC_GRID = {0.3 (default), 0.5, 0.7,
    1.0, 1.4}; for k tasks each value times (2/k)^0.8 (`TASK_ARITHMETIC_FALL`; at k = 6: 0.125-0.58), 5 points like
    every method's. Why it falls with k: the sum of k updates grows with k, and a fixed grid {0.2, 0.3, 0.5, 0.7, 1.0}
    put validation's choice at 1.0 in 62 of 190 pairs of the wide study and at 0.3 in all 10 of its groups of six.
    The exponent from where the optimum sat on 200 validation images per task (seed 0): the wide study's pairs at
    0.7-1.0, groups of four at 0.5, of six at 0.33; the six-task study's pairs at 0.5-0.7, fours at 0.3, sixes at
    0.2-0.3: a fall of about 2.4x from k = 2 to 6 in both, 3^0.8. λ is a pure output multiplier (the sweep merges
    once and rescales).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._common import stack

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor

TASK_ARITHMETIC_GRID = (0.3, 0.5, 0.7, 1.0, 1.4)  # for a pair; see `TASK_ARITHMETIC_FALL`
TASK_ARITHMETIC_FALL = 0.8  # k tasks: each value times (2/k)^0.8


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
    description="λ · Σ ΔW_i (λ chosen on validation from TASK_ARITHMETIC_GRID, falling with k).",
    grid={"scaling": TASK_ARITHMETIC_GRID},
    scaling_falls_with_k=TASK_ARITHMETIC_FALL,
    default_source="scaling 0.3: Ilharco et al. 2023 (λ chosen on validation for multi-task vision is about 0.3-0.4)",
    scaling_is_output_multiplier=True,
)
