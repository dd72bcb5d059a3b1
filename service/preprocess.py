"""Image decoding and geometry: bytes or path -> RGB PIL image -> normalised model pixels, and maps back.

Decoding policy (`load_image`):
* Formats: JPEG, PNG, BMP, TIFF, WebP and GIF only (the decoders are restricted, so no other Pillow plugin ever
  parses untrusted input). Multi-frame files (animated GIF/WebP/PNG, multi-page TIFF) use their **first frame**:
  inspection images are stills, and refusing a GIF screenshot helps nobody.
* Size: an image with more than `max_pixels` pixels (width x height, read from the header before any decoding) is
  refused as a possible decompression bomb. Pillow's own hard guard (2 x `Image.MAX_IMAGE_PIXELS`) also still applies;
  this module never changes that global.
* EXIF orientation is applied (`ImageOps.exif_transpose`), so the map lines up with what a viewer shows.
* Modes: grayscale and bilevel become grey RGB; 16-bit and 32-bit integer or float images ('I;16*', 'I', 'F') are
  scaled to 8 bits by their **actual** min..max range (a 12-bit sensor image in a 16-bit file would be nearly black if
  divided by 65535, and clipping would saturate it); a constant image falls back to the type's nominal range.
  Palette images are expanded; CMYK is converted through its embedded ICC profile when there is one (else Pillow's
  formula); images with alpha (LA, PA, RGBA, palette transparency) are composited on a neutral background (by
  default the CLIP mean colour, which is also the letterbox padding: "nothing here").
* Anything unreadable (empty, truncated, not an image, unsupported format or mode) raises `ImageError`, a
  `ValueError` with a message meant for the API caller.
* Pixel budget (`decode_image`, what the service uses): an image above `max_decoded_pixels` is decoded reduced by
  an integer factor (JPEG through the decoder's DCT scaling, other formats with `Image.reduce` right after the
  decoder, before any conversion), so no full-resolution RGB copy, map or overlay of a huge upload is ever made.
  `load_image` (the CLI and the evaluation) decodes at full resolution.

Geometry policy (`to_pixels`), for an S x S model input:
* `letterbox` (default): scale the whole image to fit S x S, keep the aspect ratio, centre it, pad with the mean
  colour (zero after normalisation). Nothing of the image is lost, so every pixel gets a heat value.
* `stretch`: resize to S x S, ignoring the aspect ratio (shapes are distorted, nothing is lost).
* `center_crop`: scale the short side to S and keep the centre square (open_clip's own preprocessing). Pixels
  outside that square are not seen by the model; the map gives them `fill` (0 by default).
Resizing is bicubic with antialiasing (Pillow's resampling filters widen with the scale factor on downscaling).
`Geometry.to_original` maps a model-space map (the patch grid or S x S) back to the original H x W.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .constants import ALLOWED_FORMATS, CLIP_MEAN, CLIP_STD

ResizePolicy = Literal["letterbox", "stretch", "center_crop"]
DEFAULT_BACKGROUND: tuple[int, int, int] = tuple(int(round(255 * m)) for m in CLIP_MEAN)  # type: ignore[assignment]

__all__ = ["ImageError", "Geometry", "DecodedImage", "load_image", "decode_image", "image_size", "reduction_factor",
           "to_rgb", "to_pixels", "cnn_layout", "ALLOWED_FORMATS", "DEFAULT_BACKGROUND"]


class ImageError(ValueError):
    """The input is not an image this service accepts; the message says why (safe to show to the caller)."""


# --- decoding ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodedImage:
    """An RGB image decoded for the model, and the size of the image as uploaded (upright).

    `image` is at most `max_decoded_pixels` pixels (`decode_image`): a larger upload is decoded reduced by an
    integer factor, so `width / image.width` (about `scale`) maps the image's pixels back to the original's."""

    image: Image.Image
    width: int  # original, upright (after EXIF orientation)
    height: int
    format: str

    @property
    def reduced(self) -> bool:
        return self.image.size != (self.width, self.height)


def _open(data: bytes | bytearray | memoryview | str | os.PathLike) -> tuple[Image.Image, str]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if not raw:
            raise ImageError("empty image data (0 bytes)")
        source: io.BytesIO | Path = io.BytesIO(raw)
        name = "image data"
    else:
        source = Path(data)
        name = f"image file {source.name!r}"
        if not source.is_file():
            raise ImageError(f"{name} does not exist")
        if source.stat().st_size == 0:
            raise ImageError(f"{name} is empty (0 bytes)")
    accepted = ", ".join(f.replace("WEBP", "WebP") for f in ALLOWED_FORMATS)
    try:
        return Image.open(source, formats=list(ALLOWED_FORMATS)), name
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image in an accepted format ({accepted})") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name} is too large to decode safely: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - corrupt headers raise many types; all mean "unreadable"
        raise ImageError(f"{name} cannot be read: {type(exc).__name__}: {exc}") from None


def _check_size(im: Image.Image, name: str, max_pixels: int) -> tuple[int, int]:
    width, height = im.size
    if width < 1 or height < 1:
        raise ImageError(f"{name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{name} has {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,} "
            "(refused as a possible decompression bomb)"
        )
    return width, height


def image_size(data: bytes | bytearray | memoryview | str | os.PathLike, max_pixels: int = 50_000_000) -> tuple[int, int]:
    """(width, height) from the header alone, nothing decoded; the same checks and errors as `load_image`."""
    im, name = _open(data)
    with im:
        return _check_size(im, name, max_pixels)


def reduction_factor(width: int, height: int, max_decoded_pixels: int | None) -> int:
    """Smallest integer factor f with ceil(w/f) x ceil(h/f) <= max_decoded_pixels (1: no reduction)."""
    if not max_decoded_pixels or width * height <= max_decoded_pixels:
        return 1
    f = max(2, math.ceil(math.sqrt(width * height / max_decoded_pixels)))
    while math.ceil(width / f) * math.ceil(height / f) > max_decoded_pixels:
        f += 1
    return f


_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that makes it upright (as ImageOps)


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not make a readable image unreadable
        return 1
    return value if value in _TRANSPOSE else 1


def _reduce(im: Image.Image, factor: int) -> Image.Image:
    """`im` reduced by an integer factor (box average), in a mode that averages meaningfully."""
    if im.mode.startswith("I;16"):
        return im.resize((math.ceil(im.width / factor), math.ceil(im.height / factor)), Image.Resampling.BOX)
    if im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("P", "PA"):  # average colours, never palette indices
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    return im.reduce(factor)


def decode_image(
    data: bytes | bytearray | memoryview | str | os.PathLike,
    max_pixels: int = 50_000_000,
    max_decoded_pixels: int | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> DecodedImage:
    """Decode `data` like `load_image`, at most `max_decoded_pixels` pixels (None: full resolution).

    A larger image is decoded reduced by the smallest integer factor that fits: JPEG through the decoder's own
    DCT scaling (`draft`: 1/2, 1/4, 1/8, so the full-size image never exists in memory), then, for the rest and for
    other formats, `Image.reduce` (a box average) on the decoded image before any other full-resolution work (mode
    conversion, EXIF rotation, compositing). Within the limit the result is exactly `load_image`'s."""
    im, name = _open(data)
    with im:
        width, height = _check_size(im, name, max_pixels)
        factor = reduction_factor(width, height, max_decoded_pixels)
        if factor == 1:
            full = _decode_full(im, name, background)
            return DecodedImage(full, full.width, full.height, str(im.format))
        fmt = str(im.format)
        try:
            if fmt == "JPEG":
                im.draft(None, (math.ceil(width / factor), math.ceil(height / factor)))
            im.load()
            # What is left to apply after loading: Pillow's TIFF plugin reports the upright size from the header
            # and rotates while loading (its orientation then reads 1); JPEG, PNG and WebP leave it to us.
            orientation = _orientation(im)
            rest = reduction_factor(im.width, im.height, max_decoded_pixels)
            small = _reduce(im, rest) if rest > 1 else im.copy()
        except Exception as exc:  # noqa: BLE001
            raise ImageError(f"{name} is truncated or corrupt ({fmt}): {type(exc).__name__}: {exc}") from None
    if orientation != 1:
        small = small.transpose(_TRANSPOSE[orientation])
    return DecodedImage(to_rgb(small, background), *_upright(width, height, orientation), fmt)


def _upright(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _decode_full(im: Image.Image, name: str, background: tuple[int, int, int]) -> Image.Image:
    try:
        if im.tell() != 0:  # the first frame of a multi-frame file (never count frames: that scans the file)
            im.seek(0)
        im.load()
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"{name} is truncated or corrupt ({im.format}): {type(exc).__name__}: {exc}") from None
    try:
        upright = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not make a readable image unreadable
        upright = im
    return to_rgb(upright if upright is not None else im, background)


def load_image(
    data: bytes | bytearray | memoryview | str | os.PathLike,
    max_pixels: int = 50_000_000,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> Image.Image:
    """Decode `data` (raw bytes or a file path) to an RGB PIL image, upright per EXIF. Raises ImageError."""
    im, name = _open(data)
    with im:
        _check_size(im, name, max_pixels)
        return _decode_full(im, name, background)


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """'I;16*' / 'I' / 'F' -> 'L' by the image's actual finite range."""
    arr = np.asarray(im).astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return Image.new("L", im.size, 0)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi > lo:
        out = (arr - lo) / (hi - lo) * 255.0
    elif im.mode.startswith("I;16"):
        out = arr / 65535.0 * 255.0
    else:
        out = np.clip(arr, 0.0, 255.0)
    out = np.where(finite, out, 0.0)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except Exception:  # noqa: BLE001 - a broken profile: fall back to the plain formula
            pass
    return im.convert("RGB")


def to_rgb(im: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Convert any decoded Pillow mode to RGB as documented in the module docstring. Raises ImageError."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _scale_to_8bit(im).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    has_alpha = mode in ("LA", "La", "PA", "RGBA", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in im.info)
    try:
        if has_alpha:
            rgba = im.convert("RGBA")
            canvas = Image.new("RGBA", im.size, (*background, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"unsupported image mode {mode!r}: {exc}") from None


# --- geometry ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """How an original H x W image sits in the S x S model input, and how to map model-space maps back.

    `content` (x0, y0, x1, y1), in model pixels, is where the image content lies in the model input (the letterbox
    region; the whole square otherwise). `source` (x0, y0, x1, y1), in original pixels, is the part of the original
    shown there (the whole image, or the centre square for `center_crop`). Both boxes are end-exclusive.
    """

    height: int
    width: int
    size: int
    policy: str
    content: tuple[float, float, float, float]
    source: tuple[float, float, float, float]

    def _axis_matrix(self, n_in: int, n_out: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """[n_out, n_in] bilinear weights sampling a map of n_in cells (spanning the S model pixels) at the centres
        of the n_out original pixels along `axis` (0: x, 1: y), and a mask of original pixels inside `source`."""
        c0, c1 = self.content[axis], self.content[axis + 2]
        s0, s1 = self.source[axis], self.source[axis + 2]
        centres = np.arange(n_out, dtype=np.float64) + 0.5
        model = c0 + (centres - s0) * (c1 - c0) / (s1 - s0)  # model-space coordinate of each original pixel centre
        pos = model / self.size * n_in - 0.5  # continuous index into the map (cell i has its centre at i)
        inside = (centres >= s0) & (centres < s1)
        pos = np.clip(pos, 0.0, n_in - 1)
        i0 = np.floor(pos).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w1 = pos - i0
        mat = np.zeros((n_out, n_in), dtype=np.float32)
        rows = np.arange(n_out)
        np.add.at(mat, (rows, i0), 1.0 - w1)
        np.add.at(mat, (rows, i1), w1)
        return mat, inside

    def to_original(self, heat: torch.Tensor | np.ndarray, fill: float = 0.0) -> np.ndarray:
        """float32 [H, W] map from a model-space map [h, w] that spans the whole S x S input (grid or pixels).

        One bilinear interpolation straight from the map to the original pixel centres (separable: two small
        matmuls, no S x S intermediate); letterbox padding is never sampled except by the blur at the border cells.
        Original pixels the model did not see (`center_crop`) get `fill`.

        The matmuls run in torch, not numpy: right after a forward pass torch's OpenMP threads are still spinning,
        and numpy's own BLAS threads fighting them for the cores made these tiny products take ~14 ms each on 2
        cores (0.1 ms alone).
        """
        t = heat.detach().float().cpu() if isinstance(heat, torch.Tensor) else torch.from_numpy(
            np.asarray(heat, np.float32))
        if t.ndim != 2:
            raise ValueError(f"expected a 2-D map, got shape {tuple(t.shape)}")
        return self.to_original_tensor(t, fill).numpy()

    def to_original_tensor(self, heat: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """`to_original` for maps [..., h, w] (any leading batch shape) on any device: float32 [..., H, W] on the
        maps' device. The detector makes the answer's maps on the model's device this way, so only they cross to
        the host."""
        t = heat.detach().float()
        if t.ndim < 2:
            raise ValueError(f"expected maps [..., h, w], got shape {tuple(t.shape)}")
        my, inside_y = self._axis_matrix(t.shape[-2], self.height, 1)
        mx, inside_x = self._axis_matrix(t.shape[-1], self.width, 0)
        out = torch.from_numpy(my).to(t.device) @ t @ torch.from_numpy(mx).T.to(t.device)
        if not (inside_y.all() and inside_x.all()):
            out[..., torch.from_numpy(~inside_y).to(t.device), :] = fill
            out[..., torch.from_numpy(~inside_x).to(t.device)] = fill
        return out


def cnn_layout(pixels: torch.Tensor, visual: torch.nn.Module) -> torch.Tensor:
    """`pixels` [B, 3, S, S] in channels-last memory layout when `visual` is a CNN tower (open_clip's ModifiedResNet:
    it has `attnpool`) on the CPU, else unchanged. Why: oneDNN's CPU convolutions run channels-last natively; on the
    shipped CNN a forward took 12% less CPU per image at batch 1 and 19% less at batch 16 (`benchmarks/cnn_layout.py`).
    The values are the same (a layout, not a conversion); ViT towers are left alone (not measured)."""
    if pixels.device.type == "cpu" and pixels.dim() == 4 and hasattr(visual, "attnpool"):
        return pixels.contiguous(memory_format=torch.channels_last)
    return pixels


def _resize_rgb(im: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    return np.asarray(im.resize(size, Image.Resampling.BICUBIC, box=box), dtype=np.uint8)


def to_pixels(
    images: Sequence[Image.Image],
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    policy: ResizePolicy = "letterbox",
) -> tuple[torch.Tensor, list[Geometry]]:
    """Normalised float32 pixels [B, 3, S, S] and one Geometry per image, under the resize `policy` (see module doc)."""
    s = int(image_size)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = torch.zeros(len(images), 3, s, s, dtype=torch.float32)  # 0 after normalisation == the mean colour
    geoms: list[Geometry] = []
    for i, im in enumerate(images):
        if im.mode != "RGB":
            im = to_rgb(im)
        w, h = im.size
        if policy == "letterbox":
            scale = s / max(w, h)
            nw, nh = max(1, min(s, round(w * scale))), max(1, min(s, round(h * scale)))
            ox, oy = (s - nw) // 2, (s - nh) // 2
            arr = _resize_rgb(im, (nw, nh))
            content = (float(ox), float(oy), float(ox + nw), float(oy + nh))
            source = (0.0, 0.0, float(w), float(h))
        elif policy == "stretch":
            arr = _resize_rgb(im, (s, s))
            ox = oy = 0
            nw = nh = s
            content, source = (0.0, 0.0, float(s), float(s)), (0.0, 0.0, float(w), float(h))
        elif policy == "center_crop":
            m = min(w, h)
            box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)
            arr = _resize_rgb(im, (s, s), box=box)
            ox = oy = 0
            nw = nh = s
            content, source = (0.0, 0.0, float(s), float(s)), box
        else:
            raise ValueError(f"unknown resize policy {policy!r} (use letterbox, stretch or center_crop)")
        region = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        out[i, :, oy : oy + nh, ox : ox + nw] = (region - mean_t) / std_t
        geoms.append(Geometry(height=h, width=w, size=s, policy=policy, content=content, source=source))
    return out, geoms
