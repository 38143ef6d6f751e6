"""Linear merge: the plain mean of the k updates.

Paper: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022 (arXiv 2203.05482) — weight averaging;
for LoRA adapters on vision tasks it is the simple-merge baseline of Kesim & Helli, "Multi LoRA
Meets Vision: Merging multiple adapters to create a multi task model" (arXiv 2411.14064).

Algorithm: ΔW = (1/k) Σ_i ΔW_i, computed in float32, returned in the input dtype.
Hyperparameters: none (a weighted mean with a global factor is `task_arithmetic`).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ._base import MergeMethod
from ._common import stack


def linear(deltas: Sequence[Tensor]) -> Tensor:
    return stack(deltas).mean(dim=0).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="linear",
    fn=linear,
    paper=(
        "Wortsman et al., 'Model soups: averaging weights of multiple fine-tuned models improves "
        "accuracy without increasing inference time', ICML 2022, arXiv:2203.05482; as used for "
        "LoRA in Kesim & Helli, 'Multi LoRA Meets Vision', arXiv:2411.14064, 2024"
    ),
    defaults={},
    ranges={},
    description="Plain mean of the k updates.",
)
