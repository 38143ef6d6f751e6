"""TSV-M: Task Singular Vectors merging (low-rank per task, decorrelated by orthogonalisation).

Paper: Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, "Task Singular Vectors:
Reducing Task Interference in Model Merging", CVPR 2025 (arXiv 2412.00081); reference code
github.com/AntoAndGar/task_singular_vectors (`compute_and_sum_svd_mem_reduction`).

Algorithm: SVD each ΔW_i = U_i S_i V_iᵀ and keep its top ⌊min(out, in)/k⌋ components (at least
1); concatenate U_cat = [U_1 .. U_k], σ_cat, V_cat = [V_1 .. V_k]; replace U_cat and V_cat by
their orthogonal polar factors (U_⊥ = P Qᵀ where P S Qᵀ = U_cat; same for V) to remove the
interference between tasks' singular vectors; ΔW = α · U_⊥ diag(σ_cat) V_⊥ᵀ.
Hyperparameters:
  scaling (α): default 1.0, range (0, 4]. The reference code does not fix α and does not
    recommend α = 1: its evaluation (src/eval/eval.py, `evaluate_task_vector`, method "TSVM")
    scores α in np.linspace(0, 3, n_eval_points)[1:] with n_eval_points = 31 (config/config.yaml),
    i.e. {0.1, 0.2, ..., 3.0}, on the validation splits, keeps the α with the best average
    normalized accuracy (`find_optimal_coef` on avg_normalized_top1) and reports test accuracy at
    that α. 1.0 is this project's choice: with updates in mutually orthogonal subspaces α = 1
    returns Σ ΔW_i, the task-arithmetic sum at λ = 1.
    Validation grid (study v3): scaling in {1.0 (default), 0.2, 0.3, 0.5, 0.7}, 5 points like every
    method's (0.2 added: study v2 chose its smallest value, 0.3, in 19 % of merges). Downwards only:
    that sum already over-shoots as k grows (study v1: TSV-M's collapse with k at α = 1 was this
    scale). α is a pure output multiplier: the sweep merges once and rescales.
Deviations, both for low-rank (LoRA) updates and both identical to the paper when the updates
are full rank: (1) components with σ <= rtol·σ_max (numerical zeros: a rank-8 update has only 8
real components but ⌊min/k⌋ may be 53) are not kept — their singular vectors are arbitrary
null-space directions that would otherwise take part in the orthogonalisation; (2) when U_cat or
V_cat is rank-deficient (e.g. two identical adapters) the polar factor is taken on its range
(P_r Q_rᵀ over the non-zero singular values) — the full polar factor is not unique there and its
arbitrary part would add arbitrary directions to ΔW. With k identical adapters TSV-M then
returns the adapter; with updates in mutually orthogonal subspaces it returns Σ ΔW_i (α = 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._common import low_rank_svd, polar_on_range, svd_rtol

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


def tsv_components(deltas: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """U_cat [out, m], σ_cat [m], Vh_cat [m, in] (float64): each task's kept top components."""
    import torch

    rtol = svd_rtol(deltas[0].dtype)
    out_f, in_f = deltas[0].shape
    per_task = max(1, min(out_f, in_f) // len(deltas))
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = low_rank_svd(d.detach().to(torch.float64), rtol)
        us.append(u[:, :per_task])
        ss.append(s[:per_task])
        vhs.append(vh[:per_task])
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)


def tsv_m(deltas: Sequence[Tensor], scaling: float = 1.0) -> Tensor:
    import torch

    u_cat, s_cat, vh_cat = tsv_components(deltas)
    if s_cat.numel() == 0:
        return torch.zeros_like(deltas[0])
    rtol = svd_rtol(deltas[0].dtype)
    u_orth = polar_on_range(u_cat, rtol)  # [out, m]
    vh_orth = polar_on_range(vh_cat, rtol)  # [m, in]
    merged = (u_orth * s_cat) @ vh_orth
    return (scaling * merged).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="tsv_m",
    fn=tsv_m,
    paper=(
        "Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, 'Task Singular Vectors: "
        "Reducing Task Interference in Model Merging', CVPR 2025, arXiv:2412.00081"
    ),
    defaults={"scaling": 1.0},
    ranges={"scaling": (0.0, 4.0, "(]")},
    description="Top 1/k singular components per task, orthogonalise U and V jointly, times α.",
    grid={"scaling": (0.2, 0.3, 0.5, 0.7, 1.0)},
    default_source=(
        "scaling 1.0: this project's choice (α = 1 gives Σ ΔW_i for updates in orthogonal subspaces); the "
        "reference code picks α on validation from {0.1, 0.2, ..., 3.0} (Gargiulo et al. 2025)"
    ),
    scaling_is_output_multiplier=True,
)
