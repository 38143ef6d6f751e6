"""The `MergeMethod` record every method module fills in, and its input/hyperparameter checks.

A merge method merges ONE layer: ``fn(deltas, **hyperparams) -> Tensor`` where ``deltas`` are
k >= 1 exact weight updates ΔW_i (2-D, [out_features, in_features], same shape and dtype).
A data-aware method (kind "data_aware", e.g. RegMean) also takes per-task statistics of that
layer, named in `statistics` and passed as keyword lists aligned with ``deltas``:
``fn(deltas, grams=[G_1, ..., G_k], **hyperparams)``. A test-time method (kind "test_time",
AdaMerging) learns its coefficients on unlabeled images through the whole model, so it has no
per-layer function; merging/merged_model.AdapterMerger runs it.
`MergeMethod.__call__` checks the inputs and hyperparameters, then calls the pure function.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from mlvision.errors import MergeConfigError

if TYPE_CHECKING:  # torch is imported where it is used: listing the methods needs no torch
    from torch import Tensor

# A range is (low, high, brackets): brackets is "[]", "(]", "[)" or "()" saying which ends are
# allowed, the usual interval notation. A hyperparameter whose default is an int (DARE's seed)
# must be an int; the others are real numbers.
_BRACKETS = {"[]", "(]", "[)", "()"}
KINDS = ("data_free", "data_aware", "test_time", "reference")
# kinds whose merge is not a per-layer function of ΔW (fn is None)
WHOLE_MODEL_KINDS = ("test_time", "reference")
# Every data-free method is tuned on validation from a grid of this many points (the same budget for
# each, so no method wins by having more tries); methods with a density or drop rate use 2 x 2.
GRID_SIZE = 4


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


@dataclass(frozen=True)
class MergeMethod:
    """One registered merge method: its pure per-layer function plus what a sweep needs to know."""

    name: str  # registry name
    fn: Callable[..., Tensor] | None  # fn(deltas, **hyperparams) -> merged ΔW; None for a reference
    paper: str  # citation: authors, title, venue, year (arXiv id)
    defaults: dict  # every hyperparameter with its default
    ranges: dict  # name -> (low, high, brackets), see format_range
    description: str  # one line
    # Values to choose from on the validation split, e.g. {"density": (0.2, 0.5), "scaling": (0.7, 1.0)}:
    # the grid is the Cartesian product of its hyperparameters' values (`grid_points`, the default point
    # first); the sweep scores every point on validation, keeps the best and stores them all. Every
    # data-free method of the study has a grid of GRID_SIZE points that contains its default.
    grid: dict = field(default_factory=dict)
    # Where the default (the grid's first point) comes from: the paper, its code, or why it was chosen.
    default_source: str = ""
    # True when fn(deltas, scaling=s, **rest) == s * fn(deltas, scaling=1, **rest) for every input:
    # the sweep then merges once per combination of the other hyperparameters and multiplies, instead
    # of re-merging per value of scaling (tests/test_merge_methods.py checks the identity per method).
    scaling_is_output_multiplier: bool = False
    # "data_free": a pure per-layer function on ΔW (`fn`); "data_aware": the same plus per-task statistics
    # of the layer's inputs (`statistics`); "test_time": coefficients learned on unlabeled test images
    # through the whole model (no `fn`); "reference": another library's merge of whole adapters (peft's
    # add_weighted_adapter). merging/merged_model.AdapterMerger runs every kind.
    kind: str = "data_free"
    options: dict = field(default_factory=dict)  # fixed settings passed to a reference's library
    # Per-task statistics a data-aware fn takes as keyword lists aligned with the deltas, e.g. ("grams",).
    statistics: tuple[str, ...] = ()
    # Statistics a data-aware fn can take to skip work, same shape as the deltas (RegMean's ΔW_i G_i, which
    # a sweep computes once per adapter instead of once per merge); the result must not depend on them.
    optional_statistics: tuple[str, ...] = ()
    # For a method too costly to sweep in full on 2 CPU cores: the part of the sweep it runs on, e.g.
    # {"k": (2, 4, 6), "seeds": (0,)}; None = every group and seed like the others.
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

    def __post_init__(self) -> None:  # a programming error, not a user error: fail at import
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}")
        if (self.fn is None) != (self.kind in WHOLE_MODEL_KINDS):
            raise ValueError(f"{self.name}: a per-layer method needs fn; a {self.kind} method has none")
        if bool(self.statistics) != (self.kind == "data_aware"):
            raise ValueError(f"{self.name}: a data-aware method names its statistics, and only it")
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
        return len(self.grid_points()) > 1

    def grid_points(self) -> list[dict]:
        """The grid as a list of points {hyperparameter: value}: the Cartesian product of the grid's
        values (hyperparameters in the grid's order), the default point first, the others in product
        order. A method without a grid has one point, {} (its defaults)."""
        names = list(self.grid)
        points = [dict(zip(names, values)) for values in itertools.product(*(self.grid[n] for n in names))]
        default = {name: self.defaults[name] for name in names}
        return [default] + [point for point in points if point != default]

    def selection_rule(self) -> list[dict]:
        """The grid points chosen from on validation (`grid_points`); [] when the method is untuned."""
        return self.grid_points() if self.tuned else []

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
