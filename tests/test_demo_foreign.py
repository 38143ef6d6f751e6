"""The demo serving adapters this project did not train (issue 18): `python demo/app.py --adapters ...`.

The transformers zoo of tests/test_foreign_adapters.py (a tiny random ViT, three LoRA adapters trained with peft's
image-classification recipe) is served from its folder of folders; the timm zoo of tests/test_foreign_timm.py from
its two folders with --base. Checked: the service's answer equals the merged model built by merging/foreign.py on
the same preprocessed pixels; the launched app answers gradio_client with the same numbers, says what it cannot
know (no stored accuracy, no out-of-domain check), answers a bad upload in one message and keeps serving, and its
download is the folder merging/merge.py writes for these adapters; the start-up refuses bad sources in one line.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import free_port
from conftest import call_main
from PIL import Image
from test_foreign_adapters import TASKS, label_names, loaded, zoo  # noqa: F401 - zoo is a fixture used here
from test_foreign_timm import TASKS as TIMM_TASKS
from test_foreign_timm import timm_zoo  # noqa: F401 - a fixture used here

from demo.app import main as demo_main
from demo.service import DemoService
from merging.foreign import build_merged_classifier, fill_missing_layers, load_foreign
from merging.merged_model import merge_deltas
from merging.sources import PeftAdapters
from mlvision.errors import AdapterError


@pytest.fixture(scope="module")
def foreign_service(zoo) -> DemoService:  # noqa: F811 - the fixture imported above
    """Every adapter of the zoo's folder (its base folder is no adapter and is left out), stripes' labels given."""
    labels = {str(zoo["adapters"]["stripes"]): str(zoo["labels"])}
    return DemoService(PeftAdapters.from_arguments([str(zoo["root"])], labels=labels), device="cpu")


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("foreign_demo") / "bands.png"
    pixels = np.zeros((48, 40, 3), dtype=np.uint8)
    pixels[:16] = 220  # a bright top band, the kind of image the adapters were trained on
    Image.fromarray(pixels).save(path)
    return path


def test_the_service_answers_with_the_merged_model_of_merging_foreign(foreign_service, zoo, picture):  # noqa: F811
    assert foreign_service.tasks == sorted(TASKS)
    assert foreign_service.labels == {task: label_names(task) for task in TASKS}
    # the base has no preprocessor_config.json: its config's image size with the ViT processor's defaults
    assert (foreign_service.preprocess.image_size, foreign_service.preprocess.mean) == (32, (0.5, 0.5, 0.5))
    assert foreign_service.describe_task("shapes") == (  # the page's task line: nothing it cannot know
        "**shapes**: 3 classes; native size unknown (adapter trained elsewhere), resized to 32x32 px "
        f"(the base model's size and normalisation); source: adapter shapes on {zoo['base']}"
    )
    adapters, _ = loaded(zoo, *sorted(TASKS))
    pixels = foreign_service.preprocess([Image.open(picture).convert("RGB")])
    for method in ("ties", "tsv_m"):
        probabilities = foreign_service.probabilities(Image.open(picture).convert("RGB"), foreign_service.tasks, method)
        with torch.no_grad():
            reference = build_merged_classifier(adapters, merge_deltas(adapters, method))(pixels)
        for task in TASKS:
            expected = torch.softmax(reference[task], dim=-1)[0]
            assert torch.allclose(probabilities[task], expected, atol=1e-6), (method, task)
    answer = foreign_service.predict_json(picture, ["shapes"], "auto", True)  # one task: its own adapter
    own = load_foreign(zoo["adapters"]["shapes"])
    with torch.no_grad():
        alone = build_merged_classifier([own], own.deltas)(pixels)["shapes"]
    assert answer["ok"] and answer["predictions"]["shapes"][0][0] == label_names("shapes")[int(alone.argmax())]


@pytest.mark.multiprocess
def test_the_launched_app_serves_them_to_gradio_client(foreign_service, zoo, picture, tmp_path):  # noqa: F811
    from gradio_client import Client, handle_file

    from demo.app import build_demo, launch, render_markdown, write_examples

    assert write_examples(foreign_service, tmp_path / "examples") == []  # their data is not here: no thumbnails
    demo = build_demo(foreign_service, [])
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        answer = client.predict(handle_file(str(picture)), [], "auto", True, api_name="/predict")
        direct = foreign_service.predict_json(picture, foreign_service.tasks, "auto", True)
        assert answer["ok"] and answer["method"] == direct["method"] == "ties" and answer["stored_accuracy"] == {}
        for task in TASKS:
            labels, probabilities = zip(*answer["predictions"][task])
            assert list(labels) == [label for label, _ in direct["predictions"][task]]
            assert list(probabilities) == pytest.approx([p for _, p in direct["predictions"][task]], abs=1e-6)
            assert set(labels) <= set(label_names(task))
            assert answer["in_domain"][task]["in_domain"] is None  # no validation images: no check, said so
            assert answer["compare"][task]["top"][0][0] in label_names(task)
        page = render_markdown(answer)
        assert "no out-of-domain check" in page

        bad = tmp_path / "bad.png"
        bad.write_bytes(b"this is not an image\n")
        refused = client.predict(handle_file(str(bad)), [], "auto", False, api_name="/predict")
        assert not refused["ok"] and "not an image" in refused["error"] and "Traceback" not in refused["error"]
        assert client.predict(handle_file(str(picture)), [], "linear", False, api_name="/predict")["ok"]

        zip_path, line = client.predict(foreign_service.tasks, "ties", 8, api_name="/export_merged")
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(tmp_path / "unzipped")
        folder = tmp_path / "unzipped" / Path(zip_path).stem
        info = json.loads((folder / "merge.json").read_text())
        assert info["source"] == "peft-transformers" and info["tasks"] == sorted(TASKS) and info["export_rank"] == 8
        assert info["layers"]["vit.layers.0.attention.v_proj"] == ["colors", "shapes"]
        assert f"{info['relative_error']:.4f}" in line
        for task in TASKS:
            assert json.loads((folder / "heads" / task / "labels.json").read_text())["label_names"] == label_names(task)
    finally:
        demo.close()


def test_timm_adapters_are_served_with_their_base(timm_zoo, picture):  # noqa: F811
    folders = [str(timm_zoo["adapters"][task]) for task in TIMM_TASKS]
    service = DemoService(PeftAdapters.from_arguments(folders, base=str(timm_zoo["base"])), device="cpu")
    adapters, _ = fill_missing_layers([load_foreign(f, base=str(timm_zoo["base"])) for f in folders])
    adapters = sorted(adapters, key=lambda a: a.task)
    pixels = service.preprocess([Image.open(picture).convert("RGB")])
    with torch.no_grad():
        reference = build_merged_classifier(adapters, merge_deltas(adapters, "ties"))(pixels)
    probabilities = service.probabilities(Image.open(picture).convert("RGB"), service.tasks, "ties")
    for task in TIMM_TASKS:
        assert torch.allclose(probabilities[task], torch.softmax(reference[task], dim=-1)[0], atol=1e-6)


def test_bad_sources_are_refused_in_one_line(zoo, tmp_path, capsys):  # noqa: F811
    own = tmp_path / "own"  # this project's adapter: peft's files and task.json
    shutil.copytree(zoo["adapters"]["shapes"], own)
    (own / "task.json").write_text("{}")
    with pytest.raises(AdapterError, match="serve this project's adapters"):
        PeftAdapters.from_arguments([str(zoo["adapters"]["shapes"]), str(own)])
    with pytest.raises(AdapterError, match="not one of the adapters"):
        PeftAdapters.from_arguments([str(zoo["adapters"]["shapes"])], labels={str(tmp_path / "x"): "l.txt"})
    # the command's main (in this process: the real-process start-up is tests/test_demo.py's): one line, exit 2
    code, _, err = call_main(demo_main, ["--port", free_port(), "--adapters", zoo["adapters"]["stripes"]], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: cannot start the demo:"), err
    assert "no label names" in lines[-1] and "Traceback" not in err  # stripes has no labels without --labels
