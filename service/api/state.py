"""The application state: settings, stores, metrics, the inference worker and the model lifecycle.

One `AppState` per app, hung on `app.state.zsad` and handed to routes through `deps.StateDep`. It owns loading,
warming up and swapping the detector; nothing in here knows about HTTP routes.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from ..constants import check_score_names
from ..memory_store import store_from_settings
from ..settings import Settings
from .auth import KeyChecker
from .errors import ApiError
from .metrics import Metrics
from .references import References
from .results import ResultsStore
from .thresholds import ThresholdStore
from .worker import InferenceWorker

log = logging.getLogger("zsad.api")

Loader = Callable[..., Any]  # (settings, name=None, version=None) -> Detector; raises ModelLoadError


def default_loader(settings: Settings, name: str | None = None, version: str | None = None) -> Any:
    from ..detector import load_detector

    return load_detector(settings, name, version)


class AppState:
    """Everything a request needs, hung on `app.state.zsad`."""

    def __init__(self, settings: Settings, loader: Loader):
        self.settings = settings
        self.loader = loader
        self.detector: Any = None
        self.status = "loading"  # loading | ready | failed | stopping
        self.error: str | None = None
        self.metrics = Metrics.from_settings(settings, device_fn=self._device)
        self.auth = KeyChecker(settings.api_keys_read, settings.api_keys_admin)
        self.thresholds = ThresholdStore(settings.thresholds_path)
        self.references = References(store_from_settings(settings))  # few-shot memories per product / line
        self.results = ResultsStore(settings.results_url, settings.results_path, settings.keep_heatmaps,
                                    settings.heatmap_retention)
        self.worker = InferenceWorker(lambda: self.detector, settings.max_batch_size, settings.max_batch_wait_ms,
                                      settings.batching, settings.queue_size, self.metrics)
        self._reload_lock = threading.Lock()
        self.decode_limiter: Any = None  # anyio.CapacityLimiter, made in the lifespan (needs the event loop)
        self.loaded = threading.Event()  # set once the first load attempt finished (either way)

    def _device(self) -> Any:
        det = self.detector
        return getattr(getattr(det, "backend", None), "device", None)

    # --- model lifecycle -----------------------------------------------------------------------------------------------
    def model_ref(self, detector: Any = None) -> dict[str, str] | None:
        det = detector if detector is not None else self.detector
        if det is None:
            return None
        return {"name": det.name, "version": det.version, "clip": det.backend.spec.label()}

    def require_ready(self) -> Any:
        det = self.detector
        if det is None or self.status not in ("ready",):
            detail = f" ({self.error})" if self.error else ""
            raise ApiError(503, "model_not_ready", f"no model is ready to serve: {self.status}{detail}",
                           {"Retry-After": "5"})
        return det

    @staticmethod
    def warm_up(detector: Any) -> None:
        """One dummy inference with a heatmap; its scores must be the registry's (a new score variant that is not
        registered in constants.SCORES is refused here, at start-up, not dropped from every response)."""
        from ..detector import ModelLoadError

        size = int(getattr(detector.backend, "image_size", 224))
        det = detector.detect([Image.new("RGB", (size, size), (128, 128, 128))], None, heatmap=True, timings={})[0]
        try:
            check_score_names(det.scores)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None

    def _load(self, name: str | None, version: str | None) -> tuple[Any, float]:
        t = time.perf_counter()
        detector = self.loader(self.settings, name, version)
        self.warm_up(detector)
        return detector, time.perf_counter() - t

    def _install(self, detector: Any, seconds: float) -> None:
        self.detector = detector  # one reference assignment: the worker picks it up at its next batch
        self.status, self.error = "ready", None
        ref = self.model_ref(detector)
        self.metrics.set_model(ref["name"], ref["version"], ref["clip"])
        self.metrics.model_ready.set(1)
        self.metrics.model_load_seconds.set(seconds)
        log.info("serving model %s@%s (CLIP %s) on %s, %d test-time view(s), loaded and warmed up in %.1f s",
                 ref["name"], ref["version"], ref["clip"], detector.backend.device, detector.tta_views, seconds)
        drift = detector.calibration_drift() if hasattr(detector, "calibration_drift") else {}
        if drift:
            log.warning("the model's score calibration was fitted with other settings than these: %s; its threshold "
                        "advice does not hold (re-fit it with zsad train --calibration-images, or calibrate products)",
                        ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in drift.items()))

    def initial_load(self) -> None:
        from ..detector import ModelLoadError

        name = self.settings.model_name
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        try:
            detector, seconds = self._load(None, None)
        except ModelLoadError as exc:
            self.status, self.error = "failed", str(exc)
            log.error("MODEL NOT LOADED, service is not ready: %s. Fix the model store (%s) and POST "
                      "/v1/models/reload, or restart.", exc, self.settings.model_store)
        except Exception as exc:
            self.status, self.error = "failed", f"cannot load model {name!r}: {type(exc).__name__}: {exc}"
            log.exception("MODEL NOT LOADED, service is not ready: %s", self.error)
        else:
            if self.status == "loading":
                self._install(detector, seconds)
        finally:
            self.loaded.set()

    def reload(self, name: str | None, version: str | None) -> dict[str, Any]:
        """Load and warm up the new model completely, then swap; any failure keeps the old one serving."""
        from ..detector import ModelLoadError

        if not self._reload_lock.acquire(blocking=False):
            raise ApiError(409, "reload_in_progress", "a model reload is already in progress")
        try:
            previous = self.model_ref()
            keeps = (f"; still serving {previous['name']}@{previous['version']}" if previous
                     else "; no model is serving")
            try:
                detector, seconds = self._load(name, version)
            except ModelLoadError as exc:
                self.metrics.reloads.labels(outcome="failed").inc()
                log.error("model reload failed: %s%s", exc, keeps)
                text = str(exc)
                if "not found" in text or "no current version" in text:
                    raise ApiError(404, "model_not_found", text + keeps) from None
                raise ApiError(422, "model_invalid", text + keeps) from None
            except ApiError:
                raise
            except Exception as exc:
                self.metrics.reloads.labels(outcome="failed").inc()
                log.exception("model reload failed%s", keeps)
                raise ApiError(500, "model_load_failed",
                               f"loading the model failed: {type(exc).__name__}: {exc}{keeps}") from None
            old = self.detector
            self._install(detector, seconds)
            self.metrics.reloads.labels(outcome="ok").inc()
            del old
            _release_gpu_cache(detector)
            return {"previous": previous, "current": self.model_ref(detector), "load_seconds": round(seconds, 3)}
        finally:
            self._reload_lock.release()


def _release_gpu_cache(detector: Any) -> None:
    try:
        if getattr(detector.backend.device, "type", None) == "cuda":
            import torch

            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
