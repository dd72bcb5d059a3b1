"""Slow, obviously-correct references and tiny-file helpers for the evaluation tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


def slow_pro(heats: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = 0.3) -> float:
    """PRO by definition: every distinct score is a threshold; explicit loops over regions; trapezoid to fpr_limit."""
    regions = []  # (image index, bool mask of one connected region)
    for i, m in enumerate(masks):
        labelled, n = ndimage.label(m, structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            regions.append((i, labelled == r))
    n_normal = sum(int((~m).sum()) for m in masks)
    thresholds = sorted({float(v) for h in heats for v in h.ravel()}, reverse=True)
    points = [(0.0, 0.0)]
    for t in thresholds:
        fp = sum(int(((h >= t) & ~m).sum()) for h, m in zip(heats, masks))
        overlaps = []
        for i, region in regions:
            overlaps.append(((heats[i] >= t) & region).sum() / region.sum())
        points.append((fp / n_normal, sum(overlaps) / len(overlaps)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_lim) / 2
    return area / fpr_limit


def write_png(path: Path, array: np.ndarray | None = None, size: tuple[int, int] = (8, 6)) -> Path:
    """A small PNG: the given uint8/bool array (grey) or a constant RGB image of `size` (w, h)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        Image.new("RGB", size, (120, 130, 140)).save(path)
    else:
        a = np.asarray(array)
        Image.fromarray((a * 255).astype(np.uint8) if a.dtype == bool else a.astype(np.uint8)).save(path)
    return path
