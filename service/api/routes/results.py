"""Result history: pages of stored results, one result, its heatmap, and windowed statistics."""
from __future__ import annotations

import time
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from ..deps import READ, AuthFirstRoute, StateDep
from ..errors import ApiError, error_responses
from ..results import iso, parse_since, parse_window, record
from ..schemas import NAME_PATTERN, Label, ResultRecord, ResultsPage, Stats

router = APIRouter(tags=["results"], dependencies=READ, route_class=AuthFirstRoute)
ResultId = Annotated[int, Path(ge=1, le=2**62, description="Result id.")]
# Every query value is bounded by its schema, so none reaches the database or date arithmetic unchecked:
# a cursor is 1-18 ASCII digits (within int64), a window one of the bounded forms below (at most ~32 years).
CURSOR_PATTERN = r"^[1-9][0-9]{0,17}$"
WINDOW_PATTERN = r"^(all|[1-9][0-9]{0,8}s?|[1-9][0-9]{0,6}m|[1-9][0-9]{0,4}h|[1-9][0-9]{0,3}d|[1-9][0-9]{0,2}w)$"
NameQuery = Annotated[str | None, Query(pattern=NAME_PATTERN)]


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        since = parse_since(value)
    except (ValueError, OverflowError):
        since = float("nan")
    if not 0.0 <= since < 1e11:  # also NaN and inf; 1e11 s is the year 5138
        raise ApiError(422, "validation_error", f"query.since: not an ISO-8601 time or Unix seconds after 1970: "
                                                f"{value!r}")
    return since


@router.get("/v1/results", response_model=ResultsPage, summary="Result history, newest first, with a stable cursor",
            responses=error_responses(401, 403, 422))
async def list_results(
    state: StateDep,
    line: NameQuery = None,
    product: NameQuery = None,
    label: Annotated[Label | None, Query()] = None,
    since: Annotated[str | None, Query(max_length=40, description="ISO-8601 time or Unix seconds; results at or "
                                                                  "after it.")] = None,
    cursor: Annotated[str | None, Query(pattern=CURSOR_PATTERN, description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
):
    after = int(cursor) if cursor is not None else None  # the pattern allows ASCII digits only, at most 18
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
    line: NameQuery = None,
    product: NameQuery = None,
    window: Annotated[str, Query(pattern=WINDOW_PATTERN, description="'15m', '24h', '7d', '2w', seconds ('3600' "
                                 "or '3600s'), or 'all'; at most 999999999 s, 9999999 m, 99999 h, 9999 d or 999 w.")] = "24h",
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
