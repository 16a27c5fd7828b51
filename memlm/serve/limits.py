"""Request-size guard: bodies over a limit are refused (413) before anything parses them."""

from __future__ import annotations

import ctypes

from starlette.concurrency import run_in_threadpool

from memlm.serve.errors import error_response


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413 before anything parses them: by their
    Content-Length at once, or while a chunked body arrives. After a large body the allocator's free
    memory goes back to the system (glibc keeps it otherwise: a 20 MB prompt left RSS ~3.5 GB)."""

    TRIM_AFTER = 1 << 20

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, self._message(), "invalid_request_error", code="request_too_large")
            return await response(scope, receive, send)
        received = 0
        if declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # A chunked body: read it here, counting, and hand it on whole (it is under the limit).
            chunks = []
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    response = error_response(413, self._message(), "invalid_request_error", code="request_too_large")
                    return await response(scope, receive, send)
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            replayed = False

            async def whole():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                return await receive()

            app_receive = whole
        else:
            received = int(declared) if declared is not None and declared.isdigit() else 0
            app_receive = receive
        try:
            await self.app(scope, app_receive, send)
        finally:
            if received > self.TRIM_AFTER:
                await run_in_threadpool(_return_free_memory)

    def _message(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes (--max-body-bytes)"


def _return_free_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
