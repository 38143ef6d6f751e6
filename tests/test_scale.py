"""Paper-scale machinery, offline: hub-shaped datasets with a random tiny ViT, adapter training on
two DDP processes under `accelerate launch`, and the paper profile's clean failure without a network.

The `tiny-vit` profile is the paper profile in miniature: its tasks are `save_to_disk` folders of
real images from four offline tasks (written into the working directory on first use), loaded by
the same code as hub datasets, with domains assigned by the profile.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import duckdb
import psutil
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import query_db
from safetensors.torch import load_file

from merging.methods import list_methods
from mlvision.backbone import BackboneConfig, create_backbone
from mlvision.config import PROFILES, TINY_VIT_SIZES, TINY_VIT_SOURCES, TINY_VIT_TASK_DOMAINS, config_from_args
from mlvision.models import add_lora, make_head
from mlvision.paths import REPO_ROOT
from mlvision.runs import resolve_stored_path, study_run_id
from mlvision.tasks import related, set_hub_domains
from study.run_all import build_parser
from training.trainers import train_adapter

# the tests' own sizes: the profile, with a smaller merge sweep
SWEEP = ["--max-k", "2", "--merge-methods", "linear", "ties"]
# Two DDP ranks on CPUs. `accelerate launch --cpu` starts a single process unless MPI is set up, so
# the CPU recipe is the multi-process launcher with ACCELERATE_USE_CPU=1 (gloo backend).
LAUNCH = [
    str(Path(sys.executable).parent / "accelerate"),
    "launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
# Measured: 2 ranks x 2 accumulated micro-batches vs 1 plain process differ by at most 6e-5 (LoRA)
# and 4e-7 (head) in relative norm, from float summation order (mean of micro-batch means, gloo
# all-reduce). A wrong shard, a different batch per rank or an unaveraged gradient moves the
# weights by far more than this.
LORA_RTOL, HEAD_RTOL = 1e-3, 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapters(db: Path) -> dict[str, tuple[Path, float, int]]:
    """model_id -> (folder, test accuracy, n_test) of every stored adapter."""
    rows = query_db(
        db,
        "SELECT m.model_id, m.path, r.accuracy, r.n_test FROM models m JOIN task_results r USING (model_id) "
        "WHERE m.model_kind = 'adapter'",
    )
    return {model_id: (resolve_stored_path(path), acc, n) for model_id, path, acc, n in rows}


def run_all_here(root: Path, *args, launcher: list[str] = ()) -> subprocess.CompletedProcess:
    """run_all.py as a command run from `root` (where the profile writes and reads its datasets).

    A subprocess with one thread per process, as the README's commands run: in-process, the test
    session's thread settings make these runs many times slower on a busy two-core machine.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    command = [*(launcher or [sys.executable]), str(REPO_ROOT / "training" / "run_all.py"), *map(str, args)]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The tiny-vit profile run by one plain process (no accelerate launch), from a fresh directory."""
    root = tmp_path_factory.mktemp("tiny_vit")
    result = run_all_here(
        root,
        "--config",
        "tiny-vit",
        "--stages",
        "train",
        "merge",
        "findings",
        *SWEEP,
        "--db",
        root / "single.duckdb",
        "--artifacts",
        root / "single",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tiny_vit_trains_and_merges_hub_shaped_datasets(single):
    db = single / "single.duckdb"
    # the local datasets: real offline images in hub shape, the sizes the profile asks for
    for name in TINY_VIT_SOURCES:
        dd = datasets.load_from_disk(str(single / "runs" / "tiny-vit" / "data" / name))
        assert set(dd) == {"train", "validation", "test"}
        assert 0 < len(dd["test"]) <= TINY_VIT_SIZES["test"] and len(dd["train"]) == TINY_VIT_SIZES["train"]
    # the domains the profile assigned reached the store ...
    domains = dict(TINY_VIT_TASK_DOMAINS)
    assert dict(query_db(db, "SELECT task, domain FROM tasks")) == domains
    # ... and the findings: hub tasks are related by their domain tags (2 related pairs: digits, photos),
    # but the tiny copies (48 test images) fall under the exclusion rule, so no claim is judged on them
    set_hub_domains(domains)
    assert sum(related(a, b) for a, b in itertools.combinations(sorted(domains), 2)) == 2
    claims = dict(query_db(db, "SELECT statistic, note FROM findings WHERE finding = 'claims'"))
    assert set(claims) == {"claim1", "claim1_data_aware", "claim2", "claim3"}
    assert all("every task is excluded by rule" in note for note in claims.values())
    results = query_db(db, "SELECT task, model_kind, accuracy, backbone FROM task_results")
    assert {(t, k) for t, k, _, _ in results} == {(t, k) for t in domains for k in ("head", "adapter", "probe")}
    assert all(0 <= acc <= 1 and backbone == "vit_tiny_patch16_224" for _, _, acc, backbone in results)
    for folder, _, _ in adapters(db).values():
        weights = load_file(folder / "adapter_model.safetensors")
        for module in ("qkv", "proj", "fc1", "fc2"):
            lora_b = [w for key, w in weights.items() if f".{module}.lora_B" in key]
            assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # B starts at zero: it was trained
        assert json.loads((folder / "task.json").read_text())["domain"] in {"digits", "photos"}
    # every pair merged by both methods, each merged model scored on both of its tasks
    merges = query_db(db, "SELECT method, tasks, task, merged_accuracy FROM merge_results")
    assert len(merges) == 6 * 2 * 2 and all(0 <= m[3] <= 1 for m in merges)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ddp_processes_match_one_and_write_once(single):
    """accelerate launch, 2 CPU ranks, 2 micro-batches each.

    The adapters equal those of one process (within LORA_RTOL), and one set of rows is written."""
    db, artifacts = single / "ddp.duckdb", single / "ddp"
    result = run_all_here(
        single,
        "--config",
        "tiny-vit",
        "--stages",
        "train",
        "merge",
        *SWEEP,
        "--grad-accum",
        "2",
        "--db",
        db,
        "--artifacts",
        artifacts,
        launcher=[*LAUNCH, "--main_process_port", str(free_port())],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ((machine,),) = query_db(db, "SELECT machine FROM runs")
    assert json.loads(machine)["processes"] == 2  # really two ranks, not a silent single process
    # exactly one set of rows and folders: rank 1 wrote nothing
    # 4 heads and 4 adapters (validation and test each), and 4 probes (validation, test and merge_test each)
    assert query_db(db, "SELECT count(*), count(DISTINCT model_id) FROM models") == [(12, 12)]
    assert query_db(db, "SELECT count(*) FROM evaluations") == [(28,)]
    assert query_db(db, "SELECT count(*), count(DISTINCT (merge_id, task)) FROM merge_results") == [(24, 24)]
    assert len([p for p in artifacts.rglob("*") if p.name.startswith(("adapter-", "head-"))]) == 8
    assert "models trained" in result.stdout and result.stdout.count("results in") == 1
    # the same adapters as the single-process run of the same configuration
    one, two = adapters(single / "single.duckdb"), adapters(db)
    assert one.keys() == two.keys() and len(one) == 4
    for model_id, (folder, acc, n_test) in one.items():
        folder2, acc2, _ = two[model_id]
        for file, rtol in (("adapter_model.safetensors", LORA_RTOL), ("head.safetensors", HEAD_RTOL)):
            a, b = load_file(folder / file), load_file(folder2 / file)
            assert a.keys() == b.keys()
            for key in a:
                assert (a[key] - b[key]).norm() <= rtol * a[key].norm(), (file, key)
        assert abs(acc - acc2) <= 1 / n_test + 1e-9  # at most one test image changes its answer


MERGE_COLUMNS = "* EXCLUDE (merge_seconds, created_at, run_id)"  # all but the clock and the run
EVALUATION_COLUMNS = "* EXCLUDE (created_at, run_id)"


def merge_rows(db: Path) -> tuple[list, list]:
    return (
        query_db(db, f"SELECT {MERGE_COLUMNS} FROM merges ORDER BY merge_id"),
        query_db(db, f"SELECT {EVALUATION_COLUMNS} FROM merge_evaluations ORDER BY merge_id, task"),
    )


def stored_merges(db: Path) -> int | None:
    """How many merges `db` holds now, or None while a writer holds the file."""
    try:
        with duckdb.connect(str(db), read_only=True) as con:
            return con.execute("SELECT count(*) FROM merges").fetchone()[0]
    except duckdb.IOException:
        return None


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_split_the_merge_sweep_and_a_killed_launch_resumes(single, tmp_path):
    """accelerate launch, 2 CPU processes, merge stage only, on the single run's adapters (its merges removed).

    The first launch is killed (SIGKILL to the whole launch) as soon as its first round of merges is stored; the
    same command again stores only the rest, split between both processes; the rows then equal the single
    process's exactly (merge ids, chosen hyperparameters, validation curves, accuracies, per-image outcomes)."""
    db = tmp_path / "two.duckdb"
    shutil.copy(single / "single.duckdb", db)
    with duckdb.connect(str(db)) as con:
        for table in ("merge_evaluations", "merges", "adapter_updates"):
            con.execute(f"DELETE FROM {table}")
    args = ["--config", "tiny-vit", "--stages", "merge", *SWEEP, "--db", db, "--artifacts", single / "single"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    command = [*LAUNCH, "--main_process_port", str(free_port()), str(REPO_ROOT / "training" / "run_all.py")]
    launch = subprocess.Popen(
        [*command, *map(str, args)],
        cwd=single,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    try:
        while not (stored_merges(db) or 0) and launch.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:  # the launcher and every process under it (torch's elastic agent puts workers in their own sessions)
        tree = psutil.Process(launch.pid)
        for process in [*tree.children(recursive=True), tree]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        launch.wait(timeout=60)
    total = len(merge_rows(single / "single.duckdb")[0])
    kept = stored_merges(db)
    assert 0 < kept < total, f"the kill should land mid-sweep: {kept} of {total} merges stored"

    result = run_all_here(single, *args, launcher=[*LAUNCH, "--main_process_port", str(free_port())])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"merge sweep: {total - kept} merges evaluated, {kept} already stored" in result.stdout
    shares = result.stdout.split("merge sweep split over 2 processes: ", 1)[1].split(" merges", 1)[0].split(" + ")
    assert len(shares) == 2 and all(int(n) > 0 for n in shares) and sum(map(int, shares)) == total - kept
    assert merge_rows(db) == merge_rows(single / "single.duckdb")  # no duplicate, no difference
    assert query_db(db, "SELECT count(*), count(DISTINCT (merge_id, task)) FROM merge_evaluations") == [
        (2 * total, 2 * total)
    ]


def test_accelerate_loop_is_the_plain_loop_bit_for_bit():
    """One process, default options: train_adapter gives exactly the weights of the loop it replaced."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both loops alike; one thread is much faster on a busy machine
    try:
        check_bit_for_bit()
    finally:
        torch.set_num_threads(threads)


def check_bit_for_bit():
    config = BackboneConfig("vit_tiny_patch16_224", "random", 32)
    images, labels = torch.randn(40, 3, 32, 32), torch.arange(40) % 4
    kwargs = dict(
        rank=4, alpha=8.0, target_modules=["qkv", "fc2"], steps=5, batch_size=8, lr=3e-3, head_lr=1e-2, seed=3
    )
    peft_model, head, _ = train_adapter(create_backbone(config), images, labels, 4, **kwargs)

    # the loop as it was before accelerate (same RNG use, same order of operations)
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(3)
    ref = add_lora(create_backbone(config), rank=4, alpha=8.0, target_modules=["qkv", "fc2"])
    ref_head = make_head(ref.num_features, 4)
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in ref.parameters() if p.requires_grad], "lr": 3e-3},
            {"params": ref_head.parameters(), "lr": 1e-2},
        ],
        weight_decay=0.0,
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[3e-3, 1e-2], total_steps=5, pct_start=0.1)
    ref.eval()
    for _ in range(5):
        batch = torch.randint(0, 40, (8,), generator=generator)
        loss = F.cross_entropy(ref_head(ref(images[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    got, want = peft_model.state_dict(), ref.state_dict()
    assert [k for k in got if "lora_" in k] and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), ref_head.state_dict().values()))


def test_paper_profile_resolves():
    paper = config_from_args(build_parser().parse_args(["--config", "paper"]), tuple(list_methods()))
    assert paper == PROFILES["paper"].with_methods(tuple(list_methods()))
    assert timm.is_model(paper.backbone) and paper.backbone == "vit_base_patch16_224.augreg_in21k"
    assert paper.backbone_weights == "hub" and paper.image_size == 224
    assert paper.lora_targets == ["qkv", "proj", "fc1", "fc2"]
    assert len(paper.tasks) == 6 and all(t.startswith("hub:") for t in paper.tasks)
    domains = dict(paper.task_domains)
    assert set(domains) == set(paper.tasks)
    assert domains["hub:ylecun/mnist"] == domains["hub:ufldl-stanford/svhn@cropped_digits"] == "digits"
    assert domains["hub:tanganke/eurosat"] == domains["hub:tanganke/resisc45"] == "remote_sensing"
    assert len(set(domains.values())) == 4  # two similar pairs; every other pair dissimilar
    assert Path(paper.db).parent == REPO_ROOT / "runs" / "paper"  # never the committed results
    # overrides still apply on top of a profile
    assert config_from_args(
        build_parser().parse_args(
            ["--config", "paper", "--backbone", "vit_large_patch16_224", "--task-domains", "hub:a/b=x"]
        ),
        tuple(list_methods()),
    ).task_domains == (("hub:a/b", "x"),)
    # --quick stays the alias it was
    quick = build_parser().parse_args(["--quick"])
    assert (
        config_from_args(quick, tuple(list_methods()))
        == config_from_args(build_parser().parse_args(["--config", "quick"]), tuple(list_methods()))
        == PROFILES["quick"]
    )


def test_default_profile_keeps_its_identities():
    """The committed results.duckdb was made before these options existed: its ids must still match."""
    default = PROFILES["default"].with_methods(tuple(list_methods()))
    assert not {"task_domains", "mixed_precision", "grad_accum"} & set(default.to_dict())
    committed = REPO_ROOT / "results.duckdb"
    assert (study_run_id(default),) in query_db(committed, "SELECT run_id FROM runs")
    stored = {r[0] for r in query_db(committed, "SELECT model_id FROM models")}
    assert {default.model_id("adapter", t, s) for t in default.tasks for s in default.seeds} <= stored
    bf16 = config_from_args(build_parser().parse_args(["--mixed-precision", "bf16"]), tuple(list_methods()))
    assert bf16.model_id("adapter", "mnist", 0) != default.model_id("adapter", "mnist", 0)  # bf16 is another adapter


@pytest.mark.slow
@pytest.mark.multiprocess
def test_paper_profile_offline_fails_in_one_line(tmp_path):
    db = tmp_path / "paper.duckdb"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "training" / "run_all.py"), "--config", "paper", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot load hub dataset 'ylecun/mnist'")
    assert "check the id and your network" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not db.exists()  # nothing started


def test_contradicting_profiles_are_refused(capsys):
    """In this process (the script as a process: test_paper_profile_offline_fails_in_one_line)."""
    from conftest import call_main

    from study.run_all import main

    code, _, err = call_main(main, ["--quick", "--config", "paper"], capsys)
    assert code == 2 and "contradict" in err and "Traceback" not in err


@pytest.mark.multiprocess
def test_device_check_without_cuda_says_so_in_one_line(tmp_path):
    """scripts/device_check.sh (the CUDA path in one command) refuses a machine without CUDA before any work.

    Its steps were run here with DEVICE=cpu (66 s); on CUDA it has not run yet (see the README)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run its whole check")
    out = tmp_path / "check"
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "device_check.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: no CUDA device is visible to torch: run on a GPU machine, or DEVICE=cpu to try the script"
    ]
    assert not out.exists()  # nothing started


def test_streamed_images_are_the_tensor_s_pixels_and_train_the_same_adapter(monkeypatch):
    """Issue 19: the training stage streams a large split (`LazyImages`) instead of holding one tensor of it. Every way
    a trainer indexes it gives the tensor's very pixels, so an adapter trained on either is bit-identical, and the
    features the head baselines are trained on are equal."""
    from mlvision import data
    from mlvision.backbone import make_preprocess
    from mlvision.evaluation import extract_features
    from mlvision.tasks import load_task

    config = BackboneConfig("vit_tiny_patch16_224", "random", 32)
    preprocess = make_preprocess(config)
    tensor, labels = data.split_tensors("uci_digits", "train", preprocess, 48)
    train = load_task("uci_digits")["train"]
    lazy = data.LazyImages(train.select(data.subset_indices(len(train), 48)), preprocess)
    rows = torch.tensor([5, 0, 47, 5, 12])
    assert len(lazy) == len(tensor) == 48
    assert torch.equal(lazy[rows], tensor[rows]) and torch.equal(lazy[3:40:7], tensor[3:40:7])
    assert torch.equal(lazy[[1, 2]], tensor[[1, 2]]) and torch.equal(lazy[9], tensor[9])

    kwargs = dict(rank=2, alpha=4.0, target_modules=["qkv"], steps=3, batch_size=8, lr=3e-3, head_lr=1e-2, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the bit-for-bit test above: one thread is much faster on a busy machine
    try:
        trained = [train_adapter(create_backbone(config), images, labels, 10, **kwargs) for images in (tensor, lazy)]
    finally:
        torch.set_num_threads(threads)
    for (peft_a, head_a, _), (peft_b, head_b, _) in itertools.combinations(trained, 2):
        for (name, a), b in zip(peft_a.state_dict().items(), peft_b.state_dict().values()):
            assert torch.equal(a, b), name
        assert torch.equal(head_a.weight, head_b.weight)
    backbone = create_backbone(config)
    assert torch.equal(
        extract_features(backbone, lazy, batch_size=16), extract_features(backbone, tensor, batch_size=16)
    )

    # what the training stage gets: the tensor while it is small, the stream above the limit, the same labels
    assert isinstance(data.split_images("uci_digits", "train", preprocess, 48)[0], torch.Tensor)
    monkeypatch.setattr(data, "STREAM_ABOVE_MB", 0)
    streamed, streamed_labels = data.split_images("uci_digits", "train", preprocess, 48)
    assert isinstance(streamed, data.LazyImages) and torch.equal(streamed[:], tensor)
    assert torch.equal(streamed_labels, labels)
