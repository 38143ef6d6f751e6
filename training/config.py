"""The study's configuration: one dataclass, two named profiles, and the CLI options built from it.

`default` is the offline study of the README (six tasks, three seeds, EfficientNet-Lite0 at 48 px),
sized to train on two CPU cores in about a quarter of an hour; `quick` runs the same pipeline on
a sliver of everything in about a minute, for smoke tests.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from mlvision.backbone import BackboneConfig, default_target_modules
from mlvision.store import config_hash
from mlvision.paths import DEFAULT_ARTIFACTS_DIR, DEFAULT_DB_PATH, REPO_ROOT
from mlvision.tasks import TASK_NAMES


@dataclass(frozen=True)
class StudyConfig:
    tasks: tuple[str, ...] = TASK_NAMES
    seeds: tuple[int, ...] = (0, 1, 2)
    backbone: str = "tf_efficientnet_lite0"
    backbone_weights: str = "auto"
    image_size: int = 48
    # LoRA adapter (trained together with its task head)
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None  # None = the backbone family's default
    steps: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    head_lr: float = 1e-2
    # head baseline (frozen backbone, trained on cached features)
    head_epochs: int = 30
    # how many images per split are used (a fixed subset; None = all of the split)
    max_train: int | None = 10000
    max_validation: int | None = 1000
    max_test: int | None = 2000
    # merge sweep (merging/sweep.py)
    merge_methods: tuple[str, ...] = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                                      "knots_ties", "knots_ta", "tsv_m", "iso_c",
                                      "peft_linear", "peft_cat", "peft_svd", "peft_ties")
    max_k: int = 6
    merge_all_seeds_up_to_k: int = 2  # larger groups use the first seed only (time budget)
    merge_eval: int | None = 300      # test images per task scored for each merged model (fixed subset)
    merge_select: int | None = 100    # validation images per task for choosing λ (task arithmetic)
    # where things go
    db: Path = DEFAULT_DB_PATH
    artifacts: Path = DEFAULT_ARTIFACTS_DIR

    @property
    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(self.backbone, self.backbone_weights, self.image_size)

    @property
    def lora_targets(self) -> list[str]:
        return list(self.target_modules) if self.target_modules else default_target_modules(self.backbone)

    def adapter_training_config(self, task: str, seed: int) -> dict:
        """Everything that determines an adapter's weights: its hash is the adapter's identity."""
        return {"kind": "adapter", "task": task, "seed": seed, "backbone": self.backbone_config.to_dict(),
                "rank": self.rank, "alpha": self.alpha, "target_modules": self.lora_targets,
                "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "head_lr": self.head_lr,
                "max_train": self.max_train, **self.eval_limits()}

    def eval_limits(self) -> dict:
        return {"max_validation": self.max_validation, "max_test": self.max_test}

    def head_training_config(self, task: str, seed: int) -> dict:
        return {"kind": "head", "task": task, "seed": seed, "backbone": self.backbone_config.to_dict(),
                "epochs": self.head_epochs, "batch_size": 256, "lr": self.head_lr, "max_train": self.max_train,
                **self.eval_limits()}

    def model_id(self, kind: str, task: str, seed: int) -> str:
        """The stored identity of a head baseline or adapter: the hash of its full config."""
        make = self.adapter_training_config if kind == "adapter" else self.head_training_config
        return config_hash(make(task, seed))

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(db=str(self.db), artifacts=str(self.artifacts), target_modules=self.lora_targets)
        return data


STAGES = ("train", "merge", "findings", "bench")

PROFILES = {
    "default": StudyConfig(),
    "quick": StudyConfig(seeds=(0,), image_size=32, steps=12, head_epochs=5, max_train=256, max_validation=64,
                         max_test=128, rank=4, alpha=8.0, max_k=2, merge_eval=64, merge_select=32,
                         merge_methods=("linear", "task_arithmetic", "ties"),
                         # a smoke test never touches the committed results
                         db=REPO_ROOT / "runs" / "quick" / "results.duckdb", artifacts=REPO_ROOT / "runs" / "quick" / "artifacts"),
}


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI options for every StudyConfig field (defaults come from the chosen profile)."""
    parser.add_argument("--quick", action="store_true", help="the 'quick' profile: whole pipeline on a sliver of the data in about a minute (smoke test)")
    parser.add_argument("--tasks", nargs="+", help=f"tasks to study (default: all six: {' '.join(TASK_NAMES)}; also hub:<dataset id or saved folder>)")
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds (default: 0 1 2)")
    parser.add_argument("--backbone", help="timm model name (default: tf_efficientnet_lite0, weights from an offline package)")
    parser.add_argument("--backbone-weights", choices=["auto", "package", "hub", "random"], help="where the backbone weights come from (default: auto = offline package if one exists, else the timm hub)")
    parser.add_argument("--image-size", type=int, help="square input size in pixels (default: 48)")
    parser.add_argument("--rank", type=int, help="LoRA rank (default: 8)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha; scaling = alpha / rank (default: 16)")
    parser.add_argument("--target-modules", nargs="+", help="LoRA target module names (default: conv_pw conv_pwl conv_head for EfficientNet; qkv proj fc1 fc2 for ViT)")
    parser.add_argument("--steps", type=int, help="adapter training steps (default: 200)")
    parser.add_argument("--batch-size", type=int, help="adapter training batch size (default: 64)")
    parser.add_argument("--lr", type=float, help="LoRA learning rate (default: 3e-3)")
    parser.add_argument("--head-lr", type=float, help="task head learning rate (default: 1e-2)")
    parser.add_argument("--head-epochs", type=int, help="epochs of head-baseline training on cached features (default: 30)")
    parser.add_argument("--max-train", type=int, help="images per task used for training (fixed subset; default: 10000)")
    parser.add_argument("--max-validation", type=int, help="validation images per task (default: 1000)")
    parser.add_argument("--max-test", type=int, help="test images per task (fixed subset, same for every model; default: 2000)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run, in order (default: all)")
    parser.add_argument("--merge-methods", nargs="+", help="merge methods for the sweep (default: all registered, peft references included)")
    parser.add_argument("--max-k", type=int, help="largest group of adapters merged (default: 6)")
    parser.add_argument("--merge-all-seeds-up-to-k", type=int, help="groups up to this size are merged for every seed, larger ones for the first seed only (default: 2)")
    parser.add_argument("--merge-eval", type=int, help="test images per task scored for each merged model (fixed subset; default: 300)")
    parser.add_argument("--merge-select", type=int, help="validation images per task used to pick task arithmetic's lambda (default: 100)")
    parser.add_argument("--db", type=Path, help="results database (default: results.duckdb at the repo root; --quick: runs/quick/results.duckdb)")
    parser.add_argument("--artifacts", type=Path, help="folder for adapters and heads (default: artifacts/ at the repo root)")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    base = PROFILES["quick" if args.quick else "default"]
    changes = {}
    for f in fields(StudyConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            changes[f.name] = tuple(value) if isinstance(value, list) else value
    return replace(base, **changes)
