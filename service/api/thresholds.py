"""Thresholds for the API: the store (in the shared database, `service/db/thresholds.py`), and resolution, labels
and calibration (`service/thresholds.py`, pure, shared with the CLI), re-exported for the API package.

The thresholds lived in a JSON file (`ZSAD_THRESHOLDS_PATH`) before; now they are rows of the results database, so
every replica of a fleet reads the same ones with no shared file system. An existing file is imported once at
start-up (`service.db.thresholds.import_file`) and renamed. Pixel thresholds ride in the rows' JSON `extra`.
"""
from __future__ import annotations

from ..db.thresholds import ThresholdFileError, ThresholdStore, VersionConflict
from ..thresholds import (
    CALIBRATED_SOURCES,
    FALLBACK_THRESHOLD,
    Resolved,
    calibrate,
    decide,
    default_pixel_threshold,
    default_threshold,
    resolve_entry,
)

__all__ = ["CALIBRATED_SOURCES", "FALLBACK_THRESHOLD", "Resolved", "ThresholdFileError", "ThresholdStore",
           "VersionConflict", "calibrate", "decide", "default_pixel_threshold", "default_threshold", "resolve_entry"]
