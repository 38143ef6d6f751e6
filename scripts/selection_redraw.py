"""How much a fresh validation draw moves the study's choices (issue 33): each stored merge's grid scored again on
other validation images, and what that changes.

    python scripts/selection_redraw.py                 # the committed default study, seed 0; writes
                                                       # reports/selection_redraw.md
    python scripts/selection_redraw.py --seeds 0 1 --draws 2
    python scripts/selection_redraw.py --config wide-cpu   # the committed wide study (reports/wide.duckdb); writes
                                                       # reports/wide.selection_redraw.md

Why: every merge picks its hyperparameters on `merge_select` validation images per task (50 in the default study,
to fit its time budget). On so few images the best and second grid points are often within noise, so the pick is
partly luck. This re-runs the sweep's own selection (`MergeSweep.select`, the same rule, the same grid) on a fresh
draw of as many validation images per task, disjoint from the study's (the split has 1,000 per task in the six-task
study; a smaller split gives what the study's subset left, and the report says so), and reports
per method: how often the pick changes, and how mean retention on the merges' test images moves when it does (the
new pick scored on the very test images of the stored merge); per k: whether the method the findings would choose
(highest mean chosen validation accuracy; `study/findings/figures.choose_methods`) changes. Nothing is written to
the results database.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merging.methods import get_method, list_methods  # noqa: E402
from merging.sweep import MergeSweep  # noqa: E402
from mlvision.config import PROFILES  # noqa: E402
from mlvision.data import SUBSET_SEED, subset_indices  # noqa: E402
from mlvision.evaluation import accuracy_of, task_correct  # noqa: E402
from mlvision.paths import DEFAULT_DB_PATH, REPO_ROOT  # noqa: E402
from mlvision.store import Store  # noqa: E402
from mlvision.tasks import load_task  # noqa: E402
from study.findings.figures import is_transductive  # noqa: E402


class RedrawSweep(MergeSweep):
    """The study's sweep with its validation subset replaced by draw `draw` (1, 2, ...): as many images per task as
    the study's, drawn (seeded) from the validation images the study's subset left out."""

    def __init__(self, config, store, draw: int):
        super().__init__(config, store)
        self.draw = draw
        self._fresh: dict[str, tuple] = {}
        self.fresh_sizes: dict[str, int] = {}  # images per task in the fresh draw (fewer where the split is small)

    def eval_tensors(self, task: str, split: str = "test"):
        if split != "validation":
            return super().eval_tensors(task, split)
        if task not in self._fresh:
            dataset = load_task(task)["validation"]
            used = set(subset_indices(len(dataset), self.config.merge_select).tolist())
            rest = np.array([i for i in range(len(dataset)) if i not in used])
            rng = np.random.default_rng([SUBSET_SEED, self.draw])
            chosen = np.sort(rng.choice(rest, size=min(self.config.merge_select, len(rest)), replace=False))
            subset = dataset.select(chosen)
            self.fresh_sizes[task] = len(chosen)
            self._fresh[task] = (self.preprocess(subset["image"]), torch.tensor(subset["label"], dtype=torch.long))
        return self._fresh[task]


def redraw(config, seeds: list[int], draws: int, pairs: int | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """One row per (stored merge of a tuned, non-transductive method of `seeds`, draw) of the study `config` (its
    database, tasks and validation size): the stored and the fresh pick, their validation accuracies, and the mean
    retention over the merge's tasks at each pick; and the fresh draw's size per task where it is smaller than the
    study's. `pairs`: redraw only a seeded sample of that many pairs (the same pairs for every method) beside every
    larger group, where the study has many (the wide one: 190)."""
    store = Store(config.db)
    merges = store.query_df(
        "SELECT merge_id, method, k, tasks, seed, hyperparams, selection FROM merges WHERE seed IN ({})".format(
            ",".join(str(int(s)) for s in seeds)
        )
    )
    merges = merges[[get_method(m).tuned and not is_transductive(m) for m in merges["method"]]]
    all_pairs = sorted(set(merges.loc[merges["k"] == 2, "tasks"]))
    if pairs is not None and pairs < len(all_pairs):
        kept = set(np.random.default_rng(SUBSET_SEED).choice(all_pairs, size=pairs, replace=False))
        merges = merges[(merges["k"] > 2) | merges["tasks"].isin(kept)]
    evaluations = store.query_df("SELECT merge_id, task, merged_accuracy, single_accuracy FROM merge_evaluations")
    stored_retention = (
        evaluations.assign(r=evaluations["merged_accuracy"] / evaluations["single_accuracy"])
        .groupby("merge_id")["r"]
        .mean()
    )
    singles = evaluations.groupby(["merge_id", "task"])["single_accuracy"].first()
    rows, smaller = [], {}
    for draw in range(1, draws + 1):
        sweep = RedrawSweep(config, store, draw)
        sweep.load_adapters(set(seeds))
        sweep.prepare_grams([(tuple(t.split(",")), s, m) for t, s, m in merges[["tasks", "seed", "method"]].values])
        for merge in tqdm(merges.itertuples(index=False), total=len(merges), desc=f"draw {draw}", unit="merge"):
            group = tuple(merge.tasks.split(","))
            stored_params, stored_selection = json.loads(merge.hyperparams), json.loads(merge.selection)
            selection = sweep.select(group, merge.seed, merge.method)
            changed = any(selection.params.get(k) != v for k, v in stored_selection["chosen"].items())
            retention = stored_retention[merge.merge_id]
            if changed:
                heads = {task: sweep.adapters[(task, merge.seed)].head for task in group}
                model = sweep.folded.model(selection.merged, heads)
                correct = task_correct(model, {task: sweep.eval_tensors(task) for task in group})
                retention = float(np.mean([accuracy_of(correct[t]) / singles[(merge.merge_id, t)] for t in group]))
            rows.append(
                {
                    "draw": draw,
                    "merge_id": merge.merge_id,
                    "method": merge.method,
                    "k": merge.k,
                    "seed": merge.seed,
                    "stored_pick": json.dumps({k: stored_params.get(k) for k in stored_selection["chosen"]}),
                    "fresh_pick": json.dumps(selection.record["chosen"]),
                    "changed": changed,
                    "stored_validation": stored_selection["chosen_validation_accuracy"],
                    "fresh_validation": selection.record["chosen_validation_accuracy"],
                    "stored_retention": stored_retention[merge.merge_id],
                    "fresh_retention": retention,
                }
            )
        smaller |= {task: n for task, n in sweep.fresh_sizes.items() if n < config.merge_select}
    return pd.DataFrame(rows), smaller


def chosen_method(rows: pd.DataFrame, column: str) -> dict[int, str]:
    """Per k: the method with the highest mean validation accuracy in `column` (the findings' rule, over the
    methods that merged every group at every k in `rows`)."""
    out = {}
    every_k = set(rows["k"])  # a method swept on a subset (groups of 2 and 6 only) never competes, as in the findings
    full = [m for m, mine in rows.groupby("method") if set(mine["k"]) == every_k]
    for k, at_k in rows[rows["method"].isin(full)].groupby("k"):
        coverage = at_k.groupby("method")["merge_id"].nunique()
        complete = at_k[at_k["method"].isin(coverage[coverage == coverage.max()].index)]
        scores = complete.groupby("method")[column].mean()
        out[int(k)] = sorted(scores.index[scores >= scores.max() - 1e-12])[0]
    return out


def report(
    rows: pd.DataFrame,
    merge_select: int,
    seeds: list[int],
    smaller: dict[str, int] | None = None,
    pairs: int | None = None,
) -> str:
    """The markdown report: per method, per k, and the findings' chosen method under each draw."""
    smaller_note = (
        " The validation split of "
        + ", ".join(f"{task} leaves {n}" for task, n in sorted(smaller.items()))
        + " images beside the study's, so its fresh draw is that large."
        if smaller
        else ""
    )
    lines = [
        "# How much a fresh validation draw moves the study's choices",
        "",
        f"Written by `python scripts/selection_redraw.py` (seeds {', '.join(map(str, seeds))}; "
        f"{rows['draw'].nunique()} fresh draw(s) of {merge_select} validation images per task, disjoint from the "
        "study's). Each stored merge's grid is scored again on the fresh draw with the sweep's own rule; where the "
        "pick changes, the new pick is scored on the stored merge's test images. Retention = merged / single "
        "adapter accuracy on those images, mean over the group's tasks, in percent."
        + smaller_note
        + (
            f" Pairs: a seeded sample of {pairs} (`--pairs`), the same for every method; every larger group."
            if pairs
            else ""
        ),
        "",
        "| method | merges | pick changed | mean retention, study's pick | fresh pick | fresh − study "
        "(points) | largest move |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, mine in rows.groupby("method"):
        delta = (mine["fresh_retention"] - mine["stored_retention"]) * 100
        lines.append(
            f"| {method} | {len(mine)} | {mine['changed'].mean() * 100:.0f} % | "
            f"{mine['stored_retention'].mean() * 100:.1f} | {mine['fresh_retention'].mean() * 100:.1f} | "
            f"{delta.mean():+.2f} | {delta.abs().max():.1f} |"
        )
    lines += ["", "Per k (every method together):", "", "| k | merges | pick changed | fresh − study (points) |",
              "|---|---|---|---|"]  # fmt: skip
    for k, mine in rows.groupby("k"):
        delta = (mine["fresh_retention"] - mine["stored_retention"]) * 100
        lines.append(f"| {k} | {len(mine)} | {mine['changed'].mean() * 100:.0f} % | {delta.mean():+.2f} |")
    lines += ["", "The method the findings' rule would choose per k (highest mean chosen validation accuracy):", ""]
    for draw, mine in rows.groupby("draw"):
        stored, fresh = chosen_method(mine, "stored_validation"), chosen_method(mine, "fresh_validation")
        same = [k for k in stored if stored[k] == fresh[k]]
        lines.append(
            f"- draw {draw}: the same at {len(same)} of {len(stored)} k ("
            + "; ".join(f"k={k}: {stored[k]}" + ("" if stored[k] == fresh[k] else f" → {fresh[k]}") for k in stored)
            + ")"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        default="default",
        choices=sorted(PROFILES),
        help="the study's profile: its tasks, validation size and database (default: default)",
    )
    parser.add_argument("--db", type=Path, help="the study's results database (default: the profile's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds whose merges are redrawn")
    parser.add_argument("--draws", type=int, default=1, help="fresh validation draws (each as large as the study's)")
    parser.add_argument(
        "--pairs", type=int, help="a seeded sample of this many pairs beside every larger group (default: every pair)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="default: reports/selection_redraw.md for the default study, else "
        "<database stem>.selection_redraw.md beside its database",
    )
    parser.add_argument("--from-csv", type=Path, help="re-render the report from a run's saved rows (no merging)")
    args = parser.parse_args(argv)
    config = PROFILES[args.config].with_methods(tuple(list_methods()))
    config = replace(config, db=args.db or config.db)
    if args.out is None:
        default = config.db == DEFAULT_DB_PATH
        args.out = REPO_ROOT / "reports" / "selection_redraw.md" if default else config.db.with_name(
            f"{config.db.stem}.selection_redraw.md")  # fmt: skip
    source = args.from_csv or config.db
    if not source.exists():  # a study script, but one line all the same
        print(f"error: {source}: no such file", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows, smaller = (
        (pd.read_csv(args.from_csv), None) if args.from_csv else redraw(config, args.seeds, args.draws, args.pairs)
    )
    args.out.write_text(report(rows, config.merge_select, sorted(set(rows["seed"])), smaller, args.pairs))
    if not args.from_csv:
        rows.to_csv(args.out.with_suffix(".csv"), index=False)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
