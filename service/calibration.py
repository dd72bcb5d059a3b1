"""Score calibration of a model, fitted through the detector the service runs.

Why through `Detector.embed` / `Detector.logits` / `Detector.score`: a second copy of the scoring path drifts (an
earlier one ignored the resize policy, the prompt temperature and the combine weight in effect). Here the reference
images are embedded, scored and turned into threshold advice by the very code that later scores requests, so
`zsad train --calibration-images`, `POST /v1/calibrate/{product}` and `zsad evaluate` give the same score for the
same image and settings (tests/test_calibration.py checks the three paths against each other).

The fitted entry (see `scoring.Calibration`) records the settings it was fitted with, so a service that runs with
other ones can say so (`Detector.calibration_drift`).

The pixel threshold (heat above it forms the mask and the regions) is fitted from the same normal images by the rule
`heat_peak`: each normal image contributes the maximum of its heat map, and the threshold is the peak that at most
the target share of normal images exceed, exactly as the image threshold is fitted on their scores. So at the image
threshold's false-reject rate a normal part also has no pixel above the pixel threshold.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .constants import CALIBRATION_QUANTILE
from .scoring import fit_calibration

if TYPE_CHECKING:  # pragma: no cover
    from .detector import Detector


def heat_peak(heat: np.ndarray) -> float:
    """What one normal image contributes to the pixel threshold: the maximum of its heat map (see the module doc)."""
    return float(np.max(heat))


@dataclass
class CalibrationFit:
    entry: dict[str, Any]  # the manifest's `calibration` entry
    threshold_advice: dict[str, float]  # per score: the same false-reject rate on the reference images
    scores: list[dict[str, float]]  # each reference image's calibrated scores, as the service will compute them
    pixel_threshold_advice: dict[str, float] | None = None  # per score: the same quantile of the images' heat peaks
    peaks: list[dict[str, float]] | None = None  # each reference image's heat peak per score


def fit_detector_calibration(
    detector: Detector,
    images: Sequence[Path | Image.Image],
    quantile: float = CALIBRATION_QUANTILE,
    batch_size: int = 64,
    max_pixels: int | None = None,
    pixel: bool = True,
) -> CalibrationFit:
    """Fit the calibration on unlabeled *normal* images (paths or decoded images) with `detector`'s settings.

    With `pixel`, a second pass computes each image's heat map with the fitted calibration (a batch at a time: only
    the peaks are kept) and advises a pixel threshold per score at the same quantile of the peaks."""
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
    peaks = [{name: heat_peak(heat) for name, heat in d.heat.items()}
             for batch in batches() for d in calibrated.detect(batch, heatmap=True)]
    pixel_advice = {name: float(torch.quantile(torch.tensor([p[name] for p in peaks], dtype=torch.float64), quantile))
                    for name in peaks[0]}
    return CalibrationFit(entry, advice, scores, pixel_advice, peaks)
