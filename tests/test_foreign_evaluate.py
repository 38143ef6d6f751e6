"""Adapters trained elsewhere scored on their own data at export (issue 18): `--evaluate N --data ADAPTER=DATASET`;
with --data alone (issue 29.6) the method's grid is searched on a validation split, RegMean gets Gram matrices from
the data's training images, and the export's rank is chosen or measured on validation (29.5).

Datasets are saved with `save_to_disk` in the shape the adapters of tests/test_foreign_adapters.py learned
(32x32 images whose class is the brightest of n horizontal bands; ClassLabel names equal to the adapters' labels).
The single-adapter accuracy the CLI prints and the card holds is checked against peft's own loaded model on pixels
normalised by hand (the base has no image processor config: ViT's mean = std = 0.5; the images are already 32x32,
so no resize), the merged accuracy against `build_merged_classifier` on the same pixels, and the exported LoRA's against
the written folder reloaded with plain transformers + peft. The timm cards' snippets (a relative --base, a Hub id
from a local Hub cache) run as written, from inside the folder and from another one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import call_main
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from test_foreign_adapters import TASKS, label_names, loaded, peft_task_model, refused, zoo  # noqa: F401
from test_foreign_timm import hub_cache_entry, timm_zoo  # noqa: F401 - a fixture used here
from test_model_card import backbone_passes, hub_metadata, snippet_code, snippet_output, start_snippet, table
from transformers import ViTForImageClassification

from merging.foreign import build_merged_classifier
from merging.merge import main as merge_main
from merging.merged_model import merge_deltas
from merging.methods import get_method

EVALUATED = ("shapes", "colors")
IMAGES = 24


def band_images(task: str, n: int, seed: int = 0) -> tuple[list[Image.Image], list[int]]:
    classes = TASKS[task][0]
    rng = np.random.default_rng(len(task) + 1000 * seed)
    images, labels, band = [], [], 32 // classes
    for i in range(n):
        label = i % classes
        pixels = rng.integers(0, 120, size=(32, 32, 3), dtype=np.uint8)
        pixels[label * band : (label + 1) * band] = 230
        images.append(Image.fromarray(pixels))
        labels.append(label)
    return images, labels


def save_dataset(folder: Path, task: str, names: list[str]) -> Path:
    images, labels = band_images(task, IMAGES)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    split = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def data(zoo, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("foreign_data")
    return {task: save_dataset(root / task, task, label_names(task)) for task in EVALUATED}


def hand_pixels(task: str, n: int = IMAGES, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = band_images(task, n, seed)
    pixels = torch.stack([torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255 for image in images])
    return (pixels - 0.5) / 0.5, torch.tensor(labels)


# train / validation / test of the datasets with all three splits: (images, seed of their pixels)
SPLITS = {"train": (32, 1), "validation": (20, 2), "test": (IMAGES, 0)}


@pytest.fixture(scope="module")
def split_data(zoo, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """Datasets with their own train, validation and test images (so the pixels of each split are known here)."""
    root = tmp_path_factory.mktemp("foreign_splits")
    folders = {}
    for task in EVALUATED:
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=label_names(task))})
        splits = {}
        for split, (n, seed) in SPLITS.items():
            images, labels = band_images(task, n, seed)
            splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        folders[task] = root / task
        datasets.DatasetDict(splits).save_to_disk(str(folders[task]))
    return folders


def data_args(zoo, data) -> list[str]:  # noqa: F811
    return [arg for t in EVALUATED for arg in ("--data", f"{zoo['adapters'][t]}={data[t]}")]


def exported_features(zoo, out: Path, pixels: torch.Tensor) -> torch.Tensor:  # noqa: F811
    """The written folder loaded with plain transformers + peft, its classifier replaced by the identity: the input
    every task head reads."""
    model = ViTForImageClassification.from_pretrained(zoo["base"])
    model.classifier = torch.nn.Identity()
    model = PeftModel.from_pretrained(model, str(out)).eval()
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def exported_accuracy(zoo, out: Path, task: str, pixels: torch.Tensor, labels: torch.Tensor) -> float:  # noqa: F811
    head = load_file(str(out / "heads" / task / "head.safetensors"))
    logits = exported_features(zoo, out, pixels) @ head["weight"].T + head["bias"]
    return float((logits.argmax(-1) == labels).float().mean())


@pytest.mark.slow
def test_evaluate_scores_the_merge_and_each_adapter_on_its_own_data(zoo, data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "merged"
    argv = [*(zoo["adapters"][t] for t in EVALUATED), "--method", "ties", "--rank", "8", "--evaluate", IMAGES]
    argv += [arg for t in EVALUATED for arg in ("--data", f"{zoo['adapters'][t]}={data[t]}")]
    code, stdout, err = call_main(merge_main, [*argv, "--out", out], capsys)
    assert code == 0, err
    snippet = start_snippet(out)
    adapters, _ = loaded(zoo, *EVALUATED)
    hyperparams = json.loads((out / "merge.json").read_text())["hyperparams"]  # chosen on validation (--data)
    merged_model = build_merged_classifier(adapters, merge_deltas(adapters, "ties", hyperparams))
    rows = table(out)
    for task in EVALUATED:
        pixels, labels = hand_pixels(task)
        with torch.no_grad():
            single = float((peft_task_model(zoo, task)(pixel_values=pixels).logits.argmax(-1) == labels).float().mean())
            merged = float((merged_model(pixels)[task].argmax(-1) == labels).float().mean())
        exported = exported_accuracy(zoo, out, task, pixels, labels)
        pattern = rf"  {task}: merged accuracy ([\d.]+), its own adapter ([\d.]+), exported rank-8 ([\d.]+) \(n=(\d+)\)"
        line = re.search(pattern, stdout)
        assert line and (float(line[1]), float(line[2]), float(line[3]), int(line[4])) == (
            pytest.approx(merged, abs=5e-5),
            pytest.approx(single, abs=5e-5),
            pytest.approx(exported, abs=5e-5),
            IMAGES,
        ), stdout
        source = f"n={IMAGES}, measured now on {data[task]}"
        assert rows[task] == [
            str(TASKS[task][0]),
            f"{merged:.4f} ({source})",
            f"{exported:.4f} ({source})",
            f"{single:.4f} ({source})",
            "not measured",
        ]
    assert single > 0.5  # the adapters learned the bands: the check compares real, non-trivial accuracies
    assert sorted(snippet_output(snippet)) == sorted(EVALUATED)


def test_evaluate_refuses_data_that_does_not_fit_in_one_line(zoo, data, tmp_path, capsys):  # noqa: F811
    shapes, colors = zoo["adapters"]["shapes"], zoo["adapters"]["colors"]
    wrong = save_dataset(tmp_path / "wrong", "shapes", ["a", "b", "c"])
    evaluate = ["--evaluate", "4", "--data", f"{colors}={data['colors']}"]
    refused([shapes, colors, *evaluate], tmp_path / "o1", capsys, "no evaluation data", "shapes", "--data")
    refused([shapes, colors, *evaluate, "--data", f"{shapes}={wrong}"], tmp_path / "o2", capsys, "classes", "shapes")
    refused(
        [shapes, colors, "--method", "regmean", "--data", f"{colors}={data['colors']}"],
        tmp_path / "o3",
        capsys,
        "regmean",
        f"--data {shapes}=DATASET",
    )
    refused([shapes, "--evaluate", "4", "--data", f"{shapes}={tmp_path / 'none'}"], tmp_path / "o4", capsys, "none")


def test_data_chooses_the_hyperparameters_on_validation_and_measures_the_rank(zoo, split_data, tmp_path, capsys):  # noqa: F811
    """Issue 29.6 / 29.5: --data alone (no --param) searches the method's grid on the validation split, the sweep's
    rule (best mean accuracy, ties to the earlier point), and `--rank auto` keeps the smallest rank whose export
    moves no task's validation accuracy by more than 0.5 points; every figure recomputed here on the known pixels."""
    out = tmp_path / "merged"
    code, stdout, err = call_main(
        merge_main, [*(zoo["adapters"][t] for t in EVALUATED), *data_args(zoo, split_data), "--out", out], capsys
    )
    assert code == 0, err
    info = json.loads((out / "merge.json").read_text())
    selection, choice = info["selection"], info["rank_choice"]
    points = get_method("ties").grid_points(len(EVALUATED))
    assert selection["grid"] == points and selection["validation_n_per_task"] == SPLITS["validation"][0]
    adapters, _ = loaded(zoo, *EVALUATED)
    validation = {task: hand_pixels(task, *SPLITS["validation"]) for task in EVALUATED}

    def mean_accuracy(merged) -> float:
        model = build_merged_classifier(adapters, merged)
        with torch.no_grad():
            scores = [float((model(x)[t].argmax(-1) == y).float().mean()) for t, (x, y) in validation.items()]
        return sum(scores) / len(scores)

    scores = [mean_accuracy(merge_deltas(adapters, "ties", point)) for point in points]
    assert selection["validation_accuracy"] == pytest.approx(scores, abs=1e-6)
    best = scores.index(max(scores))  # the first of the best
    assert selection["chosen"] == points[best] and info["hyperparams"] == get_method("ties").validate(points[best])
    assert len(set(scores)) > 1  # the grid's points differ on these images: the choice is a real one
    assert f"chosen on validation: {points[best]}" in stdout

    ladder = choice["ladder"]
    assert choice["requested"] == "auto" and info["export_rank"] == ladder[-1]["rank"]
    assert [step["rank"] for step in ladder] == [4, 8, 16, 32][: len(ladder)]
    assert all(step["max_change"] > 0.005 for step in ladder[:-1]) and ladder[-1]["max_change"] <= 0.005
    for task, (pixels, labels) in validation.items():
        assert ladder[-1]["accuracy"][task] == pytest.approx(
            exported_accuracy(zoo, out, task, pixels, labels), abs=1e-6
        )
    header = hub_metadata(out)
    assert "model-index" not in header  # validation only: no test accuracy is claimed
    assert "Hyperparameters chosen on validation" in (out / "README.md").read_text()


def test_regmean_merges_adapters_from_elsewhere_with_gram_matrices_of_their_data(zoo, split_data, tmp_path, capsys):  # noqa: F811
    """Issue 29.6: RegMean with --data: each adapter's Gram matrices from its dataset's training images, here
    recomputed by hand on peft's own model (the adapter merged in, hooks on the adapted layers' inputs); the export at
    full rank holds that merge."""
    out = tmp_path / "merged"
    argv = [*(zoo["adapters"][t] for t in EVALUATED), *data_args(zoo, split_data), "--method", "regmean"]
    code, _, err = call_main(merge_main, [*argv, "--param", "alpha=0.6", "--rank", "full", "--out", out], capsys)
    assert code == 0, err
    info = json.loads((out / "merge.json").read_text())
    assert info["method"] == "regmean" and info["hyperparams"]["alpha"] == 0.6 and "selection" not in info
    adapters, _ = loaded(zoo, *EVALUATED)
    grams = []
    for task in EVALUATED:
        model = peft_task_model(zoo, task).merge_and_unload().eval()
        sums, counts = {}, {}

        def hook_for(layer):
            def hook(module, inputs):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[layer] = sums.get(layer, 0) + x.T @ x
                counts[layer] = counts.get(layer, 0) + x.shape[0]

            return hook

        handles = [
            model.get_submodule(layer).register_forward_pre_hook(hook_for(layer)) for layer in adapters[0].deltas
        ]
        with torch.no_grad():
            model(pixel_values=hand_pixels(task, *SPLITS["train"])[0])
        for handle in handles:
            handle.remove()
        grams.append({layer: sums[layer] / counts[layer] for layer in sums})
    expected = merge_deltas(adapters, "regmean", {"alpha": 0.6}, grams)
    factors = load_file(str(out / "adapter_model.safetensors"))
    for layer, delta in expected.items():
        key = f"base_model.model.{layer}"
        exported = factors[f"{key}.lora_B.weight"].double() @ factors[f"{key}.lora_A.weight"].double()
        assert (exported - delta).abs().max() < 1e-4 * float(delta.abs().max()), layer
    other = merge_deltas(adapters, "task_arithmetic", {"scaling": 0.5})  # the check tells the merges apart
    layer = next(iter(expected))
    assert (expected[layer] - other[layer]).abs().max() > 1e-2 * float(expected[layer].abs().max())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_timm_card_snippet_runs_from_anywhere_after_a_relative_base(timm_zoo, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Issue 29.5: --base given relative to the working directory; the card's snippet (timm + peft only, one
    backbone pass for every head) runs from inside the folder and from another one, and the metadata names no
    base_model for a local folder."""
    from test_foreign_timm import TASKS as TIMM_TASKS
    from test_foreign_timm import label_names as timm_labels

    out = tmp_path / "merged"
    monkeypatch.chdir(timm_zoo["base"].parent)
    argv = [*(timm_zoo["adapters"][t] for t in TIMM_TASKS), "--base", timm_zoo["base"].name, "--rank", "8"]
    assert call_main(merge_main, [*argv, "--out", out], capsys)[0] == 0
    inside = start_snippet(out)
    info = json.loads((out / "merge.json").read_text())
    assert info["library"] == "timm" and info["base_model_name_or_path"] == str(timm_zoo["base"].resolve())
    assert "base_model" not in hub_metadata(out)
    printed = snippet_output(inside)  # before this fix: timm looked for the relative "base" inside the folder
    assert sorted(printed) == sorted(TIMM_TASKS) and all(printed[t] in timm_labels(t) for t in TIMM_TASKS)
    assert backbone_passes(snippet_code(out)) == (1, 0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert snippet_output(start_snippet(out, cwd=elsewhere)) == printed


def test_a_hub_base_is_the_card_s_base_model_with_peft_s_adapter_tag(timm_zoo, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A base named by its Hub id (here read from a local Hub cache, as huggingface_hub lays it out) is the card's
    base_model, with the `base_model:adapter:ID` tag peft writes, and a valid repo id."""
    from test_foreign_timm import TASKS as TIMM_TASKS

    cache = tmp_path / "hub"
    hub_cache_entry(cache, "timm/tiny-vit-test", timm_zoo["base"], "c" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "merged"
    argv = [*(timm_zoo["adapters"][t] for t in TIMM_TASKS), "--base", "timm/tiny-vit-test", "--rank", "8"]
    assert call_main(merge_main, [*argv, "--out", out], capsys)[0] == 0
    header = hub_metadata(out)
    assert header["base_model"] == "timm/tiny-vit-test"
    assert "base_model:adapter:timm/tiny-vit-test" in header["tags"] and "timm" in header["tags"]
