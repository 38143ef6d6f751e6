"""The libraries a base model of adapters from elsewhere is loaded with: timm and transformers, one object each.

Why one object per library: what differs between a peft LoRA of a timm model and one of a transformers model
(how the base loads, how an image is fed to it, how its classifier is removed and its features read, where its
folder is, how its config names the architecture, how an export of it loads and what the model card's snippet
says) was once an `if library == ...` in each of merging/foreign.py, merging/card.py and study/given.py. Here each
is one method of `TimmLibrary` or `TransformersLibrary`; `library_of(base)` decides which library a base name is,
the one place that tells them apart, and `LIBRARIES[name]` finds the object from the name an adapter's meta or a
merge.json records ("timm", "transformers"). A third library is one more subclass and one more `LIBRARIES` entry
(and a line in `library_of`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlvision.backbone import TRANSFORMERS_BASE, Preprocess, transformers_preprocess
from mlvision.errors import AdapterError, error_reason
from mlvision.models import HEAD_FILE

_TIMM_PREFIXES = ("timm/", "hf-hub:", "local-dir:")


def hub_snapshot(repo_id: str, what: str) -> Path:
    """The local folder of a Hub model repo: from the cache when it is there, else downloaded; one line if neither."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (or an odd id): the download below gives the reason worth showing
        pass
    try:
        return Path(snapshot_download(repo_id))
    except Exception as error:  # huggingface_hub raises many kinds (offline, not found, no access, bad id)
        reason = error_reason(error)
        raise AdapterError(
            f"{what} is not in the local Hugging Face cache and cannot be downloaded ({reason}): "
            "download it where there is a network (hf download REPO_ID) or pass its local folder"
        ) from None


class BaseLibrary:
    """What one library does for a base model. `name` is what metas and merge.json record; `source` is what an
    adapter of it records as its "source"."""

    name: str
    source: str
    # Whether the classifier is found by the module name peft saved it under (`head_module`): adapters of one merge
    # must then name the same module. False: the library finds it itself (timm's `get_classifier`).
    classifier_by_name: bool
    # The classifier module a study of given adapters reads (study/given.py), or None for any.
    study_classifier: str | None

    def load(self, name: str) -> torch.nn.Module:
        """The base model with its pretrained weights, in eval mode, offline first."""
        raise NotImplementedError

    def preprocess(self, name: str, model: torch.nn.Module) -> Preprocess:
        """How an image is fed to the base (resize to a square, normalise; no centre crop), as this project's
        `Preprocess`."""
        raise NotImplementedError

    def remove_classifier(self, model: torch.nn.Module, head_module: str | None) -> None:
        """Make the model return its classifier's input (the task heads read it)."""
        raise NotImplementedError

    def features(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The features of a model whose classifier was removed."""
        raise NotImplementedError

    def folder(self, name: str) -> Path:
        """The local folder of the base (a folder as named, or its Hub id's folder in the local cache)."""
        raise NotImplementedError

    def architecture(self, config: dict) -> str:
        """The architecture a base folder's config.json names."""
        raise NotImplementedError

    def backbone_spec(self, folder: Path) -> str:
        """The `BackboneConfig.base` of a study's backbone on this base folder (mlvision/backbone.py loads it)."""
        raise NotImplementedError

    def hub_repo(self, repo: str) -> str:
        """The Hub repo of a base named `repo` (a Hub id already checked)."""
        return repo

    def how_to_load(self, head_module: str | None) -> str:
        """One sentence for merge.json: how an exported folder loads with plain peft and this library."""
        raise NotImplementedError

    def loading_snippet(self, head_module: str | None) -> list[str]:
        """The model card's loading section: this library + peft + safetensors only, one backbone pass for every
        head."""
        raise NotImplementedError


# The heads part of the card's snippet, the same for every library.
_HEADS = [
    "heads = {}  # task -> (its classifier, its label names)",
    'for head_folder in sorted((folder / "heads").iterdir()):',
    '    labels = json.loads((head_folder / "labels.json").read_text())',
    '    state = load_file(str(head_folder / "head.safetensors"))',
    '    head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0], bias="bias" in state)',
    "    head.load_state_dict(state)",
    '    heads[labels["task"]] = (head.eval(), labels["label_names"])',
]


class TimmLibrary(BaseLibrary):
    """peft on a timm model (peft's custom-models guide): the classifier in modules_to_save=["head"] or beside the
    adapter as head.safetensors; the base given with --base (peft records no base name for timm models)."""

    name, source = "timm", "peft-timm"
    classifier_by_name = False
    study_classifier = None

    def load(self, name: str) -> torch.nn.Module:
        """A hub id becomes its cached (or downloaded) folder, read with timm's own `local-dir:` loader, so a cached
        model loads without any network call."""
        import timm

        folder = self.folder(name)
        try:
            return timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True).eval()
        except Exception as error:  # timm raises RuntimeError, KeyError, FileNotFoundError... for an odd folder
            raise AdapterError(
                f"cannot load timm base model {name} from {folder} ({error_reason(error)}): "
                "point --base at a folder timm's save_for_hf wrote (config.json and weights)"
            ) from None

    def preprocess(self, name: str, model: torch.nn.Module) -> Preprocess:
        """timm's data config of the model."""
        import timm

        data = timm.data.resolve_data_config({}, model=model)
        return Preprocess(int(data["input_size"][-1]), tuple(data["mean"]), tuple(data["std"]), data["interpolation"])

    def remove_classifier(self, model: torch.nn.Module, head_module: str | None) -> None:
        model.reset_classifier(0)  # its output: the pre-logits features

    def features(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values)

    def folder(self, name: str) -> Path:
        """`local-dir:FOLDER` or a folder as given, a hub id (`timm/...`, `hf-hub:...`, a bare timm name) as its
        folder in the local Hub cache (downloaded if missing)."""
        if name.startswith("local-dir:"):
            return Path(name[len("local-dir:") :])
        if name.startswith(("timm/", "hf-hub:")) or not Path(name).exists():
            repo_id = name.removeprefix("hf-hub:")
            repo_id = repo_id if "/" in repo_id else f"timm/{repo_id}"  # a bare timm name lives under timm/ on the Hub
            return hub_snapshot(repo_id, f"base model {name}")
        return Path(name)

    def architecture(self, config: dict) -> str:
        return config["architecture"]  # timm's save_for_hf

    def backbone_spec(self, folder: Path) -> str:
        return f"local-dir:{folder}"

    def hub_repo(self, repo: str) -> str:
        return repo if "/" in repo else f"timm/{repo}"  # a bare timm name is the timm/ repo `folder` loads

    def how_to_load(self, head_module: str | None) -> str:
        return (
            "PeftModel.from_pretrained(timm.create_model(base, pretrained=True), folder); per task, "
            f"model.reset_classifier(n) and load heads/<task>/{HEAD_FILE} into model.get_classifier()"
        )

    def loading_snippet(self, head_module: str | None) -> list[str]:
        """A base named by a folder (recorded as an absolute path) loads through timm's `local-dir:`, a Hub id
        through `hf-hub:` (how timm.create_model names Hub repos); `reset_classifier(0)` makes the model return the
        heads' input."""
        return [
            "Plain timm + peft load it (the base model must be available to `timm.create_model`). `folder` is this "
            "folder (give its path to run from elsewhere); one backbone pass feeds every head:",
            "",
            "```python",
            "import json",
            "from pathlib import Path",
            "",
            "import timm",
            "import torch",
            "from peft import PeftModel",
            "from safetensors.torch import load_file",
            "",
            'folder = Path(".")  # this folder',
            'base = json.loads((folder / "merge.json").read_text())["base_model_name_or_path"]',
            "if Path(base).is_dir():  # a local folder, as timm's save_for_hf writes it",
            '    base = f"local-dir:{base}"',
            'elif not base.startswith(("hf-hub:", "local-dir:")):  # a Hub repo of timm\'s',
            '    base = f"hf-hub:{base}"',
            *_HEADS,
            "model = timm.create_model(base, pretrained=True)",
            "model.reset_classifier(0)  # the model now returns the heads' input",
            "model = PeftModel.from_pretrained(model, folder).eval()",
            'size = timm.data.resolve_data_config({}, model=model.base_model.model)["input_size"][-1]',
            "torch.manual_seed(0)",
            "pixels = torch.rand(1, 3, size, size)  # one image; yours: timm.data.create_transform(...)",
            "with torch.no_grad():",
            "    features = model(pixels)  # the one backbone pass",
            "    for task, (head, names) in heads.items():",
            '        print(f"{task}: {names[head(features).argmax(-1).item()]}")',
            "```",
        ]


class TransformersLibrary(BaseLibrary):
    """peft's image-classification guide on a `transformers` model: the classifier in
    modules_to_save=["classifier"]; adapter_config.json names base_model_name_or_path."""

    name, source = "transformers", "peft-transformers"
    classifier_by_name = True
    study_classifier = "classifier"  # a study's transformers backbone answers this module's input

    def load(self, name: str) -> torch.nn.Module:
        """From a local folder or the local Hugging Face cache."""
        from transformers import AutoModelForImageClassification
        from transformers.utils import logging

        shown, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
        # a command's output is its own lines: no progress bar per load, and no load report about the base's own
        # classifier (missing or resized), which is replaced by the task heads anyway
        logging.disable_progress_bar()
        logging.set_verbosity_error()
        try:
            return AutoModelForImageClassification.from_pretrained(name, local_files_only=True).eval()
        except Exception as error:  # transformers raises OSError, ValueError, KeyError... for a missing or odd model
            raise AdapterError(
                f"cannot load base model {name} offline ({error_reason(error)}): download it first or point "
                "base_model_name_or_path at a local folder"
            ) from None
        finally:
            logging.set_verbosity(verbosity)
            if shown:
                logging.enable_progress_bar()

    def preprocess(self, name: str, model: torch.nn.Module) -> Preprocess:
        """The base's image processor config (`mlvision.backbone.transformers_preprocess`)."""
        return transformers_preprocess(name, model)

    def remove_classifier(self, model: torch.nn.Module, head_module: str | None) -> None:
        model.set_submodule(head_module, torch.nn.Identity())  # its "logits": ViT's final layernorm's CLS token

    def features(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).logits

    def folder(self, name: str) -> Path:
        return Path(name) if Path(name).is_dir() else hub_snapshot(name, f"base model {name}")

    def architecture(self, config: dict) -> str:
        return config["architectures"][0]  # transformers' save_pretrained

    def backbone_spec(self, folder: Path) -> str:
        return f"{TRANSFORMERS_BASE}{folder}"

    def how_to_load(self, head_module: str | None) -> str:
        return (
            "PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base, num_labels=n, "
            f"ignore_mismatched_sizes=True), folder), then load heads/<task>/{HEAD_FILE} into its {head_module}"
        )

    def loading_snippet(self, head_module: str | None) -> list[str]:
        """The base's own classifier is replaced by the identity, so the model returns the classifier's input (ViT:
        the final layernorm's CLS token), which every task head reads."""
        return [
            "Plain transformers + peft load it (the base model must be available to `from_pretrained`). `folder` is "
            "this folder (give its path to run from elsewhere); one backbone pass feeds every head:",
            "",
            "```python",
            "import json",
            "from pathlib import Path",
            "",
            "import torch",
            "from peft import PeftModel",
            "from safetensors.torch import load_file",
            "from transformers import AutoModelForImageClassification",
            "",
            'folder = Path(".")  # this folder',
            'base = json.loads((folder / "merge.json").read_text())["base_model_name_or_path"]',
            *_HEADS,
            "model = AutoModelForImageClassification.from_pretrained(base)",
            f'model.set_submodule("{head_module}", torch.nn.Identity())  # the model now returns the heads\' input',
            "model = PeftModel.from_pretrained(model, folder).eval()",
            'size = getattr(model.config, "image_size", 224)',
            "torch.manual_seed(0)",
            "pixels = torch.rand(1, 3, size, size)  # one image; yours: AutoImageProcessor.from_pretrained(base)",
            "with torch.no_grad():",
            "    features = model(pixel_values=pixels).logits  # the one backbone pass",
            "    for task, (head, names) in heads.items():",
            '        print(f"{task}: {names[head(features).argmax(-1).item()]}")',
            "```",
        ]


TIMM, TRANSFORMERS = TimmLibrary(), TransformersLibrary()
LIBRARIES: dict[str, BaseLibrary] = {library.name: library for library in (TIMM, TRANSFORMERS)}


def library_of(base: str) -> BaseLibrary:
    """TIMM for timm's hub ids (`timm/...`, `hf-hub:...`), `local-dir:` folders, folders holding timm's
    config.json (it has "architecture") and timm model names; TRANSFORMERS otherwise."""
    if base.startswith(_TIMM_PREFIXES):
        return TIMM
    config = Path(base) / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        return TIMM if isinstance(data, dict) and "architecture" in data else TRANSFORMERS
    import timm

    return TIMM if not Path(base).exists() and timm.is_model(base.split(".")[0]) else TRANSFORMERS


__all__ = ["LIBRARIES", "TIMM", "TRANSFORMERS", "BaseLibrary", "hub_snapshot", "library_of"]
