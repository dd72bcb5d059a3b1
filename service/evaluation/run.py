"""Stream a dataset through a scoring function, accumulate metrics, write the report.

The detector is not imported here: the caller passes `score_fn(paths) -> [{"scores": {variant: float},
"maps": {variant: float32 HxW}}, ...]` with maps at each image's own resolution. Maps are folded into per
(variant, category) `PixelMetricAccumulator`s as soon as they arrive, so memory stays flat however large the set.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .metrics import DEFAULT_BINS, PixelMetricAccumulator
from .readers import Sample, image_shape, load_mask
from .report import ImageRecord, write_report

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


def evaluate(samples: Iterable[Sample], score_fn: ScoreFn, out_dir: str | Path, variants: Sequence[str],
             limit: int | None = None, progress: bool = True, pixel: bool = True, batch_size: int = 8,
             bins: int = DEFAULT_BINS, curves: bool = True) -> dict:
    """Score every sample in batches, write the report into `out_dir` and return the metrics.json structure."""
    samples = subsample(list(samples), limit)
    if not samples:
        raise ValueError("no samples to evaluate")
    variants = list(variants)
    masked = pixel_categories(samples) if pixel else set()
    accumulators = {(v, c): PixelMetricAccumulator(bins) for v in variants for c in masked}
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
                                               {v: float(out["scores"][v]) for v in variants}))
                    if s.category in masked:
                        mask = load_mask(s.mask_path) if s.label == 1 else None
                        shape = image_shape(s.path)
                        for v in variants:
                            heat = np.asarray(out["maps"][v])
                            if heat.shape != shape:  # maps must be at the image's own resolution
                                raise ValueError(f"map shape {heat.shape} of variant {v!r} != image shape {shape}")
                            accumulators[(v, s.category)].add(heat, mask)
                except (KeyError, ValueError) as e:
                    raise ValueError(f"{s.path}: bad score_fn output or mask: {e!r}") from e
            bar.update(len(batch))
    results = {v: {c: accumulators[(v, c)].result() for c in sorted(masked)} for v in variants}
    return write_report(records, out_dir, results, variants, curves=curves)
