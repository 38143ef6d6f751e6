"""The study's configuration: one dataclass, named profiles, and the CLI options built from it.

`default` is the offline study of the README (six tasks, three seeds, EfficientNet-Lite0 at 48 px),
sized to train on two CPU cores in about a quarter of an hour; `quick` runs the same pipeline on
a sliver of everything in about a minute and a half, for smoke tests; `wide` is the wide study's shape (every
merge method, every pair, sampled larger groups; `run_all --plan --config wide` says how long it takes here).
`paper` is the same study at the scale of the ViT merging literature (ViT-B/16 from the hub, six hub datasets,
224 px; needs a network and GPUs, see `accelerate launch`), and `tiny-vit` is its offline miniature
(a randomly initialised ViT-Tiny on small local copies of offline tasks, saved like hub datasets), which the tests run.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from mlvision.backbone import WEIGHT_SOURCES, BackboneConfig, default_target_modules
from mlvision.errors import MLVisionError, UnknownNameError
from mlvision.options import (
    add_field_arguments,
    changes_from_args,
    check_values,
    is_config_file,
    read_config_file,
)
from mlvision.paths import DEFAULT_ARTIFACTS_DIR, DEFAULT_DB_PATH, REPO_ROOT
from mlvision.store import config_hash, stored_paths
from mlvision.tasks import POOL_TASKS, STUDY_TASKS, TASK_NAMES


def fraction(text: str) -> float:
    """An accuracy bound as a fraction (0.99, not 99): argparse's one-line error otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (0.99 for 99 %), got {text}")
    return value


def parse_task_domains(items) -> tuple[tuple[str, str], ...]:
    """("hub:x=digits", ...) -> (("hub:x", "digits"), ...); the last "=" splits (ids have none). A config file may
    also give a mapping {task: domain}, as `runs.config` stores it."""
    if isinstance(items, dict):
        return tuple((task, domain) for task, domain in items.items())
    pairs = []
    for item in items:
        if not isinstance(item, str):
            pairs.append(item)  # already a pair (a config file's [task, domain]); its types are checked there
            continue
        task, sep, domain = item.rpartition("=")
        if not sep or not task or not domain:
            raise UnknownNameError(f"--task-domains expects TASK=DOMAIN, got {item!r}")
        pairs.append((task, domain))
    return tuple(pairs)


# Why a split's subset needs an image: models are trained on it and scored on it (an accuracy over no image is
# undefined). None takes all of the split.
_SUBSET_RULE = "a split's subset needs one image at least; leave the option out for all of the split"


@dataclass(frozen=True)
class StudyConfig:
    """One study: every field is an option of run_all (built by `add_study_arguments`), declared once here with its
    help, its range and, for fields added after results were stored, the value that keeps the old identities
    (mlvision/options.py says what each metadata key means)."""

    tasks: tuple[str, ...] = field(
        default=STUDY_TASKS,
        metadata={
            "help": f"tasks to study (registered: {' '.join(TASK_NAMES)}; also hub:<dataset id or saved folder>)",
            "not_empty": True,
        },
    )
    seeds: tuple[int, ...] = field(
        default=(0, 1, 2), metadata={"help": "training seeds", "not_empty": True, "at_least": 0}
    )
    backbone: str = field(default="tf_efficientnet_lite0", metadata={"help": "timm model name"})
    backbone_weights: str = field(
        default="auto",
        metadata={
            "help": "where the backbone weights come from: auto = offline package if one exists, else the timm hub",
            "choices": WEIGHT_SOURCES,
        },
    )
    image_size: int = field(default=48, metadata={"help": "square input size in pixels", "at_least": 1})
    # LoRA adapter (trained together with its task head)
    rank: int = field(default=8, metadata={"help": "LoRA rank", "at_least": 1})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling = alpha / rank", "above": 0})
    target_modules: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "LoRA target module names",
            "unset": f"{' '.join(default_target_modules('efficientnet'))} for EfficientNet; "
            f"{' '.join(default_target_modules('vit'))} for ViT",
        },
    )
    steps: int = field(default=200, metadata={"help": "adapter training steps", "at_least": 1})
    batch_size: int = field(default=64, metadata={"help": "adapter training batch size", "at_least": 1})
    lr: float = field(default=3e-3, metadata={"help": "LoRA learning rate", "above": 0})
    head_lr: float = field(default=1e-2, metadata={"help": "task head learning rate", "above": 0})
    # head baseline (frozen backbone, trained on cached features)
    head_epochs: int = field(
        default=30, metadata={"help": "epochs of head-baseline training on cached features", "at_least": 1}
    )
    # how many images per split are used (a fixed subset; None = all of the split)
    # Equal footing (study v2): every adapter and head trains on the same number of images (uci_digits,
    # the smallest task, has 1,078), though not for the same number of steps (adapters: `steps` batches drawn
    # with replacement; heads: `head_epochs` passes of ceil(max_train / 256) batches).
    max_train: int | None = field(
        default=1000,
        metadata={
            "help": "images per task used for training (fixed subset, the same for every task)",
            "unset": "all",
            "at_least": 1,
            "why": _SUBSET_RULE,
        },
    )
    max_validation: int | None = field(
        default=1000,
        metadata={"help": "validation images per task", "unset": "all", "at_least": 1, "why": _SUBSET_RULE},
    )
    max_test: int | None = field(
        default=2000,
        metadata={
            "help": "test images per task (fixed subset, same for every model)",
            "unset": "all",
            "at_least": 1,
            "why": _SUBSET_RULE,
        },
    )
    # merge sweep (merging/sweep.py)
    # None = every method in the merge registry (merging/methods/__init__.py); the core cannot import
    # that registry, so whoever builds a config for a stage resolves it (`with_methods`).
    merge_methods: tuple[str, ...] | None = field(
        default=None, metadata={"help": "merge methods for the sweep", "unset": "every registered method"}
    )
    # Methods merged on part of the sweep only, to fit the default run's time budget on 2 CPU cores (issue 31): the
    # groups of 2 and 6 tasks of the first seed, the subset AdaMerging runs on (STUDY_SUBSET in
    # merging/methods/_base.py). Their figures are on the dashboard beside the others'; the findings' choice of
    # method per k leaves them out (a mean over a subset is not comparable).
    subset_methods: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "merge methods swept only on groups of 2 and 6 tasks of the first seed (to fit a time budget); "
            "given with no name, or when --merge-methods names the methods, every method is swept in full",
            "unset": "none",
            "may_be_empty": True,
            "identity_default": (),
        },
    )
    max_k: int = field(default=6, metadata={"help": "largest group of adapters merged", "at_least": 1})
    # groups up to this size are merged for every seed, larger ones for the first seed only; None = every
    # seed at every k (the default: a verdict at k = 6 needs more than one merged model)
    merge_all_seeds_up_to_k: int | None = field(
        default=None,
        metadata={
            "help": "groups up to this size are merged for every seed, larger ones for the first seed only",
            "unset": "every seed at every k",
        },
    )
    # None = every group of each size; N = a fixed, seeded sample of N groups per size k >= 3 (pairs are
    # always all merged), for suites of more than six tasks, where the groups outgrow the time budget
    max_groups_per_k: int | None = field(
        default=None,
        metadata={
            "help": "merge a fixed, seeded sample of this many groups of each size k >= 3 (pairs: always all)",
            "unset": "all",
            "at_least": 1,
        },
    )
    merge_eval: int | None = field(
        default=300,
        metadata={
            "help": "test images per task scored for each merged model (fixed subset)",
            "unset": "all",
            "at_least": 1,
            "why": _SUBSET_RULE,
        },
    )
    # validation images per task for choosing each method's hyperparameters (5 grid points per merge since study v3;
    # with 4 at 100 images the grid cost twice the test evaluation, and the default run overshot its time budget)
    merge_select: int | None = field(
        default=50,
        metadata={
            "help": "validation images per task used to choose each method's hyperparameters",
            "unset": "all",
            "at_least": 1,
            "why": _SUBSET_RULE,
        },
    )
    # where things go
    db: Path = field(default=DEFAULT_DB_PATH, metadata={"help": "results database"})
    artifacts: Path = field(
        default=DEFAULT_ARTIFACTS_DIR,
        metadata={
            "help": "folder for adapters and heads (with another --db and no --artifacts: beside it, X/name.duckdb "
            "-> X/name.artifacts/); a model folder already there with the same configuration is reused, never "
            "retrained over"
        },
    )
    # Added later: at their `identity_default` they are left out of the identity, so earlier run ids stand.
    task_domains: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata={
            "help": "domain tags of hub tasks for the same- vs cross-domain findings",
            "unset": "the task's own, 'hub' for a hub task",
            "metavar": "TASK=DOMAIN",
            "parse": parse_task_domains,
            "identity_default": (),
        },
    )
    mixed_precision: str = field(
        default="no",
        metadata={
            "help": "adapter training precision, under accelerate",
            "choices": ("no", "bf16"),
            "identity_default": "no",
        },
    )
    grad_accum: int = field(
        default=1,
        metadata={
            "help": "micro-batches per training step; the global batch stays --batch-size",
            "at_least": 1,
            "identity_default": 1,
        },
    )
    # LoRA steps in channels_last memory order: 1.4-1.8x faster on 2 CPU cores (benchmark variant
    # lora_channels_last), other float rounding, so other weights; on since study v2 (runs before it had it off).
    channels_last: bool = field(
        default=True,
        metadata={
            "help": "train adapters in channels_last memory order: 1.4-1.8x faster steps on CPUs, slightly different "
            "weights, so other adapter identities",
            "identity_default": False,
        },
    )
    # Adapters given instead of trained (run_all --adapters, study/given.py): (task, seed, folder, sha256 of
    # the folder's weight files). The training stage imports them and trains only the head baselines; their
    # identity is their content, so the same files give the same model ids wherever they lie.
    given_adapters: tuple[tuple[str, int, str, str], ...] = field(
        default=(),
        metadata={
            "help": "adapters studied instead of trained: (task, seed, folder, sha256 of its weight files)",
            "cli": False,  # --adapters fills it (study/given.py)
            "identity_default": (),
        },
    )
    backbone_base: str = field(
        default="",
        metadata={
            "help": "given adapters' base: local-dir:FOLDER or transformers:FOLDER (mlvision/backbone.py)",
            "cli": False,  # --adapters (and --base) fill it
            "identity_default": "",
        },
    )
    # The findings' exclusion rules (study/findings/exclusion.py, ExclusionRules): a task measured on too few images or
    # at the ceiling is left out of every claim. The defaults suit the default study; a small study lowers the counts.
    min_test_images: int = field(
        default=350,
        metadata={
            "help": "findings: leave a task out of the claims when its smallest test split has fewer images "
            "(lower it for a study of small datasets)",
            "at_least": 0,
            "identity_default": 350,
        },
    )
    min_merge_eval_images: int = field(
        default=300,
        metadata={
            "help": "findings: leave a task out of the claims when its merged models were scored on fewer test images "
            "(see --merge-eval)",
            "at_least": 0,
            "identity_default": 300,
        },
    )
    max_adapter_accuracy: float = field(
        default=0.99,
        metadata={
            "help": "findings: leave a task out of the claims when its single adapter's mean test accuracy is above "
            "this fraction, at the ceiling",
            "type": fraction,
            "at_least": 0,
            "at_most": 1,
            "identity_default": 0.99,
        },
    )
    max_head_accuracy: float = field(
        default=0.97,
        metadata={
            "help": "findings: leave a task out of the claims when its head baseline's mean test accuracy is above "
            "this fraction, at the ceiling",
            "type": fraction,
            "at_least": 0,
            "at_most": 1,
            "identity_default": 0.97,
        },
    )

    def __post_init__(self):
        check_values(self)  # an impossible value fails here, in one line, before any work

    @property
    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(self.backbone, self.backbone_weights, self.image_size, self.backbone_base)

    @property
    def lora_targets(self) -> list[str]:
        return list(self.target_modules) if self.target_modules else default_target_modules(self.backbone)

    def given_adapter(self, task: str, seed: int) -> tuple[str, str] | None:
        """(folder, sha256) of the adapter given for (task, seed) instead of training one, else None."""
        for given_task, given_seed, folder, sha256 in self.given_adapters:
            if (given_task, given_seed) == (task, seed):
                return folder, sha256
        return None

    def adapter_training_config(self, task: str, seed: int) -> dict:
        """Everything that determines an adapter's weights: its hash is the adapter's identity."""
        given = self.given_adapter(task, seed)
        if given is not None:  # trained elsewhere: its files are its identity
            return {"kind": "adapter", "task": task, "seed": seed, "backbone": self.backbone_config.to_dict(),
                    "given_sha256": given[1]}  # fmt: skip
        config = {
            "kind": "adapter",
            "task": task,
            "seed": seed,
            "backbone": self.backbone_config.to_dict(),
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": self.lora_targets,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "head_lr": self.head_lr,
            "max_train": self.max_train,
            **self.eval_limits(),
        }
        # bf16 changes the weights, so it is part of the identity; the number of processes and
        # --grad-accum are not (same global batch, same maths up to float summation order).
        if self.mixed_precision != "no":
            config["mixed_precision"] = self.mixed_precision
        if self.channels_last:  # the same maths in another summation order: other weights, so another identity
            config["channels_last"] = True
        return config

    def eval_limits(self) -> dict:
        return {"max_validation": self.max_validation, "max_test": self.max_test}

    def head_training_config(self, task: str, seed: int) -> dict:
        return {
            "kind": "head",
            "task": task,
            "seed": seed,
            "backbone": self.backbone_config.to_dict(),
            "epochs": self.head_epochs,
            "batch_size": 256,
            "lr": self.head_lr,
            "max_train": self.max_train,
            **self.eval_limits(),
        }

    def model_id(self, kind: str, task: str, seed: int) -> str:
        """The stored identity of a head baseline or adapter: the hash of its full config."""
        make = self.adapter_training_config if kind == "adapter" else self.head_training_config
        return config_hash(make(task, seed))

    def with_methods(self, registered: tuple[str, ...]) -> "StudyConfig":
        """This config with `merge_methods` None replaced by the registry's names (`registered`)."""
        return self if self.merge_methods is not None else replace(self, merge_methods=tuple(registered))

    def to_dict(self) -> dict:
        """The configuration as its run stores it (`runs.config`): `identity()` plus where the results go (db,
        artifacts), every path inside the repository written relative to it (`stored_paths`: no folder of the
        machine that ran it in a shared results.duckdb)."""
        where = {"db": str(Path(self.db).resolve()), "artifacts": str(Path(self.artifacts).resolve())}
        return stored_paths({**self.identity(), **where})

    def identity(self) -> dict:
        """What the run id hashes (`mlvision.runs.study_run_id`): every field but db and artifacts, the given adapters'
        folders and base as given (resolved), so the ids stored before `to_dict` wrote paths relative stand."""
        if self.merge_methods is None:  # a programming error: the run id depends on the method list
            raise ValueError(
                "StudyConfig.merge_methods is unresolved: call config.with_methods(registered names) first"
            )
        data = asdict(self)
        del data["db"], data["artifacts"]
        data.update(target_modules=self.lora_targets)
        for f in fields(self):  # fields added after results were stored: a run without them keeps its id
            if "identity_default" in f.metadata and getattr(self, f.name) == f.metadata["identity_default"]:
                del data[f.name]
        if "task_domains" in data:
            data["task_domains"] = dict(self.task_domains)
        return data


STAGES = ("train", "merge", "findings", "plan", "bench")  # run_all's, in the order it runs them

# The standard ViT merging benchmark's datasets (task arithmetic / FusionBench), as hub ids. Each
# has an Image column "image" and a ClassLabel column "label", splits train and test (the tanganke
# copies add corrupted test splits, which are ignored); validation is carved from train. Domains
# make two similar pairs (digits; remote sensing); every other pair is dissimilar.
PAPER_TASK_DOMAINS = (
    ("hub:ylecun/mnist", "digits"),
    ("hub:ufldl-stanford/svhn@cropped_digits", "digits"),
    ("hub:tanganke/eurosat", "remote_sensing"),
    ("hub:tanganke/resisc45", "remote_sensing"),
    ("hub:tanganke/gtsrb", "traffic_signs"),
    ("hub:tanganke/dtd", "textures"),
)

# tiny-vit: small local copies of four offline tasks saved with save_to_disk, i.e. in the shape of a
# hub dataset; written on first use by `prepare_profile_data`, relative to the working directory
# (the repo root, as for every command), so the task names stay the same on every machine.
TINY_VIT_DATA = Path("runs") / "tiny-vit" / "data"
TINY_VIT_SOURCES = {"uci_digits": "digits", "mnist": "digits", "lfw_faces": "photos", "textures": "photos"}
TINY_VIT_SIZES = {"train": 96, "validation": 32, "test": 48}
TINY_VIT_TASK_DOMAINS = tuple(
    (f"hub:{(TINY_VIT_DATA / name).as_posix()}", domain) for name, domain in TINY_VIT_SOURCES.items()
)

# The default study sweeps every registered method (issue 31), each with its strength chosen on validation from
# a grid of the same size (merging/methods). Every method on every group and seed does not fit 45 minutes on 2 CPU
# cores (measured from empty: 60 min, the sweep 2,561 s of it; `python -m benchmarks.sweep_cost --all-methods` gives
# each method's cost), so these nine run on the subset of groups of 2 and 6 tasks of the first seed: linear (task
# arithmetic at λ = 1/k), dare_linear and dare_ties (a random drop before task arithmetic or TIES),
# magnitude_prune, knots_ta, iso_c and knots_ties (since study v3's five-point grids: from empty with both in full
# the run took 47 min 49 s, 2026-12-07; Iso-C was below its sibling Iso-CTS, and KnOTS-TIES below TIES, at every k
# in study v2 and v3, and KnOTS-TIES cost 200 s of validation search), peft's four references, and since issue 35
# WUDI and TIES in Core Space (the committed results.duckdb holds both on every group and seed, swept once with
# `--merge-methods wudi ties_core`). The study's own comparison (the findings' chosen method) is among the methods
# swept in full.
STUDY_SUBSET_METHODS = (
    "linear", "dare_linear", "dare_ties", "magnitude_prune", "knots_ta", "iso_c", "knots_ties",
    "peft_linear", "peft_cat", "peft_svd", "peft_ties", "wudi", "ties_core",
)  # fmt: skip

PROFILES = {
    "default": StudyConfig(subset_methods=STUDY_SUBSET_METHODS),
    "quick": StudyConfig(
        seeds=(0,),
        image_size=32,
        steps=12,
        head_epochs=5,
        max_train=256,
        max_validation=64,
        max_test=128,
        rank=4,
        alpha=8.0,
        max_k=2,
        merge_eval=64,
        merge_select=32,
        merge_methods=("linear", "task_arithmetic", "ties"),
        # a smoke test never touches the committed results
        db=REPO_ROOT / "runs" / "quick" / "results.duckdb",
        artifacts=REPO_ROOT / "runs" / "quick" / "artifacts",
    ),
    # The wide study (issues 31, 32): the twenty-task pool, every registered merge method, every pair for every
    # seed, larger groups (k = 3 to 20) a seeded sample of 10 per size for the first seed. `run_all --plan --config
    # wide` prints its cost on the machine at hand before anything runs.
    "wide": StudyConfig(
        tasks=POOL_TASKS,
        max_k=len(POOL_TASKS),
        merge_all_seeds_up_to_k=2,
        max_groups_per_k=10,
        # selection on 200 validation images per task (issue 33: on 50, the best and second grid points were
        # within one binomial SE in most merges); the default study keeps 50 to fit its 45 minutes on 2 cores,
        # and reports/selection_redraw.md says what that costs
        merge_select=200,
        db=REPO_ROOT / "runs" / "wide" / "results.duckdb",
        artifacts=REPO_ROOT / "runs" / "wide" / "artifacts",
    ),
    # The wide study on a CPU budget (issue 33; issue 31's three hours on 2 cores): the twenty-task pool, one seed,
    # every pair and 10 seeded groups at each k from 3 to 6, the four methods the study's claims read (task
    # arithmetic the baseline; TIES and WUDI, the six-task study's data-free choices; RegMean, its data-aware
    # choice). Measured from empty on this 2-core machine, alone (2026-12-07): 1 h 16 min (training 1,406 s
    # for 20 heads, 20 adapters and 20 probes; sweep 2,612 s for 920 merges; similarity 259 s; findings 39 s; plan
    # 260 s), within issue 31's three hours. `wide` is the same pool with every method, three seeds and k to 20
    # (`--plan`: 14.7 h here, a GPU job).
    "wide-cpu": StudyConfig(
        tasks=POOL_TASKS,
        seeds=(0,),
        max_k=6,
        max_groups_per_k=10,
        merge_methods=("task_arithmetic", "ties", "regmean", "wudi"),
        merge_select=200,
        # committed, as the six-task study's results.duckdb and artifacts/ are (6.6 MB and 18 MB)
        db=REPO_ROOT / "reports" / "wide.duckdb",
        artifacts=REPO_ROOT / "reports" / "wide.artifacts",
    ),
    # Paper scale: ViT-B/16 (ImageNet-21k, AugReg) from the hub at 224 px, LoRA on attention and MLP.
    # Splits are held in memory as tensors (mlvision/data.py): 5000 train images are 3 GB per task.
    "paper": StudyConfig(
        tasks=tuple(t for t, _ in PAPER_TASK_DOMAINS),
        task_domains=PAPER_TASK_DOMAINS,
        backbone="vit_base_patch16_224.augreg_in21k",
        backbone_weights="hub",
        image_size=224,
        rank=16,
        alpha=32.0,
        target_modules=("qkv", "proj", "fc1", "fc2"),
        steps=1000,
        batch_size=128,
        lr=1e-3,
        head_lr=1e-2,
        head_epochs=30,
        max_train=5000,
        max_validation=500,
        max_test=2000,
        merge_eval=1000,
        merge_select=200,
        db=REPO_ROOT / "runs" / "paper" / "results.duckdb",
        artifacts=REPO_ROOT / "runs" / "paper" / "artifacts",
    ),
    # Its offline miniature: the same code paths (hub loader, ViT, qkv/proj/fc1/fc2) in seconds.
    "tiny-vit": StudyConfig(
        tasks=tuple(t for t, _ in TINY_VIT_TASK_DOMAINS),
        task_domains=TINY_VIT_TASK_DOMAINS,
        seeds=(0,),
        backbone="vit_tiny_patch16_224",
        backbone_weights="random",
        image_size=32,
        rank=4,
        alpha=8.0,
        target_modules=("qkv", "proj", "fc1", "fc2"),
        steps=8,
        batch_size=16,
        lr=3e-3,
        head_lr=1e-2,
        head_epochs=3,
        max_train=None,
        max_validation=None,
        max_test=None,
        max_k=3,
        merge_eval=48,
        merge_select=16,
        merge_methods=("linear", "task_arithmetic", "ties"),
        db=REPO_ROOT / "runs" / "tiny-vit" / "results.duckdb",
        artifacts=REPO_ROOT / "runs" / "tiny-vit" / "artifacts",
    ),
}


def prepare_profile_data(profile: str) -> None:
    """Write the local datasets a profile reads, when missing (only tiny-vit has any).

    Each is a DatasetDict of the first images of an offline task's splits, saved with
    `save_to_disk`, so the study loads it through the very code that loads hub datasets.
    """
    if profile != "tiny-vit":
        return
    import datasets

    from mlvision.tasks import load_task

    for name in TINY_VIT_SOURCES:
        folder = TINY_VIT_DATA / name
        if folder.exists():
            continue
        source = load_task(name)
        subset = datasets.DatasetDict(
            {split: source[split].select(range(min(n, len(source[split])))) for split, n in TINY_VIT_SIZES.items()}
        )
        staging = folder.with_name(f".{name}.tmp-{os.getpid()}")
        subset.save_to_disk(str(staging))
        try:
            staging.rename(folder)  # atomic: an interrupted write never looks like a finished one
        except OSError:
            if not folder.exists():  # another process (another rank) finishing first is fine
                raise
            shutil.rmtree(staging, ignore_errors=True)


def add_study_arguments(parser: argparse.ArgumentParser, defaults: StudyConfig | None = None) -> None:
    """The run's own options (--config, --quick, --adapters, --base, --stages), then one per StudyConfig field, built
    from its declaration (mlvision/options.py); each help ends with `defaults`' value, the chosen profile's
    (`help_defaults`; the default profile's when not given)."""
    parser.add_argument(
        "--config",
        metavar="PROFILE|FILE",
        help="named profile giving every option's default: default (the offline study), "
        "quick (smoke test), wide (every method, every pair, sampled larger groups; a GPU job), wide-cpu (its twenty "
        "tasks, one seed, four methods, k to 6: fits 2 CPU cores), paper (ViT-B/16 + six hub datasets; network, "
        "GPUs), tiny-vit (its offline miniature); "
        "or a .json/.yaml file setting any option by its field name (max_train: 500), on top of the default profile "
        "or of the one its 'profile' key names",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="same as --config quick: whole pipeline on a sliver of the data in about a minute and a half (smoke test)",
    )
    parser.add_argument(
        "--adapters",
        nargs="+",
        metavar="ADAPTER[=TASK]",
        help="study these adapters instead of training them: folders (or hub:user/adapter) written by this "
        "project's training, each scored on TASK (default: the task it was trained on; a task of the same "
        "labels may be named); several adapters of one task are its seeds 0, 1, ... The tasks, seeds and "
        "backbone come from the adapters; the training stage trains only the head baselines. A peft LoRA of a "
        "transformers or timm model from another trainer is studied too: name its dataset (ADAPTER=hub:DATASET), "
        "and for timm its base (--base)",
    )
    parser.add_argument(
        "--base",
        help="with --adapters: the timm base model of peft LoRAs from other trainers, which name none "
        "(timm/NAME, hf-hub:ID, local-dir:FOLDER or a folder timm's save_for_hf wrote; as merging/merge.py --base)",
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        help="stages to run, in order (default: all, the benchmarks only when this run stored something new: a study "
        "already stored does not measure a new machine unless asked with --stages bench)",
    )
    add_field_arguments(parser, StudyConfig, defaults or PROFILES["default"])


def _help_settings(argv: list[str]) -> tuple[str, dict]:
    """`chosen_settings` of the --config or --quick in `argv` before it is parsed (for `--help`); one that cannot be
    read gives the default profile (parsing the options then says what is wrong with it)."""
    config, quick = None, "--quick" in argv
    for i, item in enumerate(argv):
        if item == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif item.startswith("--config="):
            config = item.partition("=")[2]
    try:
        return chosen_settings(argparse.Namespace(config=config, quick=quick))
    except MLVisionError:
        return "default", {}


def help_defaults(argv: list[str]) -> StudyConfig:
    """The config whose values `--help` shows as the defaults: the profile (or file) that --config or --quick in
    `argv` chooses, else the default profile."""
    profile, values = _help_settings(argv)
    try:
        return replace(PROFILES[profile], **values)
    except MLVisionError:  # an impossible value in a --config file: parsing the options says so
        return PROFILES[profile]


def help_profile(argv: list[str]) -> str:
    """The profile whose benchmark defaults `--help` shows (benchmarks/options.profile_bench)."""
    return _help_settings(argv)[0]


def chosen_settings(args: argparse.Namespace) -> tuple[str, dict]:
    """(the profile's name, the field values a --config file sets) that --config and --quick (its older spelling)
    choose: a profile name, or a .json/.yaml file on top of the default profile or of the one its `profile` key
    names. Unknown profile names and unknown keys are refused in one line."""
    if args.quick and args.config not in (None, "quick"):
        raise UnknownNameError(f"--quick and --config {args.config} contradict each other: give one of them")
    name = args.config or ("quick" if args.quick else "default")
    values, profile, where = {}, name, "--config"
    if is_config_file(name):
        values = read_config_file(name, StudyConfig, extra_keys=("profile",))
        profile, where = values.pop("profile", "default"), f"--config {name}: profile"
    if not isinstance(profile, str) or profile not in PROFILES:
        raise UnknownNameError(
            f"{where}: unknown profile {profile!r}; profiles: {', '.join(PROFILES)} (or a .json/.yaml/.yml file)"
        )
    return profile, values


def profile_name(args: argparse.Namespace) -> str:
    """The chosen profile: --config (a profile, or a file's `profile` key), or --quick, else default."""
    return chosen_settings(args)[0]


def config_from_args(args: argparse.Namespace, registered_methods: tuple[str, ...]) -> StudyConfig:
    """The study config the options describe: the chosen profile, a --config file's values on top, then the options
    given; `registered_methods` (the merge registry's names) is the default method list of profiles that do not
    name their own. An impossible value fails here, in one line (`StudyConfig.__post_init__`)."""
    profile, changes = chosen_settings(args)
    base = PROFILES[profile].with_methods(registered_methods)
    changes.update(changes_from_args(args, StudyConfig))
    if "merge_methods" in changes and "subset_methods" not in changes:
        changes["subset_methods"] = ()  # methods a user names are swept in full, unless --subset-methods says otherwise
    if "db" in changes and "artifacts" not in changes and Path(changes["db"]).resolve() != Path(base.db).resolve():
        changes["artifacts"] = artifacts_beside(changes["db"])
    return replace(base, **changes)


def artifacts_beside(db: str | Path) -> Path:
    """The model folders of a study whose --db was given without --artifacts: beside that database (X/name.duckdb ->
    X/name.artifacts/; a results.duckdb -> artifacts/ beside it), so a user's study never writes into the
    repository's committed artifacts/ (whose folders the committed results.duckdb points to)."""
    db = Path(db)
    return db.parent / ("artifacts" if db.name == "results.duckdb" else f"{db.stem}.artifacts")
