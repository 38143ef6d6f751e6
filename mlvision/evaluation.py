"""The one evaluation path: a backbone prepared for inference, its weights swapped per merge, batched predictions.

Everything that scores a model goes through here: the merge sweep (merged models, the single-adapter
and head baselines, validation selection), the training stage's adapter scores, the findings'
embeddings, the merge CLI and the demo. A merged backbone is an inference-only model, so it is
prepared once for speed (`prepare_for_inference`):

- BatchNorm is folded into the convolution before it: BN(conv(x)) = conv'(x) with
  W' = s ⊙ W and b' = s ⊙ (b - μ) + β, s = γ / sqrt(σ² + ε) per output channel; computed in float64.
- timm's `Conv2dSame` (TensorFlow "same" padding: a padded copy of the input before each strided
  convolution) becomes one convolution with a shifted kernel (`_SamePaddingConv`), bit-identical.
- Activations run in `channels_last` memory order (NHWC), which PyTorch's CPU convolutions prefer.
- Optionally (`MLV_EVAL_COMPILE=1`) `torch.compile`: worth its compile time only for long sweeps.

Measured on the default backbone at 48 px, batch 256, on 2 cores, in one-off interleaved loops (the
benchmark section `evaluation` stores the combined speed-up): folding alone 1.0-1.3x, channels_last
alone 1.5-1.7x, both 2.1-2.4x the eager throughput, the padding-free convolution 1.2x more.
torch.compile added about 1.2x on a fixed batch shape after 20-40 s of compilation, but in the sweep
(batches of many shapes) it recompiled and made a merge 1.7x slower, so it is off unless asked for.

A merge changes only the adapted layers' weights, once per merge: `FoldedBackbone.fold` writes
base + ΔW in place, and for a layer whose BatchNorm was folded, s ⊙ (W + ΔW) = W' + s ⊙ ΔW, so the
folded base weights and the scales are kept and nothing is re-traced, re-folded or re-compiled.

Exactness: the fast path computes the same function in another order, so logits differ from the
eager model's by float32 rounding. `python -m benchmarks.exactness` checks the argmax is the same on
every test image of every task and the logits agree within `LOGIT_TOLERANCE`; tests/test_evaluation.py
checks the same on 400 test images per task.

Why by hand: torch's fusion helpers (`torch.fx.experimental.optimization.fuse`,
`torch.ao.quantization.fuse_modules`) match only plain `BatchNorm2d`, while timm's EfficientNets use
`BatchNormAct2d` (BatchNorm and activation in one module), and they rebuild the model as an fx
GraphModule, which renames the layers the ΔW of a merge are keyed by. Here the model is traced only
to find which convolution feeds which BatchNorm; the modules stay where they are, under their names.
"""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import torch
import torch.fx
from torch import nn

from mlvision.backbone import BackboneConfig, create_backbone
from mlvision.models import MultiTaskModel

LOGIT_TOLERANCE = 1e-3  # max |fast - eager| logit difference the exactness checks allow (measured: <= 9e-5)
EVAL_BATCH_SIZE = 256  # images per forward pass when scoring (the fast path is as fast at 64; eager is not)
COMPILE_ENV = "MLV_EVAL_COMPILE"  # "1": torch.compile the prepared backbone (falls back with one line)


def _note(message: str) -> None:
    print(f"evaluation: {message}", file=sys.stderr)


class _ConvBatchNormTracer(torch.fx.Tracer):
    """Traces a model down to its convolutions and BatchNorms (kept whole, so they can be looked up by name)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(module, qualified_name)


def _after_normalisation(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What a BatchNorm does after normalising (to keep once it is folded), or None if it is not known.

    A plain BatchNorm2d does nothing more; timm's BatchNormAct2d applies its `drop` and `act`.
    Any other subclass might do more, so it is not folded."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        return nn.Sequential(bn.drop, bn.act)
    return None


def _is_timm_same_conv(module: nn.Module) -> bool:
    """timm's Conv2dSame: a convolution that pads its input itself ("same" padding, TensorFlow style)."""
    return type(module).__name__ == "Conv2dSame" and type(module).__module__.startswith("timm.")


def _foldable_conv(module: nn.Module) -> bool:
    """A convolution whose output is linear in its weight and adds its bias: plain, or timm's padded Conv2dSame.

    Other subclasses may transform the weight first (timm's StdConv2d standardises it, which would
    undo a folded scale), so they are left alone."""
    return type(module) is nn.Conv2d or _is_timm_same_conv(module)


def conv_batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names where the BatchNorm is the convolution's only consumer."""
    graph = _ConvBatchNormTracer().trace(model)
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and _foldable_conv(modules[source.target])
            and len(source.users) == 1
            and modules[node.target].track_running_stats
            and _after_normalisation(modules[node.target]) is not None
        ):
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fold every BatchNorm into the convolution feeding it, in place; returns each folded conv's scale s.

    The model must be in eval mode (running statistics). Raises if the model cannot be traced."""
    scales = {}
    if not any(isinstance(module, nn.BatchNorm2d) for module in model.modules()):
        return scales  # nothing to fold (a ViT): no trace needed, and some models (transformers') cannot be traced
    for conv_name, bn_name in conv_batchnorm_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        conv.weight.copy_((conv.weight.double() * scale.reshape(-1, *[1] * (conv.weight.dim() - 1))).float())
        conv.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + bn.bias.double()).float())
        parent_name, _, attribute = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, _after_normalisation(bn))
        scales[conv_name] = scale.float()
    return scales


class _SamePaddingConv(nn.Module):
    """timm's Conv2dSame (TensorFlow's "same" padding) without copying its input into a padded tensor.

    Conv2dSame pads each input with `F.pad` before convolving: at a stride of 2 and an even input
    size the padding is one-sided (0 before, 1 after), which `conv2d` cannot do itself, and the copy
    took 17 % of a forward pass here. One-sided padding p, p+1 is the same as symmetric padding p+1
    with the kernel shifted by one tap (a zero row and column in front): out[i] = Σ_q w[q]·x[s·i + q - p]
    either way. So this convolves with that kernel, built from the (shared) weight on each call, and
    is bit-identical to Conv2dSame; symmetric cases use plain padding. Measured: 1.2x the forward's speed.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias  # the same Parameters: merges update them by name
        self.kernel_size, self.stride, self.dilation, self.groups = (
            conv.kernel_size,
            conv.stride,
            conv.dilation,
            conv.groups,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = [
            max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            for size, kernel, stride, dilation in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)
        ]  # total "same" padding per axis (timm puts the odd extra one after)
        weight = self.weight
        if pads[0] % 2 or pads[1] % 2:
            weight = torch.nn.functional.pad(weight, (pads[1] % 2, 0, pads[0] % 2, 0))
        padding = ((pads[0] + 1) // 2, (pads[1] + 1) // 2)
        return torch.nn.functional.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


def _replace_same_padding_convs(model: nn.Module) -> None:
    """Swap every timm Conv2dSame of dilation 1 (the shifted kernel assumes one-pixel taps) for `_SamePaddingConv`."""
    for name, module in list(model.named_modules()):
        if _is_timm_same_conv(module) and module.dilation == (1, 1):
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, _SamePaddingConv(module))


class InferenceBackbone(nn.Module):
    """A prepared backbone: feeds its model channels_last input (a no-op for models without convolutions)."""

    def __init__(self, model: nn.Module, channels_last: bool):
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.num_features = getattr(model, "num_features", None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def prepare_for_inference(model: nn.Module, fast: bool = True) -> tuple[InferenceBackbone, dict[str, torch.Tensor]]:
    """`model` (changed in place: pass a copy to keep it) made fast for inference; also the folded scales.

    `fast=False` leaves it eager (the reference the fast path is tested and benchmarked against).
    A model whose graph cannot be traced is used unfolded, with one line saying why."""
    model.eval()
    if not fast:
        return InferenceBackbone(model, channels_last=False), {}
    try:
        scales = fold_batchnorm(model)
    except Exception as error:  # an unusual backbone (dynamic control flow): correct, just slower
        _note(f"BatchNorm left unfolded ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
        scales = {}
    _replace_same_padding_convs(model)
    channels_last = _has_conv(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return InferenceBackbone(model, channels_last), scales


def compile_requested() -> bool:
    return os.environ.get(COMPILE_ENV, "0") == "1"


class _CompiledOrEager(nn.Module):
    """`torch.compile` of a prepared backbone, falling back to it, with one line, where compiling fails.

    The parameters are the prepared backbone's own tensors, updated in place per merge, so the
    compiled graph reads the new weights without being rebuilt."""

    def __init__(self, backbone: InferenceBackbone):
        super().__init__()
        self.backbone = backbone
        self.num_features = backbone.num_features
        self._compiled = torch.compile(backbone)
        self._failed = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self._failed:
            try:
                return self._compiled(images)
            except Exception as error:  # no C compiler, an unsupported operator, ...
                self._failed = True
                _note(f"torch.compile unavailable ({type(error).__name__}), evaluating without it")
        return self.backbone(images)


class FoldedBackbone:
    """One base backbone, prepared once, whose weights are set to base + ΔW for each merge (no rebuild per merge)."""

    def __init__(
        self,
        config: BackboneConfig,
        fast: bool = True,
        device: torch.device | str = "cpu",
        compile: bool | None = None,
    ):
        self.config = config
        self.device = torch.device(device)
        backbone, self._scales = prepare_for_inference(create_backbone(config), fast)
        self.prepared = backbone.to(device)
        self._base = {name: p.detach().clone() for name, p in self.prepared.model.named_parameters()}
        use_compile = compile_requested() if compile is None else compile
        self.backbone: nn.Module = _CompiledOrEager(self.prepared) if fast and use_compile else self.prepared

    @torch.no_grad()
    def fold(self, merged: dict[str, torch.Tensor]) -> nn.Module:
        """Set the weights to base + ΔW for the layers in `merged`, base elsewhere; returns the backbone.

        ΔW is given per layer as [out, in] (or the weight's own shape); a folded layer gets s ⊙ ΔW."""
        model = self.prepared.model
        for name, parameter in model.named_parameters():
            parameter.copy_(self._base[name])
        for layer, delta in merged.items():
            weight = model.get_submodule(layer).weight
            delta = delta.to(weight.device, weight.dtype).reshape(weight.shape)
            if layer in self._scales:
                delta = delta * self._scales[layer].to(weight.device).reshape(-1, *[1] * (weight.dim() - 1))
            weight.add_(delta)
        return self.backbone

    def weights_with(self, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every parameter of `self.prepared` (keys as `torch.func.functional_call` takes them) as base + ΔW for the
        layers in `merged`, built out of place, so a ΔW that requires grad gets its gradient through a forward of
        `functional_call(self.prepared, weights, (images,))`; the live weights are not touched."""
        weights = {f"model.{name}": weight for name, weight in self._base.items()}
        for layer, delta in merged.items():
            key = f"model.{layer}.weight"
            delta = delta.to(weights[key].device, weights[key].dtype).reshape(weights[key].shape)
            if layer in self._scales:  # the same scaling as `fold`
                delta = delta * self._scales[layer].to(delta.device).reshape(-1, *[1] * (delta.dim() - 1))
            weights[key] = weights[key] + delta
        return weights

    def model(self, merged: dict[str, torch.Tensor], heads: dict[str, nn.Linear]) -> nn.Module:
        """The shared backbone with `merged` folded in, plus `heads` (moved to the backbone's device): valid until
        the next `fold`."""
        return MultiTaskModel(self.fold(merged), heads).eval().to(self.device)

    def standalone(self, merged: dict[str, torch.Tensor]) -> nn.Module:
        """A copy of the backbone with `merged` folded in, which later folds do not change."""
        self.fold(merged)
        return copy.deepcopy(self.prepared)


def prepared_copy(model: nn.Module, fast: bool = True) -> InferenceBackbone:
    """A fast copy of any backbone (e.g. a just-trained peft model with its adapter merged in)."""
    return prepare_for_inference(copy.deepcopy(model), fast)[0]


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, torch.Tensor]:
    """Predicted class indices per task for a tensor of preprocessed images (on the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    outputs: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        for task, logits in model(images[start : start + batch_size].to(device)).items():
            outputs.setdefault(task, []).append(logits.argmax(-1).cpu())
    return {task: torch.cat(parts) for task, parts in outputs.items()}


def accuracy(model: nn.Module, task: str, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of `images` whose prediction for `task` equals `labels`."""
    return float((predict(model, images)[task] == labels).float().mean())


def task_correct(
    model: nn.Module, data: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int = EVAL_BATCH_SIZE
) -> dict[str, np.ndarray]:
    """Which of each task's own images a multi-task model gets right: {task: bool array, in image order}.

    The per-image outcomes behind `task_accuracies`, kept for paired tests (McNemar) on the same images.
    Every task's images go through in one stream of full batches (a merged model answers every task
    in each pass anyway), so a merge of k tasks costs ceil(k·n / batch) passes, not k·ceil(n / batch)
    with a small last batch per task."""
    tasks = list(data)
    predictions = predict(model, torch.cat([data[task][0] for task in tasks]), batch_size)
    correct, start = {}, 0
    for task in tasks:
        labels = data[task][1]
        correct[task] = (predictions[task][start : start + len(labels)] == labels).numpy().astype(bool)
        start += len(labels)
    return correct


def accuracy_of(correct: np.ndarray) -> float:
    """The share of True in a `task_correct` array (the figure `task_accuracies` reports)."""
    return float(torch.from_numpy(np.asarray(correct, dtype=bool)).float().mean())


def task_accuracies(
    model: nn.Module, data: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int = EVAL_BATCH_SIZE
) -> dict[str, float]:
    """Accuracy of a multi-task model on each task's own (images, labels): the mean of `task_correct`."""
    return {task: accuracy_of(correct) for task, correct in task_correct(model, data, batch_size).items()}


@torch.inference_mode()
def extract_features(
    backbone: nn.Module, images: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Backbone features for a tensor of images, computed on `device`, returned on the CPU.

    Pass a prepared backbone (`FoldedBackbone(...).fold({})`, `prepared_copy`) for speed; the
    training stage passes the eager one, so the heads it trains see the features they always saw."""
    backbone.eval().to(device)
    return torch.cat([backbone(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


@torch.inference_mode()
def extract_multilayer_features(
    backbone: nn.Module, images: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Every stage's feature map pooled (global average and global max per channel) beside the backbone's own pooled
    features, in one pass per batch: [n, d] float32 on the CPU. The multi-layer linear probe reads these
    (training/probe.py); timm's `forward_intermediates` gives the stages' outputs of any timm backbone (the
    EfficientNets' five stages, a ViT's blocks as NCHW maps)."""
    backbone.eval().to(device)
    out = []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size].to(device)
        _, stages = backbone.forward_intermediates(batch)
        pooled = [part for stage in stages for part in (stage.mean((2, 3)), stage.amax((2, 3)))]
        out.append(torch.cat([*pooled, backbone(batch)], dim=1).float().cpu())
    return torch.cat(out).numpy()
