"""Request size limits and the image-type allow-list.

The body limit is enforced while the body is read (a declared `Content-Length` over the limit is refused at once,
but a missing or lying one does not get past the byte counter). The allow-list is checked on the first bytes of each
upload (magic numbers), not on the client's declared content type: the formats `preprocess.load_image` decodes
(JPEG, PNG, BMP, TIFF incl. BigTIFF, WebP and GIF, first frame), so the service and the CLI accept the same files.
"""
from __future__ import annotations

import asyncio
import collections
import json
import time
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


class BodyTimeout(Exception):
    def __init__(self, seconds: float):
        super().__init__(f"the request body did not arrive within {seconds:g} s")
        self.seconds = seconds


class UploadGuardMiddleware:
    """Request bodies in flight: framing, a deadline and a cap on how many are read at once.

    * Both `Content-Length` and `Transfer-Encoding` (or two different lengths) -> 400 and the connection is closed
      (RFC 9112 section 6.3: such a message may be a request-smuggling attempt; the server must close after it).
    * The whole body must arrive within `timeout_s` of the request's start: a stalled or trickling upload gets
      `BodyTimeout` from `receive` (the app answers 408 and closes the connection).
    * At most `max_uploads` request bodies are read at once. Another request waits for a slot (its body stays in
      the socket) until its body deadline, then gets 503 with `Retry-After`. A request holds its slot until its
      body has been read (or it ends), so slow or stalled clients cannot make the server buffer without bound.
    """

    def __init__(self, app: ASGIApp, timeout_s: float, max_uploads: int):
        self.app = app
        self.timeout_s = timeout_s
        self.max_uploads = max_uploads
        self.reading = 0
        self._slots: asyncio.Semaphore | None = None  # made on first use, in the server's event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lengths = {v.strip() for k, v in scope.get("headers", ()) if k == b"content-length"}
        chunked = any(k == b"transfer-encoding" for k, _ in scope.get("headers", ()))
        if (lengths and chunked) or len(lengths) > 1:
            await _send_error(send, 400, "bad_request", "conflicting Content-Length and Transfer-Encoding headers "
                              "(RFC 9112 section 6.3); the connection is closed", scope.get("path", ""))
            return
        if not chunked and (not lengths or lengths == {b"0"}):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_uploads)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except asyncio.TimeoutError:
            await _send_error(send, 503, "too_many_uploads", f"{self.max_uploads} uploads were being received for "
                              f"{self.timeout_s:g} s; retry later", scope.get("path", ""), [(b"retry-after", b"5")])
            return
        holding = True
        started = False
        self.reading += 1

        def release() -> None:
            nonlocal holding
            if holding:
                holding = False
                self.reading -= 1
                self._slots.release()

        async def _receive() -> Message:
            if not holding or started:  # the body is in, or the answer is on its way: plain receive
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                release()
                raise BodyTimeout(self.timeout_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                release()
            return message

        async def _send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, _receive, _send)
        finally:
            release()


async def _send_error(send: Send, status: int, code: str, message: str, path: str = "",
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_content(path, code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


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


# --- decoded pixels in flight ----------------------------------------------------------------------------------------
class PixelBudgetTimeout(Exception):
    """No room in the pixel budget before the request's deadline."""


class PixelBudget:
    """At most `capacity` decoded image pixels in flight across all requests and batches (a semaphore on pixels,
    not on requests): memory follows pixels, and a 48 KB PNG can declare 49 MP.

    A request reserves what it needs at once (no request ever waits while holding pixels, so there is no
    deadlock), more than the capacity is cut to the capacity (such a request then runs alone), and it gives back
    what it no longer needs (`Reservation.shrink_to`) or all of it (`release`). Requests are admitted in arrival
    order, but one that fits may go ahead of a larger one waiting for room, until that one has waited
    `overtake_s`: then everyone queues behind it, so it cannot starve. Event-loop only (not thread-safe)."""

    def __init__(self, capacity: int, overtake_s: float = 1.0):
        self.capacity = max(1, int(capacity))
        self.overtake_s = overtake_s
        self.in_use = 0
        self._waiters: collections.deque[list] = collections.deque()  # [need, future, since]

    def _grant(self) -> None:
        now = time.monotonic()
        for waiter in list(self._waiters):
            need, future, since = waiter
            if future.done():
                self._waiters.remove(waiter)
            elif self.in_use + need <= self.capacity:
                self.in_use += need
                future.set_result(None)
                self._waiters.remove(waiter)
            elif now - since >= self.overtake_s:
                break  # it has waited long enough: nobody behind it goes first

    async def reserve(self, need: int, timeout: float) -> Reservation:
        need = max(1, min(int(need), self.capacity))
        if not self._waiters and self.in_use + need <= self.capacity:
            self.in_use += need
            return Reservation(self, need)
        future = asyncio.get_running_loop().create_future()
        waiter = [need, future, time.monotonic()]
        self._waiters.append(waiter)
        self._grant()
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, timeout))
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if future.done() and not future.cancelled():  # granted just as we gave up: give it back
                self._give_back(need)
            else:
                future.cancel()
                self._grant()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise PixelBudgetTimeout(f"{need:,} pixels did not fit in the budget of {self.capacity:,} within "
                                     f"{timeout:.1f} s") from None
        return Reservation(self, need)

    def _give_back(self, n: int) -> None:
        self.in_use -= n
        self._grant()


class Reservation:
    """Pixels held from a `PixelBudget`; an async context manager that releases them."""

    def __init__(self, budget: PixelBudget, held: int):
        self.budget = budget
        self.held = held

    def shrink_to(self, n: int) -> None:
        """Keep only `n` pixels (what the decoded, reduced images still take); never grows."""
        n = max(0, min(int(n), self.held))
        if n < self.held:
            freed, self.held = self.held - n, n
            self.budget._give_back(freed)

    def release(self) -> None:
        self.shrink_to(0)

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
