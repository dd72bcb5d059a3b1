"""Health and metrics: the endpoints that probes and Prometheus call (no API key)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import AuthFirstRoute, StateDep
from ..errors import ApiError, error_body, error_responses, oip_error_body, public_text
from ..schemas import Health, Readiness
from ..state import AppState

router = APIRouter(route_class=AuthFirstRoute)


def _readiness(state: AppState) -> Readiness:
    return Readiness(ready=state.status == "ready" and state.detector is not None, status=state.status,
                     model=state.model_ref())


@router.get("/healthz", response_model=Health, tags=["health"], summary="Liveness: process and worker alive",
            responses=error_responses(503))
async def healthz(state: StateDep):
    if not state.worker.alive and state.status != "stopping":
        raise ApiError(503, "worker_dead", "the inference worker thread is not running")
    return Health()


@router.get("/readyz", response_model=Readiness, tags=["health"],
            summary="Readiness: a model is loaded and warmed up (503 otherwise)", responses=error_responses(503))
async def readyz(state: StateDep):
    r = _readiness(state)
    if not r.ready:  # the one error shape, plus the readiness fields; no key needed here, so no paths in it
        reason = public_text(state.error) if state.error else None
        body = error_body("not_ready", f"not ready: {r.status}" + (f" ({reason})" if reason else ""))
        return JSONResponse({**r.model_dump(exclude={"error"}), **body}, status_code=503)
    return r


@router.get("/v2/health/live", tags=["health"], summary="KServe v2 liveness",
            responses={200: {"content": {"application/json": {"example": {"live": True}}}}})
async def v2_live(state: StateDep):
    return {"live": state.worker.alive}


@router.get("/v2/health/ready", tags=["health"], summary="KServe v2 readiness (503 when not ready)",
            responses={200: {"content": {"application/json": {"example": {"ready": True}}}},
                       **error_responses(503, oip=True)})
async def v2_ready(state: StateDep):
    r = _readiness(state)
    if not r.ready:
        return JSONResponse({**oip_error_body("not_ready", f"not ready: {r.status}"), "ready": False}, status_code=503)
    return {"ready": True}


@router.get("/metrics", tags=["metrics"], summary="Prometheus metrics (text exposition format)",
            response_class=Response,
            responses={200: {"content": {"text/plain": {"example": "zsad_requests_total{endpoint=\"/v1/detect\","
                                                                   "method=\"POST\",status=\"200\"} 42.0\n"
                                                                   "zsad_model_ready 1.0\n"}}}})
async def metrics(state: StateDep):
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
