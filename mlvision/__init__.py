"""Shared core of Multi-LoRA Vision: task registry, backbone, result store.

`training/`, `merging/`, `dashboard/` and `demo/` all import from here, so each concept
(a task, a backbone, the store) is defined in exactly one place.
"""
