"""Hub datasets as tasks: `hub:<id>` (or `hub:<folder>` saved with `save_to_disk`) in the task shape.

Why here and not in the registry: a hub task is not registered; it is loaded on demand, its labels
read from the dataset itself, its splits taken as they come (missing ones carved from train). The
result is the same `Task` + `DatasetDict` shape as a built-in task, so everything downstream is one
code path. Its domain tag comes from the study's profile or --task-domains (`set_hub_domains`).
"""

from __future__ import annotations

from pathlib import Path

import datasets

from ..errors import MLVisionError, UnknownNameError
from .splits import SEED, SPLITS
from .task import Task, features_for

HUB_PREFIX = "hub:"

_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}

_HUB_DOMAINS: dict[str, str] = {}


def set_hub_domains(domains: dict[str, str]) -> None:
    """Domain tags of hub tasks by task name (e.g. {"hub:tanganke/eurosat": "remote_sensing"}).

    A hub dataset carries no domain of its own, yet the findings compare same-domain with
    cross-domain pairs; the study's profile (or --task-domains) sets them here once per process,
    so every later `get_task(name)` (training metadata, the store's tasks table, the findings)
    sees the same tag. Built-in tasks keep their registry domains.
    """
    unknown = [name for name in domains if not name.startswith(HUB_PREFIX)]
    if unknown:
        raise UnknownNameError(
            f"domains can only be given to {HUB_PREFIX} tasks (built-in tasks have their own): {', '.join(unknown)}"
        )
    _HUB_DOMAINS.clear()
    _HUB_DOMAINS.update(domains)


def hub_domain(name: str) -> str:
    """The domain tag set for hub task `name` (`set_hub_domains`), else "hub" (related to nothing)."""
    return _HUB_DOMAINS.get(name, "hub")


def load_hub(ident: str, domain: str = "hub") -> tuple[Task, datasets.DatasetDict]:
    """A hub dataset (or a local `save_to_disk` folder) in the project's task shape.

    The image column is the one with an Image feature (else one named image/img); the label
    column the one with a ClassLabel feature (else one named label/labels, which must then be
    a ClassLabel). Missing validation/test splits are carved from train: 10% each, seeded,
    stratified when every class has enough examples.
    """
    if not ident:
        raise UnknownNameError(f"empty hub dataset id; use {HUB_PREFIX}<dataset id or folder>")
    if Path(ident).is_dir():
        try:
            loaded = datasets.load_from_disk(ident)
        except Exception as exc:
            raise MLVisionError(
                f"cannot load dataset folder {ident} ({exc}): it must be a folder written by Dataset(Dict).save_to_disk"
            ) from exc
        source = f"local folder {ident} (save_to_disk)"
    else:
        # "<id>@<config>" names a dataset configuration, e.g. ufldl-stanford/svhn@cropped_digits
        path, _, config_name = ident.partition("@")
        try:
            loaded = datasets.load_dataset(path, config_name or None)
        except Exception as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, whatever the cause
            raise MLVisionError(
                f"cannot load hub dataset {ident!r} ({reason[:300]}): check the id and "
                f"your network, or pass a local folder saved with save_to_disk"
            ) from exc
        source = f"{HUB_PREFIX}{ident}"
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})

    splits = {}
    for split_name, ds in loaded.items():
        canonical = _SPLIT_ALIASES.get(split_name.lower())
        if canonical and canonical not in splits:
            splits[canonical] = ds
    if "train" not in splits:
        raise MLVisionError(f"dataset {ident!r} has no train split (splits: {sorted(loaded)})")

    image_col, label_col = _find_columns(ident, splits["train"].features)
    label_names = tuple(splits["train"].features[label_col].names)
    task = Task(f"{HUB_PREFIX}{ident}", label_names, domain, source, f"{ident}: {len(label_names)} classes")
    features = features_for(task)

    def normalise(ds: datasets.Dataset) -> datasets.Dataset:
        ds = ds.select_columns([image_col, label_col])
        ds = ds.rename_columns({c: n for c, n in ((image_col, "image"), (label_col, "label")) if c != n})
        return ds.cast(features) if ds.features != features else ds

    splits = {k: normalise(v) for k, v in splits.items()}
    for missing in ("test", "validation"):
        if missing not in splits:
            splits["train"], splits[missing] = _carve(splits["train"], 0.1)
    return task, datasets.DatasetDict({s: splits[s] for s in SPLITS})


def _find_columns(ident: str, features: datasets.Features) -> tuple[str, str]:
    """(image column, label column) of a dataset, or an error naming what was found."""
    found = ", ".join(f"{k} ({type(v).__name__})" for k, v in features.items())
    images = [k for k, v in features.items() if isinstance(v, datasets.Image)]
    images = images or [k for k in ("image", "img") if k in features]
    labels = [k for k, v in features.items() if isinstance(v, datasets.ClassLabel)]
    labels = labels or [k for k in ("label", "labels") if k in features]
    if not images:
        raise MLVisionError(
            f"dataset {ident!r} has no image column (columns: {found}); "
            f"it needs an Image feature or a column named 'image'/'img'"
        )
    if not labels or not isinstance(features[labels[0]], datasets.ClassLabel):
        raise MLVisionError(
            f"dataset {ident!r} has no ClassLabel label column (columns: "
            f"{found}); cast the label column to datasets.ClassLabel, e.g. "
            f"ds.class_encode_column('label')"
        )
    return images[0], labels[0]


def _carve(ds: datasets.Dataset, fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split off `fraction` of `ds` (seeded; stratified by label when the classes allow)."""
    try:
        parts = ds.train_test_split(test_size=fraction, seed=SEED, stratify_by_column="label")
    except ValueError:  # e.g. a class with a single example cannot be stratified
        parts = ds.train_test_split(test_size=fraction, seed=SEED)
    return parts["train"], parts["test"]
