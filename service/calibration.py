"""Score calibration of a model, fitted through the detector the service runs.

Why through `Detector.embed` / `Detector.logits` / `Detector.score`: a second copy of the scoring path drifts (an
earlier one ignored the resize policy, the prompt temperature and the combine weight in effect). Here the reference
images are embedded, scored and turned into threshold advice by the very code that later scores requests, so
`zsad train --calibration-images`, `POST /v1/calibrate/{product}` and `zsad evaluate` give the same score for the
same image and settings (tests/test_calibration.py checks the three paths against each other).

The fitted entry (see `scoring.Calibration`) records the settings it was fitted with, so a service that runs with
other ones can say so (`Detector.calibration_drift`).

The pixel threshold (heat above it forms the mask and the regions) is fitted from the same normal images: the
`PIXEL_QUANTILE` (0.98) quantile of the heat of all their pixels (`NormalHeat`, a fixed-size histogram, so memory does
not grow with the number of images), i.e. at most 2% of normal pixels lie above it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .constants import CALIBRATION_QUANTILE, PIXEL_QUANTILE
from .scoring import fit_calibration

if TYPE_CHECKING:  # pragma: no cover
    from .detector import Detector


class NormalHeat:
    """The heat of normal images, streamed into a histogram of `BINS` bins over [0, 1]: their pixel threshold is a
    quantile of it (`threshold`), with O(BINS) memory however many images are added."""

    BINS = 4096

    def __init__(self) -> None:
        self.counts = np.zeros(self.BINS, dtype=np.int64)
        self.n_images = 0
        self.peaks: list[float] = []

    def add(self, heat: np.ndarray) -> None:
        heat = np.nan_to_num(np.asarray(heat, dtype=np.float64), nan=0.0)
        idx = np.clip((heat * self.BINS).astype(np.int64), 0, self.BINS - 1)
        self.counts += np.bincount(idx.ravel(), minlength=self.BINS)
        self.n_images += 1
        self.peaks.append(float(heat.max()))

    def threshold(self, quantile: float = PIXEL_QUANTILE) -> float:
        """The upper edge of the bin holding the quantile: at most 1 - `quantile` of the pixels lie above it."""
        if self.n_images == 0:
            raise ValueError("no normal heat maps added")
        cum = np.cumsum(self.counts)
        k = int(np.searchsorted(cum, quantile * cum[-1] - 1e-9))
        return min(1.0, (k + 1) / self.BINS)

    def summary(self, quantile: float = PIXEL_QUANTILE) -> dict[str, Any]:
        t = self.threshold(quantile)
        n = int(self.counts.sum())
        above = int(self.counts[min(self.BINS, round(t * self.BINS)):].sum()) if t < 1.0 else 0
        peaks = np.asarray(self.peaks)
        return {"n": self.n_images, "pixels": n, "quantile": quantile, "threshold": t, "pixels_above": above / n,
                "images_with_pixels_above": float(np.mean(peaks > t)),
                "peak_percentiles": {f"p{q:g}": float(np.percentile(peaks, q)) for q in (50, 95, 99)}}


@dataclass
class CalibrationFit:
    entry: dict[str, Any]  # the manifest's `calibration` entry
    threshold_advice: dict[str, float]  # per score: the same false-reject rate on the reference images
    scores: list[dict[str, float]]  # each reference image's calibrated scores, as the service will compute them
    pixel_threshold_advice: dict[str, float] | None = None  # per score: PIXEL_QUANTILE of the images' heat


def fit_detector_calibration(
    detector: Detector,
    images: Sequence[Path | Image.Image],
    quantile: float = CALIBRATION_QUANTILE,
    batch_size: int = 64,
    max_pixels: int | None = None,
    pixel: bool = True,
) -> CalibrationFit:
    """Fit the calibration on unlabeled *normal* images (paths or decoded images) with `detector`'s settings.

    With `pixel`, a second pass computes each image's heat map with the fitted calibration (a batch at a time, folded
    into a `NormalHeat` per score) and advises a pixel threshold per score (`PIXEL_QUANTILE` of the normal heat)."""
    from .preprocess import load_image

    if not images:
        raise ValueError("no calibration images given")
    limit = {"max_pixels": max_pixels} if max_pixels else {}

    def batches():
        for start in range(0, len(images), batch_size):
            yield [im if isinstance(im, Image.Image) else load_image(im, **limit)
                   for im in images[start:start + batch_size]]

    embs = []
    for batch in batches():
        embs += detector.embed(batch, heatmap=False)
    logits = detector.logits(embs)
    entry = {**fit_calibration(logits["fnn"], logits["prompt"], quantile), "fitted_with": detector.scoring_settings()}
    calibrated = detector.with_calibration(entry)
    scores = [d.scores for d in calibrated.score(embs)]
    advice = {name: float(torch.quantile(torch.tensor([s[name] for s in scores], dtype=torch.float64), quantile))
              for name in scores[0]}
    if not pixel:
        return CalibrationFit(entry, advice, scores)
    heat: dict[str, NormalHeat] = {}
    for batch in batches():
        for d in calibrated.detect(batch, heatmap=True):
            for name, h in d.heat.items():
                heat.setdefault(name, NormalHeat()).add(h)
    return CalibrationFit(entry, advice, scores, {name: acc.threshold() for name, acc in heat.items()})
