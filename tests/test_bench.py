"""Benchmarks: stored figures are consistent with each other, a rerun never duplicates, bad input is named.

No timing is asserted (a test cannot know how fast a machine is): the tests check that every
planned setting is measured and stored once, that derived columns follow from the measured ones,
and the primitives (interleaving order, percentile, peak memory) on inputs with known answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import duckdb
import pytest
import torch
from conftest import TINY_ARGS, TINY_METHODS, TINY_TASKS, call_main, query_db, run_all

from benchmarks.cli import main as bench_main
from benchmarks.options import BenchConfig
from benchmarks.sections import SECTIONS
from benchmarks.stage import BenchStage
from benchmarks.timing import PeakMemory, median_p95, time_interleaved
from merging.methods import list_methods
from mlvision.config import config_from_args
from mlvision.paths import REPO_ROOT
from mlvision.store import SCHEMA_VERSION, Store
from study.run_all import build_parser


def study_config(db, artifacts):
    return config_from_args(
        build_parser().parse_args([str(a) for a in (*TINY_ARGS, "--db", db, "--artifacts", artifacts)]),
        tuple(list_methods()),
    )


def copy_study(tiny_study, tmp_path):
    db = tmp_path / "results.duckdb"
    shutil.copy(tiny_study["db"], db)
    return db


def bench_cli(*args, timeout=300):
    """The CLI in a subprocess with this process's torch threads (threads are part of a figure's identity)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run(
        [sys.executable, "-m", "training.bench", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# ------------------------------------------------------------------------------ primitives


def test_median_and_p95_by_nearest_rank():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert median_p95(values) == (50.5, 95.0)
    assert median_p95([3.0, 1.0, 2.0]) == (2.0, 3.0)


def test_interleaving_rotates_the_order_every_round():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = time_interleaved(calls, repeats=3, warmup=1, device=torch.device("cpu"))
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(200 * 2**20 // 4)  # 200 MB, written so the pages are resident
        del block
    # the kernel's peak-resident counter (reset at the start of the block) sees it exactly, whatever its duration
    assert 199 < memory.peak_mb < 210


# ------------------------------------------------------------------------------ the stored figures


def test_bench_stage_of_run_all_stores_every_setting_once(tiny_study):
    db = tiny_study["db"]
    inference = query_db(
        db,
        "SELECT variant, k, batch_size, median_ms, p95_ms, throughput, ratio_to_backbone, repeats, "
        "device, machine, image_size FROM benchmarks WHERE name = 'inference'",
    )
    assert sorted((v, k, b) for v, k, b, *_ in inference) == sorted(
        (v, k, b) for v in SECTIONS["inference"].variants for k in (1, 2, 3) for b in (1, 4)
    )
    backbone = {(k, b): median for v, k, b, median, *_ in inference if v == "backbone"}
    for variant, k, batch, median, p95, throughput, ratio, repeats, device, machine, image_size in inference:
        assert 0 < median <= p95
        assert throughput == pytest.approx(batch * 1000.0 / median)
        assert ratio == pytest.approx(median / backbone[(k, batch)])
        assert repeats == 3 and device == "cpu" and image_size == 32
        assert {"cpu_model", "cpu_count", "torch_threads", "torch", "device_name"} <= set(json.loads(machine))
    merge = query_db(db, "SELECT variant, k, median_ms FROM benchmarks WHERE name = 'merge'")
    assert sorted((m, k) for m, k, _ in merge) == sorted((m, k) for m in TINY_METHODS for k in (2, 3))
    assert all(ms > 0 for *_, ms in merge)
    # one run's figures: a single measurement time per section, and the study's run id
    assert (
        query_db(db, "SELECT count(DISTINCT measured_at), count(DISTINCT run_id) FROM benchmarks GROUP BY name")
        == [(1, 1)] * 2
    )


@pytest.mark.multiprocess
def test_rerun_skips_and_again_replaces_without_duplicates(tiny_study, tmp_path):
    db = copy_study(tiny_study, tmp_path)
    before = query_db(db, "SELECT bench_id, measured_at FROM benchmark_rows ORDER BY bench_id")
    assert run_all(*TINY_ARGS, "--db", db, "--artifacts", tiny_study["artifacts"], "--stages", "bench") == 0
    assert query_db(db, "SELECT bench_id, measured_at FROM benchmark_rows ORDER BY bench_id") == before  # skipped
    result = bench_cli(
        *TINY_ARGS, "--db", db, "--artifacts", tiny_study["artifacts"], "--bench-sections", "merge", "--again"
    )
    assert result.returncode == 0, result.stderr
    assert "1 sections measured" in result.stdout
    after = query_db(db, "SELECT bench_id, measured_at FROM benchmark_rows ORDER BY bench_id")
    assert [b for b, _ in after] == [b for b, _ in before]  # same figures, replaced in place
    merge_ids = {b for (b,) in query_db(db, "SELECT bench_id FROM benchmark_rows WHERE name = 'merge'")}
    assert all(after_t > before_t for (b, before_t), (_, after_t) in zip(before, after) if b in merge_ids)
    assert all(after_t == before_t for (b, before_t), (_, after_t) in zip(before, after) if b not in merge_ids)


@pytest.mark.multiprocess
def test_training_section_measures_three_variants_in_fresh_processes(tiny_study, tmp_path):
    db = copy_study(tiny_study, tmp_path)
    stage = BenchStage(
        study_config(db, tiny_study["artifacts"]),
        Store(db),
        BenchConfig(sections=("training",), train_steps=2, warmup=1),
    )
    assert stage.run() == {"measured": 1, "skipped": 0}
    rows = {
        r[0]: r[1:]
        for r in query_db(
            db,
            "SELECT variant, batch_size, median_ms, p95_ms, throughput, peak_memory_mb, note, repeats "
            "FROM benchmarks WHERE name = 'training'",
        )
    }
    assert set(rows) == {"lora", "lora_channels_last", "head_only", "full_finetune"}
    trainable = {}
    for variant, (batch, median, p95, throughput, memory, note, repeats) in rows.items():
        assert batch == 32 and repeats == 2 and 0 < median <= p95
        assert throughput == pytest.approx(batch * 1000.0 / median)
        assert memory > 0
        trainable[variant] = int(note.split(" trainable")[0].split("; ")[-1])
    # which weights learn: the head alone < LoRA + head < everything
    assert trainable["head_only"] < trainable["lora"] == trainable["lora_channels_last"] < trainable["full_finetune"]
    # full fine-tuning keeps gradients and AdamW state for every weight, the head-only step for almost none
    assert rows["full_finetune"][4] > rows["head_only"][4]


def test_evaluation_section_stores_eager_and_fast_with_the_speed_up_from_one_loop(tiny_study, tmp_path):
    db = copy_study(tiny_study, tmp_path)
    config = study_config(db, tiny_study["artifacts"])
    stage = BenchStage(config, Store(db), BenchConfig(sections=("evaluation",), repeats=3, warmup=1))
    assert stage.run() == {"measured": 1, "skipped": 0}
    rows = {
        r[0]: r[1:]
        for r in query_db(
            db,
            "SELECT variant, k, batch_size, median_ms, p95_ms, throughput, ratio_to_backbone, repeats, image_size "
            "FROM benchmarks WHERE name = 'evaluation'",
        )
    }
    assert set(rows) == {"eager", "fast"}
    for k, batch, median, p95, throughput, ratio, repeats, image_size in rows.values():
        assert (k, batch, repeats, image_size) == (len(TINY_TASKS), 256, 3, 32)
        assert 0 < median <= p95 and throughput == pytest.approx(batch * 1000.0 / median)
    assert rows["eager"][5] == pytest.approx(1.0)
    assert rows["fast"][5] == pytest.approx(rows["eager"][2] / rows["fast"][2])  # eager median / fast median
    assert rows["fast"][4] / rows["eager"][4] == pytest.approx(rows["fast"][5])  # throughput ratio = speed-up
    assert BenchStage(config, Store(db), BenchConfig(sections=("evaluation",), repeats=3, warmup=1)).run() == {
        "measured": 0,
        "skipped": 1,
    }


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bench-repeats", "0"], "must be >= 1"),
        (["--bench-batch-sizes", "1", "-4"], "--bench-batch-sizes must be >= 1"),
        (["--device", "cuda"], "no CUDA device"),
    ],
)
def test_bad_options_get_one_line(tmp_path, args, message, capsys):
    """In this process (the CLI as a process ends the same way: test_benchmarks_before_training_say_what_to_run)."""
    if message == "no CUDA device" and torch.cuda.is_available():
        args, message = ["--device", "tpu"], "invalid choice"  # the same check of a refused device, on a GPU machine
    code, _, err = call_main(bench_main, [*TINY_ARGS, "--db", tmp_path / "r.duckdb", *args], capsys)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_benchmarks_before_training_say_what_to_run(tmp_path):
    result = bench_cli(*TINY_ARGS, "--db", tmp_path / "r.duckdb", "--artifacts", tmp_path / "a")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        f"no trained adapter for task '{TINY_TASKS[0]}'" in result.stderr
        and "run the training stage first" in result.stderr
    )
    assert query_db(tmp_path / "r.duckdb", "SELECT count(*) FROM benchmark_rows") == [(0,)]


def test_version_1_file_is_upgraded_in_place_keeping_its_rows(tmp_path):
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE schema_version (version INTEGER)")
    con.execute("INSERT INTO schema_version VALUES (1)")
    con.execute("""CREATE TABLE benchmark_rows (name VARCHAR, variant VARCHAR, k INTEGER, batch_size INTEGER,
                   device VARCHAR, median_ms DOUBLE, p95_ms DOUBLE, throughput DOUBLE, ratio_to_backbone DOUBLE,
                   machine JSON, measured_at TIMESTAMP)""")
    con.execute("INSERT INTO benchmark_rows VALUES ('inference', 'merged', 2, 1, 'cpu', 5, 6, 200, 1.01, '{}', now())")
    con.close()
    Store(db).initialise()
    assert query_db(db, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert query_db(db, "SELECT variant, median_ms, peak_memory_mb, bench_id FROM benchmarks") == [
        ("merged", 5.0, None, None)
    ]


def test_another_image_size_is_a_figure_of_its_own(tiny_study, tmp_path):
    db = copy_study(tiny_study, tmp_path)
    before = query_db(db, "SELECT bench_id, measured_at FROM benchmark_rows WHERE name = 'inference' ORDER BY bench_id")
    stage = BenchStage(
        study_config(db, tiny_study["artifacts"]),
        Store(db),
        BenchConfig(sections=("inference",), repeats=1, warmup=0, batch_sizes=(2,), max_k=2, image_size=40),
    )
    assert stage.run() == {"measured": 1, "skipped": 0}
    assert (
        query_db(
            db,
            "SELECT bench_id, measured_at FROM benchmark_rows WHERE name = 'inference' AND image_size = 32 "
            "ORDER BY bench_id",
        )
        == before
    )  # the study-size figures are kept
    assert query_db(db, "SELECT count(*), min(batch_size), max(k) FROM benchmarks WHERE image_size = 40") == [
        (10, 2, 2)
    ]


@pytest.mark.multiprocess
def test_a_benchmark_worker_exits_when_its_parent_is_killed(tmp_path):
    """run_all killed with -9 during the bench stage must not leave its spawned worker running (holding the cores
    and the parent's output pipe): the worker's `exit_with_parent` sees its parent gone and exits."""
    import signal
    import time

    pid_file, script = tmp_path / "worker.pid", tmp_path / "parent.py"
    script.write_text(  # a file, not -c: spawn re-imports the parent's main module to find `work`
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from benchmarks.workers import exit_with_parent\n"
        "def work(path):\n"
        "    open(path, 'w').write(str(os.getpid()))\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    context = multiprocessing.get_context('spawn')\n"
        "    with ProcessPoolExecutor(1, mp_context=context, initializer=exit_with_parent) as pool:\n"
        f"        pool.submit(work, {str(pid_file)!r}).result()\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    worker = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30  # the worker checks every 0.5 s
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker outlived its parent by 30 s")


def test_sections_filter_the_performance_page_on_distinct_url_keys():
    """A section's facet is a sidebar widget of the Performance page keyed by its URL key: two sections with one key
    break the page (Streamlit refuses a second widget with the same key) once both have rows."""
    keys = [section.facet[2] for section in SECTIONS.values() if section.facet is not None]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    assert not duplicated, (
        f"facet URL key(s) {duplicated} are used by several sections: give each its own in "
        "benchmarks/sections/<name>.py (the third part of `facet`)"
    )
