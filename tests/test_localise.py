"""Regions that agree with the label (`heatmap.localise`): hand-made maps, then the invariants on 300 synthetic images
scored by a tiny seeded model at two pixel thresholds (the second well above the heat, so every anomalous image
needs its region grown around the maximum)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from service.detector import Detector
from service.fnn import FNN
from service.heatmap import _grow, localise, min_area_pixels
from service.settings import Settings
from service.synthetic.world import HELD_OUT_KINDS, TRAIN_KINDS, random_defect, render, sample_scene, seeded_rng
from service.thresholds import calibrate


def _check(heat: np.ndarray, anomalous: bool, pixel: float, min_area: int) -> None:
    found, mask = localise(heat, pixel, min_area, anomalous)
    assert mask.shape == heat.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    if not anomalous:
        assert found == [] and not mask.any()
        return
    assert found, "an anomalous image has at least one region"
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert mask[y, x] == 255 and found[0].max_score == float(heat.max())
    assert found[0].y0 <= y < found[0].y1 and found[0].x0 <= x < found[0].x1
    assert all(r.area_px >= min(min_area, heat.size) for r in found)  # a map smaller than the area is one region
    assert int((mask > 0).sum()) == sum(r.area_px for r in found)  # regions are disjoint and fill the mask
    inside = np.zeros(heat.shape, dtype=bool)
    for r in found:
        inside[r.y0:r.y1, r.x0:r.x1] = True
    assert not ((mask > 0) & ~inside).any()


def test_hand_made_maps():
    heat = np.zeros((10, 10), np.float32)
    heat[1, 1] = 0.9  # a one-pixel spike: grown to the minimum area
    heat[0:3, 0:3] += 0.2
    heat[6:9, 6:9] = 0.7  # a 9-pixel area above the threshold
    heat[6, 0] = 0.8  # a one-pixel area above the threshold: too small, dropped
    found, mask = localise(heat, 0.5, min_area=9)
    assert [r.area_px for r in found] == [9, 9]
    assert found[0].bbox == (0, 0, 3, 3) and found[0].max_score == pytest.approx(1.1)
    assert found[1].bbox == (6, 6, 9, 9)
    assert mask[6, 0] == 0 and (mask > 0).sum() == 18
    assert localise(heat, 0.5, 9, anomalous=False)[0] == []
    # nothing above the threshold at all: still one region, around the maximum
    found, mask = localise(heat * 0.1, 0.5, 4)
    assert len(found) == 1 and mask[1, 1] == 255 and found[0].area_px >= 4
    # the cap keeps the mask equal to the union of what is returned
    found, mask = localise(heat, 0.5, 1, max_regions=1)
    assert len(found) == 1 and (mask > 0).sum() == found[0].area_px
    assert min_area_pixels((64, 64), 0.005) == 21 and min_area_pixels((64, 64), 0.0) == 1
    for shape in ((1, 1), (3, 7)):
        _check(np.random.default_rng(0).random(shape).astype(np.float32), True, 0.5, 2)


@pytest.fixture(scope="module")
def maps(_tiny_backend):
    """300 synthetic images (40 px; training and held-out kinds, good and defective, 75 scenes x 4 orientations) and
    their heat maps from the tiny seeded CLIP with a seeded untrained FNN (the invariants hold for any map)."""
    torch.manual_seed(0)
    det = Detector.from_parts(_tiny_backend, FNN(_tiny_backend.embed_dim), Settings(device="cpu", precision="fp32"))
    kinds = TRAIN_KINDS + HELD_OUT_KINDS
    images = []
    for i in range(75):  # 75 renders in 4 orientations each: rendering is the slow part
        rng = seeded_rng(4242, i)
        scene = sample_scene(rng, kind=kinds[i % len(kinds)])
        image = render(scene, 40, random_defect(rng) if i % 2 else None)[0]
        images += [image, image[::-1], image[:, ::-1], np.rot90(image)]
    images = [np.ascontiguousarray(im) for im in images]
    detections = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is 3x faster than a pool fighting for shared cores
    try:
        for start in range(0, len(images), 50):
            detections += det.detect([Image.fromarray(im) for im in images[start:start + 50]], heatmap=True)
    finally:
        torch.set_num_threads(threads)
    return [(d.scores["combined"], d.heat["combined"]) for d in detections]


def test_region_invariants_on_300_synthetic_images(maps):
    scores = [s for s, _ in maps]
    threshold = float(np.median(scores))  # about half the images anomalous
    peaks = [float(h.max()) for _, h in maps]
    for pixel in (calibrate(peaks[:30], 0.2)[0], max(peaks) + 0.01):
        for area in (0.0, 0.02):
            for score, heat in maps:
                _check(heat, score > threshold, pixel, min_area_pixels(heat.shape, area))
    assert sum(s > threshold for s in scores) in range(100, 201)


def _grow_whole_map(heat: np.ndarray, peak: int, min_area: int) -> np.ndarray:
    """The obviously-correct reference: the same binary search, labelling the whole map at every level."""
    values = np.unique(heat)[::-1]
    lo, hi, best = 0, len(values) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        labels, _ = ndimage.label(heat >= values[mid], structure=np.ones((3, 3), dtype=bool))
        component = labels == labels.flat[peak]
        if int(component.sum()) >= min_area:
            best, hi = component, mid - 1
        else:
            lo = mid + 1
    return best


@settings(max_examples=150, deadline=None, derandomize=True)
@given(h=st.integers(1, 60), w=st.integers(1, 60), grid=st.integers(1, 8), seed=st.integers(0, 2**31 - 1),
       area=st.floats(0.0, 0.5), quantise=st.booleans())
def test_windowed_grow_equals_whole_map_search(h, w, grid, seed, area, quantise):
    """`_grow` searches in a window around the peak; on smooth (upsampled grid), noisy and tied (quantised) maps it
    returns exactly the whole-map search's component, wherever the peak is and however elongated the region."""
    rng = np.random.default_rng(seed)
    coarse = torch.tensor(rng.random((1, 1, grid, grid + 1)), dtype=torch.float32)
    heat = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    heat = heat + 0.05 * rng.random((h, w)).astype(np.float32) * rng.integers(0, 2)
    if quantise:
        heat = np.round(heat * 8) / 8
    min_area = max(1, min(int(area * h * w), h * w))
    peak = int(np.argmax(heat))
    np.testing.assert_array_equal(_grow(heat, peak, min_area), _grow_whole_map(heat, peak, min_area))
