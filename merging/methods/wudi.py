"""WUDI merging: the update that least disturbs each task on the inputs its own update reacts to (data-free).

Paper: Cheng, Xiong, Wei, Zhu, Yuan, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", ICML 2025 (arXiv 2503.08099); reference code
github.com/nathanielyvo/WUDI-Merging (`get_redundant_task_vector` in vit/coef.py).

Idea: a linear layer's task vector τ_i = ΔW_i (out x in) has rows that span, approximately, the inputs the task
feeds that layer; so the interference the merged update τ causes on task i can be measured without data as
‖(τ - τ_i) τ_iᵀ‖²_F. WUDI minimises, per layer,
    L(τ) = Σ_i w_i ‖(τ - τ_i) τ_iᵀ‖²_F,   w_i = 1 / ‖τ_i‖²_F,
which is RegMean's objective with the task vectors' own Gram matrices G_i = τ_iᵀ τ_i standing in for the inputs'.
The reference minimises it by 300 Adam steps (learning rate 1e-5) from τ_0 = Σ_i τ_i and keeps wherever they end.

What is computed here, and why it differs (a deviation): for LoRA updates L has exact minimisers that interpolate.
Each task's rows span only r_i (8) of a layer's input dimensions, so k tasks' row spaces are usually linearly
independent and some τ makes every (τ - τ_i) τ_iᵀ zero; with nearly aligned row spaces that τ is huge (1.1-17x the
norm of Σ τ_i on a committed pair's layers, the first blocks worst) and wrecks the merge (10-17 % retention
in issue 35's pilot, chance level). The reference never gets there: its 300 steps of about lr per entry move the
committed adapters' updates (entries of order 5e-3) only part of the way (L from 451 to 353, against 1.2 at the
minimiser). That early stop is what keeps WUDI near Σ τ_i, and it depends on the updates' scale. It is made
explicit and scale-free here as its usual stand-in, a ridge towards the start (Tikhonov regularisation, the
continuous form of early-stopped gradient descent):
    τ* = argmin L(τ) + μ ‖τ - Σ_i τ_i‖²_F,   μ = ρ · λ_max(Σ_i w_i G_i),
    τ* = (Σ_i w_i τ_i G_i + μ Σ_i τ_i)(Σ_i w_i G_i + μ I)⁻¹,
so ρ → 0 is the exact minimiser (ρ = 0 allowed: the pseudo-inverse) and ρ → ∞ is task arithmetic's sum. Computed
in the group's Core Space (merging/methods/core_space.py: τ_i = U_B M_i V_Aᵀ and the same formula on the small core
matrices gives τ* = U_B M* V_Aᵀ exactly, since every term lies in those spans), in float64.
Hyperparameters:
  regularization (ρ): default 1.0, range [0, 100]: how strongly the merge is held at Σ_i τ_i, in units of the
    largest eigenvalue of the weighted Gram matrix. In the pilot (every pair, 2 groups each of k = 3-5 and the
    group of six, seed 0, 50 validation images per task) mean validation accuracy rose with ρ over {0.001, 0.01,
    0.1, 1}: at k = 2 from 72 to 81 %, at k >= 3 from 69 to 79 % (each at its best λ); 0.001 was worst everywhere.
  scaling (λ): default 0.5, range (0, 4]: multiplies the result. The paper claims none is needed (λ = 1), though
    its ViT script scans λ in {0, 0.1, ..., 1.5}; in the pilot the best λ at ρ = 1 was 0.5-0.7.
Validation grid (issue 33): ρ fixed at 1 and λ in {0.5 (default), 0.3, 0.7, 1.0, 1.4} for a pair, each value times
  (2/k)^0.5 for k tasks (at k = 6: 0.17-0.81). Study v3's first grid, a star of ρ {0.3, 1, 3} and λ {0.3, 0.5, 0.7},
  put the choice at λ's largest value in 177 of the wide study's 199 merges on its arm and ρ at an end in 31 of 45
  on its (the six-task study: ρ 0.3 / 3 in 41 / 32 of 123, spread as noise spreads): λ is what moves, and its
  optimum falls with k, so the five points go to it. On 200 validation images per task (seed 0, ρ = 1) the best λ
  sat at 0.7-1.0 for the wide study's pairs (15 of 16), 0.5-0.7 for its groups of four and 0.3-0.5 for its groups
  of six: a fall of about 1.7x from k = 2 to 6, 3^0.5. λ is a pure output multiplier (the sweep merges once and
  rescales).
One adapter: τ* = (τ_1 G_1 + μ τ_1)(G_1 + μ I)⁻¹ = τ_1 (its rows lie in G_1's range), times λ; k copies of one update:
the closed form gives (τ G + μ k τ)(G + μ I)⁻¹ with G = G_1, between τ and kτ, times λ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._base import MergeMethod
from ._common import svd_rtol
from .core_space import core_project

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


def wudi_core(cores: Sequence[Tensor], regularization: float, rtol: float) -> Tensor:
    """argmin over M of Σ_i w_i ‖(M - M_i) M_iᵀ‖² + μ ‖M - Σ_i M_i‖² (float64), w_i = 1/‖M_i‖², μ = ρ·λ_max."""
    import torch

    weights = [1.0 / float(torch.linalg.matrix_norm(m) ** 2) if bool(m.any()) else 0.0 for m in cores]
    gram = sum(w * (m.T @ m) for w, m in zip(weights, cores))
    target = sum(w * (m @ (m.T @ m)) for w, m in zip(weights, cores))
    if regularization == 0:
        return target @ torch.linalg.pinv(gram, rtol=rtol, hermitian=True)
    mu = regularization * float(torch.linalg.eigvalsh(gram)[-1])
    start = sum(cores)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + mu * eye, (target + mu * start).T).T  # (G + μI) is symmetric


def wudi(deltas: Sequence[Tensor], scaling: float = 0.5, regularization: float = 1.0) -> Tensor:
    u_b, cores, v_a = core_project(deltas)
    if u_b.shape[1] == 0 or v_a.shape[1] == 0:  # every update is zero
        return deltas[0].new_zeros(deltas[0].shape)
    # the Gram matrices square the updates' spectra, so their numerical-zero cut-off is the square of the updates'
    merged = wudi_core(cores, regularization, svd_rtol(deltas[0].dtype) ** 2)
    return (scaling * (u_b @ merged @ v_a.T)).to(deltas[0].dtype)


METHOD = MergeMethod(
    name="wudi",
    fn=wudi,
    paper=(
        "Cheng, Xiong, Wei, Zhu, Yuan, 'Whoever Started the Interference Should End It: Guiding "
        "Data-Free Model Merging via Task Vectors', ICML 2025, arXiv:2503.08099"
    ),
    defaults={"scaling": 0.5, "regularization": 1.0},
    ranges={"scaling": (0.0, 4.0, "(]"), "regularization": (0.0, 100.0, "[]")},
    description="Least squares: disturb each task least on the inputs its own update spans (its rows), times λ.",
    grid={"scaling": (0.3, 0.5, 0.7, 1.0, 1.4)},  # for a pair; ρ at its default
    scaling_falls_with_k=0.5,
    default_source=(
        "regularization 1.0 and scaling 0.5: this project's pilot (issue 35's note); the paper uses λ = 1 and no "
        "explicit regularization (its 300 Adam steps from Σ τ_i stop short of the minimiser)"
    ),
    scaling_is_output_multiplier=True,
)
