"""What a benchmark section is: what it plans, how it measures, how the dashboard draws it.

A section is one object (a subclass of `Section`, one module each) registered in
`benchmarks/sections/__init__.py`. The stage (`benchmarks/stage.py`) asks it for its planned
(variant, k, batch size) figures and its setting (what the figures depend on, part of their
identity), calls `measure` when they are not stored yet, and stores the rows; the dashboard's
Performance page draws every registered section from its `charts`, without code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the stage imports the sections, not the other way round
    from benchmarks.stage import BenchStage

Plan = list[tuple[str, "int | None", "int | None"]]  # (variant, k, batch size) per figure


@dataclass(frozen=True)
class Chart:
    """One plotly chart of a section's rows: `y` against k, one line (or one bar) per variant."""

    y: str  # a column of the benchmarks view
    title: str  # the axis title, with its unit
    kind: str = "line"  # "line": y against k per variant; "bar": one bar per variant
    x_title: str = "k (tasks served)"


def interleaved_setting(stage: BenchStage) -> dict:
    """What figures timed in one interleaved loop over the study's adapters depend on (inference, evaluation)."""
    return {
        "repeats": stage.bench.repeats,
        "warmup": stage.bench.warmup,
        "adapters": [stage.config.model_id("adapter", t, stage.seed) for t in stage.tasks],
    }


class Section:
    name: str = ""
    title: str = ""  # heading on the dashboard's Performance page
    caption: str = ""  # how to read it (shown under the heading)
    variants: tuple[str, ...] = ()
    charts: tuple[tuple[Chart, ...], ...] = ()  # rows of charts; a row of two is drawn side by side
    facet: tuple[str, str, str] | None = None  # (column, label, URL key) the page filters on, e.g. batch size
    sized: bool = True  # do its figures depend on the image size?

    def repeats(self, stage: BenchStage) -> int:
        """Timed runs per figure (stored with each row)."""
        raise NotImplementedError

    def applies(self, stage: BenchStage) -> bool:
        """Whether the study has what this section measures (e.g. two adapters to merge)."""
        return True

    def setting(self, stage: BenchStage) -> dict:
        """What this section's figures depend on besides the stage's common setting."""
        raise NotImplementedError

    def plan(self, stage: BenchStage) -> Plan:
        raise NotImplementedError

    def measure(self, stage: BenchStage) -> list[dict]:
        """One row per planned figure: variant, k, batch_size, median_ms, p95_ms and what else it has."""
        raise NotImplementedError
