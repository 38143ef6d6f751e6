"""The demo's model logic, without any UI: adapters loaded once, merged models cached, predictions.

`DemoService(db_path)` reads the adapters of one seed (the smallest stored) from the study's
DuckDB file, builds merged multi-task models on demand (cached per (tasks, method)) and answers
`predict(image, tasks, method)` with the top-3 labels per task from ONE forward pass of the merged
model. Images are decoded and checked by `load_image` (the one place that deals with bad files)
and then preprocessed with the adapters' own `Preprocess` (the same code as training/evaluation).

Concurrent visitors: decoding and preprocessing run in each caller's thread, in parallel and
without a lock; the forward passes run on one worker thread (`Batcher`, demo/batcher.py), which gathers the
requests that arrive together and answers all that share a model with ONE forward pass.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from demo.batcher import Batcher
from demo.uploads import load_image, public_text
from merging.deltas import AdapterDeltas
from merging.export import merge_record
from merging.grams import GRAM_IMAGES, GramStore
from merging.methods import get_method, list_methods
from merging.sources import AdapterSource, OwnAdapters
from mlvision.data import split_tensors
from mlvision.errors import BadImage, MergeConfigError, MLVisionError
from mlvision.store import Store
from mlvision.tasks import get_task, load_task

FALLBACK_METHOD = "ties"
OWN_ADAPTER = "own adapter"  # what the answer names as its "method" when one task is chosen: no merge
TOP_K = 3
MERGE_CACHE_SIZE = 6  # merged models kept (each one is a backbone copy, ~14 MB)
# Out-of-domain signal: an upload whose top probability for a task falls below this percentile of the
# served model's top probabilities on that task's validation images does not look like that task's data.
OOD_PERCENTILE = 5
OOD_MAX_IMAGES = 100  # validation images per task used to calibrate the threshold (once per served model)
NATIVE_SAMPLE = 16  # training images per task whose sizes give its native size (see `DemoService.native_size`)
NO_DATA = "adapters trained elsewhere: no validation images here"  # why they get no out-of-domain check
EXPORT_RANK = 32  # default rank of the downloaded merge (the same default as merging/merge.py's --rank)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
@dataclass
class MergedEntry:
    model: torch.nn.Module  # answers {task: logits} for a batch of images
    method: str
    hyperparams: dict
    build_seconds: float
    thresholds: dict[str, dict] = field(default_factory=dict)  # task -> calibration (see `DemoService.calibrate`)


@dataclass
class Prediction:
    """JSON-serialisable answer of one request (see `as_dict`)."""

    tasks: list[str]
    method: str
    method_source: str
    hyperparams: dict
    predictions: dict[str, list[tuple[str, float]]]
    elapsed_ms: float
    build_seconds: float | None
    stored_accuracy: dict[str, dict]
    notes: list[str] = field(default_factory=list)
    compare: dict[str, dict] | None = None
    in_domain: dict[str, dict] = field(default_factory=dict)

    def as_dict(self, device: str) -> dict:
        return {
            "ok": True,
            "device": device,
            "tasks": self.tasks,
            "method": self.method,
            "method_source": self.method_source,
            "hyperparams": self.hyperparams,
            "predictions": {t: [[label, prob] for label, prob in top] for t, top in self.predictions.items()},
            "elapsed_ms": self.elapsed_ms,
            "merge_build_seconds": self.build_seconds,
            "stored_accuracy": self.stored_accuracy,
            "notes": self.notes,
            "compare": self.compare,
            "in_domain": self.in_domain,
        }


def served_methods() -> list[str]:
    """The methods a demo can serve, in registry order (`MergeMethod.servable`: peft's references are for comparison
    in the study only). Whether one is offered for a group follows from its other fields (`DemoService.unavailable`):
    its statistics (RegMean's Gram matrices) must be at hand, a test-time merge's learned output stored."""
    return [name for name in list_methods() if get_method(name).servable]


def _jsonable(value):
    return json.loads(json.dumps(value, default=float))


def native_size_text(sizes: list[tuple[int, int]]) -> str:
    """The phrase for sampled (width, height) sizes: "native WxH px" when all are the same, else "native size
    varies (WxH to WxH px)" (smallest to largest area), or "native size unknown" for no sample."""
    if not sizes:
        return "native size unknown"
    if len(set(sizes)) == 1:
        return f"native {sizes[0][0]}x{sizes[0][1]} px"
    small, large = min(sizes, key=lambda s: (s[0] * s[1], s)), max(sizes, key=lambda s: (s[0] * s[1], s))
    return f"native size varies ({small[0]}x{small[1]} to {large[0]}x{large[1]} px)"


def _safe_name(text: str) -> str:
    """A task or method name as part of a file name (hub tasks hold ':' and '/')."""
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)


class DemoService:
    """The adapters of one source (merging/sources.py: a study's adapters of one seed, or peft LoRAs trained
    elsewhere), loaded once; merged models cached by (tasks, method)."""

    def __init__(self, source: AdapterSource | str | Path, device: str | None = None):
        """`source`: the adapters to serve, or a results database path (the study's adapters of its smallest seed,
        `OwnAdapters.from_db`)."""
        self.source = source if isinstance(source, AdapterSource) else OwnAdapters.from_db(source)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.db_path, self.seed = self.source.db_path, self.source.seed
        self.adapters: dict[str, AdapterDeltas] = self.source.adapters
        self.tasks = sorted(self.adapters)
        self.preprocess = self.source.preprocess
        self.labels = {t: list(a.meta["label_names"]) for t, a in self.adapters.items()}
        self.methods = served_methods()
        # whose resizing and normalisation the page says an upload gets
        self.preprocessing = (
            "the study's preprocessing" if self.source.trained_here else "the base model's size and normalisation"
        )
        self._merged: OrderedDict[tuple, MergedEntry] = OrderedDict()
        self._single: dict[str, torch.nn.Module] = {}
        self._single_thresholds: dict[str, dict[str, dict]] = {}
        self._native: dict[str, str] = {}  # task -> its native size (see `native_size`)
        self._calibrate_lock = threading.Lock()
        self._lock = threading.RLock()  # guards the model caches (not the passes: those run on the batcher)
        self._building: dict[tuple, threading.Lock] = {}  # one lock per merge being built
        self._batcher = Batcher(self._forward)
        self._read_store()
        # RegMean's statistics: for this project's adapters the sweep's own Gram matrices (same cache, same images),
        # so a served RegMean merge with the stored α is the merge the study scored
        grams = self.source.grams
        self._no_statistics = self._prepare_grams(grams) if grams is not None else self.source.missing_statistics()

    def _merge(self, group: tuple[str, ...], method: str) -> tuple[dict[str, torch.Tensor], dict]:
        """(merged ΔW, hyperparameters): the study's stored hyperparameters when it stored this merge."""
        return self.source.merge(group, method, self.stored_hyperparams(group, method))

    def _build(self, deltas: dict[str, torch.Tensor], group: tuple[str, ...]) -> torch.nn.Module:
        """A model answering the group's tasks: the backbone with `deltas`, one head per task."""
        return self.source.build(deltas, group).to(self.device)

    def _prepare_grams(self, grams: GramStore) -> dict[str, str]:
        """Every adapter's Gram matrices, loaded from the data cache or computed now (once, with a line saying so)
        from its task's training images; returns {task: why not} for tasks whose matrices cannot be had here.

        Computed at start-up, before any request: the computation folds each adapter into the shared backbone,
        which serving must not see half-way."""
        missing = [a for a in self.adapters.values() if not grams.path(a).is_file()]
        if missing:
            print(
                f"[demo] computing the Gram matrices RegMean needs for {len(missing)} adapter(s) "
                f"({GRAM_IMAGES} training images each; kept in the data cache) ...",
                flush=True,
            )
        reasons, start = {}, time.perf_counter()
        for task, adapter in self.adapters.items():
            try:
                grams.get(adapter)
            except Exception as error:  # noqa: BLE001 - its training images are not here: RegMean is not offered
                reasons[task] = f"task {task}'s training images cannot be loaded here ({public_text(error, 120)})"
        if missing:
            print(f"[demo] Gram matrices ready in {time.perf_counter() - start:.1f} s", flush=True)
        return reasons

    def origin_line(self) -> str:
        """Where the served adapters come from, for the page's header."""
        return self.source.origin_line()

    def results_line(self) -> str:
        """Where the stored accuracies come from, for the page's header."""
        if self.db_path is None:
            return "No stored results for these adapters: their accuracies were not measured here."
        return f"Results database: `{self.db_path.name}`."

    def example_image(self, task: str) -> Image.Image | None:
        """The first test image of the task (the page's example thumbnail), None when its data is not here."""
        if not self.source.trained_here:
            return None
        return load_task(task)["test"][0]["image"]

    # -- what the store says ------------------------------------------------------------------------
    def _group(self, tasks) -> tuple[str, ...]:
        if not tasks:
            raise BadImage("Choose at least one task to merge.")
        unknown = [t for t in tasks if t not in self.adapters]
        if unknown:
            raise BadImage(f"Unknown task(s) {', '.join(map(str, unknown))}; available: {', '.join(self.tasks)}.")
        return tuple(sorted(set(tasks)))

    def _read_store(self) -> None:
        """Snapshot the stored merge results once: serving never touches the database again
        (so a study still writing to it cannot lock the demo out). Adapters trained elsewhere: nothing stored."""
        self._results, self._hyperparams, self._validation, self._study_choice = [], {}, {}, {}
        self._plans: dict[tuple[str, float], dict] = {}
        if self.db_path is None:
            return
        store = Store(self.db_path)
        self._results = store.query(
            "SELECT tasks, method, seed, task, merged_accuracy, single_accuracy, head_accuracy, normalized_accuracy, n "
            "FROM merge_results ORDER BY tasks, method, seed, task"
        )
        # self._validation: (tasks, method) -> chosen validation accuracies
        for tasks, method, seed, hyperparams, selection in store.query(
            "SELECT tasks, method, seed, hyperparams, selection FROM merges ORDER BY created_at"
        ):
            if hyperparams is not None:
                self._hyperparams[(tasks, method, seed)] = (
                    json.loads(hyperparams) if isinstance(hyperparams, str) else dict(hyperparams)
                )
            selection = json.loads(selection) if isinstance(selection, str) else selection
            score = selection.get("chosen_validation_accuracy") if isinstance(selection, dict) else None
            if isinstance(score, (int, float)):
                self._validation.setdefault((tasks, method), []).append(float(score))
        # the merge planner's stored plans (run_all's plan stage): (method, target) -> groups, and their retention
        self._plans = self._read_plans(store)
        # the study's method per group size, chosen on validation by study/findings.py (k -> (method, mean, merges))
        for statistic, value, n in store.query(
            "SELECT statistic, value, n FROM findings WHERE finding = 'chosen_method' AND value IS NOT NULL"
        ):
            method, _, k = str(statistic).partition("/k=")
            if k.isdigit() and method in self.methods:
                self._study_choice[int(k)] = (method, float(value), int(n or 0))

    @staticmethod
    def _read_plans(store: Store) -> dict[tuple[str, float], dict]:
        """{(method, target): {"groups": ((task, ...), ...), "predicted": {task: r}, "measured": {task: r}}} from
        view `merge_plans` (none in a file from before the planner)."""
        views = {row[0] for row in store.query("SELECT table_name FROM information_schema.tables")}
        if "merge_plans" not in views:
            return {}
        plans: dict[tuple[str, float], dict] = {}
        for method, target, index, group, task, predicted, measured in store.query(
            "SELECT method, target, group_index, group_tasks, task, predicted, measured FROM merge_plans "
            "WHERE kind = 'target' ORDER BY method, target, group_index, task"
        ):
            plan = plans.setdefault((method, float(target)), {"groups": {}, "predicted": {}, "measured": {}})
            plan["groups"][index] = tuple(group.split(","))
            plan["predicted"][task], plan["measured"][task] = predicted, measured
        for plan in plans.values():
            plan["groups"] = tuple(plan["groups"][i] for i in sorted(plan["groups"]))
        return plans

    def plan_targets(self) -> list[float]:
        """The retention targets the study stored plans for (none: the planner's stage has not run)."""
        return sorted({target for _, target in self._plans})

    def stored_plan(self, target: float, method: str | None = None) -> tuple[str, dict]:
        """(method, plan) served for `target`: the plan of `method`, or for "auto" the plan of the method `auto`
        serves for every task when it has one, else the servable method whose plan needs the fewest backbones
        (ties: the highest predicted worst-task retention)."""
        at_target = {m: plan for (m, t), plan in self._plans.items() if abs(t - target) < 1e-9}
        if not at_target:
            known = ", ".join(f"{t:.0%}" for t in self.plan_targets()) or "none"
            raise BadImage(
                f"No stored merge plan keeps {target:.0%} (stored: {known}); `python training/run_all.py --stages "
                "plan` stores them."
            )
        if method not in (None, "", "auto"):
            if method not in at_target:
                raise BadImage(f"No stored plan of {method} at {target:.0%}; planned: {', '.join(sorted(at_target))}.")
            why_not = self.unavailable(self.tasks, method)
            if why_not:
                raise BadImage(f"{method}'s plan cannot be served here: it {why_not}. Choose auto or another method.")
            return method, at_target[method]
        servable = {m: plan for m, plan in at_target.items() if self.unavailable(self.tasks, m) is None}
        if not servable:
            raise BadImage(f"No stored plan at {target:.0%} uses a method that can be served here.")
        preferred, _ = self.default_method(self.tasks)
        if preferred in servable:
            return preferred, servable[preferred]
        best = min(servable, key=lambda m: (len(servable[m]["groups"]), -min(servable[m]["predicted"].values()), m))
        return best, servable[best]

    def predict_plan(self, image, target: float, method: str | None = None) -> dict:
        """Every task answered by its planned backbone: each group of the stored plan at `target` merged (its own
        adapter for a task alone), one forward pass per backbone. `elapsed_ms` is the passes' sum (one device runs
        them in turn); each entry of `groups` holds its backbone's tasks and pass time. The measured retention is
        the plan's (mean over the study's seeds); the served adapters are one seed's."""
        rgb, notes = load_image(image)
        method, plan = self.stored_plan(target, method)
        images = self.preprocess([rgb])
        passes = []
        for group in plan["groups"]:
            model = self.single_model(group[0]) if len(group) == 1 else self.merged_model(group, method)[0].model
            passes.append((group, self._batcher.submit(model, images)))
        predictions, backbones = {}, []
        for group, future in passes:
            logits, elapsed = future.result()
            predictions.update({task: [[label, p] for label, p in self._top(task, logits[task])] for task in group})
            backbones.append({"tasks": list(group), "elapsed_ms": elapsed})
        return {
            "ok": True,
            "device": self.device.type,
            "method": method,
            "target": target,
            "backbones": len(plan["groups"]),
            "groups": backbones,
            "predictions": predictions,
            "elapsed_ms": sum(b["elapsed_ms"] for b in backbones),
            "predicted_retention": plan["predicted"],
            "measured_retention": plan["measured"],
            "notes": notes,
        }

    def predict_plan_json(self, image, target: float, method: str | None = None) -> dict:
        """`predict_plan`, bad input and model errors as {"ok": False, "error": ...}."""
        return self._json(lambda: self.predict_plan(image, target, method))

    def default_method(self, tasks) -> tuple[str, str]:
        """(method, why) that `auto` serves for this group: the method the study chose on validation for groups of
        this size (the findings' `chosen_method`: highest mean validation accuracy over the k's merges; test
        accuracy never used), when it can be served here; else the best such mean among the methods that can be,
        over the stored merges of this size; else FALLBACK_METHOD."""
        group = self._group(tasks)
        k = len(group)
        choice = self._study_choice.get(k)
        if choice and self.unavailable(group, choice[0]) is None:
            method, value, n = choice
            return (
                method,
                f"the study's choice for {k} tasks: best mean validation accuracy ({value:.3f} over {n} merges)",
            )
        scores: dict[str, list[float]] = {}
        for (key, method), values in self._validation.items():
            if key.count(",") + 1 == k and self.unavailable(group, method) is None and not self._learns_on_test(method):
                scores.setdefault(method, []).extend(values)
        refused = f"{choice[0]} (the study's choice) {self.unavailable(group, choice[0])}; " if choice else ""
        if scores:
            best = min(scores, key=lambda m: (-sum(scores[m]) / len(scores[m]), m))
            mean = sum(scores[best]) / len(scores[best])
            return best, (
                f"{refused}best mean validation accuracy of the servable methods over the stored merges of {k} tasks "
                f"({mean:.3f} over {len(scores[best])} merges)"
            )
        return FALLBACK_METHOD, f"{refused}no stored merges of {k} tasks: default {FALLBACK_METHOD}"

    @staticmethod
    def _learns_on_test(method: str) -> bool:
        """A test-time method learned on the images it was scored on: never chosen (as in the study's rule)."""
        return get_method(method).transductive

    def unavailable(self, tasks, method: str) -> str | None:
        """Why `method` cannot be served for this group here (a phrase), or None when it can."""
        group = self._group(tasks)
        merge_method = get_method(method)
        if merge_method.statistics:
            missing = [self._no_statistics[task] for task in group if task in self._no_statistics]
            return f"needs each task's training images, and {missing[0]}" if missing else None
        rebuilt_from = merge_method.rebuilt_from
        if rebuilt_from is not None:
            stored = self.stored_hyperparams(group, method) or {}
            if rebuilt_from not in stored:
                return (
                    f"learns its {rebuilt_from} on the group's test images, and this group's learned {rebuilt_from} "
                    "are not stored (the study stores them from this version on)"
                )
            return None
        if not merge_method.servable:
            return "is a reference kept for comparison in the study only"
        return None

    def offered(self, tasks) -> list[str]:
        """The methods that can be served for this group, in registry order."""
        return [method for method in self.methods if self.unavailable(tasks, method) is None]

    def not_offered(self, tasks) -> dict[str, str]:
        """{method: why} for the registered methods that cannot be served for this group."""
        reasons = {name: self.unavailable(tasks, name) for name in list_methods()}
        return {name: why for name, why in reasons.items() if why is not None}

    def stored_hyperparams(self, tasks, method: str) -> dict | None:
        return self._hyperparams.get((",".join(self._group(tasks)), method, self.seed))

    def stored_accuracy(self, tasks, method: str) -> dict[str, dict]:
        """Per task: the stored test accuracy of this merge (this seed), its single adapter and its head."""
        key = ",".join(self._group(tasks))
        return {
            task: {"merged": m, "single": s, "head": h, "normalized": r, "n": n}
            for tasks_, method_, seed, task, m, s, h, r, n in self._results
            if tasks_ == key and method_ == method and seed == self.seed
        }

    # -- models -------------------------------------------------------------------------------------
    def resolve_method(self, tasks, method: str | None) -> tuple[str, str]:
        if method in (None, "", "auto"):
            return self.default_method(tasks)
        if method not in self.methods:
            raise BadImage(f"Unknown merge method {method!r}; choose one of: auto, {', '.join(self.methods)}.")
        why_not = self.unavailable(tasks, method)
        if why_not:
            raise BadImage(f"{method} is not offered for these tasks: it {why_not}. Choose auto or another method.")
        return method, "chosen"

    def merged_model(self, tasks, method: str) -> tuple[MergedEntry, bool]:
        """(cached merged model, whether it was built now). Stored hyperparameters are reused when the
        sweep stored this exact merge (so the stored accuracy describes the served model).

        A build takes from a fraction of a second to a few seconds, so it does not hold the cache lock:
        requests for merges already cached go on meanwhile; requests for the same merge wait for this
        build (one lock per key) instead of building it again."""
        group = self._group(tasks)
        key = (group, method)
        with self._lock:
            if key in self._merged:
                self._merged.move_to_end(key)
                return self._merged[key], False
            build_lock = self._building.setdefault(key, threading.Lock())
        with build_lock:
            with self._lock:
                if key in self._merged:  # built by the request this one waited for
                    self._merged.move_to_end(key)
                    return self._merged[key], False
            start = time.perf_counter()
            merged, hyperparams = self._merge(group, method)
            model = self._build(merged, group)
            entry = MergedEntry(model, method, _jsonable(hyperparams), time.perf_counter() - start)
            entry.thresholds = self.calibrate(model, group)  # once per served merge, cached with it
            with self._lock:
                self._merged[key] = entry
                self._building.pop(key, None)
                while len(self._merged) > MERGE_CACHE_SIZE:
                    self._merged.popitem(last=False)
            return entry, True

    def single_model(self, task: str) -> torch.nn.Module:
        """The task's own adapter (its ΔW folded into a copy of the backbone, as the sweep scores it) + its head."""
        with self._lock:
            if task not in self._single:
                self._single[task] = self._build(self.adapters[task].deltas, (task,))
            return self._single[task]

    def single_thresholds(self, task: str) -> dict[str, dict]:
        """The out-of-domain calibration of the task's own adapter (computed once, then cached)."""
        if task not in self._single_thresholds:
            model = self.single_model(task)
            with self._calibrate_lock:
                if task not in self._single_thresholds:
                    self._single_thresholds[task] = self.calibrate(model, (task,))
        return self._single_thresholds[task]

    def calibrate(self, model: torch.nn.Module, tasks) -> dict[str, dict]:
        """Per task: the OOD_PERCENTILE-th percentile of `model`'s top softmax probability on up to
        OOD_MAX_IMAGES of the task's validation images (its own head only). A task whose validation images
        cannot be loaded gets threshold None (no out-of-domain check for it)."""
        if not self.source.trained_here:
            return {task: {"threshold": None, "n_validation": 0, "why": NO_DATA} for task in tasks}
        out = {}
        for task in tasks:
            try:
                images, _ = split_tensors(task, "validation", self.preprocess, OOD_MAX_IMAGES)
            except Exception as error:  # noqa: BLE001 - the check is optional; predictions still work
                out[task] = {"threshold": None, "n_validation": 0, "why": f"no validation images ({error})"}
                continue
            logits, _ = self._batcher.run(model, images)
            top = torch.softmax(logits[task].float(), dim=-1).max(dim=-1).values
            threshold = float(torch.quantile(top, OOD_PERCENTILE / 100.0))
            out[task] = {"threshold": threshold, "n_validation": int(len(top))}
        return out

    @staticmethod
    def domain_check(task: str, confidence: float, calibration: dict | None) -> dict:
        """{"in_domain", "confidence", "threshold", "percentile", "n_validation", "message"} for one task."""
        threshold = (calibration or {}).get("threshold")
        check = {
            "in_domain": None if threshold is None else bool(confidence >= threshold),
            "confidence": confidence,
            "threshold": threshold,
            "percentile": OOD_PERCENTILE,
            "n_validation": (calibration or {}).get("n_validation", 0),
            "message": None,
        }
        if threshold is None:
            check["message"] = "no out-of-domain check for this task (no validation images)"
        elif not check["in_domain"]:
            check["message"] = (
                f"this image does not look like {task} data (confidence {confidence:.2f} < threshold "
                f"{threshold:.2f}, the {OOD_PERCENTILE}th percentile on its validation images)"
            )
        return check

    # -- what the page shows ------------------------------------------------------------------------
    def native_size(self, task: str) -> str:
        """The task's native image size ("native 8x8 px", "native size varies (...)" or "... unknown" when its
        data cannot be loaded here), measured once on up to NATIVE_SAMPLE of its stored training images spread
        over the split.

        Measured, not recorded: the Task record has no size field, and each task keeps its source's size
        (8x8 scikit-learn digits, 28x28 MNIST, larger photos), which is what a visitor's upload competes with."""
        if not self.source.trained_here:
            return "native size unknown (adapter trained elsewhere)"
        if task not in self._native:
            try:
                split = load_task(task)["train"]
                picks = sorted({round(i * (len(split) - 1) / max(1, NATIVE_SAMPLE - 1)) for i in range(NATIVE_SAMPLE)})
                self._native[task] = native_size_text([image.size for image in split.select(picks)["image"]])
            except Exception:  # noqa: BLE001 - a hub task whose dataset cannot be reached now: no native size
                self._native[task] = native_size_text([])
        return self._native[task]

    def task_info(self, task: str) -> dict:
        """What a task classifies, the size the model sees, the task's native size and the data's source."""
        info = {"task": task, "classes": len(self.labels[task]), "input_size": self.preprocess.image_size}
        if not self.source.trained_here:  # an adapter trained elsewhere: its name and base, nothing it cannot know
            adapter = self.adapters[task]
            origin = f"hub:{adapter.meta['hub_id']}" if adapter.meta.get("hub_id") else adapter.path.name
            return {**info, "description": "", "source": f"adapter {origin} on {self.source.base}", "domain": "",
                    "native_size": self.native_size(task)}  # fmt: skip
        try:
            record = get_task(task)
            info.update(description=record.description, source=record.source, domain=record.domain)
        except Exception:  # noqa: BLE001 - a hub task whose dataset cannot be reached now: the basics only
            info.update(description="", source="unknown", domain="")
        info["native_size"] = self.native_size(task)
        return info

    def describe_task(self, task: str) -> str:
        """One line: what it classifies, its native image size and the size the model sees, source."""
        info = self.task_info(task)
        size = info["input_size"]
        what = f"{info['description']}; " if info["description"] else ""
        return (
            f"**{task}**: {what}{info['classes']} classes; {info['native_size']}, resized to {size}x{size} px "
            f"({self.preprocessing}); source: {info['source']}"
        )

    def model_view(self, image: Image.Image) -> Image.Image:
        """The image as the model sees it: resized to the study's input size (the normalisation undone)."""
        tensor = self.preprocess([image])[0]
        mean = torch.tensor(self.preprocess.mean).view(3, 1, 1)
        std = torch.tensor(self.preprocess.std).view(3, 1, 1)
        pixels = ((tensor * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(pixels, "RGB")

    # -- prediction ---------------------------------------------------------------------------------
    def tensor(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess([image]).to(self.device)

    @torch.inference_mode()
    def _forward(self, model: torch.nn.Module, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        """One timed forward pass (called on the batcher's thread); logits come back on the CPU."""
        batch = batch.to(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) * 1000.0
        return {task: value.float().cpu() for task, value in logits.items()}, elapsed

    def _top(self, task: str, logits: torch.Tensor) -> list[tuple[str, float]]:
        probs = torch.softmax(logits.float(), dim=-1)[0].cpu()
        values, indices = probs.topk(min(TOP_K, probs.numel()))
        return [(self.labels[task][i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]

    def probabilities(self, image: Image.Image, tasks, method: str) -> dict[str, torch.Tensor]:
        """Full softmax vectors per task from the merged model (for tests and inspection)."""
        entry, _ = self.merged_model(tasks, method)
        logits, _ = self._batcher.run(entry.model, self.preprocess([image]))
        return {t: torch.softmax(v.float(), dim=-1)[0] for t, v in logits.items()}

    def predict(self, image, tasks=None, method: str | None = None, compare: bool = False) -> Prediction:
        """Top-3 per task from one forward pass of the merged model; `image` is anything `load_image` takes.

        Decoding and preprocessing happen here, in the caller's thread; the pass itself is shared with
        the other requests waiting at the same time (`Batcher`), so `elapsed_ms` is the time of the pass
        that answered this image (with any others in its batch).
        """
        rgb, notes = load_image(image)
        group = self._group(tasks if tasks else self.tasks)
        if len(group) == 1:  # nothing to merge: the task's own adapter, exactly as the sweep scores it
            return self._predict_own_adapter(rgb, group[0], method, compare, notes)
        method, why = self.resolve_method(group, method)
        entry, built = self.merged_model(group, method)
        images = self.preprocess([rgb])
        merged = self._batcher.submit(entry.model, images)
        singles = {task: self._batcher.submit(self.single_model(task), images) for task in group} if compare else {}
        logits, elapsed = merged.result()
        predictions = {t: self._top(t, logits[t]) for t in group}
        stored = _jsonable(self.stored_accuracy(group, method))
        side = None
        if compare:
            side = {}
            for task, future in singles.items():
                single_logits, single_ms = future.result()
                top = self._top(task, single_logits[task])
                row = stored.get(task) or {}
                below = row.get("merged") is not None and row.get("head") is not None and row["merged"] < row["head"]
                side[task] = {
                    "top": [[label, p] for label, p in top],
                    "elapsed_ms": single_ms,
                    "agrees": top[0][0] == predictions[task][0][0],  # the merged answer's top-1 = the adapter's
                    "merged_below_head": below,  # stored test accuracy: the merge loses to the head alone
                    # the own adapter's out-of-domain flag, calibrated on its own (not the merge's) validation answers
                    "in_domain": self.domain_check(task, top[0][1], self.single_thresholds(task).get(task)),
                }
        return Prediction(
            tasks=list(group),
            method=method,
            method_source=why,
            hyperparams=entry.hyperparams,
            predictions=predictions,
            elapsed_ms=elapsed,
            build_seconds=entry.build_seconds if built else None,
            stored_accuracy=stored,
            notes=notes,
            compare=side,
            in_domain={t: self.domain_check(t, predictions[t][0][1], entry.thresholds.get(t)) for t in group},
        )

    def _predict_own_adapter(self, rgb, task: str, method: str | None, compare: bool, notes) -> Prediction:
        """One task chosen: its own adapter and head, no merge (a "merge" of one adapter with TIES at density
        0.2 would serve a trimmed copy of it). The stored accuracy is the adapter's and the head's on the
        sweep's test images."""
        if method not in (None, "", "auto", OWN_ADAPTER):
            self.resolve_method((task,), method)  # an unknown name is still refused in one line
        logits, elapsed = self._batcher.run(self.single_model(task), self.preprocess([rgb]))
        top = self._top(task, logits[task])
        stored = next(
            ({"merged": single, "single": single, "head": head, "normalized": 1.0, "n": n}
             for tasks_, _, seed, task_, _, single, head, _, n in self._results if task_ == task and seed == self.seed),
            None,
        )  # fmt: skip
        ignored = f" ({method} not applied)" if method not in (None, "", "auto", OWN_ADAPTER) else ""
        below = bool(stored) and None not in (stored["merged"], stored["head"]) and stored["merged"] < stored["head"]
        check = self.domain_check(task, top[0][1], self.single_thresholds(task).get(task))
        side = {
            "top": [[label, p] for label, p in top],
            "elapsed_ms": elapsed,
            "agrees": True,
            "merged_below_head": below,
            "in_domain": check,
        }
        return Prediction(
            tasks=[task],
            method=OWN_ADAPTER,
            method_source=f"one task chosen: its own adapter, no merge{ignored}",
            hyperparams={},
            predictions={task: top},
            elapsed_ms=elapsed,
            build_seconds=None,
            stored_accuracy=_jsonable({task: stored} if stored else {}),
            notes=notes,
            compare={task: side} if compare else None,
            in_domain={task: check},
        )

    # -- the merged model as a download -------------------------------------------------------------
    def max_export_rank(self) -> int:
        """The largest useful export rank: max over the adapted layers of min(out, in) (`check_export_rank`)."""
        return max(min(delta.shape) for delta in self.adapters[self.tasks[0]].deltas.values())

    def export_zip(self, tasks, method: str | None, rank: int, folder: str | Path) -> tuple[Path, float]:
        """The served model of (tasks, method) as the folder merging/merge.py writes, zipped: (the zip, the
        export's relative reconstruction error ||ΔW - B A|| / ||ΔW||).

        The folder is written by the merge CLI's own writer (`export_own_lora`: a peft LoRA of `rank` per
        layer by truncated SVD of the merged ΔW, `heads/<task>/`, `merge.json`), from the same merge the page
        serves: the method `auto` resolves to and the stored hyperparameters (so a merge's exported rank-32
        LoRA is exact wherever the merged ΔW has rank <= 32, e.g. a linear merge of k rank-r adapters with
        k r <= 32). One task chosen exports its own adapter, as it is served. Only the methods the page offers for
        the group are accepted (RegMean with the Gram matrices computed at start-up). The zip holds one top-level
        folder named after the merge, and lands in a new temporary folder under `folder`.
        """
        group = self._group(tasks if tasks else self.tasks)
        try:
            rank = int(rank)
        except (TypeError, ValueError):
            raise MergeConfigError(
                f"Export rank {rank!r} is not a whole number: choose 1 to {self.max_export_rank()}."
            ) from None
        if not 1 <= rank <= self.max_export_rank():
            raise MergeConfigError(
                f"Export rank {rank} is outside 1 to {self.max_export_rank()} (the largest useful rank of these "
                "layers): choose a rank in that range."
            )
        start = time.perf_counter()
        if len(group) == 1:
            method, merged, params = OWN_ADAPTER, self.adapters[group[0]].deltas, {}
        else:
            method, _ = self.resolve_method(group, method)
            merged, params = self._merge(group, method)
        seconds = time.perf_counter() - start
        adapters = [self.adapters[t] for t in group]
        name = _safe_name(f"merged_{method.replace(' ', '_')}_{'+'.join(group)}_rank{rank}")
        work = Path(tempfile.mkdtemp(prefix="mlv_export_", dir=folder))
        info = merge_record(method, _jsonable(params), adapters, seconds)
        try:
            relative_error, _, _ = self.source.export(merged, adapters, rank, work / name, info)
            archive = shutil.make_archive(str(work / name), "zip", root_dir=work, base_dir=name)
        except OSError as error:
            shutil.rmtree(work, ignore_errors=True)
            raise MergeConfigError(f"Cannot write the merged model ({error.strerror or error}): try again.") from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        shutil.rmtree(work / name)  # the zip holds it
        return Path(archive), relative_error

    def predict_json(self, image, tasks=None, method: str | None = None, compare: bool = False) -> dict:
        """`predict` as a JSON-ready dict; bad input and model errors become {"ok": False, "error": ...}."""
        return self._json(lambda: self.predict(image, tasks, method, compare).as_dict(self.device.type))

    def _json(self, answer) -> dict:
        """`answer()`, or {"ok": False, "error": ...} for bad input and model errors (never a traceback)."""
        try:
            return answer()
        except (BadImage, MLVisionError) as error:
            return {"ok": False, "error": str(error), "device": self.device.type}


__all__ = ["DemoService", "Prediction"]
