"""Anomaly-detection metrics: image AUROC / AUPR / F1-max, pixel AUROC / AUPR / F1-max / PRO, threshold advice.

Every metric here is computed from one representation: for thresholds in descending order, how many positive
(anomalous) and negative (normal) items sit exactly at each threshold. Image metrics use every distinct score as a
threshold, so they equal scikit-learn exactly (ties are grouped the way `roc_curve` groups them). Pixel metrics
use fixed bins instead, so a whole test set streams through `PixelMetricAccumulator` in O(bins) memory.

Binning approximation (pixel metrics only): scores in [lo, hi) are cut into `bins` equal bins and all scores in
one bin are treated as one tied value whose threshold is the bin's lower edge. Only positive/negative pairs that
fall into the same bin are affected (AUROC counts them as half-ordered), so the AUROC error is at most half the
fraction of such pairs; with the default 2**16 bins it is ~1e-5 on realistic heatmaps. Scores that are exact
multiples of (hi - lo) / bins are binned without any error. A power-of-two bin count keeps the scaling exact.

PRO without per-region histograms: the PRO at threshold t is (1/R) * sum_regions |{p in region: s_p >= t}|/|region|
= (1/R) * sum over anomalous pixels with s_p >= t of 1/|region(p)|. So one histogram of anomalous pixels weighted
by 1/|their region| gives the PRO curve for every threshold exactly as per-region cumulative histograms would, in
O(bins) memory instead of O(regions * bins).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

DEFAULT_BINS = 2**16
PRO_FPR_LIMIT = 0.3

# 8-connectivity, as in the MVTec-AD evaluation: diagonal neighbours belong to the same defect region.
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


# ------------------------------------------------------------------------------------------------------------------
# The shared core: per-threshold positive/negative counts, thresholds descending.
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Curves:
    """Cumulative counts at each threshold (descending): prediction is `score >= thresholds[k]`."""

    thresholds: np.ndarray  # (K,) descending
    tp: np.ndarray  # (K,) anomalous items with score >= threshold
    fp: np.ndarray  # (K,) normal items with score >= threshold
    n_pos: float
    n_neg: float

    @property
    def defined(self) -> bool:
        return self.n_pos > 0 and self.n_neg > 0

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr), starting at (0, 0)."""
        fpr = np.concatenate([[0.0], self.fp / self.n_neg])
        tpr = np.concatenate([[0.0], self.tp / self.n_pos])
        return fpr, tpr

    def pr(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) at each threshold, recall ascending."""
        recall = self.tp / self.n_pos
        precision = self.tp / (self.tp + self.fp)  # > 0: thresholds without items were dropped
        return recall, precision

    def auroc(self) -> float:
        if not self.defined:
            return math.nan
        fpr, tpr = self.roc()
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))

    def aupr(self) -> float:
        """Average precision: sum_k (R_k - R_{k-1}) * P_k, no interpolation (as scikit-learn)."""
        if not self.defined:
            return math.nan
        recall, precision = self.pr()
        return float(np.sum(np.diff(recall, prepend=0.0) * precision))

    def f1max(self) -> tuple[float, float]:
        """Best F1 over thresholds and the highest threshold reaching it (fewest false rejects)."""
        if not self.defined:
            return math.nan, math.nan
        f1 = 2.0 * self.tp / (self.tp + self.fp + self.n_pos)
        k = int(np.argmax(f1))
        return float(f1[k]), float(self.thresholds[k])


def curves_from_counts(thresholds: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> Curves:
    """Build `Curves` from per-threshold counts (thresholds descending); thresholds with no items are dropped."""
    keep = (pos > 0) | (neg > 0)
    tp, fp = np.cumsum(pos[keep]), np.cumsum(neg[keep])
    return Curves(thresholds[keep], tp.astype(np.float64), fp.astype(np.float64), float(pos.sum()), float(neg.sum()))


def curves_from_scores(labels: np.ndarray, scores: np.ndarray) -> Curves:
    """Exact curves: every distinct score is a threshold."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf")
    values, inverse = np.unique(-scores, return_inverse=True)  # ascending in -score = descending in score
    pos = np.bincount(inverse, weights=labels, minlength=len(values))
    neg = np.bincount(inverse, weights=~labels, minlength=len(values))
    return curves_from_counts(-values, pos, neg)


# ------------------------------------------------------------------------------------------------------------------
# Image level
# ------------------------------------------------------------------------------------------------------------------

def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    return curves_from_scores(labels, scores).auroc()


def image_aupr(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (= scikit-learn's `average_precision_score`); NaN when only one class is present."""
    return curves_from_scores(labels, scores).aupr()


def image_f1max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1 over all thresholds, the threshold reaching it); anomalous means `score >= threshold`."""
    return curves_from_scores(labels, scores).f1max()


@dataclass(frozen=True)
class ImageMetrics:
    auroc: float
    aupr: float
    f1max: float
    f1_threshold: float
    n_normal: int
    n_anomalous: int

    def to_dict(self) -> dict:
        return asdict(self)


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> ImageMetrics:
    """All image-level metrics from one sort."""
    c = curves_from_scores(labels, scores)
    f1, thr = c.f1max()
    return ImageMetrics(c.auroc(), c.aupr(), f1, thr, int(c.n_neg), int(c.n_pos))


# ------------------------------------------------------------------------------------------------------------------
# Threshold advice
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ThresholdAdvice:
    """Two ways to pick the decision threshold (`anomalous if score > threshold`, the service's rule), in score units.

    Zero-shot scores have no natural cut-off (0.5 is arbitrary), so the evaluation suggests one: the F1-optimal
    threshold needs labelled anomalies; the false-reject threshold only needs normal parts.
    """

    f1_threshold: float  # NaN without both classes
    f1: float
    fr_threshold: float  # the (1 - target) quantile of normal scores
    fr_target: float
    fr_observed: float  # fraction of normal scores >= fr_threshold
    recall_at_fr: float  # fraction of anomalous scores >= fr_threshold (NaN without anomalies)
    n_normal: int
    n_anomalous: int

    def to_dict(self) -> dict:
        return asdict(self)


def threshold_advice(labels: np.ndarray, scores: np.ndarray, false_reject_rate: float = 0.01) -> ThresholdAdvice:
    """F1-optimal threshold and the threshold that rejects `false_reject_rate` of normal images."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    normal, anomalous = scores[~labels], scores[labels]
    f1, f1_thr = image_f1max(labels, scores) if len(normal) and len(anomalous) else (math.nan, math.nan)
    f1_thr = float(np.nextafter(f1_thr, -np.inf))  # `score > it` is `score >= the F1-optimal score`
    if len(normal):
        fr_thr = float(np.quantile(normal, 1.0 - false_reject_rate))
        fr_obs = float(np.mean(normal > fr_thr))
    else:
        fr_thr = fr_obs = math.nan
    recall = float(np.mean(anomalous > fr_thr)) if len(anomalous) and len(normal) else math.nan
    return ThresholdAdvice(f1_thr, f1, fr_thr, false_reject_rate, fr_obs, recall, len(normal), len(anomalous))


# ------------------------------------------------------------------------------------------------------------------
# Pixel level: streaming accumulator
# ------------------------------------------------------------------------------------------------------------------

def pro_from_curve(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Area under the (fpr, pro) curve for fpr in [0, fpr_limit], divided by fpr_limit.

    Points must be ordered by descending threshold (so fpr is non-decreasing); the curve starts at (0, 0) and is
    linearly interpolated at fpr_limit.
    """
    x = np.concatenate([[0.0], fpr])
    y = np.concatenate([[0.0], pro])
    inside = int(np.searchsorted(x, fpr_limit, side="right"))  # x[:inside] <= fpr_limit
    area = float(np.sum(np.diff(x[:inside]) * (y[1:inside] + y[: inside - 1]) / 2.0))
    if inside < len(x):  # close the segment that crosses fpr_limit
        x0, y0, x1, y1 = x[inside - 1], y[inside - 1], x[inside], y[inside]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += (fpr_limit - x0) * (y0 + y_lim) / 2.0
    return area / fpr_limit


@dataclass(frozen=True)
class PixelMetrics:
    auroc: float
    aupr: float
    f1max: float
    f1_threshold: float
    pro: float
    n_pixels: int
    n_anomalous_pixels: int
    n_regions: int

    def to_dict(self) -> dict:
        return asdict(self)


class PixelMetricAccumulator:
    """Pixel AUROC / AUPR / F1-max / PRO over many maps without keeping them: O(bins) memory.

    `add(heat, mask)` once per image (heat: float HxW in [lo, hi]; mask: bool HxW, all False for a normal image),
    then `result()`. See the module docstring for the binning approximation.
    """

    def __init__(self, bins: int = DEFAULT_BINS, lo: float = 0.0, hi: float = 1.0, fpr_limit: float = PRO_FPR_LIMIT):
        if bins < 2 or not hi > lo:
            raise ValueError(f"need bins >= 2 and hi > lo, got bins={bins}, lo={lo}, hi={hi}")
        self.bins, self.lo, self.hi, self.fpr_limit = bins, lo, hi, fpr_limit
        self.neg = np.zeros(bins, dtype=np.int64)  # normal pixels per bin
        self.pos = np.zeros(bins, dtype=np.int64)  # anomalous pixels per bin
        self.region_weight = np.zeros(bins, dtype=np.float64)  # sum of 1/|region| of anomalous pixels per bin
        self.n_regions = 0

    def _bin(self, heat: np.ndarray) -> np.ndarray:
        h = np.asarray(heat, dtype=np.float64)
        if not np.all(np.isfinite(h)):
            raise ValueError("heatmap contains NaN or inf")
        if h.min() < self.lo or h.max() > self.hi:
            raise ValueError(f"heatmap values [{h.min():.6g}, {h.max():.6g}] outside [{self.lo}, {self.hi}]")
        idx = ((h - self.lo) * (self.bins / (self.hi - self.lo))).astype(np.int64)
        return np.minimum(idx, self.bins - 1)

    def add(self, heat: np.ndarray, mask: np.ndarray | None) -> None:
        """Add one image; `mask=None` means a normal image (no anomalous pixels)."""
        heat = np.asarray(heat)
        if heat.ndim != 2:
            raise ValueError(f"heatmap must be 2-D, got shape {heat.shape}")
        mask = np.zeros(heat.shape, dtype=bool) if mask is None else np.asarray(mask).astype(bool)
        if mask.shape != heat.shape:
            raise ValueError(f"mask shape {mask.shape} differs from heatmap shape {heat.shape}")
        idx = self._bin(heat)
        self.neg += np.bincount(idx[~mask], minlength=self.bins)
        if not mask.any():
            return
        self.pos += np.bincount(idx[mask], minlength=self.bins)
        regions, n = ndimage.label(mask, structure=_STRUCTURE_8)
        sizes = np.bincount(regions.ravel())  # sizes[0] is the background
        weights = 1.0 / sizes[regions[mask]]
        self.region_weight += np.bincount(idx[mask], weights=weights, minlength=self.bins)
        self.n_regions += n

    def curves(self) -> Curves:
        edges = self.lo + np.arange(self.bins, dtype=np.float64) * ((self.hi - self.lo) / self.bins)
        return curves_from_counts(edges[::-1], self.pos[::-1], self.neg[::-1])

    def pro(self) -> float:
        """Normalised area under the PRO curve for FPR in [0, fpr_limit]; NaN without regions or normal pixels."""
        n_neg = self.neg.sum()
        if self.n_regions == 0 or n_neg == 0:
            return math.nan
        keep = (self.neg[::-1] > 0) | (self.pos[::-1] > 0)
        fpr = np.cumsum(self.neg[::-1][keep]) / n_neg
        pro = np.cumsum(self.region_weight[::-1][keep]) / self.n_regions
        return pro_from_curve(fpr, pro, self.fpr_limit)

    def result(self) -> PixelMetrics:
        c = self.curves()
        f1, thr = c.f1max()
        n_pos = int(self.pos.sum())
        return PixelMetrics(c.auroc(), c.aupr(), f1, thr, self.pro(), n_pos + int(self.neg.sum()), n_pos,
                            self.n_regions)


# ------------------------------------------------------------------------------------------------------------------
# Localisation: is the heat on the defect?
# ------------------------------------------------------------------------------------------------------------------

def patch_pixels(shape: tuple[int, int], grid: tuple[int, int] | None) -> tuple[int, int]:
    """One feature-grid cell in image pixels (rows, cols), for a map of `shape` spanning a `grid`; (0, 0) without one."""
    if not grid:
        return 0, 0
    return math.ceil(shape[0] / max(1, int(grid[0]))), math.ceil(shape[1] / max(1, int(grid[1])))


def dilate(mask: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    """`mask` grown by `patch` (rows, cols) pixels in every direction (a box): "within one patch of the defect"."""
    mask = np.asarray(mask).astype(bool)
    if patch[0] <= 0 and patch[1] <= 0:
        return mask
    return ndimage.binary_dilation(mask, structure=np.ones((2 * patch[0] + 1, 2 * patch[1] + 1), dtype=bool))


def hottest_pixel(heat: np.ndarray) -> tuple[int, int]:
    """(row, col) of the heat's maximum (the first one in raster order on ties)."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float64), nan=-np.inf)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(heat)), heat.shape))  # type: ignore[return-value]


def fit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask resized (nearest) to `shape`: another image's mask for the shuffled control."""
    mask = np.asarray(mask).astype(bool)
    if mask.shape == tuple(shape):
        return mask
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1).astype(int)
    return mask[np.ix_(rows, cols)]


def hit_at_1(heat: np.ndarray, mask: np.ndarray, patch: tuple[int, int] = (0, 0)) -> bool:
    """Whether the hottest pixel of `heat` lies in `mask` dilated by `patch` pixels."""
    y, x = hottest_pixel(heat)
    return bool(dilate(fit_mask(mask, np.shape(heat)), patch)[y, x])


def region_matches(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """(predicted regions, of them touching the truth, true regions, of them touched): 8-connected regions of the
    two masks; "touching" is sharing at least one pixel."""
    predicted, truth = np.asarray(predicted).astype(bool), np.asarray(truth).astype(bool)
    pl, n_pred = ndimage.label(predicted, structure=_STRUCTURE_8)
    tl, n_true = ndimage.label(truth, structure=_STRUCTURE_8)
    both = predicted & truth
    pred_hit = len(np.unique(pl[both]))
    true_hit = len(np.unique(tl[both]))
    return n_pred, pred_hit, n_true, true_hit


def derangement(n: int, seed: int = 0) -> np.ndarray | None:
    """A permutation of range(n) without fixed points (a random cycle), or None for n < 2: image i is paired with
    image p[i]'s mask in the shuffled control."""
    if n < 2:
        return None
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, -1)
    return out


@dataclass
class LocalisationCounts:
    """Per category (and variant): hit_at_1 on defective images, the same with a shuffled mask, and region matches."""

    defective: int = 0
    hits: int = 0
    shuffled: int = 0
    shuffled_hits: int = 0
    pred_regions: int = 0
    pred_hits: int = 0
    true_regions: int = 0
    true_hits: int = 0
    thresholded: bool = False  # region counts were taken (a pixel threshold was given)

    def result(self) -> dict:
        def ratio(a: int, b: int) -> float | None:
            return a / b if b else None

        return {"hit_at_1": ratio(self.hits, self.defective),
                "hit_at_1_shuffled": ratio(self.shuffled_hits, self.shuffled),
                "region_precision": ratio(self.pred_hits, self.pred_regions) if self.thresholded else None,
                "region_recall": ratio(self.true_hits, self.true_regions) if self.thresholded else None}
