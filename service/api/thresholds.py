"""Per-product (and per-line) decision thresholds, kept in a JSON file that is replaced atomically.

File shape (`settings.thresholds_path`):

    {"version": 1,
     "products": {"widget": {"threshold": 0.61, "score": "combined", "source": "calibration", "updated_at": "...",
                             "calibration": {...},
                             "lines": {"line-3": {"threshold": 0.7, "score": "combined", "source": "manual", ...}}}}}

Each entry's threshold belongs to one score (`fnn`, `prompt` or `combined`): the scores live on different scales,
so a threshold set for one is never applied to another. Resolution for (product, line, score):
line entry -> product entry -> `settings.default_threshold` -> the model manifest's `threshold_advice` -> 0.5,
and the response says which source it used. When a request names no score, the entry's score is used, so a product
calibrated on `fnn` is judged on `fnn` unless a request asks otherwise.

Writes go to a temporary file in the same folder, are fsynced, then `os.replace`d over the old file: a crash leaves
either the old or the new file, never half of one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..store import utc_now

log = logging.getLogger("zsad.api")
FALLBACK_THRESHOLD = 0.5
SCORES = ("fnn", "prompt", "combined")


class ThresholdFileError(Exception):
    """The thresholds file exists but cannot be read."""


@dataclass(frozen=True)
class Resolved:
    threshold: float
    source: str  # line | product | settings | manifest | fallback
    score: str


class ThresholdStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {"version": 1, "products": {}}
        self._mtime: float | None = None

    # --- file ---------------------------------------------------------------------------------------------------
    def load(self) -> None:
        """(Re)read the file; a missing file is an empty config, an unreadable one raises ThresholdFileError."""
        with self._lock:
            self._load_locked()

    def _load_locked(self) -> None:
        if not self.path.is_file():
            self._data, self._mtime = {"version": 1, "products": {}}, None
            return
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("products", {}), dict):
                raise ValueError("top level must be an object with a 'products' object")
        except (OSError, ValueError) as exc:
            raise ThresholdFileError(f"cannot read thresholds file {self.path}: {exc}") from exc
        data.setdefault("products", {})
        self._data = data
        self._mtime = self.path.stat().st_mtime

    def _maybe_reload_locked(self) -> None:
        """Pick up edits made to the file by hand (or by another replica sharing it)."""
        try:
            mtime = self.path.stat().st_mtime if self.path.is_file() else None
        except OSError:
            return
        if mtime != self._mtime:
            try:
                self._load_locked()
            except ThresholdFileError as exc:
                log.error("%s; keeping the thresholds read before", exc)
                self._mtime = mtime

    def _write_locked(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "w") as fh:
                json.dump(self._data, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
        self._mtime = self.path.stat().st_mtime

    # --- reading --------------------------------------------------------------------------------------------------
    def all(self) -> dict[str, Any]:
        with self._lock:
            self._maybe_reload_locked()
            return json.loads(json.dumps(self._data))

    def get(self, product: str) -> dict[str, Any] | None:
        with self._lock:
            self._maybe_reload_locked()
            entry = self._data["products"].get(product)
            return json.loads(json.dumps(entry)) if entry is not None else None

    def resolve(
        self,
        product: str | None,
        line: str | None,
        score: str | None,
        default_score: str,
        settings_default: float | None,
        manifest: dict[str, Any] | None,
        mode: str | None = None,
    ) -> Resolved:
        """`mode` (zero_shot / few_shot): how the image was scored; an entry fitted in one mode (calibration records
        it) is never applied to scores of the other, as a threshold is never applied to another score."""
        with self._lock:
            self._maybe_reload_locked()
            entry = self._data["products"].get(product) if product else None
        candidates: list[tuple[str, dict[str, Any]]] = []
        if entry:
            line_entry = (entry.get("lines") or {}).get(line) if line else None
            if line_entry and line_entry.get("threshold") is not None:
                candidates.append(("line", line_entry))
            if entry.get("threshold") is not None:
                candidates.append(("product", entry))
        if mode is not None:
            candidates = [(src, c) for src, c in candidates if c.get("mode") in (None, mode)]
        used = score or (candidates[0][1].get("score") if candidates else None) or default_score
        for source, cand in candidates:
            if cand.get("score", default_score) == used:
                return Resolved(float(cand["threshold"]), source, used)
        return default_threshold(used, settings_default, manifest)

    # --- writing --------------------------------------------------------------------------------------------------
    def put(
        self,
        product: str,
        threshold: float,
        score: str,
        line: str | None = None,
        source: str = "manual",
        calibration: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Set the product's (or one line's) threshold and persist atomically. Returns the product entry.

        `extra` adds fields to the entry (calibration: `mode` zero_shot/few_shot and `shots`)."""
        record: dict[str, Any] = {"threshold": float(threshold), "score": score, "source": source,
                                  "updated_at": utc_now(), **(extra or {})}
        if calibration is not None:
            record["calibration"] = calibration
        with self._lock:
            self._maybe_reload_locked()
            products = self._data["products"]
            entry = products.setdefault(product, {"threshold": None, "lines": {}})
            if line:
                entry.setdefault("lines", {})[line] = record
            else:
                lines = entry.get("lines", {})
                entry.clear()
                entry.update(record, lines=lines)
            self._write_locked()
            return json.loads(json.dumps(entry))

    def delete(self, product: str, line: str | None = None) -> bool:
        with self._lock:
            self._maybe_reload_locked()
            products = self._data["products"]
            if product not in products:
                return False
            if line:
                if line not in products[product].get("lines", {}):
                    return False
                del products[product]["lines"][line]
            else:
                del products[product]
            self._write_locked()
            return True


def default_threshold(score: str, settings_default: float | None, manifest: dict[str, Any] | None) -> Resolved:
    if settings_default is not None:
        return Resolved(float(settings_default), "settings", score)
    advice = (manifest or {}).get("threshold_advice")
    if isinstance(advice, dict):
        advice = advice.get(score)
    if isinstance(advice, (int, float)) and not isinstance(advice, bool) and math.isfinite(advice):
        return Resolved(float(advice), "manifest", score)
    return Resolved(FALLBACK_THRESHOLD, "fallback", score)


# --- calibration ------------------------------------------------------------------------------------------------------
def calibrate(scores: list[float], target_frr: float) -> tuple[float, dict[str, Any]]:
    """Threshold at a target false-reject rate on normal images, and the score distribution.

    A result is anomalous when `score > threshold`. The threshold is the smallest observed normal score with at most
    `target_frr` of the normal scores above it, i.e. the ceil((1 - frr) * N)-th smallest score. With N normal images
    the finest reachable rate is 1/N, so fewer than 1/frr images give a threshold at (or near) the maximum: the reply
    says so in `note`.
    """
    arr = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(arr)
    k = min(n, max(1, math.ceil((1.0 - target_frr) * n - 1e-9)))
    threshold = float(arr[k - 1])
    achieved = float(np.mean(arr > threshold))
    hist, edges = np.histogram(arr, bins=20, range=(0.0, 1.0))
    pct = {f"p{q:g}": float(np.percentile(arr, q)) for q in (1, 5, 25, 50, 75, 95, 99)}
    info: dict[str, Any] = {
        "n": n,
        "target_frr": target_frr,
        "achieved_frr": achieved,
        "min": float(arr[0]),
        "max": float(arr[-1]),
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "percentiles": pct,
        "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in hist]},
        "scores": [float(s) for s in scores],
    }
    if n * target_frr < 1.0:
        info["note"] = (f"{n} images cannot resolve a {target_frr:.2%} false-reject rate (finest step 1/{n}); "
                        f"the threshold is the highest normal score. Use at least {math.ceil(1 / target_frr)} images.")
    return threshold, info
