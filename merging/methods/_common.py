"""Tensor helpers shared by the merge methods (all pure; nothing here keeps state)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    import torch
    from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a merge computes in for inputs of `dtype`: float64 stays float64; float32 and the
    half-precision types (bf16, fp16) are computed in float32, and the result is cast back."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def stack(deltas: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """[k, out, in] copy of the updates in `dtype` (a new tensor: inputs are never modified).

    dtype None: `compute_dtype` of the inputs (float64 for float64 inputs, float32 otherwise).
    """
    import torch

    dtype = compute_dtype(deltas[0].dtype) if dtype is None else dtype
    return torch.stack([d.detach().to(dtype) for d in deltas]).clone()


def svd_rtol(dtype: torch.dtype) -> float:
    """Relative cut-off below which a singular value counts as zero.

    LoRA updates are low rank (r ≈ 8) but an out x in matrix stored in float32 has rounding
    "singular values" of about eps·σ_max in its null space; their singular vectors are arbitrary
    directions, not part of the update. 1e-5 (the cut-off of the KnOTS reference code, there
    absolute) sits well above float32 noise; half-precision inputs need a looser cut-off.
    """
    import torch

    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(1e-5, 4.0 * eps)


def low_rank_svd(x: Tensor, rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a 2-D float64 `x` truncated to its numerical rank: x ≈ U diag(s) Vh.

    Components with s <= rtol · s_max are dropped (they are rounding noise); what is kept is
    exact to float64 precision. Returns U [m, r], s [r] (descending), Vh [r, n]; r may be 0.
    Cost: the Gram matrix on the smaller side and its eigendecomposition, then an exact SVD of
    the m x r (or r x n) projection — several times faster than torch.linalg.svd of a tall
    1280 x 320 matrix on CPU, which matters when a sweep merges hundreds of layers.
    """
    import torch

    m, n = x.shape
    if m < n:  # work on the side with the smaller Gram matrix
        u, s, vh = low_rank_svd(x.T, rtol)
        return vh.T, s, u.T
    evals, evecs = torch.linalg.eigh(x.T @ x)  # ascending
    s_est = evals.clamp_min(0).sqrt()
    s_max = s_est[-1] if n else torch.tensor(0.0, dtype=x.dtype)
    # the Gram route loses precision for tiny s only; keep a margin below the final cut-off
    keep = s_est > 0.1 * rtol * s_max
    if s_max == 0 or not bool(keep.any()):
        return x.new_zeros(m, 0), x.new_zeros(0), x.new_zeros(0, n)
    v = evecs[:, keep]  # [n, r'] orthonormal, spans the row space of x
    u, s, wh = torch.linalg.svd(x @ v, full_matrices=False)  # exact SVD of the small m x r' part
    vh = wh @ v.T
    final = s > rtol * s[0]
    return u[:, final], s[final], vh[final]


def polar_on_range(x: Tensor, rtol: float) -> Tensor:
    """Orthogonal polar factor P Qᵀ of a 2-D x (P S Qᵀ = x), restricted to x's numerical range.

    The nearest matrix with orthonormal columns (or rows) to x; where x is rank-deficient (two
    tasks sharing a singular vector) the full polar factor is not unique and its arbitrary part
    would add arbitrary directions, so only the components with s > rtol·s_max are kept.
    """
    import torch

    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    keep = s > rtol * s[0]
    return p[:, keep] @ qh[keep]


def magnitude_thresholds(layers: Sequence[Tensor], density: float) -> Tensor:
    """Per task, the magnitude of its round(density·n)-th largest entry (at least 1) over all of `layers`.

    `layers` are [k, ...] tensors (one, for a per-layer trim; every layer, for TIES' whole-vector trim);
    the result is [k]. Keeping entries >= the threshold keeps every entry tied with it, so the result never
    depends on the order of equal values."""
    import torch

    flat = torch.cat([x.abs().reshape(x.shape[0], -1) for x in layers], dim=1)
    n = flat.shape[1]
    if n == 0:  # nothing to trim: every (no) entry is kept
        return flat.new_zeros(flat.shape[0])
    n_keep = max(1, min(n, round(density * n)))
    # the n_keep-th largest per task (kthvalue counts from the smallest; ~2x faster than topk)
    return flat.kthvalue(n - n_keep + 1, dim=1).values


def topk_mask(x: Tensor, density: float, threshold: Tensor | None = None) -> Tensor:
    """Boolean mask of the top-`density` fraction of |x|'s entries (per leading index).

    x is [k, out, in]; each x[i] keeps its round(density·n) largest magnitudes (at least 1), ties with
    the threshold included. A given `threshold` ([k], `magnitude_thresholds` over more layers) is used
    instead of x's own."""
    if threshold is None:
        threshold = magnitude_thresholds([x], density)
    return x.abs() >= threshold.reshape(-1, *[1] * (x.dim() - 1))


def elect_and_disjoint_mean(x: Tensor) -> Tensor:
    """TIES steps 2-3 on [k, out, in] (already trimmed) values.

    Elect: per entry, the sign of the sum over tasks (the sign with the larger total mass); an
    entry whose sum is exactly 0 gets the sign of the whole layer's sum (the "majority" rule of
    the TIES reference code). Disjoint mean: average over the tasks whose value is non-zero
    and has the elected sign; an entry no task agrees with is 0.
    """
    import torch

    elected = torch.sign(x.sum(dim=0))
    majority = torch.sign(x.sum())
    elected = torch.where(elected == 0, majority, elected)
    agree = torch.where(elected > 0, x > 0, x < 0)  # [k, out, in]; zeros never agree
    total = (x * agree).sum(dim=0)
    count = agree.sum(dim=0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def dare(x: Tensor, drop_rate: float, seed: int) -> Tensor:
    """DARE on [k, out, in]: drop each entry with probability p, multiply survivors by 1/(1-p).

    The randomness comes only from a local generator seeded with `seed`; tasks are drawn in
    order, so a (seed, k, shape) triple always gives the same masks: the mask is drawn per
    position, so the i-th update gets the i-th mask whichever adapter it is. The uniforms are
    drawn in float32 whatever x's dtype, so float32 and float64 inputs get the same masks. With
    p = 0 nothing is dropped and x is returned unchanged (torch.rand is in [0, 1)).
    """
    import torch

    if drop_rate == 0:
        return x
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    keep = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32) >= drop_rate
    return x * keep / (1.0 - drop_rate)
