from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score

from service.evaluation.metrics import (
    PixelMetricAccumulator,
    image_aupr,
    image_auroc,
    image_f1max,
    image_metrics,
    threshold_advice,
)

from .reference import slow_pro


def sk_f1max(labels, scores) -> float:
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmax(2 * p * r / (p + r)))


def random_case(seed: int, n: int, ties: bool):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.normal(labels * 0.7, 1.0)
    if ties:
        scores = np.round(scores, 1)
    return labels, scores


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_equal_sklearn(seed, ties):
    labels, scores = random_case(seed, n=[7, 40, 500][seed % 3], ties=ties)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_aupr(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    f1, thr = image_f1max(labels, scores)
    assert f1 == pytest.approx(sk_f1max(labels, scores), abs=1e-12)
    # the returned threshold reaches that F1 with the rule `anomalous if score >= threshold`
    assert f1_score(labels, scores >= thr) == pytest.approx(f1, abs=1e-12)


def test_image_metrics_one_class_is_nan():
    m = image_metrics(np.zeros(5), np.arange(5.0))
    assert math.isnan(m.auroc) and math.isnan(m.aupr) and math.isnan(m.f1max)
    assert (m.n_normal, m.n_anomalous) == (5, 0)


def test_image_metrics_reject_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])


def test_threshold_advice():
    rng = np.random.default_rng(0)
    normal, anomalous = rng.random(1000) * 0.6, 0.4 + rng.random(300) * 0.6
    labels = np.r_[np.zeros(1000), np.ones(300)]
    scores = np.r_[normal, anomalous]
    a = threshold_advice(labels, scores, false_reject_rate=0.01)
    assert a.fr_threshold == pytest.approx(np.percentile(normal, 99))
    assert a.fr_observed == pytest.approx(0.01, abs=0.002)
    assert a.recall_at_fr == pytest.approx(np.mean(anomalous > a.fr_threshold))
    # the service's rule `score > threshold`: the advised F1 threshold is just below the F1-optimal score
    f1, best = image_f1max(labels, scores)
    assert a.f1 == f1 and a.f1_threshold < best and a.f1_threshold == np.nextafter(best, -np.inf)
    assert np.mean(scores[labels == 1] > a.f1_threshold) == np.mean(scores[labels == 1] >= best)
    # only normal parts: the false-reject threshold still exists, the F1 threshold does not
    b = threshold_advice(np.zeros(1000), normal)
    assert b.fr_threshold == a.fr_threshold and math.isnan(b.f1_threshold) and math.isnan(b.recall_at_fr)


# --------------------------------------------------------------------------------------------------------------
# pixel level
# --------------------------------------------------------------------------------------------------------------

def synthetic_maps(seed: int, n_images: int = 6, quantize: int | None = None):
    """Smooth heatmaps that loosely follow random blob masks; some images normal; sizes differ."""
    rng = np.random.default_rng(seed)
    heats, masks = [], []
    for i in range(n_images):
        h, w = rng.integers(12, 30, 2)
        mask = np.zeros((h, w), bool)
        if i % 3:  # two of three images anomalous, with 1-3 blobs
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
                mask[y:y + rng.integers(1, 5), x:x + rng.integers(1, 6)] = True
        heat = ndimage.gaussian_filter(mask.astype(float), 1.5) + rng.normal(0, 0.15, (h, w))
        heat = 1 / (1 + np.exp(-4 * (heat - 0.3)))
        if quantize:
            heat = np.round(heat * quantize) / quantize
        heats.append(heat.astype(np.float32))
        masks.append(mask)
    return heats, masks


def accumulate(heats, masks, bins=2**16):
    acc = PixelMetricAccumulator(bins=bins)
    for h, m in zip(heats, masks):
        acc.add(h, m if m.any() else None)
    return acc.result()


@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_match_sklearn_on_all_pixels(seed):
    heats, masks = synthetic_maps(seed)
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([h.ravel() for h in heats]).astype(np.float64)
    r = accumulate(heats, masks)
    assert r.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    assert r.aupr == pytest.approx(average_precision_score(y, s), abs=1e-3)
    assert r.f1max == pytest.approx(sk_f1max(y, s), abs=1e-3)
    assert (r.n_pixels, r.n_anomalous_pixels) == (y.size, y.sum())


def test_pixel_metrics_exact_when_scores_sit_on_bin_edges():
    heats, masks = synthetic_maps(7, quantize=64)  # multiples of 1/64 land on bin edges of 2**16 bins
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([h.ravel() for h in heats]).astype(np.float64)
    r = accumulate(heats, masks)
    assert r.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r.aupr == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert r.f1max == pytest.approx(sk_f1max(y, s), abs=1e-12)
    assert f1_score(y, s >= r.f1_threshold) == pytest.approx(r.f1max, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_pro_equals_slow_reference_exactly_on_bin_edges(seed):
    heats, masks = synthetic_maps(seed, n_images=4, quantize=32)
    assert accumulate(heats, masks).pro == pytest.approx(slow_pro(heats, masks), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_pro_close_to_slow_reference_on_continuous_scores(seed):
    heats, masks = synthetic_maps(10 + seed, n_images=4)
    assert accumulate(heats, masks).pro == pytest.approx(slow_pro(heats, masks), abs=1e-3)


def test_pro_is_one_for_a_perfect_map_and_metrics_are_one():
    _, masks = synthetic_maps(3)
    r = accumulate([m.astype(np.float32) for m in masks], masks)
    assert r.pro == pytest.approx(1.0) and r.auroc == 1.0 and r.aupr == 1.0 and r.f1max == 1.0


def test_pro_hand_computed():
    """Region A (2x2) scores 1.0, region B (1 px) 0.5; 40 of 100 normal pixels score 0.5, the rest 0.
    Curve (0,0) -> (0,0.5) -> (0.4,1) -> (1,1); area to 0.3 = 0.3 * (0.5 + 0.875) / 2 -> PRO 0.6875."""
    heat, mask = np.zeros((7, 15), np.float32), np.zeros((7, 15), bool)
    mask[0:2, 0:2], heat[0:2, 0:2] = True, 1.0  # region A
    mask[5, 12], heat[5, 12] = True, 0.5  # region B, not touching A
    normal = np.flatnonzero(~mask.ravel())
    heat.ravel()[normal[:40]] = 0.5
    r = accumulate([heat], [mask])
    assert r.n_regions == 2 and r.pro == pytest.approx(0.6875, abs=1e-12)
    assert slow_pro([heat], [mask]) == pytest.approx(0.6875, abs=1e-12)


def test_regions_use_8_connectivity():
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one region
    acc = PixelMetricAccumulator(bins=256)
    acc.add(mask.astype(np.float32), mask)
    assert acc.n_regions == 1


def test_accumulator_is_order_independent_and_validates_input():
    heats, masks = synthetic_maps(5)
    assert accumulate(heats, masks) == accumulate(heats[::-1], masks[::-1])
    acc = PixelMetricAccumulator(bins=1024)
    with pytest.raises(ValueError, match="outside"):
        acc.add(np.full((4, 4), 1.5), None)
    with pytest.raises(ValueError, match="NaN"):
        acc.add(np.full((4, 4), np.nan), None)
    with pytest.raises(ValueError, match="shape"):
        acc.add(np.zeros((4, 4)), np.zeros((4, 5), bool))


def test_no_anomalous_pixels_gives_nan():
    acc = PixelMetricAccumulator(bins=256)
    acc.add(np.random.default_rng(0).random((5, 5)), None)
    r = acc.result()
    assert math.isnan(r.auroc) and math.isnan(r.pro) and r.n_regions == 0


def test_hit_at_1_by_hand():
    """A 12x12 map on a 3x3 grid (patch 4 px): the mask dilated by one patch decides."""
    from service.evaluation.metrics import derangement, dilate, hit_at_1, hottest_pixel, patch_pixels, region_matches

    assert patch_pixels((12, 12), (3, 3)) == (4, 4) and patch_pixels((10, 12), None) == (0, 0)
    mask = np.zeros((12, 12), bool)
    mask[2:4, 2:4] = True  # rows 2-3, cols 2-3; dilated by 4: rows 0-7, cols 0-7
    heat = np.zeros((12, 12))
    heat[7, 7] = 1.0
    assert hottest_pixel(heat) == (7, 7)
    assert hit_at_1(heat, mask, (4, 4)) and not hit_at_1(heat, mask, (0, 0))
    heat[7, 7], heat[8, 3] = 0.0, 1.0  # one row outside the dilated mask
    assert not hit_at_1(heat, mask, (4, 4))
    assert dilate(mask, (4, 4)).sum() == 8 * 8 and dilate(mask, (1, 0)).sum() == 4 * 2
    assert hit_at_1(np.ones((12, 12)), mask, (0, 0)) is False  # ties: the first pixel in raster order, (0, 0)
    # another image's mask of another size is resized (nearest) before the test
    small = np.zeros((6, 6), bool)
    small[4, 1] = True  # covers rows 8-9, cols 2-3 at 12x12
    assert hit_at_1(heat, small, (0, 0))

    predicted = np.zeros((12, 12), bool)
    predicted[0:2, 0:2] = predicted[3:5, 3:5] = predicted[10:12, 10:12] = True  # 3 regions, one touches the mask
    truth = mask.copy()
    truth[9:11, 0:2] = True  # 2 true regions, one touched
    assert region_matches(predicted, truth) == (3, 1, 2, 1)
    p = derangement(5, seed=1)
    assert sorted(p) == list(range(5)) and all(p[i] != i for i in range(5)) and derangement(1) is None
