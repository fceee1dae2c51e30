"""A cap on request bodies, checked before anything reads them.

FastAPI reads a whole JSON body before the admin token is even looked at, so without a cap
anyone who can reach the page could make the aggregator buffer an arbitrarily large request.
"""

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# The largest admin request (a 128-char peer and a 500-char reason) fits in well under 4 KiB.
MAX_BODY_BYTES = 4096


class BodyLimit:
    """ASGI middleware: 411 for a body without Content-Length, 413 for one over `max_body_bytes`."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        """Wrap `app`; requests without a body (GET, HEAD, ...) pass untouched."""
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse an oversized or unsized body; pass everything else on."""
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is None and b"transfer-encoding" in headers:
            detail = "send the request body with a Content-Length"
            await JSONResponse({"detail": detail}, status_code=411)(scope, receive, send)
            return
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            detail = f"request body over {self.max_body_bytes} bytes"
            await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
            return
        await self.app(scope, receive, send)
