"""Split sizes and the leakage guard: the rules every built-in task's three splits follow.

Why a module of its own: the builders (one module per source family) only say where their images
come from; how images are cut into train/validation/test (seeded, stratified) and what may never
cross a split (`drop_leaks`, applied to every built-in task by `cache.prepare`) are one rule for all
of them, so a new builder cannot forget it.

Leakage guard: validation and test images identical (pixel for pixel) to a training image, and test
images identical to a validation image, are dropped. On the current sources it drops nothing
(animals' copies are removed before its split by `dedupe_images`), but it keeps any future builder honest.
"""

from __future__ import annotations

import hashlib

import numpy as np

SPLITS = ("train", "validation", "test")
SEED = 0

# What every builder returns: {split: (uint8 images [n, H, W] or [n, H, W, 3], int64 labels [n])}.
Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int = SEED) -> list[np.ndarray]:
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


def cut_units(units: list, fractions, seed: list[int]) -> dict:
    """Unit -> split: the units (font families, voices, emoji, themes...) shuffled by a generator seeded with
    `seed` and cut by `fractions` (rounded), so that each unit, and every image made from it, is in one split."""
    order = np.random.default_rng(seed).permutation(len(units))
    bounds = np.round(np.cumsum(fractions) * len(units)).astype(int)
    return {units[i]: SPLITS[int(np.searchsorted(bounds, rank, side="right"))] for rank, i in enumerate(order)}


def in_turn(members: list, count: int) -> list[tuple[object, int]]:
    """`count` (member, round) pairs taking `members` in turn: how the pool's builders balance their classes by
    construction, a class with few fonts, emoji or icons drawing each of them in more rounds (each round a new
    seeded rendering)."""
    return [(members[i % len(members)], i // len(members)) for i in range(count)]


def split_arrays(images: np.ndarray, labels: np.ndarray, fractions: tuple[float, float, float]) -> Splits:
    """One pool of images cut into train/validation/test by `stratified_split`."""
    parts = stratified_split(labels, fractions)
    return {split: (images[idx], labels[idx]) for split, idx in zip(SPLITS, parts)}


def pixel_hash(img: np.ndarray) -> bytes:
    """A content hash of a uint8 image: equal exactly when shape and pixels are equal."""
    return hashlib.blake2b(repr(img.shape).encode() + np.ascontiguousarray(img).tobytes(), digest_size=16).digest()


def drop_leaks(splits: Splits) -> tuple[Splits, dict[str, int]]:
    """The leakage guard every built-in task goes through in `cache.prepare`, whatever its builder.

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


# Near duplicates (issue 32): two images whose 16x16 grayscale thumbnails differ by less than this root-mean-square
# (pixels scaled to 0-1; 0.02 is about 5 grey levels of 255 on average). Exact copies are dropped by `drop_leaks`;
# near ones are counted and reported (`near_duplicates`), because a threshold cannot tell a leaked design (a font
# clone under another name) from two designs that are simply alike (the letter "l" in two sans faces).
NEAR_DUPLICATE_RMS = 0.02
THUMBNAIL = 16


def thumbnails(images: np.ndarray) -> np.ndarray:
    """[n, THUMBNAIL * THUMBNAIL] float32 grayscale thumbnails in [0, 1] (box-filtered), of uint8 L or RGB images."""
    from PIL import Image

    out = np.empty((len(images), THUMBNAIL * THUMBNAIL), np.float32)
    for i, img in enumerate(images):
        small = Image.fromarray(img).convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
        out[i] = np.asarray(small, np.float32).ravel() / 255.0
    return out


def near_duplicates(reference: np.ndarray, others: np.ndarray, rms: float = NEAR_DUPLICATE_RMS) -> int:
    """How many of `others` have a thumbnail within `rms` (root-mean-square) of some `reference` thumbnail.

    Both are thumbnail arrays (`thumbnails`); the nearest neighbour is found by one matrix product per chunk.
    """
    if len(reference) == 0 or len(others) == 0:
        return 0
    ref_sq = (reference**2).sum(1)
    found = 0
    for start in range(0, len(others), 1024):
        chunk = others[start : start + 1024]
        d2 = (chunk**2).sum(1)[:, None] + ref_sq[None, :] - 2.0 * chunk @ reference.T
        found += int((d2.min(1) / reference.shape[1] < rms**2).sum())
    return found
