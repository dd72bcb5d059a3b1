"""The Open Inference Protocol (v2) REST endpoints, KServe's and Triton's: server and model metadata, model readiness
and inference. `/v2/health/*` are in `health.py`.

Inference runs through the same detect pipeline as /v1/detect (`pipeline.detect_uploads`: decoding, the
micro-batcher, thresholds, result history, metrics) and needs the same read scope; the tensor (de)serialisation is
`oip.py`. One model is served, under the name `ZSAD_OIP_MODEL_NAME` (default `zsad`), with one version: the loaded
model's. Errors take OIP's shape `{"error": "..."}` (see `errors.py`).
"""
from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ... import __version__
from ..deps import READ, AuthFirstRoute, StateDep
from ..errors import ApiError, error_responses, oip_error_body
from ..oip import EXTENSIONS, TensorError, encode_response, model_metadata, parse_infer_request, result_tensors
from ..oip_schemas import InferRequest, InferResponse, ModelMetadata, ModelReady, ServerMetadata
from ..pipeline import DetectOptions, Upload, detect_uploads
from ..schemas import DetectParams
from ..state import AppState

router = APIRouter(tags=["inference (OIP v2)"], dependencies=READ, route_class=AuthFirstRoute)
MODEL = "/v2/models/{model_name}"
VERSION = "/v2/models/{model_name}/versions/{model_version}"
HEADER_LENGTH = "Inference-Header-Content-Length"


def _model(state: AppState, model_name: str, model_version: str | None) -> Any:
    """The loaded detector when it is the model (and version) asked for: 404 otherwise, 503 while none is ready."""
    name = state.settings.oip_model_name
    if model_name != name:
        raise ApiError(404, "model_not_found", f"unknown model {model_name!r}: this server serves {name!r}")
    det = state.require_ready()
    if model_version not in (None, det.version):
        raise ApiError(404, "model_not_found",
                       f"model {name!r} has no version {model_version!r} loaded (serving {det.version!r})")
    return det


@router.get("/v2", response_model=ServerMetadata, summary="OIP server metadata", responses=error_responses(401, 403, oip=True))
async def server_metadata(state: StateDep):
    return {"name": "zsad", "version": __version__, "extensions": list(EXTENSIONS)}


META = dict(response_model=ModelMetadata, response_model_exclude_none=True,
            responses=error_responses(401, 403, 404, 503, oip=True))
READY = dict(response_model=ModelReady, responses=error_responses(401, 403, 404, 503, oip=True))


def _metadata(state: AppState, model_name: str, model_version: str | None) -> dict[str, Any]:
    det = _model(state, model_name, model_version)
    return model_metadata(model_name, det.version, {"model": det.name, "clip": det.backend.spec.label()})


def _ready(state: AppState, model_name: str, model_version: str | None) -> Any:
    try:
        _model(state, model_name, model_version)
    except ApiError as exc:
        if exc.status != 503:
            raise
        return JSONResponse({**oip_error_body(exc.code, exc.message), "name": model_name, "ready": False},
                            status_code=503, headers=exc.headers)
    return {"name": model_name, "ready": True}


@router.get(MODEL, summary="OIP model metadata: the input and outputs", **META)
async def metadata(state: StateDep, model_name: str):
    return _metadata(state, model_name, None)


@router.get(VERSION, summary="OIP model metadata of one version (the loaded one)", **META)
async def version_metadata(state: StateDep, model_name: str, model_version: str):
    return _metadata(state, model_name, model_version)


@router.get(f"{MODEL}/ready", summary="OIP model readiness (503 while not ready)", **READY)
async def ready(state: StateDep, model_name: str):
    return _ready(state, model_name, None)


@router.get(f"{VERSION}/ready", summary="OIP readiness of one model version", **READY)
async def version_ready(state: StateDep, model_name: str, model_version: str):
    return _ready(state, model_name, model_version)


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` references inlined (the OpenAPI document does not hold them)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inline(InferRequest.model_json_schema()),
                         "example": InferRequest.model_config["json_schema_extra"]["examples"][0]},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}, "description": "The JSON inference request; or, with the header `Inference-Header-Content-Length: N`, N bytes of "
                  "that JSON followed by the raw `image` tensor (Triton's binary tensor extension: each image as a "
                  "4-byte little-endian length and its file bytes)."}}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "JSON, or binary (header `Inference-Header-Content-Length`) when an output asked for it",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(400, 401, 403, 404, 413, 415, 503, 504, oip=True),
}


def _options(parsed_options: dict[str, Any]) -> DetectOptions:
    try:
        params = DetectParams.model_validate(parsed_options)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise ApiError(400, "invalid_inference_request", f"parameters.{loc}: {first.get('msg', 'invalid')}") from None
    obj = (params.object or "").strip().lower() or None
    return DetectOptions(params.line, params.product, params.heatmap, obj, params.score)


INFER = dict(response_model=InferResponse, openapi_extra=INFER_BODY, responses=INFER_RESPONSES)


@router.post(f"{MODEL}/infer", summary="OIP inference: score images like /v1/detect", **INFER)
async def infer(request: Request, state: StateDep, model_name: str):
    return await _infer(request, state, model_name, None)


@router.post(f"{VERSION}/infer", summary="OIP inference on one model version (the loaded one)", **INFER)
async def version_infer(request: Request, state: StateDep, model_name: str, model_version: str):
    return await _infer(request, state, model_name, model_version)


async def _infer(request: Request, state: AppState, model_name: str, model_version: str | None) -> Response:
    _model(state, model_name, model_version)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, "unsupported_media_type", f"compressed requests ({encoding}) are not accepted: "
                                                      "send the body uncompressed")
    with state.worker.arrival() as arrival:  # as /v1/detect: the batcher may wait while this request is read
        body = await request.body()
        try:
            parsed = await to_thread.run_sync(parse_infer_request, body, request.headers.get(HEADER_LENGTH),
                                              state.settings.batch_max_images)
        except TensorError as exc:
            raise ApiError(400, exc.code, str(exc)) from None
        opts = _options(parsed.options)
        uploads = [Upload(data) for data in parsed.images]
        results = await detect_uploads(state, uploads, opts, arrival)
    first = results[0]
    tensors = result_tensors(results, [name for name, _ in parsed.outputs])
    content, header_length = await to_thread.run_sync(
        encode_response, model_name, first["model"]["version"], parsed.id, tensors, dict(parsed.outputs),
        {"score_name": first["score_name"], "threshold_source": first["threshold_source"]})
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})
