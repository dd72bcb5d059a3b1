"""A generated corpus of hostile and awkward image files, with what the service must answer for each.

Decompression bombs (tiny files declaring huge images), truncated and corrupt files, headers declaring sizes far
past any limit, polyglots (an image that is also something else, or something else wearing an image's magic
bytes), unusual modes (CMYK, 16-bit grey and RGB, palette with transparency, float TIFF) and multi-frame files
(animated GIF / PNG / WebP, multi-page TIFF). Every file is made here, deterministically, from Pillow or by hand
(PNG chunks with their CRCs), so nothing is downloaded or checked in.

`expect` is the HTTP status `/v1/detect` answers: 200 (decoded: first frame, converted to RGB), 400
(`invalid_image`/`empty_image`), 413 (`image_too_large`) or 415 (`unsupported_media_type`). Never 500.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Hostile:
    name: str
    data: bytes
    expect: int  # HTTP status of /v1/detect

    def __repr__(self) -> str:  # short pytest ids
        return f"Hostile({self.name}, {len(self.data)} B, {self.expect})"


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_by_hand(width: int, height: int, bit_depth: int = 8, colour: int = 0, rows: bytes | None = None,
                idat_limit: int | None = None) -> bytes:
    """A PNG from raw scanlines (filter 0). `rows` None: zeros for every row (a compression bomb when large);
    `idat_limit`: keep only that many compressed bytes (a truncated stream with valid chunk framing)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    if rows is None:
        row = b"\0" * (1 + width * channels * bit_depth // 8)
        comp = zlib.compressobj(9)
        parts, size = [], 0
        for _ in range(height):
            parts.append(comp.compress(row))
            size += len(parts[-1])
            if idat_limit is not None and size > idat_limit:
                break  # never compress gigabytes only to cut them off
        data = b"".join(parts) + comp.flush()
    else:
        data = zlib.compress(rows, 9)
    if idat_limit is not None:
        data = data[:idat_limit]
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _jpeg_with_sof_size(width: int, height: int) -> bytes:
    data = bytearray(_save(_noise((16, 16)), "JPEG", quality=80))
    i = data.index(b"\xff\xc0")  # baseline SOF0: marker, length, precision, height, width
    data[i + 5: i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(_save(_noise((4, 4)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _gif_with_screen(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.new("P", (4, 4)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _frames(n: int, size: tuple[int, int] = (32, 24)) -> list[Image.Image]:
    return [Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, 128)) for i in range(n)]


def _tiff_pages(n: int) -> bytes:
    frames = _frames(n)
    return _save(frames[0], "TIFF", save_all=True, append_images=frames[1:])


def _rgb16_png() -> bytes:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 65536, (12, 16, 3), dtype=np.uint16).astype(">u2")
    rows = b"".join(b"\0" + arr[y].tobytes() for y in range(arr.shape[0]))
    return png_by_hand(16, 12, bit_depth=16, colour=2, rows=rows)


@lru_cache(maxsize=1)
def corpus() -> tuple[Hostile, ...]:
    """Every hostile file once (cached: a few are slow-ish to make)."""
    good_png = _save(_noise((64, 48)), "PNG")
    good_jpeg = _save(_noise((64, 48)), "JPEG", quality=90)
    palette = Image.new("P", (20, 10), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    items = [
        # --- bombs and huge declared sizes ------------------------------------------------------------------------
        Hostile("png_zeros_4000x4000_bomb", png_by_hand(4000, 4000), 200),  # 16 MP from ~16 KB: decoded reduced
        Hostile("png_declares_100000x100000", png_by_hand(100_000, 100_000, idat_limit=64), 413),
        Hostile("png_declares_8000x7000_over_limit", png_by_hand(8000, 7000, idat_limit=64), 413),
        Hostile("jpeg_sof_65500x65500", _jpeg_with_sof_size(65500, 65500), 413),
        Hostile("bmp_declares_50000x50000", _bmp_with_size(50_000, 50_000), 413),
        Hostile("gif_screen_65535x65535", _gif_with_screen(65535, 65535), 413),  # Pillow sizes GIFs by the screen
        Hostile("tiff_declares_100000x100000", _tiff_declaring(100_000, 100_000), 413),
        # --- truncated and corrupt --------------------------------------------------------------------------------
        Hostile("empty", b"", 400),
        Hostile("png_truncated_half", good_png[: len(good_png) // 2], 400),
        Hostile("png_header_only", good_png[:33], 400),
        Hostile("png_bad_crc", good_png[:29] + bytes([good_png[29] ^ 0xFF]) + good_png[30:], 400),
        Hostile("png_truncated_zlib_7000x7000", png_by_hand(7000, 7000, idat_limit=2000), 400),
        Hostile("png_zero_width", png_by_hand(0, 10, rows=b""), 400),
        Hostile("jpeg_truncated", good_jpeg[: len(good_jpeg) // 2], 400),
        Hostile("jpeg_soi_only", b"\xff\xd8\xff", 400),
        Hostile("gif_truncated", _save(_noise((32, 32)).convert("P"), "GIF")[:40], 400),
        Hostile("webp_truncated", _save(_noise((32, 32)), "WEBP")[:30], 400),
        Hostile("tiff_truncated", _save(_noise((32, 32)), "TIFF")[:60], 400),
        Hostile("bmp_header_only", _save(_noise((8, 8)), "BMP")[:20], 400),
        # --- polyglots and disguises ------------------------------------------------------------------------------
        Hostile("png_with_zip_appended", good_png + b"PK\x03\x04" + b"\0" * 26 + b"evil.sh", 200),
        Hostile("jpeg_with_html_appended", good_jpeg + b"<html><script>alert(1)</script></html>", 200),
        Hostile("gif_js_polyglot", b"GIF89a/*\x00\x00\x00\x00*/=1;alert(1);//" + b"\0" * 16, 400),
        Hostile("html_behind_jpeg_magic", b"\xff\xd8\xff<html><body>hi</body></html>", 400),
        Hostile("svg_as_image", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', 415),
        Hostile("pdf", b"%PDF-1.7\n1 0 obj<<>>endobj\n%%EOF\n", 415),
        Hostile("heic_like", b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 32, 415),
        Hostile("ico_not_allowed", _save(Image.new("RGB", (16, 16)), "ICO"), 415),
        # --- modes -------------------------------------------------------------------------------------------------
        Hostile("jpeg_cmyk", _save(_noise((40, 30)).convert("CMYK"), "JPEG", quality=90), 200),
        Hostile("png_grey16", _save(Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50), "PNG"),
                200),
        Hostile("png_rgb16_by_hand", _rgb16_png(), 200),
        Hostile("png_palette_transparency", _save(palette, "PNG", transparency=0), 200),
        Hostile("png_la", _save(_noise((20, 10)).convert("LA"), "PNG"), 200),
        Hostile("bmp_bilevel", _save(_noise((20, 10)).convert("1"), "BMP"), 200),
        Hostile("tiff_float32", _save(Image.fromarray(np.linspace(-1e6, 1e6, 200, dtype=np.float32).reshape(10, 20),
                                                      mode="F"), "TIFF"), 200),
        Hostile("tiff_nan_float", _save(Image.fromarray(np.full((10, 20), np.nan, np.float32), mode="F"), "TIFF"),
                200),
        Hostile("one_pixel_png", _save(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), 200),
        Hostile("extreme_aspect_png", _save(Image.new("L", (20_000, 1), 9), "PNG"), 200),
        # --- multi-frame -------------------------------------------------------------------------------------------
        Hostile("gif_animated_300_frames", _save(_frames(1)[0].convert("P"), "GIF", save_all=True,
                                                 append_images=[f.convert("P") for f in _frames(300)[1:]]), 200),
        Hostile("apng_animated", _save(_frames(1)[0], "PNG", save_all=True, append_images=_frames(5)[1:]), 200),
        Hostile("webp_animated", _save(_frames(1)[0], "WEBP", save_all=True, append_images=_frames(5)[1:]), 200),
        Hostile("tiff_multipage", _tiff_pages(5), 200),
    ]
    return tuple(items)


def _tiff_declaring(width: int, height: int) -> bytes:
    """A little-endian TIFF whose IFD declares width x height with one tiny strip."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 16)]
    ifd_offset = 8 + 16
    head = b"II*\x00" + struct.pack("<I", ifd_offset) + b"\0" * 16
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<HI", value, 0)[:4] if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, count) + packed
    return head + ifd + struct.pack("<I", 0)


def by_name(name: str) -> Hostile:
    return next(h for h in corpus() if h.name == name)
