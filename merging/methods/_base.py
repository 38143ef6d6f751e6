"""The `MergeMethod` record every method module fills in, and its input/hyperparameter checks.

A merge method merges ONE layer: ``fn(deltas, **hyperparams) -> Tensor`` where ``deltas`` are
k >= 1 exact weight updates ΔW_i (2-D, [out_features, in_features], same shape and dtype).
What a method merges from is its `kind` (`MethodKind`); what a kind needs is a field of the record:
a data-aware method (RegMean) also takes per-task statistics of that layer, named in `statistics`
and passed as keyword lists aligned with ``deltas``: ``fn(deltas, grams=[G_1, ..., G_k], **hyperparams)``;
a test-time method (AdaMerging) learns through the whole model on unlabeled images (`learn`), so it
has no per-layer function; a reference is another library's merge (`options`). `KIND_PARTS` says which
parts each kind defines; merging/merged_model.RUNNERS runs each kind, the one code that branches on it.
`MergeMethod.__call__` checks the inputs and hyperparameters, then calls the pure function.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Callable, Sequence

from mlvision.errors import MergeConfigError

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor

# A range is (low, high, brackets): brackets is "[]", "(]", "[)" or "()" saying which ends are
# allowed, the usual interval notation. A hyperparameter whose default is an int (DARE's seed)
# must be an int; the others are real numbers.
_BRACKETS = {"[]", "(]", "[)", "()"}


class MethodKind(StrEnum):
    """What a merge method merges from. A `StrEnum`: each kind is its stored name (MethodKind.DATA_FREE ==
    "data_free", and prints as it), so stored strings, JSON and `list_methods(kind="data_free")` keep working."""

    DATA_FREE = "data_free"  # a pure per-layer function of the layer's k updates (`fn`)
    DATA_AWARE = "data_aware"  # the same plus per-task statistics of the layer's inputs (`statistics`)
    TEST_TIME = "test_time"  # learned through the whole model on the unlabeled test images (`learn`)
    REFERENCE = "reference"  # another library's merge of whole adapters (peft's add_weighted_adapter: `options`)


# The parts each kind of method defines, and no other kind does (checked when a method is declared, so a method cannot
# carry another kind's rules). How each kind is run: merging/merged_model.RUNNERS, the one code that branches on kind.
KIND_PARTS = {
    MethodKind.DATA_FREE: ("fn",),
    MethodKind.DATA_AWARE: ("fn", "statistics"),
    MethodKind.TEST_TIME: ("learn",),
    MethodKind.REFERENCE: ("options",),
}
_PARTS = tuple(dict.fromkeys(part for parts in KIND_PARTS.values() for part in parts))
# Every tuned method is tuned on validation from a grid of this many points (the same budget for each, so no method
# wins by having more tries), with at least three values of each hyperparameter (so a choice at the grid's edge
# shows; study v3): five values of one hyperparameter, or a star of five around the default where a method has two
# (a density or drop rate beside its scaling: `grid_design="star"`). Values set from where a 200-image pilot's
# optima sat (issue 33; each method's docstring).
GRID_SIZE = 5


def format_range(spec: tuple) -> str:
    low, high, brackets = spec
    return f"{brackets[0]}{low}, {high}{brackets[1]}"


def _shown(value) -> str:
    """A hyperparameter's value as a one-line message shows it: its repr, or, for an integer too long to read (or
    to convert: str() refuses more than sys.get_int_max_str_digits() digits), how many digits it has."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(value) >= 10**20:
        digits = int((abs(value).bit_length() - 1) * math.log10(2)) + 1  # exact or one short
        digits += abs(value) >= 10**digits
        return f"a {'negative ' if value < 0 else ''}{digits}-digit integer"
    return repr(value)


def _in_range(value: float, spec: tuple) -> bool:
    low, high, brackets = spec
    low_ok = value >= low if brackets[0] == "[" else value > low
    high_ok = value <= high if brackets[1] == "]" else value < high
    return low_ok and high_ok


# The part of the sweep a costly method runs on (AdaMerging's `study_subset`, and the methods a study names in
# `subset_methods`, merging/sweep.py `in_study_subset`): groups of 2 and of 6 tasks, first seed; in the six-task
# default, the two ends of the merge-count axis (every pair and the one group of all six). k = 4 was in it until
# 2026-12-06: its 15 groups cost the ten subset methods 273 s of the default run (merge_seconds 192 s plus test
# scoring), which put the run at 49 min 44 s against the 45-minute budget (issue 31); their k = 4 merges stay in the
# committed results.duckdb.
STUDY_SUBSET = {"k": (2, 6), "seeds": (0,)}


@dataclass(frozen=True)
class StartsFrom:
    """Where a method's starting point comes from: another method's choice on validation for the same group and seed
    (AdaMerging starts its coefficients at task arithmetic's chosen λ). The sweep selects `method` first and sets
    this method's hyperparameter `sets` to the value of `chosen` it kept."""

    method: str  # a registered method ("task_arithmetic")
    chosen: str  # its hyperparameter whose chosen value is taken ("scaling")
    sets: str  # this method's hyperparameter set to it ("init")


@dataclass(frozen=True)
class MergeMethod:
    """One registered merge method: its pure per-layer function plus what a sweep needs to know."""

    name: str  # registry name
    fn: Callable[..., Tensor] | None  # fn(deltas, **hyperparams) -> merged ΔW; None for a reference
    paper: str  # citation: authors, title, venue, year (arXiv id)
    defaults: dict  # every hyperparameter with its default
    ranges: dict  # name -> (low, high, brackets), see format_range
    description: str  # one line
    # Values to choose from on the validation split, e.g. {"density": (0.1, 0.2, 0.5), "scaling": (0.7, 1.0, 1.3)}:
    # the grid is the Cartesian product of its hyperparameters' values, or with grid_design="star" the default point
    # and each hyperparameter's other values with the rest at their defaults (`grid_points`, the default point
    # first); the sweep scores every point on validation, keeps the best and stores them all. Every tuned method of
    # the study has a grid of GRID_SIZE points that contains its default.
    grid: dict = field(default_factory=dict)
    grid_design: str = "product"  # "product" or "star" (see `grid`)
    # How the best λ falls as more tasks are merged: the grid's `scaling` values are for a pair, and for k tasks each is
    # multiplied by (2/k)^p with p this exponent (`grid_points(k)`; 0: one grid for every k). A sum of k updates
    # grows about like k, so task arithmetic's optimum falls about like 1/k (p = 1, `linear`'s λ/k); methods that
    # already average or project fall more slowly. Why: a fixed grid put validation's choice at its largest value
    # for pairs and its smallest for groups of six (issue 33); each method's docstring gives the pilot that set p.
    scaling_falls_with_k: float = 0.0
    # Where the default (the grid's first point) comes from: the paper, its code, or why it was chosen.
    default_source: str = ""
    # True when fn(deltas, scaling=s, **rest) == s * fn(deltas, scaling=1, **rest) for every input:
    # the sweep then merges once per combination of the other hyperparameters and multiplies, instead
    # of re-merging per value of scaling (tests/test_merge_methods.py checks the identity per method).
    scaling_is_output_multiplier: bool = False
    # What it merges from (`MethodKind`; a string is converted): which parts it defines (`KIND_PARTS`) and how
    # merging/merged_model.AdapterMerger runs it (`RUNNERS`).
    kind: MethodKind | str = MethodKind.DATA_FREE
    options: dict = field(default_factory=dict)  # fixed settings passed to a reference's library
    # Per-task statistics a data-aware fn takes as keyword lists aligned with the deltas, e.g. ("grams",).
    statistics: tuple[str, ...] = ()
    # Statistics a data-aware fn can take to skip work, same shape as the deltas (RegMean's ΔW_i G_i, which
    # a sweep computes once per adapter instead of once per merge); the result must not depend on them.
    optional_statistics: tuple[str, ...] = ()
    # For a method too costly to sweep in full on 2 CPU cores: the part of the sweep it runs on, e.g.
    # STUDY_SUBSET; None = every group and seed like the others.
    study_subset: dict | None = None
    # A method whose definition spans the whole model, not one layer (TIES' trim over the whole task vector):
    # merge_model({layer: [ΔW_1..ΔW_k]}, **hyperparams) -> {layer: ΔW}; merging/merged_model.merge_deltas calls
    # it instead of `fn` layer by layer. `fn` stays the per-layer function (a one-layer model).
    merge_model: Callable[..., dict] | None = None
    # Hyperparameters added after a study was stored, with the value that reproduces the old behaviour: left
    # out of a merge's identity while at that value (`identity_defaults`), so stored merges keep their ids.
    added_later: dict = field(default_factory=dict)
    # Other libraries' names for a hyperparameter: {their name: (ours, how their value becomes ours)}, e.g. DARE's
    # `density` (peft and mergekit: the share kept) for our `drop_rate` (the share dropped). Accepted on input;
    # what is stored and shown is always our name.
    aliases: dict = field(default_factory=dict)
    # Figures a merge records beside its hyperparameters (stored with them in merges.hyperparams; never inputs:
    # `inputs` drops them), e.g. RegMean's ("singular_channels",), AdaMerging's learned coefficients.
    recorded_outputs: tuple[str, ...] = ()
    # A per-layer method's recorded outputs: record([{layer: ΔW} per adapter], **statistics) -> {output: value}, with
    # each of its `statistics` as one {layer: tensor} per adapter (RegMean: how many input channels it regularized).
    record: Callable[..., dict] | None = None
    # A test-time method's learning: learn(folded, adapters, unlabeled, **hyperparams) -> (merged ΔW per layer,
    # {recorded output: value}), `adapters` the group's AdapterDeltas, `unlabeled` each one's task's unlabeled images.
    learn: Callable[..., tuple[dict, dict]] | None = None
    # The recorded output a test-time merge is rebuilt from without learning again (AdaMerging's "coefficients"), and
    # rebuild(adapters, stored value) -> merged ΔW per layer; the demo serves such a method where a merge stored it.
    rebuilt_from: str | None = None
    rebuild: Callable[..., dict] | None = None
    # Where its starting point comes from (`StartsFrom`); None: its own defaults.
    starts_from: StartsFrom | None = None
    # Whether the demo may serve it (peft's references are for comparison in the study only). What serving needs
    # follows from the other fields: its `statistics` (each task's training images), or its `rebuilt_from` output.
    servable: bool = True
    # Where it merges: "full" (the updates as they are) or "core" (the group's Core Space, U_Bᵀ ΔW_i V_A: a record
    # made by merging/methods/core_space.in_core_space from the full-space method `<name>` without "_core").
    space: str = "full"

    def __post_init__(self) -> None:  # a programming error, not a user error: fail at import
        if self.kind not in tuple(MethodKind):
            raise ValueError(f"{self.name}: kind must be one of {[str(kind) for kind in MethodKind]}")
        object.__setattr__(self, "kind", MethodKind(self.kind))
        for part in _PARTS:
            needed = part in KIND_PARTS[self.kind]
            if bool(getattr(self, part)) != needed:
                raise ValueError(
                    f"{self.name}: a {self.kind} method {'needs' if needed else 'has no'} `{part}` "
                    f"(KIND_PARTS in merging/methods/_base.py)"
                )
        if set(self.recorded_outputs) & set(self.defaults):
            raise ValueError(f"{self.name}: a recorded output is not a hyperparameter; rename one of them")
        if self.record is not None and (self.fn is None or not self.recorded_outputs):
            raise ValueError(f"{self.name}: `record` is for a per-layer method, and names its `recorded_outputs`")
        if (self.rebuilt_from is None) != (self.rebuild is None) or (
            self.rebuilt_from is not None and (self.learn is None or self.rebuilt_from not in self.recorded_outputs)
        ):
            raise ValueError(f"{self.name}: `rebuilt_from` (one of its recorded_outputs) and `rebuild` go together, "
                             "for a test-time method")  # fmt: skip
        if self.servable and self.learn is not None and self.rebuilt_from is None:
            raise ValueError(
                f"{self.name}: a test-time method is served only rebuilt from what the study stored: give "
                "`rebuilt_from` and `rebuild`, or servable=False"
            )
        if self.starts_from is not None and self.starts_from.sets not in self.defaults:
            raise ValueError(f"{self.name}: starts_from sets {self.starts_from.sets!r}, which is not a hyperparameter")
        if self.space not in ("full", "core"):
            raise ValueError(f"{self.name}: space is 'full' or 'core'")
        if self.grid_design not in ("product", "star"):
            raise ValueError(f"{self.name}: grid_design is 'product' or 'star'")
        if set(self.grid) - set(self.defaults):
            raise ValueError(f"{self.name}: the grid names a hyperparameter it does not have")
        if set(self.defaults) != set(self.ranges):
            raise ValueError(f"{self.name}: defaults and ranges must name the same hyperparameters")
        if any(name not in self.defaults or alias in self.defaults for alias, (name, _) in self.aliases.items()):
            raise ValueError(f"{self.name}: an alias must name one of its hyperparameters, and not be one")
        for key, values in self.grid.items():
            if not values or not all(_in_range(v, self.ranges[key]) for v in values):
                raise ValueError(f"{self.name}: the grid of {key!r} is empty or leaves its range")
            if self.defaults[key] not in values:
                raise ValueError(f"{self.name}: the grid of {key!r} must contain its default {self.defaults[key]}")
        if self.scaling_falls_with_k and ("scaling" not in self.grid or self.scaling_falls_with_k < 0):
            raise ValueError(f"{self.name}: scaling_falls_with_k (>= 0) needs `scaling` on the grid")
        if self.scaling_is_output_multiplier and "scaling" not in self.defaults:
            raise ValueError(f"{self.name}: scaling_is_output_multiplier needs a 'scaling' hyperparameter")
        for spec in self.ranges.values():
            if len(spec) != 3 or spec[2] not in _BRACKETS:
                raise ValueError(f"{self.name}: bad range {spec!r}")

    def validate(self, hyperparams: dict | None = None) -> dict:
        """Return a full hyperparameter dict (defaults filled in) or raise MergeConfigError."""
        hyperparams = dict(hyperparams or {})
        for alias, (name, convert) in self.aliases.items():
            if alias in hyperparams:
                if name in hyperparams:
                    raise MergeConfigError(
                        f"merge method '{self.name}': give {alias!r} or {name!r}, not both ({alias} is another "
                        f"library's name for {name})"
                    )
                value = hyperparams.pop(alias)
                hyperparams[name] = (
                    convert(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
                )
        unknown = sorted(set(hyperparams) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "(none)"
            raise MergeConfigError(
                f"merge method '{self.name}' has no hyperparameter {unknown[0]!r}; it takes: {known}"
            )
        full = dict(self.defaults)
        for key, value in hyperparams.items():
            spec = self.ranges[key]
            allowed = format_range(spec)
            wants_int = isinstance(self.defaults[key], int) and not isinstance(self.defaults[key], bool)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or (wants_int and not isinstance(value, numbers.Integral))
            ):
                kind = "an integer" if wants_int else "a number"
                raise MergeConfigError(
                    f"merge method '{self.name}': hyperparameter '{key}' = {_shown(value)} must be {kind} in {allowed}"
                )
            # an int is finite however large (float() of one past 1e308 would overflow); nan and inf are refused
            finite = isinstance(value, numbers.Integral) or math.isfinite(value)
            if not finite or not _in_range(value, spec):
                raise MergeConfigError(
                    f"merge method '{self.name}': hyperparameter '{key}' = {_shown(value)} is out of range; "
                    f"allowed {allowed}"
                )
            full[key] = int(value) if wants_int else float(value)
        return full

    def check_deltas(self, deltas: Sequence[Tensor]) -> list[Tensor]:
        """The deltas as a list, or MergeConfigError naming what is wrong and at which index."""
        from torch import Tensor

        if isinstance(deltas, Tensor) or not isinstance(deltas, Sequence):
            raise MergeConfigError(
                f"merge method '{self.name}': deltas must be a list of 2-D tensors, got {type(deltas).__name__}"
            )
        deltas = list(deltas)
        if not deltas:
            raise MergeConfigError(f"merge method '{self.name}': needs at least one update, got none")
        for i, d in enumerate(deltas):
            if not isinstance(d, Tensor) or d.dim() != 2:
                what = f"shape {tuple(d.shape)}" if isinstance(d, Tensor) else type(d).__name__
                raise MergeConfigError(
                    f"merge method '{self.name}': update {i} must be a 2-D tensor "
                    f"[out_features, in_features], got {what} (flatten conv kernels first)"
                )
            if not d.is_floating_point():
                raise MergeConfigError(
                    f"merge method '{self.name}': update {i} has dtype {d.dtype}; a floating-point tensor is needed"
                )
        ref = deltas[0]
        for i, d in enumerate(deltas[1:], start=1):
            if d.shape != ref.shape:
                raise MergeConfigError(
                    f"merge method '{self.name}': update {i} has shape {tuple(d.shape)} but "
                    f"update 0 has {tuple(ref.shape)}; all updates of a layer must match"
                )
            if d.dtype != ref.dtype:
                raise MergeConfigError(
                    f"merge method '{self.name}': update {i} has dtype {d.dtype} but update 0 "
                    f"has {ref.dtype}; cast them to one dtype first"
                )
        return deltas

    @property
    def per_layer(self) -> bool:
        """Whether it is a function of one layer's updates (`fn`): data-free and data-aware methods."""
        return self.fn is not None

    @property
    def transductive(self) -> bool:
        """Whether it learns on the unlabeled test images it is then scored on (a test-time method: `learn`)."""
        return self.learn is not None

    @property
    def uses_data(self) -> bool:
        """Whether it merges from more than the updates: statistics of the training images, or the test images."""
        return bool(self.statistics) or self.transductive

    def inputs(self, hyperparams: dict) -> dict:
        """`hyperparams` without what a merge records beside them (`recorded_outputs`): what a stored merge was made
        with."""
        return {key: value for key, value in hyperparams.items() if key not in self.recorded_outputs}

    def identity_defaults(self) -> dict:
        """The defaults that identify a merge: every default except those added later at their old value."""
        return {
            key: value
            for key, value in self.defaults.items()
            if not (key in self.added_later and self.added_later[key] == value)
        }

    @property
    def tuned(self) -> bool:
        """Whether the sweep chooses hyperparameters on validation (a grid of more than one point)."""
        return len(self.grid_points(2)) > 1

    def grid_points(self, k: int) -> list[dict]:
        """The grid for merging k tasks as a list of points {hyperparameter: value}, the default point first: the
        Cartesian product of the grid's values (hyperparameters in the grid's order, the others in product order)
        or, for a star (`grid_design`), each hyperparameter's other values in turn with the rest at their defaults.
        Where `scaling_falls_with_k` is p > 0, every point's `scaling` is the pair's value times (2/k)^p, to three
        significant digits (so a stored choice reads as the number merged). A method without a grid has one point,
        {} (its defaults)."""
        names = list(self.grid)
        default = {name: self.defaults[name] for name in names}
        if self.grid_design == "star":
            points = [{**default, name: value} for name in names for value in self.grid[name]]
        else:
            points = [dict(zip(names, values)) for values in itertools.product(*(self.grid[n] for n in names))]
        points = [default] + [point for i, point in enumerate(points) if point != default and point not in points[:i]]
        if self.scaling_falls_with_k:
            factor = (2 / k) ** self.scaling_falls_with_k
            points = [{**point, "scaling": float(f"{point['scaling'] * factor:.3g}")} for point in points]
        return points

    def selection_rule(self, k: int) -> list[dict]:
        """The grid points chosen from on validation when merging k tasks (`grid_points`); [] when untuned."""
        return self.grid_points(k) if self.tuned else []

    def check_statistics(self, deltas: list[Tensor], statistics: dict) -> dict:
        """The per-task statistics the method needs (one [in, in] matrix per update), or MergeConfigError."""
        from torch import Tensor

        unknown = sorted(set(statistics) - set(self.statistics) - set(self.optional_statistics))
        if unknown:
            raise MergeConfigError(f"merge method '{self.name}' takes no statistic {unknown[0]!r}")
        for name in self.statistics:
            values = statistics.get(name)
            if values is None:
                raise MergeConfigError(
                    f"merge method '{self.name}' needs the {name} of every adapter's layer inputs; "
                    "merge through merging.merged_model.AdapterMerger, which computes them"
                )
            values = list(values)
            if len(values) != len(deltas):
                raise MergeConfigError(
                    f"merge method '{self.name}': {len(values)} {name} for {len(deltas)} updates; give one per update"
                )
            in_features = deltas[0].shape[1]
            for i, value in enumerate(values):
                if not isinstance(value, Tensor) or value.shape != (in_features, in_features):
                    what = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise MergeConfigError(
                        f"merge method '{self.name}': {name} {i} must be [{in_features}, {in_features}] "
                        f"(the layer's in_features), got {what}"
                    )
            statistics = {**statistics, name: values}
        for name in self.optional_statistics:
            values = statistics.get(name)
            if values is None:
                continue
            values = list(values)
            if len(values) != len(deltas) or any(
                not isinstance(v, Tensor) or v.shape != deltas[0].shape for v in values
            ):
                raise MergeConfigError(
                    f"merge method '{self.name}': {name} must be one {tuple(deltas[0].shape)} tensor per update"
                )
            statistics = {**statistics, name: values}
        return statistics

    def __call__(self, deltas: Sequence[Tensor], **arguments) -> Tensor:
        import torch

        if self.fn is None:
            raise MergeConfigError(
                f"'{self.name}' is a {self.kind} merge of whole adapters, not a per-layer "
                "function: merge adapters with merging.merged_model.AdapterMerger"
            )
        names = (*self.statistics, *self.optional_statistics)
        statistics = {name: arguments.pop(name) for name in list(arguments) if name in names}
        params = self.validate(arguments)
        deltas = self.check_deltas(deltas)
        statistics = self.check_statistics(deltas, statistics)
        with torch.no_grad():
            return self.fn(deltas, **statistics, **params)
