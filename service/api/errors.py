"""One error shape for every failure: `{"error": {"code": "...", "message": "..."}}`.

Handlers are registered for our own `ApiError`, Starlette's `HTTPException` (404/405 from routing, 400 from the
multipart parser), FastAPI's `RequestValidationError` (422) and any other exception (500, logged with a reference,
never a stack trace in the body).

Under `/v2` (the Open Inference Protocol) errors take that protocol's shape, `{"error": "<message>"}`, plus our
`code`: Triton's and KServe's clients read `error` as the message string (tritonclient raises
`InferenceServerException(msg=body["error"])`), so the nested object would reach their users as a dict's repr.
"""
from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("zsad.api")

DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An error with an HTTP status, a stable machine-readable code and a human message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


_ABS_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s'\"/]+/)+([^\s'\"/,;)]*)")


def public_text(text: str) -> str:
    """`text` with every absolute file path cut to its last component: for messages that callers may see (reload
    answers, readiness on a route that needs no key). Logs keep the full text."""
    return _ABS_PATH.sub(lambda m: m.group(1) or "<path>", text)


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def is_oip(path: str) -> bool:
    """A path of the Open Inference Protocol (v2), whose clients expect its error shape."""
    return path == "/v2" or path.startswith("/v2/")


def oip_error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": message, "code": code}


def error_content(path: str, code: str, message: str) -> dict[str, Any]:
    """The error body for a request path: OIP's shape under /v2, ours elsewhere."""
    return oip_error_body(code, message) if is_oip(path) else error_body(code, message)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   path: str = "") -> JSONResponse:
    return JSONResponse(error_content(path, code, message), status_code=status, headers=headers)


# OpenAPI: the shape every error response has (referenced from the routes' `responses=`).
ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            "required": ["code", "message"],
        }
    },
    "required": ["error"],
}


OIP_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
    "required": ["error"],
}


def error_responses(*statuses: int, oip: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` entry for FastAPI routes: each status documented with the common error shape and an example
    (`oip`: the /v2 routes' shape)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        code = DEFAULT_CODES.get(status, "error")
        message = _EXAMPLE_MESSAGES.get(status, code.replace("_", " "))
        out[status] = {
            "description": code.replace("_", " "),
            "content": {
                "application/json": {
                    "schema": OIP_ERROR_SCHEMA if oip else ERROR_SCHEMA,
                    "example": oip_error_body(code, message) if oip else error_body(code, message),
                }
            },
        }
    return out


_EXAMPLE_MESSAGES = {
    400: "image could not be decoded: image file is truncated",
    401: "missing API key: send X-API-Key or Authorization: Bearer <key>",
    403: "this API key lacks the admin scope",
    404: "result 42 not found",
    409: "a model reload is already in progress",
    413: "request body exceeds 20971520 bytes",
    415: "image: unsupported image type (SVG); accepted: JPEG, PNG, BMP, TIFF, WebP, GIF",
    422: "query.limit: Input should be less than or equal to 500",
    500: "internal server error (reference 3f2a9c1e)",
    503: "inference queue is full, retry later",
    504: "inference did not finish within 60 s",
}


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body" or len(err.get("loc", ())) == 1)
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "") or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.detail, dict) and "code" in exc.detail:
            code, message = str(exc.detail["code"]), str(exc.detail.get("message", ""))
        else:
            code = DEFAULT_CODES.get(exc.status_code, "error")
            message = str(exc.detail) if exc.detail else code.replace("_", " ")
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "validation_error", _format_validation(exc), path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:8]
        log.error("unhandled error on %s %s (reference %s)", request.method, request.url.path, ref, exc_info=exc)
        return error_response(500, "internal_error", f"internal server error (reference {ref})", path=request.url.path)
