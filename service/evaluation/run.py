"""Stream a dataset through a scoring function, accumulate metrics, write the report.

The detector is not imported here: the caller passes `score_fn(paths) -> [{"scores": {variant: float},
"maps": {variant: float32 HxW}, "grid": (rows, cols)}, ...]` with maps at each image's own resolution and, optionally,
the feature grid they were computed on (or "patch": (rows, cols), one grid cell in image pixels). Maps are folded into
per (variant, category) accumulators as soon as they arrive, so memory stays flat however large the set.

Localisation (for every variant, on categories with masks): `hit_at_1`, the share of defective images whose hottest
pixel lies in the defect mask dilated by one grid cell, and the same with another defective image's mask of the
category (`hit_at_1_shuffled`, a fixed random pairing): heat that sits on the part rather than on the defect scores
about as well on the control. With `thresholds` (per category: the image and pixel thresholds of `label_variant`,
as a calibration gives them), the regions the service would report (`heatmap.localise`: none on an image labelled
normal) are matched to the defect regions: `region_precision` (regions touching a defect) and `region_recall`
(defects touched by a region).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..constants import MIN_REGION_AREA
from ..heatmap import localise, min_area_pixels
from .metrics import (
    DEFAULT_BINS,
    LocalisationCounts,
    PixelMetricAccumulator,
    derangement,
    fit_mask,
    hit_at_1,
    patch_pixels,
    region_matches,
)
from .readers import Sample, image_shape, load_mask
from .report import ImageRecord, write_report

DEFECT_BINS = 2**12  # the per-defect pixel metrics: coarser bins, one accumulator per (category, defect)

ScoreFn = Callable[[list[Path]], list[dict]]


def subsample(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """`limit` samples spread evenly over the (category-sorted) list, so a quick run still sees every category
    and both labels instead of the first category's first defect type."""
    samples = list(samples)
    if limit is None or limit >= len(samples):
        return samples
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    idx = np.unique(np.linspace(0, len(samples) - 1, limit).round().astype(int))
    return [samples[i] for i in idx]


def pixel_categories(samples: Iterable[Sample]) -> set[str]:
    """Categories where pixel metrics are defined: at least one anomalous image, and every anomalous one has a mask."""
    has_anomaly: dict[str, bool] = {}
    for s in samples:
        if s.label == 1:
            has_anomaly[s.category] = has_anomaly.get(s.category, True) and s.mask_path is not None
    return {c for c, ok in has_anomaly.items() if ok}


def _shuffled_partners(samples: Sequence[Sample], masked: set[str], seed: int) -> dict[str, Path]:
    """For each defective image of a masked category: the mask of another defective image of the same category."""
    partners: dict[str, Path] = {}
    for cat in sorted(masked):
        defective = [s for s in samples if s.category == cat and s.label == 1]
        perm = derangement(len(defective), seed)
        if perm is None:
            continue
        for i, s in enumerate(defective):
            partners[str(s.path)] = defective[int(perm[i])].mask_path
    return partners


def evaluate(samples: Iterable[Sample], score_fn: ScoreFn, out_dir: str | Path, variants: Sequence[str],
             limit: int | None = None, progress: bool = True, pixel: bool = True, batch_size: int = 8,
             bins: int = DEFAULT_BINS, curves: bool = True, thresholds: Mapping[str, Mapping[str, Any]] | None = None,
             label_variant: str | None = None, min_region_area: float = MIN_REGION_AREA, seed: int = 0) -> dict:
    """Score every sample in batches, write the report into `out_dir` and return the metrics.json structure.

    `label_variant` (default: the last variant) gets the per-defect table and, with `thresholds`
    ({category: {"threshold", "pixel_threshold", "source"}}), the region metrics and the threshold rows."""
    samples = subsample(list(samples), limit)
    if not samples:
        raise ValueError("no samples to evaluate")
    variants = list(variants)
    label_variant = label_variant or variants[-1]
    if label_variant not in variants:
        raise ValueError(f"label variant {label_variant!r} is not one of {variants}")
    masked = pixel_categories(samples) if pixel else set()
    accumulators = {(v, c): PixelMetricAccumulator(bins) for v in variants for c in masked}
    defects = {c: sorted({s.defect for s in samples if s.category == c and s.label == 1}) for c in masked}
    per_defect = {(c, d): PixelMetricAccumulator(DEFECT_BINS) for c in masked for d in defects[c]}
    local = {(v, c): LocalisationCounts(thresholded=bool(thresholds) and v == label_variant and c in thresholds)
             for v in variants for c in masked}
    partners = _shuffled_partners(samples, masked, seed)
    records: list[ImageRecord] = []
    with tqdm(total=len(samples), unit="img", desc="evaluate", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            outputs = score_fn([s.path for s in batch])
            if len(outputs) != len(batch):
                raise ValueError(f"score_fn returned {len(outputs)} results for {len(batch)} images")
            for s, out in zip(batch, outputs):
                try:
                    records.append(ImageRecord(str(s.path), s.category, s.label,
                                               {v: float(out["scores"][v]) for v in variants}, s.defect))
                    if s.category in masked:
                        _add_maps(s, out, variants, label_variant, accumulators, per_defect, defects, local, partners,
                                  (thresholds or {}).get(s.category), min_region_area)
                except (KeyError, ValueError) as e:
                    raise ValueError(f"{s.path}: bad score_fn output or mask: {e!r}") from e
            bar.update(len(batch))
    results = {v: {c: accumulators[(v, c)].result() for c in sorted(masked)} for v in variants}
    localisation = {v: {c: local[(v, c)].result() for c in sorted(masked)} for v in variants}
    defect_pixel = {c: {d: per_defect[(c, d)].result() for d in defects[c]} for c in sorted(masked)}
    return write_report(records, out_dir, results, variants, curves=curves, localisation=localisation,
                        defect_pixel=defect_pixel, label_variant=label_variant, thresholds_used=thresholds)


def _add_maps(s: Sample, out: dict, variants: list[str], label_variant: str, accumulators: dict, per_defect: dict,
              defects: dict, local: dict, partners: dict, threshold: Mapping[str, Any] | None,
              min_region_area: float) -> None:
    """Fold one image's maps into the pixel, per-defect and localisation accumulators."""
    mask = load_mask(s.mask_path) if s.label == 1 else None
    shape = image_shape(s.path)
    grid = out.get("grid")
    patch = tuple(out["patch"]) if out.get("patch") else patch_pixels(shape, grid)
    partner = partners.get(str(s.path))
    other = fit_mask(load_mask(partner), shape) if partner is not None else None
    for v in variants:
        heat = np.asarray(out["maps"][v])
        if heat.shape != shape:  # maps must be at the image's own resolution
            raise ValueError(f"map shape {heat.shape} of variant {v!r} != image shape {shape}")
        accumulators[(v, s.category)].add(heat, mask)
        counts = local[(v, s.category)]
        if mask is not None:
            counts.defective += 1
            counts.hits += hit_at_1(heat, mask, patch)
            if other is not None:
                counts.shuffled += 1
                counts.shuffled_hits += hit_at_1(heat, other, patch)
        if v == label_variant:
            for d in ([s.defect] if mask is not None else defects[s.category]):
                per_defect[(s.category, d)].add(heat, mask)
            if counts.thresholded and threshold is not None:
                anomalous = float(out["scores"][v]) > float(threshold["threshold"])
                _, predicted = localise(heat, float(threshold["pixel_threshold"]),
                                        min_area_pixels(shape, min_region_area), anomalous)
                n_pred, pred_hit, n_true, true_hit = region_matches(predicted > 0, mask if mask is not None
                                                                    else np.zeros(shape, dtype=bool))
                counts.pred_regions += n_pred
                counts.pred_hits += pred_hit
                counts.true_regions += n_true
                counts.true_hits += true_hit
