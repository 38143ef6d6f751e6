"""What keeps the demo's server tidy under hostile traffic: a bounded upload folder and a quiet log.

- `UploadJanitor`: Gradio keeps every accepted upload in its cache folder while the server runs (ten
  20 MB uploads grew it by 200 MB; one request of 300 files kept 300 files). Gradio's own cleanup
  (`gr.Blocks(delete_cache=...)`) deletes this app's files by age; the janitor adds a bound on size: every
  `every_s` seconds, and after every upload request (`UploadLimit`), the uploads (Gradio's record of them,
  `Blocks.upload_file_set`) beyond `cap_bytes` are deleted, oldest first. With `UploadLimit` refusing an
  upload request larger than one file, the uploads on disk never exceed `cap_bytes` plus the upload
  requests in flight, and none stays longer than Gradio's age limit plus its period. Example images and
  other files Gradio keeps on purpose are not uploads and are never touched.
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
        self._missing: set[str] = set()  # recorded uploads not on disk at the last sweep (perhaps still being moved)
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
        present, missing = [], set()
        for name in list(uploads):
            try:
                info = os.stat(name)
            except OSError:  # deleted already (Gradio's age limit), or not yet moved into place: forgotten if so twice
                if name in self._missing:
                    uploads.discard(name)
                else:
                    missing.add(name)
                continue
            present.append((info.st_ctime, info.st_size, name))
        self._missing = missing
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


class UploadLimit:
    """ASGI middleware on Gradio's upload route: a request whose body passes `max_bytes` (the demo's one-file limit
    plus the multipart framing; the page sends one file per request) is refused with 413, by its Content-Length
    before anything is read, or as it streams in; and when an upload request ends, the janitor sweeps at once.

    Why: Gradio's own limit is per file, and its route takes up to 1,000 files per request, so one request could
    write 25 GB; with this, the uploads on disk never exceed the janitor's cap plus the upload requests in flight
    (each at most `max_bytes`)."""

    def __init__(self, app, max_bytes: int, janitor: UploadJanitor | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.janitor = janitor

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope.get("path", "").endswith("/upload"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, int(length))
        received, over = 0, False
        started = False

        async def counted_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}  # Gradio stops reading and drops what it wrote
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return
            if message["type"] == "http.response.body" and not message.get("more_body") and self.janitor is not None:
                import anyio

                await anyio.to_thread.run_sync(self.janitor.sweep)  # before the client hears the upload is stored
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send, received)

    async def _refuse(self, send, size: int) -> None:
        refused("upload", f"a request of over {size / 2**20:.0f} MB (at most {self.max_bytes / 2**20:.0f} MB each)")
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Upload too large: send one image of at most 25 MB."})


__all__ = ["RefusedRequests", "UploadJanitor", "UploadLimit", "refused"]
