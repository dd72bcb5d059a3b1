"""WinCLIP aggregation of window scores into patch maps, vectorised and batched over images.

Per scale, each patch takes the harmonic mean of the scores of the windows covering it. The maps of all scales and
the image score (broadcast to the grid) are then combined by another harmonic mean. Why harmonic: one low score
pulls the mean down, so a patch only stays hot when every window that sees it agrees it is anomalous; the synthetic
study found it beat the plain mean per pixel by 0.01-0.13 pixel AUROC. A consequence (by design of WinCLIP): a low
image score pulls the whole map down.

The per-patch harmonic mean is a matmul with a patch x window incidence matrix: count_p / sum_w M[p, w] / s_w.
Scores are clamped to `eps` first, so a zero score gives a (near) zero mean instead of 0 * inf = NaN.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import torch
import torch.nn.functional as F

from .window_grid import incidence_matrix

EPS = 1e-6

__all__ = ["harmonic_patch_map", "harmonic_combine", "winclip_map", "upsample_map"]


def harmonic_patch_map(
    scores: torch.Tensor, indices: torch.Tensor, grid: tuple[int, int], eps: float = EPS
) -> torch.Tensor:
    """Patch map [B, h, w]: per patch, the harmonic mean of the scores [B, n_windows] of the windows covering it.

    `indices` [n_windows, k*k] are the windows' patch indices (see `window_grid.window_indices`). A patch covered by
    no window gets NaN (cannot happen with `window_indices`, which always covers the whole grid).
    """
    h, w = grid
    scores = scores.float()
    idx = indices.detach().cpu().long().contiguous()
    mat, count = _incidence(h, w, tuple(idx.shape), idx.numpy().tobytes())  # [P, n], [P]
    inv_sum = scores.clamp_min(eps).reciprocal() @ mat.to(scores.device).T  # [B, P]
    return (count.to(scores.device) / inv_sum).reshape(scores.shape[0], h, w)


@lru_cache(maxsize=256)
def _incidence(h: int, w: int, shape: tuple[int, ...], data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """The incidence matrix and per-patch window count of one window geometry, cached by its indices' bytes: every
    request aggregates over the same few geometries. Read-only (shared between calls)."""
    with torch.inference_mode(False):  # a first call under inference mode must not cache tensors autograd refuses
        indices = torch.frombuffer(bytearray(data), dtype=torch.long).reshape(shape)
        mat = incidence_matrix(h, w, indices)
        return mat, mat.sum(dim=1)


def harmonic_combine(maps: list[torch.Tensor], eps: float = EPS) -> torch.Tensor:
    """Element-wise harmonic mean of same-shaped maps (scores clamped to `eps`)."""
    if not maps:
        raise ValueError("nothing to combine")
    stacked = torch.stack([m.float() for m in maps], dim=0).clamp_min(eps)
    return len(maps) / stacked.reciprocal().sum(dim=0)


def winclip_map(
    image_scores: torch.Tensor,
    window_scores: Mapping[int, torch.Tensor],
    indices: Mapping[int, torch.Tensor],
    grid: tuple[int, int],
    eps: float = EPS,
) -> torch.Tensor:
    """Grid map [B, h, w]: harmonic mean of {image score broadcast, each scale's harmonic patch map}.

    `image_scores` [B]; `window_scores[scale]` [B, n_windows] in the order of `indices[scale]`.
    """
    b = image_scores.shape[0]
    maps = [image_scores.float().reshape(b, 1, 1).expand(b, grid[0], grid[1])]
    for scale in sorted(window_scores):
        maps.append(harmonic_patch_map(window_scores[scale], indices[scale], grid, eps))
    return harmonic_combine(maps, eps)


def upsample_map(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of maps [B, h, w] (or [h, w]) to `size` (H, W); align_corners=False keeps cell centres."""
    squeeze = maps.dim() == 2
    x = maps.float()[None] if squeeze else maps.float()
    out = F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return out[0] if squeeze else out
