"""Merge chosen adapters with a chosen method and save the result.

    python merging/merge.py ADAPTER_DIR [ADAPTER_DIR ...] --method ties --param density=0.3 --out merged/
    python merging/merge.py --list-methods

The output folder holds the merge exported as a peft LoRA of the chosen rank (truncated SVD of
each merged ΔW; load it with `PeftModel.from_pretrained(backbone, out)`), one head per task under
`heads/`, `merge.json` (method, hyperparameters, inputs, relative reconstruction error), and README.md,
its model card (merging/card.py: each task's accuracy merged vs single adapter vs head baseline where --db
stores them or --evaluate measures them, "not measured" elsewhere, and a loading snippet). Optionally, the
merged model is scored on each task's test split, and --push REPO_ID uploads the folder to the Hugging Face Hub.

Data-aware methods need each task's images: RegMean computes every adapter's Gram matrices once
from its task's training images (cached in the data cache, with progress); AdaMerging learns its
coefficients on the unlabeled test images of the tasks (transductive, as in its paper).

Adapters trained elsewhere are accepted too (no task.json): a peft LoRA of a transformers image-classification
model whose classifier was saved through modules_to_save (adapter_config.json names base_model_name_or_path),
or a peft LoRA of a timm model with its classifier in modules_to_save or in head.safetensors beside it (peft
names no base for timm models: give it with --base, e.g. --base timm/vit_base_patch16_224.augreg_in21k or a
folder timm's save_for_hf wrote). An adapter may be a Hub repo, hub:user/adapter (read from the local Hub
cache, else downloaded). Base models load from a folder or the local Hub cache; label names come from
--labels ADAPTER=FILE, a labels.json or config.json beside the adapter, or the base model's config; any
per-layer (data-free) method merges them; the output is a peft LoRA of that base model plus heads/<task>/
(see merging/foreign.py).

The folder is written beside --out and renamed into place when complete, so a failed merge leaves
nothing behind. --out must be new or empty; --overwrite replaces a previous merge output (a folder
with merge.json), never an adapter or any other folder. Every error is one line, exit code 2.
"""

from __future__ import annotations

import argparse
import decimal
import json
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlvision.errors import HubPushError, MergeConfigError, StoreError, error_reason, run_cli
from mlvision.paths import DEFAULT_DB_PATH


def parse_param(text: str) -> tuple[str, int | float]:
    """--param NAME=VALUE as (name, number): an int for an integer literal of any length (DARE's seed), else a float
    ('nan', 'inf' and '1e999', which overflows to inf, included). The number is only read here: whether it is
    allowed is the method's `validate`, which refuses what lies outside its range (nan and inf too) naming it."""
    if "=" not in text:
        raise MergeConfigError(f"hyperparameter '{text}' is not NAME=VALUE: write e.g. --param density=0.2")
    name, value = text.split("=", 1)
    literal = value.strip()
    if re.fullmatch(r"[+-]?[0-9]+", literal):
        # through Decimal: int() refuses a literal of more than sys.get_int_max_str_digits() digits
        return name, int(decimal.Decimal(literal))
    try:
        return name, float(literal)
    except ValueError:
        shown = value if len(value) <= 40 else f"{value[:20]}...({len(value)} characters)"
        raise MergeConfigError(
            f"hyperparameter {name} has value '{shown}', which is not a number: write e.g. --param {name}=0.5"
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
        "adapters",
        nargs="*",
        help="adapter folders (written by training/run_all.py under artifacts/, or trained elsewhere), "
        "or Hub repos as hub:user/adapter",
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
        "--db",
        type=Path,
        default=DEFAULT_DB_PATH,
        help="results database the model card reads stored accuracies from, read-only (default: results.duckdb "
        "in the repository); a missing file leaves them 'not measured'",
    )
    parser.add_argument(
        "--push",
        metavar="REPO_ID",
        help="after the export, upload the folder to this Hugging Face Hub model repo (user/name; created if new)",
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
        "--data",
        action="append",
        default=[],
        metavar="ADAPTER=DATASET",
        help="with --evaluate, for adapters trained elsewhere: the adapter's evaluation dataset, a save_to_disk folder "
        "or a Hub dataset id (its test split, else one carved from train); repeatable",
    )
    parser.add_argument(
        "--base",
        metavar="MODEL",
        help="base model of adapters trained elsewhere whose adapter_config.json names none (peft writes none for "
        "timm models): a timm hub id (timm/NAME), hf-hub:ID, local-dir:FOLDER or a model folder",
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
    return run_cli(
        lambda: run_and_push(build_parser().parse_args(argv)), "nothing was exported; run the same command again"
    )


def run_and_push(args) -> int:
    """The merge (`run`), then, with --push, the upload of its folder; a bad repo id is refused before merging."""
    if args.push and not args.list_methods:
        check_repo_id(args.push)
    code = run(args)
    if code == 0 and args.push and not args.list_methods:
        return push(args.push, args.out)
    return code


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise MergeConfigError(f"--push {repo_id} is not a Hub repo id ({error}): write it as user/name") from None


def push(repo_id: str, out: Path) -> int:
    """Upload the export folder to the Hub model repo `repo_id` (created if new). Untested by the project's tests
    beyond the offline refusal: they run without a network. A failure leaves the folder as it is and says how to
    push it later."""
    from huggingface_hub import HfApi

    later = f"the merge is saved at {out}: push it later with `hf upload {repo_id} {out}`"
    try:
        api = HfApi()
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(out), commit_message="Upload merge (merging/merge.py)")
    except KeyboardInterrupt:
        print(f"interrupted: the upload stopped; {later}", file=sys.stderr)
        return 130
    except Exception as error:  # huggingface_hub raises many kinds: offline, no token, no access, network
        raise HubPushError(f"cannot push to Hugging Face Hub repo {repo_id} ({error_reason(error)}); {later}") from None
    print(f"pushed {out} to {url}")
    return 0


def run(args) -> int:
    from merging.card import Figure
    from merging.deltas import check_compatible, load_deltas
    from merging.foreign import is_foreign, resolve_adapter
    from merging.grams import GRAM_IMAGES, GramStore
    from merging.merged_model import (
        AdapterMerger,
        check_export_rank,
        check_output_folder,
        export_merge_as_lora,
        merge_record,
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
    args.hub_ids = {}  # resolved folder -> the hub:user/adapter it came from
    resolved = []
    for given in args.adapters:
        folder, hub_id = resolve_adapter(given)
        resolved.append(folder)
        if hub_id:
            args.hub_ids[folder] = hub_id
    args.labels = [resolve_adapter_key(item, args.adapters, resolved) for item in args.labels]
    args.data = [resolve_adapter_key(item, args.adapters, resolved) for item in args.data]
    args.adapters = resolved
    if args.rank < 1:
        raise MergeConfigError(f"--rank must be at least 1, got {args.rank}")
    if args.evaluate is not None and args.evaluate < 1:
        raise MergeConfigError(f"--evaluate must be at least 1 test image per task, got {args.evaluate}")
    hyperparams = dict(parse_param(p) for p in args.param)
    get_method(args.method).validate(hyperparams)  # fail before loading anything
    check_output_folder(args.out, args.adapters, args.overwrite)  # and before merging (export checks again)
    if any(is_foreign(folder) for folder in args.adapters):
        return run_foreign(args, hyperparams)
    if args.labels or args.base or args.data:
        option = "--labels" if args.labels else "--base" if args.base else "--data"
        raise MergeConfigError(f"{option} is for adapters trained elsewhere; this project's adapters carry theirs")
    adapters = [load_deltas(folder) for folder in args.adapters]
    check_compatible(adapters)  # reference methods go through peft, which would not name the adapter that differs
    check_export_rank(args.rank, adapters[0].deltas)
    figures = stored_figures(args.db, adapters)  # before merging: a database that cannot be read stops here
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
    for task, figure in stored_merge_figures(args.db, adapters, args.method, params).items():
        figures[task]["merged"] = figure
    evaluated = []  # measured before the export, so the model card holds the figures
    if args.evaluate:
        folded = folded or FoldedBackbone(backbone_config)
        model = folded.model(merged, {a.task: a.head for a in adapters})
        for adapter in adapters:
            images, labels = split_tensors(adapter.task, "test", preprocess, args.evaluate)
            value = accuracy(model, adapter.task, images, labels)
            figures[adapter.task]["merged"] = Figure(value, len(labels), "measured now")
            evaluated.append(f"  {adapter.task}: merged accuracy {value:.4f} (n={len(labels)})")
    error = export_merge_as_lora(
        merged,
        adapters,
        args.rank,
        args.out,
        merge_record(args.method, params, adapters, seconds),
        overwrite=args.overwrite,
        figures=figures,
    )
    print(f"merged {len(adapters)} adapters with {args.method} {params} in {seconds:.2f} s")
    print(f"saved to {args.out} as a rank-{args.rank} LoRA; relative reconstruction error {error:.4f}")
    for line in evaluated:
        print(line)
    return 0


def _stored_rows(db: Path, sql: str, params: list) -> list[tuple]:
    """Rows of a read-only query on the results database's views, or one line saying why they cannot be read."""
    import duckdb

    from mlvision.store import Store

    try:
        return Store(db).query(sql, params)
    except duckdb.Error as error:  # e.g. a DuckDB file without the results views
        raise StoreError(
            f"cannot read stored accuracies from {db} ({error_reason(error)}): pass --db with a results.duckdb "
            "written by training/run_all.py"
        ) from None


def _only(rows: list[tuple], run_id: str | None = None) -> tuple | None:
    """The one row, or the one of run `run_id` (the last column) among several; None when it stays ambiguous."""
    if len(rows) > 1:
        rows = [row for row in rows if row[-1] == run_id]
    return rows[0] if len(rows) == 1 else None


def stored_figures(db: Path, adapters) -> dict[str, dict]:
    """Per task, the stored test accuracy of the adapter itself and of its head baseline (card.Figure).

    The adapter's row in task_results is the one whose model_id is the config hash its task.json records (its
    identity). The head baseline is a head of the same task, seed and backbone scored on as many test images, the
    one of the adapter's run when there are several; none is taken when the adapter itself is not stored (the
    database is then of another study). A missing `db` gives no figures: the card says "not measured".
    """
    from merging.card import Figure

    figures = {adapter.task: {} for adapter in adapters}
    if not db.is_file():
        return figures
    source = f"stored in {db.name}"
    for adapter in adapters:
        meta = adapter.meta
        single = _only(
            _stored_rows(
                db,
                "SELECT accuracy, n_test, run_id FROM task_results WHERE model_kind = 'adapter' AND model_id = ?",
                [meta.get("config_hash")],
            )
        )
        if single is None:
            continue
        figures[adapter.task]["single"] = Figure(single[0], single[1], source)
        heads = _stored_rows(
            db,
            "SELECT accuracy, n_test, run_id FROM task_results "
            "WHERE model_kind = 'head' AND task = ? AND seed = ? AND backbone = ? AND n_test = ?",
            [adapter.task, meta.get("training", {}).get("seed"), meta["backbone"]["name"], single[1]],
        )
        head = _only(heads, single[2])
        if head is not None:
            figures[adapter.task]["head"] = Figure(head[0], head[1], source)
    return figures


def stored_merge_figures(db: Path, adapters, method: str, params: dict) -> dict:
    """Per task, the stored test accuracy of a merge equal to this one: same method, hyperparameters (what a merge
    records beside them, e.g. RegMean's singular channels, aside), set of tasks, seed and backbone, in
    merge_results (the sweep's merges, chosen on validation). Empty when none or more than one merge matches."""
    from merging.card import Figure
    from merging.merged_model import RECORDED_OUTPUTS

    seeds = {adapter.meta.get("training", {}).get("seed") for adapter in adapters}
    if not db.is_file() or len(seeds) != 1:
        return {}

    def inputs(hyperparams: dict) -> dict:
        return {key: value for key, value in hyperparams.items() if key not in RECORDED_OUTPUTS}

    tasks = {adapter.task for adapter in adapters}
    rows = _stored_rows(
        db,
        "SELECT merge_id, tasks, task, merged_accuracy, n, hyperparams FROM merge_results "
        "WHERE method = ? AND seed = ? AND backbone = ? AND k = ?",
        [method, seeds.pop(), adapters[0].meta["backbone"]["name"], len(adapters)],
    )
    matching = [row for row in rows if set(row[1].split(",")) == tasks and inputs(json.loads(row[5])) == inputs(params)]
    if len({row[0] for row in matching}) != 1:
        return {}
    return {row[2]: Figure(row[3], row[4], f"stored in {db.name}") for row in matching}


def resolve_adapter_key(item: str, given: list[str], resolved: list[Path]) -> str:
    """An ADAPTER=VALUE option (--labels, --data) naming a Hub adapter by its id, rewritten to its resolved folder."""
    key, sep, file = item.rpartition("=")
    if sep and key in given:
        return f"{resolved[given.index(key)]}={file}"
    return item


def per_adapter_option(items: list[str], adapters: list[Path], option: str) -> dict[Path, str]:
    """--labels ADAPTER=FILE (or --data ADAPTER=DATASET) options as {adapter folder: value}; each ADAPTER must be
    one of the inputs."""
    inputs = {folder.resolve(): folder for folder in adapters}
    example = "labels.json" if option == "--labels" else "my_dataset/"
    values = {}
    for item in items:
        folder, sep, value = item.rpartition("=")
        if not sep or not folder or not value:
            raise MergeConfigError(f"{option} '{item}' is not ADAPTER=VALUE: write e.g. {option} my_adapter={example}")
        if Path(folder).resolve() not in inputs:
            raise MergeConfigError(f"{option} names {folder}, which is not one of the adapters given: check the path")
        values[inputs[Path(folder).resolve()]] = value
    return values


def run_foreign(args, hyperparams: dict) -> int:
    """Merge peft LoRA adapters of a transformers model (merging/foreign.py) with a per-layer method and export."""
    from merging.deltas import check_compatible
    from merging.foreign import base_model_name, export_merge, fill_missing_layers, is_foreign, load_foreign
    from merging.merged_model import check_export_rank, merge_deltas, merge_record
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
    if args.data and not args.evaluate:
        raise MergeConfigError("--data gives the datasets --evaluate N scores on: add --evaluate N")
    labels = per_adapter_option(args.labels, args.adapters, "--labels")
    data = per_adapter_option(args.data, args.adapters, "--data")
    adapters = [
        load_foreign(folder, labels.get(folder), args.base, args.hub_ids.get(folder)) for folder in args.adapters
    ]
    base = base_model_name(adapters)  # before check_compatible: its message names the base models
    adapters, layer_sources = fill_missing_layers(adapters)
    check_compatible(adapters)
    check_export_rank(args.rank, adapters[0].deltas)
    start = time.perf_counter()
    params = get_method(args.method).validate(hyperparams)
    merged = merge_deltas(adapters, args.method, params)
    seconds = time.perf_counter() - start
    figures = {}
    if args.evaluate:  # before the export, so the model card holds the figures
        datasets_for = {a.task: data[a.path] for a in adapters if a.path in data}
        figures = evaluate_foreign(adapters, merged, datasets_for, args.evaluate)
    partial = {layer: tasks for layer, tasks in layer_sources.items() if len(tasks) < len(adapters)}
    error = export_merge(
        merged,
        adapters,
        args.rank,
        args.out,
        {
            **merge_record(args.method, params, adapters, seconds),
            "layers": layer_sources,
            "missing_layers_as_zero": bool(partial),
        },
        overwrite=args.overwrite,
        figures=figures,
    )
    print(f"merged {len(adapters)} adapters of {base} with {args.method} {params} in {seconds:.2f} s")
    if partial:
        print(f"  {len(partial)} layers adapted by only some adapters were merged with ΔW = 0 for the others")
    print(f"saved to {args.out} as a rank-{args.rank} LoRA; relative reconstruction error {error:.4f}")
    for task, figure in figures.items():
        print(
            f"  {task}: merged accuracy {figure['merged'].accuracy:.4f}, its own adapter "
            f"{figure['single'].accuracy:.4f} (n={figure['merged'].n})"
        )
    return 0


def evaluate_foreign(adapters, merged, datasets_for: dict[str, str], n: int) -> dict:
    """{task: {"merged": Figure, "single": Figure}}: the merged model and each adapter alone scored on up to `n`
    test images of the adapter's own dataset (--data), preprocessed for the base model (merging/foreign.py)."""
    from merging.card import Figure
    from merging.foreign import base_model_name, base_preprocess, build_merged_model, evaluation_data, load_base_model
    from mlvision.evaluation import accuracy

    base = base_model_name(adapters)
    base_model = load_base_model(base)
    data = evaluation_data(adapters, datasets_for, base_preprocess(base, base_model), n)
    model = build_merged_model(adapters, merged, base_model)
    figures = {}
    for adapter in adapters:
        images, labels = data[adapter.task]
        alone = build_merged_model([adapter], adapter.deltas, base_model)
        source = f"measured now on {datasets_for[adapter.task]}"
        figures[adapter.task] = {
            "merged": Figure(accuracy(model, adapter.task, images, labels), len(labels), source),
            "single": Figure(accuracy(alone, adapter.task, images, labels), len(labels), source),
        }
    return figures


if __name__ == "__main__":
    sys.exit(main())
