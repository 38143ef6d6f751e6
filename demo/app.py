"""Gradio demo: one merged multi-task model answers every task for an uploaded image.

    python demo/app.py [--host 127.0.0.1] [--port 7860] [--db results.duckdb]
    python demo/app.py --adapters my_adapters/ hub:user/adapter [--base timm/NAME] [--labels ADAPTER=FILE]

The named API endpoint `predict` (see README) takes (image file, tasks, method, compare) and
returns JSON; the page renders that JSON. Clicking an example thumbnail runs the same chain on that
image. The endpoint `export_merged` takes (tasks, method, rank) and returns a zip of the merged
model, the folder merging/merge.py writes. Model logic lives in demo/service.py (no Gradio).

Serving many visitors at once: up to PREDICT_CONCURRENCY predictions are in progress together
(each decodes its upload in its own thread), and the service runs the forward passes of those
that wait at the same moment as one batched pass. Uploads are limited to MAX_FILE_BYTES by Gradio
itself (refused while streaming, nothing kept on disk), and no error shows a traceback or a server
path to a visitor. `python demo/load_test.py` measures it under 50 simultaneous clients.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def default_host() -> str:
    return os.environ.get("MLV_DEMO_HOST") or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"


def default_port() -> int:
    return int(os.environ.get("MLV_DEMO_PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860)


def port_taken(host: str, port: int) -> bool:
    """Whether `port` on `host` cannot be bound (another server holds it); checked as uvicorn binds."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def port_message(host: str, port: int) -> str:
    return (
        f"error: port {port} on {host} is already in use: start the demo on another one with --port PORT "
        "(or $MLV_DEMO_PORT)"
    )


def refuse_taken_port(argv: list[str]) -> None:
    """Run as a script: a taken port is refused in one line BEFORE the imports below (torch and Gradio take
    seconds to import, the adapters longer to load); `main` checks again for callers that import this module."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default=default_host())
    parser.add_argument("--port", type=int, default=default_port())
    args, _ = parser.parse_known_args(argv)
    if port_taken(args.host, args.port):
        print(port_message(args.host, args.port), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    refuse_taken_port(sys.argv[1:])

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from demo.batcher import BATCH_MAX, BATCH_WAIT_S  # noqa: E402
from demo.guards import RefusedRequests, UploadJanitor, UploadLimit, refused  # noqa: E402
from demo.service import EXPORT_RANK, DemoService  # noqa: E402
from demo.uploads import ACCEPTED, MAX_FILE_BYTES, MAX_FRAMES, MAX_PIXELS, load_image, public_text  # noqa: E402
from mlvision.errors import BadImage, MLVisionError  # noqa: E402
from mlvision.paths import DEFAULT_DB_PATH  # noqa: E402

AUTO = "auto"
# Predictions in progress at once. Each one mostly waits (its upload is decoded in its own thread,
# then it waits for the shared batched pass), so this is about how many can join one batch.
PREDICT_CONCURRENCY = BATCH_MAX
OTHER_CONCURRENCY = 4  # the page's cheap events (method hint, preview)
QUEUE_SIZE = 256  # requests waiting beyond the ones in progress; more get Gradio's "queue full" message
PREVIEW_PX = 192  # the model's view is enlarged to this many pixels (nearest neighbour: its pixels stay visible)
# Building a merged-model zip is seconds of CPU (an SVD per layer): one at a time, so predictions keep their cores.
EXPORT_CONCURRENCY = 1
EXPORT_KEEP_S = 600  # a built zip stays on the server this long (Gradio serves its own copy from its cache)
# Accepted uploads stay on the server for UPLOAD_KEEP_S (so Predict can be clicked again with the same file; Gradio's
# cleanup checks every CLEANUP_EVERY_S), and all of them together never hold more than UPLOAD_CAP_BYTES (the oldest
# go first; demo/guards.py): the folder stays bounded whatever visitors send.
UPLOAD_KEEP_S = 600
CLEANUP_EVERY_S = 60
UPLOAD_CAP_BYTES = 256 * 2**20
UPLOAD_FRAMING_BYTES = 64 * 1024  # an upload request's multipart framing beside its one file (see UploadLimit)
# Example thumbnails are small images (8x8 digits) shown large: keep their pixels sharp instead of blurred.
CSS = "#examples img { image-rendering: pixelated; }"
# With many tasks (the twenty-task pool) the example gallery wraps into rows of this many thumbnails (what fits the
# left column at 1400 px: Gradio's thumbnails keep a minimum size), and the list of what each task is starts
# folded: the upload box and the answer stay on the first screen.
EXAMPLE_COLUMNS = 3
UNFOLDED_TASK_LIST = 6


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _top_cell(top) -> str:
    return "<br>".join(
        f"{'**' if i == 0 else ''}{label}{'**' if i == 0 else ''} {100 * prob:.1f}%"
        for i, (label, prob) in enumerate(top)
    )


def _answer_cell(top, check: dict | None) -> str:
    """A model's top-3 for one task; an answer flagged out-of-domain is shown as the warning and a guess, never
    as a confident label (the same for the merged model and, in compare mode, the task's own adapter)."""
    check = check or {}
    if check.get("in_domain") is False:
        return f"⚠️ {check['message']}<br>_most likely (not confident):_ " + _top_cell(top).replace("**", "")
    cell = _top_cell(top)
    if check.get("in_domain") is None and check.get("message"):
        cell += f"<br>_({check['message']})_"
    return cell


def render_markdown(result: dict) -> str:
    """The page's view of one `predict` answer."""
    if not result:
        return ""
    if not result.get("ok"):
        return f"### ⚠️ {result.get('error', 'The request failed.')}"
    compare = result.get("compare")
    lines = [
        f"**Method:** `{result['method']}` ({result['method_source']}) · **tasks:** {len(result['tasks'])} · "
        f"**one forward pass:** {result['elapsed_ms']:.1f} ms on **{result['device']}**"
    ]
    if result.get("merge_build_seconds") is not None:
        lines[0] += f" · merge built in {result['merge_build_seconds']:.2f} s (now cached)"
    for note in result.get("notes") or []:
        lines.append(f"> ℹ️ {note}")
    header = "| task | merged model: top 3 |"
    rule = "|---|---|"
    if compare:
        header += " own adapter: top 3 |"
        rule += "---|"
    header += " stored test accuracy: merged / single adapter / head |"
    rule += "---|"
    lines += ["", header, rule]
    domain = result.get("in_domain") or {}
    for task in result["tasks"]:
        row = f"| **{task}** | {_answer_cell(result['predictions'][task], domain.get(task))} |"
        if compare:
            side = compare[task]
            flag = "" if side.get("agrees", True) else "<br>⚠️ **disagrees with the merged answer**"
            row += f" {_answer_cell(side['top'], side.get('in_domain'))}<br>_{side['elapsed_ms']:.1f} ms_{flag} |"
        stored = result["stored_accuracy"].get(task)
        row += (
            f" {_pct(stored['merged'])} / {_pct(stored['single'])} / {_pct(stored['head'])} |"
            if stored
            else " not in results.duckdb (this merge was not swept) |"
        )
        if compare and compare[task].get("merged_below_head"):
            row = row[:-1] + "<br>⚠️ merged accuracy below the head alone's (frozen backbone + this head) |"
        lines.append(row)
    if compare:
        total = sum(side["elapsed_ms"] for side in compare.values())
        lines.append(
            f"\nSeparate adapters: {len(compare)} forward passes, {total:.1f} ms in all, "
            f"against {result['elapsed_ms']:.1f} ms for the merged model."
        )
    return "\n".join(lines)


def render_plan_markdown(result: dict) -> str:
    """The page's view of one `predict_plan` answer: each backbone's tasks, answers and pass time."""
    if not result:
        return ""
    if not result.get("ok"):
        return f"### ⚠️ {result.get('error', 'The request failed.')}"
    lines = [
        f"**Merge plan:** every task keeps {result['target']:.0%} (predicted) with `{result['method']}` · "
        f"**{result['backbones']} backbone(s)**, one pass each: {result['elapsed_ms']:.1f} ms in all on "
        f"**{result['device']}**",
        "",
        "| backbone | task | top 3 | retention: predicted / measured |",
        "|---|---|---|---|",
    ]
    for note in result.get("notes") or []:
        lines.insert(1, f"> ℹ️ {note}")
    for index, backbone in enumerate(result["groups"], 1):
        for task in backbone["tasks"]:
            where = "own adapter" if len(backbone["tasks"]) == 1 else f"{index} ({backbone['elapsed_ms']:.1f} ms)"
            retention = (
                f"{_pct(result['predicted_retention'].get(task))} / {_pct(result['measured_retention'].get(task))}"
            )
            lines.append(f"| {where} | **{task}** | {_top_cell(result['predictions'][task])} | {retention} |")
    return "\n".join(lines)


def plan_target(service: DemoService, target) -> float:
    """A `predict_plan` request's target, one of the stored plans' (a number or its text); else one line."""
    try:
        value = float(target)
    except (TypeError, ValueError):
        value = None
    if value is None or not any(abs(value - t) < 1e-9 for t in service.plan_targets()):
        stored = (
            ", ".join(str(t) for t in service.plan_targets()) or "none: run `python training/run_all.py --stages plan`"
        )
        raise BadImage(f"Unknown plan target {str(target)[:40]!r}; stored plans keep {stored}.")
    return value


def method_choices(service: DemoService, tasks) -> list[tuple[str, str]]:
    """The method list for a group: `auto` (naming what it serves) and every method that can serve the group."""
    try:
        best, _ = service.default_method(tasks)
        offered = service.offered(tasks)
    except Exception:  # noqa: BLE001 - no task chosen: nothing to mark
        best, offered = None, service.methods
    return [(f"auto (= {best})" if best else AUTO, AUTO)] + [
        (f"{name} ← auto" if name == best else name, name) for name in offered
    ]


def not_offered_line(service: DemoService, tasks) -> str:
    """One line: the registered methods that cannot serve this group, each with its reason."""
    try:
        reasons = service.not_offered(tasks or service.tasks)
    except Exception:  # noqa: BLE001 - an unknown group: nothing to explain
        return ""
    if not reasons:
        return "Every registered merge method can serve these tasks."
    return "Not offered for these tasks: " + "; ".join(f"`{name}` {why}" for name, why in reasons.items()) + "."


def request_values(service: DemoService, tasks, method, compare=False) -> tuple[list[str] | None, str, bool]:
    """(tasks, method, compare) of an API call, checked here instead of by Gradio's components (the events run with
    preprocess=False: a component's check prints a traceback for a value of the wrong type; this answers in one
    line). Task names and methods are then checked by the service."""
    if tasks is not None and (
        isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks)
    ):
        raise BadImage(f"tasks must be a list of task names (any of: {', '.join(service.tasks)}).")
    if method is not None and not isinstance(method, str):
        raise BadImage(f"method must be a name: auto or one of {', '.join(service.methods)}.")
    if compare is not None and not isinstance(compare, bool):
        raise BadImage("compare must be true or false.")
    return (list(tasks) if tasks else None), (method or AUTO), bool(compare)


def task_lines(service: DemoService) -> str:
    return "\n".join(f"- {service.describe_task(task)}" for task in service.tasks)


def write_examples(service: DemoService, folder: Path) -> list[tuple[str, str]]:
    """One test image per task (the first of its test split, at its native size), saved as PNG: a list of
    (file, task), the example gallery's value (the task is the thumbnail's caption)."""
    examples = []
    folder.mkdir(parents=True, exist_ok=True)
    for task in service.tasks:
        try:
            image = service.example_image(task)
            if image is None:  # adapters trained elsewhere: their data is not here
                continue
            path = folder / f"{task.replace(':', '_').replace('/', '_')}.png"
            image.save(path)
            examples.append((str(path), task))
        except Exception as error:  # noqa: BLE001 - an example is optional; the demo still works
            print(f"[demo] no example image for {task}: {error}", file=sys.stderr)
    return examples


def export_line(zip_path: Path, relative_error: float) -> str:
    """One line under the download: what the zip holds (no server path: the file's name only)."""
    size_mb = zip_path.stat().st_size / 2**20
    return (
        f"`{zip_path.name}` ({size_mb:.1f} MB): a peft LoRA folder (`adapter_config.json`, "
        "`adapter_model.safetensors`), one head per task under `heads/`, and `merge.json` (method, "
        f"hyperparameters, tasks, preprocessing); relative reconstruction error of the LoRA {relative_error:.4f}. "
        "The same folder `python merging/merge.py` writes."
    )


def prune_exports(folder: Path, keep_s: float = EXPORT_KEEP_S) -> None:
    """Delete built zips older than `keep_s` (Gradio has copied each one into its own cache by then)."""
    for old in folder.glob("mlv_export_*"):
        try:
            if time.time() - old.stat().st_mtime > keep_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def build_demo(service: DemoService, examples: list[tuple[str, str]] | None = None) -> gr.Blocks:
    exports = Path(tempfile.mkdtemp(prefix="mlv_demo_exports_"))  # the built zips (see `export`)
    atexit.register(shutil.rmtree, exports, True)

    def predict(image, tasks, method, compare):
        """Named API endpoint: JSON with top-3 labels per task, timing and stored accuracies.

        Never raises: bad uploads and bad values come back as {"ok": False, "error": ...} (one line in the
        server's log), and so does anything unexpected (its traceback goes to the server's log only). Error
        texts pass `public_text`, so no server path reaches the visitor.
        """
        path = image.get("path") if isinstance(image, dict) else image
        try:
            if path is not None and not isinstance(path, str):
                raise BadImage(f"The image must be an uploaded file ({ACCEPTED}).")
            chosen, method, compare = request_values(service, tasks, method, compare)
            result = service.predict_json(path, chosen, method, compare)
        except BadImage as error:
            result = {"ok": False, "error": str(error), "device": service.device.type}
        except Exception as error:  # noqa: BLE001 - a failing request never takes the app down
            traceback.print_exc()
            result = {
                "ok": False,
                "error": f"Internal error ({type(error).__name__}) while answering this request; "
                "the demo keeps running: try again or with another image.",
                "device": service.device.type,
            }
        if not result.get("ok"):
            result["error"] = public_text(result.get("error", "The request failed."))
            refused("predict", result["error"])
            gr.Warning(result["error"])
        return result

    def predict_plan(image, target, method):
        """Named API endpoint `predict_plan`: every task answered by its backbone in the stored merge plan at `target`
        (JSON like `predict`'s; errors as {"ok": False, "error": ...}, never a traceback)."""
        path = image.get("path") if isinstance(image, dict) else image
        try:
            if path is not None and not isinstance(path, str):
                raise BadImage(f"The image must be an uploaded file ({ACCEPTED}).")
            _, method, _ = request_values(service, service.tasks, method)
            result = service.predict_plan_json(path, plan_target(service, target), method)
        except BadImage as error:
            result = {"ok": False, "error": str(error), "device": service.device.type}
        except Exception as error:  # noqa: BLE001 - a failing request never takes the app down
            traceback.print_exc()
            result = {"ok": False, "error": f"Internal error ({type(error).__name__}); try again.",
                      "device": service.device.type}  # fmt: skip
        if not result.get("ok"):
            result["error"] = public_text(result.get("error", "The request failed."))
            refused("predict_plan", result["error"])
            gr.Warning(result["error"])
        return result

    def show_plan(result):
        return render_plan_markdown(result) if isinstance(result, dict) else ""

    def show(image, result):
        image = image.get("path") if isinstance(image, dict) else image
        if not isinstance(result, dict) or (image is not None and not isinstance(image, str)):
            refused("show", "a preview request that is not (an uploaded file, a predict answer)")
            return "", None
        preview = None
        if result and result.get("ok"):
            try:
                seen = service.model_view(load_image(image)[0])
                preview = seen.resize((PREVIEW_PX, PREVIEW_PX), Image.NEAREST)
            except BadImage:
                preview = None
        return render_markdown(result), preview

    def method_hint(tasks):
        if not tasks:
            return "Choose at least one task."
        try:
            method, why = service.default_method(tasks)
            return f"`auto` = **{method}** for this group ({why})."
        except Exception as error:  # noqa: BLE001
            return f"({error})"

    def on_tasks(chosen):
        try:
            chosen, _, _ = request_values(service, chosen, AUTO)
        except BadImage as error:
            refused("task choice", str(error))
            chosen = None
        group = chosen or service.tasks
        return (
            method_hint(chosen),
            gr.update(choices=method_choices(service, group)),
            not_offered_line(service, group),
        )

    def pick_example(selected: gr.SelectData):
        """The clicked thumbnail's image file into the upload box; the events chained after it then predict."""
        index = selected.index if isinstance(selected.index, int) else -1
        if not 0 <= index < len(examples):
            refused("example", f"no example number {selected.index!r}")
            return None
        return examples[index][0]

    def export(tasks, method, rank):
        """Named API endpoint `export_merged`: (the zip of the merged model, one line about it).

        An error is one line in that place (and a warning), never a traceback or a server path."""
        prune_exports(exports)
        try:
            chosen, method, _ = request_values(service, tasks, method)
            path, relative_error = service.export_zip(chosen, method, rank, exports)
            return str(path), export_line(path, relative_error)
        except MLVisionError as error:
            message = public_text(str(error))
            refused("export_merged", message)
        except Exception as error:  # noqa: BLE001 - a failing export never takes the app down
            traceback.print_exc()
            message = (
                f"Internal error ({type(error).__name__}) while building the zip; the demo keeps running: try again."
            )
        gr.Warning(message)
        return None, f"⚠️ {message}"

    with gr.Blocks(title="Multi-LoRA Vision demo", delete_cache=(CLEANUP_EVERY_S, UPLOAD_KEEP_S)) as demo:
        gr.Markdown(
            f"# Multi-LoRA Vision: one merged model, every task\n"
            f"{service.origin_line()} at {service.preprocess.image_size}px, merged into a single backbone: "
            "**one forward pass answers every task**. "
            f"Running on **{service.device.type.upper()}**"
            f"{' (' + __import__('torch').cuda.get_device_name(0) + ')' if service.device.type == 'cuda' else ''}. "
            f"{service.results_line()}"
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(
                    label=f"Image ({ACCEPTED}; up to {MAX_FILE_BYTES // 2**20} MB)", type="filepath", elem_id="upload"
                )
                gallery = None
                if examples:  # beside the upload box: the other way to give an image
                    rows = -(-len(examples) // EXAMPLE_COLUMNS)
                    gallery = gr.Gallery(
                        examples,
                        label="Examples: one test image per task (click one to predict it)",
                        columns=min(len(examples), EXAMPLE_COLUMNS),
                        height=170 if rows == 1 else min(40 + 115 * rows, 440),  # beyond: the gallery scrolls
                        object_fit="contain",
                        allow_preview=False,
                        interactive=False,
                        buttons=[],
                        elem_id="examples",
                    )
                tasks = gr.CheckboxGroup(service.tasks, value=service.tasks, label="Adapters to merge (tasks)")
                n_tasks = len(service.tasks)
                with gr.Accordion(
                    f"What each task is ({n_tasks})", open=n_tasks <= UNFOLDED_TASK_LIST, elem_id="task-list"
                ):
                    gr.Markdown(task_lines(service), elem_id="task-descriptions")
                method = gr.Dropdown(
                    method_choices(service, service.tasks), value=AUTO, label="Merge method", elem_id="method"
                )
                hint = gr.Markdown(method_hint(service.tasks))
                not_offered = gr.Markdown(not_offered_line(service, service.tasks), elem_id="not-offered")
                compare = gr.Checkbox(False, label="Compare with each task's own adapter (one pass per task)")
                button = gr.Button("Predict", variant="primary")
                targets = service.plan_targets()
                with gr.Accordion(
                    "Serve a merge plan (several backbones)", open=False, elem_id="plan", visible=bool(targets)
                ):
                    gr.Markdown(
                        "The study's merge planner (`python merging/plan.py`) groups the tasks into the fewest merged "
                        "backbones that each keep the target share of their own adapter's accuracy: one pass per "
                        "backbone, every task answered by its own group's merge (the method above; `auto`: the "
                        "study's choice where it has a plan)."
                    )
                    target = gr.Dropdown(
                        [(f"every task keeps {t:.0%}", t) for t in targets],
                        value=targets[0] if targets else None,
                        label="Plan",
                        elem_id="plan-target",
                    )
                    plan_button = gr.Button("Predict with the plan")
                    plan_raw = gr.JSON(visible=False)
                with gr.Accordion("Download the merged model (.zip)", open=False, elem_id="export"):
                    gr.Markdown(
                        "The chosen tasks merged with the chosen method (as served here), exported like "
                        "`python merging/merge.py`: a peft LoRA of this rank per layer (truncated SVD of the "
                        "merged update), the heads and the task metadata."
                    )
                    bound = service.max_export_rank()
                    rank = gr.Slider(1, bound, value=min(EXPORT_RANK, bound), step=1, label="LoRA rank of the export")
                    export_button = gr.Button("Build the zip")
                    merged_zip = gr.File(label="Merged model (.zip)", interactive=False, elem_id="merged-zip")
                    export_status = gr.Markdown(elem_id="export-status")
            with gr.Column(scale=2):
                size = service.preprocess.image_size
                preview = gr.Image(
                    label=f"Image as the model sees it (resized to {size}x{size} px, shown enlarged)",
                    type="pil",
                    height=200,
                    interactive=False,
                    elem_id="model-view",
                )
                output = gr.Markdown(elem_id="prediction")
                with gr.Accordion("API answer (JSON, endpoint `predict`)", open=False, elem_id="raw-json"):
                    raw = gr.JSON(label="API answer (endpoint `predict`)")
        # preprocess=False on every event with inputs: they are checked here (`request_values`), in one line, where
        # Gradio's component checks print a traceback for a value of the wrong type sent to any event by index
        tasks.change(on_tasks, tasks, [hint, method, not_offered], api_visibility="private", preprocess=False)
        button.click(
            predict,
            [image, tasks, method, compare],
            raw,
            api_name="predict",
            concurrency_limit=PREDICT_CONCURRENCY,
            preprocess=False,
        ).then(show, [image, raw], [output, preview], api_visibility="private", preprocess=False)
        if gallery is not None:  # a click on a thumbnail: that image into the box, then the same chain as Predict
            gallery.select(pick_example, None, image, api_visibility="private").then(
                predict,
                [image, tasks, method, compare],
                raw,
                api_visibility="private",
                concurrency_limit=PREDICT_CONCURRENCY,
                preprocess=False,
            ).then(show, [image, raw], [output, preview], api_visibility="private", preprocess=False)
        plan_button.click(
            predict_plan,
            [image, target, method],
            plan_raw,
            api_name="predict_plan",
            concurrency_limit=PREDICT_CONCURRENCY,
            preprocess=False,
        ).then(show_plan, plan_raw, output, api_visibility="private", preprocess=False)
        export_button.click(
            export,
            [tasks, method, rank],
            [merged_zip, export_status],
            api_name="export_merged",
            concurrency_limit=EXPORT_CONCURRENCY,
            preprocess=False,
        )
    demo.queue(default_concurrency_limit=OTHER_CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    upload_cap_bytes: int = UPLOAD_CAP_BYTES,
    **options,
):
    """`demo.launch` with the demo's limits, for `main` and the tests alike.

    max_file_size: Gradio refuses a larger upload while it streams in (HTTP 413) and deletes the part
    it wrote, so a 200 MB upload never lands on disk; the same figure as load_image's own check.
    show_error=False: an exception that escapes an event (none should) shows a generic error, never
    its text, which may name server paths. `RefusedRequests` turns a request Gradio fails on into a 400 and
    one log line; the `UploadJanitor` (`demo.janitor`) keeps the accepted uploads under `upload_cap_bytes`,
    sweeping after every upload request, and `UploadLimit` refuses an upload request larger than one file.
    """
    from starlette.middleware import Middleware

    demo.janitor = UploadJanitor(demo, upload_cap_bytes).start()
    return demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=MAX_FILE_BYTES,
        show_error=False,
        css=CSS,
        app_kwargs={
            "middleware": [
                Middleware(UploadLimit, max_bytes=MAX_FILE_BYTES + UPLOAD_FRAMING_BYTES, janitor=demo.janitor),
                Middleware(RefusedRequests),
            ]
        },
        **options,
    )


def settings_line(service: DemoService) -> str:
    """One line with the serving settings and the machine (printed at start-up; demo/load_test.py reads it)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"[demo] settings: predict concurrency {PREDICT_CONCURRENCY}, other events {OTHER_CONCURRENCY}, "
        f"queue size {QUEUE_SIZE}; batch up to {BATCH_MAX} images, waiting {BATCH_WAIT_S * 1000:.0f} ms; "
        f"uploads up to {MAX_FILE_BYTES / 2**20:.0f} MB, {MAX_PIXELS:,} pixels, {MAX_FRAMES:,} frames; "
        f"device {service.device.type}; torch threads {torch.get_num_threads()}; {cores} cores; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )


def make_service(args) -> DemoService:
    """The study's adapters from --db, or with --adapters the given ones (merging/sources.py `PeftAdapters`)."""
    if not args.adapters:
        return DemoService(args.db, device=args.device)
    from merging.sources import PeftAdapters

    labels = {}
    for item in args.labels:
        adapter, sep, file = item.rpartition("=")
        if not sep or not adapter or not file:
            raise ValueError(f"--labels '{item}' is not ADAPTER=FILE: write e.g. --labels my_adapter=labels.json")
        labels[adapter] = file
    return DemoService(PeftAdapters.from_arguments(args.adapters, base=args.base, labels=labels), device=args.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--host", default=default_host(), help="default 127.0.0.1 ($GRADIO_SERVER_NAME on a Hugging Face Space)"
    )
    parser.add_argument("--port", type=int, default=default_port(), help="default 7860 ($MLV_DEMO_PORT)")
    parser.add_argument("--db", default=os.environ.get("MLV_DB", str(DEFAULT_DB_PATH)))
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument(
        "--adapters",
        nargs="+",
        metavar="DIR_OR_HUB_ID",
        help="serve adapters trained elsewhere instead of the study's: peft LoRA folders of one transformers or timm "
        "model, folders of such folders, or hub:user/adapter (see merging/merge.py --help)",
    )
    parser.add_argument("--base", help="with --adapters: the base model of adapters whose config names none (timm)")
    parser.add_argument(
        "--labels",
        action="extend",
        nargs="+",
        default=[],
        metavar="ADAPTER=FILE",
        help="with --adapters: label names for an adapter that carries none; several pairs after one flag, or the "
        "flag repeated",
    )
    args = parser.parse_args(argv)
    if (args.base or args.labels) and not args.adapters:
        parser.error("--base and --labels go with --adapters")
    if port_taken(args.host, args.port):  # before minutes of loading, and without Gradio's traceback
        print(port_message(args.host, args.port), file=sys.stderr)
        return 2
    print("[demo] loading adapters ...", flush=True)
    try:
        service = make_service(args)
    except Exception as error:  # noqa: BLE001
        print(f"error: cannot start the demo: {error}", file=sys.stderr)
        return 2
    examples = write_examples(service, Path(tempfile.mkdtemp(prefix="mlv_demo_examples_")))
    demo = build_demo(service, examples)
    print(settings_line(service), flush=True)
    try:
        launch(demo, args.host, args.port, share=args.share, prevent_thread_lock=True)
    except OSError as error:  # taken meanwhile (Gradio: "Cannot find empty port ...")
        if "port" not in str(error).lower():
            raise
        print(port_message(args.host, args.port), file=sys.stderr)
        return 2
    print(f"[demo] ready: {demo.local_url}", flush=True)
    if getattr(demo, "share_url", None):
        print(f"[demo] public link: {demo.share_url}", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
