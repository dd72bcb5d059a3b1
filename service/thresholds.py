"""Threshold resolution, plain and pure: which threshold (and pixel threshold) applies to a (product, line, score),
given the product's stored entry, the label it gives, and fitting a threshold to normal images. Shared by the service
(`service/api`) and the command line (`zsad score --product`), so the same image and product get the same label from
both; where entries are stored is `service/db/thresholds.py`.

A product entry is `{"threshold": 0.61 | None, "score": "combined", "pixel_threshold": 0.42, "source": ...,
"lines": {line: {...}}, ...}` (`pixel_threshold` rides in the database row's JSON `extra`). Each threshold belongs to
one score (`fnn`, `prompt` or `combined` live on different scales), so a threshold set for one is never applied to
another. Resolution for (product, line, score): line entry -> product entry -> `settings.default_threshold` -> the
model manifest's `threshold_advice` -> 0.5, and the answer says which source it used and whether it is `calibrated`
(a line or product entry: a calibration or an admin's explicit setting for that product). When a request names no
score, the entry's score is used, so a product calibrated on `fnn` is judged on `fnn` unless a request asks otherwise.

The pixel threshold (heat above it forms the mask and the regions) resolves alongside, for the same score: the entry
that gave the image threshold (then the product entry) -> `settings.mask_threshold` -> the manifest's
`pixel_threshold_advice` -> 0.5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .constants import FALLBACK_PIXEL_THRESHOLD, FALLBACK_THRESHOLD, UNCALIBRATED_POLICIES

CALIBRATED_SOURCES = ("line", "product")  # a threshold set for this product or line (calibration or admin)


@dataclass(frozen=True)
class Resolved:
    threshold: float
    source: str  # line | product | settings | manifest | fallback
    score: str
    pixel_threshold: float = FALLBACK_PIXEL_THRESHOLD  # heat above it: mask and regions (same score's map)
    pixel_source: str = "fallback"  # line | product | settings | manifest | fallback

    @property
    def calibrated(self) -> bool:
        """True when the threshold was set for this product or line (by a calibration or an admin), not a default."""
        return self.source in CALIBRATED_SOURCES


def decide(score: float, resolved: Resolved, uncalibrated: str = "label") -> str:
    """The label: `anomalous` when `score > threshold`, else `normal`; with the `review` policy an uncalibrated
    product gets `review` instead of a verdict it cannot trust (`ZSAD_UNCALIBRATED`)."""
    if uncalibrated not in UNCALIBRATED_POLICIES:
        raise ValueError(f"uncalibrated policy must be one of {UNCALIBRATED_POLICIES}, got {uncalibrated!r}")
    if uncalibrated == "review" and not resolved.calibrated:
        return "review"
    return "anomalous" if score > resolved.threshold else "normal"


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def resolve_entry(
    entry: dict[str, Any] | None,
    line: str | None,
    score: str | None,
    default_score: str,
    settings_default: float | None,
    manifest: dict[str, Any] | None,
    settings_pixel: float | None = None,
    mode: str | None = None,
) -> Resolved:
    """Threshold, pixel threshold and their sources for one request, from the product's store `entry` (or None).

    `mode` (zero_shot / few_shot): how the image was scored. An entry fitted in one mode (calibration records it) is
    never applied to scores of the other, as a threshold is never applied to another score; an entry without a mode
    (set by hand, or older than few-shot) applies to both."""
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
    same = [(src, cand) for src, cand in candidates if cand.get("score", default_score) == used]
    if same:
        source, cand = same[0]
        image = Resolved(float(cand["threshold"]), source, used)
    else:
        image = default_threshold(used, settings_default, manifest)
    for src, cand in same:  # the entry that gave the threshold, then the product's own
        pixel = _number(cand.get("pixel_threshold"))
        if pixel is not None:
            return Resolved(image.threshold, image.source, used, pixel, src)
    pixel_default = default_pixel_threshold(used, settings_pixel, manifest)
    return Resolved(image.threshold, image.source, used, pixel_default.pixel_threshold, pixel_default.pixel_source)


def _advice(manifest: dict[str, Any] | None, key: str, score: str) -> float | None:
    advice = (manifest or {}).get(key)
    if isinstance(advice, dict):
        advice = advice.get(score)
    return _number(advice)


def default_threshold(score: str, settings_default: float | None, manifest: dict[str, Any] | None) -> Resolved:
    if settings_default is not None:
        return Resolved(float(settings_default), "settings", score)
    advice = _advice(manifest, "threshold_advice", score)
    if advice is not None:
        return Resolved(advice, "manifest", score)
    return Resolved(FALLBACK_THRESHOLD, "fallback", score)


def default_pixel_threshold(score: str, settings_pixel: float | None, manifest: dict[str, Any] | None) -> Resolved:
    """The pixel threshold where no product or line sets one (only `pixel_threshold` / `pixel_source` are meaningful)."""
    if settings_pixel is not None:
        return Resolved(FALLBACK_THRESHOLD, "fallback", score, float(settings_pixel), "settings")
    advice = _advice(manifest, "pixel_threshold_advice", score)
    if advice is not None:
        return Resolved(FALLBACK_THRESHOLD, "fallback", score, advice, "manifest")
    return Resolved(FALLBACK_THRESHOLD, "fallback", score, FALLBACK_PIXEL_THRESHOLD, "fallback")


# --- calibration ------------------------------------------------------------------------------------------------------
def calibrate(scores: list[float], target_frr: float) -> tuple[float, dict[str, Any]]:
    """Threshold at a target false-reject rate on *new* normal images, and the score distribution.

    A result is anomalous when `score > threshold`. The threshold is the k-th smallest of the N normal scores with
    k = ceil((1 - frr) * (N + 1)) (split-conformal rank): if new good parts are exchangeable with the calibration
    images, a new good part scores above it with probability (N + 1 - k) / (N + 1) <= frr. The plain empirical
    quantile (k = ceil((1 - frr) * N)) only bounds the rate on the calibration images themselves and lets about one
    extra good part in N + 1 through: with 30 images at 5% it gave 10% false rejects on fresh good parts
    (benchmarks/localisation.py). With fewer than 1/frr - 1 images no rank reaches the target, so the threshold is
    the highest normal score (expected rate 1 / (N + 1)) and the reply says so in `note`.
    """
    arr = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(arr)
    k = min(n, max(1, math.ceil((1.0 - target_frr) * (n + 1) - 1e-9)))
    threshold = float(arr[k - 1])
    achieved = float(np.mean(arr > threshold))
    hist, edges = np.histogram(arr, bins=20, range=(0.0, 1.0))
    pct = {f"p{q:g}": float(np.percentile(arr, q)) for q in (1, 5, 25, 50, 75, 95, 99)}
    info: dict[str, Any] = {
        "n": n,
        "target_frr": target_frr,
        "achieved_frr": achieved,  # on the calibration images themselves
        "expected_frr": (n + 1 - k) / (n + 1),  # on new good parts (conformal bound)
        "min": float(arr[0]),
        "max": float(arr[-1]),
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "percentiles": pct,
        "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in hist]},
        "scores": [float(s) for s in scores],
    }
    if (n + 1) * target_frr < 1.0:
        info["note"] = (f"{n} images cannot guarantee a {target_frr:.2%} false-reject rate on new parts (finest step "
                        f"1/{n + 1}); the threshold is the highest normal score. Use at least "
                        f"{math.ceil(1 / target_frr) - 1} images.")
    return threshold, info
