"""Adapters trained elsewhere (issue 18, sources b and hub ids): peft LoRAs of a timm model, and Hub repos.

A tiny random timm ViT is saved with timm's own `save_for_hf` (config.json + weights, what `timm/...` repos on the
Hub hold); two LoRA adapters are trained on it for a few steps with real peft, the recipe of peft's custom-models
guide: `timm.create_model(base, pretrained=True, num_classes=n)`, LoRA on qkv and fc1, and the classifier either in
`modules_to_save=["head"]` ("pets") or trained beside the LoRA and saved as head.safetensors ("food"). peft writes
no base model name for timm models, so the CLI is given --base. For hub ids a real Hugging Face cache is laid out
in a temporary folder (refs/main + snapshots/<commit>/, as huggingface_hub writes it) and huggingface_hub's cache
location is pointed at it: the adapter and base are then read by huggingface_hub's own `snapshot_download`,
offline. Pushing and downloading from the Hub are not tested (no network here).

Tolerances (float32): one adapter read by us against peft's own model, 1e-5 on logits; the exported LoRA at full
rank reloaded with plain timm + peft against the merged model, 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from conftest import call_main
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_foreign_adapters import fit_bands, refused
from test_model_card import snippet_output, start_snippet

from merging.foreign import build_merged_classifier, fill_missing_layers, load_foreign
from merging.merge import main as merge_main
from merging.merged_model import merge_deltas

# task -> (classes, where its classifier is saved)
TASKS = {"pets": (3, "modules_to_save"), "food": (2, "head.safetensors")}
TARGETS = ["qkv", "fc1"]
ABS_TOL = 1e-5
EXPORT_TOL = 1e-4


def label_names(task: str) -> list[str]:
    return [f"{task}-{i}" for i in range(TASKS[task][0])]


def timm_model(base: Path, num_classes: int | None = None) -> torch.nn.Module:
    extra = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(f"local-dir:{base}", pretrained=True, **extra)


def train_adapter(base: Path, task: str, folder: Path) -> None:
    """A few AdamW steps on synthetic images whose class is the brightest of n horizontal bands."""
    classes, head_via = TASKS[task]
    torch.manual_seed(len(task))
    saved = ["head"] if head_via == "modules_to_save" else None
    model = get_peft_model(
        timm_model(base, classes),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, modules_to_save=saved),
    )
    head = model.base_model.model.head
    head.requires_grad_(True)  # with modules_to_save peft trains its copy; otherwise the user unfreezes the head
    fit_bands(model, classes, model)
    model.save_pretrained(folder)
    if head_via == "head.safetensors":
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(folder / "head.safetensors"))
    (folder / "labels.json").write_text(json.dumps(label_names(task)))


@pytest.fixture(scope="module")
def timm_zoo(tmp_path_factory) -> dict:
    """The base model folder (timm's save_for_hf), two trained adapters, and a fixed batch of images."""
    root = tmp_path_factory.mktemp("foreign_timm")
    torch.manual_seed(0)
    base = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=10
    )
    timm.models.save_for_hf(base, root / "base", safe_serialization=True)
    adapters = {task: root / task for task in TASKS}
    for task, folder in adapters.items():
        train_adapter(root / "base", task, folder)
    torch.manual_seed(1)
    return {"root": root, "base": root / "base", "adapters": adapters, "images": torch.randn(5, 3, 32, 32)}


def peft_task_model(zoo, task: str) -> torch.nn.Module:
    """peft's own loading of one timm adapter, its classifier from modules_to_save or from head.safetensors."""
    model = PeftModel.from_pretrained(timm_model(zoo["base"], TASKS[task][0]), zoo["adapters"][task]).eval()
    if TASKS[task][1] == "head.safetensors":
        model.base_model.model.head.load_state_dict(load_file(str(zoo["adapters"][task] / "head.safetensors")))
    return model


@pytest.mark.parametrize("task", list(TASKS))
def test_one_timm_adapter_read_by_us_is_peft_s_own_model(timm_zoo, task):
    adapter = load_foreign(timm_zoo["adapters"][task], base=str(timm_zoo["base"]))
    assert adapter.meta["library"] == "timm" and adapter.meta["label_names"] == label_names(task)
    assert sorted(adapter.deltas) == sorted(f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.qkv", "mlp.fc1"))
    merged = merge_deltas([adapter], "task_arithmetic", {"scaling": 1.0})
    with torch.no_grad():
        ours = build_merged_classifier([adapter], merged)(timm_zoo["images"])[task]
        theirs = peft_task_model(timm_zoo, task)(timm_zoo["images"])
        without = build_merged_classifier([adapter], {layer: 0 * d for layer, d in merged.items()})(timm_zoo["images"])
    assert (ours - theirs).abs().max() < ABS_TOL, (ours - theirs).abs().max()
    assert (without[task] - theirs).abs().max() > 100 * ABS_TOL  # the update matters at this tolerance


def test_timm_adapters_merge_through_the_cli_and_reload_with_plain_timm_and_peft(timm_zoo, tmp_path, capsys):
    """The export at full rank, loaded the way merge.json's how_to_load says with timm + peft only, gives the
    merged model's logits per task."""
    out, base = tmp_path / "merged", timm_zoo["base"]
    argv = [*(timm_zoo["adapters"][t] for t in TASKS), "--base", base, "--method", "ties", "--rank", "32"]
    code, stdout, err = call_main(merge_main, [*argv, "--out", out], capsys)
    assert code == 0, err
    info = json.loads((out / "merge.json").read_text())
    assert info["library"] == "timm" and info["source"] == "peft-timm" and info["tasks"] == list(TASKS)
    assert info["relative_error"] < 1e-5 and "timm.create_model" in info["how_to_load"]
    adapters, _ = fill_missing_layers([load_foreign(timm_zoo["adapters"][t], base=str(base)) for t in TASKS])
    with torch.no_grad():
        merged = build_merged_classifier(adapters, merge_deltas(adapters, "ties"))(timm_zoo["images"])
    for task in TASKS:
        head = load_file(str(out / "heads" / task / "head.safetensors"))
        model = PeftModel.from_pretrained(timm_model(base), str(out)).eval()
        model.base_model.model.reset_classifier(head["weight"].shape[0])
        model.base_model.model.get_classifier().load_state_dict(head)
        with torch.no_grad():
            exported = model(timm_zoo["images"])
        assert (exported - merged[task]).abs().max() < EXPORT_TOL, (task, (exported - merged[task]).abs().max())
        labels = json.loads((out / "heads" / task / "labels.json").read_text())
        assert labels["label_names"] == label_names(task)


def hub_cache_entry(cache: Path, repo_id: str, files_from: Path, commit: str) -> None:
    """A model repo in a Hugging Face cache, laid out as huggingface_hub writes it (refs/main names the commit)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)


@pytest.mark.slow
def test_hub_adapters_and_a_hub_base_are_read_from_the_local_hub_cache(timm_zoo, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "hub"
    hub_cache_entry(cache, "someone/pets-lora", timm_zoo["adapters"]["pets"], "a" * 40)
    hub_cache_entry(cache, "someone/food-lora", timm_zoo["adapters"]["food"], "b" * 40)
    hub_cache_entry(cache, "timm/tiny-vit-test", timm_zoo["base"], "c" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # where huggingface_hub looks
    out = tmp_path / "merged"
    argv = ["hub:someone/pets-lora", "hub:someone/food-lora", "--base", "timm/tiny-vit-test", "--rank", "8"]
    code, _, err = call_main(merge_main, [*argv, "--method", "ties", "--out", out], capsys)
    assert code == 0, err
    # the model card's snippet, as written, loads the base by its Hub id (timm's hf-hub:) from that cache, offline
    snippet = start_snippet(out, {"HF_HUB_CACHE": str(cache)})
    info = json.loads((out / "merge.json").read_text())
    assert info["adapters"] == ["hub:someone/pets-lora", "hub:someone/food-lora"]
    assert info["tasks"] == ["someone/pets-lora", "someone/food-lora"]
    assert info["base_model_name_or_path"] == "timm/tiny-vit-test"
    labels = json.loads((out / "heads" / "someone_pets-lora" / "labels.json").read_text())
    assert labels == {
        "task": "someone/pets-lora",
        "label_names": label_names("pets"),
        "from_adapter": info["adapters"][0],
    }
    printed = snippet_output(snippet)
    assert sorted(printed) == sorted(info["tasks"]), printed
    assert printed["someone/pets-lora"] in label_names("pets") and printed["someone/food-lora"] in label_names("food")
    local = tmp_path / "local"  # the same merge from the local folders: the same LoRA, byte for byte
    argv = [*(timm_zoo["adapters"][t] for t in TASKS), "--base", timm_zoo["base"], "--rank", "8", "--method", "ties"]
    assert call_main(merge_main, [*argv, "--out", local], capsys)[0] == 0
    assert (local / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()

    empty = tmp_path / "empty_hub"
    empty.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty))
    refused(["hub:someone/pets-lora", "--base", timm_zoo["base"]], tmp_path / "out", capsys, "hub:someone/pets-lora")


def test_a_timm_adapter_without_a_base_names_the_option(timm_zoo, tmp_path, capsys):
    refused([timm_zoo["adapters"]["pets"]], tmp_path / "out", capsys, "base_model_name_or_path", "--base")


def test_a_base_that_contradicts_the_adapter_s_config_is_refused(timm_zoo, tmp_path, capsys):
    folder = tmp_path / "named"
    shutil.copytree(timm_zoo["adapters"]["pets"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "timm/one"}))
    refused([folder, "--base", "timm/other"], tmp_path / "out", capsys, "timm/other", "timm/one")


def test_a_damaged_head_file_is_refused(timm_zoo, tmp_path, capsys):
    folder = tmp_path / "food"
    shutil.copytree(timm_zoo["adapters"]["food"], folder)
    (folder / "head.safetensors").write_bytes(b"not a safetensors file")
    refused([folder, "--base", timm_zoo["base"]], tmp_path / "out", capsys, "head.safetensors", str(folder))
