"""Export a merge: a peft LoRA of a chosen rank (truncated SVD of each merged ΔW) plus the k task heads.

The one writer of an export folder (`write_export`, atomic, for this project's adapters and for adapters trained
elsewhere), its checks (output folder, rank, fit), the export's rank (`--rank auto`: `choose_export_rank` on
validation images) and this project's export (`export_own_lora`, with its model card). Merging itself is
merging/merged_model.py; this module only writes what a merge made.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from merging.card import model_card
from merging.deltas import AdapterDeltas
from mlvision.backbone import BackboneConfig, create_backbone
from mlvision.errors import AdapterError, MergeConfigError, MLVisionError, error_reason
from mlvision.evaluation import FoldedBackbone
from mlvision.models import META_FILE, save_model
from mlvision.runs import relative_to_repo


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B [out, r], A [r, in] with B A the best rank-r approximation of delta (Eckart–Young)."""
    return _factors(torch.linalg.svd(delta.double(), full_matrices=False), rank)


def _factors(svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 factors `low_rank_factors` writes, from one SVD (u, s, vh) of the layer's ΔW."""
    u, s, vh = svd
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


# --- the export's rank ------------------------------------------------------------------------------------------
# `--rank auto` (merging/merge.py): the smallest rank of RANK_LADDER's doublings (then the layers' full rank) whose
# exported LoRA scores within RANK_TOLERANCE of the full merge on every task's validation images; where no validation
# images are at hand, FALLBACK_RANK, and the card says its accuracy was not measured.
RANK_TOLERANCE = 0.005  # 0.5 accuracy points
FALLBACK_RANK = 32
RANK_LADDER_START = 4


def max_export_rank(deltas: dict[str, torch.Tensor]) -> int:
    """The largest useful export rank: max over the layers of min(out, in) (`check_export_rank`)."""
    return max(min(delta.shape) for delta in deltas.values())


def rank_ladder(deltas: dict[str, torch.Tensor]) -> list[int]:
    """4, 8, 16, ... below the layers' largest useful rank, then that rank (the export is then exact)."""
    bound = max_export_rank(deltas)
    ladder, rank = [], RANK_LADDER_START
    while rank < bound:
        ladder.append(rank)
        rank *= 2
    return [*ladder, bound]


class LowRankMerge:
    """A merged ΔW and its rank-r exports: one SVD per layer, then for any rank the ΔW the exported LoRA holds
    (B A of the very float32 factors `lora_from_merge` writes) and its relative error, so an export can be scored
    through the evaluation path at every rank of a ladder without writing a folder per rank."""

    def __init__(self, merged: dict[str, torch.Tensor]):
        self.merged = merged
        self._svd = {layer: torch.linalg.svd(delta.double(), full_matrices=False) for layer, delta in merged.items()}

    def approximation(self, rank: int) -> dict[str, torch.Tensor]:
        """Per layer, B A at min(rank, out, in): what PeftModel.from_pretrained(model, export) adds to the weight."""
        approximated = {}
        for layer, delta in self.merged.items():
            b, a = _factors(self._svd[layer], rank)
            approximated[layer] = (b.double() @ a.double()).to(delta.dtype)
        return approximated

    def relative_error(self, rank: int) -> float:
        """||ΔW - B A||_F / ||ΔW||_F over all layers (`lora_from_merge`'s figure), from the dropped singular values
        of the float32 factors' product."""
        error_sq, total_sq = 0.0, 0.0
        for layer, delta in self.merged.items():
            b, a = _factors(self._svd[layer], rank)
            error_sq += float((delta.double() - b.double() @ a.double()).pow(2).sum())
            total_sq += float(delta.double().pow(2).sum())
        return (error_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0


def _rank_step(low_rank: LowRankMerge, rank: int, score, full: dict[str, float]) -> dict:
    """One rank scored: its relative error, per-task accuracy, the largest change either way against the full merge
    (`max_change`) and the largest loss (`max_loss`, negative where every task gained)."""
    accuracies = score(low_rank.approximation(rank))
    return {
        "rank": rank,
        "relative_error": low_rank.relative_error(rank),
        "accuracy": accuracies,
        "max_change": max(abs(accuracies[task] - full[task]) for task in full),
        "max_loss": max(full[task] - accuracies[task] for task in full),
    }


def choose_export_rank(low_rank: LowRankMerge, score, tolerance: float = RANK_TOLERANCE) -> dict:
    """`--rank auto`: walk `rank_ladder` up from its smallest rank and keep the first whose exported ΔW's accuracy
    moves by at most `tolerance` (either way: the export should score as the merge it stands for) against the full
    merge on every task. `score(deltas)` -> {task: accuracy} on validation images (the caller scores through the
    evaluation path). Returns the record merge.json and the card hold: the rule, the full merge's validation
    accuracies, each rank tried and the chosen rank. The layers' full rank always qualifies up to float rounding of
    the factors, so the walk ends there at the latest."""
    full = score(low_rank.merged)
    ladder = rank_ladder(low_rank.merged)
    tried = []
    for rank in ladder:
        tried.append(_rank_step(low_rank, rank, score, full))
        if tried[-1]["max_change"] <= tolerance + 1e-9 or rank == ladder[-1]:
            break
    return {
        "requested": "auto",
        "rule": (
            f"the smallest rank of {', '.join(map(str, ladder))} whose exported LoRA's validation accuracy is within "
            f"{tolerance * 100:g} points (either way) of the full merge's on every task"
        ),
        "tolerance": tolerance,
        "full_accuracy": full,
        "ladder": tried,
        "chosen": tried[-1]["rank"],
    }


def measure_export_rank(low_rank: LowRankMerge, rank: int, score) -> dict:
    """An explicit `--rank N`: the same record as `choose_export_rank`, for that one rank (its change stated, not
    bounded)."""
    full = score(low_rank.merged)
    return {
        "requested": rank,
        "rule": f"--rank {rank} as given",
        "tolerance": None,
        "full_accuracy": full,
        "ladder": [_rank_step(low_rank, rank, score, full)],
        "chosen": rank,
    }


def unmeasured_export_rank(rank: int | str, deltas: dict[str, torch.Tensor], why: str) -> dict:
    """The record of a rank whose accuracy cannot be measured here (no validation images): `--rank auto` falls back
    to FALLBACK_RANK (or the layers' full rank where that is smaller), and `why` says what was missing."""
    chosen = min(FALLBACK_RANK, max_export_rank(deltas)) if rank == "auto" else int(rank)
    rule = f"--rank {rank} as given" if rank != "auto" else f"--rank auto without validation images: rank {chosen}"
    return {"requested": rank, "rule": rule, "not_measured": why, "ladder": [], "chosen": chosen}


MERGE_INFO_FILE = "merge.json"


def check_export_rank(rank: int, deltas: dict[str, torch.Tensor]) -> None:
    """Refuse an export rank above the largest useful one: max over layers of min(out, in).

    A layer's ΔW [out, in] has rank at most min(out, in), so a larger rank only adds zero rows to
    its factors (`--rank 100000` once wrote gigabytes of zeros). An export gives each layer
    min(rank, out, in); a rank that no layer can use is a mistake, so it is refused, not clipped.
    """
    bound = max(min(delta.shape) for delta in deltas.values())
    if rank < 1:
        raise MergeConfigError(f"--rank must be at least 1, got {rank}")
    if rank > bound:
        raise MergeConfigError(
            f"--rank {rank} is above {bound}, the largest useful rank for these layers (a layer's rank is at "
            f"most min(out, in) of its weight): use --rank {bound} or less"
        )


def check_output_folder(folder: str | Path, inputs: list[str | Path], overwrite: bool = False) -> None:
    """Refuse an output folder whose replacement would destroy something that is not a previous merge.

    The export replaces the whole folder, so it must not be (or be inside, or contain) an input
    adapter, must not be a file or lie under one, and must be empty unless it is a previous merge
    output (it holds merge.json and no task.json) and `overwrite` is set. A folder that cannot
    even be looked at (no permission) is refused in one line too.
    """
    try:
        _check_output_folder(folder, inputs, overwrite)
    except OSError as error:
        raise MergeConfigError(
            f"cannot inspect output folder {folder} ({error.strerror or error}): choose a folder you can write"
        ) from None


def _check_output_folder(folder: str | Path, inputs: list[str | Path], overwrite: bool) -> None:
    out = Path(folder).resolve()
    for source in inputs:
        source = Path(source).resolve()
        if out == source:
            raise MergeConfigError(
                f"output folder {folder} is the input adapter {source}: the merge would overwrite it; "
                "choose a new folder"
            )
        if source in out.parents:
            raise MergeConfigError(
                f"output folder {folder} is inside the input adapter {source}: choose a folder outside every adapter"
            )
        if out in source.parents:
            raise MergeConfigError(
                f"output folder {folder} contains the input adapter {source}: replacing it would delete that "
                "adapter; choose a new folder"
            )
    if out.exists() and not out.is_dir():
        raise MergeConfigError(f"output folder {folder} is a file, not a folder: choose a new folder")
    if not out.exists():
        ancestor = out.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise MergeConfigError(f"output folder {folder} lies under the file {ancestor}: choose a folder path")
        return
    if not any(out.iterdir()):
        return
    if (out / META_FILE).exists():
        raise MergeConfigError(
            f"output folder {folder} holds a trained model ({META_FILE}): a merge never replaces one; "
            "choose a new folder"
        )
    if not (out / MERGE_INFO_FILE).is_file():
        raise MergeConfigError(
            f"output folder {folder} is not empty and is not a previous merge output (no {MERGE_INFO_FILE}): "
            "choose a new or empty folder"
        )
    if not overwrite:
        raise MergeConfigError(
            f"output folder {folder} already holds a merge: pass --overwrite to replace it, or choose a new folder"
        )


def write_folder_atomically(folder: Path, write) -> None:
    """Run `write(temp)` on a temporary sibling of `folder`, then rename it into place.

    Nothing half-written is ever left at `folder`: on any failure the temporary (and any parent
    folder made for it) is removed and a previous `folder` stays as it was; on success a previous
    folder is swapped out and deleted only after the new one is in place. A failure of the file
    system (full disk, no permission) is the user's one-line MergeConfigError naming the folder.
    """
    made = [parent for parent in [folder.parent, *folder.parent.parents] if not parent.exists()]
    temp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        temp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
        temp.mkdir()  # not mkdtemp: its 0o700 would become the output folder's mode
        write(temp)
        if folder.exists():
            old = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(folder, old)
            try:
                os.replace(temp, folder)
            except BaseException:
                os.replace(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, folder)
    except BaseException as error:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        for parent in made:  # deepest first; stops at the first one that is not empty
            try:
                parent.rmdir()
            except OSError:
                break
        os_error = file_system_error(error)
        if os_error is not None:
            full = os_error.errno in (errno.ENOSPC, errno.EDQUOT)
            raise MergeConfigError(
                f"cannot write output folder {folder} ({os_error.strerror or os_error}): "
                + ("free space there or choose another output folder" if full else "choose a writable folder")
            ) from None
        raise


def file_system_error(error: BaseException) -> OSError | None:
    """The file-system failure behind `error`, or None when it is not one.

    An OSError itself, one it was raised from (its cause or context), or the I/O error a library written in
    Rust reports in its message as "... (os error N)" (safetensors, which writes the LoRA and the heads, raises
    its own SafetensorError for a full disk): then an OSError with that errno and the system's text for it.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        found = re.search(r"\(os error (\d+)\)", str(error))
        if found:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def lora_from_merge(model: torch.nn.Module, merged: dict[str, torch.Tensor], rank: int):
    """`model` wrapped by peft with one LoRA whose B A is the best rank-`rank` approximation of each merged ΔW.

    Scaling 1 on every layer: each layer gets rank min(rank, out, in) through peft's rank_pattern, with
    alpha_pattern equal to it. Returns (peft model, relative error ||ΔW - B A||_F / ||ΔW||_F over all layers).
    The model is changed in place (peft injects its layers), so pass one nothing else uses.
    """
    clipped = {layer: min(delta.shape) for layer, delta in merged.items() if min(delta.shape) < rank}
    targets = sorted({layer.rsplit(".", 1)[-1] for layer in merged})
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        rank_pattern=clipped,
        alpha_pattern=clipped,
    )
    peft_model = get_peft_model(model, config)
    error_sq, total_sq = 0.0, 0.0
    with torch.no_grad():
        for layer, delta in merged.items():
            module = peft_model.base_model.model.get_submodule(layer)
            b, a = low_rank_factors(delta, rank)
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            lora_a.copy_(a.reshape(lora_a.shape))
            lora_b.copy_(b.reshape(lora_b.shape))
            error_sq += float((delta.double() - b.double() @ a.double()).pow(2).sum())
            total_sq += float(delta.double().pow(2).sum())
    return peft_model, ((error_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0)


# Validation images per task the export's rank is scored on (0.5 points of 500 is 2.5 images).
RANK_VALIDATION_IMAGES = 500


def export_own_lora(
    merged: dict[str, torch.Tensor],
    adapters: list[AdapterDeltas],
    rank: int | str,
    folder: str | Path,
    merge_info: dict,
    overwrite: bool = False,
    figures: dict | None = None,
    folded: FoldedBackbone | None = None,
) -> tuple[float, dict, dict]:
    """Save a merge of this project's adapters as a peft LoRA plus the k heads: (relative error, the rank record,
    the figures the card holds). The steps of `AdapterSource.export` (merging/sources.py) for a plain list of
    adapters, with the same helpers: the rank settled on each task's validation images (`RANK_VALIDATION_IMAGES`;
    where the tasks' data cannot be loaded the record says so and `auto` exports FALLBACK_RANK), scored through the
    evaluation path (`folded`, or a FoldedBackbone built here), the exported LoRA scored on the test images of every
    known merged figure (`settle_and_measure`), then `write_own_export`."""
    check_output_folder(folder, [a.path for a in adapters], overwrite)  # before the scoring, as write_export will
    folded = folded or FoldedBackbone(BackboneConfig(**adapters[0].meta["backbone"]))
    heads = {a.task: a.head for a in adapters}
    tasks = [a.task for a in adapters]
    try:
        validation, why_not = own_split(adapters, "validation", dict.fromkeys(tasks, RANK_VALIDATION_IMAGES)), ""
    except MLVisionError as error:
        validation, why_not = None, f"the tasks' validation images cannot be loaded here ({error_reason(error)})"

    def test_split(n_for: dict[str, int]):
        try:
            return own_split([a for a in adapters if a.task in n_for], "test", n_for)
        except MLVisionError:
            return None  # the stored figure's images are not here: the exported cell stays "not measured"

    rank, choice, figures = settle_and_measure(
        rank,
        merged,
        figures,
        validation,
        why_not,
        lambda deltas, data: own_score(folded, heads, deltas, data),
        test_split,
        lambda task: "measured now on the same images",
    )
    error = write_own_export(merged, adapters, rank, folder, {**merge_info, "rank_choice": choice}, figures, overwrite)
    return error, choice, figures


def write_own_export(
    merged: dict[str, torch.Tensor],
    adapters: list[AdapterDeltas],
    rank: int,
    folder: str | Path,
    merge_info: dict,
    figures: dict | None,
    overwrite: bool,
) -> float:
    """Write a merge of this project's adapters (`write_export`): the LoRA loads with
    `PeftModel.from_pretrained(backbone, folder)`, heads are saved as `heads/<task>/` model folders, and merge.json
    records the backbone and preprocessing beside `merge_info` (which holds the rank record, `rank_choice`)."""
    meta0 = adapters[0].meta

    def write_head(head_dir: Path, adapter: AdapterDeltas) -> None:
        meta = {**adapter.meta, "model_kind": "head", "training": {"from_adapter": adapter_origin(adapter)}}
        save_model(head_dir, meta, adapter.head)

    datasets = {a.task: a.task.removeprefix("hub:") if a.task.startswith("hub:") else None for a in adapters}
    info = {"datasets": datasets, **merge_info, "backbone": meta0["backbone"], "preprocess": meta0["preprocess"]}
    return write_export(
        folder,
        adapters,
        merged,
        rank,
        lambda: create_backbone(BackboneConfig(**meta0["backbone"])),
        f"backbone {meta0['backbone']['name']}",
        info,
        write_head,
        figures,
        overwrite,
    )


def settle_and_measure(
    requested: int | str,
    merged: dict[str, torch.Tensor],
    figures: dict | None,
    validation: dict | None,
    why_not: str,
    score,
    test_split,
    exported_source,
) -> tuple[int, dict, dict]:
    """(rank, the rank record, the figures with the exported LoRA's accuracy): what every export does before writing,
    whatever the adapters' source. `validation` {task: (images, labels)} settles the rank (`settle_rank`; None: not
    measured, `why_not` says why); every task whose `figures` hold a "merged" test accuracy gets the exported LoRA's
    accuracy on the same test images ("exported", its source `exported_source(task)`), where
    `test_split({task: n})` gives them (None: not here). `score(deltas, data)` -> {task: accuracy} scores through the
    source's evaluation path."""
    from merging.card import Figure

    score_validation, n_validation = None, None
    if validation is not None:
        n_validation = max(len(labels) for _, labels in validation.values())

        def score_validation(deltas):
            return score(deltas, validation)

    rank, choice, low_rank = settle_rank(requested, merged, score_validation, n_validation, why_not)
    figures = {task: dict(kinds) for task, kinds in (figures or {}).items()}
    measured = {task: kinds["merged"].n for task, kinds in figures.items() if "merged" in kinds}
    test = test_split(measured) if measured else None
    if test is not None:
        for task, value in score(low_rank.approximation(rank), test).items():
            figures[task]["exported"] = Figure(value, measured[task], exported_source(task))
    return rank, choice, figures


def write_export(
    folder: str | Path,
    adapters: list[AdapterDeltas],
    merged: dict[str, torch.Tensor],
    rank: int,
    load_model,
    model_name: str,
    info: dict,
    write_head,
    figures: dict | None,
    overwrite: bool,
) -> float:
    """The one writer of an export folder, for this project's adapters and for adapters trained elsewhere.

    Checks `folder` (`check_output_folder`) and `rank` (`check_export_rank`) before `load_model()` loads the model
    the LoRA is for (named `model_name` in errors); each merged ΔW must fit it (`check_merge_fits`). Writes,
    atomically: the LoRA (`lora_from_merge`: each layer at rank min(rank, out, in), scaling 1), one head per task
    through `write_head(folder, adapter)` under `heads/<task>/`, merge.json (`info` plus export_rank,
    relative_error and tasks) and README.md, the model card with `figures` (task -> {"merged"|"single"|"head":
    Figure}, looked up by the caller; "not measured" elsewhere). Returns ||ΔW - B A||_F / ||ΔW||_F over all layers.
    """
    folder = Path(folder)
    check_output_folder(folder, [a.path for a in adapters], overwrite)
    check_export_rank(rank, merged)
    model = load_model()
    check_merge_fits(model, merged, model_name)
    with warnings.catch_warnings():
        # transformers 5 warns from inside peft's wrapping of its models about its own renamed attribute
        # (is_gradient_checkpointing): nothing the user can act on, so not part of the command's output
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model, relative_error = lora_from_merge(model, merged, rank)
    info = {
        "licenses": adapter_licenses(adapters),
        **info,
        "export_rank": rank,
        "relative_error": relative_error,
        "tasks": [a.task for a in adapters],
    }

    def write(temp: Path) -> None:
        peft_model.save_pretrained(str(temp))
        for adapter in adapters:
            write_head(temp / "heads" / head_folder_name(adapter.task), adapter)
        (temp / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        # after peft's save_pretrained, whose own README.md (a blank template) this replaces
        (temp / "README.md").write_text(model_card(info, {a.task: a.meta["label_names"] for a in adapters}, figures))

    write_folder_atomically(folder, write)
    return relative_error


def own_split(adapters: list[AdapterDeltas], split: str, n_for: dict[str, int | None]) -> dict:
    """{task: (images, labels)}: up to n_for[task] images of `split` of each adapter's task (the fixed subset every
    model of the study is scored on), preprocessed as the adapters were trained. An MLVisionError where a task's data
    is not here."""
    from mlvision.backbone import Preprocess
    from mlvision.data import split_tensors

    preprocess = Preprocess.from_dict(adapters[0].meta["preprocess"])
    return {a.task: split_tensors(a.task, split, preprocess, n_for[a.task]) for a in adapters}


def own_score(folded: FoldedBackbone, heads: dict, deltas: dict[str, torch.Tensor], data: dict) -> dict[str, float]:
    """{task: accuracy} on `data` of the backbone with `deltas` folded in and the tasks' `heads`, through the
    evaluation path (one stream of full batches)."""
    from mlvision.evaluation import accuracy_of, task_correct

    correct = task_correct(folded.model(deltas, {task: heads[task] for task in data}), data)
    return {task: accuracy_of(values) for task, values in correct.items()}


def settle_rank(requested: int | str, merged: dict, score_validation, n_validation: int | None, why_not: str):
    """(rank, the record merge.json and the card hold, LowRankMerge): `auto` walks the ladder on validation, a
    number (or `full`) has its validation loss measured; without `score_validation` nothing is measured and `why_not`
    says why (auto then exports FALLBACK_RANK)."""
    rank = max_export_rank(merged) if requested == "full" else requested
    if isinstance(rank, int):
        check_export_rank(rank, merged)
    low_rank = LowRankMerge(merged)
    if score_validation is None:
        choice = unmeasured_export_rank(rank, merged, why_not)
    elif rank == "auto":
        choice = {**choose_export_rank(low_rank, score_validation), "validation_n": n_validation}
    else:
        choice = {**measure_export_rank(low_rank, rank, score_validation), "validation_n": n_validation}
    if requested == "full":
        choice["requested"], choice["rule"] = "full", f"--rank full: the layers' full rank, {rank}"
    return choice["chosen"], choice, low_rank


def adapter_licenses(adapters: list[AdapterDeltas]) -> dict[str, str | None]:
    """{task: the `license` its adapter's own model card (README.md metadata) names, or None}: what the export's
    card may claim (`card.license_of`). Read with huggingface_hub's `metadata_load`; an unreadable card names none."""
    from huggingface_hub import metadata_load

    licenses = {}
    for adapter in adapters:
        try:
            metadata = metadata_load(Path(adapter.path) / "README.md") or {}
        except Exception:  # noqa: BLE001 - no card, or a header that is not YAML: no license stated
            metadata = {}
        license = metadata.get("license") if isinstance(metadata, dict) else None
        licenses[adapter.task] = license if isinstance(license, str) and license else None
    return licenses


def head_folder_name(task: str) -> str:
    """A task's folder under heads/ (hub tasks and hub adapters hold ':' and '/')."""
    return task.replace(":", "_").replace("/", "_")


def adapter_origin(adapter: AdapterDeltas) -> str:
    """Where an adapter came from, as records name it: its `hub:` id, else its folder relative to the repo (no
    server path in a shared folder)."""
    return f"hub:{adapter.meta['hub_id']}" if adapter.meta.get("hub_id") else relative_to_repo(adapter.path)


def export_pipeline(method: str) -> str:
    """How a merge with `method` becomes a rank-r LoRA: 'compress-then-merge' for a `<name>@rank<r>` method (merged
    in the group's rank-r Core Space, so the export holds it exactly: merging/methods/core_space.py), else
    'merge-then-compress' (each merged ΔW's SVD truncated at r)."""
    from merging.methods.core_space import COMPRESSED

    return "compress-then-merge" if COMPRESSED in method else "merge-then-compress"


def merge_record(method: str, hyperparams: dict, adapters: list[AdapterDeltas], seconds: float) -> dict:
    """The keys every merge.json starts with: the method, its hyperparameters, the export's pipeline
    (`export_pipeline`), the inputs (`adapter_origin`) and the merge's seconds."""
    return {
        "method": method,
        "hyperparams": hyperparams,
        "pipeline": export_pipeline(method),
        "adapters": [adapter_origin(a) for a in adapters],
        "merge_seconds": seconds,
    }


def check_merge_fits(model: torch.nn.Module, merged: dict[str, torch.Tensor], model_name: str) -> None:
    """Before an export: every merged ΔW [out, in] fits its layer's weight (a 1x1 convolution flattened) and is
    finite; otherwise one line naming the layer (`model_name`, e.g. "backbone X", names the model)."""
    for layer, delta in merged.items():
        weight = getattr(_submodule(model, layer), "weight", None)
        if weight is None or weight.shape[0] != delta.shape[0] or weight[0].numel() != delta.shape[1]:
            raise AdapterError(
                f"merged layer {layer} ({list(delta.shape)}) does not fit {model_name}: "
                "merge adapters trained on that model"
            )
        if not torch.isfinite(delta).all():
            raise MergeConfigError(
                f"the merge gave NaN or infinite values in layer {layer}: check the method's hyperparameters"
            )


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


__all__ = [
    "FALLBACK_RANK",
    "MERGE_INFO_FILE",
    "RANK_TOLERANCE",
    "RANK_VALIDATION_IMAGES",
    "LowRankMerge",
    "adapter_licenses",
    "adapter_origin",
    "check_export_rank",
    "check_merge_fits",
    "check_output_folder",
    "choose_export_rank",
    "export_own_lora",
    "file_system_error",
    "head_folder_name",
    "lora_from_merge",
    "low_rank_factors",
    "max_export_rank",
    "measure_export_rank",
    "merge_record",
    "own_score",
    "own_split",
    "rank_ladder",
    "settle_and_measure",
    "settle_rank",
    "unmeasured_export_rank",
    "write_export",
    "write_own_export",
    "write_folder_atomically",
]
