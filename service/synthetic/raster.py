"""Small raster helpers for the synthetic world: antialiased coverage masks, value noise, bilinear remapping.

Why these exist: Pillow draws fast but aliased shapes, and numpy is fast on whole arrays but slow per shape. So every
shape is drawn by Pillow on a supersampled 'L' canvas and box-filtered down to a float coverage in [0, 1]; all
colour work then happens on float32 arrays at the output size.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Point = tuple[float, float]
SUPERSAMPLE = 4


def coverage(size: int, draw: Callable[[ImageDraw.ImageDraw, float], None], ss: int = SUPERSAMPLE) -> np.ndarray:
    """Antialiased coverage [size, size] of whatever `draw(d, k)` paints (fill 255) with coordinates scaled by k."""
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw(ImageDraw.Draw(canvas), float(ss))
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) * (1.0 / 255.0)


def polygon(size: int, points: np.ndarray | Sequence[Point], ss: int = SUPERSAMPLE) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    return coverage(size, lambda d, k: d.polygon([tuple(p) for p in pts * k], fill=255), ss)


def disc(size: int, cx: float, cy: float, rx: float, ry: float | None = None, ss: int = SUPERSAMPLE) -> np.ndarray:
    ry = rx if ry is None else ry
    return coverage(size, lambda d, k: d.ellipse([(cx - rx) * k, (cy - ry) * k, (cx + rx) * k, (cy + ry) * k], fill=255), ss)


def polyline(size: int, points: np.ndarray | Sequence[Point], width: float, ss: int = SUPERSAMPLE) -> np.ndarray:
    """A stroked path of `width` output pixels with round joints and caps."""
    pts = [tuple(p) for p in np.asarray(points, dtype=np.float64)]

    def draw(d: ImageDraw.ImageDraw, k: float) -> None:
        w = max(1, int(round(width * k)))
        scaled = [(x * k, y * k) for x, y in pts]
        d.line(scaled, fill=255, width=w, joint="curve")
        r = w / 2.0
        for x, y in (scaled[0], scaled[-1]):
            d.ellipse([x - r, y - r, x + r, y + r], fill=255)

    return coverage(size, draw, ss)


def erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary erosion by a (2*pixels+1) square: where a shape is at least `pixels` deep."""
    if pixels <= 0:
        return mask.copy()
    img = Image.fromarray((mask > 0.5).astype(np.uint8) * 255)
    return np.asarray(img.filter(ImageFilter.MinFilter(2 * pixels + 1))) > 127


@lru_cache(maxsize=16)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each [size, size] float32, in output pixels. Read-only: shared by cache."""
    ax = np.arange(size, dtype=np.float32) + 0.5
    x, y = np.meshgrid(ax, ax)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def value_noise(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth random field at coordinates (u, v) in lattice units (one lattice cell = one 'blob'), std ~0.5.

    Coordinates may be rotated or stretched, which gives oriented grain (wood, brushed metal) from one routine.
    """
    u0, v0 = np.floor(u), np.floor(v)
    iu, iv = u0.astype(np.int64), v0.astype(np.int64)
    iu -= iu.min()
    iv -= iv.min()
    lattice = rng.standard_normal((int(iv.max()) + 2, int(iu.max()) + 2)).astype(np.float32)
    fu, fv = u - u0, v - v0
    fu = fu * fu * (3 - 2 * fu)  # smoothstep: no visible lattice creases
    fv = fv * fv * (3 - 2 * fv)
    a = lattice[iv, iu] * (1 - fu) + lattice[iv, iu + 1] * fu
    b = lattice[iv + 1, iu] * (1 - fu) + lattice[iv + 1, iu + 1] * fu
    return (a * (1 - fv) + b * fv) * 0.7


def remap(img: np.ndarray, src_x: np.ndarray, src_y: np.ndarray) -> np.ndarray:
    """Bilinear sample of `img` [H, W, C] at float pixel-centre coordinates (clamped at the border)."""
    h, w = img.shape[:2]
    x = np.clip(src_x - 0.5, 0, w - 1.000001)
    y = np.clip(src_y - 0.5, 0, h - 1.000001)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx
    bottom = img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)
