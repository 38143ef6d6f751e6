"""The merge engine on real adapters: exact ΔW, folding, export, the sweep's stored figures, bad input."""

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import TINY_METHODS, TINY_TASKS, query_db, run_all, tiny_config
from peft import PeftModel

from merging.deltas import load_deltas
from merging.export import export_own_lora
from merging.merge import main as merge_main
from merging.merged_model import build_merged_model, merge_deltas
from merging.methods import get_method, list_methods
from merging.methods._base import GRID_SIZE
from merging.peft_reference import PeftMerger
from merging.sweep import MergeSweep, sample_groups, superseded_merges, sweep_plan
from mlvision.backbone import BackboneConfig, create_backbone
from mlvision.config import PROFILES
from mlvision.errors import AdapterError, MergeConfigError, MLVisionError, UnknownNameError
from mlvision.evaluation import FoldedBackbone, task_accuracies, task_correct
from mlvision.models import load_model, save_model
from mlvision.runs import resolve_stored_path
from mlvision.store import Store, pack_correct, unpack_correct
from training.trainers import train_adapter


@pytest.fixture(scope="module")
def adapter_folders(tiny_study):
    rows = query_db(tiny_study["db"], "SELECT task, path FROM models WHERE model_kind = 'adapter' ORDER BY task")
    return {task: resolve_stored_path(path) for task, path in rows}


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(4, 3, 32, 32)


def test_folded_delta_equals_the_peft_model(adapter_folders, images):
    """ΔW read from the files and folded into the weights gives the same logits as peft's own model."""
    for task, folder in adapter_folders.items():
        adapter = load_deltas(folder)
        assert all(d.ndim == 2 for d in adapter.deltas.values()) and "conv_head" in adapter.deltas
        reference = load_model(folder).model
        folded = FoldedBackbone(BackboneConfig(**adapter.meta["backbone"])).model(adapter.deltas, {task: adapter.head})
        with torch.inference_mode():
            assert torch.allclose(folded(images)[task], reference(images)[task], atol=1e-4)


def test_merged_model_answers_every_task_in_one_pass(adapter_folders, images):
    adapters = [load_deltas(f) for f in adapter_folders.values()]
    model = build_merged_model(adapters, "ties", {"density": 0.5})
    with torch.inference_mode():
        outputs = model(images)
    assert set(outputs) == set(TINY_TASKS)
    assert all(outputs[a.task].shape == (4, a.head.out_features) for a in adapters)


def test_peft_cat_reference_equals_the_linear_mean(adapter_folders):
    adapters = [load_deltas(f) for f in adapter_folders.values()]
    merger = PeftMerger(BackboneConfig(**adapters[0].meta["backbone"]), {a.task: str(a.path) for a in adapters})
    peft_delta = merger.merge("peft_cat", [a.task for a in adapters])
    ours = merge_deltas(adapters, "linear")
    assert peft_delta.keys() == ours.keys()
    for layer in ours:
        assert torch.allclose(peft_delta[layer], ours[layer], atol=1e-6)


def test_export_as_lora_loads_in_peft_and_reports_its_error(adapter_folders, images, tmp_path):
    adapters = [load_deltas(f) for f in adapter_folders.values()]
    merged = merge_deltas(adapters, "linear")
    full_rank = sum(a.meta["training"]["rank"] for a in adapters)  # a sum of k rank-r updates has rank <= k*r
    error = export_own_lora(merged, adapters, full_rank, tmp_path / "full", {"method": "linear"})[0]
    assert error < 1e-4
    low_error = export_own_lora(merged, adapters, 1, tmp_path / "low", {"method": "linear"})[0]
    assert low_error > 0.05
    assert json.loads((tmp_path / "low" / "merge.json").read_text())["relative_error"] == pytest.approx(low_error)
    config = BackboneConfig(**adapters[0].meta["backbone"])
    peft_model = PeftModel.from_pretrained(create_backbone(config), str(tmp_path / "full")).eval()
    folded = FoldedBackbone(config).fold(merged)
    with torch.inference_mode():
        assert torch.allclose(peft_model(images), folded(images), atol=1e-4)
    assert (tmp_path / "full" / "heads" / "textures" / "head.safetensors").exists()


def test_adapters_of_different_ranks_merge_in_delta_space(adapter_folders, tmp_path):
    rank4 = load_deltas(adapter_folders["textures"])
    meta = dict(json.loads((adapter_folders["lfw_faces"] / "task.json").read_text()))
    backbone = create_backbone(BackboneConfig(**meta["backbone"]))
    peft_model, head, _ = train_adapter(
        backbone,
        torch.randn(8, 3, 32, 32),
        torch.tensor([0, 1] * 4),
        2,
        rank=2,
        alpha=4,
        target_modules=meta["training"]["target_modules"],
        steps=2,
        batch_size=4,
        lr=1e-2,
        head_lr=1e-2,
        seed=0,
    )
    save_model(tmp_path / "rank2", {**meta, "training": {**meta["training"], "rank": 2}}, head, peft_model)
    rank2 = load_deltas(tmp_path / "rank2")
    merged = merge_deltas([rank4, rank2], "linear")
    layer = "conv_head"
    assert torch.allclose(merged[layer], (rank4.deltas[layer] + rank2.deltas[layer]) / 2)
    assert torch.linalg.matrix_rank(rank2.deltas[layer]) <= 2


def test_sweep_stores_every_merge_with_its_baselines(tiny_study):
    rows = query_db(
        tiny_study["db"],
        "SELECT method, k, tasks, task, merged_accuracy, single_accuracy, head_accuracy, "
        "normalized_accuracy, normalized_gain, n, hyperparams FROM merge_results",
    )
    assert len(rows) == (3 * 2 + 1 * 3) * len(TINY_METHODS)  # 3 pairs and 1 triple of 3 tasks, k answers each
    assert {r[0] for r in rows} == set(TINY_METHODS) and {r[1] for r in rows} == {2, 3}
    for method, k, tasks, task, merged, single, head, normalized, gain, n, hyper in rows:
        assert task in tasks.split(",") and len(tasks.split(",")) == k and n > 0
        assert normalized == pytest.approx(merged / single)
        if single != head:
            assert gain == pytest.approx((merged - head) / (single - head))
        json.loads(hyper)
    # linear at its default point (the plain mean) and peft_cat compute the same ΔW, so they score the
    # same on the same validation images
    same = query_db(
        tiny_study["db"],
        "SELECT a.selection, b.selection FROM merges a JOIN merges b ON a.tasks = b.tasks "
        "WHERE a.method = 'linear' AND b.method = 'peft_cat'",
    )
    assert len(same) == 4
    for linear, cat in same:
        linear, cat = json.loads(linear), json.loads(cat)
        assert linear["grid"][0] == {"scaling": 1.0}
        assert abs(linear["validation_accuracy"][0] - cat["validation_accuracy"][0]) < 1e-9


SELECTION_KEYS = {
    "tuned",
    "grid",
    "validation_accuracy",
    "chosen",
    "chosen_validation_accuracy",
    "validation_n_per_task",
}


def test_merges_made_under_other_settings_are_found_said_and_forgotten_with_their_evaluations(
    tiny_study, tmp_path, capsys
):
    """A changed grid (here: another validation size, also part of a merge's id) makes every stored merge of the
    study's tasks and seeds superseded, planned or not: run_all says so and keeps them, --forget-superseded deletes
    them, their evaluations and their methods' planner checks in one go, and nothing else; under the settings that
    made them none is superseded."""
    from study.run_all import announce_superseded

    db = tmp_path / "results.duckdb"
    shutil.copy(tiny_study["db"], db)
    config = replace(tiny_config(tiny_study), db=db)
    store = Store(db)
    assert superseded_merges(config, store) == {}
    models_before = query_db(db, "SELECT count(*) FROM task_results")
    stored = dict(query_db(db, "SELECT merge_id, method FROM merges"))
    changed = replace(config, merge_select=config.merge_select + 8)
    assert superseded_merges(changed, store) == stored and len(stored) == 4 * len(TINY_METHODS)
    # a group the study no longer plans (k = 3 beyond --max-k 2) is still judged by the current settings
    assert superseded_merges(replace(changed, max_k=2), store) == stored
    assert superseded_merges(replace(config, max_k=2), store) == {}  # not planned, but made by today's rules
    announce_superseded(changed, store, forget=False)
    said = capsys.readouterr().out
    assert f"{len(stored)} stored merges" in said and "--forget-superseded" in said
    assert len(query_db(db, "SELECT merge_id FROM merges")) == len(stored)  # said, not deleted
    announce_superseded(changed, store, forget=True)
    assert f"forgot {len(stored)} merges" in capsys.readouterr().out
    assert (
        query_db(db, "SELECT count(*) FROM merges") == query_db(db, "SELECT count(*) FROM merge_evaluations") == [(0,)]
    )
    assert query_db(db, "SELECT count(*) FROM task_results") == models_before
    assert superseded_merges(changed, store) == {}


def test_every_merge_is_selected_on_validation_and_stores_the_record(tiny_study):
    rows = query_db(tiny_study["db"], "SELECT method, k, hyperparams, selection FROM merges")
    assert len(rows) == 4 * len(TINY_METHODS)
    for method, k, hyper, selection in rows:
        hyper, selection = json.loads(hyper), json.loads(selection)
        assert set(selection) == SELECTION_KEYS
        m = get_method(method)
        assert selection["tuned"] == m.tuned == (method != "peft_cat")
        assert selection["grid"] == (m.grid_points(k) if m.tuned else [{}])  # a grid falling with k, at k
        assert len(selection["grid"]) == (GRID_SIZE if m.tuned else 1) == len(selection["validation_accuracy"])
        assert selection["validation_n_per_task"] == 16  # --merge-select
        scores = selection["validation_accuracy"]
        best = scores.index(max(scores))  # the first of the best: ties go to the earlier point (default first)
        assert selection["chosen"] == selection["grid"][best]
        assert selection["chosen_validation_accuracy"] == max(scores)
        assert all(hyper[key] == value for key, value in selection["chosen"].items())  # full chosen hyperparameters
        if m.per_layer:  # every hyperparameter, and beside them only what the method records
            assert set(m.inputs(hyper)) == set(m.defaults) and set(hyper) - set(m.defaults) <= set(m.recorded_outputs)


def test_stored_correct_arrays_unpack_to_the_stored_accuracies(tiny_study):
    rows = query_db(
        tiny_study["db"],
        "SELECT merged_accuracy, single_accuracy, head_accuracy, n, merged_correct, single_correct, head_correct "
        "FROM merge_results",
    )
    assert len(rows) == (3 * 2 + 3) * len(TINY_METHODS)
    for row in rows:
        accuracies, n, packed = row[:3], row[3], row[4:]
        assert 0 < n <= 48  # --merge-eval (a task's test split may hold fewer)
        for accuracy, hexes in zip(accuracies, packed):
            assert len(hexes) == 2 * math.ceil(n / 8)  # one bit per image
            correct = unpack_correct(hexes, n)
            assert correct.shape == (n,) and correct.dtype == bool
            assert correct.mean() == pytest.approx(accuracy, abs=1e-6)
    # the baselines are one array per (task, seed): the same in every merge holding the task
    per_task = query_db(
        tiny_study["db"],
        "SELECT task, count(DISTINCT single_correct), count(DISTINCT head_correct) FROM merge_results GROUP BY task",
    )
    assert len(per_task) == 3 and all(singles == heads == 1 for _, singles, heads in per_task)


def test_adapter_update_norms_are_stored_once_per_adapter(tiny_study, adapter_folders):
    rows = query_db(
        tiny_study["db"], "SELECT model_id, task, seed, update_norm, layers FROM adapter_updates ORDER BY task"
    )
    ids = dict(query_db(tiny_study["db"], "SELECT task, model_id FROM models WHERE model_kind = 'adapter'"))
    assert [r[1] for r in rows] == sorted(TINY_TASKS) and all(r[2] == 0 for r in rows)
    for model_id, task, _, norm, layers in rows:
        deltas = load_deltas(adapter_folders[task]).deltas
        assert model_id == ids[task] and layers == len(deltas) > 0
        assert norm == pytest.approx(math.sqrt(sum(float(d.double().pow(2).sum()) for d in deltas.values())), rel=1e-9)


def test_a_recomputed_merge_equals_the_stored_one_and_its_chosen_point_merged_directly(tiny_study):
    """compute() is deterministic, and the scaling shortcut (merge once, multiply) gives the very ΔW of a
    direct merge at the chosen point: same per-image outcomes on the test images."""
    sweep = MergeSweep(tiny_config(tiny_study), Store(tiny_study["db"]))
    sweep.load_inputs({0})
    group = ("lfw_faces", "textures", "uci_digits")
    for method in ("task_arithmetic", "ties"):
        rows = sweep.compute(group, 0, method)
        stored = query_db(
            tiny_study["db"],
            "SELECT task, merged_accuracy, merged_correct FROM merge_evaluations WHERE merge_id = ? ORDER BY task",
            [rows.merge["merge_id"]],
        )
        assert [
            (e["task"], e["merged_accuracy"], e["merged_correct"])
            for e in sorted(rows.evaluations, key=lambda e: e["task"])
        ] == stored
        ((selection,),) = query_db(
            tiny_study["db"], "SELECT selection FROM merges WHERE merge_id = ?", [rows.merge["merge_id"]]
        )
        assert rows.merge["selection"]["validation_accuracy"] == json.loads(selection)["validation_accuracy"]
        adapters = [sweep.adapters[(task, 0)] for task in group]
        direct = merge_deltas(adapters, method, rows.merge["hyperparams"])
        model = sweep.folded.model(direct, {a.task: a.head for a in adapters})
        test = {task: sweep.eval_tensors(task) for task in group}
        correct = task_correct(model, test)
        assert {e["task"]: e["merged_correct"] for e in rows.evaluations} == {
            task: pack_correct(c) for task, c in correct.items()
        }
        assert task_accuracies(model, test) == {e["task"]: e["merged_accuracy"] for e in rows.evaluations}


def test_merge_id_covers_the_grid_and_the_validation_size(tiny_study):
    config = tiny_config(tiny_study)
    store = Store(tiny_study["db"])
    group = ("lfw_faces", "textures")
    one = MergeSweep(config, store).merge_id(group, 0, "ties")
    assert MergeSweep(config, store).merge_id(group, 0, "ties") == one
    assert MergeSweep(replace(config, merge_select=17), store).merge_id(group, 0, "ties") != one
    assert MergeSweep(config, store).merge_id(group, 0, "task_arithmetic") != one


SIX = ("mnist", "uci_digits", "fashion_mnist", "animals", "lfw_faces", "textures")


def on_subset_and_full(config) -> tuple[set[str], list[str]]:
    """The config's methods swept on the subset (their own, AdaMerging's, or named in `subset_methods`) and the rest."""
    on_subset = {m for m in config.merge_methods if get_method(m).study_subset or m in config.subset_methods}
    return on_subset, [m for m in config.merge_methods if m not in on_subset]


def test_the_plan_merges_every_seed_at_every_k_by_default_and_honours_an_int():
    config = replace(PROFILES["default"], tasks=SIX).with_methods(tuple(list_methods()))
    assert config.merge_all_seeds_up_to_k is None and config.max_groups_per_k is None
    assert config.merge_methods == tuple(list_methods())  # every registered method
    plan = sweep_plan(config)
    on_subset, full = on_subset_and_full(config)
    assert on_subset == {"adamerging", *config.subset_methods} and len(full) == 5
    # 57 groups x 3 seeds x 7 methods, plus each subset method on every group at k = 2 and 6 with seed 0
    assert len(plan) == (15 + 20 + 15 + 6 + 1) * 3 * len(full) + (15 + 1) * len(on_subset)
    for method in on_subset:
        items = [(group, seed) for group, seed, m in plan if m == method]
        assert {len(group) for group, _ in items} == {2, 6} and {seed for _, seed in items} == {0}
    for k in range(2, 7):
        assert {seed for group, seed, _ in plan if len(group) == k} == {0, 1, 2}
    capped = sweep_plan(replace(config, merge_all_seeds_up_to_k=2))
    assert {seed for group, seed, _ in capped if len(group) == 2} == {0, 1, 2}
    assert {seed for group, seed, _ in capped if len(group) > 2} == {0}
    assert len(capped) == (15 * 3 + 20 + 15 + 6 + 1) * len(full) + (15 + 1) * len(on_subset)


def test_max_groups_per_k_samples_a_fixed_reproducible_set_of_groups():
    tasks = tuple(f"task{i}" for i in range(8))
    config = replace(PROFILES["default"], tasks=tasks, max_k=8, max_groups_per_k=5).with_methods(tuple(list_methods()))
    plan = sweep_plan(config)
    groups = {}
    for group, seed, method in plan:
        groups.setdefault(len(group), set()).add(group)
    assert len(groups[2]) == math.comb(8, 2)  # pairs: always all
    assert all(len(groups[k]) == 5 for k in range(3, 8)) and len(groups[8]) == 1  # one group of 8 exists
    # the same groups for every seed and method
    for group, seed, method in plan:
        assert group in groups[len(group)]
    on_subset, full = on_subset_and_full(config)
    ada = [item for item in plan if item[2] == "adamerging"]  # k in {2, 6}, seed 0: 28 + 5 groups
    assert len(plan) == (28 + 5 * 5 + 1) * 3 * len(full) + len(ada) * len(on_subset) and len(ada) == 28 + 5
    # a pure function of (sorted tasks, k, N): same sample in any task order and on every call
    assert sample_groups(tasks[::-1], 4, 5) == sample_groups(tasks, 4, 5) == sorted(groups[4])
    assert len({tuple(sample_groups(tasks, 4, 5)) for _ in range(3)}) == 1
    assert sweep_plan(config) == plan
    with pytest.raises(MLVisionError, match="max-groups-per-k"):
        sweep_plan(replace(config, max_groups_per_k=0))


def test_sweep_rerun_adds_nothing(tiny_study, capsys):
    before = query_db(tiny_study["db"], "SELECT count(*) FROM merge_evaluations")
    assert run_all(*tiny_study["args"], "--stages", "merge") == 0
    assert "0 merges evaluated" in capsys.readouterr().out
    assert query_db(tiny_study["db"], "SELECT count(*) FROM merge_evaluations") == before


def test_bad_merge_inputs_name_the_problem(adapter_folders, tmp_path):
    good = [load_deltas(f) for f in adapter_folders.values()]
    with pytest.raises(UnknownNameError, match="unknown merge method 'avg'"):
        merge_deltas(good, "avg")
    with pytest.raises(MergeConfigError, match="density"):
        merge_deltas(good, "ties", {"density": 1.5})
    other = tmp_path / "other_backbone"
    shutil.copytree(adapter_folders["textures"], other)
    meta = json.loads((other / "task.json").read_text())
    meta["backbone"]["name"] = "tf_efficientnet_lite1"
    meta["task"] = "other"
    (other / "task.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="other_backbone.*backbone"):
        merge_deltas([good[0], load_deltas(other)], "linear")
    headless = tmp_path / "no_head"
    shutil.copytree(adapter_folders["lfw_faces"], headless)
    (headless / "head.safetensors").unlink()
    with pytest.raises(AdapterError, match="no_head"):
        load_deltas(headless)
    with pytest.raises(AdapterError, match="same task"):
        merge_deltas([good[0], good[0]], "linear")


def test_merge_cli_saves_a_merge_and_refuses_bad_values(adapter_folders, tmp_path, capsys):
    folders = [str(f) for f in adapter_folders.values()]
    assert (
        merge_main(
            [*folders, "--method", "ties", "--param", "density=0.3", "--out", str(tmp_path / "m"), "--rank", "4"]
        )
        == 0
    )
    assert "relative reconstruction error" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "merge.json").read_text())["hyperparams"]["density"] == 0.3
    assert merge_main([*folders, "--method", "ties", "--param", "density=2", "--out", str(tmp_path / "bad")]) == 2
    assert "density" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert merge_main([*folders, "--method", "nope", "--out", str(tmp_path / "bad")]) == 2
    assert merge_main(["/no/such/adapter", "--out", str(tmp_path / "bad")]) == 2
    assert "no model folder" in capsys.readouterr().err
