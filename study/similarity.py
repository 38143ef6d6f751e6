"""How alike two tasks are: at the data level and at the adapter level, per pair of tasks.

- `frechet`: Fréchet distance between the base backbone's embeddings of the two tasks' images
  (the FID formula, Heusel et al. 2017, on EfficientNet features instead of Inception's):
  ||μ_a − μ_b||² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}). Larger = more dissimilar data.
- `adapter_cosine`: cosine similarity of the two adapters' flattened updates (all layers).
- `subspace_alignment`: share of one adapter's update energy that lies in the top-r left singular
  directions of the other's, per layer, pooled over layers, averaged over both directions
  (in the spirit of the subspace-overlap analyses of Stoica et al. 2025, KnOTS).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from merging.deltas import AdapterDeltas


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    a, b = features_a.double().numpy(), features_b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((Σ_a Σ_b)^{1/2}) = Σ sqrt(eigenvalues of Σ_a^{1/2} Σ_b Σ_a^{1/2}), a symmetric PSD matrix: stable
    # even when the covariances are singular (fewer images than feature dimensions).
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def adapter_cosine(a: AdapterDeltas, b: AdapterDeltas) -> float:
    flat_a = torch.cat([a.deltas[layer].flatten() for layer in sorted(a.deltas)]).double()
    flat_b = torch.cat([b.deltas[layer].flatten() for layer in sorted(a.deltas)]).double()
    return float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()))


def _alignment(source: AdapterDeltas, basis: AdapterDeltas, rank: int) -> float:
    inside, total = 0.0, 0.0
    for layer, delta in source.deltas.items():
        u, _, _ = torch.linalg.svd(basis.deltas[layer].double(), full_matrices=False)
        top = u[:, :rank]
        inside += float((top.T @ delta.double()).pow(2).sum())
        total += float(delta.double().pow(2).sum())
    return inside / total if total else float("nan")


def subspace_alignment(a: AdapterDeltas, b: AdapterDeltas) -> float:
    rank = max(a.meta["training"]["rank"], b.meta["training"]["rank"])
    return 0.5 * (_alignment(a, b, rank) + _alignment(b, a, rank))


def pairs(tasks) -> list[tuple[str, str]]:
    return list(itertools.combinations(sorted(tasks), 2))
