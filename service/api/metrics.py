"""Prometheus metrics, prefix `zsad_`, base units (seconds, bytes), bounded label sets.

Each app owns its own `CollectorRegistry` (tests build several apps in one process), with the process and platform
collectors (`process_*`, `python_info`) registered on it. `_created` series are off (`disable_created_metrics`, a
process-wide switch of prometheus_client read at scrape time, so it holds for our own registries too).

Label cardinality is bounded: `endpoint` is the route template (or `unmatched`), `method` the HTTP method, `stage` a
fixed set, `label` anomalous/normal/review, `calibrated` true/false, and `line` and `product` are `BoundedLabel`s: a
configured allow-list (the same on every replica), else the first `max` distinct values seen, then `other`.

Scrapes and probes (`PROBE_PATHS`) are counted in `zsad_requests_total` under their own `endpoint`, but not in the
in-flight gauge: a scrape would otherwise always see itself in flight.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import ASGIApp, Receive, Scope, Send

    from ...settings import Settings

STAGES = ("decode", "preprocess", "embed", "windows", "aggregate", "encode", "persist")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
NO_LINE = "none"
OTHER_LINE = "other"
# Paths of scrapes and probes: not in the in-flight gauge (their requests are still counted, by `endpoint`).
PROBE_PATHS = frozenset({"/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


class BoundedLabel:
    """Label values for a free-form name (line, product): `none` when missing, the name when it is in the allow-list
    (or, without one, among the first `max_values` distinct names seen by this process), else `other`.

    First-seen sets depend on the traffic each replica happened to see; an allow-list makes them the same everywhere.
    """

    def __init__(self, max_values: int, allow: Iterable[str] = ()):
        self.allow = frozenset(v[:64] for v in allow)
        self.max_values = max_values
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        if not value:
            return NO_LINE
        value = value[:64]
        if self.allow:
            return value if value in self.allow else OTHER_LINE
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.max_values:
                self._seen.add(value)
                return value
        return OTHER_LINE


class _GpuCollector(Collector):
    """GPU memory of the serving device, read at scrape time; nothing is exported on CPU."""

    def __init__(self, device_fn: Callable[[], Any]):
        self._device_fn = device_fn

    def collect(self) -> Iterable[GaugeMetricFamily]:
        device = self._device_fn()
        if device is None or getattr(device, "type", None) != "cuda":
            return []
        import torch

        allocated = GaugeMetricFamily("zsad_gpu_memory_allocated_bytes", "GPU memory held by tensors.", labels=["device"])
        reserved = GaugeMetricFamily("zsad_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator.",
                                     labels=["device"])
        peak = GaugeMetricFamily("zsad_gpu_memory_peak_allocated_bytes", "Peak GPU memory held by tensors.",
                                 labels=["device"])
        name = str(device)
        allocated.add_metric([name], float(torch.cuda.memory_allocated(device)))
        reserved.add_metric([name], float(torch.cuda.memory_reserved(device)))
        peak.add_metric([name], float(torch.cuda.max_memory_allocated(device)))
        return [allocated, reserved, peak]

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


class Metrics:
    def __init__(self, max_lines: int = 20, device_fn: Callable[[], Any] | None = None, *, max_products: int = 20,
                 lines: Iterable[str] = (), products: Iterable[str] = (), slo_detect_p95_s: float = 1.0,
                 replica: str = ""):
        disable_created_metrics()
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.replica = replica  # the fleet id (GET /v1/fleet), a label of zsad_model_info
        self.max_lines = max_lines
        self.line_label = BoundedLabel(max_lines, lines)
        self.product_label = BoundedLabel(max_products, products)
        self.requests = Counter("zsad_requests", "HTTP requests by route template, method and status code.",
                                ["endpoint", "method", "status"], registry=r)
        self.request_duration = Histogram("zsad_request_duration_seconds", "HTTP request latency.", ["endpoint", "method"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("zsad_inference_stage_duration_seconds",
                                        "Time per pipeline stage (model stages are per batch).", ["stage"],
                                        buckets=STAGE_BUCKETS, registry=r)
        self.queue_wait = Histogram("zsad_queue_wait_seconds", "Time an image waited for the inference worker.",
                                    buckets=STAGE_BUCKETS, registry=r)
        self.batch_size = Histogram("zsad_batch_size", "Images per model forward (dynamic micro-batching).",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inflight = Gauge("zsad_inflight_requests", "HTTP requests being served (scrapes and probes not counted).",
                              registry=r)
        self.queue_depth = Gauge("zsad_queue_depth", "Images waiting in the inference queue.", registry=r)
        self.queue_rejections = Counter("zsad_queue_rejections", "Images refused because the queue was full.",
                                        registry=r)
        self.predictions = Counter("zsad_predictions", "Scored images by line, product, label and whether the threshold "
                                   "was calibrated.", ["line", "product", "label", "calibrated"], registry=r)
        self.image_score = Histogram("zsad_image_score", "Image anomaly scores (the score used for the label).",
                                     ["line"], buckets=SCORE_BUCKETS, registry=r)
        self.model_info = Gauge("zsad_model_info", "The model serving now (value 1), and the replica's fleet id.",
                                ["model", "version", "clip", "replica"], registry=r)
        self.model_desired_info = Gauge("zsad_model_desired_info", "The fleet's desired model as this replica last "
                                        "read it (value 1; absent when none is set).", ["model", "version"], registry=r)
        self.model_in_sync = Gauge("zsad_model_in_sync", "1 when this replica serves the fleet's desired model (or none "
                                   "is set), 0 while it does not (loading it, or it failed here).", registry=r)
        self.model_ready = Gauge("zsad_model_ready", "1 when a model is loaded and warmed up.", registry=r)
        self.model_load_seconds = Gauge("zsad_model_load_duration_seconds", "Time the last successful load took.",
                                        registry=r)
        self.reloads = Counter("zsad_model_reloads", "Model reload attempts by outcome.", ["outcome"], registry=r)
        self.result_commits = Counter("zsad_result_commits", "Transactions that stored results (the requests of a "
                                      "micro-batch share one: group commit).", registry=r)
        self.client_disconnects = Counter("zsad_client_disconnects", "Requests whose client went away before the "
                                          "request was read (not server errors).", registry=r)
        self.slo_detect_p95 = Gauge("zsad_slo_detect_p95_seconds", "Objective for the p95 latency of POST /v1/detect "
                                    "(ZSAD_SLO_DETECT_P95_S).", registry=r)
        self.slo_detect_p95.set(slo_detect_p95_s)
        if device_fn is not None:
            r.register(_GpuCollector(device_fn))

    @classmethod
    def from_settings(cls, settings: Settings, device_fn: Callable[[], Any] | None = None, replica: str = "") -> Metrics:
        return cls(settings.metrics_max_lines, device_fn, max_products=settings.metrics_max_products,
                   lines=settings.metrics_lines, products=settings.metrics_products,
                   slo_detect_p95_s=settings.slo_detect_p95_s, replica=replica)

    def set_model(self, name: str, version: str, clip: str) -> None:
        self.model_info.clear()
        self.model_info.labels(model=name, version=version, clip=clip, replica=self.replica).set(1)

    def set_desired(self, desired: Any, serving: dict[str, str] | None) -> None:
        """`desired`: a `service.db.fleet.Desired` or None; `serving`: the model reference being served."""
        self.model_desired_info.clear()
        if desired is None:
            self.model_in_sync.set(1)
            return
        self.model_desired_info.labels(model=desired.name, version=desired.version).set(1)
        same = serving is not None and (serving["name"], serving["version"]) == (desired.name, desired.version)
        self.model_in_sync.set(1 if same else 0)

    def observe_prediction(self, line: str | None, product: str | None, label: str, score: float,
                           calibrated: bool = False) -> None:
        ll = self.line_label(line)
        self.predictions.labels(line=ll, product=self.product_label(product), label=label,
                                calibrated="true" if calibrated else "false").inc()
        self.image_score.labels(line=ll).observe(score)

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            if stage in STAGES and seconds is not None:
                self.stage_duration.labels(stage=stage).observe(seconds)


class MetricsMiddleware:
    """Pure ASGI middleware: request count and latency by route template and method; the in-flight gauge (without
    scrapes and probes)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def _send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        m = self.metrics
        counted = scope.get("path") not in PROBE_PATHS
        if counted:
            m.inflight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, _send)
        finally:
            if counted:
                m.inflight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            method = _method(scope.get("method"))
            m.requests.labels(endpoint=endpoint, method=method, status=str(status["code"])).inc()
            m.request_duration.labels(endpoint=endpoint, method=method).observe(time.perf_counter() - start)


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def _method(method: str | None) -> str:
    """The request method is the client's free text: bounded to the standard ones, else `other`."""
    return method if method in KNOWN_METHODS else "other"
