"""The Gradio demo against the tiny study: the service equals the evaluation path, the launched app
answers `gradio_client` with the same numbers, every kind of bad upload gets a clear message while
the app keeps serving, and a headless Chromium shows a prediction after a real upload."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import DevTools, free_port, start_chromium, stop, wait_http
from PIL import Image

from demo.service import DemoService
from demo.uploads import MAX_PIXELS, load_image
from merging.merged_model import build_merged_model
from mlvision.backbone import Preprocess
from mlvision.data import split_tensors
from mlvision.errors import BadImage
from mlvision.store import Store
from mlvision.tasks import load_task

SCREENS = Path("/tmp/demo_screens")


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tiny_study) -> DemoService:
    return DemoService(tiny_study["db"], device="cpu")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo_example") / "uci_digits.png"
    load_task("uci_digits")["test"][3]["image"].save(path)
    return path


@pytest.fixture(scope="module")
def app_url(service, tmp_path_factory):
    from demo.app import build_demo, write_examples

    examples = write_examples(service, tmp_path_factory.mktemp("demo_examples"))
    demo = build_demo(service, examples)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


# -- 1. the service equals the evaluation code ------------------------------------------------------
def test_service_prediction_equals_evaluation_path(service, tiny_study):
    tasks = service.tasks
    method, _ = service.default_method(tasks)
    store = Store(tiny_study["db"])
    best = store.query(
        "SELECT method FROM merge_results WHERE tasks = ? GROUP BY method "
        "ORDER BY avg(normalized_accuracy) DESC, method LIMIT 1",
        [",".join(sorted(tasks))],
    )
    assert best and method == best[0][0]
    entry, _ = service.merged_model(tasks, method)
    reference = build_merged_model([service.adapters[t] for t in tasks], method, entry.hyperparams)
    for task in tasks:
        preprocess = Preprocess.from_dict(service.adapters[task].meta["preprocess"])
        images, _ = split_tensors(task, "test", preprocess, None)
        for index in (0, 5):
            with torch.inference_mode():
                expected = {t: torch.softmax(v, -1)[0] for t, v in reference(images[index : index + 1]).items()}
            pil = load_task(task)["test"][index]["image"]
            answer = service.predict(pil, tasks, method)
            assert answer.method == method
            got = service.probabilities(load_image(pil)[0], tasks, method)
            for t in tasks:
                assert torch.allclose(got[t], expected[t], atol=1e-5), (task, index, t)
                top = answer.predictions[t]
                assert top[0][0] == service.labels[t][int(expected[t].argmax())]
                values, indices = expected[t].topk(len(top))
                assert [label for label, _ in top] == [service.labels[t][i] for i in indices.tolist()]
                assert np.allclose([p for _, p in top], values.numpy(), atol=1e-5)
    stored = service.stored_accuracy(tasks, method)
    assert set(stored) == set(tasks) and all(0 <= row["merged"] <= 1 for row in stored.values())


# -- bad inputs --------------------------------------------------------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb as far as the decoder knows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def bad_inputs(folder: Path, example: Path) -> dict[str, tuple[Path | None, str | None]]:
    """name -> (file, expected error keyword or None when the image must be converted and answered)."""
    rgb = Image.open(example).convert("RGB").resize((40, 40))
    good = example.read_bytes()
    gradient = (np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(np.uint16)
    frames = [Image.new("RGB", (30, 30), (i * 80, 255 - i * 80, 0)) for i in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files = {
        "not_image.txt": (b"this is not an image\n", "not an image"),
        "empty.png": (b"", "empty"),
        "truncated.png": (_encode(rgb, "PNG")[:150], "truncated or corrupt"),
        "corrupt.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, None),
        "bomb.png": (_png_header_only(30000, 30000), "decompression bomb"),
        "big.png": (_png_header_only(8000, 8000), "decompression-bomb"),
        "sixteen_bit.png": (_encode(Image.fromarray(gradient), "PNG"), None),
        "cmyk.jpg": (_encode(rgb.convert("CMYK"), "JPEG"), None),
        "rgba.png": (_encode(rgb.convert("RGBA"), "PNG"), None),
        "palette.png": (_encode(rgb.convert("P"), "PNG"), None),
        "animated.gif": (animated.getvalue(), None),
        "one_pixel.png": (_encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), None),
        "tall.png": (_encode(Image.new("RGB", (1, 5000), (0, 0, 0)), "PNG"), "aspect ratio"),
        "good.png": (good, None),
    }
    out = {}
    for name, (data, keyword) in files.items():
        path = folder / name
        path.write_bytes(data)
        out[name] = (path, keyword)
    out["corrupt.jpg"] = (out["corrupt.jpg"][0], "cannot be read|truncated or corrupt|not an image")
    out["no_upload"] = (None, "No image uploaded")
    return out


def test_load_image_converts_correctly(tmp_path, example):
    files = bad_inputs(tmp_path, example)
    image, notes = load_image(files["sixteen_bit.png"][0])
    assert image.mode == "RGB" and image.getpixel((39, 39)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 0)
    assert any("16-bit" in n for n in notes)
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(transparent)[0].getpixel((0, 0)) == (255, 255, 255)
    image, notes = load_image(files["animated.gif"][0])
    assert image.mode == "RGB" and any("first frame" in n for n in notes)
    assert load_image(files["cmyk.jpg"][0])[0].mode == "RGB"
    assert load_image(files["one_pixel.png"][0])[0].size == (1, 1)
    with pytest.raises(BadImage, match="aspect ratio"):
        load_image(files["tall.png"][0])
    assert 8000 * 8000 > MAX_PIXELS


# -- 2. the launched app through gradio_client ------------------------------------------------------
def test_client_predictions_equal_the_service_and_bad_inputs_are_answered(app_url, service, example, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    info = client.view_api(return_format="dict", print_info=False)
    assert "/predict" in info["named_endpoints"]

    def ask(path, tasks=None, method="auto", compare=False):
        return client.predict(
            handle_file(str(path)) if path is not None else None,
            service.tasks if tasks is None else tasks,
            method,
            compare,
            api_name="/predict",
        )

    for method in ("auto", "linear", "ties"):
        answer = ask(example, method=method, compare=method == "auto")
        direct = service.predict_json(str(example), service.tasks, method, method == "auto")
        assert answer["ok"] and direct["ok"] and answer["method"] == direct["method"]
        assert answer["device"] == "cpu" and answer["elapsed_ms"] > 0
        for task in service.tasks:
            assert [label for label, _ in answer["predictions"][task]] == [
                label for label, _ in direct["predictions"][task]
            ]
            assert np.allclose(
                [p for _, p in answer["predictions"][task]], [p for _, p in direct["predictions"][task]], atol=1e-6
            )
        assert answer["stored_accuracy"] == direct["stored_accuracy"]
        if method == "auto":  # compare mode: each task's own adapter, one pass each
            assert set(answer["compare"]) == set(service.tasks)
            assert [label for label, _ in answer["compare"][service.tasks[0]]["top"]] == [
                label for label, _ in direct["compare"][service.tasks[0]]["top"]
            ]
    two = ask(example, tasks=service.tasks[:2])
    assert two["ok"] and set(two["predictions"]) == set(service.tasks[:2])
    every = ask(example, tasks=[])  # an empty selection means every task
    assert every["ok"] and set(every["predictions"]) == set(service.tasks)

    for name, (path, keyword) in bad_inputs(tmp_path, example).items():
        answer = ask(path)
        assert isinstance(answer, dict), name
        if keyword is None:
            assert answer["ok"], (name, answer)
            assert all(len(top) >= 2 for top in answer["predictions"].values())
        else:
            assert not answer["ok"], (name, answer)
            assert any(k.lower() in answer["error"].lower() for k in keyword.split("|")), (name, answer["error"])
        again = ask(example)  # the app keeps serving after every bad request
        assert again["ok"], name


# -- 3. a real browser: upload, predict, screenshot --------------------------------------------------
def test_headless_chromium_upload_and_screenshot(app_url, example, tmp_path):
    browser, port = start_chromium(tmp_path / "profile", window="1400,1100")
    try:
        targets = json.loads(wait_http(f"http://127.0.0.1:{port}/json/list", 60, browser))
        tools = DevTools(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        tools.call("Page.enable")
        tools.call("DOM.enable")
        tools.call("Emulation.setDeviceMetricsOverride", width=1400, height=1100, deviceScaleFactor=1, mobile=False)
        tools.call("Page.navigate", url=app_url)
        tools.wait_for("!!document.querySelector('input[type=file]')", 60, "the page loading")
        root = tools.call("DOM.getDocument", depth=-1)["root"]["nodeId"]
        node = tools.call("DOM.querySelector", nodeId=root, selector="input[type=file]")["nodeId"]
        tools.call("DOM.setFileInputFiles", nodeId=node, files=[str(example)])
        tools.wait_for(f"document.body.innerText.includes('{example.name}')", 30, "the upload")
        tools.evaluate("[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Predict').click()")
        tools.wait_for(
            "(document.querySelector('#prediction') || {innerText: ''}).innerText.includes('forward pass')",
            60,
            "the prediction",
        )
        time.sleep(1.0)  # let the preview image and the JSON panel draw
        text = tools.evaluate("document.querySelector('#prediction').innerText")
        assert "uci_digits" in text and "Error" not in text
        shot = tmp_path / "demo_prediction.png"
        shot.write_bytes(base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"]))
        assert shot.stat().st_size > 20_000, f"screenshot looks empty ({shot.stat().st_size} bytes)"
        SCREENS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENS / shot.name)
        tools.socket.close()
    finally:
        stop(browser)
