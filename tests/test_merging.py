"""The merge engine on real adapters: exact ΔW, folding, export, the sweep's stored figures, bad input."""

import json
import shutil

import pytest
import torch
from conftest import TINY_METHODS, TINY_TASKS, query_db, run_all
from peft import PeftModel

from merging.deltas import load_deltas
from merging.merge import main as merge_main
from merging.merged_model import build_merged_model, export_merge_as_lora, merge_deltas
from merging.peft_reference import PeftMerger
from mlvision.backbone import BackboneConfig, create_backbone
from mlvision.errors import AdapterError, MergeConfigError, UnknownNameError
from mlvision.evaluation import FoldedBackbone
from mlvision.models import load_model, save_model
from mlvision.runs import resolve_stored_path
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
    error = export_merge_as_lora(merged, adapters, full_rank, tmp_path / "full", {"method": "linear"})
    assert error < 1e-4
    low_error = export_merge_as_lora(merged, adapters, 1, tmp_path / "low", {"method": "linear"})
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
    ((selection,),) = query_db(
        tiny_study["db"], "SELECT selection FROM merges WHERE method = 'task_arithmetic' LIMIT 1"
    )
    selection = json.loads(selection)
    assert selection["chosen"] in selection["grid"] and len(selection["validation_accuracy"]) == len(selection["grid"])
    # linear and peft_cat compute the same ΔW, so they score the same on the same images
    same = query_db(
        tiny_study["db"],
        "SELECT a.merged_accuracy, b.merged_accuracy FROM merge_results a JOIN merge_results b "
        "ON a.tasks = b.tasks AND a.task = b.task WHERE a.method = 'linear' AND b.method = 'peft_cat'",
    )
    assert len(same) == 9 and all(abs(x - y) < 1e-9 for x, y in same)


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
