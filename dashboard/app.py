"""Dashboard over results.duckdb (read-only).

    streamlit run dashboard/app.py                          # the repo's results.duckdb
    streamlit run dashboard/app.py -- --db path/to/results.duckdb
    MLV_DB=path/to/results.duckdb streamlit run dashboard/app.py

Pages are chosen in the sidebar; every page and its filters are in the URL
(`?page=merge_count&method=ties`), so a view can be shared by its link.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # works without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import queries  # noqa: E402
from dashboard.filters import Filters, sync_url  # noqa: E402
from dashboard.page_views import PAGES  # noqa: E402
from mlvision.errors import StoreError  # noqa: E402


def database_path(argv: list[str]) -> str:
    """--db after `--` on the streamlit command line, else $MLV_DB, else the repo's results.duckdb."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--db")
    known, _ = parser.parse_known_args(argv)
    return str(Path(known.db).expanduser()) if known.db else queries.default_db()


def main() -> None:
    st.set_page_config(page_title="Multi-LoRA Vision", page_icon="🧩", layout="wide")
    db = database_path(sys.argv[1:])

    slugs = list(PAGES)
    if st.session_state.get("page") not in slugs:
        wanted = st.query_params.get("page")
        st.session_state["page"] = wanted if wanted in slugs else slugs[0]
    st.sidebar.title("Multi-LoRA Vision")
    page = st.sidebar.radio("Page", slugs, key="page", format_func=lambda slug: PAGES[slug][0])
    st.sidebar.caption(f"Database: `{db}` (read-only)")
    st.sidebar.divider()

    filters = Filters(page)
    try:
        queries.relations(db)  # fails early, with the store's message, on a missing/locked/corrupt file
        PAGES[page][1](db, filters)
    except StoreError as error:
        st.error(f"Cannot read the results database: {error}")
    sync_url(page, filters)


main()
