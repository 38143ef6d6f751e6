"""A study of adapters you already have (`run_all --adapters`, study/given.py; issue 18).

The tiny study's adapters are given back to run_all as if they came from elsewhere: the new study must
import them (same test accuracies, new content-based ids), train the same head baselines, merge them
to the very same per-image outcomes as the study that trained them, measure similarity and findings,
resume without writing, and give a file the dashboard reads. LoRAs trained elsewhere with peft on a tiny
random timm ViT and on a tiny random transformers ViT get a whole study too, their imported copies giving
peft's own logits. Every unusable input is one line, a non-zero exit and no results file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import call_main, query_db
from streamlit.testing.v1 import AppTest

from mlvision.models import load_model
from mlvision.paths import REPO_ROOT
from study.run_all import main as run_all_main

# The tiny study's limits, so the head baselines and the merge evaluation are the same as there.
LIMITS = ["--head-epochs", "3", "--max-train", "128", "--max-validation", "64", "--max-test", "96",
          "--merge-eval", "48", "--merge-select", "16"]  # fmt: skip


def adapter_folders(tiny_study) -> dict[str, Path]:
    rows = query_db(tiny_study["db"], "SELECT task, path FROM models WHERE model_kind = 'adapter' AND seed = 0")
    return {task: REPO_ROOT / path if not Path(path).is_absolute() else Path(path) for task, path in rows}


@pytest.fixture(scope="module")
def given_study(tiny_study, tmp_path_factory):
    """The tiny study's three adapters studied as given adapters: {'db', 'argv', 'out'}."""
    root = tmp_path_factory.mktemp("given")
    folders = adapter_folders(tiny_study)
    argv = ["--adapters", *[folders[task] for task in sorted(folders)], *LIMITS,
            "--merge-methods", "task_arithmetic", "--max-k", "2", "--stages", "train", "merge", "findings",
            "--db", root / "results.duckdb", "--artifacts", root / "artifacts"]  # fmt: skip
    assert run_all_main([str(a) for a in argv]) == 0  # in this process (a module fixture has no capsys)
    return {"db": root / "results.duckdb", "argv": argv, "root": root, "folders": folders}


def test_given_adapters_keep_their_accuracies_and_get_content_ids(given_study, tiny_study):
    # a study of given adapters trains no multi-layer probe (its base may be a model without stages to pool)
    sql = "SELECT task, model_kind, accuracy, model_id FROM task_results WHERE model_kind <> 'probe' ORDER BY ALL"
    given = {(task, kind): (acc, model_id) for task, kind, acc, model_id in query_db(given_study["db"], sql)}
    trained = {(task, kind): (acc, model_id) for task, kind, acc, model_id in query_db(tiny_study["db"], sql)}
    assert query_db(given_study["db"], "SELECT count(*) FROM probe_results")[0][0] == 0
    assert set(given) == set(trained) and len(given) == 6
    for key in given:
        assert given[key][0] == trained[key][0], key  # same adapter, same test images; same head training
        same_id = given[key][1] == trained[key][1]
        assert same_id == (key[1] == "head"), key  # a given adapter's identity is its content
    config = json.loads(query_db(given_study["db"], "SELECT config FROM models WHERE model_kind = 'adapter'")[0][0])
    assert config["rank"] == 4 and len(config["given_sha256"]) == 64 and Path(config["source"]).is_dir()


def test_given_adapters_merge_to_the_same_outcomes(given_study, tiny_study):
    sql = (
        "SELECT tasks, task, merged_correct, normalized_accuracy FROM merge_results "
        "WHERE method = 'task_arithmetic' AND k = 2 ORDER BY tasks, task"
    )
    given, trained = query_db(given_study["db"], sql), query_db(tiny_study["db"], sql)
    assert len(given) == 6 and given == trained  # 3 pairs x 2 tasks, image by image
    pairs = query_db(given_study["db"], "SELECT count(DISTINCT (task_a, task_b)) FROM task_similarity")[0][0]
    claims = query_db(given_study["db"], "SELECT count(*) FROM findings WHERE finding = 'claims'")[0][0]
    assert pairs == 3 and claims > 0


def test_given_study_resumes_without_writing(given_study, capsys):
    before = given_study["db"].read_bytes()
    code, out, err = call_main(run_all_main, given_study["argv"], capsys)
    assert code == 0, err
    assert "0 models trained, 6 already stored" in out and "0 merges evaluated" in out
    assert given_study["db"].read_bytes() == before


def test_dashboard_reads_a_given_study(given_study):
    os.environ["MLV_DB"] = str(given_study["db"])
    for page in ("overview", "merge_count", "runs"):
        at = AppTest.from_file(str(REPO_ROOT / "dashboard" / "app.py"), default_timeout=120)
        at.query_params["page"] = page
        at.run()
        assert not at.exception, page
        assert len(at.get("plotly_chart")) >= (1 if page == "merge_count" else 0), page
        if page == "runs":  # the run's command says which adapters it studied
            commands = [str(c) for frame in at.dataframe if "command" in frame.value for c in frame.value["command"]]
            assert any("--adapters" in command for command in commands), commands


def _foreign(tmp_path: Path) -> Path:
    folder = tmp_path / "peft-lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return folder


def _other_backbone(tmp_path: Path, folder: Path) -> Path:
    copy = tmp_path / "bigger"
    shutil.copytree(folder, copy)
    meta = json.loads((copy / "task.json").read_text())
    meta["backbone"]["image_size"] = 64
    (copy / "task.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize(
    "case, expected",
    [
        ("foreign", "another trainer"),
        ("head", "baseline, not an adapter"),
        ("labels", "trained on labels"),
        ("backbones", "different backbones"),
        ("uneven", "same number of adapters"),
        ("tasks_too", "leave out --tasks"),
        ("missing", "no model folder"),
        ("bad_pair", "ADAPTER=TASK"),
    ],
)
def test_unusable_adapters_fail_in_one_line(case, expected, tiny_study, tmp_path, capsys):
    folders = adapter_folders(tiny_study)
    digits, faces = folders["uci_digits"], folders["lfw_faces"]
    head = query_db(tiny_study["db"], "SELECT path FROM models WHERE model_kind = 'head' LIMIT 1")[0][0]
    given = {
        "foreign": [str(digits), str(_foreign(tmp_path))],
        "head": [str(digits), str(REPO_ROOT / head if not Path(head).is_absolute() else head)],
        "labels": [str(digits), f"{faces}=uci_digits"],
        "backbones": [str(digits), str(_other_backbone(tmp_path, faces))],
        "uneven": [str(digits), str(digits), str(faces)],
        "tasks_too": [str(digits), str(faces)],
        "missing": [str(digits), str(tmp_path / "nowhere")],
        "bad_pair": [str(digits), "=uci_digits"],
    }[case]
    extra = ["--tasks", "uci_digits", "lfw_faces"] if case == "tasks_too" else []
    db = tmp_path / "results.duckdb"
    code, out, err = call_main(run_all_main, ["--adapters", *given, *extra, "--db", db], capsys)
    assert code != 0 and expected in err, (case, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not db.exists()


# ------------------------------------------------------------------ peft LoRAs of a timm model, from elsewhere

TIMM_TASKS = {"hub:runs/tiny-vit/data/uci_digits": "modules_to_save", "hub:runs/tiny-vit/data/lfw_faces": "head"}
TIMM_LIMITS = ["--head-epochs", "3", "--max-train", "64", "--max-validation", "32", "--max-test", "48",
               "--merge-eval", "48", "--merge-select", "16"]  # fmt: skip


def _timm_base_preprocess(base: Path):
    import timm

    from mlvision.backbone import Preprocess

    model = timm.create_model(f"local-dir:{base}", pretrained=True, num_classes=0)
    data = timm.data.resolve_data_config({}, model=model)
    return Preprocess(32, tuple(data["mean"]), tuple(data["std"]), data["interpolation"])


def _train_timm_adapter(base: Path, task: str, head_via: str, folder: Path) -> None:
    """peft's custom-models recipe on a timm model: LoRA on qkv and fc1, the classifier in modules_to_save or
    saved beside the adapter as head.safetensors; ten AdamW steps on 64 of the task's training images."""
    import timm
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from mlvision.data import split_tensors
    from mlvision.tasks import get_task

    torch.manual_seed(0)
    images, labels = split_tensors(task, "train", _timm_base_preprocess(base), 64)
    model = get_peft_model(
        timm.create_model(f"local-dir:{base}", pretrained=True, num_classes=get_task(task).num_classes),
        LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], lora_dropout=0.0,
                   modules_to_save=["head"] if head_via == "modules_to_save" else None),
    )  # fmt: skip
    head = model.base_model.model.head
    head.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(10):
        batch = slice(16 * (step % 4), 16 * (step % 4) + 16)
        loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    if head_via == "head":
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(folder / "head.safetensors"))


def _peft_predictions(base: Path, task: str, folder: Path, head_via: str):
    """(logits, test accuracy) of the adapter as peft's own model gives them (timm + PeftModel), on the study's
    test images."""
    import timm
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from mlvision.data import split_tensors
    from mlvision.tasks import get_task

    images, labels = split_tensors(task, "test", _timm_base_preprocess(base), 48)
    model = timm.create_model(f"local-dir:{base}", pretrained=True, num_classes=get_task(task).num_classes)
    model = PeftModel.from_pretrained(model, str(folder)).eval()
    if head_via == "head":
        model.base_model.model.head.load_state_dict(load_file(str(folder / "head.safetensors")))
    with torch.no_grad():
        logits = model(images)
    return images, logits, float((logits.argmax(-1) == labels).float().mean())


@pytest.fixture(scope="module")
def timm_given(tmp_path_factory):
    """A tiny random timm ViT saved with save_for_hf, a timm LoRA trained on each of two tiny-vit datasets, and the
    study of them through run_all --adapters ... --base."""
    import timm
    import torch

    from mlvision.config import prepare_profile_data

    root = tmp_path_factory.mktemp("given_timm")
    prepare_profile_data("tiny-vit")  # the local hub-shaped datasets (runs/tiny-vit/data)
    torch.manual_seed(0)
    base = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=10
    )
    timm.models.save_for_hf(base, root / "base", safe_serialization=True)
    adapters = {}
    for task, head_via in TIMM_TASKS.items():
        adapters[task] = root / task.rsplit("/", 1)[-1]
        _train_timm_adapter(root / "base", task, head_via, adapters[task])
    given = [f"{folder}={task}" for task, folder in adapters.items()]
    argv = ["--adapters", *given, "--base", f"local-dir:{root / 'base'}", *TIMM_LIMITS,
            "--merge-methods", "task_arithmetic", "ties", "--max-k", "2", "--stages", "train", "merge", "findings",
            "--db", root / "results.duckdb", "--artifacts", root / "artifacts"]  # fmt: skip
    return {"root": root, "base": root / "base", "adapters": adapters, "argv": argv, "db": root / "results.duckdb"}


def test_timm_adapters_from_elsewhere_get_a_whole_study(timm_given, capsys):
    code, out, err = call_main(run_all_main, timm_given["argv"], capsys)
    assert code == 0, err
    assert "2 given adapters imported" in out
    db = timm_given["db"]
    rows = query_db(db, "SELECT task, model_kind, accuracy, backbone, n_test FROM task_results ORDER BY ALL")
    assert len(rows) == 4 and {row[3] for row in rows} == {"vit_tiny_patch16_224"}
    for task, head_via in TIMM_TASKS.items():
        ours = next(row[2] for row in rows if row[0] == task and row[1] == "adapter")
        images, logits, theirs = _peft_predictions(timm_given["base"], task, timm_given["adapters"][task], head_via)
        assert abs(ours - theirs) <= 1 / 48, (task, ours, theirs)  # one image may flip on a float near-tie
        # the study's own copy of the adapter (converted, then imported) is peft's model, logit for logit
        path = query_db(db, "SELECT path FROM models WHERE model_kind = 'adapter' AND task = ?", [task])[0][0]
        imported = load_model(REPO_ROOT / path if not Path(path).is_absolute() else path)
        with torch.no_grad():
            difference = (imported.model(images)[task] - logits).abs().max()
        assert difference < 1e-5, (task, float(difference))
    methods = query_db(db, "SELECT method, count(*) FROM merge_results WHERE k = 2 GROUP BY ALL ORDER BY 1")
    assert methods == [("task_arithmetic", 2), ("ties", 2)]
    assert query_db(db, "SELECT count(*) FROM task_similarity")[0][0] > 0
    # a second run: the conversions are read from the cache, nothing is stored again
    code, out, err = call_main(run_all_main, timm_given["argv"], capsys)
    assert code == 0 and "0 models trained, 4 already stored" in out and "0 merges evaluated" in out, err


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_base", "pass --base"),
        ("no_task", "names no task of this project"),
        ("classes", "has 10 outputs but the task it is scored on has"),
        ("transformers", "modules_to_save=['classifier']"),
    ],
)
def test_unusable_timm_adapters_fail_in_one_line(case, expected, timm_given, tmp_path, capsys):
    digits_task, faces_task = list(TIMM_TASKS)
    digits, faces = timm_given["adapters"][digits_task], timm_given["adapters"][faces_task]
    base = ["--base", f"local-dir:{timm_given['base']}"]
    if case == "transformers":  # the same LoRA, its config naming a transformers model as its base
        faces = tmp_path / "hf"
        shutil.copytree(timm_given["adapters"][faces_task], faces)
        config = json.loads((faces / "adapter_config.json").read_text())
        (faces / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "google/vit-base"}))
    given = {
        "no_base": [f"{digits}={digits_task}", f"{faces}={faces_task}"],
        "no_task": [f"{digits}", f"{faces}={faces_task}"],
        "classes": [f"{digits}={faces_task}", f"{faces}={faces_task}"],
        "transformers": [f"{faces}={faces_task}", f"{digits}={digits_task}"],  # refused before digits' base
    }[case]
    extra = [] if case in ("no_base", "transformers") else base
    db = tmp_path / "results.duckdb"
    code, out, err = call_main(run_all_main, ["--adapters", *given, *extra, "--db", db], capsys)
    assert code != 0 and expected in err, (case, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not db.exists()


# ------------------------------------- peft LoRAs of a transformers model (peft's image-classification guide)

HF_TASKS = ("hub:runs/tiny-vit/data/uci_digits", "hub:runs/tiny-vit/data/lfw_faces")


def _hf_preprocess(base: Path):
    from transformers import ViTForImageClassification

    from mlvision.backbone import transformers_preprocess

    return transformers_preprocess(str(base), ViTForImageClassification.from_pretrained(base))


def _train_hf_adapter(base: Path, task: str, folder: Path) -> None:
    """peft's image-classification guide: the base loaded with a fresh classifier of the task's size, LoRA on the
    attention's q_proj and v_proj, the classifier in modules_to_save; ten AdamW steps on 64 training images."""
    from peft import LoraConfig, get_peft_model
    from transformers import ViTForImageClassification

    from mlvision.data import split_tensors
    from mlvision.tasks import get_task

    torch.manual_seed(0)
    images, labels = split_tensors(task, "train", _hf_preprocess(base), 64)
    model = ViTForImageClassification.from_pretrained(
        base, num_labels=get_task(task).num_classes, ignore_mismatched_sizes=True
    )
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(10):
        batch = slice(16 * (step % 4), 16 * (step % 4) + 16)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=images[batch]).logits, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)


def test_transformers_adapters_from_elsewhere_get_a_whole_study(tmp_path, capsys):
    """Two adapters of a tiny random transformers ViT (save_pretrained) get a whole study without --base (their
    adapter_config.json names the base); the study's imported copy is peft's own model, logit for logit."""
    from peft import PeftModel
    from transformers import ViTConfig, ViTForImageClassification, logging

    from mlvision.config import prepare_profile_data
    from mlvision.data import split_tensors
    from mlvision.tasks import get_task

    logging.set_verbosity_error()  # the guide's fresh classifier is reported as newly initialised
    prepare_profile_data("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    ViTForImageClassification(config).save_pretrained(tmp_path / "base")
    adapters = {task: tmp_path / task.rsplit("/", 1)[-1] for task in HF_TASKS}
    for task, folder in adapters.items():
        _train_hf_adapter(tmp_path / "base", task, folder)
    db = tmp_path / "results.duckdb"
    argv = ["--adapters", *[f"{folder}={task}" for task, folder in adapters.items()], *TIMM_LIMITS,
            "--merge-methods", "task_arithmetic", "regmean", "--max-k", "2", "--stages", "train", "merge", "findings",
            "--db", db, "--artifacts", tmp_path / "artifacts"]  # fmt: skip
    code, out, err = call_main(run_all_main, argv, capsys)
    assert code == 0, err
    assert "2 given adapters imported" in out
    assert {row[0] for row in query_db(db, "SELECT backbone FROM task_results")} == {"ViTForImageClassification"}
    preprocess = _hf_preprocess(tmp_path / "base")
    for task, folder in adapters.items():
        images, labels = split_tensors(task, "test", preprocess, 48)
        theirs = ViTForImageClassification.from_pretrained(
            tmp_path / "base", num_labels=get_task(task).num_classes, ignore_mismatched_sizes=True
        )
        theirs = PeftModel.from_pretrained(theirs, str(folder)).eval()
        path = query_db(db, "SELECT path FROM models WHERE model_kind = 'adapter' AND task = ?", [task])[0][0]
        imported = load_model(REPO_ROOT / path if not Path(path).is_absolute() else path)
        with torch.no_grad():
            logits = theirs(pixel_values=images).logits
            difference = (imported.model(images)[task] - logits).abs().max()
        assert difference < 1e-5, (task, float(difference))
        accuracy = query_db(db, "SELECT accuracy FROM task_results WHERE model_kind = 'adapter' AND task = ?", [task])[
            0
        ][0]
        assert abs(accuracy - float((logits.argmax(-1) == labels).float().mean())) <= 1 / 48
    methods = query_db(db, "SELECT method, count(*) FROM merge_results WHERE k = 2 GROUP BY ALL ORDER BY 1")
    assert methods == [("regmean", 2), ("task_arithmetic", 2)]  # RegMean's Gram matrices on the transformers ViT


# ------------- issue 29: labels from the dataset before the base's, refusals before anything is stored, run status

UCI, MNIST = "hub:runs/tiny-vit/data/uci_digits", "hub:runs/tiny-vit/data/mnist"
QUICK = ["--head-epochs", "1", "--max-train", "32", "--max-validation", "16", "--max-test", "16",
         "--merge-eval", "16", "--merge-select", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def hf_adapters(tmp_path_factory) -> dict[str, Path]:
    """Untrained peft LoRAs (B random, not zero) of a tiny random transformers ViT whose config.json names its ten
    classes "digit-0"... (the size of the adapters' classifiers): each with labels.json holding its dataset's names,
    except "unnamed"; "other" is a second mnist adapter, "q_only" adapts q_proj alone, "r8" has rank 8."""
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification, logging

    from mlvision.config import prepare_profile_data
    from mlvision.tasks import get_task

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # a refusal's stderr is then its one line (the study loads the base to convert)
    prepare_profile_data("tiny-vit")
    root = tmp_path_factory.mktemp("given_hf")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, id2label={i: f"digit-{i}" for i in range(10)})  # fmt: skip
    ViTForImageClassification(config).save_pretrained(root / "base")
    specs = {"digits": (UCI, 4, ["q_proj", "v_proj"]), "unnamed": (UCI, 4, ["q_proj", "v_proj"]),
             "mnist": (MNIST, 4, ["q_proj", "v_proj"]), "other": (MNIST, 4, ["q_proj", "v_proj"]),
             "q_only": (MNIST, 4, ["q_proj"]), "r8": (MNIST, 8, ["q_proj", "v_proj"])}  # fmt: skip
    folders = {}
    for seed, (name, (task, rank, targets)) in enumerate(specs.items()):
        torch.manual_seed(seed)
        lora = LoraConfig(r=rank, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"],
                          init_lora_weights=False)  # fmt: skip
        get_peft_model(ViTForImageClassification.from_pretrained(root / "base"), lora).save_pretrained(root / name)
        if name != "unnamed":
            (root / name / "labels.json").write_text(json.dumps(list(get_task(task).label_names)))
        folders[name] = root / name
    return folders


def test_a_study_names_classes_after_its_dataset_before_the_base_model(hf_adapters, tmp_path, capsys):
    """No labels beside the adapter: the dataset's ClassLabel names, never the base config's id2label of the same
    size (issue 29: those were taken first and the study then refused the adapter, suggesting another task)."""
    from mlvision.config import StudyConfig
    from mlvision.tasks import get_task
    from study.given import given_config

    config = StudyConfig(merge_methods=("task_arithmetic",), db=str(tmp_path / "results.duckdb"))
    config = given_config(config, [f"{hf_adapters['unnamed']}={UCI}", f"{hf_adapters['mnist']}={MNIST}"], set())
    converted = json.loads((Path(config.given_adapters[0][2]) / "task.json").read_text())
    assert converted["label_names"] == list(get_task(UCI).label_names) == [str(i) for i in range(10)]
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, expected",
    [
        ("layers", "adapt different layers"),
        ("ranks", "needs adapters of one rank"),
        ("labels", "correct the names beside it"),
    ],
)
def test_what_the_merge_stage_would_refuse_is_refused_before_anything_is_stored(
    case, expected, hf_adapters, tmp_path, capsys
):
    """Issue 29: adapters of different layers were refused only by the merge stage, after the heads and the imports
    were stored; peft's linear merge of two ranks failed there with peft's own exception."""
    digits = f"{hf_adapters['digits']}={UCI}"
    second = {"layers": "q_only", "ranks": "r8", "labels": "mnist"}[case]
    if case == "labels":  # names beside the adapter that are not its dataset's
        digits = f"{shutil.copytree(hf_adapters['digits'], tmp_path / 'renamed')}={UCI}"
        (tmp_path / "renamed" / "labels.json").write_text(json.dumps([f"d{i}" for i in range(10)]))
    methods = "peft_linear" if case == "ranks" else "task_arithmetic"
    db = tmp_path / "results.duckdb"
    argv = ["--adapters", digits, f"{hf_adapters[second]}={MNIST}", *QUICK, "--merge-methods", methods,
            "--stages", "train", "merge", "--db", db, "--artifacts", tmp_path / "artifacts"]  # fmt: skip
    code, out, err = call_main(run_all_main, argv, capsys)
    assert code == 2 and expected in err, (case, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not db.exists()


@pytest.fixture(scope="module")
def hf_study(hf_adapters, tmp_path_factory) -> dict:
    """The training stage of a study of the "digits" and "mnist" adapters, stored."""
    root = tmp_path_factory.mktemp("given_hf_study")
    argv = ["--adapters", f"{hf_adapters['digits']}={UCI}", f"{hf_adapters['mnist']}={MNIST}", *QUICK,
            "--merge-methods", "ties", "--stages", "train", "--db", root / "results.duckdb",
            "--artifacts", root / "artifacts"]  # fmt: skip
    assert run_all_main([str(a) for a in argv]) == 0
    return {"db": root / "results.duckdb", "argv": argv}


def test_another_adapter_for_a_stored_task_and_seed_is_refused(hf_adapters, hf_study, capsys):
    """A corrected list (another mnist adapter) into the same file is refused before anything is written: its
    content-based id would otherwise stand beside the first as a second adapter row for (mnist, 0) (issue 29)."""
    before = hf_study["db"].read_bytes()
    argv = [str(a) for a in hf_study["argv"]]
    argv[argv.index(f"{hf_adapters['mnist']}={MNIST}")] = f"{hf_adapters['other']}={MNIST}"
    code, out, err = call_main(run_all_main, argv, capsys)
    assert code == 2 and "already holds another adapter for task" in err and MNIST in err, err
    assert len(err.strip().splitlines()) == 1
    assert hf_study["db"].read_bytes() == before
    rows = query_db(hf_study["db"], "SELECT task, seed, count(*) FROM task_results WHERE model_kind = 'adapter' "
                    "GROUP BY ALL")  # fmt: skip
    assert sorted(row[2] for row in rows) == [1, 1], rows


def test_a_run_that_fails_records_when_and_why(hf_study, capsys):
    """A run stopped by a user-fixable problem (here the study's copy of an adapter damaged before its merge) ends
    its record as failed, with its finish time; the run that completes it later marks it finished (issue 29)."""
    db = hf_study["db"]
    argv = [str(a) for a in hf_study["argv"]]
    argv[argv.index("ties")] = "task_arithmetic"  # another study configuration: a new run
    argv[argv.index("--stages") + 1 : argv.index("--stages") + 2] = ["train", "merge"]
    path = query_db(db, "SELECT path FROM models WHERE model_kind = 'adapter' AND task = ?", [MNIST])[0][0]
    factors = (REPO_ROOT / path if not Path(path).is_absolute() else Path(path)) / "adapter_model.safetensors"
    intact = factors.read_bytes()
    factors.write_bytes(intact[:100])
    try:
        code, out, err = call_main(run_all_main, argv, capsys)
    finally:
        factors.write_bytes(intact)
    assert code == 2 and "cannot read the LoRA files" in err, err
    runs = query_db(db, "SELECT status, finished_at FROM runs WHERE command LIKE '%task_arithmetic%'")
    assert len(runs) == 1 and runs[0][0].startswith("failed: cannot read the LoRA files") and runs[0][1], runs
    code, out, err = call_main(run_all_main, argv, capsys)
    assert code == 0, err
    runs = query_db(db, "SELECT status, finished_at FROM runs WHERE command LIKE '%task_arithmetic%'")
    assert runs[0][0] == "finished" and runs[0][1], runs


def test_a_local_dataset_folder_needs_no_hub_prefix(tmp_path):
    """As merge.py's --data takes it: ADAPTER=FOLDER names the save_to_disk folder, read as the study's hub:FOLDER."""
    from study.given import parse_given

    folder = tmp_path / "pets"
    folder.mkdir()
    assert parse_given(f"a/={folder}") == ("a/", f"hub:{folder}")
    assert parse_given(f"a/=hub:{folder}") == ("a/", f"hub:{folder}")
    assert parse_given("a/=mnist") == ("a/", "mnist")
    assert parse_given("a/=no_such_folder_or_task") == ("a/", "no_such_folder_or_task")  # refused later by name
