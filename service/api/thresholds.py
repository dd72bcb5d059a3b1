"""Thresholds per product/line for the service: the store and the rules live in `service/thresholds.py` (no
FastAPI), shared with the CLI; this module re-exports them for the API package."""
from __future__ import annotations

from ..thresholds import (
    CALIBRATED_SOURCES,
    FALLBACK_THRESHOLD,
    Resolved,
    ThresholdBackend,
    ThresholdFileError,
    ThresholdStore,
    calibrate,
    decide,
    default_pixel_threshold,
    default_threshold,
    resolve,
)

__all__ = ["CALIBRATED_SOURCES", "FALLBACK_THRESHOLD", "Resolved", "ThresholdBackend", "ThresholdFileError",
           "ThresholdStore", "calibrate", "decide", "default_pixel_threshold", "default_threshold", "resolve"]
