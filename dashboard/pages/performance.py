"""Performance: every registered benchmark section (benchmarks/sections/), drawn from its own chart specs,
on the machine chosen in the sidebar.
"""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from benchmarks.sections import SECTIONS, Chart
from dashboard import charts, queries
from dashboard.filters import Filters
from dashboard.pages import common


def page(db: str, filters: Filters) -> None:
    """Every registered benchmark section (benchmarks/sections/), drawn from its own chart specs."""
    st.header("Performance")
    bench = queries.benchmarks(db)
    if common.missing("benchmarks", "benchmarks", bench, "`python -m training.bench` (or the bench stage of run_all)"):
        return
    devices = sorted(bench["device"].dropna().astype(str).unique())
    device = filters.select("Device", "device", devices) if devices else None
    rows = bench if device is None else bench[bench["device"].astype(str) == device]
    sized = rows["name"].isin([s.name for s in SECTIONS.values() if s.sized])
    pixels = sorted(int(v) for v in rows.loc[sized, "image_size"].dropna().unique()) if "image_size" in rows else []
    if len(pixels) > 1:  # figures at several image sizes are never drawn on one axis
        size = filters.select("Image size (px)", "px", pixels, help="input size the figures were measured at")
        rows = rows[~sized | rows["image_size"].isna() | (rows["image_size"] == size)]
    _machine_caption(rows)
    for section in SECTIONS.values():
        part = _bench_section(rows, section.name, section.title)
        if part is None:
            continue
        if section.facet:
            column, label, key = section.facet
            values = sorted(int(v) for v in part[column].dropna().unique())
            part = part[part[column] == filters.select(label, key, values, help=f"{label.lower()} of the figures")]
        if section.caption:
            st.caption(section.caption)
        for chart_row in section.charts:
            columns = st.columns(len(chart_row)) if len(chart_row) > 1 else [st.container()]
            for column, chart in zip(columns, chart_row):
                with column:
                    common.chart(_bench_chart(part, chart), part, f"{section.name}_{chart.y}")
    common.table(rows.assign(machine=rows["machine"].astype(str)))


def _bench_chart(rows: pd.DataFrame, chart: Chart):
    if chart.kind == "bar":
        return charts.bar_figure(rows, chart.y, chart.title)
    return charts.benchmark_figure(rows, chart.y, chart.title, x_title=chart.x_title)


def _bench_section(rows: pd.DataFrame, section: str, title: str) -> pd.DataFrame | None:
    """The heading of one benchmark section and its rows; None (after saying how to measure) when it has none."""
    st.subheader(title)
    part = rows[rows["name"] == section]
    if part.empty:
        st.info(f"No {section} figures for this device yet: run `python -m training.bench --bench-sections {section}`.")
        return None
    return part


def _machine_caption(rows: pd.DataFrame) -> None:
    """Which machine the figures come from (the newest measurement's description)."""
    latest = rows.sort_values("measured_at").iloc[-1]
    try:
        machine = json.loads(latest["machine"]) if isinstance(latest["machine"], str) else dict(latest["machine"])
    except (TypeError, ValueError):
        machine = {}
    parts = [str(machine[k]) for k in ("device_name", "cpu_model") if machine.get(k)][:1]
    if machine.get("cpu_count"):
        parts.append(f"{machine['cpu_count']} cores")
    if "threads" in rows and pd.notna(latest.get("threads")):
        parts.append(f"{int(latest['threads'])} torch threads")
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    if "image_size" in rows and pd.notna(latest.get("image_size")):
        parts.append(f"{int(latest['image_size'])} px images")
    st.caption("Measured on: " + ", ".join(parts) + f"; last measured {latest['measured_at']}")
