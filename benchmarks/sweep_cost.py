"""What each merge method costs the default study's sweep on this machine, measured, and what the whole sweep takes.

    python -m benchmarks.sweep_cost --all-methods           # every registered method, on the committed adapters
    python -m benchmarks.sweep_cost --merge-methods ties regmean --repeats 3
    python -m benchmarks.sweep_cost --config quick          # any study run_all's options describe (its --db)

Why: the default study must fit its time budget (issue 31: 45 minutes on 2 CPU cores from empty) and the methods
differ widely in cost (a TIES merge trims and elects signs per layer, TSV-M and Iso take SVDs, AdaMerging learns,
every tuned method scores its 5 grid points on validation before its test images). Which methods fit is decided from
these figures, not guessed.

For each method and each group size k, it runs the sweep's own `MergeSweep.compute` (the validation search over
the method's grid, then the test scoring: exactly what the sweep does per merge, nothing stored) on the first group
of that size for the first seed of the study (the committed default study unless run_all's options say otherwise;
its adapters must be stored), `--repeats` times, and keeps the median. The projection is that median times the
number of (group, seed) merges of that size the study's plan holds for the method (AdaMerging on its subset), summed.
Loading the adapters, scoring the baselines and the Gram matrices are once per sweep and are printed apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from merging.methods import list_methods
from merging.sweep import MergeSweep, sweep_plan
from mlvision.config import add_study_arguments, config_from_args, help_defaults
from mlvision.store import Store


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep_cost", description=__doc__.split("\n\n")[0])
    add_study_arguments(parser, help_defaults(argv))
    parser.add_argument(
        "--all-methods",
        action="store_true",
        help="measure every registered merge method on every group and seed (no subset)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed merges per (method, k); the median is kept (default: 1)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser(argv).parse_args(argv)
    config = config_from_args(args, tuple(list_methods()))
    if args.all_methods:
        config = replace(config, merge_methods=tuple(list_methods()), subset_methods=())
    methods = config.merge_methods
    seed = config.seeds[0]
    plan = sweep_plan(config)
    counts = Counter((method, len(group)) for group, _, method in plan)
    first_group = {}
    for group, _, method in plan:
        first_group.setdefault((method, len(group)), group)
    started = time.perf_counter()
    sweep = MergeSweep(config, Store(config.db))
    sweep.prepare([(group, seed, method) for (method, _), group in first_group.items()])
    print(f"{torch.get_num_threads()} threads; once per sweep: adapters, baselines and Gram matrices "
          f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    total = 0.0
    rows = []
    for method in tqdm(methods, desc="methods", unit="method"):
        per_k, projected = {}, 0.0
        for k in sorted({k for m, k in counts if m == method}):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                sweep.compute(first_group[(method, k)], seed, method)
                times.append(time.perf_counter() - start)
            per_k[k] = sorted(times)[len(times) // 2]
            projected += per_k[k] * counts[(method, k)]
        total += projected
        merges = sum(n for (m, _), n in counts.items() if m == method)
        rows.append((method, per_k, merges, projected))
    print(f"{'method':<16} {'seconds per merge at k = 2, 3, ...':<36} {'merges':>6} {'projected':>10}")
    for method, per_k, merges, projected in sorted(rows, key=lambda row: row[3]):
        figures = " ".join(f"{per_k[k]:.2f}" for k in sorted(per_k))
        print(f"{method:<16} {figures:<36} {merges:>6} {projected / 60:>8.1f} min")
    print(f"the sweep of these {len(methods)} methods: {len(plan)} merges, about {total / 60:.1f} min on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
