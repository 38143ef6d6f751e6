"""Data-aware merging on real adapters: Gram matrices, their cache, RegMean, TIES' trim scope, the sweep's subsets."""

import shutil
from dataclasses import replace

import pytest
import torch
from conftest import query_db, tiny_config
from safetensors.torch import load_file, save_file

from merging.deltas import load_deltas
from merging.grams import GramStore, compute_grams, gram_path
from merging.merge import main as merge_main
from merging.merged_model import AdapterMerger, merge_deltas
from merging.methods import get_method
from merging.methods.knots_ties import knots_ties_model
from merging.methods.regmean import reduce_off_diagonal, regmean, singular_channels
from merging.methods.ties import ties, ties_model
from merging.sweep import MergeSweep, sweep_plan
from mlvision.backbone import BackboneConfig, Preprocess
from mlvision.data import split_tensors
from mlvision.errors import AdapterError, MergeConfigError
from mlvision.evaluation import FoldedBackbone
from mlvision.models import load_model
from mlvision.runs import resolve_stored_path
from mlvision.store import Store


@pytest.fixture(scope="module")
def adapter_folders(tiny_study):
    rows = query_db(tiny_study["db"], "SELECT task, path FROM models WHERE model_kind = 'adapter' ORDER BY task")
    return {task: resolve_stored_path(path) for task, path in rows}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLV_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def train_images(adapter, n=24):
    return split_tensors(adapter.task, "train", Preprocess.from_dict(adapter.meta["preprocess"]), n)[0]


# ----------------------------------------------------------------------------- RegMean by hand


def test_regmean_is_the_least_squares_merge_of_the_tasks_layer_outputs():
    """α = 1: ΔW* minimises Σ_i ||X_i (ΔW - ΔW_i)ᵀ||², the regression RegMean solves (checked with lstsq)."""
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    inputs = [torch.randn(30, 4, generator=g, dtype=torch.float64) * (i + 1) for i in range(3)]
    grams = [x.T @ x for x in inputs]
    merged = regmean(deltas, grams, alpha=1.0)
    stacked_x = torch.cat(inputs)
    stacked_y = torch.cat([x @ d.T for x, d in zip(inputs, deltas)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    assert torch.allclose(merged, expected, atol=1e-10)
    # α shrinks the off-diagonal only; α -> 0 is a per-input-channel weighted mean of the updates
    reduced = reduce_off_diagonal(grams[0], 0.25)
    assert torch.equal(torch.diagonal(reduced), torch.diagonal(grams[0]))
    assert torch.allclose(
        reduced - torch.diag_embed(torch.diagonal(reduced)),
        0.25 * (grams[0] - torch.diag_embed(torch.diagonal(grams[0]))),
    )
    weights = torch.stack([torch.diagonal(gr) for gr in grams])  # [k, in]
    channel_mean = sum(d * w for d, w in zip(deltas, weights)) / weights.sum(dim=0)
    assert torch.allclose(regmean(deltas, grams, alpha=0.0), channel_mean, atol=1e-12)


def test_regmean_gives_a_channel_no_task_uses_the_mean_update_and_counts_it():
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    inputs = [torch.randn(10, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    for x in inputs:
        x[:, 2] = 0  # input channel 2 is dead in every task: Σ G_i is singular
    grams = [x.T @ x for x in inputs]
    assert singular_channels(grams) == 1
    merged = get_method("regmean")(deltas, grams=grams, alpha=1.0)
    assert torch.isfinite(merged).all()
    assert torch.allclose(merged[:, 2], (deltas[0][:, 2] + deltas[1][:, 2]) / 2, atol=1e-12)
    # the other channels are still the regression on the live inputs
    live = [0, 1, 3]
    expected = regmean([d[:, live] for d in deltas], [gr[live][:, live] for gr in grams], alpha=1.0)
    assert torch.allclose(merged[:, live], expected, atol=1e-10)


def test_regmean_refuses_missing_or_misshapen_grams():
    x = [torch.randn(3, 4), torch.randn(3, 4)]
    with pytest.raises(MergeConfigError, match="needs the grams"):
        get_method("regmean")(x)
    with pytest.raises(MergeConfigError, match=r"grams 1 must be \[4, 4\]"):
        get_method("regmean")(x, grams=[torch.eye(4), torch.eye(3)])
    with pytest.raises(MergeConfigError, match="2 grams for 3 updates|3 updates"):
        get_method("regmean")([*x, x[0]], grams=[torch.eye(4), torch.eye(4)])


# ----------------------------------------------------------------------------- Gram matrices on real adapters


def test_grams_equal_the_inputs_of_the_peft_model_layers(adapter_folders):
    """The folded fast backbone's hooked inputs give the same Gram matrices as peft's own (unfolded) model."""
    folder = adapter_folders["uci_digits"]
    adapter = load_deltas(folder)
    images = train_images(adapter)
    grams = compute_grams(FoldedBackbone(BackboneConfig(**adapter.meta["backbone"])), adapter, images)
    reference_model = load_model(folder).model
    seen = {}

    def hook_for(layer):
        def hook(module, inputs):
            x = inputs[0].permute(0, 2, 3, 1).reshape(-1, inputs[0].shape[1]).double()
            seen[layer] = x.T @ x / x.shape[0]

        return hook

    handles = []
    for name, module in reference_model.named_modules():
        layer = name.split("base_model.model.", 1)[-1]
        if layer in adapter.deltas and hasattr(module, "lora_A"):
            handles.append(module.register_forward_pre_hook(hook_for(layer)))
    with torch.inference_mode():
        reference_model(images)
    for handle in handles:
        handle.remove()
    assert set(seen) == set(grams) == set(adapter.deltas)
    for layer, gram in grams.items():
        assert gram.shape == (adapter.deltas[layer].shape[1],) * 2
        assert torch.allclose(gram, seen[layer], rtol=1e-3, atol=1e-4 * float(seen[layer].abs().max())), layer


def test_gram_store_computes_once_caches_by_content_and_rebuilds_damage(adapter_folders, cache, tmp_path):
    adapter = load_deltas(adapter_folders["textures"])
    folded = FoldedBackbone(BackboneConfig(**adapter.meta["backbone"]))
    calls = []

    def images_for(task):
        calls.append(task)
        return train_images(adapter)

    store = GramStore(folded, images_for, n_images=24)
    first = store.get(adapter)
    path = gram_path(adapter, 24)
    assert path.is_file() and path.parent == cache / "grams" and calls == ["textures"]
    # a new store (a later run) reads the file instead of computing
    again = GramStore(folded, images_for, n_images=24).get(adapter)
    assert calls == ["textures"] and all(torch.equal(first[k], again[k]) for k in first)
    # a damaged file is rebuilt, never trusted
    path.write_bytes(b"not a safetensors file")
    rebuilt = GramStore(folded, images_for, n_images=24).get(adapter)
    assert calls == ["textures", "textures"] and all(torch.allclose(first[k], rebuilt[k]) for k in first)
    # a retrained adapter (other factors) gets other matrices, not the cached ones
    copy = tmp_path / "retrained"
    shutil.copytree(adapter.path, copy)
    factors = load_file(str(copy / "adapter_model.safetensors"))
    save_file({k: v * 2 for k, v in factors.items()}, str(copy / "adapter_model.safetensors"))
    assert gram_path(load_deltas(copy), 24) != path
    # without the task's images, one line names the adapter and the fix
    with pytest.raises(AdapterError, match="retrained.*has no Gram matrices.*task 'textures'"):
        GramStore(folded, None, n_images=24).get(load_deltas(copy))


def test_regmean_through_the_merger_and_the_cli(adapter_folders, cache, tmp_path, capsys):
    adapters = {task: load_deltas(folder) for task, folder in adapter_folders.items()}
    folded = FoldedBackbone(BackboneConfig(**adapters["uci_digits"].meta["backbone"]))
    grams = GramStore(folded, lambda task: train_images(adapters[task]), n_images=24)
    merger = AdapterMerger(adapters, BackboneConfig(**adapters["uci_digits"].meta["backbone"]), grams=grams)
    merged, params = merger.merge(list(adapters), "regmean", {"alpha": 0.4})
    assert params["alpha"] == 0.4 and set(merged) == set(adapters["uci_digits"].deltas)
    direct = merge_deltas(list(adapters.values()), "regmean", {"alpha": 0.4}, [grams.get(a) for a in adapters.values()])
    assert all(torch.equal(merged[k], direct[k]) for k in merged)
    # one adapter: RegMean returns it (its own Gram matrices, exact up to the solver)
    alone, _ = merger.merge(["textures"], "regmean")
    for layer, delta in adapters["textures"].deltas.items():
        assert torch.allclose(alone[layer], delta, atol=1e-5 * float(delta.abs().max()) + 1e-7), layer
    # without a GramStore the merger says what it needs
    with pytest.raises(MergeConfigError, match="Gram matrices"):
        AdapterMerger(adapters, BackboneConfig(**adapters["uci_digits"].meta["backbone"])).merge(
            list(adapters), "regmean"
        )
    # the CLI computes what is missing and exports the merge
    out = tmp_path / "merged"
    assert (
        merge_main([*map(str, adapter_folders.values()), "--method", "regmean", "--out", str(out), "--rank", "4"]) == 0
    )
    assert (out / "merge.json").is_file() and "regmean" in capsys.readouterr().out


# ----------------------------------------------------------------------------- TIES' trim scope


def test_whole_vector_trim_counts_the_density_over_every_layer():
    small = [torch.tensor([[1.0, -2.0], [3.0, 0.5]]), torch.tensor([[0.1, 0.2], [0.3, -0.4]])]
    large = [torch.tensor([[10.0, -20.0, 30.0, 40.0]]), torch.tensor([[5.0, 6.0, -7.0, 8.0]])]
    layers = {"small": small, "large": large}
    # whole vector, density 0.5: task 0 keeps its 4 largest of 8 entries (3, 10, 20, 30, 40 -> 40, 30, 20, 10),
    # all in "large"; task 1 keeps 8, 7, 6, 5, also all in "large"; "small" is trimmed to nothing
    whole = ties_model(layers, density=0.5, scaling=1.0, whole_vector_trim=1)
    assert torch.equal(whole["small"], torch.zeros(2, 2))
    # large: entries [10|5, -20|6, 30|-7, 40|8]: elected signs +, -(mass -14), +(23), +; disjoint means
    assert torch.allclose(whole["large"], torch.tensor([[7.5, -20.0, 30.0, 24.0]]))
    per_layer = ties_model(layers, density=0.5, scaling=1.0, whole_vector_trim=0)
    assert per_layer["small"].count_nonzero() > 0
    # the per-layer function is the one-layer model; whole vector and per layer agree there
    assert torch.equal(ties(small, density=0.5, whole_vector_trim=1), ties(small, density=0.5))
    assert torch.equal(per_layer["large"], ties(large, density=0.5))
    k_whole = knots_ties_model(layers, density=0.5, scaling=1.0, whole_vector_trim=1)
    assert torch.equal(k_whole["small"], torch.zeros(2, 2))


def test_the_trim_scope_option_keeps_stored_merge_ids_at_its_old_value(tiny_study):
    """knots_ties keeps the old per-layer trim, so its stored merges keep their ids; ties changed its default,
    so its id changes and the sweep recomputes it."""
    knots = get_method("knots_ties")
    assert knots.defaults["whole_vector_trim"] == 0 and "whole_vector_trim" not in knots.identity_defaults()
    assert get_method("ties").identity_defaults()["whole_vector_trim"] == 1
    adapters = [
        load_deltas(resolve_stored_path(p))
        for (p,) in query_db(tiny_study["db"], "SELECT path FROM models WHERE model_kind = 'adapter' ORDER BY task")
    ]
    whole = merge_deltas(adapters, "ties")
    per_layer = merge_deltas(adapters, "ties", {"whole_vector_trim": 0})
    assert set(whole) == set(per_layer) and any(not torch.equal(whole[k], per_layer[k]) for k in whole)
    # the whole-vector trim keeps density of ALL entries per task: count over the task's trimmed vector
    for k, adapter in enumerate(adapters):
        trimmed = ties_model({layer: [d] for layer, d in adapter.deltas.items()}, density=0.2, scaling=1.0)
        kept = sum(int(t.count_nonzero()) for t in trimmed.values())
        total = sum(d.numel() for d in adapter.deltas.values())
        assert abs(kept - round(0.2 * total)) <= 2, (k, kept, total)


# ----------------------------------------------------------------------------- the sweep


def test_the_sweep_selects_regmean_on_validation_and_runs_costly_methods_on_their_subset(tiny_study, cache):
    config = replace(tiny_config(tiny_study), merge_methods=("regmean",))
    sweep = MergeSweep(config, Store(tiny_study["db"]))
    group = ("lfw_faces", "textures", "uci_digits")
    sweep.prepare([(group, 0, "regmean")])  # computes the three adapters' Gram matrices once
    assert len(list((cache / "grams").glob("*.safetensors"))) == 3
    rows = sweep.compute(group, 0, "regmean")
    record = rows.merge["selection"]
    assert record["tuned"] and [p["alpha"] for p in record["grid"]] == [0.6, 0.4, 0.8, 0.9, 1.0]
    assert rows.merge["hyperparams"]["alpha"] == record["chosen"]["alpha"]
    assert len(rows.evaluations) == 3 and all(0 <= e["merged_accuracy"] <= 1 for e in rows.evaluations)
    # a method with a stated subset is planned only there
    subset = replace(get_method("ties"), name="costly", study_subset={"k": (3,), "seeds": (1,)})
    from merging import methods as registry

    registry.MERGE_METHODS["costly"] = subset
    try:
        plan = sweep_plan(replace(config, merge_methods=("ties", "costly"), seeds=(0, 1)))
    finally:
        del registry.MERGE_METHODS["costly"]
    costly = [(group, seed) for group, seed, method in plan if method == "costly"]
    assert costly and all(len(group) == 3 and seed == 1 for group, seed in costly)
    assert len([item for item in plan if item[2] == "ties"]) == (3 + 1) * 2
