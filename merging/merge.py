"""Merge chosen adapters with a chosen method and save the result.

    python merging/merge.py ADAPTER_DIR [ADAPTER_DIR ...] --method ties --param density=0.3 --out merged/
    python merging/merge.py --from-db results.duckdb --merge-id MERGE_ID --out merged/
    python merging/merge.py --list-methods

The output folder holds the merge exported as a peft LoRA of the chosen rank (truncated SVD of
each merged ΔW; load it with `PeftModel.from_pretrained(backbone, out)`), one head per task under
`heads/`, `merge.json` (method, hyperparameters, inputs, relative reconstruction error, how the rank was
chosen), and README.md, its model card (merging/card.py: Hub metadata, each task's accuracy of the full merge vs
the exported LoRA vs single adapter vs head baseline where --db stores them or --evaluate measures them, "not
measured" elsewhere, and a loading snippet). --rank auto (the default) exports the smallest of 4, 8, 16, ... whose
LoRA moves no task's validation accuracy by more than 0.5 points; --rank N exports N and states its loss.
Optionally, the merged model is scored on each task's test split, and --push REPO_ID uploads the folder to the
Hugging Face Hub. --from-db DB --merge-id ID (or --k K: the findings' chosen method for K tasks) exports a merge a
study stored, rebuilt from its stored adapters, method and hyperparameters.

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
per-layer (data-free) method merges them, and with --data ADAPTER=DATASET for every adapter the method's grid is
searched on validation, RegMean is offered and the export's rank is measured; the output is a peft LoRA of that
base model plus heads/<task>/ (see merging/foreign.py).

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
    parser.add_argument("--method", help="merge method (default: ties); see --list-methods")
    parser.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="a method hyperparameter; repeatable"
    )
    parser.add_argument("--out", type=Path, help="output folder for the exported merge (new or empty)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds a previous merge output (merge.json)"
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
        action="extend",
        nargs="+",
        default=[],
        metavar="ADAPTER=FILE",
        help="label names for an adapter trained elsewhere (a JSON list, an id2label object, or one name per line); "
        "several pairs after one flag, or the flag repeated (give the adapters before it)",
    )
    parser.add_argument(
        "--data",
        action="extend",
        nargs="+",
        default=[],
        metavar="ADAPTER=DATASET",
        help="for adapters trained elsewhere: the adapter's own dataset, a save_to_disk folder or a Hub dataset id "
        "(its splits, a missing validation or test split carved from train); for every adapter, the method's grid "
        "is searched on validation, RegMean is offered and the rank measured; --evaluate N scores its test split; "
        "several pairs after one flag, or the flag repeated",
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
    add_export_arguments(parser)
    return parser


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The export's rank and the export of a stored merge (--from-db): kept apart from the merge's own options."""
    parser.add_argument(
        "--rank",
        type=rank_argument,
        default="auto",
        help="rank of the exported LoRA: auto (default) = the smallest of 4, 8, 16, ... (then the layers' full rank) "
        f"whose export scores within {RANK_TOLERANCE_POINTS:g} points of the full merge on every task's validation "
        "images (this project's adapters: their tasks' validation split; adapters from elsewhere: with --data, else "
        "rank 32, its accuracy not measured); N = that rank, its validation loss measured and stated; full = the "
        "layers' full rank (exact). Each layer gets at most min(out, in) of its weight, and a rank above the "
        "largest such bound (320 for tf_efficientnet_lite0) is refused",
    )
    parser.add_argument(
        "--from-db",
        type=Path,
        metavar="DB",
        help="export a merge a study stored: its method, adapters, seed and hyperparameters (AdaMerging's learned "
        "coefficients included) read from this results.duckdb; with --merge-id ID, or --k K for the findings' "
        "chosen method for groups of K tasks",
    )
    parser.add_argument("--merge-id", help="with --from-db: the merge to export (merge_results.merge_id)")
    parser.add_argument(
        "--k",
        type=int,
        help="with --from-db: export the merge of the method the findings chose for groups of K tasks (chosen_method)",
    )
    parser.add_argument(
        "--tasks",
        help="with --from-db --k: the group, as comma-separated task names (needed where the study merged several "
        "groups of K tasks)",
    )
    parser.add_argument(
        "--seed", type=int, help="with --from-db --k: the adapters' seed (default: the smallest stored)"
    )


RANK_TOLERANCE_POINTS = 0.5  # export.RANK_TOLERANCE in points (kept here: the parser imports no torch)


def rank_argument(text: str) -> int | str:
    """--rank: a whole number, `full` or `auto`."""
    value = text.strip().lower()
    if value in ("auto", "full"):
        return value
    if re.fullmatch(r"[+-]?[0-9]{1,9}", value):
        return int(value)
    raise argparse.ArgumentTypeError(f"'{text}' is not a rank: write a whole number, full or auto")


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


def list_methods_text() -> str:
    """--list-methods: every registered method with its defaults and paper (the registry imports no torch)."""
    from merging.methods import MERGE_METHODS

    return "\n".join(
        f"{method.name}: {method.description}\n    defaults: {method.defaults}\n    paper: {method.paper}"
        for method in MERGE_METHODS.values()
    )


def run(args) -> int:
    if args.list_methods:  # before the imports below (torch, peft, timm: seconds), so it answers at once
        print(list_methods_text())
        return 0
    from merging.card import Figure
    from merging.deltas import check_compatible, load_deltas
    from merging.export import check_export_rank, check_output_folder, merge_record
    from merging.foreign import expand_sources, is_foreign, resolve_adapter
    from merging.grams import GRAM_IMAGES, GramStore
    from merging.merged_model import AdapterMerger
    from merging.methods import get_method
    from mlvision.backbone import BackboneConfig, Preprocess
    from mlvision.data import split_tensors
    from mlvision.evaluation import FoldedBackbone, accuracy

    if args.from_db is not None or args.merge_id is not None or args.k is not None:
        return run_from_db(args)
    if args.tasks is not None or args.seed is not None:
        raise MergeConfigError(f"{'--tasks' if args.tasks is not None else '--seed'} goes with --from-db DB --k K")
    args.method = args.method or "ties"
    if len(args.adapters) < 1 or args.out is None:
        raise MergeConfigError("give at least one adapter folder and --out FOLDER (see --help)")
    args.hub_ids = {}  # resolved folder -> the hub:user/adapter it came from
    resolved = []
    args.adapters = expand_sources(args.adapters)  # a folder of adapter folders: each adapter in it
    for given in args.adapters:
        folder, hub_id = resolve_adapter(given)
        resolved.append(folder)
        if hub_id:
            args.hub_ids[folder] = hub_id
    args.labels = [resolve_adapter_key(item, args.adapters, resolved) for item in args.labels]
    args.data = [resolve_adapter_key(item, args.adapters, resolved) for item in args.data]
    args.adapters = resolved
    check_rank_argument(args.rank)
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
    if isinstance(args.rank, int):
        check_export_rank(args.rank, adapters[0].deltas)
    figures = stored_figures(args.db, adapters)  # before merging: a database that cannot be read stops here
    keys = [str(i) for i in range(len(adapters))]
    backbone_config = BackboneConfig(**adapters[0].meta["backbone"])
    preprocess = Preprocess.from_dict(adapters[0].meta["preprocess"])
    folded = FoldedBackbone(backbone_config) if get_method(args.method).uses_data else None
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
    folded = folded or FoldedBackbone(backbone_config)
    if args.evaluate:
        model = folded.model(merged, {a.task: a.head for a in adapters})
        for adapter in adapters:
            images, labels = split_tensors(adapter.task, "test", preprocess, args.evaluate)
            value = accuracy(model, adapter.task, images, labels)
            figures[adapter.task]["merged"] = Figure(value, len(labels), "measured now")
            evaluated.append(f"  {adapter.task}: merged accuracy {value:.4f} (n={len(labels)})")
    return export_own_merge(
        args, adapters, merged, folded, figures, merge_record(args.method, params, adapters, seconds), evaluated
    )


# --- the export of this project's adapters: its rank, the exported LoRA's accuracy, the folder -----------------------


def check_rank_argument(rank: int | str) -> None:
    if isinstance(rank, int) and rank < 1:
        raise MergeConfigError(f"--rank must be at least 1, got {rank}")


def rank_lines(choice: dict) -> list[str]:
    """What the command prints about the rank."""
    if not choice.get("ladder"):
        return [
            f"  rank {choice['chosen']} ({choice['rule']}): its accuracy was not measured ({choice['not_measured']})"
        ]
    last = choice["ladder"][-1]
    how = "chosen by --rank auto" if choice["requested"] == "auto" else "as given"
    return [
        f"  rank {choice['chosen']} {how}: on validation (n<={choice.get('validation_n')} per task) its accuracy "
        f"moves by at most {last['max_change'] * 100:.2f} points against the full merge (largest loss "
        f"{last['max_loss'] * 100:.2f})"
    ]


def export_own_merge(args, adapters, merged, folded, figures: dict, record: dict, printed: list[str]) -> int:
    """Write the folder (`export_own_lora`: the rank settled on the tasks' validation images, the exported LoRA
    scored on the test images of every known merged figure) and say what it holds."""
    from merging.export import export_own_lora

    error, choice, figures = export_own_lora(
        merged,
        adapters,
        args.rank,
        args.out,
        {**record, **getattr(args, "export_info", {})},
        overwrite=args.overwrite,
        figures=figures,
        folded=folded,
    )
    rank = choice["chosen"]
    print(
        f"merged {len(adapters)} adapters with {record['method']} {record['hyperparams']} in "
        f"{record['merge_seconds']:.2f} s"
    )
    for line in rank_lines(choice):
        print(line)
    print(f"saved to {args.out} as a rank-{rank} LoRA; relative reconstruction error {error:.4f}")
    for line in printed:
        print(line)
    for task, kinds in figures.items():
        if "exported" in kinds:
            print(
                f"  {task}: exported rank-{rank} accuracy {kinds['exported'].accuracy:.4f}, full merge "
                f"{kinds['merged'].accuracy:.4f} (n={kinds['exported'].n})"
            )
    return 0


# --- the export of a merge a study stored (--from-db) ---------------------------------------------------------------


def _from_db_rows(db: Path, sql: str, params: list) -> list[tuple]:
    """Rows of a read-only query on the store's tables, or one line saying the file is not a study's."""
    import duckdb

    from mlvision.store import Store

    try:
        return Store(db).query(sql, params)
    except duckdb.Error as error:
        raise StoreError(
            f"cannot read the stored merges of {db} ({error_reason(error)}): pass --from-db a results.duckdb written "
            "by training/run_all.py"
        ) from None


def stored_merge_row(args) -> tuple:
    """(merge_id, method, tasks, seed, hyperparams, adapter_ids, selection) of the merge --merge-id names, or of the
    findings' chosen method for --k K (its group from --tasks, or the only group of K tasks; its seed --seed, or the
    smallest stored)."""
    db = args.from_db
    columns = "merge_id, method, tasks, seed, hyperparams, adapter_ids, selection"
    if args.merge_id is not None:
        rows = _from_db_rows(db, f"SELECT {columns} FROM merges WHERE merge_id = ?", [args.merge_id])
        if not rows:
            raise StoreError(
                f"{db} stores no merge {args.merge_id}: pick one with SELECT DISTINCT merge_id, method, tasks FROM "
                "merge_results"
            )
        return rows[0]
    chosen = _from_db_rows(
        db,
        "SELECT statistic FROM findings WHERE finding = 'chosen_method' AND value IS NOT NULL AND statistic LIKE ?",
        [f"%/k={args.k}"],
    )
    if not chosen:
        raise StoreError(
            f"{db} holds no chosen method for groups of {args.k} tasks (findings: chosen_method): run the findings "
            "stage, or pass --merge-id"
        )
    method = str(chosen[0][0]).rpartition("/k=")[0]
    rows = _from_db_rows(
        db, f"SELECT {columns} FROM merges WHERE method = ? AND k = ? ORDER BY seed, tasks", [method, args.k]
    )
    if args.tasks is not None:
        group = sorted(task.strip() for task in args.tasks.split(",") if task.strip())
        rows = [row for row in rows if sorted(row[2].split(",")) == group]
        if not rows:
            raise StoreError(
                f"{db} stores no {method} merge of tasks {','.join(group)}: name {args.k} tasks the study merged "
                "together (SELECT DISTINCT tasks FROM merge_results)"
            )
    seed = args.seed if args.seed is not None else min((row[3] for row in rows), default=None)
    rows = [row for row in rows if row[3] == seed]
    groups = sorted({row[2] for row in rows})
    if len(groups) != 1:
        shown = "; ".join(groups[:4]) + (" ..." if len(groups) > 4 else "")
        raise MergeConfigError(
            f"{db} holds {len(groups)} {method} merges of {args.k} tasks for seed {seed}"
            + (f" ({shown})" if groups else "")
            + ": name one group with --tasks a,b (and --seed S), or pass --merge-id"
        )
    return rows[0]


def rebuild_stored_merge(merger, group: list[str], method: str, hyperparams: dict):
    """The merged ΔW a stored merge holds, computed as the sweep computed it (merging/sweep.py `grid_merges`): where
    `scaling` is an output multiplier, merged at scaling 1 and multiplied; a test-time merge from its stored
    coefficients (never learned again); every other method with its stored hyperparameters."""
    from merging.methods import get_method

    merge_method = get_method(method)
    rebuilt_from = merge_method.rebuilt_from
    if rebuilt_from is not None and rebuilt_from not in hyperparams:
        raise MergeConfigError(
            f"this {method} merge's learned {rebuilt_from} are not stored (studies store them from issue 28 on): "
            f"export it with merging/merge.py ADAPTER... --method {method}, which learns them again"
        )
    if merge_method.per_layer and merge_method.scaling_is_output_multiplier:
        inputs = merge_method.inputs(hyperparams)
        scaling = inputs.pop("scaling", merge_method.defaults.get("scaling", 1.0))
        base, _ = merger.merge(group, method, {**inputs, "scaling": 1.0})
        return base if scaling == 1.0 else {layer: scaling * delta for layer, delta in base.items()}
    return merger.merge(group, method, hyperparams)[0]


def run_from_db(args) -> int:
    """Export the merge a study stored: its adapters (their folders as the store records them), method, seed and
    hyperparameters, rebuilt with `AdapterMerger` (RegMean with the sweep's Gram matrices from the data cache,
    AdaMerging from its stored coefficients), its stored accuracies in the card."""
    from merging.card import Figure
    from merging.deltas import check_compatible, load_deltas
    from merging.export import check_output_folder, merge_record
    from merging.grams import GRAM_IMAGES, GramStore
    from merging.merged_model import AdapterMerger
    from mlvision.backbone import BackboneConfig, Preprocess
    from mlvision.evaluation import FoldedBackbone
    from mlvision.runs import resolve_stored_path

    if args.from_db is None:
        raise MergeConfigError("--merge-id and --k read a study's merges: add --from-db results.duckdb")
    if (args.merge_id is None) == (args.k is None):
        raise MergeConfigError("--from-db exports one stored merge: give either --merge-id ID or --k K")
    if args.merge_id is not None and (args.tasks is not None or args.seed is not None):
        raise MergeConfigError("--tasks and --seed choose among the merges of --k K; --merge-id names one already")
    given = [
        name
        for name, value in (
            ("adapter folders", args.adapters),
            ("--method", args.method),
            ("--param", args.param),
            ("--labels", args.labels),
            ("--data", args.data),
            ("--base", args.base),
        )
        if value
    ]
    if given:
        raise MergeConfigError(
            f"--from-db reads the merge's adapters, method and hyperparameters from the store: drop {given[0]}"
        )
    if args.out is None:
        raise MergeConfigError("give --out FOLDER for the exported merge (see --help)")
    check_rank_argument(args.rank)
    if args.evaluate is not None:
        raise MergeConfigError("--evaluate is for new merges: a stored merge's test accuracies are in the store")
    if not args.from_db.is_file():
        raise StoreError(f"no results database at {args.from_db}: pass --from-db a results.duckdb of a study")
    merge_id, method, tasks, seed, hyperparams, adapter_ids, selection = stored_merge_row(args)
    hyperparams = json.loads(hyperparams) if isinstance(hyperparams, str) else dict(hyperparams or {})
    adapter_ids = json.loads(adapter_ids) if isinstance(adapter_ids, str) else list(adapter_ids)
    selection = json.loads(selection) if isinstance(selection, str) else selection
    group = tasks.split(",")
    folders = []
    for model_id in adapter_ids:
        rows = _from_db_rows(args.from_db, "SELECT path FROM models WHERE model_id = ?", [model_id])
        if not rows:
            raise StoreError(
                f"{args.from_db} records no folder for adapter {model_id} of merge {merge_id}: is the "
                "store complete? run the training stage again"
            )
        folders.append(resolve_stored_path(rows[0][0]))
    check_output_folder(args.out, folders, args.overwrite)
    adapters = [load_deltas(folder) for folder in folders]
    check_compatible(adapters)
    if [a.task for a in adapters] != group:
        raise StoreError(
            f"the adapters of merge {merge_id} are of tasks {[a.task for a in adapters]}, not {group}: "
            "the store's model folders were replaced; run the study again"
        )
    backbone_config = BackboneConfig(**adapters[0].meta["backbone"])
    preprocess = Preprocess.from_dict(adapters[0].meta["preprocess"])
    folded = FoldedBackbone(backbone_config)
    merger = AdapterMerger(
        dict(zip(group, adapters)),
        backbone_config,
        grams=GramStore(folded, lambda task: task_images(task, "train", preprocess, GRAM_IMAGES)),
        folded=folded,
    )
    start = time.perf_counter()
    merged = rebuild_stored_merge(merger, group, method, hyperparams)
    seconds = time.perf_counter() - start
    figures: dict[str, dict] = {task: {} for task in group}
    source = f"stored in {args.from_db.name}"
    for task, merged_accuracy, single, head, n in _from_db_rows(
        args.from_db,
        "SELECT task, merged_accuracy, single_accuracy, head_accuracy, n FROM merge_results WHERE merge_id = ?",
        [merge_id],
    ):
        figures[task] = {
            "merged": Figure(merged_accuracy, n, source),
            "single": Figure(single, n, source),
            "head": Figure(head, n, source),
        }
    args.export_info = {
        "from_db": {"db": args.from_db.name, "merge_id": merge_id, "seed": seed},
        **({"selection": selection} if selection and "chosen" in selection else {}),
    }
    print(f"rebuilt stored merge {merge_id} ({method} of {tasks}, seed {seed}) from {args.from_db}")
    return export_own_merge(
        args, adapters, merged, folded, figures, merge_record(method, hyperparams, adapters, seconds), []
    )


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
    from merging.methods import get_method

    seeds = {adapter.meta.get("training", {}).get("seed") for adapter in adapters}
    if not db.is_file() or len(seeds) != 1:
        return {}
    inputs = get_method(method).inputs
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
            raise MergeConfigError(
                f"{option} '{item}' is not ADAPTER=VALUE: write e.g. {option} my_adapter={example} (adapter folders go "
                f"before {option}, which takes every ADAPTER=VALUE that follows it)"
            )
        if Path(folder).resolve() not in inputs:
            raise MergeConfigError(f"{option} names {folder}, which is not one of the adapters given: check the path")
        values[inputs[Path(folder).resolve()]] = value
    return values


def run_foreign(args, hyperparams: dict) -> int:
    """Merge peft LoRA adapters of a transformers or timm model (merging/foreign.py) and export. With --data for
    every adapter, the method's grid is searched on a validation split of that data (when no --param fixes the
    hyperparameters), RegMean gets its Gram matrices from the data's training images, and the export's rank is
    measured (or, with --rank auto, chosen) on the validation images; --evaluate N scores the test split."""
    from merging.deltas import check_compatible
    from merging.export import check_export_rank
    from merging.foreign import base_model_name, fill_missing_layers, is_foreign, load_foreign
    from merging.methods import get_method, list_methods
    from mlvision.models import META_FILE

    own = [folder for folder in args.adapters if (folder / META_FILE).exists()]
    if own:
        other = next(folder for folder in args.adapters if is_foreign(folder))
        raise MergeConfigError(
            f"{own[0]} is one of this project's adapters ({META_FILE}) but {other} was trained elsewhere: "
            "merge adapters of one kind (one backbone) only"
        )
    merge_method = get_method(args.method)
    if not merge_method.per_layer:
        raise MergeConfigError(
            f"merge method '{args.method}' is {merge_method.kind}; adapters trained elsewhere merge with a per-layer "
            "method: "
            f"{', '.join(list_methods(kind='data_free'))}, or with --data for every adapter "
            f"{', '.join(list_methods(kind='data_aware'))}"
        )
    labels = per_adapter_option(args.labels, args.adapters, "--labels")
    data = per_adapter_option(args.data, args.adapters, "--data")
    if merge_method.statistics and len(data) < len(args.adapters):
        missing = next(folder for folder in args.adapters if folder not in data)
        raise MergeConfigError(
            f"merge method '{args.method}' needs each adapter's training images: pass --data {missing}=DATASET (one "
            f"for every adapter), or use a per-layer method: {', '.join(list_methods(kind='data_free'))}"
        )
    from merging.foreign import dataset_label_names

    adapters = [  # label names: --labels, the folder's own, then the dataset's (--data), the base config's last
        load_foreign(
            folder,
            labels.get(folder),
            args.base,
            args.hub_ids.get(folder),
            fallback_labels=dataset_label_names(data[folder]) if folder in data else None,
        )
        for folder in args.adapters
    ]
    base = base_model_name(adapters)  # before check_compatible: its message names the base models
    adapters, layer_sources = fill_missing_layers(adapters)
    check_compatible(adapters)
    if isinstance(args.rank, int):
        check_export_rank(args.rank, adapters[0].deltas)
    datasets_for = {a.task: data[a.path] for a in adapters if a.path in data}
    work = ForeignData(adapters, base, datasets_for) if (data or args.evaluate) else None
    start = time.perf_counter()
    merged, params, selection = merge_foreign(adapters, args.method, hyperparams, work)
    seconds = time.perf_counter() - start
    return export_foreign_merge(args, adapters, base, layer_sources, merged, params, selection, seconds, work)


class ForeignData:
    """The --data of adapters from elsewhere, loaded once: the base model and its preprocessing, each adapter's
    validation images (the rank's and the grid's scoring, `RANK_VALIDATION_IMAGES`), training images for RegMean and
    test images for --evaluate; and the scoring of any merged ΔW through `build_merged_classifier`."""

    def __init__(self, adapters, base: str, datasets_for: dict[str, str]):
        from merging.bases import LIBRARIES
        from merging.foreign import recorded_base

        self.adapters, self.datasets_for = adapters, datasets_for
        library = LIBRARIES[adapters[0].meta["library"]]
        self.base_model = library.load(recorded_base(base))
        self.preprocess = library.preprocess(base, self.base_model)
        self._validation = None

    def split(self, split: str, n: int) -> dict:
        """{task: (images, labels)} of every adapter's dataset (one line naming an adapter without --data)."""
        from merging.foreign import evaluation_data

        return evaluation_data(self.adapters, self.datasets_for, self.preprocess, n, split)

    def validation(self) -> dict:
        from merging.export import RANK_VALIDATION_IMAGES

        if self._validation is None:
            self._validation = self.split("validation", RANK_VALIDATION_IMAGES)
        return self._validation

    def score(self, merged: dict, data: dict, adapters=None) -> dict[str, float]:
        """{task: accuracy} of base + `merged` with the adapters' heads on `data` (one stream of full batches)."""
        from merging.foreign import build_merged_classifier
        from mlvision.evaluation import accuracy_of, task_correct

        model = build_merged_classifier(adapters or self.adapters, merged, self.base_model)
        return {task: accuracy_of(correct) for task, correct in task_correct(model, data).items()}

    def grams(self):
        from merging.foreign import ForeignGrams
        from merging.grams import GRAM_IMAGES

        train = {}

        def images_for(task: str):
            if not train:
                train.update(self.split("train", GRAM_IMAGES))
            return train[task][0]

        return ForeignGrams(self.base_model, images_for)


def merge_foreign(adapters, method: str, hyperparams: dict, work: ForeignData | None):
    """(merged ΔW, hyperparameters, the validation selection record or None). Where `work` holds every adapter's data
    and no --param fixed the hyperparameters, each point of the method's grid (`MergeMethod.grid_points`) is merged
    and scored on the validation images and the best mean accuracy over the tasks is kept, ties to the earlier point
    (the sweep's rule, merging/sweep.py `select`); otherwise one merge with the given (or default) hyperparameters."""
    from merging.merged_model import AdapterMerger
    from merging.methods import get_method

    merge_method = get_method(method)
    keys = [str(i) for i in range(len(adapters))]
    grams = work.grams() if work is not None and merge_method.statistics else None
    merger = AdapterMerger(dict(zip(keys, adapters)), None, grams=grams)
    if work is None or len(work.datasets_for) < len(adapters) or hyperparams or not merge_method.tuned:
        merged, params = merger.merge(keys, method, hyperparams)
        return merged, params, None
    from merging.sweep import select_on_validation

    validation = work.validation()

    def score(merged) -> float:
        accuracies = work.score(merged, validation)
        return sum(accuracies.values()) / len(accuracies)

    grid_merges = (
        (index, *merger.merge(keys, method, point)) for index, point in enumerate(merge_method.grid_points())
    )
    n_per_task = min(len(labels) for _, labels in validation.values())
    selection = select_on_validation(merge_method, grid_merges, score, n_per_task)
    return selection.merged, selection.params, selection.record


def export_foreign_merge(args, adapters, base, layer_sources, merged, params, selection, seconds, work) -> int:
    """Settle the rank (measured on the validation images where --data gives them), score the merge, each adapter
    alone and the exported LoRA on --evaluate N test images, and write the folder (`foreign.export_merge`)."""
    from merging.card import Figure
    from merging.export import merge_record, settle_rank
    from merging.foreign import export_merge

    score_validation, n_validation = None, None
    why_not = "no validation images: --data ADAPTER=DATASET for every adapter measures it"
    if work is not None and len(work.datasets_for) == len(adapters):
        validation = work.validation()
        n_validation = max(len(labels) for _, labels in validation.values())

        def score_validation(deltas):
            return work.score(deltas, validation)

    elif work is not None:
        work.validation()  # one line naming the adapter without --data
    rank, choice, low_rank = settle_rank(args.rank, merged, score_validation, n_validation, why_not)
    figures = {}
    if args.evaluate:  # before the export, so the model card holds the figures
        test = work.split("test", args.evaluate)
        merged_scores = work.score(merged, test)
        exported_scores = work.score(low_rank.approximation(rank), test)
        for adapter in adapters:
            task = adapter.task
            source = f"measured now on {work.datasets_for[task]}"
            n = len(test[task][1])
            single = work.score(adapter.deltas, {task: test[task]}, [adapter])[task]
            figures[task] = {
                "merged": Figure(merged_scores[task], n, source),
                "exported": Figure(exported_scores[task], n, source),
                "single": Figure(single, n, source),
            }
    partial = {layer: tasks for layer, tasks in layer_sources.items() if len(tasks) < len(adapters)}
    datasets = dict(work.datasets_for) if work is not None else {}
    error = export_merge(
        merged,
        adapters,
        rank,
        args.out,
        {
            **merge_record(args.method, params, adapters, seconds),
            "layers": layer_sources,
            "missing_layers_as_zero": bool(partial),
            "rank_choice": choice,
            "datasets": {a.task: datasets.get(a.task) for a in adapters},
            **({"selection": selection} if selection else {}),
        },
        overwrite=args.overwrite,
        figures=figures,
        base_model=work.base_model if work is not None else None,
    )
    print(f"merged {len(adapters)} adapters of {base} with {args.method} {params} in {seconds:.2f} s")
    if selection:
        print(
            f"  chosen on validation: {selection['chosen']} (mean validation accuracy "
            f"{selection['chosen_validation_accuracy']:.4f} over the grid's {len(selection['grid'])} points)"
        )
    if partial:
        print(f"  {len(partial)} layers adapted by only some adapters were merged with ΔW = 0 for the others")
    for line in rank_lines(choice):
        print(line)
    print(f"saved to {args.out} as a rank-{rank} LoRA; relative reconstruction error {error:.4f}")
    for task, figure in figures.items():
        print(
            f"  {task}: merged accuracy {figure['merged'].accuracy:.4f}, its own adapter "
            f"{figure['single'].accuracy:.4f}, exported rank-{rank} {figure['exported'].accuracy:.4f} "
            f"(n={figure['merged'].n})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
