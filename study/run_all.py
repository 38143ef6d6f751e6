"""Run the whole study: prepare tasks, train head baselines and adapters, evaluate, store.

The orchestration layer: it calls each stage in turn (training/, merging/, study/similarity.py, study/findings/,
the merge planner merging/plan.py, benchmarks/); `python training/run_all.py` and the `mlv-run-all` command both
land in `main`.

    python training/run_all.py            # the offline default (six tasks, three seeds)
    python training/run_all.py --quick    # the whole pipeline on a sliver, about a minute and a half
    python training/run_all.py --config tiny-vit            # a named profile (default, quick, wide, paper, tiny-vit)
    python training/run_all.py --adapters A/ B/ C/ --db mine.duckdb   # the study of adapters you already have
    accelerate launch training/run_all.py --config paper    # adapters trained on every GPU (DDP)
    python training/run_all.py --plan     # what is left to do and about how long it takes here; runs nothing
    python training/run_all.py --help     # every option

Every stage skips work already stored with the same configuration, so running it again (or
after an interruption) only does what is missing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

from benchmarks.options import add_bench_arguments, bench_config_from_args, profile_bench, resolve_device
from benchmarks.stage import BenchStage
from merging.methods import list_methods
from merging.plan import PlanStage
from merging.sweep import MergeSweep, forget_superseded, superseded_merges
from mlvision.backbone import check_backbone_name
from mlvision.config import (
    STAGES,
    add_study_arguments,
    config_from_args,
    help_defaults,
    help_profile,
    prepare_profile_data,
    profile_name,
)
from mlvision.errors import run_cli
from mlvision.store import Store
from mlvision.tasks import get_task
from study.budget import announce_plan
from study.findings.report import report_path
from study.findings.stage import FindingsStage
from study.given import DECIDED_BY_ADAPTERS, given_config
from study.similarity import SimilarityStage
from training.pipeline import TrainingStage
from training.trainers import make_accelerator


class Step(NamedTuple):
    """One stage of the study as run_all runs it."""

    name: str  # as given to --stages
    applies: bool  # whether this study has anything for it (e.g. two tasks to merge)
    run: Callable[[], dict]  # runs the stage; returns its counts
    stored_something: Callable[[dict], bool]  # whether those counts mean a row was written
    summary: str  # the line printed after it, formatted with its counts


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """run_all's options; `--help` shows as defaults the values of the profile (or file) that `argv` chooses."""
    parser = argparse.ArgumentParser(
        prog="python training/run_all.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Results go to results.duckdb (views: task_results, ...); adapters and heads to artifacts/.",
    )
    add_study_arguments(parser, help_defaults(argv or []))
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print what is left to do and about how long it takes on this machine (a few seconds of probing), "
        "then stop without running anything",
    )
    parser.add_argument(
        "--forget-superseded",
        action="store_true",
        help="first delete the stored merges this study would merge again under other settings (e.g. a method's grid "
        "changed since they were made), their evaluations and the planner's checks of their methods; without it a "
        "run that finds such merges says how many and keeps them",
    )
    add_bench_arguments(parser, profile_bench(help_profile(argv or [])))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv if argv is not None else sys.argv[1:]).parse_args(argv)
    return run_cli(
        lambda: run(args, argv if argv is not None else sys.argv[1:]),
        "everything finished so far is stored; run the same command again to continue",
    )


def announce_superseded(config, store: Store, forget: bool) -> None:
    """Stored merges of this study's tasks and seeds made under other settings (`superseded_merges`): deleted with
    --forget-superseded, else said (the findings would read them beside the merges made under today's settings)."""
    if forget:
        if forgotten := forget_superseded(config, store):
            print(f"forgot {forgotten} merges made under other settings (--forget-superseded); merging them again")
        return
    if superseded := superseded_merges(config, store):
        methods = ", ".join(sorted(set(superseded.values())))
        print(
            f"note: {len(superseded)} stored merges ({methods}) were made under other settings than this study's "
            "(e.g. an older grid); the findings would read them beside the merges made under today's settings. "
            "Add --forget-superseded to delete the old ones first."
        )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    # Stages named on the command line run; without --stages every stage runs, the benchmarks only when this run
    # stored something new: a study already stored (a fresh clone's) measures no new machine and writes nothing.
    bench_asked = args.stages is not None and "bench" in args.stages
    args.stages = args.stages or list(STAGES)
    config = config_from_args(args, tuple(list_methods()))
    if args.adapters:  # adapters trained elsewhere: the study of those (study/given.py)
        explicit = {name for name in DECIDED_BY_ADAPTERS if getattr(args, name) is not None}
        config = given_config(config, args.adapters, explicit, args.base)
    prepare_profile_data(profile_name(args))  # a profile's local datasets (tiny-vit), written once
    if not config.backbone_base:  # a given adapters' base is a folder, already loaded once by study/given.py
        check_backbone_name(config.backbone)  # unknown names fail before any work
    for name in config.tasks:
        get_task(name)  # unknown names fail before any work
    bench_config = bench_config_from_args(args, profile_name(args))  # so do bad benchmark options
    if "bench" in args.stages:
        resolve_device(bench_config.device)
    accelerator = make_accelerator(config.mixed_precision, config.grad_accum)
    if not accelerator.is_main_process:  # under accelerate launch: train and merge a share each, write nothing
        if "train" in args.stages:
            TrainingStage(config, None, accelerator).run()
        if "merge" in args.stages and len(config.tasks) >= 2:
            MergeSweep(config, None, accelerator).run()  # the main process alone reads and writes the store
        # the process group shut down cleanly: left to the interpreter's exit, gloo's threads sometimes abort it
        # ("terminate called without an active exception", SIGABRT, seen under load)
        accelerator.end_training()
        return 0  # findings and benchmarks run on the main process alone
    if args.plan:  # reads the store, writes nothing (no database is created)
        announce_plan(
            config, Store(config.db) if Path(config.db).exists() else None, args.stages, str(accelerator.device), True
        )
        accelerator.end_training()
        return 0
    if args.db is None:  # a profile's own database lives under runs/<profile>/, which a fresh clone lacks
        Path(config.db).parent.mkdir(parents=True, exist_ok=True)
    store = Store(config.db)
    store.initialise()
    stage = TrainingStage(config, store, accelerator)
    # Whether this invocation stored anything: a run with nothing to do writes nothing at all.
    changed = stage.start_run("python training/run_all.py " + shlex.join(argv))
    with stage.failure_recorded():  # a run stopped by a user-fixable problem is recorded as failed, and when
        changed |= stage.prepare_tasks() > 0
    announce_superseded(config, store, args.forget_superseded)
    announce_plan(config, store, args.stages, str(accelerator.device), always=False)
    report = report_path(config.db)  # reports/findings.md for the default database, else beside it, named after it
    stages = [
        Step("train", True, stage.run, lambda c: c["trained"] + c["imported"] + c["reused"] > 0,
             "training: {trained} models trained{imported_note}, {skipped} already stored"),
        Step("merge", len(config.tasks) >= 2, lambda: MergeSweep(config, store, accelerator).run(),
             lambda c: c["merged"] > 0, "merge sweep: {merged} merges evaluated, {skipped} already stored"),
        # task similarity is part of --stages findings: its own step, as it loads a backbone and the findings never do
        Step("findings", len(config.tasks) >= 2,
             lambda: SimilarityStage(config, store, str(accelerator.device)).run(), lambda c: c["pairs"] > 0,
             "similarity: {pairs} new (pair, seed)s measured"),
        Step("findings", len(config.tasks) >= 2, lambda: FindingsStage(config, store, report).run(),
             lambda c: c["changed"], f"findings: {{findings}} statistics, report {report}"),
        Step("plan", len(config.tasks) >= 2, lambda: PlanStage(config, store, accelerator).run(),
             lambda c: c["plans"] + c["checked"] > 0,
             "merge plans: {plans} stored, {skipped} already stored, {checked} planned groups merged to check"
             "{not_planned}"),
        Step("bench", True, lambda: BenchStage(config, store, bench_config).run(), lambda c: c["measured"] > 0,
             "benchmarks: {measured} sections measured, {skipped} already stored for this machine"),
    ]  # fmt: skip
    for step in stages:
        if step.name not in args.stages or not step.applies:
            continue
        if step.name == "bench" and not bench_asked and not changed:
            print(
                "benchmarks: not measured (nothing new was stored in this run; `--stages bench` measures this machine "
                "and stores its figures in the results file)"
            )
            continue
        started = time.perf_counter()
        with stage.failure_recorded():
            counts = step.run()
        changed |= step.stored_something(counts)
        print(step.summary.format(**counts) + f" ({time.perf_counter() - started:.0f} s)")
    stage.finish_run(changed)
    accelerator.end_training()  # a clean shutdown of the process group, as on the other ranks
    print(f"results in {config.db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
