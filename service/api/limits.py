"""Request size limits and the image-type allow-list.

The body limit is enforced while the body is read (a declared `Content-Length` over the limit is refused at once,
but a missing or lying one does not get past the byte counter). The allow-list is checked on the first bytes of each
upload (magic numbers), not on the client's declared content type: the formats `preprocess.load_image` decodes
(JPEG, PNG, BMP, TIFF incl. BigTIFF, WebP and GIF, first frame), so the service and the CLI accept the same files.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .errors import error_content

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body exceeds {limit} bytes")
        self.limit = limit


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` (or a path prefix's own limit) with 413, counting bytes as they arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int, overrides: dict[str, int] | None = None):
        self.app = app
        self.default_max = max_bytes
        self.overrides = sorted((overrides or {}).items(), key=lambda kv: -len(kv[0]))

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.overrides:
            if path.startswith(prefix):
                return limit
        return self.default_max

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.limit_for(scope.get("path", ""))
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > max_bytes:
                    await _send_413(send, max_bytes, scope.get("path", ""))
                    return
        seen = 0

        async def _receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise BodyTooLarge(max_bytes)
            return message

        await self.app(scope, _receive, send)


async def _send_413(send: Send, limit: int, path: str = "") -> None:
    body = json.dumps(error_content(path, "payload_too_large", f"request body exceeds {limit} bytes")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def sniff_format(head: bytes) -> str | None:
    """The allow-listed format of an image from its first bytes, or None (SVG, PDF, text, ... are refused)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"BM") and len(head) >= 14:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    return None


def describe_format(head: bytes) -> str:
    """A short name for refused content, for the error message."""
    if head.lstrip()[:5].lower() in (b"<?xml", b"<svg ") or b"<svg" in head[:256].lower():
        return "SVG"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF/MP4"
    return "unknown"
