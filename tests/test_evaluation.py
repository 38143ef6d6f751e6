"""The fast evaluation path against the eager model: same predictions on the study's real adapters and data.

The committed study's adapters (seed 0, all six tasks, real EfficientNet-Lite0 weights) are merged
and scored on real test images through `FoldedBackbone` prepared for speed (BatchNorm folded,
channels_last) and through the eager backbone; the argmax must agree on every image and the logits
within LOGIT_TOLERANCE. `python -m benchmarks.exactness` runs the same check on every test image.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.exactness import compare_fast_with_eager, study_adapters
from merging.merged_model import merge_deltas
from mlvision.backbone import BackboneConfig, create_backbone
from mlvision.evaluation import (
    LOGIT_TOLERANCE,
    FoldedBackbone,
    conv_batchnorm_pairs,
    extract_features,
    prepare_for_inference,
)

IMAGES_PER_TASK = 400  # every test image of the small tasks, the first 400 of the large ones (all: the script)


@pytest.mark.slow
def test_fast_path_predicts_what_the_eager_model_predicts_on_the_study(capsys):
    adapters = study_adapters(seed=0)
    merges = {
        "base + heads": {},
        "task arithmetic of six": merge_deltas(list(adapters.values()), "task_arithmetic"),
        **{f"adapter {task}": adapter.deltas for task, adapter in adapters.items()},
    }
    for label, merged in merges.items():
        tasks = [label.removeprefix("adapter ")] if label.startswith("adapter ") else None  # its own task
        report = compare_fast_with_eager(adapters, merged, IMAGES_PER_TASK, tasks)
        for task, (same, total, max_diff) in report.items():
            assert total > 0
            assert same == total, f"{label}, {task}: argmax differs on {total - same} of {total} images"
            assert max_diff < LOGIT_TOLERANCE, f"{label}, {task}: logits differ by {max_diff}"


def test_every_batchnorm_of_the_default_backbone_is_folded_and_weights_swap_without_leaking():
    config = BackboneConfig()
    eager = create_backbone(config)
    batchnorms = [name for name, m in eager.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(conv_batchnorm_pairs(eager)) == len(batchnorms) == 49
    folded = FoldedBackbone(config)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.prepared.modules())
    layer = "blocks.1.0.conv_pw"
    weight = eager.get_submodule(layer).weight
    delta = 0.05 * torch.randn(weight.shape[0], weight.shape[1], generator=torch.Generator().manual_seed(0))
    images = torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    reference = FoldedBackbone(config, fast=False)
    with torch.inference_mode():
        plain = folded.fold({})(images).clone()
        moved = folded.fold({layer: delta})(images).clone()
        expected = reference.fold({layer: delta})(images)
        back = folded.fold({})(images)
    assert (moved - plain).abs().max() > 1e-2  # the update changed the outputs...
    assert torch.allclose(moved, expected, atol=LOGIT_TOLERANCE)  # ...exactly as in the eager model
    assert torch.equal(back, plain)  # and the next fold starts from the base again


@pytest.mark.parametrize("size", [48, 37])  # even: one-sided "same" padding at stride 2; odd: symmetric
def test_same_padding_convolutions_are_replaced_bit_identically(size):
    eager = create_backbone(BackboneConfig())
    prepared, _ = prepare_for_inference(create_backbone(BackboneConfig()))
    same = [name for name, m in eager.named_modules() if type(m).__name__ == "Conv2dSame"]
    assert same and all(type(prepared.model.get_submodule(n)).__name__ == "_SamePaddingConv" for n in same)
    for name in same:
        conv = eager.get_submodule(name)
        images = torch.randn(2, conv.in_channels, size, size, generator=torch.Generator().manual_seed(3))
        replaced = type(prepared.model.get_submodule(name))(conv)  # the same weights, unfolded
        with torch.inference_mode():
            assert torch.equal(replaced(images), conv(images)), name


def test_a_vit_goes_through_the_fast_path_unchanged():
    config = BackboneConfig(name="vit_tiny_patch16_224", weights="random", image_size=32)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fast, eager = FoldedBackbone(config), FoldedBackbone(config, fast=False)
    delta = {"blocks.0.attn.qkv": 0.01 * torch.ones(576, 192)}
    with torch.inference_mode():
        assert torch.allclose(fast.fold(delta)(images), eager.fold(delta)(images), atol=1e-5)


class DataDependentBackbone(nn.Module):
    """A backbone torch.fx cannot trace (its control flow depends on the data)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.num_features = 4

    def forward(self, images):
        x = self.bn(self.conv(images))
        if x.sum() > 0:
            x = x * 2
        return x.mean((2, 3))


def test_an_untraceable_backbone_is_used_unfolded_with_one_line(capsys):
    model = DataDependentBackbone().eval()
    model.bn.running_mean.uniform_(-1, 1)
    images = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        expected = model(images)
        prepared, scales = prepare_for_inference(model)
        assert torch.allclose(prepared(images), expected, atol=1e-6)
    assert scales == {}
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluation: BatchNorm left unfolded")


def test_extract_features_agrees_between_the_two_paths():
    config = BackboneConfig()
    images = torch.randn(20, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    fast = extract_features(FoldedBackbone(config).fold({}), images, batch_size=8)
    eager = extract_features(create_backbone(config), images, batch_size=8)
    assert fast.shape == eager.shape == (20, 1280)
    assert torch.allclose(fast, eager, atol=LOGIT_TOLERANCE)


# ------------------------------------------------------------------ the same technique in training


def test_channels_last_training_gives_nearly_the_same_adapter_and_its_own_identity():
    from mlvision.config import StudyConfig
    from training.trainers import train_adapter

    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1] * 8)
    trained = {}
    for channels_last in (False, True):
        peft_model, head, _ = train_adapter(
            create_backbone(BackboneConfig()),
            images,
            labels,
            2,
            rank=2,
            alpha=4,
            target_modules=["conv_pw", "conv_pwl"],
            steps=3,
            batch_size=8,
            lr=1e-2,
            head_lr=1e-2,
            seed=0,
            channels_last=channels_last,
        )
        factors = {n: p.detach() for n, p in peft_model.named_parameters() if "lora_" in n}
        assert all(p.is_contiguous() for p in factors.values())  # saved and merged as usual
        trained[channels_last] = factors
    for name, value in trained[False].items():
        difference = (trained[True][name] - value).norm() / value.norm()
        assert difference < 1e-3, name  # the same maths, rounded in another order
    config = StudyConfig(merge_methods=("linear",))
    assert config.channels_last  # on by default since study v2
    off = StudyConfig(merge_methods=("linear",), channels_last=False)
    assert config.model_id("adapter", "mnist", 0) != off.model_id("adapter", "mnist", 0)
    assert "channels_last" not in off.to_dict()  # off: the identities stored before it existed stay valid


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.num_features = 4

    def forward(self, images):
        return torch.relu(self.bn(self.conv(images))).mean((2, 3))


def test_without_a_working_compiler_compile_falls_back_with_one_line(monkeypatch, capsys):
    import torch._dynamo
    import torch._inductor.config

    from mlvision.evaluation import _CompiledOrEager

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/c++"))
    torch._dynamo.reset()
    model = SmallConvNet().eval()
    images = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        expected = model(images)
        compiled = _CompiledOrEager(prepare_for_inference(model)[0])
        assert torch.allclose(compiled(images), expected, atol=1e-5)
        assert torch.allclose(compiled(images), expected, atol=1e-5)  # the second call does not try again
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("evaluation: torch.compile unavailable")
    torch._dynamo.reset()
