"""Median render time of every dashboard page (Streamlit's AppTest, no browser).

    python -m dashboard.measure_render                     # the repo's results.duckdb
    python -m dashboard.measure_render --db path/to/results.duckdb --repeats 5

The first render of a page fills the query cache ("cold"); the median is over the renders
after it ("warm", what a user sees when moving between pages). The issue's bar: under 1 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

APP = str(Path(__file__).resolve().parent / "app.py")


def measure(db: str, repeats: int = 5) -> list[dict]:
    from streamlit.logger import set_log_level
    from streamlit.testing.v1 import AppTest

    from dashboard.pages import PAGES

    set_log_level("error")  # no "missing ScriptRunContext" noise
    os.environ["MLV_DB"] = str(db)
    rows = []
    for page, (title, _) in PAGES.items():
        times, problems = [], []
        for _ in range(repeats + 1):
            at = AppTest.from_file(APP, default_timeout=120)
            at.query_params["page"] = page
            started = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - started)
            problems = [e.value for e in at.exception] + [e.value for e in at.error]
        rows.append(
            {
                "page": title,
                "cold_s": times[0],
                "median_s": statistics.median(times[1:]),
                "max_s": max(times[1:]),
                "problems": problems,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    from dashboard.queries import default_db

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=None, help="results.duckdb to measure (default: $MLV_DB or the repo's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    db = args.db or default_db()
    print(f"database: {db}")
    print(f"{'page':<28}{'cold s':>8}{'median s':>10}{'max s':>8}")
    worst = 0.0
    for row in measure(db, args.repeats):
        worst = max(worst, row["median_s"])
        note = f"  ! {row['problems'][0]}" if row["problems"] else ""
        print(f"{row['page']:<28}{row['cold_s']:>8.3f}{row['median_s']:>10.3f}{row['max_s']:>8.3f}{note}")
    print(f"slowest median: {worst:.3f} s ({'under' if worst < 1 else 'OVER'} the 1 s bar)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
