"""Task splits in the two forms training and evaluation consume: preprocessed tensors, or images streamed.

`split_tensors` preprocesses a split once per process (images -> [n, 3, S, S] float tensor) and reuses it for
every model that needs it (each merge evaluation of the sweep scores the same few hundred images many times).
`split_images`, which the training stage uses, gives the same images, as that tensor when it is small and
otherwise as a `LazyImages`, which decodes and preprocesses only the rows asked for, so memory does not grow
with the dataset (a 5,000-image split at 224 px is 3 GB as one float tensor). Both give the same pixels for a row.
Subsets are chosen with a fixed seed that does not depend on the training seed, so every model
of a task is scored on the very same test images (and `n` is stored with every accuracy).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from mlvision.backbone import Preprocess
from mlvision.tasks import load_task

SUBSET_SEED = 1234  # fixed: the evaluation subset must be the same for every model and run


def subset_indices(n_available: int, max_n: int | None) -> np.ndarray:
    """Indices of a fixed random subset (all of them, in order, when max_n covers the split)."""
    if max_n is None or max_n >= n_available:
        return np.arange(n_available)
    rng = np.random.default_rng(SUBSET_SEED)
    return np.sort(rng.choice(n_available, size=max_n, replace=False))


@lru_cache(maxsize=64)
def split_tensors(
    task: str, split: str, preprocess: Preprocess, max_n: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [n,3,S,S] float32, labels [n] int64) for a task split, cached in memory."""
    dataset = load_task(task)[split]
    indices = subset_indices(len(dataset), max_n)
    subset = dataset.select(indices)
    images = preprocess(subset["image"])
    labels = torch.tensor(subset["label"], dtype=torch.long)
    return images, labels


class LazyImages:
    """A task split's images, preprocessed when indexed: `images[rows]` is the tensor `split_tensors` would hold
    at those rows ([len(rows), 3, S, S], the same values: preprocessing is per image and deterministic).

    Indexing takes what a tensor takes for a batch (a slice, an int, a list, a 1-D integer tensor or array), so the
    trainers and `extract_features` / `predict` use it in place of the tensor. Only the rows asked for are decoded;
    nothing is kept, so memory stays at one batch however large the split."""

    def __init__(self, dataset, preprocess: Preprocess):
        self.dataset = dataset  # a `datasets.Dataset` with an "image" column (decoded to PIL on access)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = range(*rows.indices(len(self)))
        elif isinstance(rows, int):
            return self[[rows]][0]
        rows = [int(row) for row in (rows.tolist() if hasattr(rows, "tolist") else rows)]
        return self.preprocess(self.dataset.select(rows)["image"])


# A split whose preprocessed tensor would be larger than this is streamed (`split_images`). Below it the tensor is
# kept: decoding a batch costs about what preprocessing those images once costs (~0.5 ms per 48 px image here), so a
# small split is cheaper held once than decoded at every training step; above it, memory is what runs out first.
STREAM_ABOVE_MB = 512


def split_images(
    task: str, split: str, preprocess: Preprocess, max_n: int | None
) -> tuple[torch.Tensor | LazyImages, torch.Tensor]:
    """(images, labels [n] int64) of a task split: the tensor of `split_tensors` when it would take at most
    STREAM_ABOVE_MB, else the same rows streamed as `LazyImages`. Either gives the same pixels for a row, so what is
    trained or scored does not depend on which."""
    dataset = load_task(task)[split]
    indices = subset_indices(len(dataset), max_n)
    if len(indices) * 3 * preprocess.image_size**2 * 4 <= STREAM_ABOVE_MB * 2**20:
        return split_tensors(task, split, preprocess, max_n)
    subset = dataset.select(indices)
    return LazyImages(subset, preprocess), torch.tensor(subset["label"], dtype=torch.long)
