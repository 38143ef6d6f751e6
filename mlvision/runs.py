"""Run and artifact bookkeeping: a study's run id, where its models live, how stored paths resolve.

Every stage needs these (training writes model folders, the sweep, the benchmarks, the findings
and the demo read them back), so they live in the core, once.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from mlvision.config import StudyConfig
from mlvision.errors import MLVisionError
from mlvision.paths import REPO_ROOT
from mlvision.store import Store, config_hash
from mlvision.store import relative_to_repo as relative_to_repo  # stored paths: the stages import it from here


def machine_info() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def study_run_id(config: StudyConfig) -> str:
    """A run is one study configuration (db and artifacts excluded, `StudyConfig.identity`): re-running it continues
    the same run."""
    return "run-" + config_hash(config.identity())


def resolve_stored_path(stored: str) -> Path:
    path = Path(stored)
    return path if path.is_absolute() else REPO_ROOT / path


def stored_model_folder(store: Store, config: StudyConfig, kind: str, task: str, seed: int) -> Path:
    """The folder of the trained head or adapter of (task, seed) under `config`, as the store records it."""
    model_id = config.model_id(kind, task, seed)
    rows = store.query("SELECT path FROM models WHERE model_id = ?", [model_id]) if store.path.exists() else []
    if not rows:
        raise MLVisionError(
            f"no trained {kind} for task '{task}' seed {seed} with this configuration in "
            f"{store.path}: run the training stage first (python training/run_all.py)"
        )
    return resolve_stored_path(rows[0][0])


def model_folder(config: StudyConfig, kind: str, task: str, seed: int, model_id: str) -> Path:
    """Where the training stage writes the head or adapter `model_id` of (task, seed)."""
    safe_task = task.replace(":", "_").replace("/", "_")
    return Path(config.artifacts) / config.backbone_config.name / safe_task / f"{kind}-seed{seed}-{model_id[:8]}"
