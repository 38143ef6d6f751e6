"""Invariants of every per-layer merge method, parametrized over the registry.

A method is per-layer when it has a function of one layer's updates (`per_layer`: kind "data_free",
or "data_aware" with one Gram matrix per adapter); test-time and reference methods merge whole
models and are skipped. Each invariant names the methods it does not hold for, and why, and
asserts what those methods return instead:

- one adapter: the adapter itself at the hyperparameters in SINGLE. Not for iso_c and iso_cts,
  which flatten the spectrum (they return σ̄ U Vᵀ, so only an isotropic adapter comes back).
- k copies of one adapter: the adapter itself at the hyperparameters in COPIES. Not for iso_c
  (flattened spectrum, times k), iso_cts (flattened, and the copies' task-specific slots repeat one
  direction), ties / magnitude_prune at density < 1 (the trimmed adapter), DARE at p > 0 (random
  masks), tsv_m when the adapter's rank exceeds ⌊min(out, in)/k⌋ (its top ⌊min/k⌋ components).
- the order of the adapters: no effect, except for DARE with p > 0 (masks are drawn per position).
- adapters of different ranks and alphas (real peft LoRA files): exact ΔW, and merging them is
  merging their dense ΔW; peft's own references leave no stale "merged" adapter behind.
- float64 in: computed and returned in float64, close to the float32 result.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_merge_methods import assert_close, low_rank

from merging.deltas import load_deltas
from merging.methods import get_method, list_methods
from merging.methods._common import topk_mask
from merging.peft_reference import MERGED, PeftMerger
from mlvision.backbone import BackboneConfig, create_backbone, default_target_modules
from mlvision.models import make_head, save_model

PER_LAYER = [name for name in list_methods() if get_method(name).per_layer]
K = 3

# Hyperparameters at which merging ONE adapter returns it exactly (the rest at their defaults);
# regmean at any alpha: (ΔW G)(G)⁻¹ = ΔW. Scaling multiplies the result (test_merge_methods.py).
SINGLE = {
    "linear": {"scaling": 1.0},
    "task_arithmetic": {"scaling": 1.0},
    "ties": {"density": 1.0, "scaling": 1.0},
    "dare_linear": {"drop_rate": 0.0, "scaling": 1.0},
    "dare_ties": {"drop_rate": 0.0, "scaling": 1.0},
    "magnitude_prune": {"density": 1.0, "scaling": 1.0},
    "knots_ties": {"density": 1.0, "scaling": 1.0},
    "knots_ta": {"scaling": 1.0},
    "tsv_m": {"scaling": 1.0},  # k = 1 keeps min(out, in) >= rank components: all of them
    "regmean": {},
    "wudi": {"scaling": 1.0},  # at any ρ: (ΔW G + μ ΔW)(G + μI)⁻¹ = ΔW, its rows in G's range
    "ties_core": {"density": 1.0, "scaling": 1.0},  # TIES on the one core matrix returns it; exact back-projection
}
SPECTRUM_FLATTENING = {"iso_c", "iso_cts"}  # one adapter comes back only if it is isotropic, at α = 1

# Hyperparameters at which merging K copies of one adapter returns it exactly.
COPIES = {
    "linear": {},
    "task_arithmetic": {"scaling": 1 / K},
    "ties": {"density": 1.0, "scaling": 1.0},
    "dare_linear": {"drop_rate": 0.0, "scaling": 1.0},
    "dare_ties": {"drop_rate": 0.0, "scaling": 1.0},
    "magnitude_prune": {"density": 1.0, "scaling": 1.0},
    "knots_ties": {"density": 1.0, "scaling": 1.0},
    "knots_ta": {"scaling": 1 / K},
    # K copies of U give U_cat = U [I .. I], whose polar factor on its range is U [I .. I]/√K (same
    # for V): (1/K)·K·U Σ Vᵀ, when the adapter's rank fits in the ⌊min(out, in)/K⌋ kept components.
    "tsv_m": {"scaling": 1.0},
    # with ANY Gram matrices: (Σ ΔW G_i)(Σ G_i)⁻¹ = ΔW
    "regmean": {},
    # ρ = 0, the exact minimiser: (ΔW G)(G)⁺ = ΔW; at ρ > 0 the ridge pulls towards the sum K·ΔW
    "wudi": {"regularization": 0.0, "scaling": 1.0},
    "ties_core": {"density": 1.0, "scaling": 1.0},
}
ORDER_DEPENDENT = {"dare_linear", "dare_ties"}  # with p > 0: the i-th adapter gets the i-th mask


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """conftest.py asks torch for 2 threads; on 2 cores shared with other work, each small SVD or
    eigh then waits for the busy core (0.4-0.6 s instead of 2-4 ms per 256 x 64 merge). One thread
    here; the previous setting is restored for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spd(n: int, seed: int) -> torch.Tensor:
    """A random symmetric positive definite Gram matrix, as X_iᵀ X_i of a task's layer inputs.

    Symmetrised explicitly: a blocked a @ aᵀ is symmetric only up to rounding, and RegMean's solve
    assumes exact symmetry (an asymmetry of 1e-7 moves its float64 result by ~1e-7)."""
    a = torch.randn(n, 2 * n, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
    g = a @ a.T / (2 * n)
    return (g + g.T) / 2 + 0.1 * torch.eye(n, dtype=torch.float64)


def merge(name: str, deltas: list[torch.Tensor], grams: list[torch.Tensor] | None = None, **params) -> torch.Tensor:
    """Merge with `name`; a data-aware method gets `grams` (seeded random ones, one per adapter, if None)."""
    method = get_method(name)
    assert set(method.statistics) <= {"grams"}, (
        f"{name} takes {method.statistics}: teach merge() in tests/test_method_invariants.py to make them"
    )
    if method.statistics:
        if grams is None:
            grams = [spd(deltas[0].shape[1], i) for i in range(len(deltas))]
        params["grams"] = [g.to(deltas[0].dtype) for g in grams]
    return method(deltas, **params)


def isotropic(out_f: int, in_f: int, rank: int, sigma: float, seed: int) -> torch.Tensor:
    """sigma · Q_out Q_inᵀ with orthonormal Q's: every non-zero singular value equals sigma."""
    g = torch.Generator().manual_seed(seed)
    q_out = torch.linalg.qr(torch.randn(out_f, rank, generator=g, dtype=torch.float64))[0]
    q_in = torch.linalg.qr(torch.randn(in_f, rank, generator=g, dtype=torch.float64))[0]
    return sigma * q_out @ q_in.T


def flattened(x: torch.Tensor, rank: int) -> torch.Tensor:
    """x with its top `rank` singular values replaced by their mean (what Iso-C does to a sum)."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (s[:rank].mean() * u[:, :rank] @ vh[:rank]).to(x.dtype)


def test_every_per_layer_method_states_its_invariants():
    """A new method must say what merging one adapter and k copies of one adapter give."""
    tables = "in SINGLE and COPIES (or SPECTRUM_FLATTENING) of tests/test_method_invariants.py"
    assert PER_LAYER and set(PER_LAYER) == set(SINGLE) | SPECTRUM_FLATTENING, (
        f"state what merging one adapter gives {tables}: {sorted(set(PER_LAYER) ^ (set(SINGLE) | SPECTRUM_FLATTENING))}"
    )
    assert set(PER_LAYER) == set(COPIES) | SPECTRUM_FLATTENING, (
        f"state what merging k copies of one adapter gives {tables}: "
        f"{sorted(set(PER_LAYER) ^ (set(COPIES) | SPECTRUM_FLATTENING))}"
    )
    assert all(get_method(n).fn is None for n in list_methods() if n not in PER_LAYER)


# ----------------------------------------------------------------------------- one adapter


@pytest.mark.parametrize("name", PER_LAYER)
def test_merging_one_adapter_returns_it(name):
    x = low_rank(10, 9, 3, 42)
    if name in SPECTRUM_FLATTENING:
        # σ̄ U Vᵀ over x's 3 non-zero singular values (Iso-CTS: common + task part = all of x's components)
        out = merge(name, [x], scaling=1.0)
        assert_close(out, flattened(x, 3))
        assert not torch.allclose(out, x, atol=1e-3)
        iso = isotropic(10, 9, 3, 2.0, 0)
        torch.testing.assert_close(merge(name, [iso], scaling=1.0), iso)
    else:
        assert_close(merge(name, [x], **SINGLE[name]), x)


def test_what_one_adapter_gives_below_density_one_or_above_drop_rate_zero():
    x = low_rank(10, 9, 3, 42)
    trimmed = x * topk_mask(x[None], 0.2)[0]  # a single task's elected sign is its own: trimming only
    assert_close(merge("ties", [x], density=0.2, scaling=1.0), trimmed)
    assert_close(merge("magnitude_prune", [x], density=0.2, scaling=1.0), trimmed)
    # DARE on one adapter: the disjoint mean of one value is the value, so dare_ties = dare_linear
    # (= mask · x / (1 - p): test_merge_methods.py::test_dare_drops_and_rescales_survivors_exactly)
    dared = merge("dare_linear", [x], drop_rate=0.5, seed=3, scaling=1.0)
    assert_close(merge("dare_ties", [x], drop_rate=0.5, seed=3, scaling=1.0), dared)
    assert not torch.allclose(dared, x)


# ----------------------------------------------------------------------------- k copies of one adapter


@pytest.mark.parametrize("name", sorted(COPIES))
def test_merging_identical_adapters_returns_the_adapter(name):
    x = low_rank(10, 9, 2, 42)
    grams = [spd(9, i) for i in range(K)]  # different per copy: RegMean still returns x
    assert_close(merge(name, [x.clone() for _ in range(K)], grams, **COPIES[name]), x)


def test_methods_that_do_not_return_identical_adapters():
    x = low_rank(10, 9, 2, 42)
    xs = [x.clone() for _ in range(K)]
    # trimming with density < 1 keeps only the top entries of the (identical) adapter
    keep = x.abs() >= x.abs().flatten().topk(round(0.2 * 90)).values[-1]
    assert_close(merge("ties", xs, density=0.2), x * keep)
    assert_close(merge("magnitude_prune", xs, density=0.2, scaling=1.0), x * keep)
    # Iso-C flattens the spectrum: K·x has σ = K·(σ1, σ2) -> both become K·(σ1+σ2)/2
    assert_close(merge("iso_c", xs, scaling=1.0), K * flattened(x, 2))
    # ... and is the identity only for an isotropic adapter with α = 1/K
    iso = isotropic(10, 9, 2, 2.0, 1)
    torch.testing.assert_close(merge("iso_c", [iso] * K, scaling=1 / K), iso)
    # TSV-M keeps ⌊9/K⌋ = 3 components per copy: a rank-5 adapter comes back truncated to its top 3
    x5 = low_rank(10, 9, 5, 7)
    u, s, vh = torch.linalg.svd(x5.double(), full_matrices=False)
    assert_close(merge("tsv_m", [x5] * K, scaling=1.0), (u[:, :3] * s[:3] @ vh[:3]).float())


def test_iso_cts_of_identical_adapters():
    # A rank-8 adapter, K = 3, f = 0.8: R = 8, c = 5 common + 1 per task (c0 = 6, round(2/3) = 1).
    # The common part is x's top 5 components (of K·x: σ·K); each copy's residual is x's components
    # 6-8, of which it adds its top one, the 6th: the same direction K times, counted once by the
    # polar factor on the range. Result: σ̄ · U_6 V_6ᵀ with σ̄ = (K·Σ_{j<5} σ_j + K·σ_5) / (5 + K·1)
    # = K·Σ_{j<6} σ_j / 8: the 7th and 8th components are lost, the rest flattened (times K).
    x = low_rank(12, 10, 8, 5).double()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    expected = K * s[:6].sum() / 8 * u[:, :6] @ vh[:6]
    torch.testing.assert_close(merge("iso_cts", [x] * K, scaling=1.0), expected)


def test_dare_with_drop_rate_above_zero_does_not_return_identical_adapters():
    # Each copy gets its own mask: dare_linear gives x · (mean of the K masks) / (1 - p); dare_ties
    # (all copies share x's sign) the disjoint mean x / (1 - p) wherever some copy survives, else 0.
    x = low_rank(10, 9, 2, 42)
    masks = torch.stack([position_mask(i, 0.5, 9) for i in range(K)])
    assert_close(merge("dare_linear", [x] * K, drop_rate=0.5, seed=9, scaling=1.0), x * masks.float().mean(dim=0) / 0.5)
    assert_close(merge("dare_ties", [x] * K, drop_rate=0.5, seed=9, scaling=1.0), x * masks.any(dim=0) / 0.5)
    assert 0 < masks.any(dim=0).float().mean() < 1  # 1 - 0.5³ = 87.5 % of the entries survive somewhere


# ----------------------------------------------------------------------------- order of the adapters

PERMUTATION = [2, 0, 1]


def three_adapters() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [low_rank(12, 9, 2 + i, i) for i in range(K)], [spd(9, i) for i in range(K)]


@pytest.mark.parametrize("name", PER_LAYER)
def test_the_order_of_the_adapters_does_not_matter(name):
    """Default hyperparameters; DARE at drop_rate 0 (with p > 0 see the next tests)."""
    xs, grams = three_adapters()
    params = {"drop_rate": 0.0} if name in ORDER_DEPENDENT else {}
    out = merge(name, xs, grams, **params)
    permuted = merge(name, [xs[i] for i in PERMUTATION], [grams[i] for i in PERMUTATION], **params)
    assert out.abs().max() > 0
    assert_close(permuted, out, atol=1e-5)


def position_mask(position: int, drop_rate: float, seed: int, shape=(10, 9), k: int = K) -> torch.Tensor:
    """DARE's keep-mask for the update at `position` among k, read back through dare_linear itself."""
    probe = [torch.ones(shape) if i == position else torch.zeros(shape) for i in range(k)]
    return merge("dare_linear", probe, drop_rate=drop_rate, seed=seed, scaling=1.0) != 0


def test_dare_masks_belong_to_positions_not_to_adapters():
    # With a fixed seed and p > 0 the masks are drawn per position: permuting the adapters gives the
    # merge of the permuted adapters under the SAME masks (position i keeps mask i), which differs.
    xs = [low_rank(10, 9, 2, i) for i in range(K)]
    perm = [xs[i] for i in PERMUTATION]
    masks = [position_mask(i, 0.5, 4) for i in range(K)]
    dared = [x * m / 0.5 for x, m in zip(perm, masks)]
    assert_close(merge("dare_linear", perm, drop_rate=0.5, seed=4, scaling=1.0), merge("linear", dared))
    assert_close(merge("dare_ties", perm, drop_rate=0.5, seed=4, scaling=1.0), merge("ties", dared, density=1.0))
    for name in ORDER_DEPENDENT:
        assert not torch.allclose(merge(name, perm, drop_rate=0.5, seed=4), merge(name, xs, drop_rate=0.5, seed=4))


# ----------------------------------------------------------------------------- real peft adapters

BACKBONE = BackboneConfig("test_efficientnet", weights="random", image_size=32)
TARGETS = default_target_modules(BACKBONE.name)  # the 1x1 convs conv_pw, conv_pwl, conv_head
# Different r and lora_alpha; a rank and alpha pattern (one key a dotted path); rsLoRA (alpha / √r).
LORA_CONFIGS = {
    "patterned": LoraConfig(
        r=2,
        lora_alpha=6,
        target_modules=TARGETS,
        rank_pattern={"conv_head": 5},
        alpha_pattern={"conv_head": 3, "blocks.3.0.conv_pw": 11},
    ),
    "rslora": LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS, use_rslora=True),
}


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory) -> dict:
    """{name: (folder, load_deltas(folder).deltas, {layer: peft's own get_delta_weight, 2-D})}.

    Real adapter folders as training writes them (peft's save_pretrained, head, task.json)."""
    root = tmp_path_factory.mktemp("peft_adapters")
    adapters = {}
    for i, (name, config) in enumerate(LORA_CONFIGS.items()):
        model = get_peft_model(create_backbone(BACKBONE), config)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:  # B starts at zero: give both factors random values
                    param.copy_(torch.randn(param.shape, generator=g) * 0.3)
        meta = {
            "model_kind": "adapter",
            "task": name,
            "label_names": ["a", "b"],
            "backbone": BACKBONE.to_dict(),
            "preprocess": {"image_size": BACKBONE.image_size},
        }
        save_model(root / name, meta, make_head(model.base_model.model.num_features, 2), model)
        reference = {
            layer: module.get_delta_weight("default").detach().flatten(1)
            for layer, module in model.base_model.model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A
        }
        adapters[name] = (root / name, load_deltas(root / name).deltas, reference)
    return adapters


def test_adapters_of_different_ranks_and_alphas_load_as_peft_computes_them(peft_adapters):
    for _, deltas, reference in peft_adapters.values():
        assert deltas.keys() == reference.keys() and len(deltas) == 7
        for layer, delta in deltas.items():
            assert_close(delta, reference[layer], atol=1e-6)
    patterned, rslora = peft_adapters["patterned"][1], peft_adapters["rslora"][1]
    assert torch.linalg.matrix_rank(patterned["conv_head"]) == 5  # rank_pattern
    assert torch.linalg.matrix_rank(patterned["blocks.1.0.conv_pwl"]) == 2
    assert torch.linalg.matrix_rank(rslora["conv_head"]) == 3


@pytest.mark.parametrize("name", PER_LAYER)
def test_merging_adapters_of_different_ranks_is_merging_their_dense_updates(peft_adapters, name):
    # The two ΔW agree to float32 rounding (above); the SVD methods' choice of directions can
    # magnify that to ~1e-5 (Iso-CTS on these layers: 1.3e-5), hence a tolerance of 1e-4 on values ~0.5.
    loaded = [deltas for _, deltas, _ in peft_adapters.values()]
    dense = [reference for _, _, reference in peft_adapters.values()]
    for layer in ("conv_head", "blocks.3.0.conv_pw"):  # the patterned layers: ranks 5 and 3, 2 and 3
        grams = [spd(loaded[0][layer].shape[1], i) for i in range(2)]
        out = merge(name, [d[layer] for d in loaded], grams)
        assert out.abs().max() > 0.1
        assert_close(out, merge(name, [d[layer] for d in dense], grams), atol=1e-4)


def test_a_failed_peft_merge_leaves_no_stale_merged_adapter(peft_adapters, monkeypatch):
    folders = {name: str(folder) for name, (folder, _, _) in peft_adapters.items()}
    merger = PeftMerger(BACKBONE, folders)
    both = list(folders)
    references = [reference for _, _, reference in peft_adapters.values()]
    expected = {layer: (references[0][layer] + references[1][layer]) / 2 for layer in references[0]}

    def check(merged):  # peft_cat with weights 1/k is exactly the mean of the ΔW
        assert merged.keys() == expected.keys()
        for layer, delta in merged.items():
            assert_close(delta, expected[layer], atol=1e-5)

    lora_layer = type(merger.model.base_model.model.conv_head)
    original, calls = lora_layer.get_delta_weight, []

    def fail_once(self, adapter):
        calls.append(adapter)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return original(self, adapter)

    monkeypatch.setattr(lora_layer, "get_delta_weight", fail_once)
    with pytest.raises(RuntimeError, match="injected failure"):
        merger.merge("peft_cat", [both[0]])  # fails while reading the merged adapter back
    assert MERGED not in merger.model.peft_config
    assert not any(MERGED in getattr(m, "lora_A", {}) for m in merger.model.modules())
    check(merger.merge("peft_cat", both))  # not the stale merge of the first adapter alone
    # a "merged" adapter left by anything else is replaced, not reused
    merger.model.add_weighted_adapter([merger.names[both[0]]], [1.0], MERGED, combination_type="cat")
    check(merger.merge("peft_cat", both))
    assert MERGED not in merger.model.peft_config


# ----------------------------------------------------------------------------- float64


@pytest.mark.parametrize("name", PER_LAYER)
def test_float64_is_computed_and_returned_in_float64(name):
    # A rank-3 adapter made in float64 (float32 cannot hold it: its entries differ from their float32
    # rounding by up to ~1e-7) comes back to float64 precision from a merge that returns it (SINGLE;
    # an isotropic one for Iso-C/CTS). A float32 computation would be ~1e-7 off.
    if name in SPECTRUM_FLATTENING:
        x, params = isotropic(10, 9, 3, 1.3, 2), {"scaling": 1.0}
    else:
        g = torch.Generator().manual_seed(42)
        x = torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 9, generator=g, dtype=torch.float64)
        params = SINGLE[name]
    assert (x - x.float().double()).abs().max() > 1e-8
    out = merge(name, [x], **params)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x, atol=1e-12, rtol=1e-10)
    # three adapters at the defaults: float64 in, float64 out, close to the float32 merge of the same values
    xs = [low_rank(12, 9, 2 + i, i) for i in range(K)]
    out64 = merge(name, [x.double() for x in xs])
    assert out64.dtype == torch.float64
    assert_close(out64.float(), merge(name, xs), atol=1e-5)
