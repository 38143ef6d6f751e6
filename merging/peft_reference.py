"""Runs the reference methods (merging/methods/peft_references.py) with peft's `add_weighted_adapter`.

The merged ΔW is read back from peft (`get_delta_weight`) and folded into the base weights like
every other method's, so the references are scored exactly like this project's methods.
"""

from __future__ import annotations

import torch
from peft import PeftModel

from merging.methods import get_method
from mlvision.backbone import BackboneConfig, create_backbone

MERGED = "merged"  # name of the temporary adapter peft merges into (the study's adapters are a0, a1, ...)


class PeftMerger:
    """One PeftModel holding every adapter of a study; merges any subset with add_weighted_adapter."""

    def __init__(self, backbone_config: BackboneConfig, adapter_folders: dict[str, str]):
        self.names = {}
        backbone = create_backbone(backbone_config)
        model = None
        for i, (key, folder) in enumerate(sorted(adapter_folders.items())):
            name = f"a{i}"
            if model is None:
                model = PeftModel.from_pretrained(backbone, folder, adapter_name=name)
            else:
                model.load_adapter(folder, adapter_name=name)
            self.names[key] = name
        self.model = model

    def hyperparams(self, method: str, k: int) -> dict:
        params = dict(get_method(method).options)
        params["weights"] = [1.0] * k if params["combination_type"] == "ties" else [1.0 / k] * k
        return params

    @torch.no_grad()
    def merge(self, method: str, keys: list[str]) -> dict[str, torch.Tensor]:
        """Merged ΔW per layer (2-D, float32) for the adapters `keys` with peft's `method`.

        peft's add_weighted_adapter silently keeps an existing adapter of the same name, so a
        "merged" adapter left by a failed merge would be returned again by every later merge: it
        is deleted before the merge and, whatever happens, after it.
        """
        params = self.hyperparams(method, len(keys))
        self._delete_merged()
        try:
            self.model.add_weighted_adapter([self.names[key] for key in keys], adapter_name=MERGED, **params)
            merged = {}
            for name, module in self.model.base_model.model.named_modules():
                if hasattr(module, "lora_A") and MERGED in module.lora_A:
                    merged[name] = module.get_delta_weight(MERGED).detach().flatten(1).float().clone()
        finally:
            self._delete_merged()
        return merged

    def _delete_merged(self) -> None:
        if MERGED in self.model.peft_config:
            self.model.delete_adapter(MERGED)
