"""Iso-CTS: isotropic merging in the common and task-specific subspaces.

Paper: Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025 (arXiv 2502.04959);
reference code github.com/danielm1405/iso-merging (`iso_cts` in src/utils/iso.py).

Algorithm (per layer, n components to fill): (1) common subspace: the top c left/right singular
vectors of ΔW_TA = Σ_i ΔW_i, where c0 = ⌊f·n⌋, c = n - round((n - c0)/k)·k, so that the rest,
n - c = k·p, splits evenly over the k tasks (f = `common_space_fraction`); (2) task-specific
subspaces: each task's update with the common subspace projected out of its column space,
ΔW_i - U_c U_cᵀ ΔW_i, contributes its top p singular triplets; (3) concatenate the c common and
the k·p task-specific triplets, U_cat [out, c + k·p], σ_cat, V_cat, and orthogonalise U_cat and
V_cat by their polar factors (P Qᵀ from the SVD P S Qᵀ, as the reference code does);
(4) isotropic spectrum: every singular value becomes the mean σ̄ of σ_cat;
ΔW = α · σ̄ · U_⊥ V_⊥ᵀ. With f = 1 (or p = 0) it is Iso-C (iso_c.py).
Hyperparameters:
  scaling (α): default 1.0, range (0, 4]. The reference code picks α on validation like Iso-C's
    (iso_c.py): it scans α = 0.1, 0.2, ..., 3.0 (np.linspace(0, 3, 31)[1:]) on the validation
    splits with early stopping after 3 non-improving values, keeps the α with the best average
    normalized accuracy and reports test accuracy there; it recommends no fixed α (FusionBench's
    example commands use 1.5). 1.0 is this project's choice, as for Iso-C: the two have spectra of
    the same scale, so they share a grid.
    Validation grid (study v3): scaling in {1.0 (default), 0.3, 0.5, 0.7, 1.5}, 5 points like every
    method's (0.3 added: study v2 chose its smallest value, 0.5, in 36 % of merges); α is
    a pure output multiplier: the sweep merges once and rescales.
  common_space_fraction (f): default 0.8, range [0, 1], fixed (not in the grid, so the grid keeps
    5 points): the paper's and the reference README's value (`method.common_space_fraction=0.8`).
Deviations, all for low-rank (LoRA) updates; on generic full-rank updates (the paper's setting)
this is the reference algorithm (tests/test_merge_methods.py checks it against the formula):
(1) n is the numerical rank R of ΔW_TA (σ > rtol·σ_max), not min(out, in). A sum of k LoRA
updates has rank <= Σ r_i (e.g. 48 of 320); its other "singular vectors" are arbitrary null-space
directions that the flattening would give weight σ̄ (see iso_c.py). So c = R - round((R - ⌊f·R⌋)/k)·k
common directions are the top of ΔW_TA's real spectrum, its bottom R - c are replaced by k·p
task-specific ones, and the result has rank <= R, as Iso-C's.
(2) A task's residual triplets with σ <= rtol·‖ΔW_i‖_F are not kept (numerical zeros, e.g. for a
task inside the common subspace); the reference keeps its top p whatever their σ, which would add
arbitrary directions at weight σ̄ and zeros to the mean. σ̄ is the mean of the kept σ_cat.
(3) When U_cat or V_cat is rank-deficient (e.g. identical adapters contribute the same
task-specific directions) the polar factor is taken on its range, as in tsv_m.py.
(4) If rounding makes k·p exceed n (only for f near 0), k·p is lowered to the largest multiple of
k <= n; the reference code would index a negative common size there.
One adapter (k = 1): the common and task-specific parts together are all of ΔW_1's components, so
Iso-CTS returns Iso-C's result, σ̄ · U Vᵀ. k identical adapters: see tests/test_method_invariants.py.
Computed in float64 whatever the input dtype; returned in the input dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._common import low_rank_svd, polar_on_range, svd_rtol

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


def subspace_sizes(rank: int, k: int, common_space_fraction: float) -> tuple[int, int]:
    """(c, p): common-subspace size and components per task, c + k·p = rank, as the reference splits."""
    common = int(rank * common_space_fraction)
    task_total = min(round((rank - common) / k) * k, (rank // k) * k)
    return rank - task_total, task_total // k


def iso_cts(deltas: Sequence[Tensor], scaling: float = 1.0, common_space_fraction: float = 0.8) -> Tensor:
    import torch

    rtol = svd_rtol(deltas[0].dtype)
    xs = [d.detach().to(torch.float64) for d in deltas]
    u, s, vh = low_rank_svd(torch.stack(xs).sum(dim=0), rtol)
    if s.numel() == 0:
        return torch.zeros_like(deltas[0])
    common, per_task = subspace_sizes(s.numel(), len(xs), common_space_fraction)
    u_c = u[:, :common]
    us, ss, vhs = [u_c], [s[:common]], [vh[:common]]
    if per_task > 0:
        for x in xs:
            u_t, s_t, vh_t = low_rank_svd(x - u_c @ (u_c.T @ x), rtol)
            keep = s_t[:per_task] > rtol * torch.linalg.matrix_norm(x)
            us.append(u_t[:, :per_task][:, keep])
            ss.append(s_t[:per_task][keep])
            vhs.append(vh_t[:per_task][keep])
    u_orth = polar_on_range(torch.cat(us, dim=1), rtol)  # [out, m]
    vh_orth = polar_on_range(torch.cat(vhs, dim=0), rtol)  # [m, in]
    merged = torch.cat(ss).mean() * (u_orth @ vh_orth)
    return (scaling * merged).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="iso_cts",
    fn=iso_cts,
    paper=(
        "Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, 'No Task Left Behind: "
        "Isotropic Model Merging with Common and Task-Specific Subspaces', ICML 2025, "
        "arXiv:2502.04959"
    ),
    defaults={"scaling": 1.0, "common_space_fraction": 0.8},
    ranges={"scaling": (0.0, 4.0, "(]"), "common_space_fraction": (0.0, 1.0, "[]")},
    description="Top directions of Σ ΔW_i plus each task's own beyond them, orthogonalised, flat spectrum, times α.",
    grid={"scaling": (0.3, 0.5, 0.7, 1.0, 1.5)},
    default_source=(
        "scaling 1.0: this project's choice, as for iso_c (the reference code picks α on validation from "
        "{0.1, 0.2, ..., 3.0}); common_space_fraction 0.8: Marczak et al. 2025 and their README"
    ),
    scaling_is_output_multiplier=True,
)
