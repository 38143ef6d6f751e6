"""The merge-method registry: every method the project knows, found by name. The one list of them.

A data-free method merges ONE layer: ``get_method(name)(deltas, **hyperparams) -> Tensor`` where
``deltas`` are k >= 1 exact updates ΔW_i = scaling_i · B_i A_i of that layer (2-D
[out_features, in_features], same shape and dtype; the caller flattens 1x1 convs). What each kind
of method defines instead (`MethodKind`, `KIND_PARTS` in _base.py) is a field of its record, and
`merging.merged_model.AdapterMerger` runs every kind. Each module here defines one method's function
and its `METHOD` record (paper, defaults, ranges, validation grid); `_ALL` below lists them once, in
the order the study runs them and the dashboard colours them, and the study's default method list
is every name registered here. See docs/ARCHITECTURE.md ("A merge method").
"""

from __future__ import annotations

import functools

from mlvision.errors import UnknownNameError

from . import (
    adamerging,
    core_space,
    dare_linear,
    dare_ties,
    iso_c,
    iso_cts,
    knots_ta,
    knots_ties,
    linear,
    magnitude_prune,
    peft_references,
    regmean,
    task_arithmetic,
    ties,
    tsv_m,
    wudi,
)
from ._base import STUDY_SUBSET, MergeMethod, MethodKind
from .task_arithmetic import TASK_ARITHMETIC_GRID

_ALL = [
    linear.METHOD,
    task_arithmetic.METHOD,
    ties.METHOD,
    dare_linear.METHOD,
    dare_ties.METHOD,
    magnitude_prune.METHOD,
    knots_ties.METHOD,
    knots_ta.METHOD,
    tsv_m.METHOD,
    iso_c.METHOD,
    iso_cts.METHOD,
    regmean.METHOD,
    adamerging.METHOD,
    wudi.METHOD,
    *core_space.METHODS,
    *peft_references.METHODS,
]

MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in _ALL}
assert len(MERGE_METHODS) == len(_ALL), "duplicate merge method name"


def _check_starting_points() -> None:
    """A method's `starts_from` names a registered method and one of its hyperparameters (a programming error:
    fail at import)."""
    for method in _ALL:
        start = method.starts_from
        if start is not None and start.chosen not in getattr(MERGE_METHODS.get(start.method), "defaults", {}):
            raise ValueError(
                f"{method.name}: starts_from names {start.method}'s {start.chosen!r}, not a registered method's "
                f"hyperparameter (merging/methods/{method.name}.py)"
            )


_check_starting_points()


def list_methods(kind: MethodKind | str | None = None) -> list[str]:
    """Registered method names in registration order; only those of `kind` (a `MethodKind` or its name) when
    given."""
    return [name for name, method in MERGE_METHODS.items() if kind is None or method.kind == kind]


def get_method(name: str) -> MergeMethod:
    """The method registered as `name`, or `<name>@rank<r>` (`name` merged compress-then-merge at rank r:
    merging/methods/core_space.py); UnknownNameError listing the known names otherwise."""
    if isinstance(name, str) and core_space.COMPRESSED in name:
        base, _, rank = name.partition(core_space.COMPRESSED)
        if rank.isdigit():
            return _compressed(base, int(rank))
    try:
        return MERGE_METHODS[name]
    except (KeyError, TypeError):
        raise UnknownNameError(f"unknown merge method {name!r}; known methods: {', '.join(MERGE_METHODS)}") from None


@functools.cache
def _compressed(name: str, rank: int) -> MergeMethod:
    return core_space.compress_then_merge(get_method(name), rank)


__all__ = [
    "MERGE_METHODS",
    "STUDY_SUBSET",
    "MergeMethod",
    "MethodKind",
    "TASK_ARITHMETIC_GRID",
    "get_method",
    "list_methods",
]
