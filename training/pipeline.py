"""Training stage of the study: tasks -> head baselines and adapters -> artifacts/ + results.duckdb.

Each unit of work (one head or one adapter for one task and seed) is identified by the hash of
its full configuration. A unit whose test evaluation is already stored is skipped; otherwise it
is trained, its folder written atomically, and its model and evaluation rows inserted in one
transaction. So a run killed at any moment and started again ends with the same rows as an
uninterrupted run, and a second run with nothing left to do only checks hashes.

Under `accelerate launch` every process builds a TrainingStage, but only the main process has a
store: it decides which adapters are missing and tells the others (a broadcast), all processes
train each missing adapter together (DDP), and the main process alone evaluates it, writes its
folder and its rows while the others wait at a barrier. Head baselines (cheap, cached features)
are trained by the main process only.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from mlvision.backbone import create_backbone, make_preprocess
from mlvision.config import StudyConfig
from mlvision.data import split_images, split_tensors
from mlvision.errors import MLVisionError
from mlvision.evaluation import accuracy, extract_features, extract_multilayer_features, prepare_for_inference
from mlvision.models import HEAD_FILE, MultiTaskModel, load_head, load_model, read_meta, save_model
from mlvision.runs import machine_info, model_folder, relative_to_repo, study_run_id
from mlvision.store import Store, config_hash, insert_row, now, pack_correct
from mlvision.tasks import get_task, load_task, set_hub_domains
from training.probe import probe_config, train_probe
from training.trainers import make_accelerator, train_adapter, train_head


def holds_model(folder: Path, model_id: str) -> bool:
    """Whether `folder` already holds the complete model `model_id` (its task.json names it, its head is there):
    written into the same --artifacts by another run, perhaps one recording into another results file. Such a
    folder is reused (scored and recorded), never trained again and overwritten: another results file may point
    to it, and a retrained model is not bit-identical."""
    try:
        meta = read_meta(folder)
    except Exception:  # noqa: BLE001 - missing or unreadable: not a model to reuse
        return False
    adapter_ok = meta.get("model_kind") != "adapter" or (folder / "adapter_model.safetensors").is_file()
    return meta.get("config_hash") == model_id and (folder / HEAD_FILE).is_file() and adapter_ok


class TrainingStage:
    """Trains and evaluates every (task, seed) head baseline and adapter that is not stored yet."""

    def __init__(self, config: StudyConfig, store: Store | None, accelerator: Accelerator | None = None):
        """`store` is None on every process but the main one (which alone writes results)."""
        self.config = config
        self.store = store
        self.accelerator = accelerator or make_accelerator(config.mixed_precision, config.grad_accum)
        if store is None and self.accelerator.is_main_process:
            raise ValueError("the main process needs the store")
        set_hub_domains(dict(config.task_domains))  # every later get_task (findings too) sees them
        self.run_id = study_run_id(config)
        self.backbone_config = config.backbone_config
        base = create_backbone(self.backbone_config)
        self.preprocess = make_preprocess(self.backbone_config, base)
        self.backbone_params = sum(p.numel() for p in base.parameters())
        self._frozen_backbone = base
        self._features: dict[tuple[str, str], torch.Tensor] = {}

    # -- bookkeeping ---------------------------------------------------------------------------
    def start_run(self, command: str) -> bool:
        """Record a new run as running; returns False (writing nothing) when the run is already stored.

        A stored run is marked again only by `finish_run` (when this invocation changed something or completes a
        run not recorded as finished) and `failure_recorded`, so a run with nothing to do leaves results.duckdb
        byte-identical.
        """
        if self.store.query("SELECT count(*) FROM runs WHERE run_id = ?", [self.run_id])[0][0]:
            return False
        with self.store.write() as con:
            insert_row(
                con,
                "runs",
                {
                    "run_id": self.run_id,
                    "started_at": now(),
                    "finished_at": None,
                    "status": "running",
                    "command": command,
                    "config": self.config.to_dict(),
                    "machine": {**machine_info(), "processes": self.accelerator.num_processes},
                },
                key=("run_id",),
            )
        return True

    def finish_run(self, changed: bool) -> None:
        """Mark the run finished, when this invocation stored anything or the run's record is not finished (a failed
        or killed run that this rerun completes); else nothing is written."""
        if not changed:
            status = self.store.query("SELECT status FROM runs WHERE run_id = ?", [self.run_id])
            if not status or status[0][0] == "finished":
                return
        with self.store.write() as con:
            con.execute("UPDATE runs SET status = 'finished', finished_at = ? WHERE run_id = ?", [now(), self.run_id])

    @contextmanager
    def failure_recorded(self):
        """Around a stage: a user-fixable problem (`MLVisionError`) ends the run's record as failed, with the
        time and the message, before it reaches the user, so a stopped run never reads as still running."""
        try:
            yield
        except MLVisionError as error:
            try:
                with self.store.write() as con:
                    con.execute(
                        "UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?",
                        [f"failed: {error}", now(), self.run_id],
                    )
            except MLVisionError:  # the store itself is the problem: the first message is the one to show
                pass
            raise

    def prepare_tasks(self) -> int:
        """Fetch and cache every task's data; record the tasks not stored yet; returns how many were recorded."""
        stored = {row[0] for row in self.store.query("SELECT task FROM tasks")}
        recorded = 0
        for name in tqdm(self.config.tasks, desc="prepare tasks", unit="task"):
            task, splits = get_task(name), load_task(name)
            if task.name in stored:
                continue
            recorded += 1
            with self.store.write() as con:
                insert_row(
                    con,
                    "tasks",
                    {
                        "task": task.name,
                        "label_names": list(task.label_names),
                        "domain": task.domain,
                        "source": task.source,
                        "description": task.description,
                        "n_train": len(splits["train"]),
                        "n_validation": len(splits["validation"]),
                        "n_test": len(splits["test"]),
                    },
                    key=("task",),
                )
        return recorded

    # -- data ----------------------------------------------------------------------------------
    def split(self, task: str, split: str):
        """(images streamed as `LazyImages`, labels) of a task split, at the study's size limit for that split."""
        limit = {
            "train": self.config.max_train,
            "validation": self.config.max_validation,
            "test": self.config.max_test,
        }[split]
        # streamed, not one tensor per split: at paper scale a train split alone is 3 GB as float32 (mlvision/data.py)
        return split_images(task, split, self.preprocess, limit)

    def features(self, task: str, split: str) -> torch.Tensor:
        key = (task, split)
        if key not in self._features:
            self._features[key] = extract_features(
                self._frozen_backbone, self.split(task, split)[0], device=self.accelerator.device
            )
        return self._features[key]

    # -- units -----------------------------------------------------------------------------------
    def _record(self, model_id, kind, task, seed, train_config, folder, trainable, seconds, accuracies, correct=None):
        """A model's row and one evaluation row per split (`accuracies`: split -> (accuracy, n)); `correct`: split ->
        which images it got right (`pack_correct`), stored where given; `folder` None for a model kept as rows only."""
        with self.store.write() as con:
            insert_row(
                con,
                "models",
                {
                    "model_id": model_id,
                    "task": task,
                    "model_kind": kind,
                    "seed": seed,
                    "backbone": self.backbone_config.name,
                    "config": train_config,
                    "config_hash": model_id,
                    "path": relative_to_repo(folder) if folder is not None else None,
                    "trainable_params": trainable,
                    "backbone_params": self.backbone_params,
                    "train_seconds": seconds,
                    "run_id": self.run_id,
                    "created_at": now(),
                },
                key=("model_id",),
            )
            for split, (value, n) in accuracies.items():
                insert_row(
                    con,
                    "evaluations",
                    {
                        "model_id": model_id,
                        "split": split,
                        "accuracy": value,
                        "n": n,
                        "eval_config_hash": config_hash(self.config.eval_limits()),
                        "correct": (correct or {}).get(split),
                        "run_id": self.run_id,
                        "created_at": now(),
                    },
                    key=("model_id", "split"),
                )

    def _meta(self, kind: str, task: str, train_config: dict, model_id: str) -> dict:
        t = get_task(task)
        return {
            "model_kind": kind,
            "task": task,
            "label_names": list(t.label_names),
            "domain": t.domain,
            "backbone": self.backbone_config.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "training": train_config,
            "config_hash": model_id,
        }

    def run_head(self, task: str, seed: int) -> str:
        """Head baseline for (task, seed): "trained", "reused" (its folder was already in --artifacts) or "skipped"
        (already stored)."""
        train_config = self.config.head_training_config(task, seed)
        model_id = self.config.model_id("head", task, seed)
        if self.store.has_model(model_id):
            return "skipped"
        labels = {split: self.split(task, split)[1] for split in ("train", "validation", "test")}
        folder = model_folder(self.config, "head", task, seed, model_id)
        reused = holds_model(folder, model_id)
        start = time.perf_counter()
        if reused:
            head, seconds = load_head(folder, read_meta(folder)), None
        else:
            head = train_head(
                self.features(task, "train"),
                labels["train"],
                get_task(task).num_classes,
                epochs=self.config.head_epochs,
                lr=self.config.head_lr,
                batch_size=256,
                seed=seed,
            )
            seconds = time.perf_counter() - start
        with torch.inference_mode():
            accuracies = {
                split: (
                    float((head(self.features(task, split)).argmax(-1) == labels[split]).float().mean()),
                    len(labels[split]),
                )
                for split in ("validation", "test")
            }
        if not reused:
            save_model(folder, self._meta("head", task, train_config, model_id), head)
        trainable = sum(p.numel() for p in head.parameters())
        self._record(model_id, "head", task, seed, train_config, folder, trainable, seconds, accuracies)
        return "reused" if reused else "trained"

    def run_probe(self, task: str) -> str:
        """The multi-layer linear probe of `task` (training/probe.py): "trained", or "skipped" (already stored).

        Scored on validation, on test, and on the test images each merge of the task is scored on (split
        'merge_test', with which images it got right: the findings' paired tests against merges)."""
        train_config = probe_config(self.config, task)
        model_id = config_hash(train_config)
        if self.store.has_model(model_id):
            return "skipped"
        start = time.perf_counter()
        splits = {split: self.split(task, split) for split in ("train", "validation", "test")}
        splits["merge_test"] = split_tensors(task, "test", self.preprocess, self.config.merge_eval)
        features = {
            split: extract_multilayer_features(self._frozen_backbone, images, device=self.accelerator.device)
            for split, (images, _) in splits.items()
        }
        labels = {split: split_labels.numpy() for split, (_, split_labels) in splits.items()}
        probe = train_probe(features["train"], labels["train"], features["validation"], labels["validation"])
        seconds = time.perf_counter() - start
        correct = {
            split: probe.correct(features[split], labels[split]) for split in ("validation", "test", "merge_test")
        }
        accuracies = {split: (float(right.mean()), len(right)) for split, right in correct.items()}
        trainable = int(probe.model[-1].coef_.size + probe.model[-1].intercept_.size)
        self._record(
            model_id, "probe", task, None, {**train_config, "chosen": probe.record()}, None, trainable, seconds,
            accuracies, correct={"merge_test": pack_correct(correct["merge_test"])},
        )  # fmt: skip
        return "trained"

    def run_adapter(self, task: str, seed: int) -> str:
        """LoRA adapter (+ its head) for (task, seed): "trained", "imported" (given), "reused" (its folder was
        already in --artifacts) or "skipped" (already stored)."""
        given = self.config.given_adapter(task, seed)
        if given is not None:  # the same on every process: none enters the broadcast below
            imported = self.store is not None and self.import_adapter(task, seed, Path(given[0]))
            return "imported" if imported else "skipped"
        train_config = self.config.adapter_training_config(task, seed)
        model_id = self.config.model_id("adapter", task, seed)
        folder = model_folder(self.config, "adapter", task, seed, model_id)
        state = [None]
        if self.store is not None:  # the main process decides for all
            state = [
                "skipped" if self.store.has_model(model_id) else "reused" if holds_model(folder, model_id) else None
            ]
        broadcast_object_list(state)  # the main process's answer, on every process (no-op alone)
        if state[0] == "skipped":
            return "skipped"
        if state[0] == "reused":  # trained into this --artifacts by another run: scored and recorded, not retrained
            if self.store is not None:
                loaded = load_model(folder, create_backbone(self.backbone_config))
                peft_model, head = loaded.model.backbone, loaded.model.heads[loaded.task]
                trainable = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
                self._store_adapter(task, seed, train_config, peft_model, head, trainable, None, write=False)
            self.accelerator.wait_for_everyone()
            return "reused"
        images, labels = self.split(task, "train")
        peft_model, head, seconds = train_adapter(
            create_backbone(self.backbone_config),
            images,
            labels,
            get_task(task).num_classes,
            rank=self.config.rank,
            alpha=self.config.alpha,
            target_modules=self.config.lora_targets,
            steps=self.config.steps,
            batch_size=self.config.batch_size,
            lr=self.config.lr,
            head_lr=self.config.head_lr,
            seed=seed,
            progress_label=f"adapter {task} seed {seed}",
            accelerator=self.accelerator,
            channels_last=self.config.channels_last,
        )
        if self.store is None:  # another rank: the main process evaluates and writes
            self.accelerator.wait_for_everyone()
            return "trained"
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        self._store_adapter(task, seed, train_config, peft_model, head, trainable, seconds)
        self.accelerator.wait_for_everyone()  # the other ranks waited here while this process wrote
        return "trained"

    def import_adapter(self, task: str, seed: int, source: Path) -> bool:
        """An adapter given instead of trained (run_all --adapters, study/given.py): scored and stored like a
        trained one, its folder copied into the study's artifacts; returns False when it was already stored."""
        model_id = self.config.model_id("adapter", task, seed)
        if self.store.has_model(model_id):
            return False
        loaded = load_model(source, create_backbone(self.backbone_config))
        peft_model, head = loaded.model.backbone, loaded.model.heads[loaded.task]
        train_config = {  # how it was trained, as its task.json says (rank, alpha, ...), then its identity here
            **loaded.meta.get("training", {}),
            **self.config.adapter_training_config(task, seed),
            "trained_on": loaded.task,
            "source": str(source),
        }
        trainable = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
        self._store_adapter(task, seed, train_config, peft_model, head, trainable, None)
        return True

    def _store_adapter(self, task, seed, train_config, peft_model, head, trainable, seconds, write=True) -> None:
        """Score an adapter on validation and test, write its folder (unless it is already there: `write`) and its
        rows (the main process)."""
        model_id = self.config.model_id("adapter", task, seed)
        # Scored through the evaluation path: the adapter merged into a copy of the backbone, prepared for speed.
        # On this process's device (a GPU under accelerate); the saved head stays the CPU copy.
        fast_backbone, _ = prepare_for_inference(copy.deepcopy(peft_model).merge_and_unload())
        model = MultiTaskModel(fast_backbone, {task: copy.deepcopy(head)}).to(self.accelerator.device)
        accuracies = {}
        for split in ("validation", "test"):
            split_images, split_labels = self.split(task, split)
            accuracies[split] = (accuracy(model, task, split_images, split_labels), len(split_labels))
        folder = model_folder(self.config, "adapter", task, seed, model_id)
        if write:
            save_model(folder, self._meta("adapter", task, train_config, model_id), head, peft_model)
        self._record(model_id, "adapter", task, seed, train_config, folder, trainable, seconds, accuracies)

    def run(self) -> dict:
        """Every head baseline, then every adapter (given ones imported), then each task's multi-layer probe;
        returns counts of trained, imported and skipped units."""
        counts = {"trained": 0, "imported": 0, "reused": 0, "skipped": 0}
        units = [
            (kind, task, seed)
            for kind in ("head", "adapter")
            for task in self.config.tasks
            for seed in self.config.seeds
            if kind == "adapter" or self.store is not None
        ]  # heads: the main process only
        for kind, task, seed in tqdm(units, desc="training", unit="model", disable=self.store is None):
            counts[(self.run_head if kind == "head" else self.run_adapter)(task, seed)] += 1
        # The probes: the main process only, and not in a study of given adapters (their base may be a transformers
        # model, which has no stages to pool; such a study is compared with its heads alone, and its report says so).
        if self.store is not None and self.config.given_adapters == ():
            for task in tqdm(self.config.tasks, desc="multi-layer probes", unit="probe", leave=False):
                counts[self.run_probe(task)] += 1
        counts["imported_note"] = f", {counts['imported']} given adapters imported" if counts["imported"] else ""
        if counts["reused"]:  # another run's models in the same --artifacts: scored and recorded, never rewritten
            counts["imported_note"] += f", {counts['reused']} found in the artifacts folder and reused"
        return counts
