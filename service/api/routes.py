"""HTTP routes. Thin: parse and validate, call the pipeline / stores off the event loop, shape the response."""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from .auth import ADMIN, READ
from .errors import ApiError, error_body, error_responses
from .pipeline import DetectOptions, Upload, decode_in_pool, detect_uploads, infer
from .results import iso, parse_since, parse_window
from .schemas import (NAME_PATTERN, BatchResult, CalibrationResult, DetectResult, Health, ModelsInfo, Readiness,
                      ReloadIn, ReloadOut, ResultRecord, ResultsPage, ScoreName, Stats, ThresholdConfig,
                      ThresholdEntry, ThresholdIn)
from .thresholds import calibrate, default_threshold

router = APIRouter()
UPLOAD_FIELDS = ("file", "files")


def _state(request: Request):  # noqa: ANN202
    return request.app.state.zsad


# --- options ----------------------------------------------------------------------------------------------------------
class DetectParams(BaseModel):
    """Options of /v1/detect, as query parameters or (multipart) form fields; form fields win."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    line: str | None = Field(None, pattern=NAME_PATTERN, description="Production line (for thresholds and stats).")
    product: str | None = Field(None, pattern=NAME_PATTERN, description="Product: selects the threshold.")
    heatmap: Literal["none", "png", "json"] = Field(
        "none", description="none: scores only (fastest); png: base64 PNG overlay; json: patch-level grid.")
    object: str | None = Field(None, max_length=64, description="Object word for the prompt score s_pr.")
    score: ScoreName | None = Field(
        None, description="Score the label is decided on (default: the product threshold's score, else settings).")

    def to_options(self) -> DetectOptions:
        obj = (self.object or "").strip().lower() or None
        return DetectOptions(self.line, self.product, self.heatmap, obj, self.score)


def _merge_form(params: DetectParams, fields: dict[str, str]) -> DetectParams:
    known = {k: v for k, v in fields.items() if k in DetectParams.model_fields}
    if not known:
        return params
    try:
        return DetectParams.model_validate({**params.model_dump(exclude_unset=True), **known})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise ApiError(422, "validation_error", f"form.{loc}: {first.get('msg', 'invalid')}") from None


async def _read_uploads(request: Request, max_files: int) -> tuple[list[Upload], dict[str, str]]:
    """Images from a multipart body (fields `file`/`files`) or a raw `image/*` body. Never fetches URLs."""
    ctype = request.headers.get("content-type", "")
    mime = ctype.split(";", 1)[0].strip().lower()
    uploads: list[Upload] = []
    fields: dict[str, str] = {}
    if mime == "multipart/form-data":
        form = await request.form(max_files=max_files, max_fields=32, max_part_size=64 * 1024)
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


def _detect_body(multi: bool) -> dict[str, Any]:
    file_schema = {"type": "string", "format": "binary"}
    props: dict[str, Any] = {
        ("files" if multi else "file"): {"type": "array", "items": file_schema} if multi else file_schema,
        "line": {"type": "string"}, "product": {"type": "string"},
        "heatmap": {"type": "string", "enum": ["none", "png", "json"]}, "object": {"type": "string"},
        "score": {"type": "string", "enum": ["fnn", "prompt", "combined"]},
    }
    content: dict[str, Any] = {"multipart/form-data": {"schema": {"type": "object", "properties": props}}}
    for mime in ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/webp"):
        content[mime] = {"schema": file_schema}
    return {"requestBody": {"required": True, "content": content,
                            "description": "Multipart upload (`file`; form fields override query options), or the "
                                           "raw image as the body with an image/* Content-Type."}}


DETECT_ERRORS = error_responses(400, 401, 403, 413, 415, 422, 503, 504)


# --- health -------------------------------------------------------------------------------------------------------------
def _readiness(state) -> Readiness:  # noqa: ANN001
    return Readiness(ready=state.status == "ready" and state.detector is not None, status=state.status,
                     model=state.model_ref(), error=state.error)


@router.get("/healthz", response_model=Health, tags=["health"], summary="Liveness: process and worker alive",
            responses=error_responses(503))
async def healthz(request: Request):
    if not _state(request).worker.alive and _state(request).status != "stopping":
        raise ApiError(503, "worker_dead", "the inference worker thread is not running")
    return Health()


@router.get("/readyz", response_model=Readiness, tags=["health"],
            summary="Readiness: a model is loaded and warmed up (503 otherwise)", responses=error_responses(503))
async def readyz(request: Request):
    r = _readiness(_state(request))
    if not r.ready:
        body = error_body("not_ready", f"not ready: {r.status}" + (f" ({r.error})" if r.error else ""))
        return JSONResponse({**body, **r.model_dump()}, status_code=503)
    return r


@router.get("/v2/health/live", tags=["health"], summary="KServe v2 liveness",
            responses={200: {"content": {"application/json": {"example": {"live": True}}}}})
async def v2_live(request: Request):
    return {"live": _state(request).worker.alive}


@router.get("/v2/health/ready", tags=["health"], summary="KServe v2 readiness (503 when not ready)",
            responses={200: {"content": {"application/json": {"example": {"ready": True}}}}, **error_responses(503)})
async def v2_ready(request: Request):
    r = _readiness(_state(request))
    if not r.ready:
        return JSONResponse({**error_body("not_ready", f"not ready: {r.status}"), "ready": False}, status_code=503)
    return {"ready": True}


# --- detection ------------------------------------------------------------------------------------------------------------
@router.post("/v1/detect", response_model=DetectResult, tags=["detect"], dependencies=READ,
             summary="Score one image", openapi_extra=_detect_body(False), responses=DETECT_ERRORS)
async def detect(request: Request, params: Annotated[DetectParams, Query()]):
    state = _state(request)
    with state.worker.arrival() as arrival:  # the batcher may wait for this request while it is read and decoded
        uploads, fields = await _read_uploads(request, 1)
        opts = _merge_form(params, fields).to_options()
        return (await detect_uploads(state, uploads, opts, arrival))[0]


@router.post("/v1/detect/batch", response_model=BatchResult, tags=["detect"], dependencies=READ,
             summary="Score several images in one request (multipart, repeated `files` or `file` fields)",
             openapi_extra=_detect_body(True), responses=DETECT_ERRORS)
async def detect_batch(request: Request, params: Annotated[DetectParams, Query()]):
    state = _state(request)
    with state.worker.arrival() as arrival:
        uploads, fields = await _read_uploads(request, state.settings.batch_max_images)
        opts = _merge_form(params, fields).to_options()
        results = await detect_uploads(state, uploads, opts, arrival)
    return {"count": len(results), "anomalous": sum(r["label"] == "anomalous" for r in results), "results": results}


# --- thresholds --------------------------------------------------------------------------------------------------------
ProductPath = Annotated[str, Path(pattern=NAME_PATTERN, description="Product name.")]
LineQuery = Annotated[str | None, Query(pattern=NAME_PATTERN, description="Production line (omit: the product).")]


@router.get("/v1/thresholds", response_model=ThresholdConfig, tags=["thresholds"], dependencies=READ,
            summary="All product and line thresholds, and the default", responses=error_responses(401, 403))
async def list_thresholds(request: Request):
    state = _state(request)
    s = state.settings
    manifest = state.detector.manifest if state.detector is not None else None
    d = default_threshold(s.default_score, s.default_threshold, manifest)
    data = await to_thread.run_sync(state.thresholds.all)
    return {"products": data.get("products", {}),
            "default": {"threshold": d.threshold, "source": d.source, "score": d.score}}


@router.get("/v1/thresholds/{product}", response_model=ThresholdEntry, tags=["thresholds"], dependencies=READ,
            summary="One product's thresholds", responses=error_responses(401, 403, 404))
async def get_threshold(request: Request, product: ProductPath):
    entry = await to_thread.run_sync(_state(request).thresholds.get, product)
    if entry is None:
        raise ApiError(404, "not_found", f"no thresholds set for product {product!r}")
    return {"product": product, "entry": entry}


@router.put("/v1/thresholds/{product}", response_model=ThresholdEntry, tags=["thresholds"], dependencies=ADMIN,
            summary="Set a product's (or, with ?line=, one line's) threshold; persisted atomically",
            responses=error_responses(401, 403, 422))
async def put_threshold(request: Request, product: ProductPath, body: ThresholdIn, line: LineQuery = None):
    state = _state(request)
    score = body.score or state.settings.default_score
    entry = await to_thread.run_sync(lambda: state.thresholds.put(product, body.threshold, score, line, "manual"))
    return {"product": product, "entry": entry}


@router.delete("/v1/thresholds/{product}", status_code=204, tags=["thresholds"], dependencies=ADMIN,
               summary="Remove a product's thresholds (or, with ?line=, one line's)",
               responses=error_responses(401, 403, 404))
async def delete_threshold(request: Request, product: ProductPath, line: LineQuery = None):
    if not await to_thread.run_sync(_state(request).thresholds.delete, product, line):
        raise ApiError(404, "not_found", f"no threshold for product {product!r}" + (f" line {line!r}" if line else ""))
    return Response(status_code=204)


@router.post("/v1/calibrate/{product}", response_model=CalibrationResult, tags=["thresholds"], dependencies=ADMIN,
             summary="Propose (and store) a threshold from N normal images at a target false-reject rate",
             openapi_extra=_detect_body(True), responses=error_responses(400, 401, 403, 413, 415, 422, 503, 504))
async def calibrate_product(
    request: Request,
    product: ProductPath,
    line: LineQuery = None,
    target_frr: Annotated[float, Query(gt=0.0, lt=1.0, description="Target false-reject rate on normal images.")] = 0.01,
    score: Annotated[ScoreName | None, Query(description="Score to calibrate (default: settings).")] = None,
    object: Annotated[str | None, Query(max_length=64, description="Object word for s_pr.")] = None,  # noqa: A002
    store: Annotated[bool, Query(description="Store the threshold (false: only propose it).")] = True,
):
    state = _state(request)
    s = state.settings
    uploads, _ = await _read_uploads(request, s.calibration_max_images)
    score_name = score or s.default_score
    obj = (object or "").strip().lower() or None
    deadline = time.perf_counter() + s.request_timeout_s * max(1, len(uploads) // max(1, s.max_batch_size))
    scores: list[float] = []
    model = None
    chunk = max(1, s.max_batch_size)
    for i in range(0, len(uploads), chunk):  # decode and score a chunk at a time: memory stays bounded
        part = uploads[i: i + chunk]
        decoded = await decode_in_pool(state, part)
        results = await infer(state, [d.model_input for d in decoded], obj, False, deadline)
        scores.extend(float(r.detection.scores[score_name]) for r in results)
        model = {"name": results[0].model_name, "version": results[0].model_version, "clip": results[0].clip}
        for u in part:
            u.data = b""
    threshold, dist = calibrate(scores, target_frr)
    if store:
        summary = {k: v for k, v in dist.items() if k not in ("scores", "histogram")}
        summary["model"] = model
        await to_thread.run_sync(lambda: state.thresholds.put(product, threshold, score_name, line, "calibration",
                                                              summary))
    return {"product": product, "line": line, "score_name": score_name, "threshold": threshold,
            "target_frr": target_frr, "stored": store, "model": model, "distribution": dist}


# --- results ----------------------------------------------------------------------------------------------------------------
def _record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "created_at": iso(row["created_at"]), "line": row["line"], "product": row["product"],
        "model": {"name": row["model_name"], "version": row["model_version"]}, "score_name": row["score_name"],
        "score": row["score"], "label": row["label"], "threshold": row["threshold"],
        "threshold_source": row["threshold_source"], "scores": row["scores"], "latency_ms": row["latency_ms"],
        "object": row["object_name"], "filename": row["filename"], "width": row["width"], "height": row["height"],
        "heatmap_url": f"/v1/results/{row['id']}/heatmap.png" if row.get("has_heatmap") else None,
    }


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_since(value)
    except ValueError:
        raise ApiError(422, "validation_error", f"query.since: not an ISO-8601 time or Unix seconds: {value!r}") from None


@router.get("/v1/results", response_model=ResultsPage, tags=["results"], dependencies=READ,
            summary="Result history, newest first, with a stable cursor", responses=error_responses(401, 403, 422))
async def list_results(
    request: Request,
    line: Annotated[str | None, Query(max_length=64)] = None,
    product: Annotated[str | None, Query(max_length=64)] = None,
    label: Annotated[Literal["anomalous", "normal"] | None, Query()] = None,
    since: Annotated[str | None, Query(description="ISO-8601 time or Unix seconds; results at or after it.")] = None,
    cursor: Annotated[str | None, Query(max_length=20, description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
):
    after = None
    if cursor is not None:
        if not cursor.isdigit() or int(cursor) < 1:
            raise ApiError(422, "validation_error", f"query.cursor: invalid cursor {cursor!r}")
        after = int(cursor)
    rows, nxt = await to_thread.run_sync(
        lambda: _state(request).results.page(line, product, label, _since(since), after, limit))
    return {"items": [_record(r) for r in rows], "next_cursor": str(nxt) if nxt is not None else None, "limit": limit}


ResultId = Annotated[int, Path(ge=1, le=2**62, description="Result id.")]


@router.get("/v1/results/{result_id}", response_model=ResultRecord, tags=["results"], dependencies=READ,
            summary="One result", responses=error_responses(401, 403, 404))
async def get_result(request: Request, result_id: ResultId):
    row = await to_thread.run_sync(_state(request).results.get, result_id)
    if row is None:
        raise ApiError(404, "not_found", f"result {result_id} not found")
    return _record(row)


@router.get("/v1/results/{result_id}/heatmap.png", tags=["results"], dependencies=READ,
            summary="The stored heatmap overlay of a result (while within the retention limit)",
            response_class=Response,
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                       **error_responses(401, 403, 404)})
async def get_result_heatmap(request: Request, result_id: ResultId):
    png = await to_thread.run_sync(_state(request).results.heatmap, result_id)
    if png is None:
        raise ApiError(404, "not_found", f"no stored heatmap for result {result_id} (none was computed, or it "
                                         f"was dropped by the retention limit)")
    return Response(png, media_type="image/png")


@router.get("/v1/stats", response_model=Stats, tags=["results"], dependencies=READ,
            summary="Count, anomaly rate and score percentiles over a time window", responses=error_responses(401, 403, 422))
async def stats(
    request: Request,
    line: Annotated[str | None, Query(max_length=64)] = None,
    product: Annotated[str | None, Query(max_length=64)] = None,
    window: Annotated[str, Query(max_length=16, description="'15m', '24h', '7d', seconds, or 'all'.")] = "24h",
):
    since = None
    if window != "all":
        try:
            since = time.time() - parse_window(window)
        except ValueError:
            raise ApiError(422, "validation_error", f"query.window: use e.g. 15m, 24h, 7d or 'all', got {window!r}") from None
    out = await to_thread.run_sync(_state(request).results.stats, line, product, since)
    return {"line": line, "product": product, "window": window, "since": iso(since) if since else None, **out}


# --- models -------------------------------------------------------------------------------------------------------------------
def _available(store_root) -> list[dict[str, Any]]:  # noqa: ANN001
    from ..store import ModelStore, StoreError

    store = ModelStore(store_root)
    out = []
    for name in store.names():
        try:
            versions = store.versions(name)
            if not versions or store.manifest(name, versions[-1]).get("kind") != "fnn":
                continue
            out.append({"name": name, "versions": versions, "current": store.current(name)})
        except StoreError:
            continue
    return out


@router.get("/v1/models", response_model=ModelsInfo, tags=["models"], dependencies=READ,
            summary="The loaded model (manifest) and the FNN models in the store", responses=error_responses(401, 403))
async def models(request: Request):
    state = _state(request)
    det = state.detector
    model = None
    if det is not None:
        model = {**state.model_ref(det), "device": str(det.backend.device),
                 "dtype": str(getattr(det.backend, "dtype", "")), "tta_views": det.tta_views,
                 "window_scales": list(det.window_scales), "manifest": det.manifest}
    available = await to_thread.run_sync(_available, state.settings.model_store)
    return {"ready": state.status == "ready", "status": state.status, "model": model, "available": available,
            "error": state.error}


@router.post("/v1/models/reload", response_model=ReloadOut, tags=["models"], dependencies=ADMIN,
             summary="Load a model version fully, then swap it in; on failure the old one keeps serving",
             responses=error_responses(401, 403, 404, 409, 422, 500))
async def reload_model(request: Request, body: Annotated[ReloadIn | None, Body()] = None):
    body = body or ReloadIn()
    return await to_thread.run_sync(_state(request).reload, body.name, body.version)


# --- metrics -------------------------------------------------------------------------------------------------------------------
@router.get("/metrics", tags=["metrics"], summary="Prometheus metrics (text exposition format)",
            response_class=Response,
            responses={200: {"content": {"text/plain": {"example": "zsad_requests_total{endpoint=\"/v1/detect\","
                                                                   "status=\"200\"} 42.0\nzsad_model_ready 1.0\n"}}}})
async def metrics(request: Request):
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
