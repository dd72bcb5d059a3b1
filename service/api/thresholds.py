"""Thresholds for the API: the store (in the shared database, `service/db/thresholds.py`), resolution
(`service/thresholds.py`, shared with the CLI) and fitting a threshold to normal images (`calibrate`).

The thresholds lived in a JSON file (`ZSAD_THRESHOLDS_PATH`) before; now they are rows of the results database, so
every replica of a fleet reads the same ones with no shared file system. An existing file is imported once at
start-up (`service.db.thresholds.import_file`) and renamed.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..db.thresholds import ThresholdFileError, ThresholdStore, VersionConflict  # noqa: F401 - the API's store
from ..thresholds import FALLBACK_THRESHOLD, Resolved, default_threshold  # noqa: F401 - one resolution for all


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
