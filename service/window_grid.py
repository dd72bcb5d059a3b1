"""Window geometry on a feature grid: which cells each WinCLIP window covers, and how maps are built from windows.

Kept apart from the tower encoders (`windows.py`): the aggregation, the few-shot memory and the tests need the
geometry without a CLIP. Windows are squares of `scale` cells at `stride`, in row-major order; every cell is covered
by at least one window, so the harmonic mean over the windows that cover a cell is always defined.
"""
from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["window_starts", "window_boxes", "window_indices", "incidence_matrix", "coverage"]


def window_starts(size: int, scale: int, stride: int) -> list[int]:
    """Start offsets of windows of `scale` cells along an axis of `size` cells.

    Offsets are 0, stride, 2*stride, ...; when the stride does not land on the last possible offset, that offset
    (size - scale) is added so every cell is covered by at least one window (the harmonic mean needs that).
    """
    if scale < 1 or stride < 1:
        raise ValueError(f"window scale and stride must be >= 1 (got scale={scale}, stride={stride})")
    if scale > size:
        raise ValueError(f"window scale {scale} is larger than the grid side {size}")
    starts = list(range(0, size - scale + 1, stride))
    if starts[-1] != size - scale:
        starts.append(size - scale)
    return starts


def window_boxes(grid_h: int, grid_w: int, scale: int, stride: int) -> torch.Tensor:
    """LongTensor [n_windows, 4] of (row0, col0, row1, col1) cell boxes (end exclusive), row-major window order."""
    rows = window_starts(grid_h, scale, stride)
    cols = window_starts(grid_w, scale, stride)
    boxes = [(r, c, r + scale, c + scale) for r in rows for c in cols]
    return torch.tensor(boxes, dtype=torch.long)


def window_indices(grid_h: int, grid_w: int, scale: int, stride: int) -> torch.Tensor:
    """LongTensor [n_windows, scale*scale]: the row-major patch indices (into the h*w grid) of each window.

    A copy of a per-geometry cache: every request asks for the same few grids, and building the boxes in Python
    cost more than the few-shot search over them."""
    return _window_indices(int(grid_h), int(grid_w), int(scale), int(stride)).clone()


@lru_cache(maxsize=256)
def _window_indices(grid_h: int, grid_w: int, scale: int, stride: int) -> torch.Tensor:
    with torch.inference_mode(False):  # cached: a normal tensor whatever mode the first call ran in
        boxes = window_boxes(grid_h, grid_w, scale, stride)
        offs = torch.arange(scale)
        local = (offs[:, None] * grid_w + offs[None, :]).reshape(-1)  # [k*k] row-major inside the window
        top_left = boxes[:, 0] * grid_w + boxes[:, 1]
        return top_left[:, None] + local[None, :]


def incidence_matrix(grid_h: int, grid_w: int, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense [grid_h*grid_w, n_windows] matrix with 1 where the patch lies in the window: aggregation is a matmul."""
    n = indices.shape[0]
    mat = torch.zeros(grid_h * grid_w, n, dtype=dtype)
    cols = torch.arange(n).repeat_interleave(indices.shape[1])
    mat[indices.reshape(-1), cols] = 1
    return mat


def coverage(grid_h: int, grid_w: int, indices: torch.Tensor) -> torch.Tensor:
    """LongTensor [grid_h, grid_w]: how many windows cover each patch."""
    counts = torch.bincount(indices.reshape(-1), minlength=grid_h * grid_w)
    return counts.reshape(grid_h, grid_w)
