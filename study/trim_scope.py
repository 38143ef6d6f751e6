"""Which trim scope TIES and KnOTS-TIES should use: per layer, or over the whole task vector.

    python -m study.trim_scope            # seed 0, every group of the default study
    python -m study.trim_scope --seeds 0 1 2

The TIES and KnOTS reference codes count the top-`density` fraction over each task's whole flattened
task vector; this project's first versions counted it per layer. This one-off comparison merges
every group of the stored study with both scopes, each chosen on validation from the method's own
validation grid exactly as the sweep chooses (`MergeSweep.select`), and compares the chosen validation
accuracies (the criterion that sets the default) and, for information, test accuracy. The per-layer
figures are recomputed here, not read from results.duckdb, so both scopes come from one code path.
It writes nothing to results.duckdb; it prints a table and writes reports/trim_scope.md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from merging import methods as registry
from merging.sweep import MergeSweep
from mlvision.config import StudyConfig
from mlvision.evaluation import accuracy_of, task_correct
from mlvision.paths import REPO_ROOT
from mlvision.store import Store

METHODS = ("ties", "knots_ties")
SCOPES = {0: "per layer", 1: "whole vector"}


def with_scope(method: str, scope: int):
    """The registered method with `whole_vector_trim` set to `scope` (its grid and everything else unchanged)."""
    original = registry.get_method(method)
    return replace(original, defaults={**original.defaults, "whole_vector_trim": scope})


def compare(config: StudyConfig, seeds: list[int]) -> list[dict]:
    sweep = MergeSweep(config, Store(config.db))
    sweep.load_inputs(set(seeds))
    rows = []
    groups = [g for k in range(2, len(config.tasks) + 1) for g in itertools.combinations(sorted(config.tasks), k)]
    items = [(g, s, m) for g in groups for s in seeds for m in METHODS]
    original = dict(registry.MERGE_METHODS)
    try:
        for group, seed, method in tqdm(items, desc="trim scope", unit="merge pair"):
            row = {"method": method, "k": len(group), "tasks": ",".join(group), "seed": seed}
            for scope in SCOPES:
                registry.MERGE_METHODS[method] = with_scope(method, scope)
                selection = sweep.select(group, seed, method)
                heads = {task: sweep.adapters[(task, seed)].head for task in group}
                test = {task: sweep.eval_tensors(task) for task in group}
                correct = task_correct(sweep.folded.model(selection.merged, heads), test)
                row[f"validation_{scope}"] = selection.record["chosen_validation_accuracy"]
                row[f"test_{scope}"] = sum(accuracy_of(correct[t]) for t in group) / len(group)
            rows.append(row)
    finally:
        registry.MERGE_METHODS.clear()
        registry.MERGE_METHODS.update(original)
    return rows


def report(rows: list[dict], seeds: list[int]) -> str:
    lines = [
        "# Trim scope of TIES and KnOTS-TIES: per layer vs whole task vector",
        "",
        f"Produced by `python -m study.trim_scope --seeds {' '.join(map(str, seeds))}`: every group of the study "
        f"(k = 2..6) at seed(s) {', '.join(map(str, seeds))}, each scope chosen on validation from the method's "
        "validation grid as the sweep chooses. Accuracies are means over the group's tasks; differences are "
        "whole vector minus per layer, in points.",
        "",
        "| method | merges | mean validation, per layer | mean validation, whole vector | validation difference | "
        "whole vector better / equal / worse (validation) | test difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        val_diff = [100 * (r["validation_1"] - r["validation_0"]) for r in mine]
        test_diff = [100 * (r["test_1"] - r["test_0"]) for r in mine]
        better = sum(d > 1e-9 for d in val_diff)
        worse = sum(d < -1e-9 for d in val_diff)
        lines.append(
            f"| {method} | {len(mine)} | {100 * statistics.mean(r['validation_0'] for r in mine):.2f} | "
            f"{100 * statistics.mean(r['validation_1'] for r in mine):.2f} | {statistics.mean(val_diff):+.2f} | "
            f"{better} / {len(mine) - better - worse} / {worse} | {statistics.mean(test_diff):+.2f} |"
        )
    lines += [
        "",
        "Per k (validation difference, points):",
        "",
        "| method | " + " | ".join(f"k={k}" for k in range(2, 7)) + " |",
    ]
    lines.append("|---|" + "---|" * 5)
    for method in METHODS:
        cells = []
        for k in range(2, 7):
            diffs = [
                100 * (r["validation_1"] - r["validation_0"]) for r in rows if r["method"] == method and r["k"] == k
            ]
            cells.append(f"{statistics.mean(diffs):+.2f} (n={len(diffs)})" if diffs else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.trim_scope", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "trim_scope.md")
    args = parser.parse_args(argv)
    rows = compare(StudyConfig(merge_methods=METHODS), args.seeds)
    text = report(rows, args.seeds)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
