"""Gradio demo: one merged multi-task model answers every task for an uploaded image.

    python demo/app.py [--host 127.0.0.1] [--port 7860] [--db results.duckdb]

The named API endpoint `predict` (see README) takes (image file, tasks, method, compare) and
returns JSON; the page renders that JSON. Model logic lives in demo/service.py (no Gradio).

Serving many visitors at once: up to PREDICT_CONCURRENCY predictions are in progress together
(each decodes its upload in its own thread), and the service runs the forward passes of those
that wait at the same moment as one batched pass. Uploads are limited to MAX_FILE_BYTES by Gradio
itself (refused while streaming, nothing kept on disk), and no error shows a traceback or a server
path to a visitor. `python demo/load_test.py` measures it under 50 simultaneous clients.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import gradio as gr  # noqa: E402

from demo.service import BATCH_MAX, BATCH_WAIT_S, DemoService  # noqa: E402
from demo.uploads import ACCEPTED, MAX_FILE_BYTES, MAX_FRAMES, MAX_PIXELS, load_image, public_text  # noqa: E402
from mlvision.errors import BadImage  # noqa: E402
from mlvision.paths import DEFAULT_DB_PATH  # noqa: E402

AUTO = "auto"
# Predictions in progress at once. Each one mostly waits (its upload is decoded in its own thread,
# then it waits for the shared batched pass), so this is about how many can join one batch.
PREDICT_CONCURRENCY = BATCH_MAX
OTHER_CONCURRENCY = 4  # the page's cheap events (method hint, preview)
QUEUE_SIZE = 256  # requests waiting beyond the ones in progress; more get Gradio's "queue full" message


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _top_cell(top) -> str:
    return "<br>".join(
        f"{'**' if i == 0 else ''}{label}{'**' if i == 0 else ''} {100 * prob:.1f}%"
        for i, (label, prob) in enumerate(top)
    )


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
    for task in result["tasks"]:
        row = f"| **{task}** | {_top_cell(result['predictions'][task])} |"
        if compare:
            side = compare[task]
            row += f" {_top_cell(side['top'])}<br>_{side['elapsed_ms']:.1f} ms_ |"
        stored = result["stored_accuracy"].get(task)
        row += (
            f" {_pct(stored['merged'])} / {_pct(stored['single'])} / {_pct(stored['head'])} |"
            if stored
            else " not in results.duckdb (this merge was not swept) |"
        )
        lines.append(row)
    if compare:
        total = sum(side["elapsed_ms"] for side in compare.values())
        lines.append(
            f"\nSeparate adapters: {len(compare)} forward passes, {total:.1f} ms in all, "
            f"against {result['elapsed_ms']:.1f} ms for the merged model."
        )
    return "\n".join(lines)


def write_examples(service: DemoService, folder: Path) -> list[list]:
    """One test image per task (from the task's test split), saved as PNG for gr.Examples."""
    from mlvision.tasks import load_task

    examples = []
    folder.mkdir(parents=True, exist_ok=True)
    for task in service.tasks:
        try:
            image = load_task(task)["test"][0]["image"]
            path = folder / f"{task}.png"
            image.save(path)
            examples.append([str(path)])
        except Exception as error:  # noqa: BLE001 - an example is optional; the demo still works
            print(f"[demo] no example image for {task}: {error}", file=sys.stderr)
    return examples


def build_demo(service: DemoService, examples: list[list] | None = None) -> gr.Blocks:
    def predict(image, tasks, method, compare):
        """Named API endpoint: JSON with top-3 labels per task, timing and stored accuracies.

        Never raises: bad uploads come back as {"ok": False, "error": ...}, and so does anything
        unexpected (its traceback goes to the server's log only). Error texts pass `public_text`,
        so no server path reaches the visitor.
        """
        path = image.get("path") if isinstance(image, dict) else image
        try:
            result = service.predict_json(path, tasks or None, method or AUTO, bool(compare))
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
            gr.Warning(result["error"])
        return result

    def show(image, result):
        preview = None
        if result and result.get("ok"):
            try:
                preview = load_image(image.get("path") if isinstance(image, dict) else image)[0]
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

    with gr.Blocks(title="Multi-LoRA Vision demo") as demo:
        gr.Markdown(
            f"# Multi-LoRA Vision: one merged model, every task\n"
            f"One LoRA adapter per task (seed {service.seed}) on `{service.backbone_config.name}` at "
            f"{service.preprocess.image_size}px, merged into a single backbone: "
            "**one forward pass answers every task**. "
            f"Running on **{service.device.type.upper()}**"
            f"{' (' + __import__('torch').cuda.get_device_name(0) + ')' if service.device.type == 'cuda' else ''}. "
            f"Results database: `{service.db_path.name}`."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label=f"Image ({ACCEPTED}; up to {MAX_FILE_BYTES // 2**20} MB)", type="filepath")
                tasks = gr.CheckboxGroup(service.tasks, value=service.tasks, label="Adapters to merge (tasks)")
                method = gr.Dropdown([AUTO, *service.methods], value=AUTO, label="Merge method")
                hint = gr.Markdown(method_hint(service.tasks))
                compare = gr.Checkbox(False, label="Compare with each task's own adapter (one pass per task)")
                button = gr.Button("Predict", variant="primary")
                if examples:
                    gr.Examples(examples, inputs=[image], label="Examples (one test image per task)")
            with gr.Column(scale=2):
                preview = gr.Image(
                    label="Image as the model sees it (before resizing)", type="pil", height=200, interactive=False
                )
                output = gr.Markdown(elem_id="prediction")
                raw = gr.JSON(label="API answer (endpoint `predict`)")
        tasks.change(method_hint, tasks, hint, api_visibility="private")
        button.click(
            predict, [image, tasks, method, compare], raw, api_name="predict", concurrency_limit=PREDICT_CONCURRENCY
        ).then(show, [image, raw], [output, preview], api_visibility="private")
    demo.queue(default_concurrency_limit=OTHER_CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, **options):
    """`demo.launch` with the demo's limits, for `main` and the tests alike.

    max_file_size: Gradio refuses a larger upload while it streams in (HTTP 413) and deletes the part
    it wrote, so a 200 MB upload never lands on disk; the same figure as load_image's own check.
    show_error=False: an exception that escapes an event (none should) shows a generic error, never
    its text, which may name server paths.
    """
    return demo.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_BYTES, show_error=False, **options)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--host",
        default=os.environ.get("MLV_DEMO_HOST") or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        help="default 127.0.0.1 ($GRADIO_SERVER_NAME on a Hugging Face Space)",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("MLV_DEMO_PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860)
    )
    parser.add_argument("--db", default=os.environ.get("MLV_DB", str(DEFAULT_DB_PATH)))
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    args = parser.parse_args(argv)
    try:
        service = DemoService(args.db, device=args.device)
    except Exception as error:  # noqa: BLE001
        print(f"error: cannot start the demo: {error}", file=sys.stderr)
        return 2
    examples = write_examples(service, Path(tempfile.mkdtemp(prefix="mlv_demo_examples_")))
    demo = build_demo(service, examples)
    print(settings_line(service), flush=True)
    launch(demo, args.host, args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
