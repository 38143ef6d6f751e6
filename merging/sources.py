"""Where a merge's adapters come from: one interface, `AdapterSource`, over this project's adapters and peft LoRAs
trained elsewhere (FusionBench's model pools are the model).

Why one interface: a merge, a served model and an export need the same things of a set of adapters, whatever
trained them, and each used to be written twice (the demo had a second service class for adapters from elsewhere, the
merge CLI a second flow). What a source provides:
- read: `adapters`, one `AdapterDeltas` per task (exact ΔW per layer, the task head, the label names); the merge CLI
  reads them with `read(folders, options)` from the first class of `SOURCES` that `claims` the folders;
- preprocess: `preprocess`, how an image is fed to the backbone (its input size and normalisation);
- data: `split(split, n_for)`, each task's images and labels where the source has them (this project's tasks; the
  `--data` datasets of adapters from elsewhere), and `score(merged, data)`, the merged ΔW scored on them;
- merge: `check_method` (what the source cannot merge, refused before any work), `merge(group, method,
  hyperparams)`, the merged ΔW (with the statistics the source has: `grams`), `selects_on_validation` (whether the
  merge CLI searches the method's grid on validation);
- build: `build(merged, group)`, the merged multi-task model answering {task: logits} for a batch;
- export: `export(merged, adapters, rank, folder, info, ...)`, the folder merging/merge.py writes (the rank settled
  on validation where the source has validation images, a rank-r peft LoRA, one head per task, merge.json and the
  model card; `write` is the part each source writes its own way);
- stored figures or none: `stored_figures`/`stored_merge_figures` (the results database `db_path` that stored its
  adapters' accuracies and merges; none for adapters trained elsewhere), `trained_here` (whether its tasks' images
  load here), and what `--evaluate` measures (`scores_single_adapters`, `measured_now`).

Expensive parts (a backbone, a base model, Gram matrices) load on first use, so reading adapters stays cheap.

Two implementations: `OwnAdapters` (this project's adapters: a timm backbone with ΔW folded in, merging/grams.py's
Gram matrices, `write_own_export`) and `PeftAdapters` (peft LoRAs of a timm or a transformers model, read by
merging/foreign.py; what differs between the two libraries is the `BaseLibrary` object it holds, merging/bases.py).
"""

from __future__ import annotations

import copy
import json
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from merging.bases import LIBRARIES, BaseLibrary
from merging.card import Figure
from merging.deltas import AdapterDeltas, check_compatible, load_deltas
from merging.export import (
    RANK_VALIDATION_IMAGES,
    check_output_folder,
    own_score,
    own_split,
    settle_and_measure,
    write_own_export,
)
from merging.foreign import (
    ForeignGrams,
    base_model_name,
    build_merged_classifier,
    dataset_label_names,
    evaluation_data,
    expand_sources,
    export_merge,
    fill_missing_layers,
    is_foreign,
    load_foreign,
    resolve_adapter,
)
from merging.grams import GRAM_IMAGES, GramStore
from merging.merged_model import AdapterMerger
from merging.methods import MergeMethod, get_method, list_methods
from mlvision.backbone import BackboneConfig, Preprocess
from mlvision.data import split_tensors
from mlvision.errors import AdapterError, MergeConfigError, MLVisionError, StoreError, error_reason
from mlvision.evaluation import FoldedBackbone
from mlvision.models import META_FILE, MultiTaskModel
from mlvision.runs import resolve_stored_path
from mlvision.store import Store

# Unlabeled test images per task AdaMerging learns on from the command line (the sweep's merge_eval, 300).
ADAMERGING_IMAGES = 300


@dataclass(frozen=True)
class ReadOptions:
    """What the merge CLI says about its adapter folders beyond the folders themselves: the options as given (a
    source that takes one parses it, `per_adapter_option`; one that takes none refuses it, `given`)."""

    labels: list[str] = field(default_factory=list)  # --labels ADAPTER=FILE
    data: list[str] = field(default_factory=list)  # --data ADAPTER=DATASET: the adapter's own dataset
    base: str | None = None  # --base: the base model of adapters whose config names none
    hub_ids: dict[Path, str] = field(default_factory=dict)  # folder -> the hub:user/adapter it was downloaded from
    db: Path | None = None  # --db: the results database that may store these adapters' accuracies

    def given(self) -> str | None:
        """The first option given, as the command line spells it (a source that takes none refuses it)."""
        return "--labels" if self.labels else "--base" if self.base else "--data" if self.data else None


class AdapterSource(ABC):
    """A set of adapters of one backbone, one per task, and what a merge of them needs (see the module's docstring).
    A new kind of adapter (another trainer's format, another base library) is one more subclass, listed in
    `SOURCES`."""

    adapters: dict[str, AdapterDeltas]  # task -> its adapter, in the order given
    base: str  # the base model's (backbone's) name
    grams: GramStore | ForeignGrams | None = None  # RegMean's statistics where the tasks' training images are here
    db_path: Path | None = None  # the results database holding its adapters' stored figures; None: none stored
    seed: int | None = None  # the adapters' training seed where a study recorded one
    trained_here: bool = False  # whether its tasks are this project's: their images load here
    scores_single_adapters: bool = False  # whether --evaluate also scores each adapter alone (no stored figure)
    layer_sources: dict[str, list[str]] = {}  # layer -> the tasks that adapt it, where some adapters leave it out

    # --- read ---------------------------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def claims(cls, folders: list[Path]) -> bool:
        """Whether these adapter folders are of this source's format (the merge CLI asks `SOURCES` in order)."""

    @classmethod
    @abstractmethod
    def read(cls, folders: list[Path], options: ReadOptions) -> AdapterSource:
        """The source of these folders, or one line saying why they cannot be read as one (an option it does not
        take, a folder of another format among them)."""

    @property
    @abstractmethod
    def preprocess(self) -> Preprocess:
        """How an image is fed to the backbone."""

    # --- data ---------------------------------------------------------------------------------------------------

    @abstractmethod
    def split(self, split: str, n_for: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{task: (images, labels)}: up to n_for[task] images of `split` (train, validation, test) of each task
        named, or one line (an MLVisionError) naming the task whose data is not here."""

    @abstractmethod
    def score(self, merged: dict[str, torch.Tensor], data: dict) -> dict[str, float]:
        """{task: accuracy} on `data` ({task: (images, labels)}) of the backbone with `merged` and those tasks'
        heads, through the source's evaluation path."""

    def rank_validation(self, tasks: list[str]) -> tuple[dict | None, str]:
        """(validation images of `tasks` the export's rank is scored on, or None and why not). Default: the tasks'
        validation split, or not measured where it cannot be loaded here."""
        try:
            return self.split("validation", dict.fromkeys(tasks, RANK_VALIDATION_IMAGES)), ""
        except MLVisionError as error:
            return None, f"the tasks' validation images cannot be loaded here ({error_reason(error)})"

    def measured_now(self, task: str, exported: bool = False) -> str:
        """Where a figure --evaluate measures now comes from, as the model card prints it."""
        return "measured now on the same images" if exported else "measured now"

    # --- merge --------------------------------------------------------------------------------------------------

    def check_method(self, method: MergeMethod) -> None:
        """Refuse, in one line, a method these adapters cannot be merged with (before anything is loaded)."""

    selects_on_validation: bool = False  # the merge CLI searches the method's grid on `rank_validation`'s images

    @abstractmethod
    def merge(
        self, group: tuple[str, ...], method: str, hyperparams: dict | None
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """(merged ΔW per layer, the hyperparameters used) of the group's adapters."""

    @abstractmethod
    def build(self, merged: dict[str, torch.Tensor], group: tuple[str, ...]) -> torch.nn.Module:
        """A model answering {task: logits} for a batch of images: the backbone with `merged`, one head per task."""

    # --- stored figures -----------------------------------------------------------------------------------------

    def stored_figures(self) -> dict[str, dict[str, Figure]]:
        """{task: {"single"|"head": Figure}} a results database stored for these adapters (empty where none)."""
        return {task: {} for task in self.adapters}

    def stored_merge_figures(self, method: str, params: dict) -> dict[str, Figure]:
        """{task: Figure}: the stored test accuracy of a merge equal to this one (empty where none)."""
        return {}

    # --- export -------------------------------------------------------------------------------------------------

    def export(
        self,
        merged: dict[str, torch.Tensor],
        adapters: list[AdapterDeltas],
        rank: int | str,
        folder: Path,
        info: dict,
        figures: dict | None = None,
        overwrite: bool = False,
        validation: tuple[dict | None, str] | None = None,
    ) -> tuple[float, dict, dict]:
        """The merge written as merging/merge.py writes it: (the LoRA's relative reconstruction error, the rank
        record, the figures the card holds). The rank (a number, `full` or `auto`) is settled on `rank_validation`'s
        images (`validation`: those already loaded), every "merged" test figure gets the exported LoRA's beside it
        (`settle_and_measure`), then the source writes the folder (`write`)."""
        check_output_folder(folder, [a.path for a in adapters], overwrite)  # before the scoring, as write will
        images, why_not = validation or self.rank_validation([a.task for a in adapters])

        def test_split(n_for: dict[str, int]):
            try:
                return self.split("test", n_for)
            except MLVisionError:
                return None  # the stored figure's images are not here: the exported cell stays "not measured"

        rank, choice, figures = settle_and_measure(
            rank,
            merged,
            figures,
            images,
            why_not,
            self.score,
            test_split,
            lambda task: self.measured_now(task, exported=True),
        )
        error = self.write(merged, adapters, rank, folder, {**info, "rank_choice": choice}, figures, overwrite)
        return error, choice, figures

    @abstractmethod
    def write(
        self, merged, adapters: list[AdapterDeltas], rank: int, folder: Path, info: dict, figures, overwrite: bool
    ) -> float:
        """Write the export folder at `rank` (merging/export.py `write_export`); returns the LoRA's relative error."""

    @abstractmethod
    def origin_line(self) -> str:
        """Where the adapters come from, in one phrase (the demo's header)."""

    def missing_statistics(self) -> dict[str, str]:
        """{task: why} for the tasks whose statistics (RegMean's Gram matrices) cannot be had here."""
        return {}


class OwnAdapters(AdapterSource):
    """This project's adapters (task.json beside each): the backbone of their training with ΔW folded in, the sweep's
    Gram matrices (same cache, same images: a RegMean merge with the stored α is the merge the study scored), its
    tasks' splits, and the accuracies a results database stored for them."""

    trained_here = True

    def __init__(self, adapters: list[AdapterDeltas], db_path: Path | None = None, seed: int | None = None):
        self.adapters = {}
        for adapter in adapters:
            if adapter.task in self.adapters:
                raise AdapterError(
                    f"adapters {self.adapters[adapter.task].path} and {adapter.path} are both of task {adapter.task}: "
                    "merge one adapter per task"
                )
            self.adapters[adapter.task] = adapter
        check_compatible(adapters)  # reference methods go through peft, which would not name the adapter that differs
        self.backbone_config = BackboneConfig(**adapters[0].meta["backbone"])
        self.base = self.backbone_config.name
        self.db_path, self.seed = db_path, seed
        self._fold_lock = threading.Lock()

    @classmethod
    def claims(cls, folders):
        return True  # the fallback: load_deltas says in one line what a folder that is no adapter lacks

    @classmethod
    def read(cls, folders, options):
        """The merge CLI's adapters; `db_path` is its --db (set by the caller): stored figures where it holds them."""
        if options.given():
            raise MergeConfigError(
                f"{options.given()} is for adapters trained elsewhere; this project's adapters carry theirs"
            )
        return cls([load_deltas(folder) for folder in folders], db_path=options.db)

    @classmethod
    def from_db(cls, db_path: str | Path) -> OwnAdapters:
        """The adapters of one seed (the smallest stored) of the study stored in `db_path`, one per task."""
        db_path = Path(db_path)
        if not db_path.exists():
            raise StoreError(
                f"no results database at {db_path}: run `python training/run_all.py` first or pass --db PATH"
            )
        rows = Store(db_path).query(
            "SELECT task, seed, path FROM models WHERE model_kind = 'adapter' ORDER BY task, seed"
        )
        if not rows:
            raise StoreError(f"{db_path} holds no trained adapters: run `python training/run_all.py` first")
        seed = min(seed for _, seed, _ in rows)
        adapters: dict[str, AdapterDeltas] = {}
        for task, row_seed, path in rows:
            if row_seed == seed and task not in adapters:
                adapters[task] = load_deltas(resolve_stored_path(path))
        return cls([adapters[task] for task in sorted(adapters)], db_path, seed)

    @cached_property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(next(iter(self.adapters.values())).meta["preprocess"])

    @cached_property
    def folded(self) -> FoldedBackbone:
        """The backbone prepared once for every merge scored or built (loaded on first use)."""
        return FoldedBackbone(self.backbone_config)

    @cached_property
    def grams(self) -> GramStore:
        return GramStore(self.folded, lambda task: self._merge_images(task, "train", GRAM_IMAGES))

    @cached_property
    def _merger(self) -> AdapterMerger:
        return AdapterMerger(
            self.adapters,
            self.backbone_config,
            grams=self.grams,
            folded=self.folded,
            unlabeled_for=lambda task: self._merge_images(task, "test", ADAMERGING_IMAGES),
        )

    def _merge_images(self, task: str, split: str, n: int) -> torch.Tensor:
        """A task's images for a data-aware merge (RegMean's training images, AdaMerging's unlabeled test images),
        or one line saying the task's data cannot be loaded here."""
        try:
            return split_tensors(task, split, self.preprocess, n)[0]
        except MLVisionError as error:
            raise MergeConfigError(
                f"this method needs images of task {task!r} ({split} split), which cannot be loaded here ({error}); "
                "use a data-free method or run where the task's data is available"
            ) from None

    def split(self, split, n_for):
        return own_split([self.adapters[task] for task in n_for], split, n_for)

    def score(self, merged, data):
        return own_score(self.folded, {task: adapter.head for task, adapter in self.adapters.items()}, merged, data)

    def merge(self, group, method, hyperparams):
        return self._merger.merge(group, method, hyperparams)

    def build(self, merged, group):
        with self._fold_lock:  # FoldedBackbone rewrites one shared backbone in place
            backbone = self.folded.standalone(merged)
        heads = {task: copy.deepcopy(self.adapters[task].head) for task in group}
        return MultiTaskModel(backbone, heads).eval()

    def stored_figures(self):
        return _stored_figures(self.db_path, list(self.adapters.values())) if self.db_path else super().stored_figures()

    def stored_merge_figures(self, method, params):
        if self.db_path is None:
            return {}
        return _stored_merge_figures(self.db_path, list(self.adapters.values()), method, params)

    def write(self, merged, adapters, rank, folder, info, figures, overwrite):
        return write_own_export(merged, adapters, rank, folder, info, figures, overwrite)

    def origin_line(self) -> str:
        return f"One LoRA adapter per task (seed {self.seed}) on `{self.base}`"


class PeftAdapters(AdapterSource):
    """peft LoRAs of one timm or transformers base model, trained elsewhere (merging/foreign.py reads them): the base
    loaded once on first use (copied for every model built, never changed), served as base + merged ΔW with one
    classifier per task. Data and statistics only where `datasets` names each adapter's own dataset (the merge CLI's
    --data): their training images are not here."""

    scores_single_adapters = True

    def __init__(self, adapters: list[AdapterDeltas], datasets: dict[str, str] | None = None):
        """`datasets`: {task: the adapter's own dataset (a save_to_disk folder or a Hub dataset id)}, where given."""
        if len({a.task for a in adapters}) < len(adapters):
            raise AdapterError("two adapters have the same name (their folder or hub id): rename one folder")
        self.base = base_model_name(adapters)  # before check_compatible: its message names the base models
        filled, self.layer_sources = fill_missing_layers(adapters)
        check_compatible(filled)
        self.adapters = {adapter.task: adapter for adapter in filled}
        self.library: BaseLibrary = LIBRARIES[filled[0].meta["library"]]
        self.datasets = dict(datasets or {})
        self._build_lock = threading.Lock()

    @classmethod
    def claims(cls, folders):
        return any(is_foreign(folder) for folder in folders)

    @classmethod
    def read(cls, folders, options):
        """The merge CLI's adapters: label names from --labels, the folder's own, then the dataset's (--data), the
        base config's last; --base for adapters whose config names none; --data as `datasets`."""
        own = [folder for folder in folders if (folder / META_FILE).exists()]
        if own:
            other = next(folder for folder in folders if is_foreign(folder))
            raise MergeConfigError(
                f"{own[0]} is one of this project's adapters ({META_FILE}) but {other} was trained elsewhere: "
                "merge adapters of one kind (one backbone) only"
            )
        labels = per_adapter_option(options.labels, folders, "--labels")
        data = per_adapter_option(options.data, folders, "--data")
        adapters = [
            load_foreign(
                folder,
                labels.get(folder),
                options.base,
                options.hub_ids.get(folder),
                fallback_labels=dataset_label_names(data[folder]) if folder in data else None,
            )
            for folder in folders
        ]
        return cls(adapters, {a.task: data[a.path] for a in adapters if a.path in data})

    @classmethod
    def from_arguments(
        cls, sources: list[str], base: str | None = None, labels: dict[str, str] | None = None
    ) -> PeftAdapters:
        """The demo's adapters. `sources`: adapter folders, folders of adapter folders, or hub:user/adapter ids;
        `base`: the base model of adapters whose config names none (timm); `labels`: {source as given: labels
        file}."""
        labels_for = {_key(source): file for source, file in (labels or {}).items()}
        adapters = []
        for source in expand_sources(list(sources)):
            folder, hub_id = resolve_adapter(source)
            if not is_foreign(folder):
                raise AdapterError(
                    f"{source} is not an adapter trained elsewhere (no adapter_config.json, or this project's "
                    "task.json): serve this project's adapters from their results database with --db"
                )
            adapters.append(load_foreign(folder, labels_for.pop(_key(source), None), base, hub_id))
        if labels_for:
            raise AdapterError(f"--labels names {next(iter(labels_for))}, which is not one of the adapters served")
        return cls(adapters)

    @cached_property
    def base_model(self) -> torch.nn.Module:
        """The base model, loaded on first use (reading the adapters never loads it)."""
        return self.library.load(self.base)

    @cached_property
    def preprocess(self) -> Preprocess:
        return self.library.preprocess(self.base, self.base_model)

    @property
    def selects_on_validation(self) -> bool:
        return len(self.datasets) == len(self.adapters)

    @cached_property
    def grams(self) -> ForeignGrams | None:
        """RegMean's statistics from each adapter's dataset's training images, where every adapter has one."""
        if not self.selects_on_validation:
            return None
        train = {}

        def images_for(task: str):
            if not train:
                train.update(self.split("train", dict.fromkeys(self.adapters, GRAM_IMAGES)))
            return train[task][0]

        return ForeignGrams(self.base_model, images_for)

    def check_method(self, method):
        if not method.per_layer:
            raise MergeConfigError(
                f"merge method '{method.name}' is {method.kind}; adapters trained elsewhere merge with a per-layer "
                "method: "
                f"{', '.join(list_methods(kind='data_free'))}, or with --data for every adapter "
                f"{', '.join(list_methods(kind='data_aware'))}"
            )
        if method.statistics and not self.selects_on_validation:
            missing = next(a.path for a in self.adapters.values() if a.task not in self.datasets)
            raise MergeConfigError(
                f"merge method '{method.name}' needs each adapter's training images: pass --data {missing}=DATASET "
                f"(one for every adapter), or use a per-layer method: {', '.join(list_methods(kind='data_free'))}"
            )

    def split(self, split, n_for):
        data = {}
        for task, n in n_for.items():  # one line naming an adapter without --data
            data.update(evaluation_data([self.adapters[task]], self.datasets, self.preprocess, n, split))
        return data

    def score(self, merged, data):
        from mlvision.evaluation import accuracy_of, task_correct

        model = build_merged_classifier([self.adapters[task] for task in data], merged, self.base_model)
        return {task: accuracy_of(correct) for task, correct in task_correct(model, data).items()}

    def rank_validation(self, tasks):
        """With no --data at all, not measured; with some, every adapter's (one line naming one without)."""
        if not self.datasets:
            return None, "no validation images: --data ADAPTER=DATASET for every adapter measures it"
        return self.split("validation", dict.fromkeys(tasks, RANK_VALIDATION_IMAGES)), ""

    def measured_now(self, task, exported=False):
        return f"measured now on {self.datasets[task]}"

    def merge(self, group, method, hyperparams):
        merger = AdapterMerger(self.adapters, None, grams=self.grams)
        return merger.merge(list(group), method, hyperparams)

    def build(self, merged, group):
        with self._build_lock:  # one deep copy of the base at a time (its memory, not correctness)
            return build_merged_classifier([self.adapters[t] for t in group], merged, self.base_model)

    def write(self, merged, adapters, rank, folder, info, figures, overwrite):
        tasks = {a.task for a in adapters}
        layers = {layer: names for layer, names in self.layer_sources.items() if set(names) & tasks}
        partial = any(len(set(names) & tasks) < len(tasks) for names in layers.values())
        info = {
            **info,
            "layers": layers,
            "missing_layers_as_zero": partial,
            "datasets": {a.task: self.datasets.get(a.task) for a in adapters},
        }
        return export_merge(merged, adapters, rank, folder, info, overwrite, figures, self.base_model)

    def origin_line(self) -> str:
        return f"LoRA adapters trained elsewhere, one per task, on `{self.base}`"

    def missing_statistics(self) -> dict[str, str]:
        return {
            task: f"adapter {task} was trained elsewhere: its training images are not here"
            for task in self.adapters
            if task not in self.datasets or not self.selects_on_validation
        }


# The formats the merge CLI reads, asked in order (`claims`); the last takes whatever the others did not.
SOURCES: list[type[AdapterSource]] = [PeftAdapters, OwnAdapters]


def read_adapters(folders: list[Path], options: ReadOptions) -> AdapterSource:
    """The adapters in `folders` as the first source of `SOURCES` that claims them."""
    source = next(source for source in SOURCES if source.claims(folders))
    return source.read(folders, options)


def per_adapter_option(items: list[str], adapters: list[Path], option: str) -> dict[Path, str]:
    """--labels ADAPTER=FILE (or --data ADAPTER=DATASET) options as {adapter folder: value}; each ADAPTER must be
    one of the inputs."""
    inputs = {folder.resolve(): folder for folder in adapters}
    example = "labels.json" if option == "--labels" else "my_dataset/"
    values = {}
    for item in items:
        folder, sep, value = item.rpartition("=")
        if not sep or not folder or not value:
            raise MergeConfigError(
                f"{option} '{item}' is not ADAPTER=VALUE: write e.g. {option} my_adapter={example} (adapter folders go "
                f"before {option}, which takes every ADAPTER=VALUE that follows it)"
            )
        if Path(folder).resolve() not in inputs:
            raise MergeConfigError(f"{option} names {folder}, which is not one of the adapters given: check the path")
        values[inputs[Path(folder).resolve()]] = value
    return values


def _key(source: str) -> str:
    """An adapter argument as --labels may name it: a hub id as written, a folder by its absolute path."""
    return source if source.startswith("hub:") else str(Path(source).resolve())


# --- the figures a results database stored for this project's adapters ---------------------------------------------


def _stored_rows(db: Path, sql: str, params: list) -> list[tuple]:
    """Rows of a read-only query on the results database's views, or one line saying why they cannot be read."""
    import duckdb

    try:
        return Store(db).query(sql, params)
    except duckdb.Error as error:  # e.g. a DuckDB file without the results views
        raise StoreError(
            f"cannot read stored accuracies from {db} ({error_reason(error)}): pass --db with a results.duckdb "
            "written by training/run_all.py"
        ) from None


def _only(rows: list[tuple], run_id: str | None = None) -> tuple | None:
    """The one row, or the one of run `run_id` (the last column) among several; None when it stays ambiguous."""
    if len(rows) > 1:
        rows = [row for row in rows if row[-1] == run_id]
    return rows[0] if len(rows) == 1 else None


def _stored_figures(db: Path, adapters: list[AdapterDeltas]) -> dict[str, dict]:
    """Per task, the stored test accuracy of the adapter itself and of its head baseline (card.Figure).

    The adapter's row in task_results is the one whose model_id is the config hash its task.json records (its
    identity). The head baseline is a head of the same task, seed and backbone scored on as many test images, the
    one of the adapter's run when there are several; none is taken when the adapter itself is not stored (the
    database is then of another study). A missing `db` gives no figures: the card says "not measured".
    """
    figures = {adapter.task: {} for adapter in adapters}
    if not db.is_file():
        return figures
    source = f"stored in {db.name}"
    for adapter in adapters:
        meta = adapter.meta
        single = _only(
            _stored_rows(
                db,
                "SELECT accuracy, n_test, run_id FROM task_results WHERE model_kind = 'adapter' AND model_id = ?",
                [meta.get("config_hash")],
            )
        )
        if single is None:
            continue
        figures[adapter.task]["single"] = Figure(single[0], single[1], source)
        heads = _stored_rows(
            db,
            "SELECT accuracy, n_test, run_id FROM task_results "
            "WHERE model_kind = 'head' AND task = ? AND seed = ? AND backbone = ? AND n_test = ?",
            [adapter.task, meta.get("training", {}).get("seed"), meta["backbone"]["name"], single[1]],
        )
        head = _only(heads, single[2])
        if head is not None:
            figures[adapter.task]["head"] = Figure(head[0], head[1], source)
    return figures


def _stored_merge_figures(db: Path, adapters: list[AdapterDeltas], method: str, params: dict) -> dict:
    """Per task, the stored test accuracy of a merge equal to this one: same method, hyperparameters (what a merge
    records beside them, e.g. RegMean's singular channels, aside), set of tasks, seed and backbone, in
    merge_results (the sweep's merges, chosen on validation). Empty when none or more than one merge matches."""
    seeds = {adapter.meta.get("training", {}).get("seed") for adapter in adapters}
    if not db.is_file() or len(seeds) != 1:
        return {}
    inputs = get_method(method).inputs
    tasks = {adapter.task for adapter in adapters}
    rows = _stored_rows(
        db,
        "SELECT merge_id, tasks, task, merged_accuracy, n, hyperparams FROM merge_results "
        "WHERE method = ? AND seed = ? AND backbone = ? AND k = ?",
        [method, seeds.pop(), adapters[0].meta["backbone"]["name"], len(adapters)],
    )
    matching = [row for row in rows if set(row[1].split(",")) == tasks and inputs(json.loads(row[5])) == inputs(params)]
    if len({row[0] for row in matching}) != 1:
        return {}
    return {row[2]: Figure(row[3], row[4], f"stored in {db.name}") for row in matching}


__all__ = [
    "ADAMERGING_IMAGES",
    "SOURCES",
    "AdapterSource",
    "OwnAdapters",
    "PeftAdapters",
    "ReadOptions",
    "read_adapters",
]
