"""Thresholds per product (and line), and calibration from normal images."""
from __future__ import annotations

from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from ...constants import ScoreName
from ..deps import ADMIN, READ, StateDep
from ..errors import ApiError, error_responses
from ..pipeline import calibrate_uploads
from ..schemas import NAME_PATTERN, CalibrationResult, ThresholdConfig, ThresholdEntry, ThresholdIn
from ..thresholds import default_threshold
from ..uploads import read_uploads, upload_body

router = APIRouter(tags=["thresholds"])
ProductPath = Annotated[str, Path(pattern=NAME_PATTERN, description="Product name.")]
LineQuery = Annotated[str | None, Query(pattern=NAME_PATTERN, description="Production line (omit: the product).")]


@router.get("/v1/thresholds", response_model=ThresholdConfig, dependencies=READ,
            summary="All product and line thresholds, and the default", responses=error_responses(401, 403))
async def list_thresholds(state: StateDep):
    s = state.settings
    manifest = state.detector.manifest if state.detector is not None else None
    d = default_threshold(s.default_score, s.default_threshold, manifest)
    data = await to_thread.run_sync(state.thresholds.all)
    products = data.get("products", {})
    await to_thread.run_sync(state.references.annotate, products, state.detector)
    return {"products": products,
            "default": {"threshold": d.threshold, "source": d.source, "score": d.score}}


@router.get("/v1/thresholds/{product}", response_model=ThresholdEntry, dependencies=READ,
            summary="One product's thresholds", responses=error_responses(401, 403, 404))
async def get_threshold(state: StateDep, product: ProductPath):
    entry = await to_thread.run_sync(state.thresholds.get, product)
    if entry is None:
        raise ApiError(404, "not_found", f"no thresholds set for product {product!r}")
    await to_thread.run_sync(state.references.annotate, {product: entry}, state.detector)
    return {"product": product, "entry": entry}


@router.put("/v1/thresholds/{product}", response_model=ThresholdEntry, dependencies=ADMIN,
            summary="Set a product's (or, with ?line=, one line's) threshold; persisted atomically",
            responses=error_responses(401, 403, 422))
async def put_threshold(state: StateDep, product: ProductPath, body: ThresholdIn, line: LineQuery = None):
    score = body.score or state.settings.default_score
    entry = await to_thread.run_sync(lambda: state.thresholds.put(product, body.threshold, score, line, "manual"))
    return {"product": product, "entry": entry}


@router.delete("/v1/thresholds/{product}", status_code=204, dependencies=ADMIN,
               summary="Remove a product's thresholds (or, with ?line=, one line's)",
               responses=error_responses(401, 403, 404))
async def delete_threshold(state: StateDep, product: ProductPath, line: LineQuery = None):
    def _delete() -> bool:  # the threshold and the reference memory fitted with it go together
        store = state.references.store
        had_memory = store.delete(product, line) if line else store.delete_all(product)
        state.references.forget(product, line)
        return state.thresholds.delete(product, line) or had_memory

    if not await to_thread.run_sync(_delete):
        raise ApiError(404, "not_found", f"no threshold for product {product!r}" + (f" line {line!r}" if line else ""))
    return Response(status_code=204)


@router.post("/v1/calibrate/{product}", response_model=CalibrationResult, dependencies=ADMIN,
             summary="Propose (and store) a threshold from N normal images at a target false-reject rate",
             openapi_extra=upload_body(True), responses=error_responses(400, 401, 403, 413, 415, 422, 503, 504))
async def calibrate_product(
    request: Request,
    state: StateDep,
    product: ProductPath,
    line: LineQuery = None,
    target_frr: Annotated[float, Query(gt=0.0, lt=1.0, description="Target false-reject rate on normal images.")] = 0.01,
    score: Annotated[ScoreName | None, Query(description="Score to calibrate (default: settings).")] = None,
    object: Annotated[str | None, Query(max_length=64, description="Object word for s_pr.")] = None,  # noqa: A002
    store: Annotated[bool, Query(description="Store the threshold (false: only propose it).")] = True,
    reference: Annotated[bool, Query(description="Also make the images the product's (line's) few-shot reference "
                                     "memory (false: keep only a threshold, and drop any memory).")] = True,
):
    uploads, _ = await read_uploads(request, state.settings.calibration_max_images)
    obj = (object or "").strip().lower() or None
    return await calibrate_uploads(state, uploads, product, line, score or state.settings.default_score, target_frr,
                                   obj, store, reference)
