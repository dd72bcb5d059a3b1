"""Result history: pages of stored results, one result, its heatmap, and windowed statistics."""
from __future__ import annotations

import time
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from ..deps import READ, StateDep
from ..errors import ApiError, error_responses
from ..results import iso, parse_since, parse_window, record
from ..schemas import Label, ResultRecord, ResultsPage, Stats

router = APIRouter(tags=["results"], dependencies=READ)
ResultId = Annotated[int, Path(ge=1, le=2**62, description="Result id.")]


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_since(value)
    except ValueError:
        raise ApiError(422, "validation_error", f"query.since: not an ISO-8601 time or Unix seconds: {value!r}") from None


@router.get("/v1/results", response_model=ResultsPage, summary="Result history, newest first, with a stable cursor",
            responses=error_responses(401, 403, 422))
async def list_results(
    state: StateDep,
    line: Annotated[str | None, Query(max_length=64)] = None,
    product: Annotated[str | None, Query(max_length=64)] = None,
    label: Annotated[Label | None, Query()] = None,
    since: Annotated[str | None, Query(description="ISO-8601 time or Unix seconds; results at or after it.")] = None,
    cursor: Annotated[str | None, Query(max_length=20, description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
):
    after = None
    if cursor is not None:
        if not cursor.isdigit() or int(cursor) < 1:
            raise ApiError(422, "validation_error", f"query.cursor: invalid cursor {cursor!r}")
        after = int(cursor)
    rows, nxt = await to_thread.run_sync(lambda: state.results.page(line, product, label, _since(since), after, limit))
    return {"items": [record(r) for r in rows], "next_cursor": str(nxt) if nxt is not None else None, "limit": limit}


@router.get("/v1/results/{result_id}", response_model=ResultRecord, summary="One result",
            responses=error_responses(401, 403, 404))
async def get_result(state: StateDep, result_id: ResultId):
    row = await to_thread.run_sync(state.results.get, result_id)
    if row is None:
        raise ApiError(404, "not_found", f"result {result_id} not found")
    return record(row)


@router.get("/v1/results/{result_id}/heatmap.png",
            summary="The stored heatmap overlay of a result (while within the retention limit)",
            response_class=Response,
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                       **error_responses(401, 403, 404)})
async def get_result_heatmap(state: StateDep, result_id: ResultId):
    png = await to_thread.run_sync(state.results.heatmap, result_id)
    if png is None:
        raise ApiError(404, "not_found", f"no stored heatmap for result {result_id} (none was computed, or it "
                                         f"was dropped by the retention limit)")
    return Response(png, media_type="image/png")


@router.get("/v1/stats", response_model=Stats, summary="Count, anomaly rate and score percentiles over a time window",
            responses=error_responses(401, 403, 422))
async def stats(
    state: StateDep,
    line: Annotated[str | None, Query(max_length=64)] = None,
    product: Annotated[str | None, Query(max_length=64)] = None,
    window: Annotated[str, Query(max_length=16, description="'15m', '24h', '7d', seconds, or 'all'.")] = "24h",
):
    since = None
    if window != "all":
        try:
            since = time.time() - parse_window(window)
        except ValueError:
            raise ApiError(422, "validation_error",
                           f"query.window: use e.g. 15m, 24h, 7d or 'all', got {window!r}") from None
    out = await to_thread.run_sync(state.results.stats, line, product, since)
    return {"line": line, "product": product, "window": window, "since": iso(since) if since else None, **out}
