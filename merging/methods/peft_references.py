"""peft's own `add_weighted_adapter`, registered as reference methods to compare with ours.

Reference: Mangrulkar, Gugger, Debut, Belkada, Paul, Bossan, "PEFT: State-of-the-art
Parameter-Efficient Fine-Tuning methods", 2022 (github.com/huggingface/peft), `add_weighted_adapter`.

Stored under their own names (`peft_linear`, `peft_cat`, `peft_svd`, `peft_ties`). For `linear`
and `ties` peft combines the A and B factors separately, so the result is not a merge of the
weight updates (cross terms B_i A_j appear); `cat` is exact (it equals the weighted sum of the
ΔW_i); `svd` truncates the weighted sum to the largest input rank.

Hyperparameters: none are tuned (untuned: the sweep scores them on validation at their single
setting, so every merge has the same selection record). Weights are 1/k for linear, cat and svd (comparable to the plain
mean) and 1 for ties (comparable to TIES with λ = 1); ties density 0.2 as in the TIES paper. These
fixed settings are each method's `options`; merging/peft_reference.py runs them.
"""

from __future__ import annotations

from ._base import MergeMethod, MethodKind

_PAPER = (
    "Mangrulkar, Gugger, Debut, Belkada, Paul, Bossan, 'PEFT: State-of-the-art Parameter-Efficient "
    "Fine-Tuning methods' (huggingface/peft, add_weighted_adapter), 2022; not a paper, no arXiv id"
)


def _reference(combination_type: str, description: str, **options) -> MergeMethod:
    return MergeMethod(
        name=f"peft_{combination_type}",
        fn=None,
        paper=_PAPER,
        defaults={},
        ranges={},
        description=description,
        kind=MethodKind.REFERENCE,
        options={"combination_type": combination_type, **options},
        servable=False,  # for comparison in the study; the demo serves this project's methods
    )


METHODS = [
    _reference("linear", "peft add_weighted_adapter 'linear': weighted sum of A and of B factors (1/k each)."),
    _reference("cat", "peft add_weighted_adapter 'cat': factors concatenated, exactly the mean of the ΔW."),
    _reference("svd", "peft add_weighted_adapter 'svd': mean ΔW truncated by SVD to the largest rank."),
    _reference("ties", "peft add_weighted_adapter 'ties' on the factors, density 0.2, weights 1.", density=0.2),
]
