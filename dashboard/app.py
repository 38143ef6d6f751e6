"""Dashboard over results.duckdb (read-only).

    streamlit run dashboard/app.py                          # the repo's results.duckdb
    streamlit run dashboard/app.py -- --db path/to/results.duckdb
    MLV_DB=path/to/results.duckdb streamlit run dashboard/app.py

Pages are chosen in the sidebar; every page and its filters are in the URL
(`?page=merge_count&method=ties`), so a view can be shared by its link.

The server listens on 127.0.0.1 only (.streamlit/config.toml, read when started from the repo
root); `--server.address 0.0.0.0` serves other machines too.

No problem with the database ends in a traceback: the store names it in one line (missing,
locked, not DuckDB's, truncated, newer, unexpected types) and the page shows that line. While a
run holds the file, the page shows the results it last read, and says from when.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # works without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import queries  # noqa: E402
from dashboard.filters import Filters, sync_url  # noqa: E402
from dashboard.pages import PAGES  # noqa: E402
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
    queries.start_render()
    notice = st.empty()  # above the page: filled when a result came from memory
    try:
        queries.relations(db)  # fails early, with the store's message, on a missing/locked/corrupt file
        PAGES[page][1](db, filters)
    except StoreError as error:
        st.error(f"Cannot read the results database: {error}")
    except Exception as error:  # the last resort: a page that fails on data it did not expect shows one line
        traceback.print_exc()  # the details go to the server's log
        reason = (str(error).splitlines() or [""])[0]
        st.error(
            f"This page could not be drawn ({type(error).__name__}: {reason}). If `{db}` was written by another "
            "version of this project, re-create it with `python training/run_all.py`; otherwise it is a bug of the "
            "page: the server's log holds the details to report"
        )
    since = queries.stale_since()
    if since is not None:
        notice.warning(
            f"Showing results from {since:%H:%M:%S}; the database is busy being written. "
            "Refresh in a moment for newer ones."
        )
    sync_url(page, filters)


main()
