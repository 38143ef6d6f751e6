"""User-facing errors.

Every problem a user can cause or fix (unknown name, missing package, corrupt cache, bad path,
newer database) raises a subclass of `MLVisionError` whose message names the problem *and* the
fix in one line. Command-line entry points catch `MLVisionError`, print the message and exit
non-zero, so no end user sees a traceback for a problem they can fix (`run_cli`).
"""

from __future__ import annotations

import sys
from typing import Callable


class MLVisionError(Exception):
    """Base class: the message is shown to the user as-is."""


class UnknownNameError(MLVisionError, KeyError):
    """An unknown task, backbone, method or hyperparameter name."""

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0]) if self.args else ""


class DataSourceError(MLVisionError):
    """A dataset or weights package could not be fetched or read."""


class CorruptCacheError(MLVisionError):
    """A file in the local cache cannot be read."""


class StoreError(MLVisionError):
    """results.duckdb cannot be opened, written or understood."""


class AdapterError(MLVisionError):
    """An adapter directory is missing, incomplete or incompatible."""


class MergeConfigError(MLVisionError):
    """A merge was asked for with bad inputs or hyperparameters."""


class HubPushError(MLVisionError):
    """A merge was saved but could not be uploaded to the Hugging Face Hub (offline, no token, no access)."""


class BadImage(MLVisionError, ValueError):
    """An upload that cannot be used; the message is meant for the person who uploaded it."""


def error_reason(error: BaseException) -> str:
    """What a one-line error quotes as the cause of a library's exception: its message's first line, or its type's
    name when it has no message (libraries raise multi-line messages a user's line must not carry)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_cli(command: Callable[[], int], interrupted: str) -> int:
    """Run a command-line entry point; returns its exit code.

    One place for how every command ends badly: a problem the user can fix prints its one-line
    message and exits 2; Ctrl-C prints `interrupted` (what is kept, how to continue) and exits 130.
    """
    try:
        return command()
    except MLVisionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
