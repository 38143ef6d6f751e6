"""Merge then compress against compress then merge (issue 35): the accuracy of a rank-r LoRA export both ways.

    python scripts/export_pipelines.py                  # the committed study; writes reports/export_pipelines.md
    python scripts/export_pipelines.py --ranks 4 8 16 --groups-per-k 3 --methods task_arithmetic ties regmean

Why: every export of a merge is a rank-r LoRA. The default pipeline merges in full space and truncates each merged
ΔW's SVD at r (merging/export.py, "merge then compress"); `merge.py --compress-first` merges in the group's rank-r
Core Space instead, so the LoRA holds its merge exactly (merging/methods/core_space.py, "compress then merge").
Which loses less accuracy is an empirical question. For a sample of the stored study's groups (every size k, a
seeded sample of `--groups-per-k` groups of each k, the first seed) and each method, each pipeline chooses its
method's grid point at each rank on `--select-images` validation images per task, by the sweep's rule
(`merging/sweep.select_on_validation`: a compressed merge may want another strength than the full one), or with
`--select-images 0` both use the stored full merge's hyperparameters; each export is scored on the test images
the sweep scored that merge on (`merge_eval` per task). Figures: mean
accuracy over the group's tasks as a share of each task's single adapter (retention, the study's normalised
accuracy), per (method, k, rank, pipeline). The full merge is recomputed and checked against the stored accuracy
first (the rebuild is exact, so a mismatch stops the script). Nothing is written to the results database.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merging.export import LowRankMerge  # noqa: E402
from merging.merge import rebuild_stored_merge  # noqa: E402
from merging.methods import get_method  # noqa: E402
from merging.methods.core_space import compressed_name  # noqa: E402
from merging.sources import OwnAdapters  # noqa: E402
from merging.sweep import select_on_validation  # noqa: E402
from mlvision.paths import DEFAULT_DB_PATH, REPO_ROOT  # noqa: E402
from mlvision.store import Store  # noqa: E402

REPORT = REPO_ROOT / "reports" / "export_pipelines.md"


def stored_merges(db: Path, methods: list[str], seed: int) -> pd.DataFrame:
    """One row per (stored merge, task) of `methods` at `seed`: tasks, hyperparameters, n, accuracies."""
    return Store(db).query_df(
        "SELECT merge_id, method, k, tasks, task, hyperparams, n, merged_accuracy, single_accuracy "
        "FROM merge_results WHERE seed = ? AND method IN (SELECT unnest(?))",
        [seed, methods],
    )


def sample_groups(rows: pd.DataFrame, per_k: int, rng: random.Random) -> list[str]:
    """Every k's groups stored for every method asked, `per_k` of them drawn (all where fewer)."""
    common = set.intersection(*(set(part["tasks"]) for _, part in rows.groupby("method")))
    chosen = []
    for k in sorted(rows["k"].unique()):
        groups = sorted(g for g in common if len(g.split(",")) == k)
        chosen += groups if len(groups) <= per_k else sorted(rng.sample(groups, per_k))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=DEFAULT_DB_PATH)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "regmean"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--groups-per-k", type=int, default=3)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument(
        "--select-images",
        type=int,
        default=50,
        help="validation images per task on which each pipeline chooses its grid point at each rank (the sweep's "
        "rule and the default study's 50); 0: both use the full merge's stored hyperparameters",
    )
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)

    source = OwnAdapters.from_db(args.db)
    rows = stored_merges(args.db, args.methods, source.seed)
    groups = sample_groups(rows, args.groups_per_k, random.Random(args.sample_seed))
    records = []
    work = [(g, m) for g in groups for m in args.methods]
    for tasks, method in tqdm(work, desc="groups x methods", unit="merge"):
        stored = rows[(rows["tasks"] == tasks) & (rows["method"] == method)]
        group = tasks.split(",")
        hyperparams = json.loads(stored["hyperparams"].iloc[0])
        n = int(stored["n"].iloc[0])
        test = source.split("test", dict.fromkeys(group, n))
        single = dict(zip(stored["task"], stored["single_accuracy"]))
        full = rebuild_stored_merge(source, group, method, hyperparams)
        full_accuracy = source.score(full, test)
        for task, value in zip(stored["task"], stored["merged_accuracy"]):
            if abs(full_accuracy[task] - value) > 1e-9:
                raise SystemExit(f"{method} {tasks}: rebuilt {task} {full_accuracy[task]} != stored {value}")

        def record(pipeline: str, rank: int | None, accuracy: dict) -> None:
            retention = sum(accuracy[t] / single[t] for t in group) / len(group)
            records.append({"method": method, "k": len(group), "tasks": tasks, "pipeline": pipeline, "rank": rank,
                            "retention": retention})  # fmt: skip

        record("full merge", None, full_accuracy)
        if not args.select_images:  # both pipelines at the full merge's stored hyperparameters
            low_rank = LowRankMerge(full)
            for rank in args.ranks:
                record("merge then compress", rank, source.score(low_rank.approximation(rank), test))
                compressed = rebuild_stored_merge(source, group, compressed_name(method, rank), hyperparams)
                record("compress then merge", rank, source.score(compressed, test))
            continue
        # each pipeline chooses its own grid point at each rank, on validation, by the sweep's rule
        validation = source.split("validation", dict.fromkeys(group, args.select_images))
        n_validation = min(len(labels) for _, labels in validation.values())

        def validation_score(deltas: dict) -> float:
            accuracy = source.score(deltas, validation)
            return sum(accuracy.values()) / len(accuracy)

        points = get_method(method).grid_points(len(group))
        low_ranks = [LowRankMerge(rebuild_stored_merge(source, group, method, point)) for point in points]
        for rank in args.ranks:
            truncated = ((i, low_ranks[i].approximation(rank), point) for i, point in enumerate(points))
            chosen = select_on_validation(get_method(method), len(group), truncated, validation_score, n_validation)
            record("merge then compress", rank, source.score(chosen.merged, test))
            name = compressed_name(method, rank)
            merges = ((i, rebuild_stored_merge(source, group, name, point), point) for i, point in enumerate(points))
            chosen = select_on_validation(get_method(name), len(group), merges, validation_score, n_validation)
            record("compress then merge", rank, source.score(chosen.merged, test))
    table = pd.DataFrame(records)
    args.out.write_text(render(table, args, len(groups), source.seed))
    print(f"wrote {args.out}")
    return 0


def render(table: pd.DataFrame, args, n_groups: int, seed: int) -> str:
    lines = [
        "# Export pipelines: merge then compress vs compress then merge (issue 35)",
        "",
        f"Written by `python scripts/export_pipelines.py` from `{args.db.name}`: {n_groups} groups (every k, up to "
        f"{args.groups_per_k} per k drawn with seed {args.sample_seed}), adapters of seed {seed}; "
        + (
            f"each pipeline chooses its method's grid point at each rank on {args.select_images} validation images "
            "per task (the sweep's rule), the full merge is the stored one; "
            if args.select_images
            else "both pipelines at the hyperparameters the sweep chose for the full merge; "
        )
        + "retention = mean over the group's tasks of accuracy / the task's single adapter, on the sweep's test "
        "images, in %.",
        "",
    ]
    columns = [("full merge", None)] + [
        (p, r) for r in args.ranks for p in ("merge then compress", "compress then merge")
    ]
    header = ["k", "groups"] + [name if rank is None else f"{name} r={rank}" for name, rank in columns]
    for method, part in table.groupby("method", sort=False):
        lines += [f"## {method}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for k, at_k in part.groupby("k"):
            cells = [str(k), str(at_k["tasks"].nunique())]
            for name, rank in columns:
                chosen = at_k[
                    (at_k["pipeline"] == name) & (at_k["rank"].isna() if rank is None else at_k["rank"] == rank)
                ]
                cells.append(f"{100 * chosen['retention'].mean():.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
