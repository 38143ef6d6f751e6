"""Merge chosen adapters with a chosen method and save the result.

    python merging/merge.py ADAPTER_DIR [ADAPTER_DIR ...] --method ties --param density=0.3 --out merged/
    python merging/merge.py --list-methods

The output folder holds the merge exported as a peft LoRA of the chosen rank (truncated SVD of
each merged ΔW; load it with `PeftModel.from_pretrained(backbone, out)`), one head per task under
`heads/`, and `merge.json` (method, hyperparameters, inputs, relative reconstruction error).
Optionally, the merged model is scored on each task's test split.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    parser.add_argument("--out", type=Path, help="output folder for the exported merge")
    parser.add_argument("--rank", type=int, default=32, help="rank of the exported LoRA (default: 32)")
    parser.add_argument(
        "--evaluate", type=int, metavar="N", help="also score the merged model on N test images per task"
    )
    parser.add_argument(
        "--list-methods", action="store_true", help="list merge methods with their hyperparameters and papers"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), "nothing was exported; run the same command again")


def run(args) -> int:
    from merging.deltas import load_deltas
    from merging.merged_model import AdapterMerger, FoldedBackbone, export_merge_as_lora
    from merging.methods import MERGE_METHODS, get_method
    from mlvision.backbone import BackboneConfig, Preprocess
    from mlvision.data import split_tensors
    from mlvision.models import accuracy

    if args.list_methods:
        for method in MERGE_METHODS.values():
            print(f"{method.name}: {method.description}\n    defaults: {method.defaults}\n    paper: {method.paper}")
        return 0
    if len(args.adapters) < 1 or args.out is None:
        raise MergeConfigError("give at least one adapter folder and --out FOLDER (see --help)")
    if args.rank < 1:
        raise MergeConfigError(f"--rank must be at least 1, got {args.rank}")
    hyperparams = dict(parse_param(p) for p in args.param)
    get_method(args.method).validate(hyperparams)  # fail before loading anything
    adapters = [load_deltas(folder) for folder in args.adapters]
    keys = [str(i) for i in range(len(adapters))]
    merger = AdapterMerger(dict(zip(keys, adapters)), BackboneConfig(**adapters[0].meta["backbone"]))
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
            "adapters": [str(a.path) for a in adapters],
            "merge_seconds": seconds,
        },
    )
    print(f"merged {len(adapters)} adapters with {args.method} {params} in {seconds:.2f} s")
    print(f"saved to {args.out} as a rank-{args.rank} LoRA; relative reconstruction error {error:.4f}")
    if args.evaluate:
        folded = FoldedBackbone(BackboneConfig(**adapters[0].meta["backbone"]))
        model = folded.model(merged, {a.task: a.head for a in adapters})
        preprocess = Preprocess.from_dict(adapters[0].meta["preprocess"])
        for adapter in adapters:
            images, labels = split_tensors(adapter.task, "test", preprocess, args.evaluate)
            print(
                f"  {adapter.task}: merged accuracy {accuracy(model, adapter.task, images, labels):.4f} "
                f"(n={len(labels)})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
