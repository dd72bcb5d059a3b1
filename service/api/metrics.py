"""Prometheus metrics, prefix `zsad_`, base units (seconds, bytes), bounded label sets.

Each app owns its own `CollectorRegistry` (tests build several apps in one process). Label cardinality is bounded:
`endpoint` is the route template (or `unmatched`), `stage` a fixed set, `line` the first `max_lines` distinct line
names seen and `other` after that, `label` anomalous/normal.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import ASGIApp, Receive, Scope, Send

STAGES = ("decode", "preprocess", "embed", "windows", "aggregate", "encode", "persist")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
NO_LINE = "none"
OTHER_LINE = "other"


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
    def __init__(self, max_lines: int = 20, device_fn: Callable[[], Any] | None = None, replica: str = ""):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.replica = replica
        self.max_lines = max_lines
        self._lines: set[str] = set()
        self._lines_lock = threading.Lock()
        self.requests = Counter("zsad_requests", "HTTP requests by route template and status code.",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram("zsad_request_duration_seconds", "HTTP request latency.", ["endpoint"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("zsad_inference_stage_duration_seconds",
                                        "Time per pipeline stage (model stages are per batch).", ["stage"],
                                        buckets=STAGE_BUCKETS, registry=r)
        self.queue_wait = Histogram("zsad_queue_wait_seconds", "Time an image waited for the inference worker.",
                                    buckets=STAGE_BUCKETS, registry=r)
        self.batch_size = Histogram("zsad_batch_size", "Images per model forward (dynamic micro-batching).",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inflight = Gauge("zsad_inflight_requests", "HTTP requests being served.", registry=r)
        self.queue_depth = Gauge("zsad_queue_depth", "Images waiting in the inference queue.", registry=r)
        self.queue_rejections = Counter("zsad_queue_rejections", "Images refused because the queue was full.",
                                        registry=r)
        self.predictions = Counter("zsad_predictions", "Scored images by line and label.", ["line", "label"],
                                   registry=r)
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
        if device_fn is not None:
            r.register(_GpuCollector(device_fn))

    def line_label(self, line: str | None) -> str:
        """Bounded `line` label: the first `max_lines` distinct names, then `other`."""
        if not line:
            return NO_LINE
        line = line[:64]
        with self._lines_lock:
            if line in self._lines:
                return line
            if len(self._lines) < self.max_lines:
                self._lines.add(line)
                return line
        return OTHER_LINE

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

    def observe_prediction(self, line: str | None, label: str, score: float) -> None:
        ll = self.line_label(line)
        self.predictions.labels(line=ll, label=label).inc()
        self.image_score.labels(line=ll).observe(score)

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            if stage in STAGES and seconds is not None:
                self.stage_duration.labels(stage=stage).observe(seconds)


class MetricsMiddleware:
    """Pure ASGI middleware: request count, latency and in-flight gauge by route template."""

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
        m.inflight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, _send)
        finally:
            m.inflight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            m.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
            m.request_duration.labels(endpoint=endpoint).observe(time.perf_counter() - start)
