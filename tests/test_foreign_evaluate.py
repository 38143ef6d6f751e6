"""Adapters trained elsewhere scored on their own data at export (issue 18): `--evaluate N --data ADAPTER=DATASET`.

Two datasets are saved with `save_to_disk` in the shape the adapters of tests/test_foreign_adapters.py learned
(32x32 images whose class is the brightest of n horizontal bands; ClassLabel names equal to the adapters' labels).
The single-adapter accuracy the CLI prints and the card holds is checked against peft's own loaded model on pixels
normalised by hand (the base has no image processor config: ViT's mean = std = 0.5; the images are already 32x32,
so no resize), and the merged accuracy against `build_merged_model` on the same pixels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import call_main
from PIL import Image
from test_foreign_adapters import TASKS, label_names, loaded, peft_task_model, refused, zoo  # noqa: F401
from test_foreign_timm import timm_zoo  # noqa: F401 - a fixture used here
from test_model_card import snippet_output, start_snippet, table

from merging.foreign import build_merged_model
from merging.merge import main as merge_main
from merging.merged_model import merge_deltas

EVALUATED = ("shapes", "colors")
IMAGES = 24


def band_images(task: str, n: int) -> tuple[list[Image.Image], list[int]]:
    classes = TASKS[task][0]
    rng = np.random.default_rng(len(task))
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


def hand_pixels(task: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = band_images(task, IMAGES)
    pixels = torch.stack([torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255 for image in images])
    return (pixels - 0.5) / 0.5, torch.tensor(labels)


def test_evaluate_scores_the_merge_and_each_adapter_on_its_own_data(zoo, data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "merged"
    argv = [*(zoo["adapters"][t] for t in EVALUATED), "--method", "ties", "--rank", "8", "--evaluate", IMAGES]
    argv += [arg for t in EVALUATED for arg in ("--data", f"{zoo['adapters'][t]}={data[t]}")]
    code, stdout, err = call_main(merge_main, [*argv, "--out", out], capsys)
    assert code == 0, err
    snippet = start_snippet(out)
    adapters, _ = loaded(zoo, *EVALUATED)
    merged_model = build_merged_model(adapters, merge_deltas(adapters, "ties"))
    rows = table(out)
    for task in EVALUATED:
        pixels, labels = hand_pixels(task)
        with torch.no_grad():
            single = float((peft_task_model(zoo, task)(pixel_values=pixels).logits.argmax(-1) == labels).float().mean())
            merged = float((merged_model(pixels)[task].argmax(-1) == labels).float().mean())
        line = re.search(rf"  {task}: merged accuracy ([\d.]+), its own adapter ([\d.]+) \(n=(\d+)\)", stdout)
        assert line and (float(line[1]), float(line[2]), int(line[3])) == (
            pytest.approx(merged, abs=5e-5),
            pytest.approx(single, abs=5e-5),
            IMAGES,
        ), stdout
        source = f"n={IMAGES}, measured now on {data[task]}"
        assert rows[task] == [
            str(TASKS[task][0]),
            f"{merged:.4f} ({source})",
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
    refused([shapes, "--data", f"{shapes}={data['shapes']}"], tmp_path / "o3", capsys, "--evaluate")
    refused([shapes, "--evaluate", "4", "--data", f"{shapes}={tmp_path / 'none'}"], tmp_path / "o4", capsys, "none")


def test_the_timm_card_snippet_runs_as_written(timm_zoo, tmp_path, capsys):  # noqa: F811
    """The card of a timm merge: its snippet (timm + peft only) runs from inside the folder and prints a label of
    each task."""
    from test_foreign_timm import TASKS as TIMM_TASKS
    from test_foreign_timm import label_names as timm_labels

    out = tmp_path / "merged"
    argv = [*(timm_zoo["adapters"][t] for t in TIMM_TASKS), "--base", timm_zoo["base"], "--rank", "8"]
    assert call_main(merge_main, [*argv, "--out", out], capsys)[0] == 0
    printed = snippet_output(start_snippet(out))
    assert sorted(printed) == sorted(TIMM_TASKS) and all(printed[t] in timm_labels(t) for t in TIMM_TASKS)
    assert json.loads((out / "merge.json").read_text())["library"] == "timm"
