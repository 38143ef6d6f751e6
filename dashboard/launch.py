"""`mlv-dashboard [--db PATH] [streamlit options]`: the same as `streamlit run dashboard/app.py`.

Streamlit runs an app from its file, so this console command only builds that command line.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from streamlit.web import cli as streamlit_cli

    args = sys.argv[1:] if argv is None else argv
    ours = [a for i, a in enumerate(args) if a == "--db" or (i and args[i - 1] == "--db") or a.startswith("--db=")]
    theirs = [a for a in args if a not in ours]
    app = str(Path(__file__).resolve().parent / "app.py")
    # .streamlit/config.toml binds 127.0.0.1 only when streamlit starts in the repo root; say it here too,
    # so the command listens on this machine alone wherever it is started (override: --server.address).
    if not any(a.startswith("--server.address") for a in theirs):
        theirs = ["--server.address", "127.0.0.1", *theirs]
    sys.argv = ["streamlit", "run", app, *theirs, "--", *ours]
    return streamlit_cli.main()


if __name__ == "__main__":
    sys.exit(main())
