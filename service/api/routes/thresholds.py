"""Thresholds per product (and line), and calibration from normal images."""
from __future__ import annotations

import re
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import Response

from ...constants import ScoreName
from ..deps import ADMIN, READ, AuthFirstRoute, CallerDep, StateDep
from ..errors import ApiError, error_responses
from ..pipeline import calibrate_uploads
from ..schemas import NAME_PATTERN, CalibrationRecord, CalibrationResult, ThresholdConfig, ThresholdEntry, ThresholdIn
from ..thresholds import VersionConflict, default_pixel_threshold, default_threshold
from ..uploads import read_uploads, upload_body

router = APIRouter(tags=["thresholds"], route_class=AuthFirstRoute)
ProductPath = Annotated[str, Path(pattern=NAME_PATTERN, description="Product name.")]
LineQuery = Annotated[str | None, Query(pattern=NAME_PATTERN, description="Production line (omit: the product).")]
IfMatch = Annotated[str | None, Header(description="Write only if the threshold row (the product's, or the line's "
                                                   "with ?line=) is still at this version (its ETag, e.g. \"3\"); "
                                                   "`*`: only if it exists. Else 409 `conflict`.")]
_ETAG = re.compile(r'^\s*(?:W/)?"?(\d{1,18}|\*)"?\s*$')


def _expected(if_match: str | None) -> int | str | None:
    if if_match is None:
        return None
    m = _ETAG.match(if_match)
    if m is None:
        raise ApiError(400, "bad_request", f"If-Match must be a threshold version such as \"3\" or *, got {if_match!r}")
    return "*" if m.group(1) == "*" else int(m.group(1))


def _etag(entry: dict[str, Any] | None, line: str | None) -> dict[str, str]:
    row = ((entry or {}).get("lines") or {}).get(line) if line else entry
    version = (row or {}).get("version")
    return {"ETag": f'"{version}"'} if version is not None else {}


def _conflict(exc: VersionConflict) -> ApiError:
    return ApiError(409, "conflict", str(exc))


@router.get("/v1/thresholds", response_model=ThresholdConfig, dependencies=READ,
            summary="All product and line thresholds, and the default", responses=error_responses(401, 403))
async def list_thresholds(state: StateDep):
    s = state.settings
    manifest = state.detector.manifest if state.detector is not None else None
    d = default_threshold(s.default_score, s.default_threshold, manifest)
    px = default_pixel_threshold(s.default_score, s.mask_threshold, manifest)
    data = await to_thread.run_sync(state.thresholds.all)
    products = data.get("products", {})
    await to_thread.run_sync(state.references.annotate, products, state.detector)
    return {"products": products,
            "default": {"threshold": d.threshold, "source": d.source, "score": d.score, "calibrated": False,
                        "pixel_threshold": px.pixel_threshold, "pixel_threshold_source": px.pixel_source}}


@router.get("/v1/thresholds/{product}", response_model=ThresholdEntry, dependencies=READ,
            summary="One product's thresholds", responses=error_responses(401, 403, 404))
async def get_threshold(state: StateDep, product: ProductPath, response: Response):
    entry = await to_thread.run_sync(state.thresholds.get, product)
    if entry is None:
        raise ApiError(404, "not_found", f"no thresholds set for product {product!r}")
    await to_thread.run_sync(state.references.annotate, {product: entry}, state.detector)
    response.headers.update(_etag(entry, None))
    return {"product": product, "entry": entry}


@router.put("/v1/thresholds/{product}", response_model=ThresholdEntry, dependencies=ADMIN,
            summary="Set a product's (or, with ?line=, one line's) threshold in one transaction; with If-Match, only "
                    "over the version read (else 409)",
            responses=error_responses(400, 401, 403, 409, 422))
async def put_threshold(state: StateDep, caller: CallerDep, product: ProductPath, body: ThresholdIn, response: Response,
                        line: LineQuery = None, if_match: IfMatch = None):
    score = body.score or state.settings.default_score
    expected = _expected(if_match)
    try:
        entry = await to_thread.run_sync(lambda: state.thresholds.put(
            product, body.threshold, score, line, "manual", expected_version=expected, updated_by=caller,
            pixel_threshold=body.pixel_threshold))
    except VersionConflict as exc:
        raise _conflict(exc) from None
    response.headers.update(_etag(entry, line))
    return {"product": product, "entry": entry}


@router.delete("/v1/thresholds/{product}", status_code=204, dependencies=ADMIN,
               summary="Remove a product's thresholds (or, with ?line=, one line's)",
               responses=error_responses(400, 401, 403, 404, 409))
async def delete_threshold(state: StateDep, product: ProductPath, line: LineQuery = None, if_match: IfMatch = None):
    expected = _expected(if_match)

    def _delete() -> bool:  # the threshold and the reference memory fitted with it go together
        done = state.thresholds.delete(product, line, expected_version=expected)  # a 409 leaves the memory as is
        store = state.references.store
        had_memory = store.delete(product, line) if line else store.delete_all(product)
        state.references.forget(product, line)
        return done or had_memory

    try:
        done = await to_thread.run_sync(_delete)
    except VersionConflict as exc:
        raise _conflict(exc) from None
    if not done:
        raise ApiError(404, "not_found", f"no threshold for product {product!r}" + (f" line {line!r}" if line else ""))
    return Response(status_code=204)


@router.get("/v1/thresholds/{product}/calibrations", response_model=list[CalibrationRecord], dependencies=READ,
            summary="The product's stored calibrations, newest first: who, when, how many images, the fitted values",
            responses=error_responses(401, 403))
async def list_calibrations(state: StateDep, product: ProductPath,
                            limit: Annotated[int, Query(ge=1, le=500, description="Most records returned.")] = 50):
    return await to_thread.run_sync(lambda: state.thresholds.calibrations(product, limit))


@router.post("/v1/calibrate/{product}", response_model=CalibrationResult, dependencies=ADMIN,
             summary="Propose (and store) a threshold from N normal images at a target false-reject rate",
             openapi_extra=upload_body(True), responses=error_responses(400, 401, 403, 413, 415, 422, 503, 504))
async def calibrate_product(
    request: Request,
    state: StateDep,
    caller: CallerDep,
    product: ProductPath,
    line: LineQuery = None,
    target_frr: Annotated[float, Query(ge=1e-6, lt=1.0, description="Target false-reject rate on normal images "
                                       "(1e-6 up to, not including, 1).")] = 0.01,
    score: Annotated[ScoreName | None, Query(description="Score to calibrate (default: settings).")] = None,
    object: Annotated[str | None, Query(max_length=64, description="Object word for s_pr.")] = None,  # noqa: A002
    store: Annotated[bool, Query(description="Store the threshold (false: only propose it).")] = True,
    pixel: Annotated[bool, Query(description="Also fit the pixel threshold of the regions and the mask from the same "
                                             "images (computes their heatmaps: slower).")] = True,
    reference: Annotated[bool | None, Query(
        description="Few-shot (WinCLIP+): also make the images the product's (line's) reference memory and fit the "
        "thresholds on few-shot scores and maps (leave-one-out). Default: few-shot when at least 2 images are given "
        "and the model can make a memory, else zero-shot (the answer's `mode` says which); true: few-shot or an "
        "error; false: a zero-shot threshold only (any memory of this product/line is dropped). See docs/service.md "
        "for when each pays.")] = None,
    dense: Annotated[bool | None, Query(
        description="Few-shot: give the memory a dense bank (CNN towers' mid-level features, PatchCore-style; needs 2+ "
        "shots). Pays for one product in a fixed pose; for a family of varying parts WinCLIP+ alone is safer. "
        "Default: the ZSAD_REFERENCE_DENSE setting; true: a dense bank or an error.")] = None,
):
    uploads, _ = await read_uploads(request, state.settings.calibration_max_images)
    obj = (object or "").strip().lower() or None
    return await calibrate_uploads(state, uploads, product, line, score or state.settings.default_score, target_frr,
                                   obj, store, pixel, reference, caller=caller, dense=dense)
