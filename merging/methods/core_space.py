"""Core Space: run any per-layer data-free merge in the small space the group's LoRA updates span.

Paper: Panariello, Marczak, Magistri, Porrello, Twardowski, Bagdanov, Calderara, van de Weijer, "Accurate and
Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025 (arXiv 2509.17786); reference code
github.com/apanariello4/core-space-merging (`get_core_matrices` in task_merger.py).

Algorithm (per layer, k updates ΔW_i = B_i A_i of rank r_i): stack the down-projections A = [A_1; ...; A_k]
(Σr_i x in) and the up-projections B = [B_1 | ... | B_k] (out x Σr_i); their SVDs give orthonormal bases
V_A (in x q_A, the right singular vectors of A) and U_B (out x q_B, the left singular vectors of B) of the
group's joint row and column spaces. Each task becomes its core matrix M_i = U_Bᵀ ΔW_i V_A (q_B x q_A, at most
Σr_i x Σr_i: 48 x 48 for six rank-8 adapters, against a 1280 x 320 layer); any merge method runs on the M_i; the
merged update is U_B · merge(M_1..M_k) · V_Aᵀ. The projection loses nothing (ΔW_i = U_B M_i V_Aᵀ exactly, since
ΔW_i's columns lie in span U_B and its rows in span V_A), so a linear merge (task arithmetic, linear) gives exactly
the full-space result, and so does any method that depends on the updates only through rotation-invariant
quantities of their numerical-rank spectra (this project's TSV-M, Iso-C and Iso-CTS: tests/test_core_space.py).
What changes is an entry-wise method (TIES' trim and sign election, DARE, magnitude pruning): it trims and elects
over the core coordinates, where each task's update is dense and aligned to the group's shared directions, instead
of over the out x in entries.

Deviation: the factors. A LoRA's (B, A) are defined only up to an invertible r x r matrix R (B R, R⁻¹ A give the
same ΔW), and the reference code's bases use the trained factors as they are, so its core coordinates (and an
entry-wise merge in them) depend on that arbitrary choice. Here every task's factors are the balanced ones of its
update's thin SVD, B_i = U_i S_i^½ and A_i = S_i^½ Vh_i: the merge is a function of the updates alone (the
registry's contract: one layer's k ΔW), two adapters with the same ΔW merge alike, and adapters from any trainer
(whose factor scale conventions differ) are treated the same. The spans, and hence every linear and
rotation-invariant merge, are the same as the reference's.

`in_core_space(method)` makes the registered record `<name>_core` of a data-free per-layer method: the same
hyperparameters, grid and defaults, run in Core Space (its `space` says so); merging/methods/__init__.py lists which
`METHODS` below lists the methods the study sweeps in it: TIES only, since the pilot of issue 35 found every other
registered data-free method either unchanged by it (linear, task arithmetic, KnOTS-TA, TSV-M, Iso-C, Iso-CTS: the
same merge to float tolerance) or, like TIES, entry-wise but swept on the study's subset only (DARE, magnitude
pruning, KnOTS-TIES); `in_core_space` makes any of them on request.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from . import ties
from ._base import MergeMethod
from ._common import low_rank_svd, svd_rtol

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor

CORE_SPACE_PAPER = (
    "Panariello, Marczak, Magistri, Porrello, Twardowski, Bagdanov, Calderara, van de Weijer, 'Accurate and "
    "Efficient Low-Rank Model Merging in Core Space', NeurIPS 2025, arXiv:2509.17786"
)


def core_project(deltas: Sequence[Tensor], rank: int | None = None) -> tuple[Tensor, list[Tensor], Tensor]:
    """(U_B [out, q_B], [M_i [q_B, q_A] per task], V_A [in, q_A]), float64, with ΔW_i = U_B M_i V_Aᵀ.

    q_B and q_A are the numerical ranks of the stacked balanced factors (at most Σ r_i); both are 0 when every
    update is zero. With `rank`, only the top `rank` directions of each basis are kept (compress-then-merge: the
    cores are then the projections U_Bᵀ ΔW_i V_A, lossless only where Σ r_i <= rank)."""
    import torch

    rtol = svd_rtol(deltas[0].dtype)
    xs = [d.detach().to(torch.float64) for d in deltas]
    parts = [low_rank_svd(x, rtol) for x in xs]
    ups = torch.cat([u * s.sqrt() for u, s, _ in parts], dim=1)  # B = [B_1 | ... | B_k], out x Σr
    downs = torch.cat([s.sqrt()[:, None] * vh for _, s, vh in parts], dim=0)  # A = [A_1; ...; A_k], Σr x in
    u_b = low_rank_svd(ups, rtol)[0][:, :rank]  # out x q_B (singular values descending: the top ones)
    v_a = low_rank_svd(downs, rtol)[2][:rank].T  # in x q_A
    return u_b, [u_b.T @ x @ v_a for x in xs], v_a


def _from_core(u_b: Tensor, merged_core: Tensor, v_a: Tensor, like: Tensor) -> Tensor:
    return (u_b @ merged_core.to(u_b.dtype) @ v_a.T).to(like.dtype)


def in_core_space(method: MergeMethod, rank: int | None = None) -> MergeMethod:
    """The record `<name>_core`: `method` (a data-free per-layer method) run on the group's core matrices; with
    `rank`, in the top-`rank` Core Space (`compress_then_merge`)."""
    if not method.per_layer or method.statistics:
        raise ValueError(f"{method.name}: Core Space runs data-free per-layer methods only")

    def core_fn(deltas: Sequence[Tensor], **hyperparams) -> Tensor:
        u_b, cores, v_a = core_project(deltas, rank)
        if u_b.shape[1] == 0 or v_a.shape[1] == 0:  # every update is zero
            return deltas[0].new_zeros(deltas[0].shape)
        return _from_core(u_b, method.fn(cores, **hyperparams), v_a, deltas[0])

    core_model = None
    if method.merge_model is not None:  # a whole-model method (TIES' whole-vector trim) sees every layer's cores

        def core_model(layer_deltas: dict[str, list[Tensor]], **hyperparams) -> dict[str, Tensor]:
            projected = {layer: core_project(deltas, rank) for layer, deltas in layer_deltas.items()}
            nonzero = {layer: cores for layer, (u, cores, v) in projected.items() if u.shape[1] and v.shape[1]}
            merged = method.merge_model(nonzero, **hyperparams) if nonzero else {}
            return {
                layer: (
                    _from_core(projected[layer][0], merged[layer], projected[layer][2], deltas[0])
                    if layer in merged
                    else deltas[0].new_zeros(deltas[0].shape)
                )
                for layer, deltas in layer_deltas.items()
            }

    return dataclasses.replace(
        method,
        name=f"{method.name}_core",
        fn=core_fn,
        merge_model=core_model,
        paper=f"{method.paper}; run in Core Space: {CORE_SPACE_PAPER}",
        description=f"In Core Space (U_Bᵀ ΔW_i V_A): {method.description}",
        space="core",
    )


METHODS = [in_core_space(ties.METHOD)]


# --- compress-then-merge: a merged LoRA of rank r by construction -----------------------------------------------------
# The export (merging/export.py) writes a rank-r LoRA by truncating each merged ΔW's SVD at r: merge, then compress.
# Compress-then-merge (the reference: arXiv 2606.03723, "enforce the rank-r bottleneck before merging")
# restricts the merge to the group's top-r Core Space first, so the merged update has rank <= r and the rank-r
# export holds it exactly. A data-free method runs on the r x r core matrices (`in_core_space(method, rank)`); a
# data-aware one (RegMean) merges the updates projected onto that space, U_r U_rᵀ ΔW_i V_r V_rᵀ: its result
# (Σ ΔW_i' G_i)(Σ G_i)⁻¹ keeps their column space, rank <= r. What changes against truncating the full merge: the
# bottleneck is the directions the group's adapters share most (the stacked factors' top singular vectors), chosen
# before the merge, not the merged update's own top directions after it.

COMPRESSED = "@rank"  # "<method>@rank<r>": the registry name of a method merged compress-then-merge at rank r


def compressed_name(name: str, rank: int) -> str:
    return f"{name}{COMPRESSED}{rank}"


def compress_then_merge(method: MergeMethod, rank: int) -> MergeMethod:
    """The record `<name>@rank<r>`: `method` merged in the group's top-`rank` Core Space (merged rank <= `rank`)."""
    from mlvision.errors import MergeConfigError

    if not method.per_layer:
        raise MergeConfigError(
            f"--compress-first merges with a per-layer method (data-free or data-aware); '{method.name}' is a "
            f"{method.kind} merge of whole adapters: drop --compress-first"
        )
    if rank < 1:
        raise MergeConfigError(f"--compress-first needs a rank of at least 1, got {rank}")
    name = compressed_name(method.name, rank)
    paper = f"{method.paper}; compress-then-merge at rank {rank} in Core Space: {CORE_SPACE_PAPER}"
    if not method.statistics:
        description = f"In the group's rank-{rank} Core Space: {method.description}"
        return dataclasses.replace(in_core_space(method, rank), name=name, paper=paper, description=description)

    def projected(deltas: Sequence[Tensor]) -> list[Tensor]:
        u_b, _, v_a = core_project(deltas, rank)
        return [(u_b @ (u_b.T @ d.detach().double() @ v_a) @ v_a.T).to(d.dtype) for d in deltas]

    def fn(deltas: Sequence[Tensor], **arguments) -> Tensor:
        return method.fn(projected(deltas), **arguments)

    return dataclasses.replace(
        method,
        name=name,
        fn=fn,
        paper=paper,
        description=f"Projected on the group's rank-{rank} Core Space, then: {method.description}",
        optional_statistics=(),  # shortcuts computed from the unprojected updates (RegMean's ΔW_i G_i) do not apply
        space="core",
    )
