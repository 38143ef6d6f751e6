"""peft's own `add_weighted_adapter`, run as reference merge methods on the same adapters.

Stored under their own names (`peft_linear`, `peft_cat`, `peft_svd`, `peft_ties`) so a reader can
compare them with this project's ΔW-space methods. Note (see OFFLINE_ASSETS.md): for `linear`
and `ties` peft combines the A and B factors separately, so the result is not a merge of the
weight updates (cross terms B_i A_j appear); `cat` is exact (it equals the weighted sum of the
ΔW_i); `svd` truncates the weighted sum to the largest input rank.

Weights: 1/k for linear, cat and svd (comparable to the plain mean), 1 for ties (comparable to
TIES with λ = 1); ties density 0.2 as in the TIES paper. The merged ΔW is read back from peft
(`get_delta_weight`) and folded into the base weights like every other method.
"""
from __future__ import annotations

import torch
from peft import PeftModel

from mlvision.backbone import BackboneConfig, create_backbone

PEFT_METHODS = {
    "peft_linear": {"combination_type": "linear"},
    "peft_cat": {"combination_type": "cat"},
    "peft_svd": {"combination_type": "svd"},
    "peft_ties": {"combination_type": "ties", "density": 0.2},
}


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
        params = dict(PEFT_METHODS[method])
        params["weights"] = [1.0] * k if params["combination_type"] == "ties" else [1.0 / k] * k
        return params

    @torch.no_grad()
    def merge(self, method: str, keys: list[str]) -> dict[str, torch.Tensor]:
        """Merged ΔW per layer (2-D, float32) for the adapters `keys` with peft's `method`."""
        params = self.hyperparams(method, len(keys))
        self.model.add_weighted_adapter([self.names[key] for key in keys], adapter_name="merged", **params)
        merged = {}
        for name, module in self.model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "merged" in module.lora_A:
                merged[name] = module.get_delta_weight("merged").detach().flatten(1).float().clone()
        self.model.delete_adapter("merged")
        return merged
