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
  scaling (λ): default 0.8, range (0, 4]: the disjoint mean keeps each entry's scale; 0.8 is where the best λ sat
    at p = 0.5 in the pilot below (1.0, TIES's λ without validation, until issue 33).
  seed: default 0, integer >= 0; the caller passes a per-layer seed.
  density: accepted as peft's and mergekit's name for the share kept, 1 - drop_rate (stored as drop_rate).
Validation grid (study v3, a star of 5 points like every method's (the default and each hyperparameter's other two
  values with the other at its default)): drop_rate in {0.0, 0.25, 0.5 (default)}, scaling in {0.6, 0.8 (default),
  1.0}. Study v2 tried 0.8 (towards the paper's 0.9 for full fine-tuning); the first v3 star ({0.1, 0.3, 0.5} x {0.5,
  1, 1.5}) chose drop 0.1 and λ = 1 at its lower ends; in issue 33's k-pilot (seed 0 of the six-task study, 8 pairs
  and the group of six, 200 validation images per task, a product grid) mean validation accuracy at the best λ fell
  with the drop rate for pairs (84.2 / 83.0 / 82.3 % at p = 0.1 / 0.3 / 0.5; the group of six 75.8 / 76.3 / 75.4 %),
  so the arm reaches p = 0, the end of its range (no drop: TIES' election and disjoint mean without a trim), and at p
  = 0.5 λ peaked at 0.75 for pairs and for the group of six. λ is a pure output multiplier (the masks depend on p and
  the seed only): one merge per drop rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._common import dare, elect_and_disjoint_mean, stack

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


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
    defaults={"drop_rate": 0.5, "scaling": 0.8, "seed": 0},
    ranges={
        "drop_rate": (0.0, 1.0, "[)"),
        "scaling": (0.0, 4.0, "(]"),
        "seed": (0, 2**63 - 1, "[]"),
    },
    description="DARE drop+rescale, then TIES sign election and disjoint mean, times λ.",
    grid={"drop_rate": (0.0, 0.25, 0.5), "scaling": (0.6, 0.8, 1.0)},
    grid_design="star",
    default_source=(
        "drop_rate 0.5: the moderate default of merging toolkits (mergekit, FusionBench) for dense LoRA "
        "updates; scaling 0.8: where this project's pilot found the best λ at that drop rate (issue 33; TIES's λ "
        "without validation, Yadav et al. 2023, is 1.0)"
    ),
    scaling_is_output_multiplier=True,
    aliases={"density": ("drop_rate", lambda density: 1.0 - density)},  # peft and mergekit: the share kept
)
