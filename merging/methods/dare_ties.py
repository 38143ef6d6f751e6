"""DARE + TIES: random drop and rescale, then TIES sign election and disjoint mean.

Papers: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024 (arXiv 2311.03099) for DARE; Yadav et al., "TIES-Merging", NeurIPS
2023 (arXiv 2306.01708) for the sign election and disjoint mean.

Algorithm: DARE each ΔW_i (drop entries with probability p, survivors × 1/(1-p), local generator
seeded by `seed`); no magnitude trim (DARE's random drop replaces TIES's trim, density 1);
elect the sign per entry from the sum, average the non-zero entries that agree with it;
ΔW = λ · result.
Hyperparameters:
  drop_rate (p): default 0.5, range [0, 1): see dare_linear (moderate for dense LoRA products).
  scaling (λ): default 1.0, range (0, 4]: the disjoint mean keeps each entry's scale.
  seed: default 0, integer >= 0; the caller passes a per-layer seed.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ._base import MergeMethod
from ._common import dare, elect_and_disjoint_mean, stack


def dare_ties(deltas: Sequence[Tensor], drop_rate: float = 0.5, scaling: float = 1.0, seed: int = 0) -> Tensor:
    x = dare(stack(deltas), drop_rate, seed)
    return (scaling * elect_and_disjoint_mean(x)).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="dare_ties",
    fn=dare_ties,
    paper=(
        "Yu, Yu, Yu, Huang, Li, 'Language Models are Super Mario', ICML 2024, arXiv:2311.03099 "
        "(DARE) with Yadav et al., 'TIES-Merging', NeurIPS 2023, arXiv:2306.01708"
    ),
    defaults={"drop_rate": 0.5, "scaling": 1.0, "seed": 0},
    ranges={
        "drop_rate": (0.0, 1.0, "[)"),
        "scaling": (0.0, 4.0, "(]"),
        "seed": (0, 2**63 - 1, "[]"),
    },
    description="DARE drop+rescale, then TIES sign election and disjoint mean, times λ.",
)
