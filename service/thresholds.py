"""Threshold resolution, plain and pure: which threshold applies to a (product, line, score), given the product's
stored entry. Shared by the service and the command line; where entries are stored is `service/db/thresholds.py`.

A product entry is `{"threshold": 0.61 | None, "score": "combined", "source": ..., "lines": {line: {...}}, ...}`.
Each threshold belongs to one score (`fnn`, `prompt` or `combined` live on different scales), so a threshold set
for one is never applied to another. Resolution: line entry -> product entry -> `settings.default_threshold` -> the
model manifest's `threshold_advice` -> 0.5; the answer says which source it used. When a request names no score,
the entry's score is used, so a product calibrated on `fnn` is judged on `fnn` unless a request asks otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

FALLBACK_THRESHOLD = 0.5


@dataclass(frozen=True)
class Resolved:
    threshold: float
    source: str  # line | product | settings | manifest | fallback
    score: str


def default_threshold(score: str, settings_default: float | None, manifest: dict[str, Any] | None) -> Resolved:
    if settings_default is not None:
        return Resolved(float(settings_default), "settings", score)
    advice = (manifest or {}).get("threshold_advice")
    if isinstance(advice, dict):
        advice = advice.get(score)
    if isinstance(advice, (int, float)) and not isinstance(advice, bool) and math.isfinite(advice):
        return Resolved(float(advice), "manifest", score)
    return Resolved(FALLBACK_THRESHOLD, "fallback", score)


def resolve_entry(
    entry: dict[str, Any] | None,
    line: str | None,
    score: str | None,
    default_score: str,
    settings_default: float | None,
    manifest: dict[str, Any] | None,
    mode: str | None = None,
) -> Resolved:
    """The threshold for one request, from the product's entry (None: the product has none).

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
    for source, cand in candidates:
        if cand.get("score", default_score) == used:
            return Resolved(float(cand["threshold"]), source, used)
    return default_threshold(used, settings_default, manifest)
