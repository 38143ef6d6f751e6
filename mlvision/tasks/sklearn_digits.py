"""uci_digits: scikit-learn's bundled 8x8 UCI optical-recognition digits (1,797 images), 60/20/20.

Parsed here as `sklearn.datasets.load_digits` does, from the bytes whose sha256 was checked
(`sources.read_installed`), rather than letting scikit-learn read the file again unchecked.
"""

from __future__ import annotations

import gzip
import io

import numpy as np

from .. import sources
from .splits import Splits, split_arrays


def build_uci_digits() -> Splits:
    """scikit-learn's digits.csv.gz (64 pixels at levels 0..16, then the digit, per row)."""
    raw = sources.read_installed("sklearn/datasets/data/digits.csv.gz")
    data = np.loadtxt(io.StringIO(gzip.decompress(raw).decode("utf-8")), delimiter=",")
    images = np.round(data[:, :-1].reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)  # levels 0..16 -> 0..255
    return split_arrays(images, data[:, -1].astype(np.int64), (0.6, 0.2, 0.2))
