"""The findings stage as run_all runs it: read the study's rows, compute every findings row, store them (only
when they changed) and write the report. Task similarity, which loads a backbone, is its own stage before this
one (study/similarity.py, `SimilarityStage`); this stage reads its rows from the `task_similarity` view."""

from __future__ import annotations

from pathlib import Path

from mlvision.config import StudyConfig
from mlvision.runs import study_run_id
from mlvision.store import Store, config_hash, insert_row, now
from study.findings.analysis import compute_rows
from study.findings.exclusion import ExclusionRules
from study.findings.inputs import StudyInputs, prepare_merges
from study.findings.report import render_report, report_path
from training.probe import probe_config


class FindingsStage:
    def __init__(self, config: StudyConfig, store: Store, report: Path | None = None):
        """`report`: the Markdown file written (default: `report_path(config.db)`)."""
        self.config, self.store = config, store
        self.report = Path(report) if report is not None else report_path(config.db)
        self.run_id = study_run_id(config)
        self.rules = ExclusionRules.from_config(config)

    def load_inputs(self) -> StudyInputs:
        """The study's rows from the store: its tasks' merges, its own models' test results and norms."""
        tasks = tuple(sorted(self.config.tasks))
        merges = self.store.query_df("SELECT * FROM merge_results")
        merges = merges.loc[merges["tasks"].map(lambda g: set(g.split(",")) <= set(tasks)).astype(bool)]
        ids = {
            self.config.model_id(kind, task, seed): kind
            for kind in ("adapter", "head")
            for task in tasks
            for seed in self.config.seeds
        }
        results = self.store.query_df("SELECT task, model_kind, seed, accuracy, n_test, model_id FROM task_results")
        results = results[results["model_id"].isin(ids)]
        norms = self.store.query_df("SELECT model_id, task, seed, update_norm FROM adapter_update_norms")
        norms = norms[norms["model_id"].isin(ids)]
        similarity = self.store.query_df(
            "SELECT task_a, task_b, measure, avg(value) AS value FROM task_similarity GROUP BY ALL"
        )
        probe_ids = {config_hash(probe_config(self.config, task)) for task in tasks}
        probes = self.store.query_df("SELECT * FROM probe_results")
        probes = probes[probes["model_id"].isin(probe_ids)]
        return StudyInputs(prepare_merges(merges, probes), results, norms, similarity, tasks, self.rules, probes=probes)

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

    def write_report(self) -> None:
        findings = self.store.query_df("SELECT * FROM findings")
        text = render_report(findings, self.rules, Path(self.config.db).name)
        if self.report.exists() and self.report.read_text() == text:
            return  # unchanged: the file (and its timestamp) is left alone
        self.report.parent.mkdir(parents=True, exist_ok=True)
        self.report.write_text(text)

    def run(self) -> dict:
        rows = compute_rows(self.load_inputs())
        changed = self.store_findings(rows)
        self.write_report()
        return {"findings": len(rows), "changed": changed}
