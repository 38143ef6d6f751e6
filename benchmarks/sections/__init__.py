"""The benchmark-section registry: every section, listed once, in the order the stage measures them.

Adding a section: write one module here with a `Section` subclass and its `SECTION` object, and
list it below (docs/ARCHITECTURE.md); the CLI's --bench-sections choices and the dashboard follow.
"""

from __future__ import annotations

from benchmarks.sections import evaluation, inference, merge, training
from benchmarks.sections.base import Chart, Section

SECTIONS: dict[str, Section] = {
    s.name: s for s in (inference.SECTION, evaluation.SECTION, training.SECTION, merge.SECTION)
}

__all__ = ["SECTIONS", "Chart", "Section"]
