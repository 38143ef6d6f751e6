"""What keeps the demo's server tidy under hostile traffic: a bounded upload folder and a quiet log.

- `UploadJanitor`: Gradio keeps every accepted upload in its cache folder while the server runs (ten
  20 MB uploads grew it by 200 MB; one request of 300 files kept 300 files). Gradio's own cleanup
  (`gr.Blocks(delete_cache=...)`) deletes this app's files by age; the janitor adds a bound on size: every
  `every_s` seconds the uploads (Gradio's record of them, `Blocks.upload_file_set`) beyond `cap_bytes` are
  deleted, oldest first. So the uploads on disk never exceed `cap_bytes` plus what arrives within one
  sweep, and none stays longer than Gradio's age limit plus its period. Example images and other files
  Gradio keeps on purpose are not uploads and are never touched.
- `refused`: one log line per refused input (the visitor already got a one-line message).
- `RefusedRequests`: ASGI middleware; a request that Gradio's own routes fail on (an unknown event, a body of
  the wrong shape, the event stream of an unknown session) is answered 400, or its stream ended, with one log
  line instead of the server's traceback. An exception whose traceback passes through this project's code is a
  real bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from demo.uploads import public_text

REPO_ROOT = Path(__file__).resolve().parent.parent


def refused(where: str, message: str) -> None:
    """One line in the server's log for an input the demo refused."""
    print(f"[demo] refused {where}: {public_text(message, 200)}", file=sys.stderr, flush=True)


class UploadJanitor:
    """Deletes the oldest uploads of a Gradio app while they hold more than `cap_bytes` (see the module)."""

    def __init__(self, blocks, cap_bytes: int, every_s: float = 2.0):
        self.blocks = blocks
        self.cap_bytes = cap_bytes
        self.every_s = every_s
        self.deleted = 0  # files deleted so far (for tests and the curious)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="demo-upload-janitor", daemon=True)

    def start(self) -> UploadJanitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sweep()
            except Exception as error:  # noqa: BLE001 - housekeeping never takes the server down
                print(f"[demo] upload cleanup failed: {error}", file=sys.stderr, flush=True)

    def sweep(self) -> int:
        """Delete uploads, oldest first, until the rest hold at most `cap_bytes`; returns how many were deleted."""
        uploads = self.blocks.upload_file_set
        present = []
        for name in list(uploads):
            try:
                info = os.stat(name)
            except OSError:  # deleted already (by Gradio's age limit, or a restart)
                uploads.discard(name)
                continue
            present.append((info.st_ctime, info.st_size, name))
        total = sum(size for _, size, _ in present)
        deleted = 0
        for _, size, name in sorted(present):
            if total <= self.cap_bytes:
                break
            try:
                os.remove(name)
            except OSError:
                pass
            uploads.discard(name)
            total -= size
            deleted += 1
            try:
                os.rmdir(os.path.dirname(name))  # Gradio puts each upload in a folder of its own
            except OSError:
                pass
        self.deleted += deleted
        return deleted


def _from_this_project(error: BaseException) -> bool:
    """Whether the traceback of `error` (or of an exception it wraps) runs through this project's code (this
    middleware's own frame, which every exception it catches passes, aside)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        trace = error.__traceback__
        while trace is not None:
            filename = trace.tb_frame.f_code.co_filename
            if filename.startswith(str(REPO_ROOT)) and "site-packages" not in filename and filename != __file__:
                return True
            trace = trace.tb_next
        error = error.__cause__ or error.__context__
    return False


class RefusedRequests:
    """ASGI middleware: a failure of Gradio's own request handling becomes HTTP 400 and one log line."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as error:
            if _from_this_project(error):
                raise
            refused(f"request {scope.get('method')} {scope.get('path')}", f"{type(error).__name__}: {error}")
            if started:  # a stream Gradio gave up half-way (e.g. events of an unknown session): it just ends
                return
            await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"Bad request: the server could not handle it."})


__all__ = ["RefusedRequests", "UploadJanitor", "refused"]
