"""The benchmark-section registry: every section, listed once, in the order the stage measures them.

Adding a section: write one module here with a `Section` subclass and its `SECTION` object, and
list it below; the CLI's --bench-sections choices, the default bench (every section listed) and the dashboard's
Performance page follow. Its tests: tests/test_bench.py (its rows) and the Performance page's in
tests/test_dashboard.py (docs/ARCHITECTURE.md, "A benchmark section", says every step).
"""

from __future__ import annotations

from benchmarks.sections import evaluation, inference, merge, training
from benchmarks.sections.base import Chart, Section

SECTIONS: dict[str, Section] = {
    s.name: s for s in (inference.SECTION, evaluation.SECTION, training.SECTION, merge.SECTION)
}

__all__ = ["SECTIONS", "Chart", "Section"]
