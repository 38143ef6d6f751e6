"""KnOTS-TIES: align the updates with one SVD, then TIES-merge the task-specific factors.

Paper: Stoica, Ramesh, Ecsedi, Choshen, Hoffman, "Model merging with SVD to tie the KnOTS",
ICLR 2025 (arXiv 2410.19735); reference code github.com/gstoica27/KnOTS.

Algorithm: M = [ΔW_1 | ... | ΔW_k] = U Σ [V_1ᵀ | ... | V_kᵀ] (thin SVD, numerical rank q);
each task is represented by Σ V_iᵀ ([q, in]); merge those k matrices with TIES (trim to the top
`density` by magnitude per task, elect sign, disjoint mean); ΔW = λ · U · merged.
Hyperparameters:
  density: default 0.2, range (0, 1] — the reference ViT config ('topK': 20). The reference trims
    over the whole model's concatenated factors; here per layer and task.
  scaling (λ): default 0.6, range (0, 4] — the reference ViT-B LoRA config's value
    ('scaling_coeffs': .6, found by its validation search); tune on validation.
Validation grid (study v2, 2 x 2 = 4 points like every method's): density in {0.2 (default), 0.5}
  x scaling in {0.6 (default), 1.0}; default point (0.2, 0.6) from the reference config. λ is a pure
  output multiplier, so the sweep aligns and merges once per density and rescales.
With k = 1 the single update is returned up to trimming (density 1, λ 1: exactly).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._base import MergeMethod
from ._common import elect_and_disjoint_mean, topk_mask
from ._knots import knots_align


def knots_ties(deltas: Sequence[Tensor], density: float = 0.2, scaling: float = 0.6) -> Tensor:
    u, s, vhs = knots_align(deltas)
    sv = torch.stack([s[:, None] * vh for vh in vhs])  # [k, q, in]
    if sv.shape[1] == 0:
        return torch.zeros_like(deltas[0])
    sv = sv * topk_mask(sv, density)
    merged = u @ elect_and_disjoint_mean(sv)
    return (scaling * merged).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="knots_ties",
    fn=knots_ties,
    paper=(
        "Stoica, Ramesh, Ecsedi, Choshen, Hoffman, 'Model merging with SVD to tie the KnOTS', "
        "ICLR 2025, arXiv:2410.19735"
    ),
    defaults={"density": 0.2, "scaling": 0.6},
    ranges={"density": (0.0, 1.0, "(]"), "scaling": (0.0, 4.0, "(]")},
    description="SVD-align the concatenated updates, TIES-merge the task factors ΣV_iᵀ, times λ.",
    grid={"density": (0.2, 0.5), "scaling": (0.6, 1.0)},
    default_source="density 0.2 and scaling 0.6: the KnOTS reference ViT-B LoRA config (Stoica et al. 2025)",
    scaling_is_output_multiplier=True,
)
