"""`create_app()`: the FastAPI application factory (`uvicorn --factory service.api.app:create_app`).

Start-up (lifespan): open the database (migrate or check its schema, import a previous release's thresholds file
once), start the inference worker and the fleet thread (heartbeats, the desired model), then load the
detector in a background thread (the configured name/version, else the `current` pointer; GPU when present) and
warm it up with one dummy inference. Only then is the service ready: `/readyz` answers 503 while loading and when
loading failed (missing or corrupt weights give one clear log line and a non-ready state, never a random model),
while `/healthz` answers as long as the process and its worker are alive.

Shutdown: uvicorn stops accepting connections and lets in-flight requests finish (`timeout_graceful_shutdown`), then
the lifespan exit stops the worker, which first drains its queue.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Response
from starlette.requests import ClientDisconnect

from .. import __version__
from ..detector import clip_weights_bytes
from ..heap import mmap_threshold_for, pin_mmap_threshold
from ..settings import Settings
from . import apidocs, dashboard
from .errors import error_response, install_error_handlers
from .limits import BodyLimitMiddleware, BodyTimeout, BodyTooLarge, UploadGuardMiddleware
from .metrics import MetricsMiddleware
from .routes import ROUTERS
from .state import AppState, Loader, default_loader

log = logging.getLogger("zsad.api")


def _setup_logging() -> None:
    root = logging.getLogger("zsad")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def _pin_heap(settings: Settings) -> None:
    """Pin glibc's mmap threshold per ZSAD_MMAP_THRESHOLD (auto: for a large CLIP), so that a large CLIP's large
    blocks stay returnable to the OS (service/heap.py). Decided once, at start-up, for the configured model."""
    setting = settings.mmap_threshold
    threshold = mmap_threshold_for(setting, clip_weights_bytes(settings) if setting == "auto" else 0)
    if threshold:
        pinned = pin_mmap_threshold(threshold)
        log.info("heap: mmap threshold %s at %d bytes (ZSAD_MMAP_THRESHOLD=%s)", "pinned" if pinned else "not taken",
                 threshold, setting)


@asynccontextmanager
async def lifespan(app: FastAPI):
    state: AppState = app.state.zsad
    await asyncio.to_thread(_pin_heap, state.settings)  # before the model loads
    if not state.auth.enabled:
        log.warning("no API keys configured (ZSAD_API_KEYS_READ / ZSAD_API_KEYS_ADMIN): the API is OPEN to anyone "
                    "who can reach this server")
    state.decode_limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
    database_ok = await asyncio.to_thread(state.open_database)
    log.info("database (results, thresholds, fleet): %s", state.results.describe())
    state.worker.start()
    if state.status == "loading":
        threading.Thread(target=state.initial_load, name="zsad-model-load", daemon=True).start()
    else:
        state.loaded.set()
    if database_ok:
        await asyncio.to_thread(state.start_fleet)
    try:
        yield
    finally:
        state.status = "stopping"
        state.metrics.model_ready.set(0)
        await asyncio.to_thread(state.worker.stop, 30.0)
        await asyncio.to_thread(state.stop_fleet)
        await asyncio.to_thread(state.results.close)
        log.info("stopped")


def create_app(settings: Settings | None = None, *, loader: Loader | None = None) -> FastAPI:
    """Build the app. `settings` default: `Settings()` from `ZSAD_*`; `loader` (tests): replaces `load_detector`."""
    _setup_logging()
    settings = settings or Settings()
    state = AppState(settings, loader or default_loader)
    app = FastAPI(
        title="zsad — zero-shot visual anomaly detection",
        version=__version__,
        description="Score images for anomalies with a random-word CLIP + FNN model; per-product thresholds, "
                    "result history, heatmaps. See docs/service.md.",
        lifespan=lifespan,
        docs_url=None,  # served by apidocs from the package: no CDN
        redoc_url=None,
    )
    app.state.zsad = state
    install_error_handlers(app)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, exc: BodyTooLarge):
        return error_response(413, "payload_too_large", str(exc), {"Connection": "close"}, request.url.path)

    @app.exception_handler(BodyTimeout)
    async def _body_timeout(request, exc: BodyTimeout):
        return error_response(408, "request_timeout", str(exc), {"Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request, exc: ClientDisconnect):
        # The client went away before its request was read: not a server error (no traceback, not a 5xx), one
        # INFO line and a counter. 499 (nginx's "client closed request") is what the metrics record; nobody reads it.
        state.metrics.client_disconnects.inc()
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=499)

    for router in (*ROUTERS, dashboard.router, apidocs.router):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes,
                       overrides={"/v1/calibrate/": settings.calibration_max_bytes})
    app.add_middleware(UploadGuardMiddleware, timeout_s=settings.body_timeout_s,
                       max_uploads=settings.max_concurrent_uploads)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app
