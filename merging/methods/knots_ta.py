"""KnOTS-TA: align the updates with one SVD, then task-arithmetic on the task-specific factors.

Paper: Stoica, Ramesh, Ecsedi, Choshen, Hoffman, "Model merging with SVD to tie the KnOTS",
ICLR 2025 (arXiv 2410.19735).

Algorithm: M = [ΔW_1 | ... | ΔW_k] = U Σ [V_1ᵀ | ... | V_kᵀ]; ΔW = λ · U Σ (Σ_i V_i)ᵀ.
Because U Σ V_iᵀ = ΔW_i exactly, this equals task_arithmetic(λ) up to float rounding and the
numerically-zero components the alignment drops: a linear merge gains nothing from the
alignment (the KnOTS paper makes the same point; its gains come from non-linear merges such as
TIES). It is kept so a sweep can show that, and as a check of the alignment.
Hyperparameters:
  scaling (λ): default 0.3, range (0, 2] — the same default and range as task_arithmetic.
    Validation grid (study v3): task arithmetic's, {0.3 (default), 0.5, 0.7, 1.0, 1.4} for a pair, each value
    times (2/k)^0.8 for k tasks; λ is a pure output multiplier (the sweep aligns once and rescales).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._knots import knots_align
from .task_arithmetic import TASK_ARITHMETIC_FALL, TASK_ARITHMETIC_GRID

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


def knots_ta(deltas: Sequence[Tensor], scaling: float = 0.3) -> Tensor:
    import torch

    u, s, vhs = knots_align(deltas)
    merged = u @ (s[:, None] * torch.stack(vhs).sum(dim=0))
    return (scaling * merged).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="knots_ta",
    fn=knots_ta,
    paper=(
        "Stoica, Ramesh, Ecsedi, Choshen, Hoffman, 'Model merging with SVD to tie the KnOTS', "
        "ICLR 2025, arXiv:2410.19735"
    ),
    defaults={"scaling": 0.3},
    ranges={"scaling": (0.0, 2.0, "(]")},
    description="SVD-align the concatenated updates, sum the task factors, times λ (= TA).",
    grid={"scaling": TASK_ARITHMETIC_GRID},
    scaling_falls_with_k=TASK_ARITHMETIC_FALL,  # it equals task arithmetic, so its λ falls with k alike
    default_source="scaling 0.3: task arithmetic's (Ilharco et al. 2023), as the method equals it",
    scaling_is_output_multiplier=True,
)
