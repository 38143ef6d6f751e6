"""The Gradio demo against the tiny study: the service equals the evaluation path, the launched app
answers `gradio_client` with the same numbers, every kind of bad upload gets a clear message while
the app keeps serving, concurrent requests are batched into one pass and answered as if alone, and
a headless Chromium shows a prediction after a real upload."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import DevTools, free_port, start_chromium, stop, wait_http
from PIL import Image

from demo.service import Batcher, DemoService
from demo.uploads import MAX_FILE_BYTES, MAX_FRAMES, MAX_PIXELS, gif_frames, load_image, public_text
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
    from demo.app import build_demo, launch, write_examples

    examples = write_examples(service, tmp_path_factory.mktemp("demo_examples"))
    demo = build_demo(service, examples)
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)  # with the app's upload limits
    yield f"http://127.0.0.1:{port}/"
    demo.close()


# -- 1. the service equals the evaluation code ------------------------------------------------------
def test_service_prediction_equals_evaluation_path(service, tiny_study):
    tasks = service.tasks
    method, _ = service.default_method(tasks)
    store = Store(tiny_study["db"])
    # "auto" is the study's rule: the best mean validation accuracy among the methods the demo serves
    best = store.query(
        "SELECT method FROM merges WHERE tasks = ? AND list_contains(?, method) GROUP BY method "
        "ORDER BY avg(CAST(selection->>'chosen_validation_accuracy' AS DOUBLE)) DESC, method LIMIT 1",
        [",".join(sorted(tasks)), list(service.methods)],
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


def test_one_task_is_answered_by_its_own_adapter_not_a_merge(service, tiny_study):
    """Issue 17, defect 7: one task chosen used to be 'merged' alone with TIES (density 0.2: a trimmed copy)."""
    task = service.tasks[0]
    pil = load_task(task)["test"][2]["image"]
    for method in (None, "auto", "ties"):
        answer = service.predict(pil, [task], method)
        assert answer.method == "own adapter" and answer.tasks == [task] and answer.hyperparams == {}
        assert ("ties not applied" in answer.method_source) == (method == "ties")
    preprocess = Preprocess.from_dict(service.adapters[task].meta["preprocess"])
    with torch.inference_mode():
        expected = torch.softmax(service.single_model(task)(preprocess([load_image(pil)[0]]))[task], -1)[0]
    assert answer.predictions[task][0][0] == service.labels[task][int(expected.argmax())]
    assert answer.predictions[task][0][1] == pytest.approx(float(expected.max()), abs=1e-5)
    (single, head), *_ = Store(tiny_study["db"]).query(
        "SELECT single_accuracy, head_accuracy FROM merge_results WHERE task = ? AND seed = ? LIMIT 1",
        [task, service.seed],
    )
    assert answer.stored_accuracy[task]["single"] == single and answer.stored_accuracy[task]["head"] == head
    with pytest.raises(BadImage, match="Unknown merge method"):
        service.predict(pil, [task], "no_such_method")


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


def _broken_second_ifd_tiff() -> bytes:
    """A two-page TIFF whose second IFD is overwritten with 0xFF bytes (Pillow raised TypeError on it)."""
    pages = [Image.new("RGB", (20, 20), (i * 100, 0, 0)) for i in range(2)]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    data = bytearray(buffer.getvalue())
    assert data[:4] == b"II*\0"
    first = struct.unpack("<I", data[4:8])[0]
    entries = struct.unpack("<H", data[first : first + 2])[0]
    second = struct.unpack("<I", data[first + 2 + 12 * entries : first + 6 + 12 * entries])[0]
    data[second : second + 40] = b"\xff" * 40
    return bytes(data)


def _many_frames_gif(frames: int) -> bytes:
    """A valid GIF of `frames` one-pixel frames (15 bytes each), written by hand so it is quick to make."""
    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame * frames + b"\x3b"


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n0 0 moveto 10 10 lineto stroke\nshowpage\n"
PATH_LIKE = re.compile(r"(^|[\s(\"'=])(/|~/|[A-Za-z]:\\)\w|Traceback|\.py\b")


def hostile_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected keyword): the uploads of the load findings."""
    files = {
        "broken_ifd.tiff": (_broken_second_ifd_tiff(), "corrupt"),
        "drawing.eps": (EPS, "not an image the demo accepts"),
        "many_frames.gif": (_many_frames_gif(MAX_FRAMES + 4000), "frames"),
    }
    out = {}
    for name, (data, keyword) in files.items():
        (folder / name).write_bytes(data)
        out[name] = (folder / name, keyword)
    return out


def test_hostile_uploads_are_refused_before_any_decoder_runs_away(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    opened_eps = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened_eps.append(1))
    for name, (path, keyword) in hostile_inputs(tmp_path).items():
        with pytest.raises(BadImage) as caught:
            load_image(path)
        assert keyword in str(caught.value), (name, str(caught.value))
        assert not PATH_LIKE.search(str(caught.value)), (name, str(caught.value))
    assert not opened_eps, "the EPS decoder (which starts Ghostscript) was tried"
    # frames are counted without walking the whole file: the count stops one past the limit
    assert gif_frames(_many_frames_gif(50_000), MAX_FRAMES + 1) == MAX_FRAMES + 1
    assert gif_frames(_many_frames_gif(7), MAX_FRAMES + 1) == 7
    image, notes = load_image(_many_frames_gif(MAX_FRAMES))
    assert image.size == (1, 1) and any(f"{MAX_FRAMES} frames" in n for n in notes)


def test_public_text_hides_server_paths():
    text = public_text(
        "cannot open '/tmp/gradio/ab12/photo.png' (see /usr/lib/python3.11/site-packages/PIL/Image.py, "
        "C:\\Users\\me\\x.png, ~/cache/x) at <_io.BytesIO object at 0x7f3a2c1d>; PNG/JPEG 1/2 and/or 25 MB / 2"
    )
    assert "/tmp" not in text and "site-packages" not in text and "Users" not in text and "cache" not in text
    assert "0x7f" not in text and "PNG/JPEG 1/2 and/or 25 MB / 2" in text
    assert len(public_text("x" * 1000)) <= 300


def test_batcher_runs_waiting_requests_as_one_pass_per_model():
    """Deterministic: the first pass is held open while three more requests queue up behind it."""
    entered, release = threading.Event(), threading.Event()
    calls = []

    def forward(model, images):
        calls.append((model, len(images)))
        entered.set()
        release.wait(10)
        return {"t": images * model.scale}, 1.0

    class Model:
        def __init__(self, scale):
            self.scale = scale

    double, triple = Model(2.0), Model(3.0)
    batcher = Batcher(forward, max_batch=2, wait_s=0.001)
    first = batcher.submit(double, torch.tensor([[1.0]]))
    assert entered.wait(10)
    waiting = [
        batcher.submit(double, torch.tensor([[2.0]])),
        batcher.submit(triple, torch.tensor([[5.0]])),
        batcher.submit(double, torch.tensor([[3.0], [4.0]])),
        batcher.submit(double, torch.tensor([[6.0]])),
    ]
    release.set()
    assert first.result(10)[0]["t"].tolist() == [[2.0]]
    results = [future.result(10)[0]["t"].tolist() for future in waiting]
    assert results == [[[4.0]], [[15.0]], [[6.0], [8.0]], [[12.0]]]
    # the waiting `double` requests shared passes of at most max_batch=2 requests; `triple` had its own
    assert calls == [(double, 1), (double, 3), (double, 1), (triple, 1)]
    assert batcher.passes == 4 and batcher.largest == 2

    def broken(model, images):
        raise RuntimeError("out of memory")

    failing = Batcher(broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        failing.run(double, torch.tensor([[1.0]]))
    with pytest.raises(RuntimeError):  # the worker survives and answers the next request (with its error)
        failing.run(double, torch.tensor([[1.0]]))


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


def test_hostile_uploads_through_the_app_get_friendly_errors_and_it_keeps_serving(app_url, service, example, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)

    def ask(path):
        return client.predict(handle_file(str(path)), service.tasks, "auto", False, api_name="/predict")

    for name, (path, keyword) in hostile_inputs(tmp_path).items():
        answer = ask(path)
        assert isinstance(answer, dict) and not answer["ok"], (name, answer)
        assert keyword in answer["error"], (name, answer["error"])
        assert not PATH_LIKE.search(answer["error"]) and "Internal error" not in answer["error"], (name, answer)
        assert ask(example)["ok"], name  # and the app keeps serving


def test_uploads_over_the_size_limit_are_refused(app_url, service, example, tmp_path):
    import gradio
    import httpx
    from gradio_client import Client, handle_file

    big = tmp_path / "huge.png"
    with open(big, "wb") as f:  # a PNG header, then zeros up to one byte over the limit (sparse on disk)
        f.write(example.read_bytes())
        f.truncate(MAX_FILE_BYTES + 1)
    client = Client(app_url, verbose=False)
    with pytest.raises(ValueError, match="maximum file size"):  # the client reads the limit from the app
        client.predict(handle_file(str(big)), service.tasks, "auto", False, api_name="/predict")
    with open(big, "rb") as f:  # a client that does not check: the server stops reading at the limit
        response = httpx.post(f"{app_url}gradio_api/upload", files={"files": ("huge.png", f)}, timeout=60)
    assert response.status_code == 413, response.text
    assert not PATH_LIKE.search(response.text)
    cache = Path(gradio.utils.get_upload_folder())
    kept = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > MAX_FILE_BYTES]
    assert not kept, kept
    answer = client.predict(handle_file(str(example)), service.tasks, "auto", False, api_name="/predict")
    assert answer["ok"]


def test_simultaneous_predictions_are_answered_as_if_alone(app_url, service, example, tmp_path):
    """12 clients at once (3 images, 2 methods, one with compare): every answer equals the one-at-a-time answer."""
    from gradio_client import Client, handle_file

    images = [example]
    for task in service.tasks[:2]:
        path = tmp_path / f"{task}.png"
        load_task(task)["test"][1]["image"].save(path)
        images.append(path)
    requests = [(images[i % 3], "auto" if i % 2 else "linear", i == 5) for i in range(12)]

    def ask(client, request):
        path, method, compare = request
        return client.predict(handle_file(str(path)), service.tasks, method, compare, api_name="/predict")

    alone = Client(app_url, verbose=False)
    expected = [ask(alone, request) for request in requests]
    clients = [Client(app_url, verbose=False) for _ in requests]
    answers: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def visitor(index):
        barrier.wait(60)
        try:
            answers[index] = ask(clients[index], requests[index])
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            answers[index] = error

    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for request, answer, reference in zip(requests, answers, expected):
        assert isinstance(answer, dict) and answer["ok"], (request, answer)
        assert answer["method"] == reference["method"] and answer["stored_accuracy"] == reference["stored_accuracy"]
        for task in service.tasks:
            got, want = answer["predictions"][task], reference["predictions"][task]
            assert [label for label, _ in got] == [label for label, _ in want], (request, task)
            assert np.allclose([p for _, p in got], [p for _, p in want], atol=1e-5), (request, task)
        if request[2]:
            assert set(answer["compare"]) == set(service.tasks)
            for task in service.tasks:
                assert [label for label, _ in answer["compare"][task]["top"]] == [
                    label for label, _ in reference["compare"][task]["top"]
                ]


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
