"""What every page draws with: the "nothing stored yet" notice, a chart with its CSV download, a table, and
a stored JSON configuration; one place, so every page says missing data and offers downloads the same way.

A page reads through `queries`, computes through `analysis`, draws through `charts` and these helpers;
when its data is not in the database (an older file without the view, or an empty view) it says so
with `st.info` (`missing`) and returns.
"""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

RUN_HINT = "`python training/run_all.py`"


def missing(what: str, view: str, df: pd.DataFrame | None, how: str = RUN_HINT) -> bool:
    """Show why a page has nothing to draw; True when the caller should stop."""
    if df is None:
        st.info(
            f"No {what} in this database yet: it has no `{view}` view (an older or partial "
            f"results file). Run {how} with the current code to add it."
        )
        return True
    if df.empty:
        st.info(f"No {what} stored yet: the `{view}` view is empty. Run {how} to fill it.")
        return True
    return False


def chart(fig, data: pd.DataFrame | None = None, name: str = "") -> None:
    """A plotly chart and, given its data, a CSV download of them. The toolbar's camera saves the chart as SVG
    (vector: it goes into a paper as it is; a browser or any editor turns it into PNG)."""
    image = {"format": "svg", "filename": name or "chart"}
    st.plotly_chart(fig, width="stretch", config={"displaylogo": False, "toImageButtonOptions": image})
    if data is not None and name:
        st.download_button(
            f"Download the data of this chart (CSV): {name}.csv",
            data.to_csv(index=False),
            f"{name}.csv",
            "text/csv",
            key=f"csv.{name}",
        )


def table(df: pd.DataFrame, **kwargs) -> None:
    """A data frame across the page's width, without pandas' index."""
    st.dataframe(df, width="stretch", hide_index=True, **kwargs)


def as_json(value):
    """A stored configuration as `st.json` shows it: JSON text parsed, text that is not JSON as {"config": text}."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return {"config": value}
    return value
