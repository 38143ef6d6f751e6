"""How alike two tasks are: at the data level and at the adapter level, per pair of tasks.

- `frechet`: Fréchet distance between the base backbone's embeddings of the two tasks' images
  (the FID formula, Heusel et al. 2017, on EfficientNet features instead of Inception's):
  ||μ_a − μ_b||² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}). Larger = more dissimilar data.
- `adapter_cosine`: cosine similarity of the two adapters' flattened updates (all layers).
- `subspace_alignment`: share of one adapter's update energy that lies in the top-r left singular
  directions of the other's, per layer, pooled over layers, averaged over both directions
  (in the spirit of the subspace-overlap analyses of Stoica et al. 2025, KnOTS).
- `gradient_alignment`: cosine of the two tasks' loss gradients with respect to the adapted layers' weights,
  taken at the base backbone (ΔW = 0) with each adapter's own head on GRADIENT_IMAGES validation images of its
  task: whether the two tasks pull the shared weights the same way ("Demystifying Mergeability", Zhou et al.
  2026, arXiv 2601.22285, finds gradient alignment the most consistent pairwise signal of merge success). At the
  base, one gradient per adapter serves every pair (N backward passes, not N(N-1)/2 merges); the paper's own
  variants differ in where the gradients are taken.

`SimilarityStage` is run_all's step that measures them for every pair of the study's tasks and seed (part of
`--stages findings`, before the findings that read them): a step of its own because it loads a backbone and
extracts image features, which the findings never do.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from merging.deltas import AdapterDeltas, load_deltas
from mlvision.backbone import create_backbone, make_preprocess
from mlvision.config import StudyConfig
from mlvision.data import split_tensors
from mlvision.evaluation import FoldedBackbone, extract_features, prepared_copy
from mlvision.runs import resolve_stored_path, study_run_id
from mlvision.store import Store, insert_row, now

MEASURES = ("frechet", "adapter_cosine", "subspace_alignment", "gradient_alignment")
GRADIENT_IMAGES = 64  # validation images per task for `gradient_alignment` (one batch)


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


def loss_gradient(folded: FoldedBackbone, adapter: AdapterDeltas, images: torch.Tensor, labels: torch.Tensor):
    """d(cross-entropy of the adapter's head on `images`)/dΔW at ΔW = 0, over the adapter's layers, flattened."""
    zeros = {layer: torch.zeros_like(delta, requires_grad=True) for layer, delta in sorted(adapter.deltas.items())}
    features = functional_call(folded.prepared, folded.weights_with(zeros), (images.to(folded.device),))
    head = adapter.head.to(folded.device)
    loss = torch.nn.functional.cross_entropy(head(features), labels.to(folded.device))
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(zeros.values()))]).double().cpu()


def gradient_alignment(gradient_a: torch.Tensor, gradient_b: torch.Tensor) -> float:
    return float(gradient_a @ gradient_b / (gradient_a.norm() * gradient_b.norm()))


def pairs(tasks) -> list[tuple[str, str]]:
    return list(itertools.combinations(sorted(tasks), 2))


class SimilarityStage:
    def __init__(self, config: StudyConfig, store: Store, device: str = "cpu"):
        """`device`: where the image features are computed (run_all passes its process's)."""
        self.config, self.store, self.device = config, store, device
        self.run_id = study_run_id(config)

    def run(self) -> dict:
        """Store each (pair, measure, seed) not stored yet; returns {"pairs": how many (pair, seed)s were measured}.
        Nothing to do loads nothing: a study already stored never loads the backbone."""
        stored = {tuple(r) for r in self.store.query("SELECT task_a, task_b, measure, seed FROM similarities")}
        todo = [
            (a, b, seed)
            for a, b in pairs(self.config.tasks)
            for seed in self.config.seeds
            if any((a, b, m, seed) not in stored for m in MEASURES)
        ]
        if not todo:
            return {"pairs": 0}
        backbone = create_backbone(self.config.backbone_config)
        preprocess = make_preprocess(self.config.backbone_config, backbone)
        fast_backbone = prepared_copy(backbone)
        features = {
            t: extract_features(
                fast_backbone, split_tensors(t, "test", preprocess, self.config.merge_eval)[0], device=self.device
            )
            for t in self.config.tasks
        }
        adapters = {}
        for task in self.config.tasks:
            for seed in self.config.seeds:
                path = self.store.query(
                    "SELECT path FROM models WHERE model_id = ?", [self.config.model_id("adapter", task, seed)]
                )
                adapters[(task, seed)] = load_deltas(resolve_stored_path(path[0][0])) if path else None
        gradients = self.gradients(adapters, preprocess) if any(a is not None for a in adapters.values()) else {}
        config = {
            "backbone": self.config.backbone_config.to_dict(),
            "frechet_images_per_task": self.config.merge_eval,
            "gradient_images_per_task": GRADIENT_IMAGES,
        }
        frechet = {}  # data-level: depends on the pair only, not on the seed
        for a, b, seed in tqdm(todo, desc="similarity", unit="pair"):
            if (a, b) not in frechet:
                frechet[(a, b)] = frechet_distance(features[a], features[b])
            values = {"frechet": frechet[(a, b)]}
            if adapters[(a, seed)] is not None and adapters[(b, seed)] is not None:
                values["adapter_cosine"] = adapter_cosine(adapters[(a, seed)], adapters[(b, seed)])
                values["subspace_alignment"] = subspace_alignment(adapters[(a, seed)], adapters[(b, seed)])
                values["gradient_alignment"] = gradient_alignment(gradients[(a, seed)], gradients[(b, seed)])
            with self.store.write() as con:
                for measure, value in values.items():
                    insert_row(
                        con,
                        "similarities",
                        {
                            "task_a": a,
                            "task_b": b,
                            "measure": measure,
                            "value": value,
                            "seed": seed,
                            "config": config,
                            "run_id": self.run_id,
                            "created_at": now(),
                        },
                        key=("task_a", "task_b", "measure", "seed"),
                    )
        return {"pairs": len(todo)}

    def gradients(self, adapters: dict, preprocess) -> dict[tuple[str, int], torch.Tensor]:
        """Each adapter's loss gradient at the base backbone (`loss_gradient`), one backward pass each."""
        folded = FoldedBackbone(self.config.backbone_config, fast=False, device=self.device)
        out = {}
        for (task, seed), adapter in tqdm(adapters.items(), desc="loss gradients", unit="adapter"):
            if adapter is not None:
                images, labels = split_tensors(task, "validation", preprocess, GRADIENT_IMAGES)
                out[(task, seed)] = loss_gradient(folded, adapter, images, labels)
        return out
