"""The synthetic factory world: procedural images of 10 named kinds with 7 local defects and exact pixel masks.

Why it exists: no pretrained CLIP can be downloaded here, so the in-house tiny CLIP is trained on this world, and the
evaluation tests zero-shot transfer on kinds the CLIP never saw (`HELD_OUT_KINDS`).

Two more kinds, `RANDOM_KINDS`, have no fixed look: every `widget` scene draws its own silhouette and inner parts,
every `pattern` scene its own texture. They are domain randomisation for CLIP training: with only seven named
training kinds the CLIP learns what a defect looks like *on those kinds*; parts of endless shapes push it towards
what a defect looks like on anything.

How a render works (all float32 in [0, 1] at the output size):
  background -> object layers (or a full-frame texture) -> [defect, local] -> lighting gradient -> sensor noise.
The defect is applied *before* lighting and noise, and both twins share the scene, the lighting and the noise draw,
so the clean and the defective render differ only where the defect changed the scene. The mask is those pixels
(max channel change of the noiseless lit renders above `MASK_THRESHOLD`), with pinholes closed by a 3x3 closing.

Determinism: every random draw comes from a numpy Generator seeded by `(seed, stream..., index)`, so sample i is the
same whatever batch it lands in and whatever was drawn before it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from . import raster
from .raster import grid, remap, value_noise

OBJECT_KINDS = ("bottle_cap", "hex_nut", "screw", "pill", "cable", "gear")
TEXTURE_KINDS = ("wood", "fabric", "leather", "metal")
NAMED_KINDS = OBJECT_KINDS + TEXTURE_KINDS
RANDOM_OBJECT_KINDS, RANDOM_TEXTURE_KINDS = ("widget",), ("pattern",)  # look drawn per scene: domain randomisation
RANDOM_KINDS = RANDOM_OBJECT_KINDS + RANDOM_TEXTURE_KINDS
WIDE_RANDOM_KINDS = RANDOM_KINDS + ("weave", "label")  # the wide world's (v4) random kinds: + woven/knitted, print
KINDS = NAMED_KINDS + RANDOM_KINDS + ("weave", "label")  # append only: dataset seeds use the index of a kind here
HELD_OUT_KINDS = ("hex_nut", "pill", "leather")  # never seen by CLIP training, prompt design or any tuning
TRAIN_KINDS = tuple(k for k in NAMED_KINDS if k not in HELD_OUT_KINDS)
DEFECTS = ("scratch", "crack", "hole", "stain", "missing_piece", "deformation", "colour_spot")
FINE_DEFECTS = ("pinhole", "fine_scratch")  # a few pixels: what a 6x6 grid could not resolve
GLOBAL_DEFECTS = ("colour_cast", "wrong_material", "blur", "misprint", "warp")  # the whole part or texture changes
WIDE_DEFECTS = DEFECTS + FINE_DEFECTS + GLOBAL_DEFECTS

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.78, 0.12, 0.12),
    "orange": (0.93, 0.50, 0.10),
    "yellow": (0.93, 0.82, 0.15),
    "green": (0.15, 0.58, 0.22),
    "blue": (0.15, 0.30, 0.80),
    "purple": (0.50, 0.20, 0.65),
    "pink": (0.95, 0.55, 0.70),
    "brown": (0.50, 0.30, 0.15),
    "black": (0.09, 0.09, 0.09),
    "white": (0.93, 0.93, 0.90),
    "gray": (0.52, 0.52, 0.52),
    "gold": (0.83, 0.68, 0.25),
}
BACKGROUNDS: tuple[tuple[float, float, float], ...] = (
    (0.85, 0.85, 0.83), (0.20, 0.20, 0.22), (0.05, 0.05, 0.06), (0.96, 0.96, 0.95),
    (0.76, 0.71, 0.60), (0.25, 0.30, 0.38), (0.17, 0.29, 0.20), (0.55, 0.55, 0.58),
)
MASK_THRESHOLD = 0.05  # a pixel is "changed" when some channel moved by more than this (~13 grey levels)

RGB = tuple[float, float, float]


def seeded_rng(seed: int, *stream: int) -> np.random.Generator:
    """The Generator for one sample: (seed, stream ids..., index) -> independent, order-free draws."""
    return np.random.default_rng([int(seed), *[int(s) for s in stream]])


def luminance(rgb: Sequence[float] | np.ndarray) -> float | np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# --- scenes ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scene:
    """Everything that fixes one clean image, independent of the render size."""

    kind: str
    colour: str
    rgb: RGB
    colour2: str  # second pill half, second cable wire
    rgb2: RGB
    rgb3: RGB  # third cable wire
    background: RGB
    cx: float  # object centre, fraction of the image
    cy: float
    angle: float  # radians
    scale: float  # object radius, fraction of the image
    parts: int  # gear teeth, cap knurls, cable wires
    shape: float  # kind-specific shape parameter in [0, 1] (cable bend, texture frequency, ...)
    light_angle: float
    light_strength: float
    brightness: float
    noise_sigma: float
    detail_seed: int  # texture detail, background detail and sensor noise

    @property
    def is_texture(self) -> bool:
        return self.kind in TEXTURE_KINDS or self.kind in RANDOM_TEXTURE_KINDS or self.kind == "weave"


@dataclass(frozen=True)
class Defect:
    type: str
    seed: int


def _jitter(rng: np.random.Generator, rgb: RGB, amount: float = 0.035) -> RGB:
    out = np.clip(np.asarray(rgb) + rng.normal(0.0, amount, 3), 0.02, 0.98)
    return (float(out[0]), float(out[1]), float(out[2]))


def _other_colour(rng: np.random.Generator, not_this: str) -> str:
    names = [c for c in COLOURS if c != not_this]
    return names[int(rng.integers(len(names)))]


def sample_scene(rng: np.random.Generator, kinds: Sequence[str] = TRAIN_KINDS, kind: str | None = None) -> Scene:
    """A random scene of one of `kinds` (or of `kind`)."""
    if kind is None:
        kind = kinds[int(rng.integers(len(kinds)))]
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    names = list(COLOURS)
    colour = names[int(rng.integers(len(names)))]
    rgb = _jitter(rng, COLOURS[colour])
    colour2 = _other_colour(rng, colour)
    colour3 = _other_colour(rng, colour2)
    # A background that stands out from the object: the world has no camouflage.
    order = rng.permutation(len(BACKGROUNDS))
    background = BACKGROUNDS[int(order[0])]
    for i in order:
        cand = BACKGROUNDS[int(i)]
        if abs(float(luminance(cand)) - float(luminance(rgb))) > 0.22:
            background = cand
            break
    scale_range = {"screw": (0.36, 0.46), "pill": (0.32, 0.42), "cable": (0.30, 0.38), "widget": (0.30, 0.44)}.get(
        kind, (0.28, 0.40))
    parts = {"gear": int(rng.integers(8, 17)), "bottle_cap": int(rng.integers(30, 56)), "cable": int(rng.integers(2, 4))}
    return Scene(
        kind=kind,
        colour=colour,
        rgb=rgb,
        colour2=colour2,
        rgb2=_jitter(rng, COLOURS[colour2]),
        rgb3=_jitter(rng, COLOURS[colour3]),
        background=_jitter(rng, background, 0.02),
        cx=float(rng.uniform(0.4, 0.6)),
        cy=float(rng.uniform(0.4, 0.6)),
        angle=float(rng.uniform(0, 2 * math.pi)),
        scale=float(rng.uniform(*scale_range)),
        parts=parts.get(kind, 0),
        shape=float(rng.uniform(0, 1)),
        light_angle=float(rng.uniform(0, 2 * math.pi)),
        light_strength=float(rng.uniform(0.0, 0.25)),
        brightness=float(rng.uniform(0.85, 1.1)),
        noise_sigma=float(rng.uniform(0.004, 0.025)),
        detail_seed=int(rng.integers(2**31)),
    )


def random_defect(rng: np.random.Generator, defects: Sequence[str] = DEFECTS) -> Defect:
    return Defect(defects[int(rng.integers(len(defects)))], int(rng.integers(2**31)))


# --- layers: what a clean scene looks like before lighting ------------------------------------------------------
@dataclass
class _Layers:
    img: np.ndarray  # [S, S, 3] scene colours before lighting
    bg: np.ndarray  # [S, S, 3] what is behind the object (textures: a backing colour)
    support: np.ndarray  # [S, S] object coverage (textures: all ones)
    centre: np.ndarray  # object centre, pixels
    radius: float  # object radius, pixels
    axis: np.ndarray  # unit vector of the object's x axis
    _depth: np.ndarray | None = None

    @property
    def is_texture(self) -> bool:
        return bool(self.support.min() >= 1.0)

    def depth(self) -> np.ndarray:
        """Distance (pixels) from each object pixel to the nearest non-object pixel; computed once per render."""
        if self._depth is None:
            from scipy.ndimage import distance_transform_edt

            self._depth = distance_transform_edt(self.support > 0.5).astype(np.float32)
        return self._depth


class _Frame:
    """Object frame -> pixels: p_pix = centre + R(angle) @ p * radius."""

    def __init__(self, scene: Scene, size: int):
        self.size = size
        self.centre = np.array([scene.cx * size, scene.cy * size])
        self.radius = scene.scale * size
        c, s = math.cos(scene.angle), math.sin(scene.angle)
        self.rot = np.array([[c, -s], [s, c]])

    def __call__(self, pts: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        return self.centre + (np.asarray(pts, dtype=np.float64) @ self.rot.T) * self.radius


def _circle_pts(r: float | np.ndarray, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t) * r, np.sin(t) * r], axis=1)


class _Painter:
    """Paints opaque shapes in order (painter's algorithm) on one supersampled RGB canvas plus a coverage canvas.

    Why one canvas: drawing every part into the same Pillow image and box-filtering once is several times faster
    than compositing a coverage mask per part, and gives the same antialiased edges. Colours are premultiplied
    (the canvas starts black), so `img = bg * (1 - a) + colour * shade` composites exactly. A `cut` paints
    transparent: the background shows through it.
    """

    def __init__(self, frame: _Frame, ss: int = raster.SUPERSAMPLE):
        from PIL import Image, ImageDraw

        self.f, self.k, self.size = frame, float(ss), frame.size
        self.rgb = Image.new("RGB", (frame.size * ss,) * 2, (0, 0, 0))
        self.alpha = Image.new("L", (frame.size * ss,) * 2, 0)
        self.draw_rgb, self.draw_a = ImageDraw.Draw(self.rgb), ImageDraw.Draw(self.alpha)

    @staticmethod
    def _c(rgb: Sequence[float], factor: float) -> tuple[int, int, int]:
        return tuple(int(round(255 * min(1.0, max(0.0, c * factor)))) for c in rgb)  # type: ignore[return-value]

    def _px(self, pts: np.ndarray | Sequence[Sequence[float]]) -> list[tuple[float, float]]:
        return [tuple(p) for p in self.f(pts) * self.k]

    def poly(self, pts: np.ndarray, rgb: Sequence[float] | None, factor: float = 1.0) -> None:
        px = self._px(pts)
        self.draw_rgb.polygon(px, fill=self._c(rgb, factor) if rgb is not None else (0, 0, 0))
        self.draw_a.polygon(px, fill=255 if rgb is not None else 0)

    def disc(self, x: float, y: float, r: float, rgb: Sequence[float] | None, factor: float = 1.0) -> None:
        (cx, cy), rr = self._px([(x, y)])[0], r * self.f.radius * self.k
        box = [cx - rr, cy - rr, cx + rr, cy + rr]
        self.draw_rgb.ellipse(box, fill=self._c(rgb, factor) if rgb is not None else (0, 0, 0))
        self.draw_a.ellipse(box, fill=255 if rgb is not None else 0)

    def line(self, pts: np.ndarray, width: float, rgb: Sequence[float], factor: float = 1.0) -> None:
        """A stroke of `width` (object units) along `pts`, drawn as one band polygon (fast at any width)."""
        self.poly(_band(np.asarray(pts, dtype=np.float64), width), rgb, factor)

    def cut_disc(self, x: float, y: float, r: float) -> None:
        self.disc(x, y, r, None)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(premultiplied colour [S, S, 3], coverage [S, S]) as float32."""
        from PIL import Image

        s = (self.size, self.size)
        colour = np.asarray(self.rgb.resize(s, Image.BOX), dtype=np.float32) * (1 / 255)
        alpha = np.asarray(self.alpha.resize(s, Image.BOX), dtype=np.float32) * (1 / 255)
        return colour, alpha


def _band(pts: np.ndarray, width: float) -> np.ndarray:
    """Outline polygon of a polyline thickened to `width` (miter joints, flat ends)."""
    seg = np.diff(pts, axis=0)
    seg /= np.linalg.norm(seg, axis=1, keepdims=True) + 1e-12
    normals = np.stack([-seg[:, 1], seg[:, 0]], 1)
    vertex_n = np.concatenate([normals[:1], normals[:-1] + normals[1:], normals[-1:]])
    vertex_n /= np.linalg.norm(vertex_n, axis=1, keepdims=True) + 1e-12
    half = width / 2
    return np.concatenate([pts + vertex_n * half, (pts - vertex_n * half)[::-1]])


def _lighter(rgb: Sequence[float], t: float) -> tuple[float, float, float]:
    return tuple(c + (1 - c) * t for c in rgb)  # type: ignore[return-value]


def _paint_bottle_cap(p: _Painter, s: Scene) -> None:
    n = max(s.parts, 12)
    t = np.linspace(0, 2 * math.pi, 2 * n, endpoint=False)
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, 0.93)
    p.poly(np.stack([np.cos(t) * r, np.sin(t) * r], 1), s.rgb, 0.8)
    p.disc(0, 0, 0.82, s.rgb, 0.55)
    p.disc(0, 0, 0.77, s.rgb, 1.0)
    p.disc(-0.28, -0.28, 0.2, _lighter(s.rgb, 0.18))  # specular highlight


def _paint_hex_nut(p: _Painter, s: Scene) -> None:
    p.poly(_circle_pts(1.0, 6), s.rgb, 0.78)
    p.disc(0, 0, 0.85, s.rgb, 0.98)
    p.disc(0, 0, 0.5, s.rgb, 0.5)
    p.cut_disc(0, 0, 0.38)


def _paint_screw(p: _Painter, s: Scene) -> None:
    head = np.array([[-1.0, -0.3], [-0.95, -0.38], [-0.72, -0.38], [-0.72, 0.38], [-0.95, 0.38], [-1.0, 0.3]])
    p.poly(head, s.rgb, 0.95)
    p.poly(np.array([[-0.72, -0.16], [0.72, -0.16], [1.0, 0.0], [0.72, 0.16], [-0.72, 0.16]]), s.rgb, 0.82)
    p.poly(np.array([[-1.01, -0.07], [-0.9, -0.07], [-0.9, 0.07], [-1.01, 0.07]]), s.rgb, 0.35)  # slot
    for x in np.arange(-0.62, 0.8, 0.12):
        tip = min(1.0, (0.98 - x) / 0.3)  # threads get shorter towards the tip
        p.line(np.array([[x, -0.16 * tip], [x + 0.07, 0.16 * tip]]), 0.045, s.rgb, 0.5)


def _stadium(x0: float, x1: float, r: float, left_round: bool, right_round: bool, n: int = 16) -> np.ndarray:
    pts: list[tuple[float, float]] = []
    if right_round:
        t = np.linspace(-math.pi / 2, math.pi / 2, n)
        pts += [(x1 + r * math.cos(a), r * math.sin(a)) for a in t]
    else:
        pts += [(x1, -r), (x1, r)]
    if left_round:
        t = np.linspace(math.pi / 2, 3 * math.pi / 2, n)
        pts += [(x0 + r * math.cos(a), r * math.sin(a)) for a in t]
    else:
        pts += [(x0, r), (x0, -r)]
    return np.array(pts)


def _paint_pill(p: _Painter, s: Scene) -> None:
    r = 0.42
    p.poly(_stadium(-1 + r, 0.0, r, True, False), s.rgb)
    p.poly(_stadium(0.0, 1 - r, r, False, True), s.rgb2)
    p.line(np.array([[-0.62, -0.2], [-0.02, -0.2]]), 0.08, _lighter(s.rgb, 0.35))
    p.line(np.array([[0.02, -0.2], [0.62, -0.2]]), 0.08, _lighter(s.rgb2, 0.35))


def _paint_cable(p: _Painter, s: Scene) -> None:
    n = min(max(s.parts, 2), 3)
    bend = (s.shape - 0.5) * 0.5
    x = np.linspace(-2.2, 2.2, 24)
    colours = (s.rgb, s.rgb2, s.rgb3)
    for i in range(n):
        off = (i - (n - 1) / 2) * 0.34
        pts = np.stack([x, bend * x**2 + off], 1)
        p.line(pts, 0.34, colours[i], 0.45)
        p.line(pts, 0.26, colours[i])
        p.line(pts + np.array([0, -0.06]), 0.06, _lighter(colours[i], 0.35))


def _paint_gear(p: _Painter, s: Scene) -> None:
    n = max(s.parts, 6)
    pts = []
    for k in range(n):
        a0 = 2 * math.pi * k / n
        w = 2 * math.pi / n
        for a, r in ((a0, 0.8), (a0 + 0.2 * w, 1.0), (a0 + 0.5 * w, 1.0), (a0 + 0.7 * w, 0.8)):
            pts.append((r * math.cos(a), r * math.sin(a)))
    p.poly(np.array(pts), s.rgb, 0.85)
    p.disc(0, 0, 0.46, s.rgb, 0.62)
    p.disc(0, 0, 0.38, s.rgb, 0.95)
    p.cut_disc(0, 0, 0.18)
    if n % 2:
        for k in range(4):
            a = math.pi / 4 + k * math.pi / 2
            p.cut_disc(0.62 * math.cos(a), 0.62 * math.sin(a), 0.09)


def _paint_widget(p: _Painter, s: Scene) -> None:
    """A part of random shape: a smooth or polygonal outline, maybe elongated, with random inner parts.

    No hexagons and no two-coloured halves: those would be the held-out hex nut and pill by another name.
    """
    rng = seeded_rng(s.detail_seed, 1)
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    if rng.uniform() < 0.4:  # flat-sided: a regular k-gon's radius
        k = (3, 4, 5, 7, 8)[int(rng.integers(5))]
        r = math.cos(math.pi / k) / np.cos((t - rng.uniform(0, 2 * math.pi)) % (2 * math.pi / k) - math.pi / k)
    else:  # smooth: a few random harmonics
        r = np.ones_like(t)
        for h in range(2, 7):
            r += rng.uniform(0, 0.16) * np.cos(h * t + rng.uniform(0, 2 * math.pi))
    r = r / r.max()
    squash = 1.0 / rng.uniform(1.0, 2.2)  # elongated parts, like screws and pills
    outline = np.stack([np.cos(t) * r, np.sin(t) * r * squash], 1)
    p.poly(outline, s.rgb, rng.uniform(0.7, 0.9))
    p.poly(outline * rng.uniform(0.72, 0.9), s.rgb, rng.uniform(0.9, 1.05))
    if rng.uniform() < 0.5:  # a centre boss, sometimes in the second colour
        colour = s.rgb2 if rng.uniform() < 0.4 else s.rgb
        p.disc(0, 0, rng.uniform(0.2, 0.45) * squash, colour, rng.uniform(0.5, 0.8))
    if rng.uniform() < 0.4:  # stripes across
        n = int(rng.integers(2, 7))
        for x in np.linspace(-0.5, 0.5, n):
            p.line(np.array([[x, -0.45 * squash], [x, 0.45 * squash]]), 0.05, s.rgb, 0.55)
    if rng.uniform() < 0.35:  # knobs on a ring
        n, ring = int(rng.integers(3, 9)), rng.uniform(0.45, 0.6)
        for a in np.linspace(0, 2 * math.pi, n, endpoint=False):
            p.disc(ring * math.cos(a), ring * math.sin(a) * squash, 0.07 * squash, s.rgb, 0.6)
    if rng.uniform() < 0.4:  # a through hole
        p.cut_disc(0, 0, rng.uniform(0.08, 0.18) * squash)


def _paint_label(p: _Painter, s: Scene) -> None:
    """A print/label part: a card of the scene colour with printed text lines, maybe a barcode and a logo."""
    rng = seeded_rng(s.detail_seed, 1)
    h = rng.uniform(0.45, 0.8)
    rect = np.array([[-1.0, -h], [1.0, -h], [1.0, h], [-1.0, h]])
    p.poly(rect, s.rgb, 0.8)
    p.poly(rect * np.array([0.95, 0.92]), s.rgb, 1.0)
    ink = (0.05, 0.05, 0.05) if luminance(s.rgb) > 0.45 else (0.95, 0.95, 0.93)
    if rng.uniform() < 0.35:
        ink = s.rgb2
    n = int(rng.integers(2, 6))
    x0 = -0.8
    for y in np.linspace(-0.6 * h, 0.6 * h, n):
        p.line(np.array([[x0, y], [x0 + rng.uniform(0.5, 1.4), y]]), rng.uniform(0.08, 0.16) * h, ink)
    if rng.uniform() < 0.5:  # a barcode
        for x in np.cumsum(rng.uniform(0.02, 0.07, 10)) + 0.35:
            if x < 0.9:
                p.line(np.array([[x, -0.7 * h], [x, 0.7 * h]]), rng.uniform(0.01, 0.03), ink)
    if rng.uniform() < 0.5:  # a logo
        p.disc(0.7, -0.55 * h, 0.18 * h, s.rgb2)


_PAINTERS: dict[str, Callable[[_Painter, Scene], None]] = {
    "bottle_cap": _paint_bottle_cap,
    "hex_nut": _paint_hex_nut,
    "screw": _paint_screw,
    "pill": _paint_pill,
    "cable": _paint_cable,
    "gear": _paint_gear,
    "widget": _paint_widget,
    "label": _paint_label,
}


def _texture_coords(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotated coordinates in image units (resolution independent)."""
    x, y = grid(size)
    c, s = math.cos(scene.angle), math.sin(scene.angle)
    xc, yc = x / size - 0.5, y / size - 0.5
    return xc * c + yc * s, -xc * s + yc * c


def _texture_shade(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _texture_coords(scene, size)
    k = scene.kind
    if k == "wood":
        freq = 5 + 5 * scene.shape
        warp = value_noise(rng, u * 2 + 10, v * 3 + 10)
        rings = np.sin(2 * math.pi * (freq * v + 0.7 * warp))
        fine = value_noise(rng, u * 3 + 10, v * 70 + 10)
        return 0.78 + 0.14 * rings + 0.08 * fine
    if k == "fabric":
        period = 1.0 / (10 + 6 * scene.shape)
        a, b = u / period + 50, v / period + 50
        fa, fb = a - np.floor(a), b - np.floor(b)
        parity = (np.floor(a) + np.floor(b)) % 2 == 0
        top = np.where(parity, np.sin(math.pi * fa), np.sin(math.pi * fb))
        return 0.58 + 0.4 * top + 0.05 * value_noise(rng, u * 20 + 10, v * 20 + 10)
    if k == "leather":
        cells = 12 + 6 * scene.shape
        bumps = np.tanh(2.5 * value_noise(rng, u * cells + 10, v * cells + 10))
        crease = np.exp(-((value_noise(rng, u * 4 + 10, v * 4 + 10) / 0.05) ** 2))
        return 0.82 + 0.1 * bumps - 0.22 * crease
    if k == "metal":
        streaks = value_noise(rng, u * 1.5 + 10, v * 90 + 10)
        broad = value_noise(rng, u * 0.6 + 10, v * 6 + 10)
        band = np.exp(-(((v - (scene.shape - 0.5) * 0.6) / 0.22) ** 2))
        return 0.72 + 0.07 * streaks + 0.05 * broad + 0.2 * band
    if k == "pattern":  # 1-3 random gratings (some squared off) over noise at a random scale
        prng = seeded_rng(scene.detail_seed, 2)
        waves = np.zeros_like(u)
        for _ in range(int(prng.integers(1, 4))):
            a, f = prng.uniform(0, math.pi), prng.uniform(3, 24)
            w = np.sin(2 * math.pi * f * (u * math.cos(a) + v * math.sin(a)) + prng.uniform(0, 2 * math.pi))
            if prng.uniform() < 0.4:
                w = np.sign(w) * np.abs(w) ** 0.25
            waves += prng.uniform(0.3, 1.0) * w
        waves /= np.abs(waves).max() + 1e-6
        cells = prng.uniform(2, 30)
        noise = value_noise(rng, u * cells + 10, v * cells + 10)
        return 0.76 + prng.uniform(0.04, 0.18) * waves + prng.uniform(0.02, 0.1) * noise
    if k == "weave":  # woven (plain, twill, basket) or knitted (chevron loops), random period and aspect
        prng = seeded_rng(scene.detail_seed, 2)
        period = 1.0 / prng.uniform(6, 20)
        a, b = u / period + 50, v / period * prng.uniform(0.6, 1.6) + 50
        fa, fb = a - np.floor(a), b - np.floor(b)
        style = int(prng.integers(4))
        if style == 3:  # knit: rows of V-shaped loops
            zig = np.abs(fa - 0.5) * 2
            top = np.sin(math.pi * ((b + 0.6 * zig) % 1.0)) ** 0.7
        else:
            if style == 0:
                parity = (np.floor(a) + np.floor(b)) % 2 == 0
            elif style == 1:
                parity = (np.floor(a) + 2 * np.floor(b)) % 3 == 0
            else:
                parity = (np.floor(a / 2) + np.floor(b / 2)) % 2 == 0
            top = np.where(parity, np.sin(math.pi * fa), np.sin(math.pi * fb))
        noise = value_noise(rng, u * 20 + 10, v * 20 + 10)
        return 0.55 + prng.uniform(0.25, 0.42) * top + prng.uniform(0.02, 0.08) * noise
    raise ValueError(f"{k!r} is not a texture kind")


def _layers(scene: Scene, size: int) -> _Layers:
    rng = seeded_rng(scene.detail_seed, 0)
    x, y = grid(size)
    if scene.is_texture:
        shade = _texture_shade(scene, size, rng)
        img = np.clip(np.asarray(scene.rgb, np.float32) * shade[..., None], 0, 1).astype(np.float32)
        backing = np.full_like(img, 0.07 if luminance(scene.rgb) > 0.35 else 0.72)
        return _Layers(img, backing, np.ones((size, size), np.float32), np.array([size / 2, size / 2]), size / 2,
                       np.array([math.cos(scene.angle), math.sin(scene.angle)]))
    u = x / size
    detail = 1 + 0.04 * value_noise(rng, u * 5, y / size * 5)
    bg = (np.asarray(scene.background, np.float32) * detail[..., None]).astype(np.float32)
    frame = _Frame(scene, size)
    painter = _Painter(frame)
    _PAINTERS[scene.kind](painter, scene)
    colour, alpha = painter.result()
    # Soft 3D shading: objects are lit from the upper left in their own frame of reference.
    dx, dy = (x - frame.centre[0]) / frame.radius, (y - frame.centre[1]) / frame.radius
    shade = (1.0 - 0.12 * np.clip(dx + dy, -1.5, 1.5)).astype(np.float32)[..., None]
    img = bg * (1 - alpha[..., None]) + colour * shade
    return _Layers(img.astype(np.float32), bg, alpha, frame.centre, frame.radius, frame.rot[:, 0])


def _lighting(scene: Scene, size: int) -> np.ndarray:
    x, y = grid(size)
    t = ((x / size - 0.5) * math.cos(scene.light_angle) + (y / size - 0.5) * math.sin(scene.light_angle)) * 2
    return (scene.brightness * (1 + scene.light_strength * t)).astype(np.float32)[..., None]


# --- defects ---------------------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, allowed: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(allowed)
    if len(ys) == 0:
        ys, xs = np.nonzero(fallback)
    if len(ys) == 0:
        h, w = allowed.shape
        return np.array([w / 2, h / 2])
    i = int(rng.integers(len(ys)))
    return np.array([xs[i] + rng.uniform(0.2, 0.8), ys[i] + rng.uniform(0.2, 0.8)])


def _interior(L: _Layers, depth: float, margin: float = 0.08) -> np.ndarray:
    """Where a defect of radius `depth` fits fully on the object (textures: away from the border)."""
    size = L.img.shape[0]
    if L.is_texture:
        m = max(int(round(margin * size)), int(math.ceil(depth)))
        inside = np.zeros((size, size), bool)
        inside[m : size - m, m : size - m] = True
        return inside
    return L.depth() > depth


def _edge(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    """A point on the object's outer silhouette (textures: anywhere away from the border)."""
    ring = (L.depth() > 0) & (L.depth() <= 1.5)
    x, y = grid(ring.shape[0])
    far = np.hypot(x - L.centre[0], y - L.centre[1]) > 0.6 * L.radius
    return _pick(rng, ring & far, ring)


def _toward(img: np.ndarray, target: np.ndarray | Sequence[float], cov: np.ndarray, strength: float) -> np.ndarray:
    a = (cov * strength)[..., None]
    return img + a * (np.asarray(target, np.float32) - img)


def _local_lum(img: np.ndarray, p: np.ndarray) -> float:
    h, w = img.shape[:2]
    return float(luminance(img[min(int(p[1]), h - 1), min(int(p[0]), w - 1)]))


def _scratch(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    size = L.img.shape[0]
    length = rng.uniform(0.4, 0.85) * L.radius
    p0 = _pick(rng, _interior(L, 1), L.support > 0.5)
    a = rng.uniform(0, 2 * math.pi)
    d = np.array([math.cos(a), math.sin(a)])
    mid = p0 + d * length / 2 + np.array([-d[1], d[0]]) * rng.uniform(-0.15, 0.15) * length
    cov = raster.polyline(size, [p0, mid, p0 + d * length], max(0.9, rng.uniform(0.012, 0.022) * size)) * L.support
    target = (0.97, 0.97, 0.95) if _local_lum(L.img, p0) < 0.55 else (0.05, 0.05, 0.05)
    return _toward(L.img, target, cov, rng.uniform(0.7, 0.9))


def _crack(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    size = L.img.shape[0]
    length = rng.uniform(0.45, 0.9) * L.radius
    p = _pick(rng, _interior(L, 1), L.support > 0.5)
    n = int(rng.integers(7, 12))
    a = rng.uniform(0, 2 * math.pi)
    pts = [p]
    for _ in range(n):
        a += rng.normal(0, 0.55)
        pts.append(pts[-1] + np.array([math.cos(a), math.sin(a)]) * length / n)
    cov = raster.polyline(size, pts, max(0.8, 0.014 * size))
    if rng.uniform() < 0.5:  # a side branch
        j = int(rng.integers(2, n - 1))
        b = a + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2)
        branch = [pts[j]]
        for _ in range(3):
            b += rng.normal(0, 0.4)
            branch.append(branch[-1] + np.array([math.cos(b), math.sin(b)]) * length / n)
        cov = np.maximum(cov, raster.polyline(size, branch, max(0.7, 0.011 * size)))
    dark = _local_lum(L.img, p) > 0.25
    return _toward(L.img, (0.02, 0.02, 0.02) if dark else (0.65, 0.65, 0.65), cov * L.support, 0.85 if dark else 0.7)


def _hole(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    size = L.img.shape[0]
    r = min(rng.uniform(0.07, 0.11) * size, 0.32 * L.radius)
    r = max(r, 1.6)
    p = _pick(rng, _interior(L, 1.3 * r + 1), _interior(L, 1))
    aspect = rng.uniform(0.8, 1.25)
    rim = raster.disc(size, p[0], p[1], 1.35 * r * aspect, 1.35 * r / aspect) * L.support
    inner = raster.disc(size, p[0], p[1], r * aspect, r / aspect) * L.support
    dark = _local_lum(L.img, p) < 0.25
    img = _toward(L.img, (1.0, 1.0, 1.0) if dark else (0.0, 0.0, 0.0), rim, 0.35 if dark else 0.45)
    through = L.bg * np.float32(rng.uniform(0.55, 0.8))  # a through-hole: what is behind shows, in shadow
    a = inner[..., None]
    return img * (1 - a) + through * a


def _stain(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    size = L.img.shape[0]
    r0 = rng.uniform(0.06, 0.12) * size
    p = _pick(rng, _interior(L, 0.5 * r0), L.support > 0.5)
    blobs = [(p + rng.normal(0, 0.45 * r0, 2), r0 * rng.uniform(0.5, 1.0)) for _ in range(int(rng.integers(3, 7)))]

    def draw(d, k):
        for (cx, cy), r in blobs:
            d.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=255)

    cov = raster.coverage(size, draw) * L.support
    x, y = grid(size)
    blotch = np.clip(0.75 + 0.5 * value_noise(rng, x / r0 * 1.2, y / r0 * 1.2), 0.45, 1.0)
    if _local_lum(L.img, p) > 0.3:
        target = np.array([0.30, 0.20, 0.08]) * rng.uniform(0.5, 1.1)
    else:
        target = np.array([0.78, 0.75, 0.64])
    return _toward(L.img, target, cov * blotch, rng.uniform(0.65, 0.9))


def _blob_polygon(rng: np.random.Generator, centre: np.ndarray, r: float, n_min: int, n_max: int) -> np.ndarray:
    n = int(rng.integers(n_min, n_max + 1))
    t = np.sort(rng.uniform(0, 2 * math.pi, n))
    rho = r * rng.uniform(0.55, 1.0, n)
    return centre + np.stack([np.cos(t) * rho, np.sin(t) * rho], 1)


def _missing_piece(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    size = L.img.shape[0]
    if L.is_texture:  # texture: a torn-out patch showing the backing
        p = _pick(rng, _interior(L, 0, margin=0.12), L.support > 0.5)
        cov = raster.polygon(size, _blob_polygon(rng, p, rng.uniform(0.12, 0.2) * size, 7, 11))
    else:  # object: a chunk bitten out of the silhouette, the background shows
        e = _edge(L, rng)
        cov = raster.polygon(size, _blob_polygon(rng, e, max(rng.uniform(0.28, 0.42) * L.radius, 2.5), 6, 9))
        cov = cov * L.support
    a = cov[..., None]
    return L.img * (1 - a) + L.bg * a


def _deformation(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    """A local warp that visibly bends the geometry (silhouette or grain), plus the dent's shading."""
    size = L.img.shape[0]
    x, y = grid(size)
    texture = L.is_texture
    if texture:
        e = _pick(rng, _interior(L, 0, margin=0.15), L.support > 0.5)
        r = rng.uniform(0.15, 0.24) * size
    else:
        e = _edge(L, rng)
        r = max(rng.uniform(0.4, 0.6) * L.radius, 0.1 * size)
    dx, dy = x - e[0], y - e[1]
    t2 = (dx * dx + dy * dy) / (r * r)
    w = np.where(t2 < 1, (1 - t2) ** 2, 0.0).astype(np.float32)
    if texture:  # swirl: grain lines curl around the point
        phi = rng.choice([-1, 1]) * rng.uniform(1.3, 2.3) * w
        c, s = np.cos(phi), np.sin(phi)
        sx, sy = e[0] + c * dx + s * dy, e[1] - s * dx + c * dy
    else:  # bulge out of or dent into the silhouette, along the outward normal
        n = e - L.centre
        n = n / (np.linalg.norm(n) + 1e-6)
        amp = rng.choice([-1, 1]) * rng.uniform(0.4, 0.6) * r
        sx, sy = x - amp * n[0] * w, y - amp * n[1] * w
    warped = remap(L.img, sx, sy)
    support = L.support if texture else remap(L.support[..., None], sx, sy)[..., 0]
    m = rng.uniform(0, 2 * math.pi)
    side = 0.5 + 0.5 * (np.cos(m) * dx + np.sin(m) * dy) / r
    dent = (rng.uniform(0.25, 0.4) * w * np.clip(side, 0, 1) * support)[..., None]
    if float(luminance(L.img[w > 0].mean(axis=0))) > 0.3:
        img = warped * (1 - dent)  # the dent's shadow
    else:
        img = warped + (1 - warped) * dent  # on a dark surface the dent shows as a sheen
    inside = (w > 0)[..., None]
    return np.where(inside, img, L.img).astype(np.float32)


def _colour_spot(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    size = L.img.shape[0]
    r = max(rng.uniform(0.035, 0.065) * size, 1.7)
    p = _pick(rng, _interior(L, r), L.support > 0.5)
    local = L.img[min(int(p[1]), size - 1), min(int(p[0]), size - 1)]
    far = [c for c in COLOURS.values() if np.abs(np.asarray(c) - local).max() > 0.45] or list(COLOURS.values())
    colour = np.asarray(far[int(rng.integers(len(far)))], np.float32)
    aspect = rng.uniform(0.7, 1.4)
    cov = raster.disc(size, p[0], p[1], r * aspect, r / aspect) * L.support
    return _toward(L.img, colour, cov, rng.uniform(0.85, 1.0))


def _contrast_target(L: _Layers, p: np.ndarray) -> tuple[float, float, float]:
    return (0.97, 0.97, 0.95) if _local_lum(L.img, p) < 0.5 else (0.03, 0.03, 0.03)


def _pinhole(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    """A fine local flaw of 1-3 px across: a pore, a fleck of dust, a pin prick."""
    size = L.img.shape[0]
    r = rng.uniform(0.6, 1.3) * max(1.0, size / 96)
    p = _pick(rng, _interior(L, r + 1), L.support > 0.5)
    cov = raster.disc(size, p[0], p[1], r, r * rng.uniform(0.7, 1.3)) * L.support
    return _toward(L.img, _contrast_target(L, p), cov, rng.uniform(0.8, 1.0))


def _fine_scratch(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    """A hairline scratch: under one pixel wide and short."""
    size = L.img.shape[0]
    length = rng.uniform(0.12, 0.3) * L.radius
    p0 = _pick(rng, _interior(L, 1), L.support > 0.5)
    a = rng.uniform(0, 2 * math.pi)
    p1 = p0 + np.array([math.cos(a), math.sin(a)]) * length
    cov = raster.polyline(size, [p0, p1], rng.uniform(0.6, 0.9)) * L.support
    return _toward(L.img, _contrast_target(L, p0), cov, rng.uniform(0.8, 1.0))


def _colour_cast(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    """The whole part (or texture) in a shifted hue: a wrong batch of paint or dye."""
    tint = np.ones(3, np.float32)
    hi, lo = rng.choice(3, 2, replace=False)
    tint[hi] += rng.uniform(0.25, 0.45)
    tint[lo] -= rng.uniform(0.2, 0.4)
    cast = np.clip(L.img * tint + (tint - 1) * 0.12, 0, 1)
    a = L.support[..., None]
    return (L.img * (1 - a) + cast * a).astype(np.float32)


def _wrong_material(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    """The right shape in the wrong material: another colour and a foreign grain over the whole part."""
    size = L.img.shape[0]
    x, y = grid(size)
    ang, f = rng.uniform(0, math.pi), rng.uniform(8, 30)
    t = (x * math.cos(ang) + y * math.sin(ang)) / size
    grain = 0.8 + 0.15 * np.sin(2 * math.pi * f * t) + 0.12 * value_noise(rng, x / size * 12, y / size * 12)
    colour = np.asarray(list(COLOURS.values())[int(rng.integers(len(COLOURS)))], np.float32)
    lum = luminance(L.img)[..., None]
    new = np.clip((0.45 * colour + 0.55 * lum * colour * 1.6) * grain[..., None], 0, 1)
    a = L.support[..., None] * np.float32(rng.uniform(0.7, 1.0))
    return (L.img * (1 - a) + new * a).astype(np.float32)


def _blur(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    """Defocus or smear: the part's (or texture's) detail washed out."""
    from scipy.ndimage import gaussian_filter

    size = L.img.shape[0]
    sigma = rng.uniform(1.2, 2.5) * size / 96
    return gaussian_filter(L.img, sigma=(sigma, sigma, 0)).astype(np.float32)


def _misprint(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    """A double or shifted print over the part: a ghost of its own markings, offset by a few pixels."""
    size = L.img.shape[0]
    x, y = grid(size)
    shift = rng.uniform(1.5, 4.0) * size / 96
    a = rng.uniform(0, 2 * math.pi)
    ghost = remap(L.img, (x - shift * math.cos(a)).astype(np.float64), (y - shift * math.sin(a)).astype(np.float64))
    w = np.float32(rng.uniform(0.35, 0.6))
    out = L.img * (1 - w) + ghost * w
    s = L.support[..., None]
    return (L.img * (1 - s) + out * s).astype(np.float32)


def _warp(L: _Layers, rng: np.random.Generator) -> np.ndarray:
    """A stretch or shear of the whole part or texture (a squashed cap, a skewed weave)."""
    size = L.img.shape[0]
    x, y = grid(size)
    c = L.centre
    a = rng.uniform(0, math.pi)
    d = np.array([math.cos(a), math.sin(a)])
    f = rng.uniform(1.15, 1.35) if rng.uniform() < 0.5 else 1 / rng.uniform(1.15, 1.35)
    dx, dy = x - c[0], y - c[1]
    along = dx * d[0] + dy * d[1]
    shear = rng.uniform(-0.25, 0.25)
    sx = x - d[0] * along * (1 - 1 / f) + shear * dy
    sy = y - d[1] * along * (1 - 1 / f)
    return remap(L.img, sx.astype(np.float64), sy.astype(np.float64)).astype(np.float32)


_DEFECT_FNS: dict[str, Callable[[_Layers, np.random.Generator], np.ndarray]] = {
    "scratch": _scratch,
    "crack": _crack,
    "hole": _hole,
    "stain": _stain,
    "missing_piece": _missing_piece,
    "deformation": _deformation,
    "colour_spot": _colour_spot,
    "pinhole": _pinhole,
    "fine_scratch": _fine_scratch,
    "colour_cast": _colour_cast,
    "wrong_material": _wrong_material,
    "blur": _blur,
    "misprint": _misprint,
    "warp": _warp,
}


def min_defect_area(size: int, defect: str = "scratch") -> int:
    """Smallest mask (pixels) a defect may have; smaller draws are redrawn so every defect is visible."""
    if defect in FINE_DEFECTS:
        return 2
    return max(4, int(0.002 * size * size))


# --- the wide world (v4): pose and photometric jitter --------------------------------------------------------
PHOTO_SETTINGS = ("train", "robust")  # "robust" is never drawn in training: brighter light, more sensor noise
VALIDATION_LOOK_MODULUS = 16  # random-kind looks whose detail seed is 0 mod this are the reserved validation family


@dataclass(frozen=True)
class Photometric:
    """What the camera adds on top of the lit scene, shared by both twins (so the mask is unchanged)."""

    specular: tuple[float, float, float, float]  # (x, y) fraction of the image, radius fraction, strength
    jpeg_quality: int  # 0 = no JPEG round trip


def is_validation_look(detail_seed: int) -> bool:
    """Random-kind scenes with this detail seed belong to the validation family: never drawn in training."""
    return detail_seed % VALIDATION_LOOK_MODULUS == 0


def widen_scene(scene: Scene, rng: np.random.Generator, setting: str = "train") -> Scene:
    """Pose, scale, background and light jitter beyond the named world's ranges (the wide world's scenes).

    "train" widens the ranges training draws from; "robust" is the evaluation-only setting (brighter light, more
    noise than any training draw): brightness 1.2-1.35 (training <= 1.15), noise sigma 0.045-0.06 (training <= 0.04).
    """
    if setting not in PHOTO_SETTINGS:
        raise ValueError(f"unknown photometric setting {setting!r} (use {', '.join(PHOTO_SETTINGS)})")
    bg = scene.background
    if rng.uniform() < 0.4:  # any colour, still standing out from the object
        for _ in range(8):
            cand = tuple(float(c) for c in rng.uniform(0.03, 0.97, 3))
            if abs(float(luminance(cand)) - float(luminance(scene.rgb))) > 0.22:
                bg = cand  # type: ignore[assignment]
                break
    robust = setting == "robust"
    return replace(
        scene,
        background=bg,  # type: ignore[arg-type]
        cx=float(rng.uniform(0.32, 0.68)),
        cy=float(rng.uniform(0.32, 0.68)),
        scale=float(scene.scale * rng.uniform(0.75, 1.2)),
        light_strength=float(rng.uniform(0.0, 0.45)),
        brightness=float(rng.uniform(1.2, 1.35) if robust else rng.uniform(0.7, 1.15)),
        noise_sigma=float(rng.uniform(0.045, 0.06) if robust else rng.uniform(0.002, 0.04)),
    )


def sample_photometric(rng: np.random.Generator) -> Photometric:
    spec = (float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.05, 0.2)),
            float(rng.uniform(0.15, 0.45)) if rng.uniform() < 0.4 else 0.0)
    quality = int(rng.integers(40, 96)) if rng.uniform() < 0.5 else 0
    return Photometric(spec, quality)


def _finish_extras(img: np.ndarray, light: np.ndarray, noise: np.ndarray, extras: Photometric, size: int) -> np.ndarray:
    x, y = grid(size)
    sx, sy, sr, strength = extras.specular
    lit = img * light
    if strength > 0:
        d2 = ((x / size - sx) ** 2 + (y / size - sy) ** 2) / (sr * sr)
        lit = lit + (strength * np.exp(-d2)).astype(np.float32)[..., None]
    out = (np.clip(lit + noise, 0, 1) * 255 + 0.5).astype(np.uint8)
    if extras.jpeg_quality:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=extras.jpeg_quality)
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


# --- rendering -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Twin:
    """One scene rendered clean and with a defect; `mask` marks exactly the pixels the defect changed."""

    scene: Scene
    defect: Defect
    clean: np.ndarray  # [S, S, 3] uint8
    defective: np.ndarray  # [S, S, 3] uint8
    mask: np.ndarray  # [S, S] bool


def _finish(img: np.ndarray, light: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return (np.clip(img * light + noise, 0, 1) * 255 + 0.5).astype(np.uint8)


def _noise(scene: Scene, size: int) -> np.ndarray:
    rng = seeded_rng(scene.detail_seed, 1)
    return rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(scene.noise_sigma)


def render_twins(scene: Scene, defect: Defect, size: int, extras: Photometric | None = None) -> Twin:
    """The clean scene and the same scene with `defect`, sharing lighting, sensor noise and `extras`."""
    if defect.type not in _DEFECT_FNS:
        raise ValueError(f"unknown defect {defect.type!r} (known: {', '.join(DEFECTS)})")
    layers = _layers(scene, size)
    light = _lighting(scene, size)
    clean_lit = layers.img * light
    rng = seeded_rng(defect.seed, 2)
    need = min_defect_area(size, defect.type)
    mask = np.zeros((size, size), bool)
    damaged = layers.img
    for _ in range(6):  # redraw a defect that barely changed anything (e.g. a dark crack on a dark spot)
        damaged = _DEFECT_FNS[defect.type](layers, rng)
        mask = (np.abs(damaged * light - clean_lit).max(axis=-1)) > MASK_THRESHOLD
        if mask.sum() >= need:
            break
    # Close pinholes (e.g. where a swirl moved grain onto similar grain): a mask is a region, as in MVTec-AD.
    from scipy.ndimage import binary_closing

    mask = mask | binary_closing(mask, np.ones((3, 3), bool))
    noise = _noise(scene, size)
    if extras is None:
        return Twin(scene, defect, _finish(layers.img, light, noise), _finish(damaged, light, noise), mask)
    clean_img, damaged_img = (_finish_extras(img, light, noise, extras, size) for img in (layers.img, damaged))
    return Twin(scene, defect, clean_img, damaged_img, mask)


def render(scene: Scene, size: int, defect: Defect | None = None,
           extras: Photometric | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [S, S, 3], mask bool [S, S]) of `scene`, with `defect` if given (else an empty mask)."""
    if defect is None:
        layers = _layers(scene, size)
        light, noise = _lighting(scene, size), _noise(scene, size)
        if extras is not None:
            return _finish_extras(layers.img, light, noise, extras, size), np.zeros((size, size), bool)
        return _finish(layers.img, light, noise), np.zeros((size, size), bool)
    twin = render_twins(scene, defect, size, extras)
    return twin.defective, twin.mask


def with_kind(scene: Scene, kind: str) -> Scene:
    """The same scene parameters with another kind (for tests and illustrations)."""
    return replace(scene, kind=kind)


# --- crops (close-ups) -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Crop:
    x0: int
    y0: int
    side: int


def sample_crop(rng: np.random.Generator, size: int, lo: float = 0.45, hi: float = 0.75) -> Crop:
    side = max(4, int(round(rng.uniform(lo, hi) * size)))
    return Crop(int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1)), side)


def apply_crop(image: np.ndarray, crop: Crop, size: int) -> np.ndarray:
    """Cut `crop` out of `image` and resize it back to `size` (bilinear): a close-up."""
    from PIL import Image

    part = image[crop.y0 : crop.y0 + crop.side, crop.x0 : crop.x0 + crop.side]
    return np.asarray(Image.fromarray(part).resize((size, size), Image.BILINEAR))


def crop_mask(mask: np.ndarray, crop: Crop, size: int) -> np.ndarray:
    from PIL import Image

    part = mask[crop.y0 : crop.y0 + crop.side, crop.x0 : crop.x0 + crop.side].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(part).resize((size, size), Image.NEAREST)) > 127


def location_words(mask: np.ndarray) -> str | None:
    """Where the defect is, in words ("top left", "center", ...), from the mask's centroid; None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    cx, cy = xs.mean() / w, ys.mean() / h
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    return f"{row} {col}".strip() or "center"
