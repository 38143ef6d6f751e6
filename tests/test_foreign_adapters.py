"""Adapters trained elsewhere (issue 18, source a): peft LoRAs of a transformers ViT, classifier in modules_to_save.

A tiny random ViTForImageClassification is saved to a folder (the "base model"); three LoRA adapters are trained
on it for a few steps with real peft, the recipe of peft's image-classification guide (different num_labels per
task, loaded with ignore_mismatched_sizes=True, classifier in modules_to_save), and saved with save_pretrained.
One of them adapts only q_proj, so its v_proj layers are missing. Everything is built once per module, offline.

Tolerances (float32 throughout):
- the reader against peft's own model for one adapter: 1e-5 absolute on logits of magnitude ~1;
- the merged model against peft's loaded task model with the merged ΔW folded in: 1e-5;
- the exported LoRA reloaded with plain peft in a fresh process against the merged model: 1e-4 at full rank
  (the reported reconstruction error is then < 1e-5); at a lower rank the error is reported, not bounded here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import call_main
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import ViTConfig, ViTForImageClassification

from merging.deltas import check_compatible
from merging.foreign import build_merged_classifier, fill_missing_layers, is_foreign, load_foreign
from merging.merge import main as merge_main
from merging.merged_model import merge_deltas
from merging.methods import list_methods
from mlvision.errors import AdapterError
from mlvision.paths import REPO_ROOT

# task -> (classes, target modules, how its labels travel)
TASKS = {
    "shapes": (3, ["q_proj", "v_proj"], "labels.json"),
    "colors": (2, ["q_proj", "v_proj"], "config.json"),
    "stripes": (4, ["q_proj"], "--labels"),
}
ABS_TOL = 1e-5
EXPORT_TOL = 1e-4


def vit_for(base: Path, num_labels: int) -> ViTForImageClassification:
    """The base model with a fresh classifier of num_labels outputs, as peft's guide loads it."""
    return ViTForImageClassification.from_pretrained(base, num_labels=num_labels, ignore_mismatched_sizes=True)


def label_names(task: str) -> list[str]:
    return [f"{task}-{i}" for i in range(TASKS[task][0])]


def fit_bands(model: torch.nn.Module, classes: int, logits) -> None:
    """Four AdamW steps of `model`'s trainable parameters on 16 synthetic images whose class is the brightest of
    `classes` horizontal bands (`logits(images)` gives the model's logits)."""
    images = torch.randn(16, 3, 32, 32)
    labels = torch.arange(16) % classes
    band = 32 // classes
    for i, label in enumerate(labels):
        images[i, :, label * band : (label + 1) * band] += 2.0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(logits(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def train_adapter(base: Path, task: str, folder: Path) -> None:
    """A few AdamW steps on synthetic images whose class is the brightest of n horizontal bands."""
    classes, targets, labels_via = TASKS[task]
    torch.manual_seed(len(task))
    model = get_peft_model(
        vit_for(base, classes),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, modules_to_save=["classifier"]),
    )
    fit_bands(model, classes, lambda images: model(pixel_values=images).logits)
    model.save_pretrained(folder)
    if labels_via == "labels.json":
        (folder / "labels.json").write_text(json.dumps(label_names(task)))
    elif labels_via == "config.json":
        config = model.base_model.model.config
        config.id2label = dict(enumerate(label_names(task)))
        config.label2id = {name: i for i, name in config.id2label.items()}
        config.save_pretrained(folder)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """The base model folder, three trained adapters, a labels file, and a fixed batch of images."""
    root = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    ViTForImageClassification(config).save_pretrained(root / "base")
    adapters = {}
    for task in TASKS:
        adapters[task] = root / task
        train_adapter(root / "base", task, adapters[task])
    labels = root / "stripes-labels.txt"
    labels.write_text("\n".join(label_names("stripes")))
    torch.manual_seed(1)
    return {
        "root": root,
        "base": root / "base",
        "adapters": adapters,
        "labels": labels,
        "images": torch.randn(5, 3, 32, 32),
    }


def cli_args(zoo, *tasks: str) -> list[str]:
    args = [str(zoo["adapters"][task]) for task in tasks]
    if "stripes" in tasks:
        args += ["--labels", f"{zoo['adapters']['stripes']}={zoo['labels']}"]
    return args


def loaded(zoo, *tasks: str):
    """The adapters as the CLI reads them: ΔW over the union of layers (missing ones 0), heads, labels."""
    adapters = [load_foreign(zoo["adapters"][t], zoo["labels"] if t == "stripes" else None) for t in tasks]
    filled, sources = fill_missing_layers(adapters)
    check_compatible(filled)
    return filled, sources


def peft_task_model(zoo, task: str, merged: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """peft's own loading of one adapter (its classifier from modules_to_save); with `merged`, the adapter's
    ΔW replaced by the merged ΔW: every merged layer set to base weight + merged ΔW."""
    model = PeftModel.from_pretrained(vit_for(zoo["base"], TASKS[task][0]), zoo["adapters"][task]).eval()
    if merged is None:
        return model
    model = model.merge_and_unload()
    base = ViTForImageClassification.from_pretrained(zoo["base"]).state_dict()
    with torch.no_grad():
        for layer, delta in merged.items():
            model.get_submodule(layer).weight.copy_(base[f"{layer}.weight"] + delta)
    return model


def complete(out: Path, tasks) -> bool:
    names = {"adapter_config.json", "adapter_model.safetensors", "merge.json"}
    heads = all((out / "heads" / t / f).is_file() for t in tasks for f in ("head.safetensors", "labels.json"))
    return out.is_dir() and names <= {p.name for p in out.iterdir()} and heads


# --- reading ---------------------------------------------------------------------------------------------


def test_reader_gives_peft_s_own_model_for_one_adapter(zoo):
    """One adapter merged alone at scale 1 is that adapter: ΔW, classifier and labels as peft loads them."""
    adapter = load_foreign(zoo["adapters"]["shapes"])
    assert is_foreign(adapter.path) and adapter.meta["label_names"] == label_names("shapes")
    assert sorted(adapter.deltas) == sorted(
        f"vit.layers.{i}.attention.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")
    )
    merged = merge_deltas([adapter], "task_arithmetic", {"scaling": 1.0})
    with torch.no_grad():
        ours = build_merged_classifier([adapter], merged)(zoo["images"])["shapes"]
        theirs = peft_task_model(zoo, "shapes")(pixel_values=zoo["images"]).logits
    assert (ours - theirs).abs().max() < ABS_TOL, (ours - theirs).abs().max()
    with torch.no_grad():  # the update matters: without it the logits differ by far more than the tolerance
        unchanged = {layer: 0 * d for layer, d in merged.items()}
        without = build_merged_classifier([adapter], unchanged)(zoo["images"])["shapes"]
    assert (without - theirs).abs().max() > 100 * ABS_TOL


def test_labels_come_from_config_json_beside_the_adapter_or_from_a_labels_file(zoo):
    assert load_foreign(zoo["adapters"]["colors"]).meta["label_names"] == label_names("colors")
    assert load_foreign(zoo["adapters"]["stripes"], zoo["labels"]).meta["label_names"] == label_names("stripes")


def test_labels_of_the_base_model_count_only_when_they_name_the_classes(zoo, tmp_path, capsys):
    """The base config's id2label is used last, when its size matches, and never silently (issue 29: two adapters
    got the base's names without a word); transformers' LABEL_i placeholders never are. The class names of the
    dataset an adapter is scored on (a study's task, `fallback_labels`) come before the base's."""
    named_base = tmp_path / "named_base"
    named_base.mkdir()
    (named_base / "config.json").write_text(json.dumps({"id2label": {str(i): f"n{i}" for i in range(4)}}))
    folder = copy_adapter(zoo, "stripes", tmp_path / "stripes")
    edit_config(folder, base_model_name_or_path=str(named_base))
    capsys.readouterr()
    assert load_foreign(folder, fallback_labels=["w", "x", "y", "z"]).meta["label_names"] == ["w", "x", "y", "z"]
    assert capsys.readouterr().err == ""
    assert load_foreign(folder).meta["label_names"] == ["n0", "n1", "n2", "n3"]
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: "), warning
    assert str(named_base) in warning[0] and f"--labels {folder}=FILE" in warning[0], warning
    folder = copy_adapter(zoo, "colors", tmp_path / "colors")
    (folder / "config.json").unlink()  # now only the base's config: two classes named LABEL_0, LABEL_1
    with pytest.raises(AdapterError, match="no label names"):
        load_foreign(folder)


def test_a_layer_only_some_adapters_adapt_is_merged_with_zero_for_the_others(zoo):
    adapters, sources = loaded(zoo, "shapes", "stripes")
    assert sources["vit.layers.0.attention.v_proj"] == ["shapes"]
    assert sources["vit.layers.0.attention.q_proj"] == ["shapes", "stripes"]
    stripes = adapters[1]
    assert stripes.deltas["vit.layers.0.attention.v_proj"].abs().max() == 0
    merged = merge_deltas(adapters, "task_arithmetic", {"scaling": 1.0})
    layer = "vit.layers.1.attention.v_proj"
    assert torch.allclose(merged[layer], adapters[0].deltas[layer])


# --- the merged model --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "tsv_m"])
def test_merged_logits_equal_peft_s_task_model_with_the_merged_update(zoo, method):
    tasks = list(TASKS)
    adapters, _ = loaded(zoo, *tasks)
    merged = merge_deltas(adapters, method)
    with torch.no_grad():
        outputs = build_merged_classifier(adapters, merged)(zoo["images"])
        for task in tasks:
            reference = peft_task_model(zoo, task, merged)(pixel_values=zoo["images"]).logits
            assert outputs[task].shape == (5, TASKS[task][0])
            assert (outputs[task] - reference).abs().max() < ABS_TOL, (task, (outputs[task] - reference).abs().max())


# --- the CLI ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list_methods(kind="data_free"))
def test_every_per_layer_method_merges_through_the_cli(zoo, method, tmp_path, capsys):
    out = tmp_path / "merged"
    code, stdout, err = call_main(
        merge_main, [*cli_args(zoo, *TASKS), "--method", method, "--rank", "8", "--out", out], capsys
    )
    assert code == 0, err
    assert complete(out, TASKS)
    info = json.loads((out / "merge.json").read_text())
    assert info["method"] == method and info["tasks"] == list(TASKS) and info["export_rank"] == 8
    assert info["layers"]["vit.layers.1.attention.v_proj"] == ["shapes", "colors"]
    assert info["missing_layers_as_zero"] is True
    assert info["labels"]["stripes"] == label_names("stripes")
    assert 0 <= info["relative_error"] < 1 and f"{info['relative_error']:.4f}" in stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_exported_lora_loads_with_plain_peft_in_a_fresh_process(zoo, tmp_path):
    """The README's command as a real process; then plain transformers + peft, no project code, reproduce the
    merged model's logits per task (full rank: the reconstruction error is ~1e-7)."""
    out = tmp_path / "merged"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "merging/merge.py", *cli_args(zoo, *TASKS), "--method", "ties", "--rank", "32"]
    result = subprocess.run(
        [*command, "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert complete(out, TASKS) and "Traceback" not in result.stderr and "Loading weights" not in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(f"saved to {out} as a rank-32 LoRA"), result.stdout
    info = json.loads((out / "merge.json").read_text())
    assert info["relative_error"] < 1e-5

    torch.save(zoo["images"], tmp_path / "images.pt")
    script = f"""
import json, sys, torch
from pathlib import Path
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification
out, logits = Path({str(out)!r}), {{}}
for task in json.loads((out / "merge.json").read_text())["tasks"]:
    head = load_file(str(out / "heads" / task / "head.safetensors"))
    base = AutoModelForImageClassification.from_pretrained(
        {str(zoo["base"])!r}, num_labels=head["weight"].shape[0], ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    model.base_model.model.classifier.load_state_dict(head)
    with torch.no_grad():
        logits[task] = model(pixel_values=torch.load({str(tmp_path / "images.pt")!r})).logits
torch.save(logits, {str(tmp_path / "logits.pt")!r})
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    exported = torch.load(tmp_path / "logits.pt")
    adapters, _ = loaded(zoo, *TASKS)
    with torch.no_grad():
        merged = build_merged_classifier(adapters, merge_deltas(adapters, "ties"))(zoo["images"])
    for task in TASKS:
        assert (exported[task] - merged[task]).abs().max() < EXPORT_TOL, (
            task,
            (exported[task] - merged[task]).abs().max(),
        )


# --- refusals: one line, exit 2, nothing written ------------------------------------------------------------


def refused(argv, out: Path, capsys, *words: str) -> str:
    code, _, err = call_main(merge_main, [*argv, "--out", out, "--rank", "4"], capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert str(word) in lines[0], lines[0]
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0]


def copy_adapter(zoo, task: str, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for file in zoo["adapters"][task].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_adapters_of_different_base_models_are_refused_naming_both(zoo, tmp_path, capsys):
    other = copy_adapter(zoo, "colors", tmp_path / "colors_other")
    edit_config(other, base_model_name_or_path="google/vit-base-patch16-224")
    refused(
        [zoo["adapters"]["shapes"], other], tmp_path / "out", capsys, "google/vit-base-patch16-224", str(zoo["base"])
    )


def test_missing_labels_name_the_adapter_and_the_fix(zoo, tmp_path, capsys):
    folder = zoo["adapters"]["stripes"]
    refused([zoo["adapters"]["shapes"], folder], tmp_path / "out", capsys, "no label names", str(folder), "--labels")


def test_labels_of_the_wrong_size_are_refused(zoo, tmp_path, capsys):
    wrong = tmp_path / "three.json"
    wrong.write_text(json.dumps(["a", "b", "c"]))
    folder = zoo["adapters"]["stripes"]
    refused([folder, "--labels", f"{folder}={wrong}"], tmp_path / "out", capsys, "names 3 labels", "4 outputs")


def test_an_ia3_adapter_is_refused(zoo, tmp_path, capsys):
    folder = tmp_path / "ia3"
    config = IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"], modules_to_save=["classifier"])
    get_peft_model(vit_for(zoo["base"], 3), config).save_pretrained(folder)
    refused([zoo["adapters"]["shapes"], folder], tmp_path / "out", capsys, "IA3", str(folder), "not LoRA")


def test_a_dora_adapter_is_refused(zoo, tmp_path, capsys):
    folder = tmp_path / "dora"
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["classifier"])
    get_peft_model(vit_for(zoo["base"], 3), config).save_pretrained(folder)
    (folder / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    refused([zoo["adapters"]["shapes"], folder], tmp_path / "out", capsys, "DoRA", str(folder))


def test_a_corrupted_adapter_file_is_refused(zoo, tmp_path, capsys):
    folder = copy_adapter(zoo, "colors", tmp_path / "colors_damaged")
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    refused([zoo["adapters"]["shapes"], folder], tmp_path / "out", capsys, "cannot read the LoRA files", str(folder))


def test_an_adapter_without_a_saved_classifier_is_refused(zoo, tmp_path, capsys):
    folder = tmp_path / "no_head"
    get_peft_model(vit_for(zoo["base"], 3), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(folder)
    refused([folder], tmp_path / "out", capsys, "modules_to_save", str(folder))


def test_trained_biases_are_refused(zoo, tmp_path, capsys):
    folder = tmp_path / "biases"
    config = LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only", modules_to_save=["classifier"])
    get_peft_model(vit_for(zoo["base"], 3), config).save_pretrained(folder)
    refused([folder], tmp_path / "out", capsys, "q_proj.base_layer.bias", "bias='none'")


def test_a_method_that_is_not_per_layer_is_refused(zoo, tmp_path, capsys):
    refused([*cli_args(zoo, "shapes", "colors"), "--method", "regmean"], tmp_path / "out", capsys, "per-layer", "tsv_m")


def test_mixing_with_this_project_s_own_adapters_is_refused(zoo, tmp_path, capsys):
    own = tmp_path / "own"
    own.mkdir()
    (own / "task.json").write_text("{}")
    refused([zoo["adapters"]["shapes"], own], tmp_path / "out", capsys, str(own), "one kind")


def test_a_base_model_that_cannot_be_loaded_offline_is_refused(zoo, tmp_path, capsys):
    folders = [copy_adapter(zoo, t, tmp_path / t) for t in ("shapes", "colors")]
    for folder in folders:
        edit_config(folder, base_model_name_or_path=str(tmp_path / "no_such_model"))
    refused(folders, tmp_path / "out", capsys, "cannot load base model", "no_such_model")


PATTERNS = {  # peft reads these keys as regular expressions (`get_pattern_key`), not as module-name suffixes
    "alpha": {"alpha_pattern": {r"layers\.[01]\.attention\.q_proj": 64}},
    "alpha and rank": {
        "alpha_pattern": {r"layers\.[01]\.attention\.q_proj": 64},
        "rank_pattern": {r"layers\.1\.attention\.(q|v)_proj": 2},
    },
}


@pytest.mark.parametrize("patterns", list(PATTERNS))
def test_regex_rank_and_alpha_patterns_give_peft_s_own_delta_weights(zoo, tmp_path, patterns):
    """Every layer's ΔW through the reader equals `get_delta_weight` of peft's own loaded model (issue 29: read as
    literal suffixes, a regex alpha_pattern left two layers' ΔW 8x too small without a word, and a regex
    rank_pattern was refused as a config that does not belong to its factors). Measured: 2.4e-7 and 4.8e-7."""
    from peft.tuners.lora import LoraLayer

    folder = tmp_path / "patterns"
    torch.manual_seed(3)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"],
        init_lora_weights=False, **PATTERNS[patterns],  # B random, not zero: no ΔW is 0
    )  # fmt: skip
    get_peft_model(vit_for(zoo["base"], 3), config).save_pretrained(folder)
    (folder / "labels.json").write_text(json.dumps(label_names("shapes")))
    ours = load_foreign(folder).deltas
    model = PeftModel.from_pretrained(vit_for(zoo["base"], 3), folder)
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    scalings = {layer: module.scaling["default"] for layer, module in layers.items()}
    assert scalings["vit.layers.0.attention.q_proj"] == 64 / 4 and scalings["vit.layers.0.attention.v_proj"] == 8 / 4
    assert scalings["vit.layers.1.attention.q_proj"] == 64 / (2 if "rank" in patterns else 4)
    assert sorted(ours) == sorted(layers) and len(layers) == 4
    with torch.no_grad():
        difference = max(
            float((ours[layer] - module.get_delta_weight("default")).abs().max()) for layer, module in layers.items()
        )
    assert difference <= 1e-6, difference


def test_the_reader_refuses_a_rank_the_config_does_not_state(zoo, tmp_path):
    folder = copy_adapter(zoo, "colors", tmp_path / "colors_r8")
    edit_config(folder, r=8)
    with pytest.raises(AdapterError, match="r=8"):
        load_foreign(folder)


def test_planning_adapters_from_elsewhere_says_what_is_missing_in_one_line(zoo, capsys):
    """The planner reads them as the merge CLI does: RegMean without their images, and any method without the
    validation images the pairs are scored on, are one line each before any merge."""
    from merging.plan import main as plan_main

    code, out, err = call_main(plan_main, [*cli_args(zoo, "shapes", "colors"), "--method", "regmean"], capsys)
    assert code == 2 and "needs each adapter's training images: pass --data" in err and "Traceback" not in err
    code, out, err = call_main(plan_main, [*cli_args(zoo, "shapes", "colors"), "--method", "ties"], capsys)
    assert code == 2 and "planning needs each adapter's validation images: no validation images: --data" in err
    assert "merges" not in out and "Traceback" not in err
