"""Shared core of Multi-LoRA Vision: task registry, backbone, result store.

`training/`, `merging/`, `dashboard/` and `demo/` all import from here, so each concept
(a task, a backbone, the store) is defined in exactly one place. Importing the package imports no
torch (a command's --help answers in a fraction of a second); mlvision/backbone.py sets torch's
numerics for every process that builds a model.
"""
