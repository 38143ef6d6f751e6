"""The dashboard: every page under AppTest on real databases, the data behind its charts checked
against direct SQL on the views; broken databases give messages, never tracebacks; and one
real-browser pass (headless Chromium) over every page.

Databases used:
- `tiny_study`: built by the project's own pipeline (conftest);
- `full_db`: every view filled (merges, similarity, findings, benchmarks) through the
  project's own `Store`, with seeded numbers, so the pages whose stages may not have run in
  the tiny study are still checked against SQL;
- the committed `results.duckdb`, when present.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from browser import DevTools, free_port, start_chromium, stop, wait_http
from streamlit.testing.v1 import AppTest

from dashboard.charts import METHOD_COLORS
from dashboard.pages import PAGES as REGISTERED_PAGES
from merging.plan import PlanStage
from mlvision.config import StudyConfig
from mlvision.paths import DEFAULT_DB_PATH, REPO_ROOT
from mlvision.store import Store, unpack_correct

APP = str(REPO_ROOT / "dashboard" / "app.py")
# Every page of the registry (dashboard/pages/__init__.py), read from it: a new page is rendered on the tiny study, the
# committed database and the broken ones without being listed here.
PAGES = list(REGISTERED_PAGES)


# ------------------------------------------------------------------------------ helpers


SECTIONS_HINT = (
    "the Performance page draws the sections of benchmarks/sections/__init__.py in registry order, and the "
    "performance tests find their charts by position"
)


def render(db, page: str, params: dict | None = None, monkeypatch=None) -> AppTest:
    os.environ["MLV_DB"] = str(db)
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["page"] = page
    for key, value in (params or {}).items():
        at.query_params[key] = value
    at.run()
    return at


def figures(at: AppTest) -> list[dict]:
    """The plotly figures of the page, arrays decoded to lists (plotly sends numpy data base64-packed)."""
    return [_decode(json.loads(element.proto.spec)) for element in at.get("plotly_chart")]


def _decode(value):
    if isinstance(value, dict):
        if "bdata" in value and "dtype" in value:
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
            if "shape" in value:
                shape = value["shape"]
                array = array.reshape([int(n) for n in str(shape).split(",")] if isinstance(shape, str) else shape)
            return array.tolist()
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


def lines(figure: dict) -> dict[str, tuple[list, list]]:
    """name -> (x, y) of the line traces (bands have mode 'none')."""
    return {
        t["name"]: (list(t["x"]), list(t["y"]))
        for t in figure["data"]
        if t.get("type", "scatter") == "scatter"
        and "lines" in t.get("mode", "")
        and t.get("legendgroup") != "reference"
    }


def bars(figure: dict) -> dict[str, dict]:
    return {t["name"]: dict(zip(t["x"], t["y"])) for t in figure["data"] if t.get("type") == "bar"}


def sql(db, query: str) -> pd.DataFrame:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(query).df()


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.fixture(autouse=True)
def _restore_env():
    saved = os.environ.get("MLV_DB")
    yield
    if saved is None:
        os.environ.pop("MLV_DB", None)
    else:
        os.environ["MLV_DB"] = saved


# ----------------------------------------------------------------- a fully populated database


def build_full_db(path: Path) -> Path:
    """Every view a page reads filled, through the project's Store (schema, views) with seeded numbers.

    A new page that reads a view not filled here (adapter_update_norms), or a new benchmark section the Performance
    page draws, adds its rows below, so its AppTest has data to check against SQL.
    """
    rng = np.random.default_rng(0)
    tasks = {"mnist": "digits", "uci_digits": "digits", "lfw_faces": "photos", "textures": "photos"}
    store = Store(path)
    store.initialise()
    seeds = [0, 1]
    single = {t: 0.9 + 0.02 * i for i, t in enumerate(tasks)}
    head = {t: 0.7 + 0.03 * i for i, t in enumerate(tasks)}
    models, evaluations, merges, merge_evals, sims = [], [], [], [], []
    for task, seed, kind in itertools.product(tasks, seeds, ["head", "adapter"]):
        model_id = f"{kind}-{task}-{seed}"
        models.append(
            dict(
                model_id=model_id,
                task=task,
                model_kind=kind,
                seed=seed,
                backbone="tf_efficientnet_lite0",
                config=json.dumps({"seed": seed}),
                config_hash=model_id,
                path="",
                run_id="run-full",
            )
        )
        accuracy = (single if kind == "adapter" else head)[task] + rng.normal(0, 0.01)
        evaluations.append(dict(model_id=model_id, split="test", accuracy=accuracy, n=100, run_id="run-full"))
    for method, k, seed in itertools.product(["linear", "ties"], [2, 3, 4], seeds):
        for group in itertools.combinations(sorted(tasks), k):
            merge_id = f"{method}-{'+'.join(group)}-{seed}"
            merges.append(
                dict(
                    merge_id=merge_id,
                    method=method,
                    k=k,
                    tasks=",".join(group),
                    seed=seed,
                    hyperparams=json.dumps({"lambda": 0.5} if method == "ties" else {}),
                    backbone="tf_efficientnet_lite0",
                    run_id="run-full",
                )
            )
            for task in group:
                drop = 0.04 * k * (1.5 if method == "linear" else 1.0) + rng.normal(0, 0.02)
                merge_evals.append(
                    dict(
                        merge_id=merge_id,
                        task=task,
                        split="test",
                        merged_accuracy=single[task] - drop,
                        single_accuracy=single[task],
                        head_accuracy=head[task],
                        n=100,
                        run_id="run-full",
                    )
                )
    for (a, b), measure in itertools.product(itertools.combinations(sorted(tasks), 2), ["cosine", "frechet"]):
        sims.append(dict(task_a=a, task_b=b, measure=measure, value=float(rng.uniform()), seed=0, run_id="run-full"))
    findings = [
        dict(finding="retention_vs_k", statistic="slope", value=-0.05, ci_low=-0.07, ci_high=-0.03, n=24),
        dict(
            finding="same_vs_cross_domain",
            statistic="difference",
            value=None,
            ci_low=None,
            ci_high=None,
            n=0,
            note="not enough pairs",
        ),
        dict(finding="claims", statistic="claim1", value=1, n=6, note="supported: retention 93 % at k = 2"),
        dict(finding="claims", statistic="claim2", value=0, n=6, note="inconclusive: ρ = 0.1 [-0.5, 0.6]"),
        dict(finding="claim_rules", statistic="claim1", note="supported if retention's CI lower bound >= 0.90"),
        dict(finding="claim_rules", statistic="claim2", note="supported if ρ > 0 with p < 0.05"),
    ]
    findings += study_figures(sorted(tasks))
    bench = [
        dict(
            name="inference",
            variant=variant,
            k=k,
            batch_size=32,
            device="cpu",
            median_ms=10 + k * f,
            p95_ms=12 + k * f,
            throughput=3200 / (10 + k * f),
            ratio_to_backbone=(10 + k * f) / 10,
            machine=json.dumps({"cpu_count": 2}),
        )
        for variant, f in (("merged", 0.1), ("separate adapters", 5.0))
        for k in (1, 2, 4)
    ]
    bench += [
        dict(
            name="training",
            variant=variant,
            batch_size=64,
            device="cpu",
            median_ms=ms,
            p95_ms=ms + 1,
            throughput=64000 / ms,
            peak_memory_mb=memory,
            machine=json.dumps({"cpu_count": 2}),
        )
        for variant, ms, memory in (("lora", 300.0, 80.0), ("head_only", 100.0, 20.0), ("full_finetune", 400.0, 150.0))
    ]
    bench += [
        dict(
            name="evaluation",
            variant=variant,
            k=3,
            batch_size=256,
            device="cpu",
            median_ms=ms,
            p95_ms=ms + 5,
            throughput=256000 / ms,
            ratio_to_backbone=500.0 / ms,
            machine=json.dumps({"cpu_count": 2}),
        )
        for variant, ms in (("eager", 500.0), ("fast", 200.0))
    ]
    bench += [
        dict(
            name="merge",
            variant=method,
            k=k,
            device="cpu",
            median_ms=k * f,
            p95_ms=k * f + 1,
            machine=json.dumps({"cpu_count": 2}),
        )
        for method, f in (("linear", 2.0), ("ties", 30.0))
        for k in (2, 3)
    ]
    runs = [
        dict(
            run_id="run-full",
            status="finished",
            command="python training/run_all.py --full",
            config=json.dumps({"tasks": list(tasks), "seeds": seeds}),
            machine=json.dumps({"cpu": 2}),
        )
    ]
    with store.write() as con:
        for table, rows in (
            ("models", models),
            ("evaluations", evaluations),
            ("merges", merges),
            ("merge_evaluations", merge_evals),
            ("similarities", sims),
            ("finding_rows", findings),
            ("benchmark_rows", bench),
            ("runs", runs),
        ):
            frame = pd.DataFrame(rows)
            con.register("frame", frame)
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM frame")
            con.unregister("frame")
        con.execute(
            "INSERT INTO tasks (task, domain, label_names) VALUES "
            + ", ".join(f"('{t}', '{d}', '[\"a\", \"b\"]')" for t, d in tasks.items())
        )
    # the merge planner's plans, made by its own stage from the merges above (every group is stored: no merging)
    plan_config = StudyConfig(tasks=tuple(sorted(tasks)), seeds=tuple(seeds), merge_methods=("linear", "ties"), max_k=4)
    assert PlanStage(plan_config, store).run()["checked"] == 0
    return path


# The findings stage's per-(method, k) figures, made up so that the answers differ from what a page would get by
# reading the wrong rows: ties is chosen at every k, linear (never chosen) keeps more of every task at k = 4 and
# beats the head there; with X = 90 % ties keeps every task up to k = 3, and its merged − head CI is above 0 up to
# k = 3.
CHOSEN = {2: "ties", 3: "ties", 4: "ties"}
TASK_RETENTION = {
    ("ties", 2): [0.97, 0.95, 0.96, 0.93],
    ("ties", 3): [0.93, 0.91, 0.92, 0.95],
    ("ties", 4): [0.88, 0.85, 0.90, 0.92],
    ("linear", 2): [0.90, 0.91, 0.92, 0.93],
    ("linear", 3): [0.95, 0.95, 0.95, 0.95],
    ("linear", 4): [0.99, 0.99, 0.99, 0.99],
}
MERGED_MINUS_HEAD = {
    ("ties", 2): (5.0, 3.0, 7.0),
    ("ties", 3): (2.0, 0.5, 3.5),
    ("ties", 4): (1.0, -0.5, 2.5),
    ("linear", 2): (1.0, -1.0, 3.0),
    ("linear", 3): (0.5, -1.0, 2.0),
    ("linear", 4): (3.0, 1.0, 5.0),
}
REAL_WINS = {("ties", 2): (24, 40), ("ties", 3): (21, 60), ("ties", 4): (4, 40), ("linear", 2): (2, 40)}


def study_figures(tasks: list[str]) -> list[dict]:
    rows = []
    for k, method in CHOSEN.items():
        rows.append(dict(finding="chosen_method", statistic=f"{method}/k={k}", value=0.8, n=10, note="validation"))
    for (method, k), per_task in TASK_RETENTION.items():
        stat, mean = f"{method}/k={k}", float(np.mean(per_task))
        rows.append(dict(finding="retention_vs_k", statistic=stat, value=mean, ci_low=mean - 0.02, ci_high=mean + 0.02,
                         n=6, note="unit: merged groups"))  # fmt: skip
        for task, value in zip(tasks, per_task):
            rows.append(dict(finding="task_retention", statistic=f"{stat}/{task}", value=value, n=3))
        value, low, high = MERGED_MINUS_HEAD[(method, k)]
        rows.append(dict(finding="merged_minus_head", statistic=stat, value=value, ci_low=low, ci_high=high, n=6))
    for (method, k), (wins, n) in REAL_WINS.items():
        share = wins / n
        rows.append(dict(finding="real_wins", statistic=f"{method}/k={k}", value=share, ci_low=share / 2,
                         ci_high=(1 + share) / 2, n=n, note=f"{wins} of {n} rows"))  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def full_db(tmp_path_factory) -> Path:
    return build_full_db(tmp_path_factory.mktemp("full_db") / "results.duckdb")


# -------------------------------------------------------------- data behind every chart

MERGE_COUNT_SQL = """
    WITH unit AS (SELECT method, k, tasks, seed, avg({metric}) AS v FROM merge_results
                  WHERE {where} GROUP BY ALL)
    SELECT method, k, avg(v) AS mean, coalesce(stddev_samp(v), 0) AS sd, count(*) AS n
    FROM unit GROUP BY ALL ORDER BY method, k"""


DEFAULT_METHODS_SQL = """
    WITH chosen AS (SELECT DISTINCT split_part(statistic, '/', 1) AS method FROM findings
                    WHERE finding = 'chosen_method' AND statistic NOT LIKE 'none/%')
    SELECT DISTINCT method FROM merge_results
    WHERE method IN (SELECT method FROM chosen)
       OR (method = 'task_arithmetic' AND EXISTS (SELECT 1 FROM chosen m JOIN merge_results r USING (method)))
       OR NOT EXISTS (SELECT 1 FROM chosen m JOIN merge_results r USING (method))"""


def default_methods(db) -> str:
    """The merge count page's default method filter as SQL: the chosen methods and task arithmetic, else all."""
    if "findings" not in set(sql(db, "SELECT table_name FROM information_schema.tables")["table_name"]):
        return "true"
    names = sql(db, DEFAULT_METHODS_SQL)["method"].tolist()
    return "method IN (" + ", ".join(f"'{m}'" for m in names) + ")"


def check_merge_count(at: AppTest, db, where: str | None = None) -> None:
    where = where or default_methods(db)
    accuracy, normalized = figures(at)[:2]
    for figure, metric in ((accuracy, "merged_accuracy"), (normalized, "normalized_accuracy")):
        expected = sql(db, MERGE_COUNT_SQL.format(metric=metric, where=where))
        drawn = lines(figure)
        assert set(drawn) == set(expected["method"])
        for method, part in expected.groupby("method"):
            x, y = drawn[method]
            assert x == part["k"].tolist()
            np.testing.assert_allclose(y, part["mean"], rtol=1e-9)


def test_merge_count_lines_match_sql(full_db):
    at = render(full_db, "merge_count")
    assert_clean(at)
    check_merge_count(at, full_db)
    assert set(lines(figures(at)[0])) == {"ties"}  # by default: the methods the study chooses (item 2 of issue 17)
    at.sidebar.multiselect[0].set_value(["linear", "ties"]).run()  # the filter adds the others
    check_merge_count(at, full_db, "true")
    # the per-task small multiples: each task's mean over the groups holding it (a group = mean over seeds)
    expected = sql(
        full_db,
        """WITH g AS (SELECT task, method, k, tasks, avg(normalized_accuracy) v FROM merge_results GROUP BY ALL)
           SELECT task, method, k, avg(v) mean, count(*) n FROM g GROUP BY ALL ORDER BY task, method, k""",
    )
    (panels,) = [f for f in figures(at) if "per task" in f["layout"]["title"]["text"]]
    drawn = {}
    for trace in panels["data"]:
        task = trace["hovertemplate"].split(" on ", 1)[1].split("<br>", 1)[0]
        drawn[(task, trace["name"])] = (trace["x"], trace["y"], [c[2] for c in trace["customdata"]])
        assert trace["line"]["color"] == METHOD_COLORS[trace["name"]]
    assert set(drawn) == set(zip(expected["task"], expected["method"]))
    for (task, method), part in expected.groupby(["task", "method"]):
        x, y, n = drawn[(task, method)]
        assert x == part["k"].tolist() and [int(v) for v in n] == part["n"].tolist()
        np.testing.assert_allclose(y, part["mean"], rtol=1e-9)
    assert sum(t.get("showlegend", True) for t in panels["data"]) == 2  # one legend entry per method


def test_merge_count_marks_chosen_method_and_draws_threshold_and_references_in_legend(full_db):
    at = render(full_db, "merge_count", {"method": ["linear", "ties"], "x": "85"})
    assert_clean(at)
    for figure in figures(at)[:2]:
        stars = [t for t in figure["data"] if t.get("name") == "chosen on validation"]
        assert len(stars) == 1 and stars[0]["marker"]["symbol"] == "star"
        assert dict(zip(stars[0]["x"], stars[0]["text"])) == CHOSEN
        drawn = lines(figure)["ties"]
        assert stars[0]["y"] == pytest.approx([drawn[1][drawn[0].index(k)] for k in stars[0]["x"]])
        references = [t for t in figure["data"] if t.get("legendgroup") == "reference"]
        assert references and all(t.get("showlegend", True) for t in references)  # labels in the legend
        assert not figure["layout"].get("annotations")  # no labels drawn over each other on the plot
    references = {t["name"]: t["y"] for t in figures(at)[1]["data"] if t.get("legendgroup") == "reference"}
    assert references["threshold X = 85 %"] == [0.85, 0.85]
    assert at.query_params["x"] in ("85", ["85"])


def test_ranking_table_matches_findings(full_db):
    at = render(full_db, "merge_count")
    assert_clean(at)
    ranking = at.dataframe[-1].value
    expected = sql(
        full_db,
        """SELECT split_part(statistic, '/', 1) method, CAST(split_part(statistic, '=', 2) AS INT) k, value, ci_low,
                  ci_high FROM findings WHERE finding = 'retention_vs_k' AND statistic LIKE '%/k=%'""",
    )
    chosen = sql(full_db, "SELECT statistic FROM findings WHERE finding = 'chosen_method'")["statistic"].tolist()
    assert sorted(ranking["method"]) == sorted(expected["method"].unique())
    for row in expected.itertuples():
        cell = ranking.loc[ranking["method"] == row.method, f"k={row.k}"].iloc[0]
        assert cell.startswith(f"{100 * row.value:.1f} % [{100 * row.ci_low:.1f}, {100 * row.ci_high:.1f}]")
        assert cell.endswith("★") == (f"{row.method}/k={row.k}" in chosen)


def answer_sql(db, threshold: float) -> tuple[int | None, int | None]:
    """The largest k whose chosen method keeps >= threshold on every task, and beats the head (CI low > 0)."""
    kept = sql(
        db,
        f"""WITH c AS (SELECT statistic FROM findings WHERE finding = 'chosen_method'),
                 t AS (SELECT regexp_extract(statistic, '^(.*)/[^/]*$', 1) cell, min(value) worst FROM findings
                       WHERE finding = 'task_retention' GROUP BY cell)
            SELECT max(CAST(split_part(cell, '=', 2) AS INT)) FROM t JOIN c ON t.cell = c.statistic
            WHERE worst >= {threshold}""",
    ).iloc[0, 0]
    beats = sql(
        db,
        """SELECT max(CAST(split_part(statistic, '=', 2) AS INT)) FROM findings
           WHERE finding = 'merged_minus_head' AND ci_low > 0
             AND statistic IN (SELECT statistic FROM findings WHERE finding = 'chosen_method')""",
    ).iloc[0, 0]
    return (None if pd.isna(kept) else int(kept)), (None if pd.isna(beats) else int(beats))


@pytest.mark.parametrize("threshold", ["90", "80", "99"])
def test_direct_answers_match_sql(full_db, threshold):
    at = render(full_db, "merge_count", {"x": threshold})
    assert_clean(at)
    kept, beats = answer_sql(full_db, int(threshold) / 100)
    assert (kept, beats) == ({"90": 3, "80": 4, "99": None}[threshold], 3)  # the fixture's design, as SQL says
    text = " ".join(m.value for m in at.markdown)
    if kept is None:
        assert f"**No k** at which the method chosen on validation keeps at least {threshold} %" in text
    else:
        worst = min(TASK_RETENTION[("ties", kept)])
        assert (
            f"The largest k at which **ties** (chosen on validation at that k) keeps at least {threshold} % of every "
            f"task's single-adapter accuracy is **k = {kept}**" in text
        )
        assert f"keeps {100 * worst:.1f} %" in text
    value, low, high = MERGED_MINUS_HEAD[("ties", beats)]
    assert (
        f"beats the head baseline is **k = {beats}**: merged − head = {value:+.2f} points, CI [{low:+.2f}, {high:+.2f}]"
        in text
    )


def test_real_wins_chart_matches_sql(full_db):
    at = render(full_db, "merge_count")
    assert_clean(at)
    figure = next(f for f in figures(at) if f["layout"]["title"]["text"].startswith("Merges beating the head"))
    expected = sql(
        full_db,
        """SELECT CAST(split_part(statistic, '=', 2) AS INT) k, split_part(statistic, '/', 1) method, value, ci_low,
                  ci_high FROM findings WHERE finding = 'real_wins'
             AND statistic IN (SELECT statistic FROM findings WHERE finding = 'chosen_method') ORDER BY k""",
    )
    (trace,) = figure["data"]
    assert trace["name"] == "ties" and trace["x"] == expected["k"].tolist()
    np.testing.assert_allclose(trace["y"], expected["value"])
    np.testing.assert_allclose(np.add(trace["y"], trace["error_y"]["array"]), expected["ci_high"])
    np.testing.assert_allclose(np.subtract(trace["y"], trace["error_y"]["arrayminus"]), expected["ci_low"])
    names = [b.proto.label for b in at.get("download_button")]
    assert any("real_wins_by_k.csv" in n for n in names) and any("merge_count_accuracy.csv" in n for n in names)


def test_merge_count_filters_come_from_and_go_to_the_url(full_db):
    at = render(full_db, "merge_count", {"method": "ties", "task": ["mnist", "textures"]})
    assert_clean(at)
    check_merge_count(at, full_db, "method = 'ties' AND task IN ('mnist', 'textures')")
    assert set(lines(figures(at)[0])) == {"ties"}
    at.sidebar.multiselect[0].set_value(["linear"]).run()
    assert at.query_params["method"] == ["linear"] or at.query_params["method"] == "linear"
    assert set(lines(figures(at)[0])) == {"linear"}


def test_bad_url_parameters_fall_back_to_defaults(full_db):
    at = render(full_db, "no_such_page", {"method": "nope", "k": "abc", "task": ["x"]})
    assert_clean(at)
    assert at.query_params["page"] in ("overview", ["overview"])
    at = render(full_db, "merges_vs_heads", {"method": "nope", "k": "abc"})
    assert_clean(at)
    assert len(figures(at)) == 2


def test_dissimilarity_points_match_sql(full_db):
    at = render(full_db, "dissimilarity", {"method": "ties"})
    assert_clean(at)
    expected = sql(
        full_db,
        """
        WITH r AS (SELECT tasks, avg(normalized_accuracy) AS retention FROM merge_results
                   WHERE k = 2 AND method = 'ties' GROUP BY tasks),
             s AS (SELECT measure, task_a, task_b, avg(value) AS value FROM task_similarity GROUP BY ALL)
        SELECT measure, task_a || ' + ' || task_b AS pair, value, retention
        FROM s JOIN r ON r.tasks = s.task_a || ',' || s.task_b ORDER BY measure, pair""",
    )
    scatter_figures = figures(at)[:2]
    for figure, (measure, part) in zip(scatter_figures, expected.groupby("measure")):
        assert figure["layout"]["title"]["text"].startswith(measure)
        points = [t for t in figure["data"] if t.get("mode") == "markers+text"]  # each point labelled with its pair
        drawn = {text: (x, y) for t in points for text, x, y in zip(t["text"], t["x"], t["y"])}
        assert sorted(drawn) == part["pair"].tolist()
        for row in part.itertuples():
            np.testing.assert_allclose(drawn[row.pair], (row.value, row.retention), rtol=1e-9)
        n = len(part)
        assert f"n = {n} pairs" in figure["layout"]["title"]["text"]
        assert all("n=%{customdata} merge rows" in t["hovertemplate"] for t in points)
    stats = at.dataframe[0].value
    assert stats["n"].tolist() == [6, 6]
    # the findings hold no figures for these pairs: ρ is descriptive, with no interval and no p-value of the page's own
    assert stats[["ci_low", "ci_high", "p"]].isna().all().all()
    assert set(stats["source"]) == {"descriptive (this selection)"}
    assert all("(descriptive: no CI or p here)" in f["layout"]["title"]["text"] for f in scatter_figures)
    # related against unrelated pairs: each pair once, mean with its t-interval, on an axis zoomed to the intervals
    (kinds,) = [f for f in figures(at) if f["layout"]["title"]["text"] == "Retention by pair type"]
    pair_retention = expected.drop_duplicates("pair").set_index("pair")["retention"]
    table = at.dataframe[1].value.set_index("pairs")
    assert table["n"].sum() == len(pair_retention)
    point = kinds["data"][0]
    for name, mean, (low, high, n, _) in zip(point["x"], point["y"], point["customdata"]):
        assert mean == pytest.approx(table.loc[name, "mean"]) and n == table.loc[name, "n"]
        assert low < mean < high if n > 1 else np.isnan([low, high]).all()  # one pair: no interval
    assert kinds["layout"]["yaxis"]["range"][0] > 0.5
    # the task x task matrices: pair retention, then one per measure, symmetric with an empty diagonal
    matrices = {f["layout"]["title"]["text"]: f["data"][0] for f in figures(at) if f["data"][0]["type"] == "heatmap"}
    retention = matrices["pair retention (ties, k = 2)"]
    tasks = retention["x"]
    z = np.array(retention["z"], dtype=float)
    assert retention["y"] == tasks and np.isnan(np.diag(z)).all()
    np.testing.assert_array_equal(np.nan_to_num(z), np.nan_to_num(z.T))
    pairs = sql(
        full_db,
        "SELECT split_part(tasks, ',', 1) a, split_part(tasks, ',', 2) b, avg(normalized_accuracy) r "
        "FROM merge_results WHERE k = 2 AND method = 'ties' GROUP BY tasks",
    )
    for row in pairs.itertuples():
        assert z[tasks.index(row.a), tasks.index(row.b)] == pytest.approx(row.r, rel=1e-9)
    for measure, part in expected.groupby("measure"):
        cells = np.array(matrices[measure]["z"], dtype=float)
        names = matrices[measure]["x"]
        for row in part.itertuples():
            a, b = row.pair.split(" + ")
            assert cells[names.index(a), names.index(b)] == pytest.approx(row.value, rel=1e-9)


STUDY_CORRELATIONS_SQL = """
    SELECT split_part(r.statistic, '/', 2) AS measure, r.value AS rho, r.ci_low, r.ci_high, p.value AS p
    FROM findings r LEFT JOIN findings p ON p.finding = r.finding AND p.statistic = r.statistic || '/p'
    WHERE r.finding = 'pair_similarity' AND r.statistic LIKE 'spearman/%' AND r.statistic NOT LIKE '%/p'
    ORDER BY measure"""


def page_text(at: AppTest) -> str:
    """Everything a reader reads on the page: Markdown, captions, tables and chart titles."""
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [d.value.to_string() for d in at.dataframe]
    parts += [f["layout"]["title"]["text"] for f in figures(at) if f["layout"].get("title")]
    return "\n".join(parts)


def test_dissimilarity_shows_the_studys_statistics_and_no_others(tmp_path):
    """Issue 28: the page printed its own Fisher-z CI and pair-level p (0.012 for Fréchet) beside the study's verdict
    (p = 0.121, exact permutation over tasks). On the pairs the study judged, every ρ, CI and p is the findings view's
    own (`pair_similarity`), with its unit named; no other p-value or interval of a correlation is on the page."""
    db = tmp_path / "results.duckdb"  # a copy: the pipeline may be writing the original
    shutil.copy(DEFAULT_DB_PATH, db)
    expected = sql(db, STUDY_CORRELATIONS_SQL).set_index("measure")
    assert "frechet" in expected.index, "the committed results.duckdb holds the study's claim-2 figures"
    at = render(db, "dissimilarity")  # opens on the method the study chose at k = 2: the pairs it judged
    assert_clean(at)
    table = at.dataframe[0].value.set_index("measure")
    for measure, row in table.iterrows():
        stored = expected.loc[measure]
        np.testing.assert_allclose(row[["rho", "ci_low", "ci_high", "p"]].astype(float), stored.astype(float))
    assert set(table["source"]) == {"the study (findings: pair_similarity)"}
    (frechet,) = [f for f in figures(at) if f["layout"]["title"]["text"].startswith("frechet<br>")]
    title, stored = frechet["layout"]["title"]["text"], expected.loc["frechet"]
    assert f"p = {stored.p:.3f} (exact permutation over task labels)" in title
    assert f"95% CI {stored.ci_low:.2f} to {stored.ci_high:.2f} (tasks resampled)" in title
    text = page_text(at)
    assert "Fisher" not in text
    # every p-value the page prints is one the findings stage stored (the claim's line quotes them too)
    stored_p = sql(
        db,
        "SELECT value FROM findings WHERE (finding = 'pair_similarity' AND statistic LIKE '%/p') "
        "OR (finding = 'claim2_test' AND statistic = 'p')",  # the verdict's own test, quoted in its line
    )
    allowed = {f"{p:.3f}" for p in stored_p["value"].dropna()}
    printed = re.findall(r"\bp = (-?[0-9.]+)", text)
    assert printed and set(printed) <= allowed, (set(printed) - allowed, allowed)
    assert "**The study's verdict on claim 2**" in text


def test_dissimilarity_rho_is_descriptive_off_the_studys_pairs(tmp_path):
    """Pairs the study did not judge (another method, other retention, fewer pairs) get ρ alone: no p, no interval."""
    from dashboard import analysis

    db = tmp_path / "results.duckdb"
    shutil.copy(DEFAULT_DB_PATH, db)
    found = sql(db, "SELECT * FROM findings")
    study = analysis.study_pairs(found)
    assert study["method"] is not None and study["retention"]
    items = [(*key.split(","), value) for key, value in study["retention"].items()]
    pairs = pd.DataFrame(items, columns=["task_a", "task_b", "retention"])
    similarity = sql(db, "SELECT measure, task_a, task_b, avg(value) AS value FROM task_similarity GROUP BY ALL")
    points = similarity.merge(pairs, on=["task_a", "task_b"])
    studied = analysis.correlation_rows(points, study["method"], found)
    assert set(studied["source"]) == {analysis.STUDY_SOURCE} and studied["p"].notna().all()
    others = {
        "another method": (points, "some_other_method"),
        "other retention": (points.assign(retention=points["retention"] * 0.99), study["method"]),
        "fewer pairs": (points.groupby("measure").head(len(pairs) - 1), study["method"]),
    }
    for why, (part, method) in others.items():
        rows = analysis.correlation_rows(part, method, found)
        assert set(rows["source"]) == {analysis.DESCRIPTIVE_SOURCE}, why
        assert rows[["ci_low", "ci_high", "p"]].isna().all().all(), why
        assert rows["rho"].notna().all(), why
    assert set(analysis.spearman([1, 2, 3, 4], [2, 1, 4, 3])) == {"rho", "n"}  # never a p-value or an interval


def test_merges_vs_heads_shows_the_probe_on_the_merges_images_and_names_the_stronger_baseline(tmp_path):
    """The committed study has a multi-layer probe per task: its bar is the probe's accuracy on the very images the
    merges were scored on (unpacked from `probe_results`), and the caption names the baseline claim 3 reads."""
    db = tmp_path / "results.duckdb"
    shutil.copy(DEFAULT_DB_PATH, db)
    at = render(db, "merges_vs_heads", {"method": "regmean", "k": "2"})
    assert_clean(at)
    drawn = bars(figures(at)[0])
    probes = sql(db, "SELECT task, n_merge_eval, merge_eval_correct FROM probe_results")
    assert len(probes) == 6
    for row in probes.itertuples():
        expected = unpack_correct(row.merge_eval_correct, row.n_merge_eval).mean()
        assert drawn["multi-layer probe"][row.task] == pytest.approx(expected)
        assert drawn["multi-layer probe"][row.task] > drawn["head baseline"][row.task]
    assert "Claim 3 is judged against the multi-layer probe" in page_text(at)


def test_merges_vs_heads_bars_and_heatmap_match_sql(full_db):
    at = render(full_db, "merges_vs_heads", {"method": "linear", "k": "3"})
    assert_clean(at)
    bar_figure, heat = figures(at)
    expected = sql(
        full_db,
        """SELECT task, avg(single_accuracy) s, avg(head_accuracy) h, avg(merged_accuracy) m
                               FROM merge_results WHERE method = 'linear' AND k = 3 GROUP BY task ORDER BY task""",
    )
    drawn = bars(bar_figure)
    for row in expected.itertuples():
        np.testing.assert_allclose(
            [
                drawn["single adapter"][row.task],
                drawn["head baseline"][row.task],
                drawn["merged (linear, k=3)"][row.task],
            ],
            [row.s, row.h, row.m],
            rtol=1e-9,
        )
    cells = sql(
        full_db,
        """SELECT k, tasks, task, avg(normalized_gain) g FROM merge_results
                            WHERE method = 'linear' GROUP BY ALL""",
    )
    trace = heat["data"][0]
    for row in cells.itertuples():
        value = trace["z"][trace["y"].index(f"k={row.k}: {row.tasks}")][trace["x"].index(row.task)]
        assert value == pytest.approx(row.g)
    assert len(trace["y"]) == sql(full_db, "SELECT count(DISTINCT tasks) FROM merge_results").iloc[0, 0]
    assert trace["zmin"] == -trace["zmax"] and trace["zmax"] >= 1  # white (the middle of RdBu) is a gain of 0


def test_gain_heatmap_puts_white_at_zero_whatever_the_range():
    from dashboard.charts import gain_heatmap

    gains = pd.DataFrame([[-2.2, 0.5], [np.nan, -0.4]], index=["k=2: a,b", "k=2: a,c"], columns=["a", "b"])
    trace = gain_heatmap(gains, "gain").data[0]
    assert (trace.zmin, trace.zmax) == (-2.2, 2.2)  # RdBu's white, its middle, is 0: a gain of -0.4 is red
    empty = gain_heatmap(pd.DataFrame([[np.nan]], index=["k=2: a,b"], columns=["a"]), "gain").data[0]
    assert (empty.zmin, empty.zmax) == (-1.0, 1.0)


def test_every_method_has_its_own_colour_whatever_the_selection():
    """A method keeps one colour on every chart and under every filter; no two methods share one; peft's
    references are one grey family (defect 2 of issue 17: colours came from the position among the shown
    methods, so filtering repainted them and tsv_m / magnitude_prune got near-identical pinks)."""
    from plotly.colors import hex_to_rgb

    from dashboard.charts import color_for, methods_figure
    from merging.methods import list_methods

    registered = list_methods()
    assert set(registered) <= set(METHOD_COLORS)
    colours = [METHOD_COLORS[m] for m in registered]
    assert len(set(colours)) == len(colours)
    for name in registered:
        assert {color_for(name, registered), color_for(name, [name]), color_for(name, registered[::-1][:3])} == {
            METHOD_COLORS[name]
        }
    # references: greys (r = g = b); our methods: coloured, and no two closer than a visible distance
    for name in registered:
        r, g, b = hex_to_rgb(METHOD_COLORS[name])
        assert (r == g == b) == name.startswith("peft_"), name
    ours = [hex_to_rgb(METHOD_COLORS[m]) for m in registered if not m.startswith("peft_")]
    closest = min(sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5 for a, b in itertools.combinations(ours, 2))
    assert closest > 60, closest
    # a chart of two methods paints them as a chart of all of them does
    table = pd.DataFrame({"method": ["ties", "regmean"], "k": [2, 2], "normalized_accuracy": [0.9, 0.95]})
    figure = methods_figure(table, "normalized_accuracy", "retention")
    assert {trace.name: trace.marker.color for trace in figure.data} == {
        "ties": METHOD_COLORS["ties"],
        "regmean": METHOD_COLORS["regmean"],
    }


def test_methods_table_and_chart_match_sql(full_db):
    at = render(full_db, "methods")
    assert_clean(at)
    expected = sql(
        full_db,
        """
        WITH unit AS (SELECT method, k, tasks, seed, avg(normalized_accuracy) v FROM merge_results GROUP BY ALL)
        SELECT method, k, avg(v) v, count(*) n FROM unit GROUP BY ALL ORDER BY method, k""",
    )
    drawn = bars(figures(at)[0])
    for row in expected.itertuples():
        assert drawn[row.method][str(row.k)] == pytest.approx(row.v)
    table = at.dataframe[0].value
    assert table["merged_models"].tolist() == expected["n"].tolist()
    assert table.loc[table["method"] == "ties", "hyperparams"].iloc[0] == '{"lambda": 0.5}'


def test_plan_page_matches_sql(full_db):
    at = render(full_db, "plan", {"method": "ties", "keep": "0.9"})
    assert_clean(at)
    expected = sql(
        full_db,
        """SELECT group_index, task, predicted, measured FROM merge_plans
           WHERE method = 'ties' AND kind = 'target' AND target = 0.9 ORDER BY group_index, task""",
    )
    table = at.dataframe[0].value
    assert table["task"].tolist() == expected["task"].tolist()
    assert table["backbone"].tolist() == expected["group_index"].tolist()
    np.testing.assert_allclose(table["predicted"], expected["predicted"])
    np.testing.assert_allclose(table["measured"], expected["measured"])
    assert expected["group_index"].max() < 4, "the made-up merges keep 90 % in some pair: a plan merges something"
    curve = sql(
        full_db,
        """SELECT max_backbones, min(predicted) AS worst FROM merge_plans
           WHERE method = 'ties' AND kind = 'tradeoff' GROUP BY ALL ORDER BY max_backbones""",
    )
    drawn = lines(figures(at)[0])
    assert drawn["worst task, predicted"][0] == curve["max_backbones"].tolist()
    np.testing.assert_allclose(drawn["worst task, predicted"][1], curve["worst"])
    assert drawn["worst task, predicted"][1][-1] == 1.0  # one backbone per task keeps every task whole


def test_performance_lines_match_sql(full_db):
    at = render(full_db, "performance")
    assert_clean(at)
    drawn = [lines(figure) for figure in figures(at)]
    expected = sql(full_db, "SELECT variant, k, median_ms FROM benchmarks WHERE name = 'inference' ORDER BY variant, k")
    for variant, part in expected.groupby("variant"):
        assert drawn[0][variant][0] == part["k"].tolist()
        np.testing.assert_allclose(drawn[0][variant][1], part["median_ms"])
    merge = sql(full_db, "SELECT variant, k, median_ms FROM benchmarks WHERE name = 'merge' ORDER BY variant, k")
    for method, part in merge.groupby("variant"):  # the merge-time chart is the last figure
        assert method in drawn[-1], (
            f"the last chart should be the merge section's: {SECTIONS_HINT}; a section listed after merge moves "
            "it: update the positions here and add its rows to build_full_db (tests/test_dashboard.py)"
        )
        np.testing.assert_allclose(drawn[-1][method][1], part["median_ms"])
    training = sql(full_db, "SELECT variant, throughput, peak_memory_mb FROM benchmarks WHERE name = 'training'")
    evaluation = sql(full_db, "SELECT variant, throughput, ratio_to_backbone FROM benchmarks WHERE name = 'evaluation'")
    bars = [figure["data"][0] for figure in figures(at) if figure["data"][0].get("type") == "bar"]
    assert len(bars) == 4, (
        f"{len(bars)} bar charts where evaluation's two and training's two were expected: {SECTIONS_HINT}; a new "
        "section with bars adds its own here, with its rows in build_full_db (tests/test_dashboard.py)"
    )
    eval_throughput, speed_up, throughput, memory = bars  # sections in registry order: evaluation, training
    assert dict(zip(eval_throughput["x"], eval_throughput["y"])) == pytest.approx(
        dict(zip(evaluation["variant"], evaluation["throughput"]))
    )
    assert dict(zip(speed_up["x"], speed_up["y"])) == pytest.approx({"eager": 1.0, "fast": 2.5})
    assert dict(zip(throughput["x"], throughput["y"])) == pytest.approx(
        dict(zip(training["variant"], training["throughput"]))
    )
    assert dict(zip(memory["x"], memory["y"])) == pytest.approx(
        dict(zip(training["variant"], training["peak_memory_mb"]))
    )
    assert "2 cores" in " ".join(c.value for c in at.caption)


def test_performance_draws_one_image_size_at_a_time(full_db, tmp_path):
    db = tmp_path / "sizes.duckdb"
    shutil.copy(full_db, db)
    with Store(db).write() as con:
        con.execute("UPDATE benchmark_rows SET image_size = 48 WHERE name = 'inference'")
        con.execute("""INSERT INTO benchmark_rows
                           (name, variant, k, batch_size, device, median_ms, image_size, measured_at)
                       SELECT name, variant, k, batch_size, device, median_ms * 20, 224, measured_at
                       FROM benchmark_rows WHERE name = 'inference'""")
    at = render(db, "performance", {"px": "224"})
    assert_clean(at)
    expected = sql(
        db,
        "SELECT variant, k, median_ms FROM benchmarks WHERE name = 'inference' AND image_size = 224 "
        "ORDER BY variant, k",
    )
    drawn = lines(figures(at)[0])
    for variant, part in expected.groupby("variant"):
        assert drawn[variant][0] == part["k"].tolist()
        np.testing.assert_allclose(drawn[variant][1], part["median_ms"])
    merge = lines(figures(at)[-1])  # merge times do not depend on the image size: still drawn
    assert set(merge) == {"linear", "ties"}, f"the last chart should be the merge section's: {SECTIONS_HINT}"


def test_performance_says_how_to_measure_a_missing_section(full_db, tmp_path):
    db = tmp_path / "partial.duckdb"
    shutil.copy(full_db, db)
    with Store(db).write() as con:
        con.execute("DELETE FROM benchmark_rows WHERE name = 'training'")
    at = render(db, "performance")
    assert_clean(at)
    assert [i.value for i in at.info] == [
        "No training figures for this device yet: run `python -m training.bench --bench-sections training`."
    ], (
        "only the training section's figures were deleted: a section of benchmarks/sections/__init__.py without rows "
        "in build_full_db says so too: add its rows there (tests/test_dashboard.py)"
    )
    bars = [figure["data"][0] for figure in figures(at) if figure["data"][0].get("type") == "bar"]
    assert [set(bar["x"]) for bar in bars] == [{"eager", "fast"}] * 2, (  # the evaluation section's; no training bars
        f"{SECTIONS_HINT}: a new section with bars adds its own bars here (tests/test_dashboard.py)"
    )


def test_runs_tables_filters_and_downloads(full_db):
    at = render(full_db, "runs", {"kind": "adapter", "q": "run-full"})
    assert_clean(at)
    runs, models, merges = (d.value for d in at.dataframe)
    assert runs["run_id"].tolist() == ["run-full"]
    n_adapters = sql(full_db, "SELECT count(*) FROM task_results WHERE model_kind = 'adapter'").iloc[0, 0]
    assert len(models) == n_adapters and set(models["model_kind"]) == {"adapter"}
    assert len(merges) == sql(full_db, "SELECT count(*) FROM merge_results").iloc[0, 0]
    assert len(at.get("download_button")) == 3
    assert at.query_params["kind"] in ("adapter", ["adapter"])


def test_overview_counts_match_sql(full_db):
    at = render(full_db, "overview")
    assert_clean(at)
    metrics = {m.label: m.value for m in at.metric}
    counts = sql(
        full_db,
        """SELECT count(DISTINCT task) t, count(*) FILTER (model_kind = 'adapter') a,
                             count(*) FILTER (model_kind = 'head') h, count(DISTINCT seed) s FROM task_results""",
    )
    assert metrics["Tasks"] == str(counts.t[0]) and metrics["Adapters"] == str(counts.a[0])
    assert metrics["Head baselines"] == str(counts.h[0]) and metrics["Seeds"] == str(counts.s[0])
    merges = sql(full_db, "SELECT count(DISTINCT merge_id) FROM merge_results").iloc[0, 0]
    assert metrics["Merged models"] == f"{merges:,}"
    findings = at.dataframe[0].value
    assert len(findings) == sql(full_db, "SELECT count(*) FROM findings").iloc[0, 0]
    # the verdicts are spelled out, each with the stage's own statistics; a claim not stored says so
    text = " ".join(m.value for m in at.markdown)
    assert (
        "*Merging up to three adapters works (with a data-free method)*: **supported** (retention 93 % at k = 2)"
        in text
    )
    assert "*Adapters trained on dissimilar data merge better*: **inconclusive**" in text
    assert "*Merges sometimes beat head finetuning*: not judged yet" in text
    # each claim: the rule the findings stage stored for it, and a link to the page with its evidence
    statements = [m.value for m in at.markdown if m.value.startswith("- *")]
    assert len(statements) == 4  # claim 1 twice: data-free and data-aware
    rules = sql(full_db, "SELECT statistic, note FROM findings WHERE finding = 'claim_rules' ORDER BY statistic")
    assert rules["statistic"].tolist() == ["claim1", "claim2"]
    rule_of = dict(zip(rules["statistic"], rules["note"]))
    for claim, statement in zip(["claim1", "claim1_data_aware", "claim2", "claim3"], statements):
        # no rule stored for claim1_data_aware and claim3 in this file
        assert (
            f"*Rule:* {rule_of[claim]}." in statement
            if claim in rule_of
            else "stated in reports/findings.md" in statement
        )
    for statement, page in zip(statements, ["merge_count", "merge_count", "dissimilarity", "merges_vs_heads"]):
        assert f"](?page={page})" in statement


# ------------------------------------------------------------------- the tiny real study


@pytest.mark.parametrize("page", PAGES)
def test_every_page_on_tiny_study(tiny_study, page):
    db = tiny_study["db"]
    at = render(db, page)
    assert_clean(at)
    merge_rows = sql(db, "SELECT count(*) FROM merge_results").iloc[0, 0]
    if page == "overview":
        metrics = {m.label: m.value for m in at.metric}
        assert metrics["Tasks"] == "3"
        assert metrics["Adapters"] == str(
            sql(db, "SELECT count(*) FROM task_results WHERE model_kind='adapter'").iloc[0, 0]
        )
        assert len(at.get("image")) >= 3  # sample images of the three tasks
    elif page == "merge_count":
        if merge_rows:
            check_merge_count(at, db)
        else:
            assert at.info
    elif page == "merges_vs_heads" and not merge_rows:
        drawn = bars(figures(at)[0])
        expected = sql(db, "SELECT task, avg(accuracy) a FROM task_results WHERE model_kind = 'head' GROUP BY task")
        for row in expected.itertuples():
            assert drawn["head baseline"][row.task] == pytest.approx(row.a)
    elif page == "runs":
        assert len(at.dataframe[1].value) == sql(db, "SELECT count(*) FROM task_results").iloc[0, 0]
    else:
        assert at.info or figures(at) or at.dataframe, f"page {page} drew nothing and said nothing on the tiny study"


# ---------------------------------------------------------------------- committed database


@pytest.mark.parametrize("page", PAGES)
def test_every_page_on_the_committed_wide_study(tmp_path, page):
    """The wide study (20 tasks, 190 pairs, k to 6, a probe per task, its plans) draws on every page without an
    error."""
    db = tmp_path / "wide.duckdb"
    shutil.copy(REPO_ROOT / "reports" / "wide.duckdb", db)
    at = render(db, page)
    assert_clean(at)
    assert at.info or figures(at) or at.dataframe or at.metric


@pytest.mark.parametrize("page", PAGES)
def test_every_page_on_committed_db(tmp_path, page):
    assert DEFAULT_DB_PATH.exists(), (
        "the default run's results.duckdb is committed at the repo root: restore it (git checkout results.duckdb)"
    )
    db = tmp_path / "results.duckdb"  # a copy: the pipeline may be writing the original
    shutil.copy(DEFAULT_DB_PATH, db)
    at = render(db, page)
    assert_clean(at)
    assert at.info or figures(at) or at.dataframe or at.metric
    # every chart's toolbar saves it as SVG (vector, for a paper)
    for element in at.get("plotly_chart"):
        assert json.loads(element.proto.config)["toImageButtonOptions"]["format"] == "svg"
    # every trace drawn for a merge method has that method's one colour, on every page
    for figure in figures(at):
        for trace in figure["data"]:
            method = trace.get("legendgroup") or trace.get("name")
            if method in METHOD_COLORS and trace.get("mode") != "none":  # (a band: the colour, translucent)
                colour = trace.get("line", {}).get("color") or trace.get("marker", {}).get("color")
                assert colour == METHOD_COLORS[method], (page, figure["layout"]["title"]["text"], method, colour)


# -------------------------------------------------------------------- broken databases


def test_missing_database_says_so(tmp_path):
    for page in PAGES:
        at = render(tmp_path / "nowhere.duckdb", page)
        assert not at.exception
        assert "no results database at" in at.error[0].value


def test_corrupt_database_says_so(tmp_path):
    db = tmp_path / "results.duckdb"
    db.write_bytes(b"this is not a duckdb file" * 200)
    at = render(db, "overview")
    assert not at.exception
    assert "not a readable DuckDB file" in at.error[0].value or "cannot open" in at.error[0].value


@pytest.mark.multiprocess
def test_locked_database_says_so(full_db, tmp_path, monkeypatch):
    monkeypatch.setenv("MLV_STORE_READ_WAIT_S", "1")  # how long readers wait is tested in test_store_concurrency
    db = tmp_path / "results.duckdb"
    shutil.copy(full_db, db)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, sys, time; c = duckdb.connect({str(db)!r}); print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        at = render(db, "merge_count")
        assert not at.exception
        assert "locked" in at.error[0].value
    finally:
        holder.communicate("", timeout=30)


@pytest.mark.parametrize("kind", ["no tables", "empty views", "only task_results"])
def test_empty_or_older_database_shows_messages(tmp_path, kind):
    db = tmp_path / "results.duckdb"
    if kind == "no tables":
        duckdb.connect(str(db)).close()
    elif kind == "empty views":
        Store(db).initialise()
    else:  # an older file: task_results only, as the first stage wrote it
        with duckdb.connect(str(db)) as con:
            con.execute("""CREATE TABLE models AS SELECT 'm' AS model_id, 'mnist' AS task, 'head' AS model_kind,
                           0 AS seed, 'b' AS backbone, 'h' AS config_hash, 'r' AS run_id""")
            con.execute("CREATE TABLE evaluations AS SELECT 'm' AS model_id, 'test' AS split, 0.9 AS accuracy, 10 AS n")
            con.execute("""CREATE VIEW task_results AS SELECT m.task, m.model_kind, m.seed, e.accuracy, e.n AS n_test,
                           m.backbone, m.config_hash, m.run_id FROM models m JOIN evaluations e USING (model_id)""")
    before = db.read_bytes()
    for page in PAGES:
        at = render(db, page)
        assert_clean(at)
        assert at.info, (kind, page)
    assert db.read_bytes() == before  # the dashboard never writes


# ------------------------------------------------------------------------ real browser
#
# Chromium's own `--screenshot` / `--dump-dom` do not wait for Streamlit: the page is drawn
# from messages on a websocket, which `--virtual-time-budget` does not wait for, so they
# capture the loading skeleton. The browser is therefore driven over the DevTools protocol:
# open the page, wait until the app has finished running and drawn, then take the screenshot
# and the DOM.

READY_JS = """(() => {
  const main = document.querySelector('[data-testid="stMain"]');
  if (!main || !document.querySelector('[data-testid="stSidebar"]')) return false;
  if (document.querySelector('[data-testid="stSkeleton"]')) return false;
  const status = document.querySelector('[data-testid="stStatusWidget"]');
  if (status && /running/i.test(status.innerText)) return false;
  const heading = main.querySelector('h1, h2');
  if (!heading) return false;
  const charts = main.querySelectorAll('[data-testid="stPlotlyChart"]').length;
  const drawn = main.querySelectorAll('[data-testid="stPlotlyChart"] .main-svg').length;
  return charts === 0 || drawn >= charts;
})()"""
ERROR_TEST_IDS = ("stException", "stAlertContentError")


def _start_dashboard(db: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            APP,
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "MLV_DB": str(db)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{port}/_stcore/health", 90, server, b"ok")
    return server, port


def _shoot_every_page(db: Path, screens: Path, profile: Path) -> dict[str, float]:
    """Open every page by its URL; save a screenshot; assert that no error element is shown."""
    server, app_port = _start_dashboard(db)
    browser = None
    seconds = {}
    try:
        browser, port = start_chromium(profile)
        targets = json.loads(wait_http(f"http://127.0.0.1:{port}/json/list", 30, browser))
        page_target = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page_target["webSocketDebuggerUrl"])
        tools.call("Page.enable")
        tools.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
        for page in PAGES:
            started = time.time()
            tools.call("Page.navigate", url=f"http://127.0.0.1:{app_port}/?page={page}")
            ready_since = None
            while True:  # ready twice in a row, half a second apart: the page has settled
                ready = tools.evaluate(READY_JS)
                if ready and ready_since and time.time() - ready_since > 0.5:
                    break
                ready_since = (ready_since or time.time()) if ready else None
                assert time.time() - started < 60, f"page {page} did not finish drawing in 60 s"
                time.sleep(0.25)
            seconds[page] = time.time() - started
            shot = screens / f"{page}.png"
            shot.write_bytes(base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"]))
            assert shot.stat().st_size > 20_000, f"screenshot of {page} looks empty ({shot.stat().st_size} bytes)"
            dom = tools.evaluate("document.documentElement.outerHTML")
            for test_id in ERROR_TEST_IDS:
                assert f'data-testid="{test_id}"' not in dom, f"page {page} shows an error element {test_id}"
            assert "Traceback" not in dom, page
            assert query_page(tools) == page  # the URL still names the page (shareable link)
        tools.socket.close()
    finally:
        if browser is not None:
            stop(browser)
        stop(server)
    return seconds


def query_page(tools: DevTools) -> str | None:
    return tools.evaluate("new URLSearchParams(location.search).get('page')")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.browser
@pytest.mark.parametrize("which", ["full_db", "tiny_study"])
def test_every_page_in_headless_chromium(which, request, tmp_path):
    db = request.getfixturevalue("full_db") if which == "full_db" else request.getfixturevalue("tiny_study")["db"]
    screens = tmp_path / "screens"
    screens.mkdir()
    seconds = _shoot_every_page(db, screens, tmp_path / "profile")
    print(f"browser load + draw seconds per page ({which}):", {p: round(s, 2) for p, s in seconds.items()})
    print(f"screenshots of every page ({which}), for a person to look at: {screens}")  # kept by pytest's tmp_path


def test_broken_view_says_so(tmp_path):
    db = tmp_path / "results.duckdb"
    with duckdb.connect(str(db)) as con:  # a view whose table is gone
        con.execute("CREATE TABLE t AS SELECT 1 AS x")
        con.execute("CREATE VIEW task_results AS SELECT x FROM t")
        con.execute("DROP TABLE t")
    at = render(db, "overview")
    assert not at.exception
    assert "cannot be read" in at.error[0].value


# ------------------------------------------------------------- defaults and run states (issue 17)


def test_pages_open_on_the_study_choice(full_db):
    """Merges vs heads opens at k = 2 with the method chosen at k = 2; the dissimilarity page with that method too."""
    chosen = sql(full_db, "SELECT statistic FROM findings WHERE finding = 'chosen_method' AND statistic LIKE '%/k=2'")
    method = chosen.iloc[0, 0].split("/")[0]
    at = render(full_db, "merges_vs_heads")
    assert_clean(at)
    assert [s.value for s in at.sidebar.selectbox] == [method, 2]
    assert set(bars(figures(at)[0])) >= {f"merged ({method}, k=2)"}
    at = render(full_db, "dissimilarity")
    assert_clean(at)
    assert at.sidebar.selectbox[0].value == method


def test_gain_heatmap_says_why_cells_are_blank(full_db, tmp_path):
    db = tmp_path / "close.duckdb"
    shutil.copy(full_db, db)
    with Store(db).write() as con:  # mnist's head within 2 points of its adapter: its gain is undefined
        con.execute("UPDATE merge_evaluations SET head_accuracy = single_accuracy - 0.01 WHERE task = 'mnist'")
    at = render(db, "merges_vs_heads", {"method": "ties"})
    assert_clean(at)
    blank = sql(db, "SELECT count(*) n, any_value(gain_note) note FROM merge_results WHERE method = 'ties' "
                    "AND normalized_gain IS NULL")  # fmt: skip
    total = sql(db, "SELECT count(*) FROM merge_results WHERE method = 'ties'").iloc[0, 0]
    assert blank.n[0] > 0 and blank.note[0]
    captions = " ".join(c.value for c in at.caption)
    assert f"undefined for {blank.n[0]} of {total} rows of ties" in captions and blank.note[0] in captions
    trace = figures(at)[1]["data"][0]
    column = trace["x"].index("mnist")
    assert all(row[column] is None or np.isnan(row[column]) for row in trace["z"])
    at = render(full_db, "merges_vs_heads", {"method": "ties"})  # nothing blank: nothing to explain
    assert "Blank cells" not in " ".join(c.value for c in at.caption)


def test_methods_axis_is_zoomed_to_the_data_with_its_unit(full_db):
    at = render(full_db, "methods")
    assert_clean(at)
    figure = figures(at)[0]
    expected = sql(
        full_db,
        """WITH unit AS (SELECT method, k, tasks, seed, avg(normalized_accuracy) v FROM merge_results GROUP BY ALL),
                cell AS (SELECT avg(v) m, stddev_samp(v) sd FROM unit GROUP BY method, k)
           SELECT min(m - sd) low, max(m + sd) high FROM cell""",
    )
    low, high = figure["layout"]["yaxis"]["range"]
    assert 0 < low <= expected.low[0] and expected.high[0] <= high < 1  # not 0 to 1
    assert high - low < 1.5 * (expected.high[0] - expected.low[0])
    assert "ratio (1 = single adapter)" in figure["layout"]["yaxis"]["title"]["text"]
    assert any("methods.csv" in b.proto.label for b in at.get("download_button"))


def test_runs_without_finish_are_shown_interrupted_by_the_stated_rule(full_db, tmp_path):
    from mlvision.store import now

    db = tmp_path / "runs.duckdb"
    shutil.copy(full_db, db)
    t = now()
    hours = lambda h: t - pd.Timedelta(hours=h)  # noqa: E731
    rows = [  # run_id, started, finished, stored status
        ("run-old", hours(48), None, "running"),  # older than the limit: its process is long gone
        ("run-superseded", hours(3), None, "running"),  # a later run has finished since
        ("run-done", hours(2), hours(1), "finished"),
        ("run-live", hours(0.2), None, "running"),  # the newest: may still be going
    ]
    with Store(db).write() as con:
        con.executemany("INSERT INTO runs (run_id, started_at, finished_at, status) VALUES (?, ?, ?, ?)", rows)
    at = render(db, "runs")
    assert_clean(at)
    shown = at.dataframe[0].value.set_index("run_id")["status"].to_dict()
    interrupted = "interrupted (no finish recorded)"
    expected = sql(
        db,
        f"""SELECT run_id, CASE WHEN finished_at IS NULL AND status = 'running' AND (
                   started_at < TIMESTAMP '{t}' - INTERVAL 24 HOUR
                   OR EXISTS (SELECT 1 FROM runs l WHERE l.started_at > r.started_at AND l.finished_at IS NOT NULL))
               THEN '{interrupted}' ELSE status END AS status FROM runs r""",
    )
    assert shown == dict(zip(expected["run_id"], expected["status"]))
    assert shown["run-old"] == shown["run-superseded"] == interrupted and shown["run-live"] == "running"
    assert "more than 24 h ago, or when a run started after it has already finished" in " ".join(
        c.value for c in at.caption
    )


# ------------------------------------------------------------------------ the twenty-task pool (issue 32)


def test_pairs_carry_their_relation_kind_and_each_kind_gets_a_row():
    """similarity_points names each pair's designed relation from the registry; relation_comparison keeps the
    related / unrelated rows (the study's) and adds one per kind when the pairs have several."""
    from dashboard import analysis, queries

    pairs = [("spoken_digit", "spoken_language"), ("mnist", "spoken_digit"), ("greek_letters", "cyrillic_letters")]
    pairs += [("mnist", "animals"), ("fashion_mnist", "spoken_rate")]
    similarity = pd.DataFrame(
        [
            {"measure": "frechet", "task_a": a, "task_b": b, "value": float(i), "seed": 0}
            for i, (a, b) in enumerate(pairs)
        ]
    )
    retention = pd.DataFrame(
        [{"task_a": a, "task_b": b, "retention": 0.8 + 0.01 * i, "n": 4} for i, (a, b) in enumerate(pairs)]
    )
    names = sorted({t for p in pairs for t in p})
    points = analysis.similarity_points(similarity, retention, queries.pair_relations(str(DEFAULT_DB_PATH), names))
    kinds = dict(zip(points["pair"], points["relation"]))
    assert kinds == {
        "spoken_digit + spoken_language": "same_images",
        "mnist + spoken_digit": "same_labels",
        "greek_letters + cyrillic_letters": "same_style",
        "mnist + animals": "unrelated",
        "fashion_mnist + spoken_rate": "unrelated",
    }
    assert points["related"].tolist() == [k != "unrelated" for k in points["relation"]]
    table = analysis.relation_comparison(points).set_index("pairs")
    assert table.loc["related by construction", "n"] == 3 and table.loc["unrelated", "n"] == 2
    assert {"same images (related)", "same labels (related)", "same style (related)"} <= set(table.index)
    assert table.loc["unrelated", "mean"] == pytest.approx((0.83 + 0.84) / 2)


def test_pair_gains_become_a_task_by_partner_matrix():
    from dashboard import analysis

    rows = []
    for group, gains in {"a,b": (0.5, 0.25), "a,c": (1.0, -0.5), "b,c": (0.0, 0.75)}.items():
        for task, gain in zip(group.split(","), gains):
            rows.append({"method": "ties", "k": 2, "tasks": group, "task": task, "normalized_gain": gain})
    rows.append({"method": "ties", "k": 3, "tasks": "a,b,c", "task": "a", "normalized_gain": 9.0})  # not a pair
    matrix = analysis.pair_gain_matrix(pd.DataFrame(rows), "ties")
    assert list(matrix.index) == list(matrix.columns) == ["a", "b", "c"]
    assert matrix.loc["a", "b"] == 0.5 and matrix.loc["b", "a"] == 0.25 and matrix.loc["c", "a"] == -0.5
    assert np.isnan(matrix.loc["a", "a"])
    assert analysis.pair_gain_matrix(pd.DataFrame(rows), "other").empty
