"""Core Space merging, WUDI and compress-then-merge (merging/methods/core_space.py, wudi.py): hand-worked examples,
the projection's exactness, which methods Core Space leaves unchanged, and the rank bound of compress-then-merge."""

from __future__ import annotations

import math

import pytest
import torch
from test_merge_methods import low_rank

from merging.methods import get_method, list_methods
from merging.methods.core_space import compressed_name, core_project, in_core_space
from mlvision.errors import MergeConfigError

DATA_FREE = [name for name in list_methods("data_free") if get_method(name).space == "full"]
# Merges that Core Space leaves unchanged: linear in the updates, or functions of the updates' numerical-rank
# spectra and singular vectors only (this project's SVD-based methods keep no null-space directions), which an
# orthonormal change of basis preserves.
UNCHANGED = {"linear", "task_arithmetic", "knots_ta", "tsv_m", "iso_c", "iso_cts", "wudi"}
# Entry-wise methods: their trim, sign election or random drop act on the coordinates, which Core Space changes.
ENTRY_WISE = {"ties", "dare_linear", "dare_ties", "magnitude_prune", "knots_ties"}


def group(seed: int = 0, ranks=(3, 2, 4)) -> list[torch.Tensor]:
    return [low_rank(12, 10, r, seed + i).double() for i, r in enumerate(ranks)]


def test_every_data_free_method_is_classified():
    assert set(DATA_FREE) == UNCHANGED | ENTRY_WISE, "add the method to UNCHANGED or ENTRY_WISE (and say why)"


def test_the_projection_loses_nothing():
    deltas = group()
    u_b, cores, v_a = core_project(deltas)
    assert u_b.shape == (12, 9) and v_a.shape == (10, 9)  # Σ r_i = 9 <= min(out, in): the cores are 9 x 9
    torch.testing.assert_close(u_b.T @ u_b, torch.eye(9, dtype=torch.float64))
    torch.testing.assert_close(v_a.T @ v_a, torch.eye(9, dtype=torch.float64))
    for delta, core in zip(deltas, cores):
        torch.testing.assert_close(u_b @ core @ v_a.T, delta)


@pytest.mark.parametrize("name", sorted(UNCHANGED))
def test_linear_and_spectral_methods_merge_alike_in_core_space(name):
    deltas = group(1)
    full = get_method(name)(deltas)
    core = in_core_space(get_method(name))(deltas)
    # to float tolerance (the SVD-based methods' Gram-route SVDs, merging/methods/_common.py, agree to ~1e-6)
    assert torch.linalg.matrix_norm(core - full) <= 1e-5 * torch.linalg.matrix_norm(full)


@pytest.mark.parametrize("name", sorted(ENTRY_WISE))
def test_entry_wise_methods_change_in_core_space(name):
    deltas = group(2)
    full, core = get_method(name)(deltas), in_core_space(get_method(name))(deltas)
    assert torch.linalg.matrix_norm(core - full) > 1e-3 * torch.linalg.matrix_norm(full)


def test_ties_core_by_hand():
    """ΔW_1 = e1 (1, 1), ΔW_2 = e1 (1, -1)/2. Full-space TIES (density 1, λ 1): entry (1, 1) takes the mean of 1 and
    0.5; entry (1, 2) elects + (the sum 1 - 0.5 > 0) and keeps 1 alone: (0.75, 1). In Core Space the two updates
    occupy the two orthogonal row directions (1, 1)/√2 and (1, -1)/√2 (different norms, so the basis is fixed):
    each core entry has one non-zero task, nothing conflicts, and the merge is the sum e1 (1.5, 0.5)."""
    e1 = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    rows = torch.tensor([[1.0, 1.0], [0.5, -0.5]], dtype=torch.float64)
    deltas = [e1 @ rows[:1], e1 @ rows[1:]]
    params = {"density": 1.0, "scaling": 1.0}
    torch.testing.assert_close(get_method("ties")(deltas, **params)[0], torch.tensor([0.75, 1.0], dtype=torch.float64))
    core = get_method("ties_core")(deltas, **params)
    torch.testing.assert_close(core, torch.tensor([[1.5, 0.5], [0.0, 0.0]], dtype=torch.float64))


def test_wudi_by_hand():
    """Two rank-1 updates sharing one input direction, τ_1 = a e1ᵀ and τ_2 = b e1ᵀ (a, b unit vectors): w_i = 1,
    G = 2 e1 e1ᵀ (λ_max 2, μ = 2ρ), Σ w_i τ_i G_i = (a + b) e1ᵀ; the closed form (a + b)(1 + 2ρ)/(2 + 2ρ) e1ᵀ is the
    mean at ρ = 0 and tends to the sum as ρ grows. Updates in orthogonal input directions merge to their sum at any
    ρ (nothing interferes)."""
    a = torch.tensor([[0.6], [0.8], [0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0], [0.6], [0.8]], dtype=torch.float64)
    e1, e2 = torch.eye(4, dtype=torch.float64)[:1], torch.eye(4, dtype=torch.float64)[1:2]
    wudi = get_method("wudi")
    for rho in (0.0, 0.3, 1.0, 3.0):
        expected = (a + b) @ e1 * (1 + 2 * rho) / (2 + 2 * rho)
        torch.testing.assert_close(wudi([a @ e1, b @ e1], regularization=rho, scaling=1.0), expected)
        torch.testing.assert_close(wudi([a @ e1, b @ e2], regularization=rho, scaling=1.0), a @ e1 + b @ e2)


def test_wudi_at_zero_regularization_removes_the_interference_it_measures():
    """ρ = 0 is the exact minimiser: for LoRA updates whose row spaces are independent, (τ - τ_i) τ_iᵀ = 0 for
    every i (the interpolation that issue 35's pilot found too large to merge well)."""
    deltas = group(3, ranks=(2, 3))
    merged = get_method("wudi")(deltas, regularization=0.0, scaling=1.0)
    for delta in deltas:
        scale = torch.linalg.matrix_norm(delta) ** 2
        assert torch.linalg.matrix_norm((merged - delta) @ delta.T) < 1e-6 * scale
        assert torch.linalg.matrix_norm((sum(deltas) - delta) @ delta.T) > 1e-2 * scale  # the sum interferes


@pytest.mark.parametrize("name", ["ties", "task_arithmetic", "tsv_m", "wudi", "regmean"])
def test_compress_then_merge_has_the_rank_it_is_given(name):
    deltas = group(4)  # Σ r_i = 9
    method = get_method(compressed_name(name, 4))
    grams = {"grams": [(lambda x: x.T @ x)(torch.randn(30, 10, dtype=torch.float64)) for _ in deltas]}
    arguments = grams if method.statistics else {}
    assert method.name == f"{name}@rank4" and method.space == "core"
    assert torch.linalg.matrix_rank(method(deltas, **arguments), rtol=1e-9) <= 4
    # at a rank that holds every update the compression loses nothing: the merge is the Core Space merge
    lossless = get_method(compressed_name(name, 9))(deltas, **arguments)
    in_core = get_method(name)(deltas, **arguments) if method.statistics else in_core_space(get_method(name))(deltas)
    assert torch.linalg.matrix_norm(lossless - in_core) <= 1e-5 * torch.linalg.matrix_norm(in_core)


def test_compress_then_merge_refuses_what_it_cannot_run():
    with pytest.raises(MergeConfigError, match="adamerging.*drop --compress-first"):
        get_method(compressed_name("adamerging", 8))
    with pytest.raises(MergeConfigError, match="at least 1"):
        get_method(compressed_name("ties", 0))
    assert not math.isnan(float(get_method("ties@rank2")(group(5))[0, 0]))
