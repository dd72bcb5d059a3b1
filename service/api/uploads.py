"""Reading images out of an HTTP request: multipart fields `file`/`files`, or a raw `image/*` body.

HTTP parsing only: what the images are and what happens to them is the pipeline's business. Never fetches URLs.
"""
from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ..constants import SCORE_NAMES
from .errors import ApiError
from .pipeline import Upload
from .schemas import DetectParams

UPLOAD_FIELDS = ("file", "files")
MAX_FORM_FIELDS = 32
MAX_FIELD_BYTES = 64 * 1024


def merge_form(params: DetectParams, fields: dict[str, str]) -> DetectParams:
    """Query options overridden by multipart form fields of the same name (validated the same way)."""
    known = {k: v for k, v in fields.items() if k in DetectParams.model_fields}
    if not known:
        return params
    try:
        return DetectParams.model_validate({**params.model_dump(exclude_unset=True), **known})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise ApiError(422, "validation_error", f"form.{loc}: {first.get('msg', 'invalid')}") from None


async def read_uploads(request: Request, max_files: int) -> tuple[list[Upload], dict[str, str]]:
    """The images of a request and its other form fields. Raises ApiError (400/415) for anything else."""
    ctype = request.headers.get("content-type", "")
    mime = ctype.split(";", 1)[0].strip().lower()
    uploads: list[Upload] = []
    fields: dict[str, str] = {}
    if mime == "multipart/form-data":
        form = await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES)
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in UPLOAD_FIELDS:
                        raise ApiError(400, "invalid_upload", f"unexpected file field {key!r}; send images as 'file'")
                    uploads.append(Upload(await value.read(), value.filename, value.content_type))
                elif key in UPLOAD_FIELDS:
                    raise ApiError(400, "invalid_upload", f"field {key!r} must be a file upload, not a text value")
                else:
                    fields[key] = value
        finally:
            await form.close()
    elif mime.startswith("image/"):
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
        uploads.append(Upload(bytes(body), request.headers.get("x-filename") or None, mime))
    else:
        got = f"got {mime!r}" if mime else "no Content-Type"
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data with a 'file' field, or the image itself as the body with an "
                       f"image/* Content-Type ({got})")
    if not uploads:
        raise ApiError(400, "missing_file", "no image in the request: the multipart field 'file' is missing")
    if len(uploads) > max_files:
        raise ApiError(400, "too_many_files", f"at most {max_files} image(s) per request, got {len(uploads)}")
    return uploads, fields


def upload_body(multi: bool) -> dict[str, Any]:
    """`openapi_extra` describing an upload body (the routes read it themselves, so FastAPI cannot infer it)."""
    file_schema = {"type": "string", "format": "binary"}
    props: dict[str, Any] = {
        ("files" if multi else "file"): {"type": "array", "items": file_schema} if multi else file_schema,
        "line": {"type": "string"}, "product": {"type": "string"},
        "heatmap": {"type": "string", "enum": ["none", "png", "json"]}, "object": {"type": "string"},
        "score": {"type": "string", "enum": list(SCORE_NAMES)},
    }
    content: dict[str, Any] = {"multipart/form-data": {"schema": {"type": "object", "properties": props}}}
    for mime in ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/webp"):
        content[mime] = {"schema": file_schema}
    return {"requestBody": {"required": True, "content": content,
                            "description": "Multipart upload (`file`; form fields override query options), or the "
                                           "raw image as the body with an image/* Content-Type."}}
