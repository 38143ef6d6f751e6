"""AdaMerging (layer-wise): merge coefficients per task and layer, learned on unlabeled test images.

Paper: Yang, Wang, Shen, Liu, Guo, Wang, Tao, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", ICLR 2024 (arXiv 2310.02575); reference code github.com/EnnengYang/AdaMerging
(src/main_layer_wise_adamerging.py). The code is in merging/adamerging.py.

Algorithm: ΔW_l = Σ_i λ[i, l] ΔW_{i,l}: task arithmetic with one coefficient per (task, adapted
layer) instead of one λ. The coefficients start at `init` and are optimised with Adam to minimise
Σ_i mean Shannon entropy of task i's head's softmax on a batch of task i's unlabeled images (the
images go through the merged backbone and only their own task's head); the coefficients used are
clamped to [0, 1] (the reference clamps them on use, not by a projection after each step). The
merge runs through the whole model, so there is no per-layer function (kind "test_time": `learn`;
merging/merged_model.AdapterMerger runs it). A merge records its coefficients, and is rebuilt from
them without learning again (`rebuilt_from`, `rebuild`: how the demo and the merge CLI's --from-db
serve a stored merge).

TRANSDUCTIVE: the coefficients are learned on the test images of the group's tasks, without their
labels (as in the paper, whose reference code draws its batches from each task's test loader). The
merged model is then scored on the same images. The other methods never see test images before
scoring, so AdaMerging's scores are not comparable with theirs on an equal footing: it has seen
the inputs it is graded on.

Hyperparameters:
  init: default 0.3, range [0, 1] — task arithmetic's default λ (merging/methods/task_arithmetic.py);
    the paper's "prior" is 0.3 too, so with steps = 0 AdaMerging is task arithmetic at its default.
    The study's sweep starts each merge from task arithmetic's λ chosen on validation for the same
    group and seed instead (`starts_from`, merging/sweep.py), so AdaMerging refines the tuned baseline it is
    compared with; the stored hyperparameters hold the init used.
  lr: default 1e-3, range (0, 1] — the paper's and the reference's Adam learning rate (betas
    (0.9, 0.999), no weight decay).
  steps: default 50, integer in [0, 10000] — the paper runs 500; 50 here so that one k = 6 merge
    of the default backbone (EfficientNet-Lite0, 48 px) learns in about 20-35 s on one CPU thread
    (22-34 s measured on the shared 2-core machine; k = 2 about 12 s). At lr 1e-3 a coefficient
    moves at most about 0.05 in 50 steps (Adam's step is about lr; measured at k = 6: 0.25-0.35),
    a tenth of the paper's reach, so the merge stays near task arithmetic's. Keeping the paper's
    lr x steps instead (lr 1e-2) was tried once (k = 6, seed 0): the entropy fell much further
    (1.79 -> 0.98, against 1.62 at 1e-3) but the accuracy on those images fell by 2.4 points
    (+0.2 at 1e-3), so the paper's lr is kept.
  batch_size: default 16, integer in [1, 4096] — images per task per step, the paper's 16 (its
    reference code sums the losses of two batches of 16 per task per step).
  seed: default 0, integer >= 0 — seeds the generator that draws the batches (deterministic).
Validation grid: none (untuned, one setting: the paper has no validation search; the sweep still
  scores the merge on validation). Costly (a forward and backward pass of k x 16 images per step),
  so the study runs it on part of the sweep only (`study_subset`: k in {2, 6}, seed 0).
"""

from __future__ import annotations

from ._base import STUDY_SUBSET, MergeMethod, MethodKind, StartsFrom
from .task_arithmetic import METHOD as TASK_ARITHMETIC


def learn(folded, adapters, unlabeled, **hyperparams):
    """merging/adamerging.learn, imported on use (listing the methods needs no torch)."""
    from merging.adamerging import learn

    return learn(folded, adapters, unlabeled, **hyperparams)


def rebuild(adapters, coefficients):
    """merging/adamerging.rebuild, imported on use."""
    from merging.adamerging import rebuild

    return rebuild(adapters, coefficients)


METHOD = MergeMethod(
    name="adamerging",
    fn=None,
    kind=MethodKind.TEST_TIME,
    learn=learn,
    # the mean coefficient per task (shown), and every coefficient per layer: the merge is rebuilt from those
    recorded_outputs=("mean_coefficient_per_task", "coefficients"),
    rebuilt_from="coefficients",
    rebuild=rebuild,
    starts_from=StartsFrom(method="task_arithmetic", chosen="scaling", sets="init"),
    paper=(
        "Yang, Wang, Shen, Liu, Guo, Wang, Tao, 'AdaMerging: Adaptive Model Merging for Multi-Task "
        "Learning', ICLR 2024, arXiv:2310.02575"
    ),
    defaults={
        "init": TASK_ARITHMETIC.defaults["scaling"],
        "lr": 1e-3,
        "steps": 50,
        "batch_size": 16,
        "seed": 0,
    },
    ranges={
        "init": (0.0, 1.0, "[]"),
        "lr": (0.0, 1.0, "(]"),
        "steps": (0, 10_000, "[]"),
        "batch_size": (1, 4096, "[]"),
        "seed": (0, 2**63 - 1, "[]"),
    },
    description=(
        "Layer-wise AdaMerging: λ per task and layer, learned by minimising prediction entropy on the "
        "unlabeled test images (transductive)."
    ),
    grid={},
    default_source=(
        "init 0.3: task arithmetic's default λ (the paper's prior 0.3); lr 1e-3 and batch 16: Yang et al. "
        "2024 and their code; steps 50 (paper 500): about 20-35 s for k = 6 on one CPU thread"
    ),
    study_subset=STUDY_SUBSET,
)
