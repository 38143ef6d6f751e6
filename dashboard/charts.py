"""Plotly figure builders: pure functions from the DataFrames of `analysis` to a Figure.

One look for every chart (white background, thin grid, colour per method stable across
pages), so figures can go into a paper as they are.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import hex_to_rgb, qualitative, unlabel_rgb

from benchmarks.sections.merge import REFERENCE_METHODS, REGISTERED_METHODS

PALETTE = qualitative.D3 + qualitative.Set2
TEMPLATE = "simple_white"

# One fixed colour per merge method, whatever the page or filter shows (a colour taken from a method's position
# among the selected ones changed when the selection changed, and two methods got near-identical pinks). The rule:
# the registered methods in registry order (merging/methods/__init__.py `_ALL`) take METHOD_PALETTE's colours in
# turn, peft's references (kind "reference") REFERENCE_GREYS'. The first 13 colours are those the methods have
# always had; a method appended to the registry takes the next one, so adding a method adds no line here. Distinct,
# dark enough for a white background, no two closer than a visible distance. The dashboard may not import the merge
# registry (docs/ARCHITECTURE.md), so it reads the registry's order through benchmarks/sections/merge.py.
METHOD_PALETTE = (
    # linear, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune, knots_ties, knots_ta, tsv_m,
    "#bcbd22", "#1f77b4", "#ff7f0e", "#e7ba52", "#ad494a", "#637939", "#d62728", "#e377c2", "#9467bd",
    # iso_c, iso_cts, regmean, adamerging; then the colours of the methods added next
    "#17becf", "#393b79", "#2ca02c", "#ff1493",
    "#006400", "#8b0000", "#000080", "#800080", "#7b4173", "#8ca252", "#808000", "#1e90ff", "#8fbc8f",
)  # fmt: skip
REFERENCE_GREYS = ("#7f7f7f", "#525252", "#a5a5a5", "#303030", "#c7c7c7", "#696969", "#909090", "#1a1a1a")


def method_colors(methods: tuple[str, ...], references: tuple[str, ...]) -> dict[str, str]:
    """{method: colour} by the rule above: `methods` in registry order, `references` those of them in greys.
    Past the end of a palette colours repeat (tests/test_merge_methods.py says which palette to lengthen)."""
    ours = [m for m in methods if m not in references]
    greys = [m for m in methods if m in references]
    colors = {m: METHOD_PALETTE[i % len(METHOD_PALETTE)] for i, m in enumerate(ours)}
    colors |= {m: REFERENCE_GREYS[i % len(REFERENCE_GREYS)] for i, m in enumerate(greys)}
    return {m: colors[m] for m in methods}


METHOD_COLORS = method_colors(REGISTERED_METHODS, REFERENCE_METHODS)


def color_for(name: str, names: list[str]) -> str:
    """The colour of `name`: a merge method's own fixed colour; any other name (a benchmark variant) by its
    place among `names` (sorted) in the general palette."""
    if name in METHOD_COLORS:
        return METHOD_COLORS[name]
    ordered = sorted(set(names))
    return PALETTE[ordered.index(name) % len(PALETTE)] if name in ordered else PALETTE[0]


def _rgba(color: str, alpha: float) -> str:
    """'#1f77b4' or 'rgb(31,119,180)' -> 'rgba(31,119,180,alpha)'."""
    r, g, b = hex_to_rgb(color) if color.startswith("#") else unlabel_rgb(color)
    return f"rgba({int(r)},{int(g)},{int(b)},{alpha})"


LEGEND_ROW_PX = 24  # height of one row of legend entries below a chart
LEGEND_PER_ROW = 4  # entries per row, about, at half page width


def _legend_entries(fig: go.Figure) -> int:
    """How many entries the legend lists (one per legend group, plus each ungrouped trace)."""
    shown = [t for t in fig.data if t.showlegend is not False and t.name]
    return len({t.legendgroup or t.name for t in shown})


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 420) -> go.Figure:
    """The common look. The legend sits below the plot, horizontal, and the figure grows by one legend row per
    few entries: a vertical legend with 14+ methods scrolled, and a scrolled legend hides which colour is which."""
    entries = _legend_entries(fig)
    rows = -(-entries // LEGEND_PER_ROW) if entries > 1 else 0
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=title, font=dict(size=15)),
        xaxis_title=x,
        yaxis_title=y,
        height=height + rows * LEGEND_ROW_PX,
        legend=dict(
            title_text="",
            orientation="h",
            yref="container",
            y=0,
            yanchor="bottom",
            x=0,
            xanchor="left",
            maxheight=1.0,  # a ratio of the figure's height: never scroll
        ),
        margin=dict(l=60, r=20, t=80, b=50 + rows * LEGEND_ROW_PX),
        font=dict(size=13),
    )
    fig.update_xaxes(showgrid=True, gridcolor="#eee")
    fig.update_yaxes(showgrid=True, gridcolor="#eee")
    return fig


def _interval_bars(value: pd.Series, low: pd.Series, high: pd.Series, **style) -> dict:
    """Error bars from an interval around each value (plotly wants the two distances); none where it is missing."""
    return dict(
        type="data",
        array=(high - value).fillna(0).tolist(),
        arrayminus=(value - low).fillna(0).tolist(),
        visible=True,
        **style,
    )


def merge_count_figure(
    curve: pd.DataFrame,
    y_title: str,
    references: dict[str, float] | None = None,
    chosen: dict[int, str] | None = None,
) -> go.Figure:
    """One line per method (mean over groups and seeds) with a ±1 sd band; trace name = method.

    `chosen` (k -> method): a star on the method the study chooses at k, where that method is drawn.
    `references` (label -> y): dotted horizontal lines named in the legend (legend group "reference"), so
    their labels never overlap each other or the data."""
    fig = go.Figure()
    methods = sorted(curve["method"].unique()) if not curve.empty else []
    for method in methods:
        part = curve[curve["method"] == method].sort_values("k")
        color = color_for(method, methods)
        x = part["k"].tolist()
        upper, lower = (part["mean"] + part["sd"]).tolist(), (part["mean"] - part["sd"]).tolist()
        fig.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=upper + lower[::-1],
                fill="toself",
                mode="none",
                fillcolor=_rgba(color, 0.15),
                hoverinfo="skip",
                showlegend=False,
                legendgroup=method,
                name=f"{method} ±1 sd",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=part["mean"].tolist(),
                mode="lines+markers",
                name=method,
                legendgroup=method,
                line=dict(color=color, width=2),
                customdata=np.stack([part["sd"], part["n"]], axis=-1),
                hovertemplate=f"<b>{method}</b><br>k=%{{x}}<br>mean=%{{y:.3f}}"
                "<br>sd=%{customdata[0]:.3f}<br>n=%{customdata[1]}<extra></extra>",
            )
        )
    stars = [(k, m) for k, m in sorted((chosen or {}).items()) if ((curve["method"] == m) & (curve["k"] == k)).any()]
    if stars:
        means = curve.set_index(["method", "k"])["mean"]
        fig.add_trace(
            go.Scatter(
                x=[k for k, _ in stars],
                y=[means[(m, k)] for k, m in stars],
                mode="markers",
                name="chosen on validation",
                text=[m for _, m in stars],
                marker=dict(symbol="star", size=16, color=[color_for(m, methods) for _, m in stars],
                            line=dict(width=1, color="#222")),
                hovertemplate="k=%{x}: <b>%{text}</b> chosen on validation<extra></extra>",
            )
        )  # fmt: skip
    ks = sorted(curve["k"].unique()) if not curve.empty else [0]
    dashes = ["dot", "dash", "dashdot", "longdash"]
    for index, (label, value) in enumerate((references or {}).items()):
        if value is not None and np.isfinite(value):
            fig.add_trace(
                go.Scatter(
                    x=[ks[0], ks[-1]],
                    y=[value, value],
                    mode="lines",
                    name=label,
                    legendgroup="reference",
                    line=dict(color="#555", width=1.5, dash=dashes[index % len(dashes)]),
                    hovertemplate=f"{label}: {value:.3f}<extra></extra>",
                )
            )
    fig.update_xaxes(dtick=1)
    return _layout(fig, f"{y_title} against k", "k (adapters merged)", y_title)


MATRIX_TEXT_TASKS = 8  # a task x task matrix writes its values in the cells up to this many tasks
LABELLED_POINTS = 30  # a scatter writes each point's name beside it up to this many points
# The designed relations of a pair (mlvision.tasks.RELATION_KINDS, hub tasks' "same_domain"), strongest first.
RELATION_COLORS = {
    "same_images": PALETTE[3],
    "same_labels": PALETTE[1],
    "same_style": PALETTE[2],
    "same_domain": PALETTE[4],
    "unrelated": PALETTE[0],
}


def similarity_figure(points: pd.DataFrame, measure: str, stats: dict) -> go.Figure:
    """Similarity of a pair against the retention of its merge; colour = the pair's designed relation (one colour
    for "related by construction" where the pairs have a single kind, as the six-task study's do)."""
    fig = go.Figure()
    kinds = [k for k in RELATION_COLORS if k in set(points.get("relation", ()))]
    if len(set(kinds) - {"unrelated"}) > 1:
        series = [(points["relation"] == k, k.replace("_", " "), RELATION_COLORS[k]) for k in kinds]
    else:
        series = [
            (points["related"], "related by construction", PALETTE[1]),
            (~points["related"], "unrelated", PALETTE[0]),
        ]
    labelled = len(points) <= LABELLED_POINTS  # 190 pairs of the twenty-task pool: names on hover only
    for mask, label, color in series:
        part = points[mask]
        if part.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=part["value"],
                y=part["retention"],
                mode="markers+text" if labelled else "markers",
                name=label,
                text=part["pair"],  # each point labelled with its pair (written beside it when few)
                textposition="top center",
                cliponaxis=False,
                textfont=dict(size=9, color="#444"),
                customdata=part["n"] if "n" in part else None,
                marker=dict(size=11, color=color, line=dict(width=1, color="#333")),
                hovertemplate="<b>%{text}</b><br>similarity=%{x:.4g}<br>retention=%{y:.3f}"
                "<br>n=%{customdata} merge rows<extra></extra>",
            )
        )
    if len(points) >= 2 and np.ptp(points["value"].to_numpy(dtype=float)) > 0:
        slope, intercept = np.polyfit(points["value"].astype(float), points["retention"].astype(float), 1)
        xs = np.linspace(points["value"].min(), points["value"].max(), 20)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=slope * xs + intercept,
                mode="lines",
                name="least-squares trend",
                line=dict(color="#444", dash="dash"),
                hoverinfo="skip",
            )
        )
    return _layout(
        fig, f"{measure}<br><sup>{_correlation_subtitle(stats)}</sup>", measure, "retention (normalized accuracy)"
    )


def _correlation_subtitle(stats: dict) -> str:
    """ρ with the study's CI and p (their units named) where `stats` holds them (a row of
    dashboard.analysis.correlation_rows), else ρ marked descriptive: a chart never shows a p-value of its own."""
    rho, n = stats.get("rho"), stats.get("n", 0)
    if rho is None or not np.isfinite(rho):
        return f"Spearman ρ: n/a, n = {n} pairs"
    low, high, p = (stats.get(key, np.nan) for key in ("ci_low", "ci_high", "p"))
    if not (np.isfinite(low) or np.isfinite(p)):
        return f"Spearman ρ = {rho:.2f} (descriptive: no CI or p here), n = {n} pairs"
    ci = f", 95% CI {low:.2f} to {high:.2f} (tasks resampled)" if np.isfinite(low) else ", no CI stored"
    kind = "Monte Carlo" if "Monte Carlo" in str(stats.get("p_note") or "") else "exact"
    test = f", p = {p:.3f} ({kind} permutation over task labels)" if np.isfinite(p) else ", no p stored"
    return f"Spearman ρ = {rho:.2f}{ci}{test}<br>n = {n} pairs; the study's figures (findings)"


def grouped_bar_figure(
    table: pd.DataFrame, title: str, y_title: str, x: str = "task", group: str = "model"
) -> go.Figure:
    """Bars of `mean` with ±sd error bars, one bar group per `x`, one colour per `group`."""
    fig = go.Figure()
    for index, name in enumerate(dict.fromkeys(table[group])):
        part = table[table[group] == name]
        fig.add_trace(
            go.Bar(
                x=part[x].astype(str),
                y=part["mean"],
                name=str(name),
                marker_color=PALETTE[index % len(PALETTE)],
                error_y=dict(type="data", array=part["sd"], visible=True),
                customdata=part["n"],
                hovertemplate=f"<b>{name}</b><br>%{{x}}: %{{y:.3f}}<br>n=%{{customdata}}<extra></extra>",
            )
        )
    fig.update_layout(barmode="group")
    return _layout(fig, title, x, y_title)


def gain_heatmap(
    matrix: pd.DataFrame, title: str, x_title: str = "task evaluated", y_title: str = "merged group"
) -> go.Figure:
    """Normalized gain for every (group, task): 1 = own adapter, 0 = head baseline, < 0 worse. Values are written
    in the cells up to MATRIX_TEXT_TASKS columns (hover beyond)."""
    z = matrix.to_numpy(dtype=float)
    finite = z[np.isfinite(z)]
    # Limits symmetric about 0, so the scale's white is the head baseline's 0: plotly ignores zmid
    # once zmin and zmax are given, and with limits like (-2.2, 1) white fell at -0.6.
    bound = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    written = len(matrix.columns) <= MATRIX_TEXT_TASKS
    text = [["" if np.isnan(v) or not written else f"{v:.2f}" for v in row] for row in z]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(matrix.columns),
            y=list(matrix.index),
            text=text,
            texttemplate="%{text}",
            colorscale="RdBu",
            zmin=-bound,
            zmax=bound,
            colorbar=dict(title="gain"),
            hovertemplate="%{y}<br>task %{x}<br>gain=%{z:.3f}<extra></extra>",
        )
    )
    height = max(320, 60 + 28 * len(matrix.index))
    fig = _layout(fig, title, x_title, y_title, height=height)
    fig.update_yaxes(autorange="reversed", showgrid=False, tickmode="array", tickvals=list(matrix.index))
    fig.update_xaxes(showgrid=False, tickmode="array", tickvals=list(matrix.columns))
    return fig


def methods_figure(table: pd.DataFrame, metric: str, y_title: str) -> go.Figure:
    """Every method at every k: bars of the metric's mean with ±sd (sd over groups and seeds)."""
    fig = go.Figure()
    methods = sorted(table["method"].unique())
    sd_column = f"{metric}_sd"
    for method in methods:
        part = table[table["method"] == method].sort_values("k")
        error = part[sd_column].fillna(0) if sd_column in part else None
        fig.add_trace(
            go.Bar(
                x=part["k"].astype(str),
                y=part[metric],
                name=method,
                marker_color=color_for(method, methods),
                error_y=dict(type="data", array=error, visible=error is not None),
                customdata=np.stack(
                    [
                        part[sd_column] if sd_column in part else [None] * len(part),
                        part["merged_models"] if "merged_models" in part else [None] * len(part),
                    ],
                    axis=-1,
                ),
                hovertemplate=f"<b>{method}</b><br>k=%{{x}}<br>{y_title}=%{{y:.3f}}<br>sd=%{{customdata[0]:.3f}}"
                "<br>n=%{customdata[1]} merged models<extra></extra>",
            )
        )
    fig.update_layout(barmode="group")
    # the axis spans the data (bars ± sd, with a margin), not 0 to 1: the differences between methods are what
    # a reader compares, and they are a few points wide
    spread = table[sd_column].fillna(0) if sd_column in table else 0
    low, high = (table[metric] - spread).min(), (table[metric] + spread).max()
    if np.isfinite(low) and np.isfinite(high):
        margin = max(0.1 * (high - low), 0.005)
        fig.update_yaxes(range=[low - margin, high + margin])
    return _layout(fig, f"{y_title} by method and k", "k (adapters merged)", y_title)


def share_figure(table: pd.DataFrame, title: str, y_title: str) -> go.Figure:
    """Per k: a share (0-1) with its CI as error bars (`share`, `ci_low`, `ci_high`); colour = `method`."""
    fig = go.Figure()
    methods = list(dict.fromkeys(table["method"]))
    for method in methods:
        part = table[table["method"] == method].sort_values("k")
        fig.add_trace(
            go.Scatter(
                x=part["k"],
                y=part["share"],
                mode="markers",
                name=method,
                marker=dict(size=11, color=color_for(method, methods)),
                error_y=_interval_bars(part["share"], part["ci_low"], part["ci_high"]),
                customdata=np.stack([part["rows"], part["ci_low"], part["ci_high"]], axis=-1),
                hovertemplate=f"<b>{method}</b><br>k=%{{x}}<br>share=%{{y:.1%}}<br>Wilson 95% CI %{{customdata[1]:.1%}}"
                " to %{customdata[2]:.1%}<br>n=%{customdata[0]} rows<extra></extra>",
            )
        )
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(range=[0, 1], tickformat=".0%")
    return _layout(fig, title, "k (adapters merged)", y_title)


def benchmark_figure(bench: pd.DataFrame, y: str, y_title: str, x_title: str = "k (tasks served)") -> go.Figure:
    """One line per variant against k (a variant without k is drawn as a single point at 0)."""
    fig = go.Figure()
    variants = [str(v) for v in dict.fromkeys(bench["variant"].fillna("—"))]
    for variant in variants:
        part = bench[bench["variant"].fillna("—").astype(str) == variant].sort_values("k")
        fig.add_trace(
            go.Scatter(
                x=part["k"].fillna(0),
                y=part[y],
                mode="lines+markers",
                name=variant,
                line=dict(color=color_for(variant, variants)),
                text=part["name"],
                hovertemplate=f"<b>{variant}</b> (%{{text}})<br>k=%{{x}}<br>{y_title}=%{{y:.4g}}<extra></extra>",
            )
        )
    fig.update_xaxes(dtick=1)
    return _layout(fig, f"{y_title} against k", x_title, y_title)


def bar_figure(rows: pd.DataFrame, y: str, y_title: str) -> go.Figure:
    """One bar per variant (e.g. the training benchmark's lora / head_only / full_finetune)."""
    variants = [str(v) for v in rows["variant"]]
    fig = go.Figure(
        go.Bar(
            x=variants,
            y=rows[y],
            marker_color=[color_for(v, variants) for v in variants],
            hovertemplate=f"<b>%{{x}}</b><br>{y_title}=%{{y:.4g}}<extra></extra>",
        )
    )
    return _layout(fig, y_title, "", y_title, height=360)


def task_multiples_figure(table: pd.DataFrame, y_title: str, columns: int = 3) -> go.Figure:
    """Small multiples: one panel per task, its retention against k, one line per method with its CI as error
    bars (rows of `analysis.task_retention_curve`). Panels share the y axis, so tasks compare at a glance."""
    from plotly.subplots import make_subplots

    tasks = sorted(table["task"].unique())
    rows = max(1, -(-len(tasks) // columns))
    fig = make_subplots(
        rows=rows,
        cols=columns,
        subplot_titles=tasks,
        shared_yaxes=True,
        horizontal_spacing=0.04,
        vertical_spacing=0.5 / (rows + 1) if rows > 1 else 0.1,
    )
    methods = sorted(table["method"].unique())
    for index, task in enumerate(tasks):
        row, col = index // columns + 1, index % columns + 1
        for method in methods:
            part = table[(table["task"] == task) & (table["method"] == method)].sort_values("k")
            if part.empty:
                continue
            fig.add_trace(
                go.Scatter(
                    x=part["k"],
                    y=part["mean"],
                    mode="lines+markers",
                    name=method,
                    legendgroup=method,
                    showlegend=index == 0,
                    line=dict(color=color_for(method, methods), width=2),
                    error_y=_interval_bars(part["mean"], part["ci_low"], part["ci_high"], thickness=1),
                    customdata=np.stack([part["ci_low"], part["ci_high"], part["n"]], axis=-1),
                    hovertemplate=f"<b>{method}</b> on {task}<br>k=%{{x}}<br>mean=%{{y:.3f}}"
                    "<br>95% CI %{customdata[0]:.3f} to %{customdata[1]:.3f}"
                    "<br>n=%{customdata[2]} groups<extra></extra>",
                ),
                row=row,
                col=col,
            )
    fig.update_xaxes(dtick=1)
    fig = _layout(fig, f"{y_title} against k, per task", "", "", height=120 + 260 * rows)
    for col in range(1, columns + 1):
        fig.update_xaxes(title_text="k (adapters merged)", row=rows, col=col)
    for row in range(1, rows + 1):
        fig.update_yaxes(title_text=y_title if row == (rows + 1) // 2 else "", row=row, col=1)
    return fig


def matrix_figure(matrix: pd.DataFrame, title: str, value_title: str, colorscale: str = "Viridis") -> go.Figure:
    """A task × task matrix (symmetric, empty diagonal) as a heatmap with its values written in the cells (up to
    MATRIX_TEXT_TASKS tasks; beyond, a cell's value is on hover and every task keeps its axis label)."""
    z = matrix.to_numpy(dtype=float)
    written = len(matrix.index) <= MATRIX_TEXT_TASKS
    text = [
        [
            ""
            if np.isnan(v) or not written
            else f"{v:.0f}"
            if abs(v) >= 100
            else f"{v:.3g}"
            if abs(v) >= 0.1
            else f"{v:.2g}"
            for v in row
        ]
        for row in z
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(matrix.columns),
            y=list(matrix.index),
            text=text,
            texttemplate="%{text}",
            textfont=dict(size=11),
            colorscale=colorscale,
            colorbar=dict(title=value_title),
            hovertemplate=f"%{{y}} + %{{x}}<br>{value_title}=%{{z:.4g}}<extra></extra>",
        )
    )
    n = len(matrix.index)
    fig = _layout(fig, title, "", "", height=160 + (50 if written else 36) * n)
    fig.update_yaxes(autorange="reversed", showgrid=False, tickmode="array", tickvals=list(matrix.index))
    fig.update_xaxes(showgrid=False, tickangle=-30 if written else -60, tickmode="array", tickvals=list(matrix.columns))
    return fig


def interval_figure(table: pd.DataFrame, x: str, title: str, y_title: str) -> go.Figure:
    """One point per `x` at its `mean` with its 95 % interval (`ci_low`, `ci_high`) as error bars; the axis spans
    the intervals, not 0 to 1, because the differences a reader compares are a few points wide."""
    fig = go.Figure(
        go.Scatter(
            x=table[x].astype(str),
            y=table["mean"],
            mode="markers",
            marker=dict(size=12, color=PALETTE[0]),
            error_y=_interval_bars(table["mean"], table["ci_low"], table["ci_high"]),
            customdata=np.stack([table["ci_low"], table["ci_high"], table["n"], table["sd"]], axis=-1),
            hovertemplate="<b>%{x}</b><br>mean=%{y:.3f}<br>95% t-interval %{customdata[0]:.3f} to %{customdata[1]:.3f}"
            "<br>sd=%{customdata[3]:.3f}<br>n=%{customdata[2]}<extra></extra>",
            showlegend=False,
        )
    )
    low, high = table["ci_low"].fillna(table["mean"]).min(), table["ci_high"].fillna(table["mean"]).max()
    if np.isfinite(low) and np.isfinite(high):
        margin = max(0.15 * (high - low), 0.005)
        fig.update_yaxes(range=[low - margin, high + margin])
    return _layout(fig, title, x, y_title, height=380)


def tradeoff_figure(curve: pd.DataFrame, method: str) -> go.Figure:
    """Backbones allowed vs the best plan's worst-task retention: predicted (what the planner chose by) and measured
    (the planned groups' merges scored on test images)."""
    fig = go.Figure()
    for column, name, dash in (("worst_predicted", "predicted", "dot"), ("worst_measured", "measured", "solid")):
        fig.add_trace(
            go.Scatter(
                x=curve["max_backbones"],
                y=curve[column],
                name=f"worst task, {name}",
                mode="lines+markers",
                line=dict(dash=dash),
                customdata=curve["backbones"],
                hovertemplate=f"at most %{{x}} backbones (uses %{{customdata}})<br>worst task, {name}: "
                "%{y:.1%}<extra></extra>",
            )
        )
    fig.update_yaxes(tickformat=".0%")
    fig.update_xaxes(dtick=1)
    return _layout(fig, f"Backbones vs worst-task retention ({method})", "backbones allowed", "retention")
