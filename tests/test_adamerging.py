"""Layer-wise AdaMerging on the project's real backbone (EfficientNet-Lite0, real weights, BatchNorm folded).

The updates, heads and images are small and seeded (three adapted layers, three tasks, 32 px), so the
tests run in seconds; what they check is the method's machinery: the merge formula, the
differentiable forward against `FoldedBackbone.fold`, the learning itself, determinism and that the
shared backbone is left untouched.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merging.adamerging import entropy_objective, layerwise_merge, learn_coefficients, softmax_entropy
from merging.methods._base import StartsFrom
from merging.methods.adamerging import METHOD
from merging.methods.task_arithmetic import METHOD as TASK_ARITHMETIC
from mlvision.backbone import BackboneConfig
from mlvision.evaluation import FoldedBackbone

LAYERS = ["blocks.1.0.conv_pw", "blocks.4.0.conv_pwl", "conv_head"]
TASKS = 3
IMAGES = 8  # per task
HEAD_SCALE = 3.0  # head weights ~ N(0, 3²): at init the mean entropy is about a third of log 5


@pytest.fixture(scope="module")
def setup():
    folded = FoldedBackbone(BackboneConfig(image_size=32))
    model = folded.prepared.model
    generator = torch.Generator().manual_seed(0)
    deltas = []  # rank-4 updates of a third of each layer's (unfolded) weight norm
    for _ in range(TASKS):
        adapter = {}
        for layer in LAYERS:
            weight = model.get_submodule(layer).weight.detach().flatten(1) / folded._scales[layer][:, None]
            update = torch.randn(weight.shape[0], 4, generator=generator) @ torch.randn(
                4, weight.shape[1], generator=generator
            )
            adapter[layer] = update * (weight.norm() / update.norm() / 3)
        deltas.append(adapter)
    heads = []  # the features are small: heads with large weights give informative (not uniform) outputs
    for _ in range(TASKS):
        head = nn.Linear(model.num_features, 5)
        with torch.no_grad():
            head.weight.copy_(HEAD_SCALE * torch.randn(head.weight.shape, generator=generator))
            head.bias.zero_()
        heads.append(head)
    images = [torch.randn(IMAGES, 3, 32, 32, generator=generator) for _ in range(TASKS)]
    return folded, deltas, heads, images


def _args(**overrides) -> dict:
    return {**METHOD.defaults, "steps": 4, "lr": 0.02, "batch_size": IMAGES, **overrides}


def test_layerwise_merge_is_the_coefficient_weighted_sum_per_layer():
    x = {"a": torch.tensor([[1.0, 2.0]], dtype=torch.float64), "b": torch.tensor([[3.0]], dtype=torch.float64)}
    y = {"a": torch.tensor([[10.0, -1.0]], dtype=torch.float64), "b": torch.tensor([[5.0]], dtype=torch.float64)}
    coefficients = torch.tensor([[0.5, 0.25], [0.1, 1.0]])
    merged = layerwise_merge([x, y], coefficients, ["a", "b"])
    assert torch.allclose(merged["a"], torch.tensor([[0.5 + 1.0, 1.0 - 0.1]], dtype=torch.float64))
    assert torch.allclose(merged["b"], torch.tensor([[0.75 + 5.0]], dtype=torch.float64))
    assert merged["a"].dtype == merged["b"].dtype == torch.float64  # the updates' dtype
    assert torch.equal(x["a"], torch.tensor([[1.0, 2.0]], dtype=torch.float64))  # inputs untouched


def test_the_record_is_an_untuned_transductive_method_starting_from_task_arithmetic():
    assert METHOD.kind == "test_time" and METHOD.fn is None and not METHOD.tuned
    assert METHOD.transductive and METHOD.uses_data and METHOD.servable and not METHOD.per_layer
    assert METHOD.starts_from == StartsFrom(method="task_arithmetic", chosen="scaling", sets="init")
    assert METHOD.rebuilt_from == "coefficients" and set(METHOD.recorded_outputs) == {
        "coefficients",
        "mean_coefficient_per_task",
    }
    assert METHOD.defaults["init"] == TASK_ARITHMETIC.defaults["scaling"]
    assert METHOD.validate({}) == METHOD.defaults
    assert METHOD.study_subset == {"k": (2, 6), "seeds": (0,)}


def test_no_steps_is_task_arithmetic_at_init_and_the_forward_matches_fold(setup):
    folded, deltas, heads, images = setup
    init = METHOD.defaults["init"]
    coefficients = learn_coefficients(folded, deltas, heads, images, **_args(steps=0))
    assert torch.equal(coefficients, torch.full((TASKS, len(LAYERS)), init))
    merged = layerwise_merge(deltas, coefficients, LAYERS)
    for layer in LAYERS:
        expected = TASK_ARITHMETIC([d[layer] for d in deltas], scaling=init)
        assert torch.allclose(merged[layer], expected, atol=1e-6)
    # the differentiable forward (functional_call) computes what folding the merge in place does
    model = folded.model(merged, {str(i): head for i, head in enumerate(heads)})
    with torch.no_grad():
        folded_objective = sum(float(softmax_entropy(model(x)[str(i)]).mean()) for i, x in enumerate(images))
    folded.fold({})
    assert entropy_objective(folded, deltas, heads, images, coefficients) == pytest.approx(folded_objective, abs=1e-4)


def test_learning_lowers_the_entropy_on_its_images_and_leaves_the_backbone_at_base(setup):
    folded, deltas, heads, images = setup
    folded.fold({})
    coefficients = learn_coefficients(folded, deltas, heads, images, **_args())
    start = torch.full_like(coefficients, METHOD.defaults["init"])
    assert not torch.equal(coefficients, start)
    before = entropy_objective(folded, deltas, heads, images, start)
    after = entropy_objective(folded, deltas, heads, images, coefficients)
    assert after < before - 1e-3
    base = folded._base
    assert all(torch.equal(p, base[name]) for name, p in folded.prepared.model.named_parameters())


def test_the_same_seed_gives_the_same_coefficients(setup):
    folded, deltas, heads, images = setup
    args = _args(steps=3, batch_size=4)  # batches are a sample: the seed matters
    first = learn_coefficients(folded, deltas, heads, images, **args)
    again = learn_coefficients(folded, deltas, heads, images, **args)
    other = learn_coefficients(folded, deltas, heads, images, **{**args, "seed": 1})
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_coefficients_stay_in_the_unit_interval(setup):
    folded, deltas, heads, images = setup
    coefficients = learn_coefficients(folded, deltas, heads, images, **_args(steps=3, lr=0.5))
    assert coefficients.shape == (TASKS, len(LAYERS))
    assert float(coefficients.min()) >= 0.0 and float(coefficients.max()) <= 1.0
    assert bool(((coefficients == 0.0) | (coefficients == 1.0)).any())  # lr 0.5 pushes some to a bound


def test_a_merge_rebuilt_from_its_stored_coefficients_is_the_learned_merge(setup, tmp_path):
    """What the sweep stores for an AdaMerging merge (its hyperparameters with every learned coefficient per layer,
    as JSON) rebuilds exactly the learned ΔW without learning again: the demo serves stored merges this way."""
    import json

    from merging.deltas import AdapterDeltas
    from merging.merged_model import AdapterMerger

    folded, deltas, heads, images = setup
    tasks = [f"task{i}" for i in range(TASKS)]
    adapters = {
        task: AdapterDeltas(tmp_path / task, {"task": task, "backbone": {}, "preprocess": {}}, delta, head)
        for task, delta, head in zip(tasks, deltas, heads)
    }
    merger = AdapterMerger(
        adapters, BackboneConfig(image_size=32), folded=folded, unlabeled_for=dict(zip(tasks, images)).get
    )
    learned, params = merger.merge(tasks, "adamerging", _args(steps=3))
    stored = json.loads(json.dumps(params))  # as merges.hyperparams holds it
    assert set(stored["coefficients"]) == set(LAYERS) and all(len(v) == TASKS for v in stored["coefficients"].values())
    rebuilt, again = AdapterMerger(adapters, BackboneConfig(image_size=32)).merge(tasks, "adamerging", stored)
    assert all(torch.equal(rebuilt[layer], learned[layer]) for layer in LAYERS)
    assert again["coefficients"] == stored["coefficients"]
