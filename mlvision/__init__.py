"""Shared core of Multi-LoRA Vision: task registry, backbone, result store.

`training/`, `merging/`, `dashboard/` and `demo/` all import from here, so each concept
(a task, a backbone, the store) is defined in exactly one place.
"""

import torch as _torch

# Flush denormal floats to zero on CPU. Once a task is learned its loss and gradients become tiny
# and Adam's state fills with denormal numbers, which x86 CPUs process ~100x slower: without this,
# a LoRA step on an easy task went from 0.2 s to 20 s here. It changes nothing measurable in results.
_torch.set_flush_denormal(True)
