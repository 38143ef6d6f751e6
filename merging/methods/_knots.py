"""KnOTS alignment shared by `knots_ties` and `knots_ta` (Stoica et al., ICLR 2025).

Concatenate the updates side by side, M = [ΔW_1 | ... | ΔW_k] (out x k·in), take its thin SVD
M = U Σ [V_1ᵀ | ... | V_kᵀ]; then ΔW_i = U Σ V_iᵀ exactly, with one basis U shared by all tasks
and task-specific right factors. Merging happens on the Σ V_iᵀ ("s_on_V" in the reference code).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._common import low_rank_svd, svd_rtol

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor


def knots_align(deltas: Sequence[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Return (U [out, q], s [q], [Vh_i [q, in] for each task]) in float64, ΔW_i = U diag(s) Vh_i.

    Exact thin SVD of the concatenation restricted to its numerical rank q (components with
    s <= rtol·s_max are dropped, as the reference code drops s <= 1e-5). Computed without
    forming the out x k·in SVD: each ΔW_i = U_i S_i Vh_i (rank r_i), so
    M = [U_1 S_1 | ... | U_k S_k] · blockdiag(Vh_1, ..., Vh_k) and the block-diagonal factor has
    orthonormal rows; an SVD of the small out x Σr_i left factor, L = P Σ Wᵀ, gives
    M = P Σ (Wᵀ blockdiag(Vh_i)), whose right factor again has orthonormal rows.
    """
    import torch

    rtol = svd_rtol(deltas[0].dtype)
    parts = [low_rank_svd(d.detach().to(torch.float64), rtol) for d in deltas]
    out_f, in_f = deltas[0].shape
    left = torch.cat([u * s for u, s, _ in parts], dim=1)  # [out, R]
    if left.shape[1] == 0:  # every update is zero
        empty = torch.zeros(0, in_f, dtype=torch.float64)
        return torch.zeros(out_f, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), [empty for _ in deltas]
    p, sigma, wh = torch.linalg.svd(left, full_matrices=False)  # wh: [q, R]
    keep = sigma > rtol * sigma[0]
    p, sigma, wh = p[:, keep], sigma[keep], wh[keep]
    vhs, start = [], 0
    for _, s_i, vh_i in parts:
        r_i = s_i.shape[0]
        vhs.append(wh[:, start : start + r_i] @ vh_i)  # [q, in]
        start += r_i
    return p, sigma, vhs
