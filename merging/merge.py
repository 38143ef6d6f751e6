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
    add_adapter_arguments(parser)
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
        "--list-methods", action="store_true", help="list merge methods with their hyperparameters and papers"
    )
    add_export_arguments(parser)
    return parser


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """The adapters and how to read them (`read_source`): the merge CLI's and the planner's (merging/plan.py)."""
    parser.add_argument(
        "adapters",
        nargs="*",
        help="adapter folders (written by training/run_all.py under artifacts/, or trained elsewhere), "
        "or Hub repos as hub:user/adapter",
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


def resolve_sources(args) -> tuple[list[Path], dict, list[str], list[str]]:
    """(adapter folders, folder -> the hub:user/adapter it came from, --labels and --data keyed by folder): the
    ADAPTER arguments resolved (a folder of adapter folders: each adapter in it; a Hub id: its local folder)."""
    from merging.foreign import expand_sources, resolve_adapter

    hub_ids, resolved = {}, []
    given = expand_sources(args.adapters)
    for adapter in given:
        folder, hub_id = resolve_adapter(adapter)
        resolved.append(folder)
        if hub_id:
            hub_ids[folder] = hub_id
    labels = [resolve_adapter_key(item, given, resolved) for item in args.labels]
    data = [resolve_adapter_key(item, given, resolved) for item in args.data]
    return resolved, hub_ids, labels, data


def read_source(args, resolved, hub_ids, labels, data):
    """The adapters as one `AdapterSource` (merging/sources.py), whatever trained them."""
    from merging.sources import ReadOptions, read_adapters

    return read_adapters(resolved, ReadOptions(labels, data, args.base, hub_ids, args.db))


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
        "--compress-first",
        action="store_true",
        help="compress then merge: with --rank N, merge in the rank-N Core Space the group's adapters share (their "
        "stacked factors' top N directions), so the exported rank-N LoRA holds the merge exactly instead of "
        "truncating a full merge (per-layer methods; merging/methods/core_space.py)",
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
    """The merge CLI's one flow, whatever the adapters' format: read them into an `AdapterSource`
    (merging/sources.py `read_adapters`), then `merge_and_export`."""
    if args.list_methods:  # before the imports below (torch, peft, timm: seconds), so it answers at once
        print(list_methods_text())
        return 0
    from merging.export import check_output_folder
    from merging.methods import get_method

    if args.from_db is not None or args.merge_id is not None or args.k is not None:
        return run_from_db(args)
    if args.tasks is not None or args.seed is not None:
        raise MergeConfigError(f"{'--tasks' if args.tasks is not None else '--seed'} goes with --from-db DB --k K")
    args.method = args.method or "ties"
    if args.compress_first:
        args.method = compress_first_method(args.method, args.rank)
    if len(args.adapters) < 1 or args.out is None:
        raise MergeConfigError("give at least one adapter folder and --out FOLDER (see --help)")
    resolved, hub_ids, labels, data = resolve_sources(args)
    check_rank_argument(args.rank)
    if args.evaluate is not None and args.evaluate < 1:
        raise MergeConfigError(f"--evaluate must be at least 1 test image per task, got {args.evaluate}")
    hyperparams = dict(parse_param(p) for p in args.param)
    get_method(args.method).validate(hyperparams)  # fail before loading anything
    check_output_folder(args.out, resolved, args.overwrite)  # and before merging (export checks again)
    return merge_and_export(args, read_source(args, resolved, hub_ids, labels, data), hyperparams)


def compress_first_method(method: str, rank: int | str) -> str:
    """--compress-first: the registry name of `method` merged compress-then-merge at `rank` (an integer rank)."""
    from merging.methods import get_method
    from merging.methods.core_space import compressed_name

    if not isinstance(rank, int):
        raise MergeConfigError(
            f"--compress-first builds the LoRA's rank into the merge: give --rank N (a whole number), not --rank {rank}"
        )
    name = compressed_name(method, rank)
    get_method(name)  # a rank below 1, or a method it cannot run (test-time, reference), is refused here in one line
    return name


def merge_and_export(args, source, hyperparams: dict) -> int:
    """One sequence of steps for every adapter source: validate the method against the source, take the figures it
    stored, merge (each point of the method's grid scored on validation where the source selects there and no
    --param fixed the hyperparameters), measure what --evaluate asks, then settle the rank, export and print."""
    from merging.export import check_export_rank, merge_record
    from merging.methods import get_method

    merge_method = get_method(args.method)
    source.check_method(merge_method)
    adapters = list(source.adapters.values())
    if isinstance(args.rank, int):
        check_export_rank(args.rank, adapters[0].deltas)
    figures = source.stored_figures()  # before merging: a database that cannot be read stops here
    tasks = list(source.adapters)
    validation = None  # loaded once for the grid and the rank
    if source.selects_on_validation and not hyperparams and merge_method.tuned:
        validation = source.rank_validation(tasks)
    start = time.perf_counter()
    merged, params, selection = merge_on_validation(source, tasks, args.method, hyperparams, validation)
    seconds = time.perf_counter() - start
    for task, figure in source.stored_merge_figures(args.method, params).items():
        figures[task]["merged"] = figure
    if args.evaluate:  # before the export, so the model card holds the figures
        measure_now(source, merged, figures, args.evaluate)
    record = {**merge_record(args.method, params, adapters, seconds), **({"selection": selection} if selection else {})}
    return export_and_report(args, source, merged, figures, record, selection, validation)


def merge_on_validation(source, tasks: list[str], method: str, hyperparams: dict, validation):
    """(merged ΔW, hyperparameters, the validation selection record or None). With `validation` (images, why not),
    each point of the method's grid (`MergeMethod.grid_points`) is merged and scored on the validation images and
    the best mean accuracy over the tasks is kept, ties to the earlier point (the sweep's rule, merging/sweep.py
    `select`); otherwise one merge with the given (or default) hyperparameters."""
    from merging.methods import get_method

    if validation is None or validation[0] is None:
        merged, params = source.merge(tuple(tasks), method, hyperparams)
        return merged, params, None
    from merging.sweep import select_on_validation

    merge_method = get_method(method)
    images = validation[0]

    def score(merged) -> float:
        accuracies = source.score(merged, images)
        return sum(accuracies.values()) / len(accuracies)

    points = merge_method.grid_points(len(tasks))
    grid_merges = ((index, *source.merge(tuple(tasks), method, point)) for index, point in enumerate(points))
    n_per_task = min(len(labels) for _, labels in images.values())
    selection = select_on_validation(merge_method, len(tasks), grid_merges, score, n_per_task)
    return selection.merged, selection.params, selection.record


def measure_now(source, merged: dict, figures: dict, n: int) -> None:
    """--evaluate N: the merge's accuracy on up to N test images of every task (and, where no study stored them,
    `scores_single_adapters`, each adapter's alone) into `figures`; the export scores its LoRA on the same images."""
    from merging.card import Figure

    test = source.split("test", dict.fromkeys(source.adapters, n))
    for task, value in source.score(merged, test).items():
        count = len(test[task][1])
        figures[task]["merged"] = Figure(value, count, source.measured_now(task))
        if source.scores_single_adapters:
            single = source.score(source.adapters[task].deltas, {task: test[task]})[task]
            figures[task]["single"] = Figure(single, count, source.measured_now(task))


# --- the export: its rank, the exported LoRA's accuracy, the folder, what the command prints -------------------------


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


def export_and_report(args, source, merged, figures: dict, record: dict, selection=None, validation=None) -> int:
    """Write the folder (`AdapterSource.export`: the rank settled on validation where the source has validation
    images, the exported LoRA scored on the test images of every known merged figure) and say what it holds."""
    adapters = list(source.adapters.values())
    error, choice, figures = source.export(
        merged, adapters, args.rank, args.out, record, figures, args.overwrite, validation
    )
    rank = choice["chosen"]
    print(
        f"merged {len(adapters)} adapters of {source.base} with {record['method']} {record['hyperparams']} in "
        f"{record['merge_seconds']:.2f} s"
    )
    if selection:
        print(
            f"  chosen on validation: {selection['chosen']} (mean validation accuracy "
            f"{selection['chosen_validation_accuracy']:.4f} over the grid's {len(selection['grid'])} points)"
        )
    partial = [layer for layer, tasks in source.layer_sources.items() if len(tasks) < len(adapters)]
    if partial:
        print(f"  {len(partial)} layers adapted by only some adapters were merged with ΔW = 0 for the others")
    for line in rank_lines(choice):
        print(line)
    print(f"saved to {args.out} as a rank-{rank} LoRA; relative reconstruction error {error:.4f}")
    for line in figure_lines(figures, rank, bool(args.evaluate), source.scores_single_adapters):
        print(line)
    return 0


def figure_lines(figures: dict, rank: int, evaluated: bool, with_single: bool) -> list[str]:
    """What the command prints about the accuracies: with each adapter scored alone (`with_single`), one line per
    task --evaluate scored; otherwise the merge's accuracy per task --evaluate scored, then the exported LoRA's
    beside the full merge's wherever it was measured (the stored merged figure's images included)."""
    if with_single:
        return [
            f"  {task}: merged accuracy {kinds['merged'].accuracy:.4f}, its own adapter "
            f"{kinds['single'].accuracy:.4f}, exported rank-{rank} {kinds['exported'].accuracy:.4f} "
            f"(n={kinds['merged'].n})"
            for task, kinds in figures.items()
            if evaluated
        ]
    lines = [
        f"  {task}: merged accuracy {kinds['merged'].accuracy:.4f} (n={kinds['merged'].n})"
        for task, kinds in figures.items()
        if evaluated
    ]
    return lines + [
        f"  {task}: exported rank-{rank} accuracy {kinds['exported'].accuracy:.4f}, full merge "
        f"{kinds['merged'].accuracy:.4f} (n={kinds['exported'].n})"
        for task, kinds in figures.items()
        if "exported" in kinds
    ]


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


def rebuild_stored_merge(source, group: list[str], method: str, hyperparams: dict):
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
        base, _ = source.merge(group, method, {**inputs, "scaling": 1.0})
        return base if scaling == 1.0 else {layer: scaling * delta for layer, delta in base.items()}
    return source.merge(group, method, hyperparams)[0]


def run_from_db(args) -> int:
    """Export the merge a study stored: its adapters (their folders as the store records them, read as
    `OwnAdapters`), method, seed and hyperparameters, rebuilt through the source's merge (RegMean with the sweep's
    Gram matrices from the data cache, AdaMerging from its stored coefficients), its stored accuracies in the card;
    then the export every merge gets (`export_and_report`)."""
    from merging.card import Figure
    from merging.deltas import load_deltas
    from merging.export import check_output_folder, merge_record
    from merging.sources import OwnAdapters
    from mlvision.runs import resolve_stored_path

    if args.from_db is None:
        raise MergeConfigError("--merge-id and --k read a study's merges: add --from-db results.duckdb")
    if args.compress_first:
        raise MergeConfigError(
            "--compress-first makes a new merge: give the adapter folders (merging/merge.py ADAPTER... --method M "
            "--rank N --compress-first), not --from-db"
        )
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
    if [a.task for a in adapters] != group:
        raise StoreError(
            f"the adapters of merge {merge_id} are of tasks {[a.task for a in adapters]}, not {group}: "
            "the store's model folders were replaced; run the study again"
        )
    source = OwnAdapters(adapters)
    start = time.perf_counter()
    merged = rebuild_stored_merge(source, group, method, hyperparams)
    seconds = time.perf_counter() - start
    figures: dict[str, dict] = {task: {} for task in group}
    where = f"stored in {args.from_db.name}"
    for task, merged_accuracy, single, head, n in _from_db_rows(
        args.from_db,
        "SELECT task, merged_accuracy, single_accuracy, head_accuracy, n FROM merge_results WHERE merge_id = ?",
        [merge_id],
    ):
        figures[task] = {
            "merged": Figure(merged_accuracy, n, where),
            "single": Figure(single, n, where),
            "head": Figure(head, n, where),
        }
    record = {
        **merge_record(method, hyperparams, adapters, seconds),
        "from_db": {"db": args.from_db.name, "merge_id": merge_id, "seed": seed},
        **({"selection": selection} if selection and "chosen" in selection else {}),
    }
    print(f"rebuilt stored merge {merge_id} ({method} of {tasks}, seed {seed}) from {args.from_db}")
    return export_and_report(args, source, merged, figures, record)


def resolve_adapter_key(item: str, given: list[str], resolved: list[Path]) -> str:
    """An ADAPTER=VALUE option (--labels, --data) naming a Hub adapter by its id, rewritten to its resolved folder."""
    key, sep, file = item.rpartition("=")
    if sep and key in given:
        return f"{resolved[given.index(key)]}={file}"
    return item


if __name__ == "__main__":
    sys.exit(main())
