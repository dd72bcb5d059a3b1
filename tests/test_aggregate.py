"""WinCLIP aggregation: vectorised harmonic means against a plain loop, a hand example, and end-to-end geometry."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from service.aggregate import harmonic_combine, harmonic_patch_map, upsample_map, winclip_map
from service.preprocess import to_pixels
from service.window_grid import window_indices


def _loop_patch_map(scores: torch.Tensor, idx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    h, w = grid
    out = torch.zeros(scores.shape[0], h, w, dtype=torch.float64)
    for b in range(scores.shape[0]):
        for p in range(h * w):
            covering = [float(scores[b, j]) for j in range(idx.shape[0]) if p in idx[j].tolist()]
            out[b, p // w, p % w] = len(covering) / sum(1.0 / s for s in covering)
    return out


@pytest.mark.parametrize("grid,scales,stride", [((5, 7), (2, 3), 1), ((6, 6), (2, 3, 4), 2), ((4, 4), (1, 4), 1)])
def test_vectorised_equals_loop(grid, scales, stride):
    gen = torch.Generator().manual_seed(0)
    b = 3
    indices = {s: window_indices(grid[0], grid[1], s, stride) for s in scales}
    win = {s: torch.rand(b, indices[s].shape[0], generator=gen) * 0.98 + 0.01 for s in scales}
    img = torch.rand(b, generator=gen) * 0.98 + 0.01
    got = winclip_map(img, win, indices, grid)
    maps = [img.double().view(b, 1, 1).expand(b, *grid)]
    for s in scales:
        loop = _loop_patch_map(win[s], indices[s], grid)
        torch.testing.assert_close(harmonic_patch_map(win[s], indices[s], grid).double(), loop, atol=1e-6, rtol=1e-6)
        maps.append(loop)
    ref = len(maps) / sum(1.0 / m for m in maps)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-6)


def test_hand_computed_3x3():
    grid = (3, 3)
    idx2 = window_indices(3, 3, 2, 1)  # windows {0,1,3,4} {1,2,4,5} {3,4,6,7} {4,5,7,8}
    s2 = torch.tensor([[0.2, 0.4, 0.5, 1.0]])
    m2 = harmonic_patch_map(s2, idx2, grid)[0]
    expected = torch.tensor([
        [0.2, 2 / (1 / 0.2 + 1 / 0.4), 0.4],
        [2 / (1 / 0.2 + 1 / 0.5), 4 / (1 / 0.2 + 1 / 0.4 + 1 / 0.5 + 1 / 1.0), 2 / (1 / 0.4 + 1 / 1.0)],
        [0.5, 2 / (1 / 0.5 + 1 / 1.0), 1.0],
    ])
    torch.testing.assert_close(m2, expected, atol=1e-6, rtol=0)
    assert abs(float(m2[0, 1]) - 0.266667) < 1e-5 and abs(float(m2[1, 1]) - 4 / 10.5) < 1e-6
    idx3 = window_indices(3, 3, 3, 1)  # one window covering everything
    full = winclip_map(torch.tensor([0.5]), {2: s2, 3: torch.tensor([[0.8]])}, {2: idx2, 3: idx3}, grid)[0]
    assert abs(float(full[0, 0]) - 3 / (1 / 0.5 + 1 / 0.2 + 1 / 0.8)) < 1e-6  # = 0.363636...
    assert abs(float(full[2, 2]) - 3 / (1 / 0.5 + 1 / 1.0 + 1 / 0.8)) < 1e-6


def test_zero_scores_stay_finite():
    idx = window_indices(3, 3, 2, 1)
    m = winclip_map(torch.tensor([0.0]), {2: torch.zeros(1, 4)}, {2: idx}, (3, 3))
    assert torch.isfinite(m).all() and float(m.max()) < 1e-5
    assert torch.isfinite(harmonic_combine([torch.zeros(2, 2), torch.ones(2, 2)])).all()


def test_low_image_score_pulls_map_down():
    idx = window_indices(4, 4, 2, 1)
    win = {2: torch.full((1, 9), 0.9)}
    hi = winclip_map(torch.tensor([0.9]), win, {2: idx}, (4, 4))
    lo = winclip_map(torch.tensor([0.1]), win, {2: idx}, (4, 4))
    assert float(lo.max()) < float(hi.min())


def test_upsample_shapes_and_constant():
    m = torch.full((2, 3, 5), 0.25)
    up = upsample_map(m, (30, 50))
    assert up.shape == (2, 30, 50) and torch.allclose(up, torch.full_like(up, 0.25))
    assert upsample_map(m[0], (7, 9)).shape == (7, 9)


@pytest.mark.parametrize("target_xy", [(225, 75), (40, 110), (150, 20)])
def test_hot_spot_lands_on_right_pixels_after_letterbox(target_xy):
    """A stub window scorer (hot when the window contains one chosen patch): the peak of the map, mapped back through
    the letterbox geometry of a 300 x 150 image, must land on the original pixels that patch shows."""
    s, patch = 240, 16
    grid = (s // patch, s // patch)
    image = Image.new("RGB", (300, 150), (90, 90, 90))
    _, (geom,) = to_pixels([image], s, policy="letterbox")
    assert geom.content == (0.0, 60.0, 240.0, 180.0)
    tx, ty = target_xy
    scale = 240 / 300
    hot = (int((60 + ty * scale) // patch), int((tx * scale) // patch))  # patch (row, col) showing the target
    hot_idx = hot[0] * grid[1] + hot[1]
    indices = {k: window_indices(grid[0], grid[1], k, 1) for k in (2, 3)}
    win = {k: torch.where((idx == hot_idx).any(dim=1), 0.9, 0.1)[None] for k, idx in indices.items()}
    grid_map = winclip_map(torch.tensor([0.5]), win, indices, grid)[0]
    assert tuple(int(v) for v in np.unravel_index(int(grid_map.argmax()), grid)) == hot
    full = geom.to_original(grid_map)
    assert full.shape == (150, 300)
    # the hottest original pixels are inside the patch's footprint in the original image
    y0, y1 = (hot[0] * patch - 60) / scale, ((hot[0] + 1) * patch - 60) / scale
    x0, x1 = hot[1] * patch / scale, (hot[1] + 1) * patch / scale
    peak_y, peak_x = np.unravel_index(int(full.argmax()), full.shape)
    assert y0 - 1 <= peak_y <= y1 and x0 - 1 <= peak_x <= x1
    assert x0 - 1 <= tx <= x1 and y0 - 1 <= ty <= y1
    far = full[int(np.clip(ty + 60, 0, 149)) if ty < 75 else int(np.clip(ty - 60, 0, 149)), int((tx + 150) % 300)]
    assert full.max() > far + 0.1


def test_geometry_cached_under_inference_mode_still_serves_training():
    """The incidence matrix and window indices are cached; a first call under `torch.inference_mode` (as serving
    runs) must not cache tensors that a later call with gradients (training's local term) cannot save for backward."""
    from service.aggregate import harmonic_patch_map
    from service.window_grid import window_indices

    idx = window_indices(5, 7, 2, 1)
    with torch.inference_mode():
        served = harmonic_patch_map(torch.rand(2, idx.shape[0]), window_indices(5, 7, 2, 1), (5, 7))
    scores = torch.rand(2, idx.shape[0], requires_grad=True)
    trained = harmonic_patch_map(scores, window_indices(5, 7, 2, 1), (5, 7))
    trained.sum().backward()
    assert served.shape == trained.shape == (2, 5, 7) and scores.grad is not None and bool(scores.grad.abs().sum() > 0)
