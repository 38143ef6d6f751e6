"""Linear merge: the plain mean of the k updates.

Paper: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022 (arXiv 2203.05482) — weight averaging;
for LoRA adapters on vision tasks it is the simple-merge baseline of Kesim & Helli, "Multi LoRA
Meets Vision: Merging multiple adapters to create a multi task model" (arXiv 2411.14064).

Algorithm: ΔW = λ · (1/k) Σ_i ΔW_i, computed in float32 (float64 for float64 inputs), returned in
the input dtype.
Hyperparameters:
  scaling (λ): default 1.0, range (0, 4] — the plain mean of model soups (Wortsman et al.) and of
    Kesim & Helli. Validation grid (study v3): scaling in {1.0 (default), 0.75, 1.5, 2.0, 3.0},
    5 points like every method's (study v2's {0.5, 0.75, 1.0, 1.5} had its largest value chosen in 77 %
    of merges; a 200-image pilot's optima sat at 1.5-2.5, as task arithmetic's λ ≈ 0.5 x k suggests);
    λ is a pure output multiplier, so the sweep merges once and rescales.
    (λ · mean is task arithmetic with λ/k; linear's grid stays near the mean, TA's is k-independent.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._common import stack

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


def linear(deltas: Sequence[Tensor], scaling: float = 1.0) -> Tensor:
    return (scaling * stack(deltas).mean(dim=0)).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="linear",
    fn=linear,
    paper=(
        "Wortsman et al., 'Model soups: averaging weights of multiple fine-tuned models improves "
        "accuracy without increasing inference time', ICML 2022, arXiv:2203.05482; as used for "
        "LoRA in Kesim & Helli, 'Multi LoRA Meets Vision', arXiv:2411.14064, 2024"
    ),
    defaults={"scaling": 1.0},
    ranges={"scaling": (0.0, 4.0, "(]")},
    description="Plain mean of the k updates, times λ (λ chosen on validation).",
    grid={"scaling": (0.75, 1.0, 1.5, 2.0, 3.0)},
    default_source="scaling 1.0: the plain mean (Wortsman et al. 2022; Kesim & Helli 2024)",
    scaling_is_output_multiplier=True,
)
