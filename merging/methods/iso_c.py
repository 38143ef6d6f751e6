"""Iso-C: isotropic merging — flatten the spectrum of the summed update.

Paper: Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025 (arXiv 2502.04959);
reference code github.com/danielm1405/iso-merging.

Algorithm: ΔW_TA = Σ_i ΔW_i = U Σ Vᵀ (thin SVD); replace every singular value by their mean σ̄
(an isotropic spectrum, so no task's directions are drowned by a dominant one);
ΔW = α · σ̄ · U Vᵀ.
Hyperparameters:
  scaling (α): default 1.0, range (0, 4]. The reference code does not fix α and does not
    recommend α = 1: its evaluation (src/eval/eval.py, `evaluate_task_vector`, methods "iso_c" and
    "iso_cts") scans α in np.linspace(0, 3, n_eval_points)[1:] with n_eval_points = 31
    (config/config.yaml), i.e. 0.1, 0.2, ..., 3.0 in increasing order, on the validation splits,
    stopping early once 3 consecutive α do not improve the average validation accuracy
    (early_stopping_patience = 3); it keeps the scored α with the best average normalized
    accuracy (`find_optimal_coef` on avg_normalized_top1) and reports test accuracy at that α.
    (FusionBench's example commands for Iso-C use α = 1.5.) 1.0 is this project's choice: it
    keeps ‖ΔW‖ in the scale of the summed update.
    Validation grid (study v3): scaling in {1.0 (default), 0.3, 0.5, 0.7, 1.5}, 5 points like every
    method's (around 1 and below it, since LoRA sums over-shoot as k grows; 0.3 added because study
    v2's 50-image choices sat at its smallest value, 0.5, in 29 % of merges). α is a pure output
    multiplier: the sweep merges once and rescales.
Deviation: the reference code flattens all min(out, in) singular values. For full-rank updates
(full fine-tuning, the paper's setting) that is what happens here too. A sum of k LoRA updates
has rank <= Σ r_i (e.g. 48 of 320): its other "singular values" are rounding noise whose
singular vectors are arbitrary null-space directions, and flattening them would add α·σ̄ along
~270 arbitrary directions (and shrink σ̄ by the zeros). So only the numerical rank
(σ > rtol·σ_max) is flattened: the result has exactly rank(ΔW_TA) non-zero singular values,
all equal to α times the mean of ΔW_TA's non-zero singular values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._common import low_rank_svd, svd_rtol

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


def iso_c(deltas: Sequence[Tensor], scaling: float = 1.0) -> Tensor:
    import torch

    total = torch.stack([d.detach().to(torch.float64) for d in deltas]).sum(dim=0)
    u, s, vh = low_rank_svd(total, svd_rtol(deltas[0].dtype))
    if s.numel() == 0:
        return torch.zeros_like(deltas[0])
    merged = s.mean() * (u @ vh)
    return (scaling * merged).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="iso_c",
    fn=iso_c,
    paper=(
        "Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, 'No Task Left Behind: "
        "Isotropic Model Merging with Common and Task-Specific Subspaces', ICML 2025, "
        "arXiv:2502.04959"
    ),
    defaults={"scaling": 1.0},
    ranges={"scaling": (0.0, 4.0, "(]")},
    description="SVD of Σ ΔW_i with every non-zero singular value set to their mean, times α.",
    grid={"scaling": (0.3, 0.5, 0.7, 1.0, 1.5)},
    default_source=(
        "scaling 1.0: this project's choice (keeps the scale of the summed update); the reference code "
        "picks α on validation from {0.1, 0.2, ..., 3.0} (Marczak et al. 2025)"
    ),
    scaling_is_output_multiplier=True,
)
