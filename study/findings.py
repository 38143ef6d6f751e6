"""Similarity per task pair and the paper's three claims, measured from the stored merges.

Writes the `task_similarity` rows, the `findings` rows (each with a 95 % CI and its n, or NULL
with the reason when the data cannot support the statistic), and `reports/findings.md`,
generated from the database alone: no number in it is typed by hand.

Statistics: bootstrap CIs (2,000 resamples, fixed seed) for means, Spearman ρ and differences;
Wilson intervals for shares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from merging.deltas import load_deltas
from mlvision.backbone import create_backbone, make_preprocess
from mlvision.config import StudyConfig
from mlvision.data import split_tensors
from mlvision.evaluation import extract_features, prepared_copy
from mlvision.paths import REPO_ROOT
from mlvision.runs import resolve_stored_path, study_run_id
from mlvision.store import Store, insert_row, now
from mlvision.tasks import get_task
from study.similarity import adapter_cosine, frechet_distance, pairs, subspace_alignment

BOOTSTRAP = 2000
MIN_PAIRS = 4
MEASURES = ("frechet", "adapter_cosine", "subspace_alignment")


def bootstrap_ci(values, statistic, rng) -> tuple[float, float]:
    values = np.asarray(values)
    draws = [statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(BOOTSTRAP)]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return float(low), float(high)


def wilson(successes: int, n: int) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    z, p = 1.96, successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


class FindingsStage:
    def __init__(self, config: StudyConfig, store: Store, report: Path = REPO_ROOT / "reports" / "findings.md"):
        self.config, self.store, self.report = config, store, Path(report)
        self.run_id = study_run_id(config)

    # -- similarity ------------------------------------------------------------------------------
    def compute_similarity(self) -> int:
        stored = {tuple(r) for r in self.store.query("SELECT task_a, task_b, measure, seed FROM similarities")}
        todo = [
            (a, b, seed)
            for a, b in pairs(self.config.tasks)
            for seed in self.config.seeds
            if any((a, b, m, seed) not in stored for m in MEASURES)
        ]
        if not todo:
            return 0
        backbone = create_backbone(self.config.backbone_config)
        preprocess = make_preprocess(self.config.backbone_config, backbone)
        fast_backbone = prepared_copy(backbone)
        features = {
            t: extract_features(fast_backbone, split_tensors(t, "test", preprocess, self.config.merge_eval)[0])
            for t in self.config.tasks
        }
        adapters = {}
        for task in self.config.tasks:
            for seed in self.config.seeds:
                path = self.store.query(
                    "SELECT path FROM models WHERE model_id = ?", [self.config.model_id("adapter", task, seed)]
                )
                adapters[(task, seed)] = load_deltas(resolve_stored_path(path[0][0])) if path else None
        config = {"backbone": self.config.backbone_config.to_dict(), "frechet_images_per_task": self.config.merge_eval}
        frechet = {}  # data-level: depends on the pair only, not on the seed
        for a, b, seed in tqdm(todo, desc="similarity", unit="pair"):
            if (a, b) not in frechet:
                frechet[(a, b)] = frechet_distance(features[a], features[b])
            values = {"frechet": frechet[(a, b)]}
            if adapters[(a, seed)] is not None and adapters[(b, seed)] is not None:
                values["adapter_cosine"] = adapter_cosine(adapters[(a, seed)], adapters[(b, seed)])
                values["subspace_alignment"] = subspace_alignment(adapters[(a, seed)], adapters[(b, seed)])
            with self.store.write() as con:
                for measure, value in values.items():
                    insert_row(
                        con,
                        "similarities",
                        {
                            "task_a": a,
                            "task_b": b,
                            "measure": measure,
                            "value": value,
                            "seed": seed,
                            "config": config,
                            "run_id": self.run_id,
                            "created_at": now(),
                        },
                        key=("task_a", "task_b", "measure", "seed"),
                    )
        return len(todo)

    # -- findings --------------------------------------------------------------------------------
    def compute_findings(self) -> list[dict]:
        rng = np.random.default_rng(0)
        tasks = tuple(sorted(self.config.tasks))
        merges = self.store.query_df("SELECT * FROM merge_results")
        merges = merges[merges["tasks"].map(lambda g: set(g.split(",")) <= set(tasks))]
        similarity = self.store.query_df(
            "SELECT task_a, task_b, measure, avg(value) AS value FROM task_similarity GROUP BY ALL"
        )
        rows: list[dict] = []

        def add(finding, statistic, value=None, ci=(None, None), n=0, note=None):
            ok = value is not None and np.isfinite(value)
            rows.append(
                {
                    "finding": finding,
                    "statistic": statistic,
                    "value": float(value) if ok else None,
                    "ci_low": ci[0] if ok else None,
                    "ci_high": ci[1] if ok else None,
                    "n": int(n),
                    "note": note if ok or note else "not available",
                }
            )

        for (method, k), group in merges.groupby(["method", "k"]):
            values = group["normalized_accuracy"].dropna().to_numpy()
            if len(values) < 2:
                add("retention_vs_k", f"{method}/k={k}", n=len(values), note="fewer than 2 rows")
            else:
                add("retention_vs_k", f"{method}/k={k}", values.mean(), bootstrap_ci(values, np.mean, rng), len(values))
            wins = int((group["merged_accuracy"] > group["head_accuracy"]).sum())
            add("beats_head", f"{method}/k={k}", wins / len(group), wilson(wins, len(group)), len(group))

        pair_rows = merges[merges["k"] == 2]
        pair_retention = pair_rows.groupby("tasks")["normalized_accuracy"].mean()
        domains = {t: get_task(t).domain for t in tasks}
        for measure in MEASURES:
            table = similarity[similarity["measure"] == measure]
            joined = pd.DataFrame(
                {
                    "retention": pair_retention,
                    "value": table.set_index(table["task_a"] + "," + table["task_b"])["value"],
                }
            ).dropna()
            if len(joined) < MIN_PAIRS:
                add(
                    "pair_similarity",
                    f"spearman/{measure}",
                    n=len(joined),
                    note=f"fewer than {MIN_PAIRS} pairs with both figures",
                )
                continue
            data = joined.to_numpy()
            rho = stats.spearmanr(data[:, 0], data[:, 1]).statistic
            ci = bootstrap_ci(
                np.arange(len(data)), lambda idx: stats.spearmanr(data[idx, 0], data[idx, 1]).statistic, rng
            )
            add("pair_similarity", f"spearman/{measure}", rho, ci, len(data))
        same = np.array([r for g, r in pair_retention.items() if domains[g.split(",")[0]] == domains[g.split(",")[1]]])
        cross = np.array([r for g, r in pair_retention.items() if domains[g.split(",")[0]] != domains[g.split(",")[1]]])
        if len(same) < 2 or len(cross) < 2:
            add(
                "pair_similarity",
                "cross_minus_same_domain",
                n=len(same) + len(cross),
                note=f"needs at least 2 same-domain and 2 cross-domain pairs (have {len(same)} and {len(cross)})",
            )
        else:
            draws = [
                rng.choice(cross, len(cross)).mean() - rng.choice(same, len(same)).mean() for _ in range(BOOTSTRAP)
            ]
            add(
                "pair_similarity",
                "cross_minus_same_domain",
                cross.mean() - same.mean(),
                tuple(float(x) for x in np.percentile(draws, [2.5, 97.5])),
                len(same) + len(cross),
                note=f"{len(same)} same-domain pairs, {len(cross)} cross-domain pairs",
            )
        return rows

    def stored_findings(self) -> dict[tuple, tuple]:
        """(finding, statistic) -> (value, ci_low, ci_high, n, note, run_id) as stored now."""
        columns = "finding, statistic, value, ci_low, ci_high, n, note, run_id"
        return {(r[0], r[1]): tuple(r[2:]) for r in self.store.query(f"SELECT {columns} FROM finding_rows")}

    def store_findings(self, rows: list[dict]) -> bool:
        """Replace the stored findings with `rows`; returns False (and writes nothing) when they are the same.

        A run with nothing new computes exactly the stored figures again (fixed bootstrap seed), and
        leaving the file untouched keeps a fresh clone's results.duckdb byte-identical.
        """
        fields = ("value", "ci_low", "ci_high", "n", "note")
        wanted = {(r["finding"], r["statistic"]): (*(r[f] for f in fields), self.run_id) for r in rows}
        if wanted == self.stored_findings():
            return False
        with self.store.write() as con:  # derived figures: replaced as a whole, in one transaction
            con.execute("DELETE FROM finding_rows")
            for row in rows:
                insert_row(
                    con,
                    "finding_rows",
                    {**row, "run_id": self.run_id, "created_at": now()},
                    key=("finding", "statistic"),
                )
        return True

    # -- report ----------------------------------------------------------------------------------
    def write_report(self) -> None:
        findings = self.store.query_df("SELECT * FROM findings")
        text = render_report(findings)
        if self.report.exists() and self.report.read_text() == text:
            return  # unchanged: the file (and its timestamp) is left alone
        self.report.parent.mkdir(parents=True, exist_ok=True)
        self.report.write_text(text)

    def run(self) -> dict:
        computed = self.compute_similarity()
        rows = self.compute_findings()
        changed = self.store_findings(rows)
        self.write_report()
        return {"pairs": computed, "findings": len(rows), "changed": changed}


def _fmt(row, percent=True) -> str:
    if row["value"] is None or pd.isna(row["value"]):
        return f"n/a ({row['note']})"
    if not percent:
        return f"{row['value']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}] (n={row['n']})"
    return f"{row['value'] * 100:.1f} % [{row['ci_low'] * 100:.1f}, {row['ci_high'] * 100:.1f}] (n={row['n']})"


def _with_method_and_k(rows: pd.DataFrame) -> pd.DataFrame:
    """A copy of findings rows whose statistic is named "method/k=K", with `method` and `k` columns."""
    rows = rows.copy()
    rows[["method", "k"]] = rows["statistic"].str.extract(r"(.+)/k=(\d+)")
    rows["k"] = rows["k"].astype(int)
    return rows


def _method_by_k_table(rows: pd.DataFrame, heading: str) -> list[str]:
    """Markdown lines: `heading`, then one row per method and one column per k (`_with_method_and_k` rows)."""
    ks = sorted(rows["k"].unique())
    lines = [heading, "", "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for method, group in rows.groupby("method"):
        cells = {r["k"]: _fmt(r) for _, r in group.iterrows()}
        lines.append(f"| {method} | " + " | ".join(cells.get(k, "") for k in ks) + " |")
    return lines


def render_report(findings: pd.DataFrame) -> str:
    """The findings as Markdown; every figure comes from the `findings` view."""
    lines = [
        "# Findings",
        "",
        "Generated by `python training/run_all.py` (stage `findings`) from `results.duckdb`; "
        "do not edit by hand. Brackets: 95 % CI; n: rows, or task pairs for pair statistics.",
        "",
    ]
    retention = _with_method_and_k(findings[findings["finding"] == "retention_vs_k"])
    if retention.empty:
        return "\n".join(lines + ["No merges stored yet."]) + "\n"
    lines += _method_by_k_table(retention, "## Retention (merged / single-adapter accuracy) by group size")
    wins = _with_method_and_k(findings[findings["finding"] == "beats_head"])
    lines += [""] + _method_by_k_table(
        wins, "## Share of (group, task) rows where the merged model beats the head baseline"
    )
    pair = findings[findings["finding"] == "pair_similarity"]
    lines += [
        "",
        "## Pair merges (k = 2) against task similarity",
        "",
        "Retention of a pair = mean normalized accuracy over its two tasks, all methods and seeds.",
        "",
    ]
    for _, row in pair.iterrows():
        lines.append(
            f"- {row['statistic']}: {_fmt(row, percent=row['statistic'].startswith('cross'))}"
            + (f"; {row['note']}" if isinstance(row["note"], str) and not pd.isna(row["value"]) else "")
        )
    lines += ["", "## The paper's three claims", ""] + claims(retention, wins, pair)
    return "\n".join(lines) + "\n"


def claims(retention: pd.DataFrame, wins: pd.DataFrame, pair: pd.DataFrame) -> list[str]:
    """Plain verdicts, each derived from the figures above with a stated rule."""
    out = []
    best3 = retention[retention["k"] <= 3].groupby("method")["ci_low"].min().dropna()
    if best3.empty:
        out.append("1. *Merging up to three adapters works*: not enough data.")
    else:
        method = best3.idxmax()
        verdict = "supported" if best3.max() >= 0.9 else "not supported"
        out.append(
            f"1. *Merging up to three adapters works* (rule: some method keeps >= 90 % of single-adapter accuracy "
            f"at k = 2 and 3, lower CI bound): **{verdict}**; best: {method}, "
            f"lowest CI bound {best3.max() * 100:.1f} %."
        )
    frechet = pair[pair["statistic"] == "spearman/frechet"]
    domain = pair[pair["statistic"] == "cross_minus_same_domain"]
    if frechet.empty or frechet["value"].isna().all():
        out.append("2. *Dissimilar data merges better*: not enough pairs to test.")
    else:
        f, d = frechet.iloc[0], domain.iloc[0] if not domain.empty else None
        has_domain = d is not None and not pd.isna(d["value"])
        positive = f["ci_low"] > 0 and (not has_domain or d["ci_low"] > 0)
        negative = f["ci_high"] < 0 or (has_domain and d["ci_high"] < 0)
        verdict = "supported" if positive else "contradicted" if negative else "not supported (inconclusive)"
        domain_text = (
            (
                f"; cross-domain minus same-domain retention {d['value'] * 100:.1f} points "
                f"[{d['ci_low'] * 100:.1f}, {d['ci_high'] * 100:.1f}], n = {d['n']} pairs"
            )
            if has_domain
            else ""
        )
        out.append(
            f"2. *Adapters trained on dissimilar data merge better* (rule: supported if Spearman ρ of retention "
            f"with Fréchet distance and the cross-domain minus same-domain difference are both > 0 with their CIs; "
            f"contradicted if either is < 0 with its CI): **{verdict}**; "
            f"ρ = {f['value']:.2f} [{f['ci_low']:.2f}, {f['ci_high']:.2f}], n = {f['n']} pairs{domain_text}."
        )
    some = wins[wins["ci_low"] > 0]
    verdict = "supported" if not some.empty else "not supported"
    out.append(
        f"3. *Merges sometimes beat head finetuning* (rule: for some method and k the share of rows beating the "
        f"head baseline is > 0 with its CI): **{verdict}**; {len(some)} of {len(wins)} (method, k) cells."
    )
    return out
