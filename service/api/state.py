"""The application state: settings, stores, metrics, the inference worker and the model lifecycle.

One `AppState` per app, hung on `app.state.zsad` and handed to routes through `deps.StateDep`. It owns loading,
warming up and swapping the detector; nothing in here knows about HTTP routes.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from .. import __version__
from ..constants import FLEET_STALE_POLLS, check_score_names
from ..db import migrate
from ..db.engine import database_url, is_sqlite, make_engine
from ..db.fleet import Candidate, Desired, FleetStore
from ..db.memories import DbMemoryStore
from ..db.thresholds import ThresholdFileError, import_file
from ..settings import Settings
from .auth import KeyChecker
from .errors import ApiError, public_text
from .limits import PixelBudget
from .metrics import Metrics
from .references import References
from .results import ResultsStore
from .thresholds import ThresholdStore
from .worker import InferenceWorker

log = logging.getLogger("zsad.api")

Loader = Callable[..., Any]  # (settings, name=None, version=None) -> Detector; raises ModelLoadError


def default_loader(settings: Settings, name: str | None = None, version: str | None = None) -> Any:
    from ..detector import load_detector

    # maps on demand: a detection in flight holds its patch grids, not three maps at the image's size
    return load_detector(settings, name, version).with_full_maps(False)


class AppState:
    """Everything a request needs, hung on `app.state.zsad`."""

    def __init__(self, settings: Settings, loader: Loader):
        self.settings = settings
        self.loader = loader
        self.detector: Any = None
        self.status = "loading"  # loading | ready | failed | stopping
        self.error: str | None = None
        self.replica_id = settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = Metrics.from_settings(settings, device_fn=self._device, replica=self.replica_id)
        self.auth = KeyChecker(settings.api_keys_read, settings.api_keys_admin)
        self.db_url = database_url(settings)
        self.engine = make_engine(self.db_url)  # one engine: results, thresholds and the fleet share its pool
        self.thresholds = ThresholdStore(self.engine)
        # few-shot memories per product / line, rows next to the thresholds (service/db/memories.py)
        self.references = References(DbMemoryStore(self.engine, settings.reference_max_bytes))
        self.results = ResultsStore(settings.results_url, settings.results_path, settings.keep_heatmaps,
                                    settings.heatmap_retention, engine=self.engine)
        self.results.on_commit = self.metrics.result_commits.inc
        self.fleet = FleetStore(self.engine)
        self.started_at = time.time()
        self.desired: Desired | None = None  # the fleet's desired model as last read
        self.applied_generation: int | None = None  # the desired generation this replica serves
        self.failed_generation: int | None = None  # the desired generation that failed here (not retried)
        self.fleet_error: str | None = None  # the last rollout failure on this replica, for GET /v1/fleet
        self._fleet_stop = threading.Event()
        self._fleet_thread: threading.Thread | None = None
        self._fleet_log_error: str | None = None
        self._prepared: tuple[str, str, Any, float] | None = None  # a rollout candidate loaded ahead: name, version, ...
        self._prefetch: threading.Thread | None = None
        self._follow_lock = threading.Lock()
        self._heartbeat_lock = threading.Lock()  # a row is read and written as one step (heartbeat)
        self.worker = InferenceWorker(lambda: self.detector, settings.max_batch_size, settings.max_batch_wait_ms,
                                      settings.batching, settings.queue_size, self.metrics)
        self.pixel_budget = PixelBudget(settings.max_pixels_in_flight)  # decoded pixels in flight (limits.py)
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

    # --- the database -------------------------------------------------------------------------------------------------
    @property
    def fleet_enabled(self) -> bool:
        return self.settings.fleet_poll_s > 0

    def open_database(self) -> bool:
        """Start-up: migrate (ZSAD_DB_UPGRADE; default on SQLite) or check the schema, then import the previous
        release's thresholds file once. A schema that is behind or an unreadable thresholds file leaves the service
        not ready (it would otherwise fail or label with the wrong thresholds); returns False then."""
        upgrade = self.settings.db_upgrade if self.settings.db_upgrade is not None else is_sqlite(self.db_url)
        try:
            migrate.ensure(self.engine, upgrade)
            import_file(self.settings.thresholds_path, self.thresholds)
        except (migrate.SchemaError, ThresholdFileError) as exc:
            self.status, self.error = "failed", str(exc)
            log.error("DATABASE NOT READY, service is not ready: %s", exc)
            return False
        return True

    # --- model lifecycle, continued ------------------------------------------------------------------------------------
    def _read_desired(self) -> Desired | None:
        if not self.fleet_enabled:
            return None
        try:
            self.desired = self.fleet.desired()
        except Exception as exc:  # noqa: BLE001 - the database may be down; the configured model still loads
            log.warning("cannot read the fleet's desired model (%s); loading the configured model", exc)
            return None
        self.metrics.set_desired(self.desired, self.model_ref())
        return self.desired

    def initial_load(self) -> None:
        """Load the fleet's desired model when one is set (else the configured one: ZSAD_MODEL_NAME / _VERSION, else
        the name's `current` pointer). When the desired one fails here, the configured one is loaded instead and
        GET /v1/fleet says why; when that fails too, the service is not ready."""
        from ..detector import ModelLoadError

        name = self.settings.model_name
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        desired = self._read_desired()
        try:
            loaded = None
            if desired is not None:
                try:
                    loaded = self._load(desired.name, desired.version)
                    self.applied_generation = desired.generation
                except Exception as exc:  # noqa: BLE001 - reported, then the configured model is tried
                    self.failed_generation = desired.generation
                    self.fleet_error = (f"the fleet's desired model {desired.name}@{desired.version} did not load at "
                                        f"start: {exc}; serving the configured model instead")
                    log.error("%s", self.fleet_error)
            if loaded is None:
                loaded = self._load(None, None)
        except ModelLoadError as exc:
            self.status, self.error = "failed", str(exc)
            log.error("MODEL NOT LOADED, service is not ready: %s. Fix the model store (%s) and POST "
                      "/v1/models/reload, or restart.", exc, self.settings.model_store)
        except Exception as exc:
            self.status, self.error = "failed", f"cannot load model {name!r}: {type(exc).__name__}: {exc}"
            log.exception("MODEL NOT LOADED, service is not ready: %s", self.error)
        else:
            if self.status == "loading":
                self._install(*loaded)
                self.metrics.set_desired(self.desired, self.model_ref())
                if self.fleet_enabled:
                    self.heartbeat()  # the fleet sees the model now, not a poll later
        finally:
            self.loaded.set()

    def reload(self, name: str | None, version: str | None, caller: str | None = None) -> dict[str, Any]:
        """Load and warm up the new model completely, then swap; any failure keeps the old one serving.

        With the fleet on (ZSAD_FLEET_POLL_S > 0) a successful reload then becomes the fleet's desired model, which
        the other replicas load within their poll interval: this replica is the canary, so a version that does not
        load here never reaches the others."""
        if not self._reload_lock.acquire(blocking=False):
            raise ApiError(409, "reload_in_progress", "a model reload is already in progress")
        try:
            staged = self._stage(name, version)
            try:
                result = self._reload_locked(name, version)
            except ApiError:
                if self.fleet_enabled:
                    if staged:
                        self._fleet_call(self.fleet.unstage, *staged)
                    self.heartbeat()  # GET /v1/fleet shows why at once
                raise
            result["desired"] = None
            if self.fleet_enabled:
                ref = result["current"]
                try:
                    desired = self.fleet.set_desired(ref["name"], ref["version"], caller)
                except Exception as exc:  # noqa: BLE001 - the swap here stands; say the fleet was not told
                    log.error("reloaded %s@%s here, but could not set it as the fleet's desired model: %s",
                              ref["name"], ref["version"], exc)
                else:
                    self.desired, self.applied_generation, self.fleet_error = desired, desired.generation, None
                    result["desired"] = desired.ref()
                    self.metrics.set_desired(desired, ref)
                self.heartbeat()
            return result
        finally:
            self._reload_lock.release()

    def _stage(self, name: str | None, version: str | None) -> tuple[str, str] | None:
        """Announce the reload's target as the fleet's candidate, so the other replicas load it while this one
        verifies it. Only a target that names a version (or a store `current` pointer to read) can be announced."""
        if not self.fleet_enabled:
            return None
        name = name or self.settings.model_name
        version = version or self.settings.model_version
        if version is None:
            from ..store import ModelStore, StoreError

            try:
                version = ModelStore(self.settings.model_store).current(name)
            except (StoreError, OSError, ValueError):
                version = None
        if version is None:
            return None
        return (name, version) if self._fleet_call(self.fleet.stage, name, version) else None

    def _fleet_call(self, fn: Callable[..., Any], *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except Exception as exc:  # noqa: BLE001 - the fleet's bookkeeping must never break a reload
            self._log_fleet_problem(f"{getattr(fn, '__name__', 'fleet write')} failed: {exc}")
            return False

    def _reload_locked(self, name: str | None, version: str | None,
                       prepared: tuple[Any, float] | None = None) -> dict[str, Any]:
        from ..detector import ModelLoadError

        previous = self.model_ref()
        keeps = (f"; still serving {previous['name']}@{previous['version']}" if previous
                 else "; no model is serving")
        target = f"{name or self.settings.model_name}" + (f"@{version}" if version else "")
        try:
            detector, seconds = prepared if prepared is not None else self._load(name, version)
        except ModelLoadError as exc:
            self.metrics.reloads.labels(outcome="failed").inc()
            log.error("model reload failed: %s%s", exc, keeps)
            text = public_text(str(exc))  # callers see the model's name, never a path (the log keeps it)
            self.fleet_error = f"loading {target} failed: {text}{keeps}"
            if "not found" in text or "no current version" in text:
                raise ApiError(404, "model_not_found", text + keeps) from None
            raise ApiError(422, "model_invalid", text + keeps) from None
        except ApiError:
            raise
        except Exception as exc:
            self.metrics.reloads.labels(outcome="failed").inc()
            log.exception("model reload failed%s", keeps)
            self.fleet_error = public_text(f"loading {target} failed: {type(exc).__name__}: {exc}{keeps}")
            raise ApiError(500, "model_load_failed",
                           public_text(f"loading the model failed: {type(exc).__name__}: {exc}{keeps}")) from None
        old = self.detector
        self._install(detector, seconds)
        self.metrics.reloads.labels(outcome="ok").inc()
        del old
        _release_gpu_cache(detector)
        return {"previous": previous, "current": self.model_ref(detector), "load_seconds": round(seconds, 3)}

    # --- the fleet ------------------------------------------------------------------------------------------------------
    def stale_after_s(self) -> float:
        return max(10.0, FLEET_STALE_POLLS * self.settings.fleet_poll_s)

    def heartbeat(self, status: str | None = None) -> None:
        """Write this replica's row (best effort: a database hiccup must not take the replica down).

        The loader thread and the fleet poll both write it: under one lock, so that a snapshot taken before a model
        swap ("loading") cannot land after the newer one ("ready") and show the replica not ready for a poll."""
        with self._heartbeat_lock:
            ref = self.model_ref()
            error = self.fleet_error or (self.error if self.status == "failed" else None)
            try:
                self.fleet.heartbeat(self.replica_id, host=socket.gethostname(), pid=os.getpid(),
                                     started_at=self.started_at, status=status or self.status,
                                     model_name=ref["name"] if ref else None,
                                     model_version=ref["version"] if ref else None,
                                     applied_generation=self.applied_generation, error=error and error[:2000],
                                     package_version=__version__)
            except Exception as exc:  # noqa: BLE001
                self._log_fleet_problem(f"heartbeat failed: {exc}")

    def _log_fleet_problem(self, text: str) -> None:
        if text != self._fleet_log_error:  # once per distinct problem, not every poll
            log.warning("fleet: %s", text)
            self._fleet_log_error = text

    def follow_fleet(self) -> None:
        """One poll: read the fleet's row; load a rollout's candidate ahead; swap to a new desired model (the one
        loaded ahead, or load it now); write the heartbeat."""
        with self._follow_lock:
            try:
                desired, candidate = self.fleet.read()
            except Exception as exc:  # noqa: BLE001
                self._log_fleet_problem(f"cannot read the desired model: {exc}")
                desired, candidate = self.desired, None
            else:
                self.desired = desired
                self._fleet_log_error = None
            if self.loaded.is_set() and self.status in ("ready", "failed"):
                self._follow_candidate(desired, candidate)
                if desired is not None:
                    self._follow_desired(desired)
            self.metrics.set_desired(desired, self.model_ref())
            self.heartbeat()

    def _serves(self, name: str, version: str) -> bool:
        ref = self.model_ref()
        return ref is not None and (ref["name"], ref["version"]) == (name, version)

    def _follow_candidate(self, desired: Desired | None, candidate: Candidate | None) -> None:
        prepared = self._prepared
        if prepared is not None and (candidate is None or (candidate.name, candidate.version) != prepared[:2]) and (
                desired is None or (desired.name, desired.version) != prepared[:2]):
            self._prepared = None  # the rollout was withdrawn or replaced: free the model loaded ahead
            log.info("fleet: dropping %s@%s loaded ahead (its rollout was withdrawn)", prepared[0], prepared[1])
        if candidate is None or self._serves(candidate.name, candidate.version) or (
                self._prepared is not None and self._prepared[:2] == (candidate.name, candidate.version)) or (
                self._prefetch is not None and self._prefetch.is_alive()):
            return

        def prefetch() -> None:
            if not self._reload_lock.acquire(blocking=False):
                return
            try:
                log.info("fleet: a rollout of %s@%s is being verified: loading it ahead", candidate.name,
                         candidate.version)
                detector, seconds = self._load(candidate.name, candidate.version)
                self._prepared = (candidate.name, candidate.version, detector, seconds)
            except Exception as exc:  # noqa: BLE001 - when it becomes desired, the normal path loads and reports
                log.info("fleet: loading %s@%s ahead failed: %s", candidate.name, candidate.version, exc)
                return
            finally:
                self._reload_lock.release()
            self.follow_fleet()  # it may be desired already: swap now, not a poll later

        self._prefetch = threading.Thread(target=prefetch, name="zsad-fleet-prefetch", daemon=True)
        self._prefetch.start()

    def _follow_desired(self, desired: Desired) -> None:
        if self._serves(desired.name, desired.version):
            if self.applied_generation != desired.generation:
                self.applied_generation, self.fleet_error = desired.generation, None
            return
        if desired.generation in (self.applied_generation, self.failed_generation):
            return
        if not self._reload_lock.acquire(blocking=False):  # an API reload or a load ahead runs: next poll
            return
        try:
            prepared = self._prepared
            ready = prepared[2:] if prepared is not None and prepared[:2] == (desired.name, desired.version) else None
            log.info("fleet: the desired model is now %s@%s (generation %d, set by %s): %s", desired.name,
                     desired.version, desired.generation, desired.set_by or "?",
                     "swapping in the copy loaded ahead" if ready else "loading it")
            self._reload_locked(desired.name, desired.version, ready)
            self.applied_generation, self.fleet_error = desired.generation, None
        except ApiError:
            self.failed_generation = desired.generation  # fleet_error says why; not retried
        finally:
            self._prepared = None
            self._reload_lock.release()

    def start_fleet(self) -> None:
        if not self.fleet_enabled or self._fleet_thread is not None:
            return
        self.heartbeat()

        def loop() -> None:
            while not self._fleet_stop.wait(self.settings.fleet_poll_s):
                try:
                    self.follow_fleet()
                except Exception:
                    log.exception("fleet poll failed")

        self._fleet_thread = threading.Thread(target=loop, name="zsad-fleet", daemon=True)
        self._fleet_thread.start()

    def stop_fleet(self) -> None:
        if self._fleet_thread is None:
            return
        self._fleet_stop.set()
        self._fleet_thread.join(timeout=30)
        self._fleet_thread = None
        self.heartbeat("stopped")


def _release_gpu_cache(detector: Any) -> None:
    try:
        if getattr(detector.backend.device, "type", None) == "cuda":
            import torch

            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
