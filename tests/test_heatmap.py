"""Overlay PNG, JET colormap, binary mask and connected regions."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.heatmap import binary_mask, jet, overlay_png, regions


def test_jet_reference_colours():
    got = jet(np.array([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert got.dtype == np.uint8 and got.shape == (5, 3)
    assert got.tolist() == [[0, 0, 128], [0, 128, 255], [128, 255, 128], [255, 128, 0], [128, 0, 0]]
    assert jet(np.array([-1.0, 2.0, np.nan])).tolist() == [[0, 0, 128], [128, 0, 0], [0, 0, 128]]


def test_overlay_png_blends():
    image = Image.new("RGB", (6, 4), (100, 50, 0))
    heat = np.zeros((4, 6), np.float32)
    heat[:, 3:] = 1.0
    decoded = np.asarray(Image.open(io.BytesIO(overlay_png(image, heat, alpha=0.5))))
    assert decoded.shape == (4, 6, 3)
    assert tuple(decoded[0, 0]) == (50, 25, 64)  # half of (100,50,0) + half of (0,0,128)
    assert tuple(decoded[0, 5]) == (114, 25, 0)  # half of (100,50,0) + half of (128,0,0)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(overlay_png(image, heat, alpha=0.0)))), np.asarray(image))
    with pytest.raises(ValueError):
        overlay_png(image, np.zeros((6, 4)), 0.5)  # transposed shape
    with pytest.raises(ValueError):
        overlay_png(image, heat, 1.5)


def test_binary_mask_is_strict():
    heat = np.array([[0.2, 0.5], [0.51, 0.9]], np.float32)
    m = binary_mask(heat, 0.5)
    assert m.dtype == np.uint8 and m.tolist() == [[0, 0], [255, 255]]


def test_regions():
    heat = np.zeros((20, 30), np.float32)
    heat[2:5, 3:8] = 0.8  # 15 px
    heat[3, 4] = 0.95
    heat[10:12, 20:22] = 0.6  # 4 px
    heat[12, 22] = 0.6  # diagonal neighbour: joins with 8-connectivity
    heat[18, 0] = 0.7  # 1 px, dropped by min_area
    found = regions(heat, 0.5, min_area=2)
    assert len(found) == 2
    a, b = found  # hottest first
    assert a.bbox == (3, 2, 8, 5) and a.area_px == 15
    assert abs(a.max_score - 0.95) < 1e-6 and abs(a.mean_score - (14 * 0.8 + 0.95) / 15) < 1e-6
    assert b.bbox == (20, 10, 23, 13) and b.area_px == 5 and abs(b.mean_score - 0.6) < 1e-6
    assert b.to_dict()["bbox"] == [20, 10, 23, 13]
    assert len(regions(heat, 0.5, min_area=1)) == 3
    assert regions(heat, 0.99) == []
