"""The study's configuration: one dataclass, named profiles, and the CLI options built from it.

`default` is the offline study of the README (six tasks, three seeds, EfficientNet-Lite0 at 48 px),
sized to train on two CPU cores in about a quarter of an hour; `quick` runs the same pipeline on
a sliver of everything in about a minute, for smoke tests. `paper` is the same study at the scale
of the ViT merging literature (ViT-B/16 from the hub, six hub datasets, 224 px; needs a network
and GPUs, see `accelerate launch`), and `tiny-vit` is its offline miniature (a randomly initialised
ViT-Tiny on small local copies of offline tasks, saved like hub datasets), which the tests run.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from mlvision.backbone import BackboneConfig, default_target_modules
from mlvision.errors import UnknownNameError
from mlvision.paths import DEFAULT_ARTIFACTS_DIR, DEFAULT_DB_PATH, REPO_ROOT
from mlvision.store import config_hash, stored_paths
from mlvision.tasks import STUDY_TASKS, TASK_NAMES


@dataclass(frozen=True)
class StudyConfig:
    tasks: tuple[str, ...] = STUDY_TASKS
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
    # Equal footing (study v2): every adapter and head trains on the same number of images (uci_digits,
    # the smallest task, has 1,078), though not for the same number of steps (adapters: `steps` batches drawn
    # with replacement; heads: `head_epochs` passes of ceil(max_train / 256) batches).
    max_train: int | None = 1000
    max_validation: int | None = 1000
    max_test: int | None = 2000
    # merge sweep (merging/sweep.py)
    # None = every method in the merge registry (merging/methods/__init__.py); the core cannot import
    # that registry, so whoever builds a config for a stage resolves it (`with_methods`).
    merge_methods: tuple[str, ...] | None = None
    max_k: int = 6
    # groups up to this size are merged for every seed, larger ones for the first seed only; None = every
    # seed at every k (the default: a verdict at k = 6 needs more than one merged model)
    merge_all_seeds_up_to_k: int | None = None
    # None = every group of each size; N = a fixed, seeded sample of N groups per size k >= 3 (pairs are
    # always all merged), for suites of more than six tasks, where the groups outgrow the time budget
    max_groups_per_k: int | None = None
    merge_eval: int | None = 300  # test images per task scored for each merged model (fixed subset)
    # validation images per task for choosing each method's hyperparameters (4 grid points per merge: at
    # 100 images the grid cost twice the test evaluation, and the default run overshot its time budget)
    merge_select: int | None = 50
    # where things go
    db: Path = DEFAULT_DB_PATH
    artifacts: Path = DEFAULT_ARTIFACTS_DIR
    # added later; left out of stored configs while at their defaults, so earlier identities stand
    task_domains: tuple[tuple[str, str], ...] = ()  # (hub task, domain) pairs for the findings
    mixed_precision: str = "no"  # "no" | "bf16": adapter training under accelerate
    grad_accum: int = 1  # micro-batches per step (same global batch)
    # LoRA steps in channels_last memory order: 1.4-1.8x faster on 2 CPU cores (benchmark variant
    # lora_channels_last), other float rounding, so other weights; on since study v2.
    channels_last: bool = True
    # Adapters given instead of trained (run_all --adapters, study/given.py): (task, seed, folder, sha256 of
    # the folder's weight files). The training stage imports them and trains only the head baselines; their
    # identity is their content, so the same files give the same model ids wherever they lie.
    given_adapters: tuple[tuple[str, int, str, str], ...] = ()
    backbone_base: str = ""  # given adapters' base: local-dir:FOLDER or transformers:FOLDER (mlvision/backbone.py)
    # The findings' exclusion rules (study/findings.py, ExclusionRules): a task measured on too few images or at the
    # ceiling is left out of every claim. The defaults suit the default study; a small study lowers the image counts.
    min_test_images: int = 350  # smallest test split (task_results' n_test) a kept task may have
    min_merge_eval_images: int = 300  # fewest test images a kept task's merged models may be scored on
    max_adapter_accuracy: float = 0.99  # a single adapter's mean test accuracy above this: at the ceiling
    max_head_accuracy: float = 0.97  # a head baseline's mean test accuracy above this: at the ceiling

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
        for name, default in (
            ("task_domains", ()),
            ("mixed_precision", "no"),
            ("grad_accum", 1),
            ("channels_last", False),
            ("given_adapters", ()),
            ("backbone_base", ""),
            ("min_test_images", 350),
            ("min_merge_eval_images", 300),
            ("max_adapter_accuracy", 0.99),
            ("max_head_accuracy", 0.97),
        ):
            if getattr(self, name) == default:
                del data[name]  # a run without them keeps the run id it had before they existed
        if "task_domains" in data:
            data["task_domains"] = dict(self.task_domains)
        return data


STAGES = ("train", "merge", "findings", "bench")

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

# The default study's methods (study v2): each has its strength chosen on validation from a grid of the
# same size (merging/methods). linear is task arithmetic at λ = 1/k, so tuning its scaling would repeat
# task arithmetic; dare_ties (TIES after a random drop), dare_linear, magnitude_prune, knots_ta and peft's
# references stay available (--merge-methods) but are left out to keep the default run within its time
# budget (a merge costs about 0.8 s per task it serves on 2 CPU cores, 4-point grid included).
STUDY_MERGE_METHODS = ("task_arithmetic", "ties", "knots_ties", "tsv_m", "iso_c", "iso_cts", "regmean", "adamerging")

PROFILES = {
    "default": StudyConfig(merge_methods=STUDY_MERGE_METHODS),
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


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI options for every StudyConfig field (defaults come from the chosen profile)."""
    parser.add_argument(
        "--config",
        choices=list(PROFILES),
        help="named profile giving every option's default: default (the offline study), "
        "quick (smoke test), paper (ViT-B/16 + six hub datasets; network, GPUs), tiny-vit (its offline miniature)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="same as --config quick: whole pipeline on a sliver of the data in about a minute (smoke test)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        help=f"tasks to study (default: {' '.join(STUDY_TASKS)}; registered: {' '.join(TASK_NAMES)}; "
        "also hub:<dataset id or saved folder>)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds (default: 0 1 2)")
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
        "--backbone", help="timm model name (default: tf_efficientnet_lite0, weights from an offline package)"
    )
    parser.add_argument(
        "--backbone-weights",
        choices=["auto", "package", "hub", "random"],
        help="where the backbone weights come from (default: auto = offline package if one exists, else the timm hub)",
    )
    parser.add_argument("--image-size", type=int, help="square input size in pixels (default: 48)")
    parser.add_argument("--rank", type=int, help="LoRA rank (default: 8)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha; scaling = alpha / rank (default: 16)")
    parser.add_argument(
        "--target-modules",
        nargs="+",
        help="LoRA target module names "
        "(default: conv_pw conv_pwl conv_head for EfficientNet; qkv proj fc1 fc2 for ViT)",
    )
    parser.add_argument("--steps", type=int, help="adapter training steps (default: 200)")
    parser.add_argument("--batch-size", type=int, help="adapter training batch size (default: 64)")
    parser.add_argument("--lr", type=float, help="LoRA learning rate (default: 3e-3)")
    parser.add_argument("--head-lr", type=float, help="task head learning rate (default: 1e-2)")
    parser.add_argument(
        "--head-epochs", type=int, help="epochs of head-baseline training on cached features (default: 30)"
    )
    parser.add_argument(
        "--max-train",
        type=int,
        help="images per task used for training (fixed subset, the same for every task; default: 1000)",
    )
    parser.add_argument("--max-validation", type=int, help="validation images per task (default: 1000)")
    parser.add_argument(
        "--max-test", type=int, help="test images per task (fixed subset, same for every model; default: 2000)"
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        help="stages to run, in order (default: all, the benchmarks only when this run stored something new: a study "
        "already stored does not measure a new machine unless asked with --stages bench)",
    )
    parser.add_argument(
        "--merge-methods",
        nargs="+",
        help="merge methods for the sweep (default profile: "
        + " ".join(STUDY_MERGE_METHODS)
        + "; other profiles name their own)",
    )
    parser.add_argument("--max-k", type=int, help="largest group of adapters merged (default: 6)")
    parser.add_argument(
        "--merge-all-seeds-up-to-k",
        type=int,
        help="groups up to this size are merged for every seed, larger ones for the first seed only "
        "(default: every seed at every k)",
    )
    parser.add_argument(
        "--max-groups-per-k",
        type=int,
        help="merge a fixed, seeded sample of this many groups of each size k >= 3 (pairs: always all; default: all)",
    )
    parser.add_argument(
        "--merge-eval", type=int, help="test images per task scored for each merged model (fixed subset; default: 300)"
    )
    parser.add_argument(
        "--merge-select",
        type=int,
        help="validation images per task used to choose each method's hyperparameters (default: 50)",
    )
    parser.add_argument(
        "--task-domains",
        nargs="+",
        metavar="TASK=DOMAIN",
        help="domain tags of hub tasks for the same- vs cross-domain findings (default: the profile's, else 'hub')",
    )
    parser.add_argument(
        "--min-test-images",
        type=int,
        help="findings: leave a task out of the claims when its smallest test split has fewer images "
        "(default: 350; lower it for a study of small datasets)",
    )
    parser.add_argument(
        "--min-merge-eval-images",
        type=int,
        help="findings: leave a task out of the claims when its merged models were scored on fewer test images "
        "(default: 300; see --merge-eval)",
    )
    parser.add_argument(
        "--max-adapter-accuracy",
        type=_accuracy,
        help="findings: leave a task out of the claims when its single adapter's mean test accuracy is above this "
        "fraction, at the ceiling (default: 0.99)",
    )
    parser.add_argument(
        "--max-head-accuracy",
        type=_accuracy,
        help="findings: leave a task out of the claims when its head baseline's mean test accuracy is above this "
        "fraction, at the ceiling (default: 0.97)",
    )
    parser.add_argument(
        "--mixed-precision", choices=["no", "bf16"], help="adapter training precision, under accelerate (default: no)"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train adapters in channels_last memory order: 1.4-1.8x faster steps on CPUs, slightly different "
        "weights, so other adapter identities (default: on)",
    )
    parser.add_argument(
        "--grad-accum",
        type=int,
        help="micro-batches per training step; the global batch stays --batch-size (default: 1)",
    )
    parser.add_argument(
        "--db",
        type=Path,
        help="results database "
        "(default: results.duckdb at the repo root; other profiles: runs/<profile>/results.duckdb)",
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        help="folder for adapters and heads (default: the profile's, artifacts/ at the repo root for the default "
        "study; with another --db, beside it: X/name.duckdb -> X/name.artifacts/); a model folder already there "
        "with the same configuration is reused, never retrained over",
    )


def _accuracy(text: str) -> float:
    """An accuracy bound as a fraction (0.99, not 99): argparse's one-line error otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (0.99 for 99 %), got {text}")
    return value


def profile_name(args: argparse.Namespace) -> str:
    """The chosen profile: --config, or --quick (its older spelling), else default."""
    if args.quick and args.config not in (None, "quick"):
        raise UnknownNameError(f"--quick and --config {args.config} contradict each other: give one of them")
    return args.config or ("quick" if args.quick else "default")


def config_from_args(args: argparse.Namespace, registered_methods: tuple[str, ...]) -> StudyConfig:
    """The study config the options describe; `registered_methods` (the merge registry's names) is the
    default method list of profiles that do not name their own."""
    base = PROFILES[profile_name(args)].with_methods(registered_methods)
    changes = {}
    for f in fields(StudyConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            changes[f.name] = tuple(value) if isinstance(value, list) else value
    if "task_domains" in changes:
        changes["task_domains"] = parse_task_domains(changes["task_domains"])
    if "db" in changes and "artifacts" not in changes and Path(changes["db"]).resolve() != Path(base.db).resolve():
        changes["artifacts"] = artifacts_beside(changes["db"])
    return replace(base, **changes)


def artifacts_beside(db: str | Path) -> Path:
    """The model folders of a study whose --db was given without --artifacts: beside that database (X/name.duckdb ->
    X/name.artifacts/; a results.duckdb -> artifacts/ beside it), so a user's study never writes into the
    repository's committed artifacts/ (whose folders the committed results.duckdb points to)."""
    db = Path(db)
    return db.parent / ("artifacts" if db.name == "results.duckdb" else f"{db.stem}.artifacts")


def parse_task_domains(items) -> tuple[tuple[str, str], ...]:
    """("hub:x=digits", ...) -> (("hub:x", "digits"), ...); the last "=" splits (ids have none)."""
    pairs = []
    for item in items:
        task, sep, domain = item.rpartition("=")
        if not sep or not task or not domain:
            raise UnknownNameError(f"--task-domains expects TASK=DOMAIN, got {item!r}")
        pairs.append((task, domain))
    return tuple(pairs)
