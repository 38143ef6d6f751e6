"""One `findings` row, as the store keeps it: a figure with its CI, n and note, or NULL with the reason."""

from __future__ import annotations

import numpy as np


def finding_row(finding, statistic, value=None, ci=(None, None), n=0, note=None) -> dict:
    """A row; a value that is missing or not finite is stored as NULL, its CI with it, and the note says why
    ("not available" where the caller gave no reason)."""
    ok = value is not None and np.isfinite(value)
    low, high = ci
    return {
        "finding": finding,
        "statistic": statistic,
        "value": float(value) if ok else None,
        "ci_low": float(low) if ok and low is not None and np.isfinite(low) else None,
        "ci_high": float(high) if ok and high is not None and np.isfinite(high) else None,
        "n": int(n) if n == n else 0,
        "note": note if ok or note else "not available",
    }


def ci_row(finding, statistic, figure, n, unit) -> dict:
    """A row from a group_bootstrap_mean result: the reason for a NULL CI goes into the note."""
    mean, low, high, reason = figure
    return finding_row(finding, statistic, mean, (low, high), n, f"{unit}; CI: {reason}" if reason else unit)
