"""The Gradio demo against the tiny study: the service equals the evaluation path, the launched app
answers `gradio_client` with the same numbers, every kind of bad upload gets a clear message while
the app keeps serving, concurrent requests are batched into one pass and answered as if alone, and
a headless Chromium shows a prediction after a real upload and after a click on an example thumbnail,
and the merged model downloads as a zip equal to what merging/merge.py writes."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import DevTools, free_port, start_chromium, stop, wait_http
from PIL import Image

from demo import crafted
from demo.batcher import Batcher
from demo.containers import MAX_FRAMES, gif_frames
from demo.service import OOD_PERCENTILE, DemoService, native_size_text
from demo.uploads import MAX_FILE_BYTES, MAX_PIXELS, load_image, public_text
from merging.merged_model import build_merged_model
from mlvision.backbone import Preprocess
from mlvision.data import split_tensors
from mlvision.errors import BadImage, MergeConfigError
from mlvision.store import Store
from mlvision.tasks import get_task, load_task

REPO_ROOT = Path(__file__).resolve().parent.parent


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
def app(service, tmp_path_factory):
    """The launched demo (its Blocks; `app.janitor` keeps the uploads bounded)."""
    from demo.app import build_demo, launch, write_examples

    examples = write_examples(service, tmp_path_factory.mktemp("demo_examples"))
    demo = build_demo(service, examples)
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)  # with the app's upload limits
    demo.test_url = f"http://127.0.0.1:{port}/"
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def app_url(app) -> str:
    return app.test_url


# -- 1. the service equals the evaluation code ------------------------------------------------------
def test_service_prediction_equals_evaluation_path(service, tiny_study):
    tasks = service.tasks
    method, why = service.default_method(tasks)
    store = Store(tiny_study["db"])
    # "auto" is the study's choice for this group size (the findings' chosen_method) when the demo can serve it,
    # else the same rule (best mean validation accuracy at this k) over the methods it can serve
    chosen = store.query(
        "SELECT statistic FROM findings WHERE finding = 'chosen_method' AND statistic LIKE ?", [f"%/k={len(tasks)}"]
    )
    assert chosen, "the tiny study's findings name a chosen method per k"
    study_choice = chosen[0][0].split("/k=")[0]
    if study_choice in service.offered(tasks):
        assert method == study_choice and "the study's choice" in why
    else:
        best = store.query(
            "SELECT method FROM merges WHERE len(string_split(tasks, ',')) = ? AND list_contains(?, method) "
            "GROUP BY method ORDER BY avg(CAST(selection->>'chosen_validation_accuracy' AS DOUBLE)) DESC, method "
            "LIMIT 1",
            [len(tasks), service.offered(tasks)],
        )
        assert best and method == best[0][0] and f"{study_choice} (the study's choice)" in why
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


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n0 0 moveto 10 10 lineto stroke\nshowpage\n"
PATH_LIKE = re.compile(r"(^|[\s(\"'=])(/|~/|[A-Za-z]:\\)\w|Traceback|\.py\b")
# What each crafted file (demo/crafted.py) is refused for: a word of its message.
CRAFTED_REFUSALS = {
    "gif_60000_comment_blocks.gif": "comments or application data",
    "png_100000_chunks.png": "chunks",
    "tiff_1200_pages.tiff": "frames",
    "webp_1200_frames.webp": "frames",
    "gif_60000_comment_extensions.gif": "comments or application data",
    "gif_5000_frames.gif": "frames",
    "tiff_1000_pages_of_1000_tags.tiff": "tags",
    "jpeg_1000000_markers.jpg": "markers",
    "jpeg_20mb_stray_bytes.jpg": "stray data",
    "jpeg_10000_scans.jpg": "scans",
    "ppm_20mb_comment.ppm": "header",
    "ppm_plain_1500px.ppm": "slow encoding",
    "ppm_maxval_1000_1500px.ppm": "slow encoding",
    "bmp_rle_3000px_one_pixel_runs.bmp": "slow encoding",
}
# Refused after Pillow read the header (every other one before any parser): a Python decoder is its choice, and
# WebP's frame count is read by libwebp (C) when Pillow opens the file.
AFTER_HEADER = {
    "ppm_plain_1500px.ppm",
    "ppm_maxval_1000_1500px.ppm",
    "bmp_rle_3000px_one_pixel_runs.bmp",
    "webp_1200_frames.webp",
}


@pytest.fixture(scope="module")
def crafted_files(tmp_path_factory) -> dict[str, Path]:
    return crafted.write_crafted(tmp_path_factory.mktemp("crafted"))


def hostile_inputs(folder: Path, crafted_files: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected keyword): the uploads of the reliability runs."""
    files = {
        "broken_ifd.tiff": (_broken_second_ifd_tiff(), "corrupt"),
        "drawing.eps": (EPS, "not an image the demo accepts"),
    }
    out = {name: (path, CRAFTED_REFUSALS[name]) for name, path in crafted_files.items()}
    for name, (data, keyword) in files.items():
        (folder / name).write_bytes(data)
        out[name] = (folder / name, keyword)
    return out


def test_crafted_uploads_are_refused_before_a_parser_walks_them(tmp_path, monkeypatch, crafted_files):
    """Every crafted file (many blocks, chunks, segments, pages, frames, tags; slow encodings) is refused with its
    reason, and all but the slow encodings before Pillow opens them (its parsers are the slow part): the
    container walk stops at its limit, so its cost does not grow with the file. `python demo/crafted.py`
    prints the time each one takes."""
    from PIL import EpsImagePlugin

    assert set(crafted_files) == set(CRAFTED_REFUSALS), "a crafted file without its expected refusal"
    opened_eps, opened = [], []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened_eps.append(1))
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: opened.append(1) or real_open(*args, **kwargs))
    for name, (path, keyword) in hostile_inputs(tmp_path, crafted_files).items():
        opened.clear()
        with pytest.raises(BadImage) as caught:
            load_image(path)
        assert keyword in str(caught.value), (name, str(caught.value))
        assert not PATH_LIKE.search(str(caught.value)), (name, str(caught.value))
        if name in CRAFTED_REFUSALS:
            assert bool(opened) == (name in AFTER_HEADER), (name, "Pillow opened it" if opened else "not opened")
    assert not opened_eps, "the EPS decoder (which starts Ghostscript) was tried"
    # frames are counted without walking the whole file: the count stops one past the limit
    assert gif_frames(crafted.gif_frames(50_000), MAX_FRAMES + 1) == MAX_FRAMES + 1
    assert gif_frames(crafted.gif_frames(7), MAX_FRAMES + 1) == 7
    monkeypatch.setattr(Image, "open", real_open)
    image, notes = load_image(crafted.gif_frames(MAX_FRAMES))
    assert image.size == (1, 1) and any(f"{MAX_FRAMES} frames" in n for n in notes)


def test_files_just_inside_the_container_limits_are_decoded():
    """The limits leave room: the same kinds of file, a little smaller, decode to the right size."""
    inside = {
        "gif comments": crafted.gif_comment_blocks(1000),
        "gif extensions": crafted.gif_comment_extensions(1000),
        "png chunks": crafted.png_chunks(19_000),
        "tiff tags": crafted.tiff_tags(30, 1000),
        "tiff pages": crafted.tiff_pages(MAX_FRAMES),
        "jpeg markers": crafted.jpeg_markers(990),
        "jpeg stray bytes": crafted.jpeg_stray_bytes(60_000),
        "jpeg scans": crafted.jpeg_scans(60),
        "ppm comment": crafted.ppm_long_comment(60_000),
        "plain ppm": crafted.ppm_plain(300),
        "ppm maxval": crafted.ppm_sixteen_bit(300),
        "bmp rle": crafted.bmp_rle_runs(400),
    }
    for name, data in inside.items():
        image, _ = load_image(data)
        assert image.mode == "RGB" and image.size[0] >= 1, name


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
@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
def test_hostile_uploads_through_the_app_get_friendly_errors_and_it_keeps_serving(
    app_url, service, example, tmp_path, crafted_files
):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)

    def ask(path):
        return client.predict(handle_file(str(path)), service.tasks, "auto", False, api_name="/predict")

    for name, (path, keyword) in hostile_inputs(tmp_path, crafted_files).items():
        answer = ask(path)
        assert isinstance(answer, dict) and not answer["ok"], (name, answer)
        assert keyword in answer["error"], (name, answer["error"])
        assert not PATH_LIKE.search(answer["error"]) and "Internal error" not in answer["error"], (name, answer)
        assert ask(example)["ok"], name  # and the app keeps serving


@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
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
@pytest.mark.multiprocess
@pytest.mark.browser
def test_headless_chromium_upload_and_screenshot(app_url, service, example, tmp_path):
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
        # the name shows while the file uploads ("Uploading 1 file"); once uploaded the box lists it with its size
        # and a download arrow (a Predict click before that is answered "No image uploaded ... or wait until its
        # upload has finished")
        tools.wait_for(
            f"(t => t.includes('{example.stem}') && t.includes('⇣') && !t.includes('Uploading'))"
            "(document.querySelector('#upload').innerText)",
            30,
            "the upload",
        )
        tools.evaluate("[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Predict').click()")
        tools.wait_for(
            "(document.querySelector('#prediction') || {innerText: ''}).innerText.includes('forward pass')",
            60,
            "the prediction",
        )
        time.sleep(1.0)  # let the preview image and the JSON panel draw
        text = tools.evaluate("document.querySelector('#prediction').innerText")
        assert "uci_digits" in text and "Error" not in text
        page = tools.evaluate("document.body.innerText")
        assert "as the model sees it (resized to" in page and "Not offered" in page, page[:2000]
        shot = tmp_path / "demo_prediction.png"
        shot.write_bytes(base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"]))
        assert shot.stat().st_size > 20_000, f"screenshot looks empty ({shot.stat().st_size} bytes)"
        print(f"screenshot of a prediction, for a person to look at: {shot}")  # kept by pytest's tmp_path

        # an example thumbnail: one click puts that image in the box and predicts it (no Predict click)
        task = service.tasks[0]
        index = service.tasks.index(task)  # write_examples keeps the order of service.tasks
        answer = service.predict(load_task(task)["test"][0]["image"], service.tasks, "auto")  # the example image
        expected = [f"{top[0][0]} {100 * top[0][1]:.1f}%" for top in answer.predictions.values()]
        assert tools.evaluate("document.querySelectorAll('#examples .thumbnail-item').length") == len(service.tasks)
        tools.evaluate(f"document.querySelectorAll('#examples .thumbnail-item')[{index}].click()")
        tools.wait_for(
            f"document.querySelector('#upload').innerText.replace(/\\s/g, '').includes('{task}.png')",
            30,
            "the example in the upload box",
        )
        tools.wait_for(
            "(t => " + " && ".join(f"t.includes({json.dumps(cell)})" for cell in expected) + ")"
            f"(document.querySelector('#prediction').innerText) && "
            f"document.querySelector('#prediction').innerText !== {json.dumps(text)}",
            60,
            f"the example's prediction ({expected})",
        )
        shot = tmp_path / "demo_example_click.png"
        shot.write_bytes(base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"]))
        print(f"screenshot of an example's prediction, for a person to look at: {shot}")
        tools.socket.close()
    finally:
        stop(browser)


# -- 4. issue 17: start-up, task descriptions, model view, out-of-domain flag, compare flags, methods --
def _app_process(tiny_study, port: int, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env.pop("MLV_DEMO_PORT", None)
    env.pop("GRADIO_SERVER_PORT", None)
    command = [sys.executable, "demo/app.py", "--port", str(port), "--db", str(tiny_study["db"]), "--device", "cpu"]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True, **kwargs)


@pytest.mark.multiprocess
def test_startup_prints_progress_and_refuses_a_taken_port_in_one_line(tiny_study):
    """Issue 17: `python demo/app.py` says it is loading, then prints its URL; on a taken port it says which
    port and how to choose another, in one line, and exits non-zero at once (no wait, no traceback)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "print(s.getsockname()[1], flush=True); time.sleep(300)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(holder.stdout.readline())
        start = time.monotonic()
        refused = _app_process(tiny_study, port, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = refused.communicate(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        stop(holder)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert refused.returncode != 0, (out, err)
    assert len(lines) == 1, lines
    assert str(port) in lines[0] and "--port" in lines[0] and "in use" in lines[0], lines[0]
    assert "Traceback" not in out + err and "loading adapters" not in out
    assert elapsed < 10, f"refusing a taken port took {elapsed:.0f} s"

    port = free_port()
    app = _app_process(tiny_study, port, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(app.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("[demo] ready:" in line for line in lines):
            assert app.poll() is None, ("the demo exited", lines)
            assert time.monotonic() < deadline, ("no URL printed", lines)
            time.sleep(0.2)
        assert lines[0].strip() == "[demo] loading adapters ...", lines
        ready = next(line for line in lines if "[demo] ready:" in line)
        url = ready.split("ready:", 1)[1].strip()
        assert url.startswith(f"http://127.0.0.1:{port}"), ready
        assert wait_http(url, 30, app)
    finally:
        stop(app)


@pytest.mark.multiprocess
def test_task_descriptions_methods_and_collapsed_json_on_the_page(app_url, service):
    """Issue 17: one line per task beside the selector (what, input size, source); every per-layer method,
    the group's stored best marked auto; why the data-aware ones are missing; the raw JSON collapsed."""
    from gradio_client import Client

    from merging.methods import list_methods

    components = {c["props"].get("elem_id"): c for c in Client(app_url, verbose=False).config["components"]}
    described = components["task-descriptions"]["props"]["value"]
    lines = [line for line in described.splitlines() if line.strip()]
    assert len(lines) == len(service.tasks)
    for task, line in zip(service.tasks, lines):
        record = get_task(task)
        assert f"**{task}**" in line and record.description in line and record.source in line, line
        width, height = load_task(task)["train"][0]["image"].size  # the tiny tasks' images all share one size
        size = service.preprocess.image_size
        assert f"native {width}x{height} px, resized to {size}x{size} px" in line, line
    assert [re.search(r"; native (\S+) px, resized", line).group(1) for line in lines] == ["25x25", "32x32", "8x8"]
    assert native_size_text([(8, 8), (30, 20), (8, 8)]) == "native size varies (8x8 to 30x20 px)"
    assert native_size_text([]) == "native size unknown"
    gallery = components["examples"]["props"]
    assert [item["caption"] for item in gallery["value"]] == service.tasks and gallery["allow_preview"] is False
    best, _ = service.default_method(service.tasks)
    choices = {value: label for label, value in components["method"]["props"]["choices"]}
    # every data-free method and RegMean (its Gram matrices from the tasks' training images) are offered, in the
    # registry's order (merging/methods/__init__.py `_ALL`)
    offered = {*list_methods(kind="data_free"), *list_methods(kind="data_aware")}
    assert list(choices) == ["auto", *[name for name in list_methods() if name in offered]]
    assert choices["auto"] == f"auto (= {best})" and "auto" in choices[best]
    assert all("auto" not in label for value, label in choices.items() if value not in ("auto", best))
    not_offered = components["not-offered"]["props"]["value"]
    for name in list_methods(kind="test_time"):  # the tiny study stored no AdaMerging coefficients
        assert f"`{name}` learns its coefficients on the group's test images" in not_offered and name not in choices
    for name in list_methods(kind="reference"):
        assert f"`{name}` is a reference" in not_offered and name not in choices
    assert components["raw-json"]["props"]["open"] is False
    named = Client(app_url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert "/predict" in named and "/export_merged" in named and not any("example" in name for name in named)
    assert f"resized to {service.preprocess.image_size}x" in components["model-view"]["props"]["label"]


def test_the_preview_is_the_image_the_model_sees(service, example):
    """The preview is the preprocessed input (resized to the study's size), not the upload."""
    upload = load_image(example)[0].resize((97, 61))
    seen = service.model_view(upload)
    size = service.preprocess.image_size
    assert seen.size == (size, size) and upload.size != seen.size
    std = torch.tensor(service.preprocess.std).view(3, 1, 1)
    again = service.preprocess([seen])[0]  # the view, fed back in, is what the model saw (to 8-bit rounding)
    assert torch.allclose(again, service.preprocess([upload])[0], atol=float((1 / 255 / std).max()) + 1e-4)


def _noise_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(17)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(count)]
    return images + [Image.new("RGB", (64, 64), colour) for colour in ((128, 128, 128), (255, 255, 255))]


def test_out_of_domain_flag_on_validation_and_noise_images(service):
    """Issue 17: the threshold is the 5th percentile of the served model's top probability on the task's
    validation images; the task's own validation images pass it, noise and flat images mostly do not."""
    tasks = service.tasks
    method, _ = service.default_method(tasks)
    entry, _ = service.merged_model(tasks, method)
    for task in tasks:
        calibration = entry.thresholds[task]
        assert 0 < calibration["threshold"] < 1 and calibration["n_validation"] >= 16
    passed = []
    for task in tasks:
        split = load_task(task)["validation"]
        for index in np.linspace(0, len(split) - 1, 10).astype(int).tolist():
            check = service.predict(split[index]["image"], tasks, method).in_domain[task]
            assert check["threshold"] == entry.thresholds[task]["threshold"] and check["percentile"] == OOD_PERCENTILE
            assert check["in_domain"] == (check["confidence"] >= check["threshold"])
            passed.append(check["in_domain"])
    passed_rate = sum(passed) / len(passed)
    assert passed_rate >= 0.75, f"only {sum(passed)}/{len(passed)} validation images in domain"
    flagged = []
    for image in _noise_images(4):
        answer = service.predict(image, tasks, method)
        for task in tasks:
            check = answer.in_domain[task]
            flagged.append(not check["in_domain"])
            if not check["in_domain"]:
                assert check["message"].startswith(f"this image does not look like {task} data (confidence ")
                assert f"the {OOD_PERCENTILE}th percentile on its validation images" in check["message"]
    flagged_rate = sum(flagged) / len(flagged)
    assert flagged_rate > 0.5, f"only {sum(flagged)}/{len(flagged)} noise answers flagged"
    assert flagged_rate > (1 - passed_rate) + 0.3  # noise is flagged far more often than the task's own images
    # one task chosen: its own adapter, calibrated on its own; compare mode's own-adapter column says the same
    own = service.predict(_noise_images(1)[0], [tasks[0]], compare=True)
    assert own.in_domain[tasks[0]]["threshold"] == service.single_thresholds(tasks[0])[tasks[0]]["threshold"]
    assert own.compare[tasks[0]]["in_domain"] == own.in_domain[tasks[0]]


@pytest.mark.multiprocess
def test_out_of_domain_flag_and_compare_flags_through_the_app(app_url, service, tmp_path):
    """The JSON answer carries the flag per task and the page says so; compare mode flags disagreements
    and merges whose stored accuracy is below the head's."""
    from gradio_client import Client, handle_file

    from demo.app import render_markdown

    client = Client(app_url, verbose=False)
    noise = tmp_path / "noise.png"
    _noise_images(1)[0].save(noise)
    seen_disagreement = seen_below = False
    own_flags = []
    for method in ("linear", "ties", "auto"):
        answer = client.predict(handle_file(str(noise)), service.tasks, method, True, api_name="/predict")
        assert answer["ok"] and set(answer["in_domain"]) == set(service.tasks)
        page = render_markdown(answer)
        for task in service.tasks:
            check, side, stored = answer["in_domain"][task], answer["compare"][task], answer["stored_accuracy"][task]
            assert isinstance(check["in_domain"], bool) and 0 < check["threshold"] < 1
            assert check["confidence"] == pytest.approx(answer["predictions"][task][0][1])
            assert (check["message"] is not None and check["message"] in page) == (not check["in_domain"])
            assert side["agrees"] == (side["top"][0][0] == answer["predictions"][task][0][0])
            assert side["merged_below_head"] == (stored["merged"] < stored["head"])
            seen_disagreement |= not side["agrees"]
            seen_below |= side["merged_below_head"]
            # the own adapter's flag: its own calibration (not the merge's), its own top probability
            own = side["in_domain"]
            assert own["threshold"] == service.single_thresholds(task)[task]["threshold"] != check["threshold"]
            assert own["confidence"] == pytest.approx(side["top"][0][1])
            assert own["in_domain"] == (own["confidence"] >= own["threshold"])
            own_flags.append(not own["in_domain"])
        rows = {line.split("**")[1]: line for line in page.splitlines() if line.startswith("| **")}
        for task in service.tasks:
            side = answer["compare"][task]
            assert ("disagrees with the merged answer" in rows[task]) == (not side["agrees"])
            assert ("below the head" in rows[task]) == side["merged_below_head"]
            own = side["in_domain"]
            assert (own["message"] is not None and own["message"] in rows[task]) == (not own["in_domain"])
            if not own["in_domain"]:
                assert own["message"].startswith(f"this image does not look like {task} data")
            merged_flagged = not answer["in_domain"][task]["in_domain"]
            assert rows[task].count("most likely (not confident)") == merged_flagged + (not own["in_domain"])
        assert any(not c["in_domain"] for c in answer["in_domain"].values()), "noise passed as every task's data"
    assert seen_disagreement or seen_below, "no flag was exercised (expected on noise with a tiny study)"
    assert any(own_flags), "noise passed as every task's data for every own adapter"


@pytest.mark.multiprocess
def test_merged_model_downloads_as_the_zip_merge_py_writes(app_url, service, tmp_path):
    """Issue 17: the endpoint `export_merged` (the page's "Build the zip") gives the folder merging/merge.py
    writes for the same merge (file for file, byte for byte but merge.json's timing), and that folder loaded
    back with peft answers like the served merged model (linear merge of three rank-4 adapters: rank <= 12,
    exported at rank 32, so exact up to float32 and BatchNorm folding: logits within 1e-4)."""
    from gradio_client import Client
    from peft import PeftModel

    from merging.merge import main as merge_main
    from mlvision.backbone import BackboneConfig, create_backbone
    from mlvision.models import MultiTaskModel, load_head, read_meta

    zip_path, line = Client(app_url, verbose=False).predict(service.tasks, "linear", 32, api_name="/export_merged")
    name = Path(zip_path).stem
    assert name == f"merged_linear_{'+'.join(service.tasks)}_rank32" and f"`{name}.zip`" in line
    assert "relative reconstruction error of the LoRA 0.0000" in line and tempfile.gettempdir() not in line
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp_path / "unzipped")
    folder = tmp_path / "unzipped" / name
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    heads = [f"heads/{task}/{file}" for task in service.tasks for file in ("head.safetensors", "task.json")]
    expected = [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "merge.json",
        *heads,
    ]  # README: the model card (merging/card.py)
    assert files == sorted(expected), files
    info = json.loads((folder / "merge.json").read_text())
    assert info["method"] == "linear" and info["tasks"] == service.tasks and info["export_rank"] == 32
    assert info["relative_error"] < 1e-4

    cli = tmp_path / "cli"
    params = [arg for key, value in info["hyperparams"].items() for arg in ("--param", f"{key}={json.dumps(value)}")]
    adapters = [str(service.adapters[task].path) for task in service.tasks]
    assert merge_main([*adapters, "--method", "linear", *params, "--rank", "32", "--out", str(cli)]) == 0
    assert sorted(str(p.relative_to(cli)) for p in cli.rglob("*") if p.is_file()) == files
    for file in files:
        if file != "merge.json":
            assert (folder / file).read_bytes() == (cli / file).read_bytes(), file
    cli_info = json.loads((cli / "merge.json").read_text())
    assert {**cli_info, "merge_seconds": 0} == {**info, "merge_seconds": 0}

    config = BackboneConfig(**info["backbone"])
    backbone = PeftModel.from_pretrained(create_backbone(config), str(folder)).eval()
    heads = {task: load_head(folder / "heads" / task, read_meta(folder / "heads" / task)) for task in service.tasks}
    loaded = MultiTaskModel(backbone, heads).eval()
    served = service.merged_model(service.tasks, "linear")[0].model
    images = service.preprocess([load_task(task)["test"][0]["image"] for task in service.tasks])
    with torch.inference_mode():
        got, want = loaded(images), served(images)
    for task in service.tasks:
        assert torch.allclose(got[task], want[task], atol=1e-4), (task, (got[task] - want[task]).abs().max())

    # one task is exported as it is served: its own adapter; a rank out of range is one line
    own_zip, _ = service.export_zip([service.tasks[0]], "auto", 8, tmp_path)
    with zipfile.ZipFile(own_zip) as archive:
        own = json.loads(archive.read(f"{own_zip.stem}/merge.json"))
    assert own["method"] == "own adapter" and own["tasks"] == [service.tasks[0]]
    with pytest.raises(MergeConfigError, match=r"^Export rank 100000 is outside 1 to \d+ .*: choose a rank"):
        service.export_zip(service.tasks, "linear", 100_000, tmp_path)


# -- issue 28: a quiet log, a bounded upload folder, the study's method served ------------------------
@pytest.mark.multiprocess
def test_bad_values_and_requests_get_one_log_line_each_and_no_traceback(app_url, service, example, capfd):
    """Values of the wrong type or unknown names, sent to every event (named or by index), and requests Gradio itself
    fails on: each answered in one line, each one line in the server's log, no traceback anywhere."""
    import httpx
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    image = handle_file(str(example))
    capfd.readouterr()
    bad_predictions = [
        (image, "uci_digits", "auto", False),  # tasks not a list
        (image, [1, 2], "auto", False),
        (image, ["no_such_task"], "auto", False),
        (image, service.tasks, 123, False),  # method not a name
        (image, service.tasks, "no_such_method", False),
        (image, service.tasks, "auto", "yes"),  # compare not a boolean
        (None, service.tasks, "auto", False),
    ]
    for args in bad_predictions:
        answer = client.predict(*args, api_name="/predict")
        assert isinstance(answer, dict) and not answer["ok"] and answer["error"], args
    for rank in ("abc", 10**9, -1):
        zip_path, line = client.predict(service.tasks, "auto", rank, api_name="/export_merged")
        assert zip_path is None and "Export rank" in line, (rank, line)
    http = httpx.Client(base_url=app_url, timeout=30)
    unknown_event = http.post("gradio_api/queue/join", json={"data": [], "fn_index": 999, "session_hash": "abcde"})
    assert unknown_event.status_code == 400
    wrong_shape = http.post(  # the private task-choice event, by index, with a number where a list belongs
        "gradio_api/queue/join", json={"data": [1], "fn_index": 0, "trigger_id": 1, "session_hash": "abcdef"}
    )
    assert wrong_shape.status_code == 200
    time.sleep(1.0)  # the queued event runs
    try:  # the event stream of an unknown session: Gradio gives up after starting it, so the stream just ends
        http.get("gradio_api/queue/data", params={"session_hash": "no-such-session"}, timeout=5)
    except httpx.HTTPError:
        pass
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, (out + err)[-3000:]
    refusals = [line for line in err.splitlines() if line.startswith("[demo] refused")]
    assert len(refusals) >= len(bad_predictions) + 3 + 3, err[-3000:]
    assert any("queue/join" in line for line in refusals) and any("task choice" in line for line in refusals)
    assert client.predict(image, service.tasks, "auto", False, api_name="/predict")["ok"]  # and it keeps serving


@pytest.mark.multiprocess
def test_accepted_uploads_are_kept_under_the_cap(app, app_url, service, example):
    """One request of 40 files (the upload route takes many): the janitor deletes the oldest while the uploads hold
    more than the cap; the example gallery's files are not uploads and stay; predictions go on."""
    import httpx
    from gradio_client import Client, handle_file

    cap, app.janitor.cap_bytes = app.janitor.cap_bytes, 2 * 2**20
    try:
        chunk = 256 * 1024
        files = [("files", (f"upload_{i}.png", bytes([i]) * chunk, "image/png")) for i in range(40)]  # 10 MB
        stored = httpx.post(app_url + "gradio_api/upload", files=files, timeout=60).json()
        assert len(stored) == 40

        def held() -> int:
            return sum(Path(p).stat().st_size for p in stored if Path(p).exists())

        # the janitor swept when the upload request ended (and sweeps every 2 s on its own thread)
        assert held() <= 2 * 2**20 and sum(Path(p).exists() for p in stored) <= 8
        kept = [path for block in app.blocks.values() for path in getattr(block, "keep_in_cache", ())]
        assert kept and all(Path(p).exists() for p in kept), "a file Gradio keeps (the examples) was deleted"
    finally:
        app.janitor.cap_bytes = cap
    components = {c["props"].get("elem_id"): c for c in Client(app_url, verbose=False).config["components"]}
    for item in components["examples"]["props"]["value"]:
        assert httpx.get(item["image"]["url"], timeout=30).status_code == 200
    answer = Client(app_url, verbose=False).predict(
        handle_file(str(example)), service.tasks, "auto", False, api_name="/predict"
    )
    assert answer["ok"]


@pytest.mark.multiprocess
def test_an_upload_request_larger_than_one_file_is_refused_and_nothing_is_kept(app, app_url):
    """Gradio's upload route takes up to 1,000 files per request, each under the per-file limit: a request whose body
    is larger than one allowed file is refused (413), by its length or as it streams in, and leaves no file."""
    import httpx

    def uploads_held() -> int:
        return sum(Path(p).stat().st_size for p in list(app.upload_file_set) if Path(p).exists())

    before = uploads_held()
    files = [("files", (f"part_{i}.png", bytes([i]) * 2**20, "image/png")) for i in range(30)]  # 30 MB
    response = httpx.post(app_url + "gradio_api/upload", files=files, timeout=60)
    assert response.status_code == 413 and "one image" in response.text

    def chunks():  # no Content-Length: the body is counted as it streams in
        boundary = b"--edge\r\n"
        yield boundary + b'Content-Disposition: form-data; name="files"; filename="s.png"\r\n\r\n'
        for _ in range(40):
            yield b"\0" * 2**20

    response = httpx.post(
        app_url + "gradio_api/upload",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=edge"},
        timeout=60,
    )
    assert response.status_code == 413
    assert uploads_held() <= before


@pytest.fixture(scope="module")
def committed_service() -> DemoService:
    """The demo's service on the committed study (results.duckdb and artifacts/), read-only."""
    from mlvision.paths import DEFAULT_DB_PATH

    before = DEFAULT_DB_PATH.read_bytes()
    service = DemoService(DEFAULT_DB_PATH, device="cpu")
    yield service
    assert DEFAULT_DB_PATH.read_bytes() == before, "the demo wrote to the committed results.duckdb"


def test_auto_serves_the_studys_choice_and_its_regmean_is_the_merge_the_study_scored(committed_service):
    """The committed study chose RegMean on validation at every k: `auto` serves it (its Gram matrices from the
    cache or computed at start-up), and the served model of a stored RegMean merge gets exactly the test images
    right that the study's merge got right; AdaMerging, stored with its learned coefficients, is offered."""
    from mlvision.paths import DEFAULT_DB_PATH
    from mlvision.store import unpack_correct

    service = committed_service
    store = Store(DEFAULT_DB_PATH)
    chosen = {
        int(k): method
        for method, k in (
            row[0].split("/k=") for row in store.query("SELECT statistic FROM findings WHERE finding = 'chosen_method'")
        )
    }
    assert set(chosen) == set(range(2, len(service.tasks) + 1))
    for k, method in chosen.items():
        served, why = service.default_method(service.tasks[:k])
        assert served == method and "the study's choice" in why, (k, served, why)
    rows = store.query(
        "SELECT tasks, task, n, merged_correct, hyperparams FROM merge_results "
        "WHERE method = 'regmean' AND k = 2 AND seed = ? ORDER BY tasks, task LIMIT 2",
        [service.seed],
    )
    group = rows[0][0].split(",")
    entry, _ = service.merged_model(group, "regmean")
    assert entry.hyperparams["alpha"] == json.loads(rows[0][4])["alpha"]
    for _, task, n, stored, _ in rows:
        images, labels = split_tensors(task, "test", service.preprocess, n)
        with torch.inference_mode():
            predicted = entry.model(images)[task].argmax(dim=-1).numpy()
        assert (predicted == labels.numpy()).tolist() == unpack_correct(stored, n).tolist(), task
    # study v3 merged AdaMerging again, storing its learned coefficients: its stored pairs can be served
    assert service.unavailable(group, "adamerging") is None and "adamerging" in service.offered(group)


@pytest.mark.multiprocess
def test_the_app_serves_the_stored_merge_plan_each_task_by_its_group_s_backbone(app_url, service, example, tiny_study):
    """Endpoint `predict_plan`: the tiny study's plan at 90 % (run_all's plan stage stored it), every task answered
    by its planned group's merged backbone (its own adapter alone), as `predict` answers for that group."""
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    answer = client.predict(handle_file(str(example)), 0.9, "ties", api_name="/predict_plan")
    assert answer["ok"], answer
    stored = Store(tiny_study["db"]).query_df(
        "SELECT group_index, group_tasks, task, predicted FROM merge_plans "
        "WHERE kind = 'target' AND target = 0.9 AND method = 'ties' ORDER BY group_index, task"
    )
    groups = [tuple(g.split(",")) for g in stored.drop_duplicates("group_index")["group_tasks"]]
    assert answer["backbones"] == len(groups) and [tuple(b["tasks"]) for b in answer["groups"]] == groups
    assert answer["elapsed_ms"] == pytest.approx(sum(b["elapsed_ms"] for b in answer["groups"]))
    assert answer["predicted_retention"] == pytest.approx(dict(zip(stored["task"], stored["predicted"])))
    image = Image.open(example)
    for group in groups:
        alone = service.predict(image, list(group), "ties" if len(group) > 1 else None)
        for task in group:
            assert answer["predictions"][task][0][0] == alone.predictions[task][0][0]
            assert answer["predictions"][task][0][1] == pytest.approx(alone.predictions[task][0][1], abs=1e-5)
    for target, method, message in (
        (0.42, "auto", "Unknown plan target"),
        (0.9, "no_such", "No stored plan of no_such at 90%"),
    ):
        refused = client.predict(handle_file(str(example)), target, method, api_name="/predict_plan")
        assert not refused["ok"] and message in refused["error"], refused
        assert not PATH_LIKE.search(refused["error"])
    assert client.predict(handle_file(str(example)), 0.9, "auto", api_name="/predict_plan")["ok"]
