"""The two tasks built from scikit-image's bundled data; registered for small tests and the tiny-vit
profile, not in the study.

- lfw_faces: skimage's 200 LFW crops (100 faces, 100 non-faces), 25x25 grayscale, 60/20/20, 120/40/40;
  every model scores 100 % (the ceiling).
- textures: 32x32 grayscale patches of 6 bundled photos, each split cut from its own band of columns
  (`texture_patch_boxes`), 2,400/480/720; each class is one photo, so it measures recognising six
  pictures, not textures.

Every file is read through `sources.read_installed`, which checks its sha256 pin first.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .. import sources
from ..errors import MLVisionError
from .splits import SEED, SPLITS, Splits, split_arrays

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


def build_lfw_faces() -> Splits:
    """skimage's lfw_subset: first 100 are faces (label 1), last 100 non-faces (label 0).

    Loaded from the sha256-checked bytes, and never with allow_pickle: a plain float array needs no pickle.
    """
    faces = np.load(io.BytesIO(sources.read_installed("skimage/data/lfw_subset.npy")), allow_pickle=False)
    images = np.round(np.clip(faces, 0, 1) * 255).astype(np.uint8)
    labels = np.array([1] * 100 + [0] * (len(images) - 100), dtype=np.int64)
    return split_arrays(images, labels, (0.6, 0.2, 0.2))


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


def build_textures() -> Splits:
    """Every patch of `texture_patch_boxes`, each split shuffled with its own seed."""
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
