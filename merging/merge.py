"""Merge chosen adapters with a chosen method and save the result.

    python merging/merge.py ADAPTER_DIR [ADAPTER_DIR ...] --method ties --param density=0.3 --out merged/
    python merging/merge.py --list-methods

The output folder holds the merge exported as a peft LoRA of the chosen rank (truncated SVD of
each merged ΔW; load it with `PeftModel.from_pretrained(backbone, out)`), one head per task under
`heads/`, and `merge.json` (method, hyperparameters, inputs, relative reconstruction error).
Optionally, the merged model is scored on each task's test split.

Data-aware methods need each task's images: RegMean computes every adapter's Gram matrices once
from its task's training images (cached in the data cache, with progress); AdaMerging learns its
coefficients on the unlabeled test images of the tasks (transductive, as in its paper).

Adapters trained elsewhere are accepted too: a peft LoRA of a transformers image-classification model
whose classifier was saved through modules_to_save (adapter_config.json naming base_model_name_or_path,
no task.json). Their base model is loaded offline; their label names come from --labels FOLDER=FILE,
a labels.json or config.json beside the adapter, or the base model's config; any per-layer (data-free)
method merges them; the output is a peft LoRA of that base model plus heads/<task>/ (see merging/foreign.py).

The folder is written beside --out and renamed into place when complete, so a failed merge leaves
nothing behind. --out must be new or empty; --overwrite replaces a previous merge output (a folder
with merge.json), never an adapter or any other folder. Every error is one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlvision.errors import MergeConfigError, run_cli
from mlvision.runs import relative_to_repo


def parse_param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise MergeConfigError(f"hyperparameter '{text}' is not NAME=VALUE: write e.g. --param density=0.2")
    name, value = text.split("=", 1)
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        raise MergeConfigError(
            f"hyperparameter {name} has value '{value}', which is not a number: write e.g. --param {name}=0.5"
        ) from None


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument raises MergeConfigError so it ends like every other error: one line, exit 2."""

    def error(self, message: str):
        raise MergeConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python merging/merge.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument(
        "adapters", nargs="*", type=Path, help="adapter folders (written by training/run_all.py under artifacts/)"
    )
    parser.add_argument("--method", default="ties", help="merge method (default: ties); see --list-methods")
    parser.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="a method hyperparameter; repeatable"
    )
    parser.add_argument("--out", type=Path, help="output folder for the exported merge (new or empty)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds a previous merge output (merge.json)"
    )
    parser.add_argument(
        "--rank",
        type=int,
        default=32,
        help="rank of the exported LoRA (default: 32); each layer gets at most min(out, in) of its weight, "
        "and a rank above the largest such bound (320 for tf_efficientnet_lite0) is refused",
    )
    parser.add_argument(
        "--evaluate", type=int, metavar="N", help="also score the merged model on N >= 1 test images per task"
    )
    parser.add_argument(
        "--labels",
        action="append",
        default=[],
        metavar="ADAPTER=FILE",
        help="label names for an adapter trained elsewhere (a JSON list, an id2label object, or one name per line); "
        "repeatable",
    )
    parser.add_argument(
        "--list-methods", action="store_true", help="list merge methods with their hyperparameters and papers"
    )
    return parser


# Unlabeled test images per task AdaMerging learns on from the command line (the sweep's merge_eval, 300).
ADAMERGING_IMAGES = 300


def task_images(task: str, split: str, preprocess, n: int):
    """A task's images for a data-aware merge, or one line saying the task's data cannot be loaded here."""
    from mlvision.data import split_tensors
    from mlvision.errors import MLVisionError

    try:
        return split_tensors(task, split, preprocess, n)[0]
    except MLVisionError as error:
        raise MergeConfigError(
            f"this method needs images of task {task!r} ({split} split), which cannot be loaded here ({error}); "
            "use a data-free method or run where the task's data is available"
        ) from None


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(build_parser().parse_args(argv)), "nothing was exported; run the same command again")


def run(args) -> int:
    from merging.deltas import check_compatible, load_deltas
    from merging.foreign import is_foreign
    from merging.grams import GRAM_IMAGES, GramStore
    from merging.merged_model import (
        AdapterMerger,
        check_export_rank,
        check_output_folder,
        export_merge_as_lora,
    )
    from merging.methods import MERGE_METHODS, get_method
    from mlvision.backbone import BackboneConfig, Preprocess
    from mlvision.data import split_tensors
    from mlvision.evaluation import FoldedBackbone, accuracy

    if args.list_methods:
        for method in MERGE_METHODS.values():
            print(f"{method.name}: {method.description}\n    defaults: {method.defaults}\n    paper: {method.paper}")
        return 0
    if len(args.adapters) < 1 or args.out is None:
        raise MergeConfigError("give at least one adapter folder and --out FOLDER (see --help)")
    if args.rank < 1:
        raise MergeConfigError(f"--rank must be at least 1, got {args.rank}")
    if args.evaluate is not None and args.evaluate < 1:
        raise MergeConfigError(f"--evaluate must be at least 1 test image per task, got {args.evaluate}")
    hyperparams = dict(parse_param(p) for p in args.param)
    get_method(args.method).validate(hyperparams)  # fail before loading anything
    check_output_folder(args.out, args.adapters, args.overwrite)  # and before merging (export checks again)
    if any(is_foreign(folder) for folder in args.adapters):
        return run_foreign(args, hyperparams)
    if args.labels:
        raise MergeConfigError("--labels is for adapters trained elsewhere; this project's adapters carry their labels")
    adapters = [load_deltas(folder) for folder in args.adapters]
    check_compatible(adapters)  # reference methods go through peft, which would not name the adapter that differs
    check_export_rank(args.rank, adapters[0].deltas)
    keys = [str(i) for i in range(len(adapters))]
    backbone_config = BackboneConfig(**adapters[0].meta["backbone"])
    preprocess = Preprocess.from_dict(adapters[0].meta["preprocess"])
    folded = FoldedBackbone(backbone_config) if get_method(args.method).kind in ("data_aware", "test_time") else None
    merger = AdapterMerger(
        dict(zip(keys, adapters)),
        backbone_config,
        grams=GramStore(folded, lambda task: task_images(task, "train", preprocess, GRAM_IMAGES)) if folded else None,
        folded=folded,
        unlabeled_for=lambda task: task_images(task, "test", preprocess, ADAMERGING_IMAGES),
    )
    start = time.perf_counter()
    merged, params = merger.merge(keys, args.method, hyperparams)
    seconds = time.perf_counter() - start
    error = export_merge_as_lora(
        merged,
        adapters,
        args.rank,
        args.out,
        {
            "method": args.method,
            "hyperparams": params,
            "adapters": [relative_to_repo(a.path) for a in adapters],
            "merge_seconds": seconds,
        },
        overwrite=args.overwrite,
    )
    print(f"merged {len(adapters)} adapters with {args.method} {params} in {seconds:.2f} s")
    print(f"saved to {args.out} as a rank-{args.rank} LoRA; relative reconstruction error {error:.4f}")
    if args.evaluate:
        folded = folded or FoldedBackbone(backbone_config)
        model = folded.model(merged, {a.task: a.head for a in adapters})
        for adapter in adapters:
            images, labels = split_tensors(adapter.task, "test", preprocess, args.evaluate)
            print(
                f"  {adapter.task}: merged accuracy {accuracy(model, adapter.task, images, labels):.4f} "
                f"(n={len(labels)})"
            )
    return 0


def parse_labels(items: list[str], adapters: list[Path]) -> dict[Path, Path]:
    """--labels ADAPTER=FILE options as {adapter folder: labels file}; each ADAPTER must be one of the inputs."""
    inputs = {folder.resolve(): folder for folder in adapters}
    labels = {}
    for item in items:
        folder, sep, file = item.rpartition("=")
        if not sep or not folder or not file:
            raise MergeConfigError(f"--labels '{item}' is not ADAPTER=FILE: write e.g. --labels my_adapter=labels.json")
        if Path(folder).resolve() not in inputs:
            raise MergeConfigError(f"--labels names {folder}, which is not one of the adapters given: check the path")
        labels[inputs[Path(folder).resolve()]] = Path(file)
    return labels


def run_foreign(args, hyperparams: dict) -> int:
    """Merge peft LoRA adapters of a transformers model (merging/foreign.py) with a per-layer method and export."""
    from merging.deltas import check_compatible
    from merging.foreign import base_model_name, export_merge, fill_missing_layers, is_foreign, load_foreign
    from merging.merged_model import check_export_rank, merge_deltas
    from merging.methods import get_method, list_methods
    from mlvision.models import META_FILE

    own = [folder for folder in args.adapters if (folder / META_FILE).exists()]
    if own:
        other = next(folder for folder in args.adapters if is_foreign(folder))
        raise MergeConfigError(
            f"{own[0]} is one of this project's adapters ({META_FILE}) but {other} was trained elsewhere: "
            "merge adapters of one kind (one backbone) only"
        )
    if get_method(args.method).kind != "data_free":
        raise MergeConfigError(
            f"merge method '{args.method}' is {get_method(args.method).kind}; adapters trained elsewhere merge with "
            f"a per-layer method: {', '.join(list_methods(kind='data_free'))}"
        )
    if args.evaluate:
        raise MergeConfigError(
            "--evaluate scores on this project's task data, which adapters trained elsewhere have none of: "
            "leave it out and score the exported model on your own data"
        )
    labels = parse_labels(args.labels, args.adapters)
    adapters = [load_foreign(folder, labels.get(folder)) for folder in args.adapters]
    base = base_model_name(adapters)  # before check_compatible: its message names the base models
    adapters, layer_sources = fill_missing_layers(adapters)
    check_compatible(adapters)
    check_export_rank(args.rank, adapters[0].deltas)
    start = time.perf_counter()
    params = get_method(args.method).validate(hyperparams)
    merged = merge_deltas(adapters, args.method, params)
    seconds = time.perf_counter() - start
    partial = {layer: tasks for layer, tasks in layer_sources.items() if len(tasks) < len(adapters)}
    error = export_merge(
        merged,
        adapters,
        args.rank,
        args.out,
        {
            "method": args.method,
            "hyperparams": params,
            "adapters": [relative_to_repo(a.path) for a in adapters],
            "merge_seconds": seconds,
            "layers": layer_sources,
            "missing_layers_as_zero": bool(partial),
        },
        overwrite=args.overwrite,
    )
    print(f"merged {len(adapters)} adapters of {base} with {args.method} {params} in {seconds:.2f} s")
    if partial:
        print(f"  {len(partial)} layers adapted by only some adapters were merged with ΔW = 0 for the others")
    print(f"saved to {args.out} as a rank-{args.rank} LoRA; relative reconstruction error {error:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
