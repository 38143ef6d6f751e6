"""DARE + linear: random drop and rescale each update, then the plain mean.

Paper: Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", ICML 2024 (arXiv 2311.03099).

Algorithm: for each ΔW_i independently, drop every entry with probability p (Bernoulli mask from
a local generator seeded by `seed`) and multiply the survivors by 1/(1-p), so E[result_i] = ΔW_i;
then ΔW = λ · (1/k) Σ_i result_i. NOTE: this is the *mean* of the DARE'd updates times λ (with
p = 0 and λ = 1 it is `linear`); DARE's paper combines with task arithmetic's sum — use
λ = k·λ_TA to get that.
Hyperparameters:
  drop_rate (p): default 0.5, range [0, 1). The paper drops 90% of full fine-tuning deltas of
    LLMs, but LoRA updates are dense low-rank products whose entries are not redundant in the
    same way and high p adds variance ∝ p/(1-p) per entry; 0.5 is the moderate default used by
    common merging toolkits (mergekit, FusionBench examples). Tune on validation.
  scaling (λ): default 1.5, range (0, 4]: the mean keeps each update's scale, and a mean of k updates is weaker
    than their sum; 1.5 is where the best λ sat in the pilot below (1.0, the plain mean, until issue 33).
  seed: default 0, integer >= 0; the caller passes a different seed per layer.
  density: accepted as peft's and mergekit's name for the share kept, 1 - drop_rate (stored as drop_rate).
Validation grid (study v3, a star of 5 points like every method's (the default and each hyperparameter's other two
  values with the other at its default)): drop_rate in {0.0, 0.25, 0.5 (default)}, scaling in {1.0, 1.5 (default),
  2.0}. The first v3 star ({0.1, 0.3, 0.5} x {1, 2, 3} around λ = 1) chose drop 0.1 and λ = 1 at their ends; in issue
  33's k-pilot (seed 0 of the six-task study, 8 pairs and the group of six, 200 validation images per task, a product
  grid) mean validation accuracy at the best λ fell with the drop rate (pairs 84.7 / 84.1 / 82.7 % at p = 0.1 / 0.3 /
  0.5; the group of six 76.5 / 76.1 / 75.4 %), so the arm reaches p = 0, the end of its range (no drop: the plain
  mean), and λ peaked at 1.5 for pairs and 1.5-2 for the group of six at every p (a mean: λ hardly moves with k). λ is
  a pure output multiplier: one merge per drop rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._common import dare, stack

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


def dare_linear(deltas: Sequence[Tensor], drop_rate: float = 0.5, scaling: float = 1.0, seed: int = 0) -> Tensor:
    x = dare(stack(deltas), drop_rate, seed)
    return (scaling * x.mean(dim=0)).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="dare_linear",
    fn=dare_linear,
    paper=(
        "Yu, Yu, Yu, Huang, Li, 'Language Models are Super Mario: Absorbing Abilities from "
        "Homologous Models as a Free Lunch', ICML 2024, arXiv:2311.03099"
    ),
    defaults={"drop_rate": 0.5, "scaling": 1.5, "seed": 0},
    ranges={
        "drop_rate": (0.0, 1.0, "[)"),
        "scaling": (0.0, 4.0, "(]"),
        "seed": (0, 2**63 - 1, "[]"),
    },
    description="DARE (drop with prob. p, rescale by 1/(1-p)) on each update, then mean, times λ.",
    grid={"drop_rate": (0.0, 0.25, 0.5), "scaling": (1.0, 1.5, 2.0)},
    grid_design="star",
    default_source=(
        "drop_rate 0.5: the moderate default of merging toolkits (mergekit, FusionBench) for dense LoRA "
        "updates; scaling 1.5: where this project's pilot found the best λ (issue 33; the plain mean is 1.0)"
    ),
    scaling_is_output_multiplier=True,
    aliases={"density": ("drop_rate", lambda density: 1.0 - density)},  # peft and mergekit: the share kept
)
