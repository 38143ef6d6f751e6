"""Task splits as preprocessed tensors, the form training and evaluation consume.

Each split is preprocessed once per process (images -> [n, 3, S, S] float tensor) and reused by
every model that needs it: the head baseline, each seed's adapter, every merge evaluation.
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
