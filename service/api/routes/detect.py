"""POST /v1/detect and /v1/detect/batch: read the upload, hand it to the pipeline, shape the answer."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from ..deps import READ, AuthFirstRoute, StateDep
from ..errors import error_responses
from ..pipeline import DetectOptions, detect_uploads
from ..responses import FastJSONResponse
from ..schemas import BatchResult, DetectParams, DetectResult
from ..uploads import merge_form, read_uploads, upload_body

router = APIRouter(tags=["detect"], dependencies=READ, route_class=AuthFirstRoute)
DETECT_ERRORS = error_responses(400, 401, 403, 413, 415, 422, 503, 504)


def _options(params: DetectParams) -> DetectOptions:
    obj = (params.object or "").strip().lower() or None
    return DetectOptions(params.line, params.product, params.heatmap, obj, params.score)


@router.post("/v1/detect", response_model=DetectResult, summary="Score one image",
             openapi_extra=upload_body(False), responses=DETECT_ERRORS)
async def detect(request: Request, state: StateDep, params: Annotated[DetectParams, Query()]):
    with state.worker.arrival() as arrival:  # the batcher may wait for this request while it is read and decoded
        uploads, fields = await read_uploads(request, 1)
        opts = _options(merge_form(params, fields))
        return FastJSONResponse((await detect_uploads(state, uploads, opts, arrival))[0])


@router.post("/v1/detect/batch", response_model=BatchResult,
             summary="Score several images in one request (multipart, repeated `files` or `file` fields)",
             openapi_extra=upload_body(True), responses=DETECT_ERRORS)
async def detect_batch(request: Request, state: StateDep, params: Annotated[DetectParams, Query()]):
    with state.worker.arrival() as arrival:
        uploads, fields = await read_uploads(request, state.settings.batch_max_images)
        opts = _options(merge_form(params, fields))
        results = await detect_uploads(state, uploads, opts, arrival)
    return FastJSONResponse({"count": len(results), "anomalous": sum(r["label"] == "anomalous" for r in results),
                             "review": sum(r["label"] == "review" for r in results), "results": results})
