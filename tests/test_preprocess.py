"""Image decoding (modes, EXIF, refusals) and the resize policies with their geometry."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.preprocess import DEFAULT_BACKGROUND, ImageError, load_image, to_pixels


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


# --- conversions -----------------------------------------------------------------------------------------------------
def test_16bit_tiff_scaled_by_actual_range():
    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 50 + 1000)  # 1000..4150: a 12-bit sensor in 16 bits
    data = _encode(Image.fromarray(arr), "TIFF")
    out = _rgb(load_image(data))
    assert out.shape == (8, 8, 3)
    assert out.min() == 0 and out.max() == 255  # stretched by the real range, not divided by 65535 (all black)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    flat = out[..., 0].ravel()
    assert (np.diff(flat) >= 0).all()  # monotonic: order of intensities preserved


def test_16bit_constant_image_uses_nominal_range():
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    assert _rgb(load_image(_encode(Image.fromarray(arr), "PNG")))[0, 0, 0] == 255


def test_32bit_float_tiff():
    arr = np.linspace(-1.0, 3.0, 16, dtype=np.float32).reshape(4, 4)
    out = _rgb(load_image(_encode(Image.fromarray(arr, mode="F"), "TIFF")))
    assert out.min() == 0 and out.max() == 255


def test_cmyk_jpeg():
    data = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    px = _rgb(load_image(data))[8, 8]
    assert px[0] > 240 and px[1] < 15 and px[2] < 15  # cyan-free, full magenta + yellow = red


def test_palette_png():
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * (3 * 254))
    assert tuple(_rgb(load_image(_encode(im, "PNG")))[0, 0]) == (10, 200, 30)


def test_palette_png_with_transparency_uses_background():
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * (3 * 254))
    im.putpixel((0, 0), 0)
    out = _rgb(load_image(_encode(im, "PNG", transparency=0)))
    assert tuple(out[0, 0]) == DEFAULT_BACKGROUND and tuple(out[1, 1]) == (10, 200, 30)


def test_rgba_and_la_composited_on_neutral_background():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent
    rgba[1, 0] = (255, 255, 255, 128)  # half white
    out = _rgb(load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == DEFAULT_BACKGROUND
    assert all(abs(int(out[1, 0, c]) - (DEFAULT_BACKGROUND[c] + 255) / 2) <= 2 for c in range(3))
    la = Image.fromarray(np.array([[[200, 0]]], dtype=np.uint8), "LA")
    assert tuple(_rgb(load_image(_encode(la, "PNG")))[0, 0]) == DEFAULT_BACKGROUND
    out = _rgb(load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), background=(0, 0, 0)))
    assert tuple(out[0, 1]) == (0, 0, 0)


def test_grayscale_and_bilevel():
    g = _rgb(load_image(_encode(Image.new("L", (3, 3), 77), "PNG")))
    assert (g == 77).all()
    b = _rgb(load_image(_encode(Image.new("1", (3, 3), 1), "BMP")))
    assert (b == 255).all()


def test_exif_rotation_applied():
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, :5] = (255, 0, 0)  # red stripe on the left of a 20 x 10 (W x H) image
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(_encode(im, "JPEG", exif=exif, quality=95))
    assert out.size == (10, 20)  # now portrait
    a = _rgb(out)
    assert a[1, 5, 0] > 200 and a[1, 5, 1] < 60  # the left stripe is now at the top
    assert a[-2, 5, 0] < 60


def test_webp_bmp_gif_accepted_gif_first_frame():
    for fmt in ("WEBP", "BMP"):
        options = {"lossless": True} if fmt == "WEBP" else {}
        assert load_image(_encode(Image.new("RGB", (5, 4), (0, 128, 255)), fmt, **options)).size == (5, 4)
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    px = _rgb(load_image(buf.getvalue()))[3, 3]
    assert px[0] > 200 and px[2] < 50


def test_path_input(tmp_path):
    p = tmp_path / "x.png"
    Image.new("RGB", (7, 3), (1, 2, 3)).save(p)
    assert load_image(p).size == (7, 3)
    assert load_image(str(p)).size == (7, 3)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")


# --- refusals -----------------------------------------------------------------------------------------------------------
def test_truncated_file_refused():
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG", quality=95)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])
    png = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(ImageError):
        load_image(png[: len(png) // 2])


def test_zero_bytes_refused(tmp_path):
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(b"")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(empty)


def test_text_file_refused():
    with pytest.raises(ImageError, match="accepted format"):
        load_image(b"hello, this is not an image\n" * 10)
    assert issubclass(ImageError, ValueError)


def test_unsupported_format_refused():
    with pytest.raises(ImageError, match="accepted format"):
        load_image(_encode(Image.new("RGB", (4, 4)), "PPM"))


def test_pixel_bomb_refused():
    data = _encode(Image.new("1", (4000, 3000)), "PNG")  # tiny file, 12 MP
    assert len(data) < 100_000
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data, max_pixels=10_000_000)
    assert load_image(data, max_pixels=12_000_000).size == (4000, 3000)


# --- resize policies -------------------------------------------------------------------------------------------------------
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def test_letterbox_keeps_everything_and_pads_with_mean():
    im = Image.new("RGB", (300, 150), (255, 255, 255))
    px, (g,) = to_pixels([im], 240, MEAN, STD, "letterbox")
    assert px.shape == (1, 3, 240, 240)
    assert g.content == (0.0, 60.0, 240.0, 180.0) and g.source == (0.0, 0.0, 300.0, 150.0)
    assert torch.all(px[0, :, :60] == 0) and torch.all(px[0, :, 180:] == 0)  # mean colour
    white = (1.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(px[0, :, 120, 120], white, atol=1e-5, rtol=0)


def test_stretch_and_center_crop():
    im = Image.new("RGB", (300, 150), (0, 0, 0))
    arr = np.asarray(im).copy()
    arr[:, :75] = 255  # left quarter white: outside the centre square
    im = Image.fromarray(arr)
    px, (g,) = to_pixels([im], 64, MEAN, STD, "center_crop")
    assert g.source == (75.0, 0.0, 225.0, 150.0)
    black = (0.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(px[0, :, 32, 5], black, atol=0.05, rtol=0)
    px, (g,) = to_pixels([im], 64, MEAN, STD, "stretch")
    assert g.content == (0.0, 0.0, 64.0, 64.0)
    assert px[0, 0, 32, 2] > 1.5  # the white quarter is now the left 16 columns
    with pytest.raises(ValueError):
        to_pixels([im], 64, MEAN, STD, "zoom")  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["letterbox", "stretch", "center_crop"])
@pytest.mark.parametrize("size", [(300, 150), (150, 300), (97, 61)])
def test_geometry_maps_back_to_original_size(policy, size):
    w, h = size
    _, (g,) = to_pixels([Image.new("RGB", size)], 240, MEAN, STD, policy)
    for shape in ((15, 15), (240, 240)):
        out = g.to_original(torch.full(shape, 0.7))
        assert out.shape == (h, w) and out.dtype == np.float32
        if policy != "center_crop":
            assert np.allclose(out, 0.7)


def test_geometry_roundtrip_of_image_content():
    """Send an image through the letterbox, treat the first model channel as a map, map it back: the original
    image's structure (a bright square) comes back at the same place."""
    arr = np.zeros((90, 200, 3), dtype=np.uint8)
    arr[30:60, 140:170] = 255
    px, (g,) = to_pixels([Image.fromarray(arr)], 240, MEAN, STD, "letterbox")
    back = g.to_original(px[0, 0])
    assert back.shape == (90, 200)
    ys, xs = np.nonzero(back > back.max() / 2)
    assert abs(ys.min() - 30) <= 2 and abs(ys.max() - 59) <= 2 and abs(xs.min() - 140) <= 2 and abs(xs.max() - 169) <= 2


def test_center_crop_fill_outside():
    _, (g,) = to_pixels([Image.new("RGB", (300, 150))], 240, MEAN, STD, "center_crop")
    out = g.to_original(np.ones((15, 15), np.float32), fill=-1.0)
    assert (out[:, :75] == -1).all() and (out[:, 225:] == -1).all() and np.allclose(out[:, 75:225], 1.0)


# --- reduced decoding (the service's pixel budget) -------------------------------------------------------------------
def test_reduction_factor_is_the_smallest_that_fits():
    from service.preprocess import reduction_factor

    assert reduction_factor(640, 480, 4_000_000) == 1 and reduction_factor(7000, 7000, None) == 1
    assert reduction_factor(7000, 7000, 4_000_000) == 4  # 1750 x 1750 = 3.06 MP; 3 would give 5.4 MP
    for w, h, limit in [(8000, 6000, 4_000_000), (20_000, 30, 300_000), (4001, 4001, 4_000_000), (9999, 17, 1000)]:
        f = reduction_factor(w, h, limit)
        assert -(-w // f) * -(-h // f) <= limit
        assert f == 1 or -(-w // (f - 1)) * -(-h // (f - 1)) > limit


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("I;16", "PNG"), ("P", "PNG"),
                                       ("1", "BMP"), ("RGBA", "WEBP"), ("CMYK", "JPEG"), ("F", "TIFF")])
def test_decode_image_reduces_large_images_of_every_mode_like_a_box_average(mode, fmt):
    from service.preprocess import decode_image

    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((1600, 1200), Image.NEAREST)
    if mode == "I;16":
        im = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 200)
    elif mode == "F":
        im = Image.fromarray(np.asarray(base.convert("L")).astype(np.float32))
    else:
        im = base.convert(mode)
    data = _encode(im, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    dec = decode_image(data, max_decoded_pixels=130_000)
    assert (dec.width, dec.height) == (1600, 1200) and dec.reduced and dec.format == fmt
    assert dec.image.mode == "RGB" and dec.image.size == (400, 300)  # factor 4: 400 x 300 = 120,000 pixels
    full = load_image(data).resize((400, 300), Image.BOX)
    diff = np.abs(_rgb(dec.image) - _rgb(full))
    assert diff.mean() < 8, diff.mean()  # the same picture (JPEG's DCT scaling differs a little)
    same = decode_image(data, max_decoded_pixels=2_000_000)  # within the limit: exactly load_image
    assert not same.reduced and np.array_equal(_rgb(same.image), _rgb(load_image(data)))


def test_decode_image_reduced_keeps_exif_orientation_and_reports_the_upright_size():
    from service.preprocess import decode_image

    arr = np.zeros((400, 800, 3), dtype=np.uint8)
    arr[:, :200] = (255, 0, 0)  # red band on the left of an 800 x 400 image
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display: upright it is 400 x 800 with the band on top
    for fmt in ("JPEG", "PNG", "TIFF"):
        dec = decode_image(_encode(Image.fromarray(arr), fmt, exif=exif), max_decoded_pixels=30_000)
        assert (dec.width, dec.height) == (400, 800), fmt
        assert dec.image.size == (100, 200), fmt
        a = _rgb(dec.image)
        assert a[5, 50, 0] > 200 and a[-5, 50, 0] < 60, fmt


def test_decode_image_errors_are_image_errors():
    from service.preprocess import decode_image, image_size

    from .hostile_images import corpus

    for item in corpus():
        if item.expect == 200:
            dec = decode_image(item.data, max_decoded_pixels=4_000_000)
            assert dec.image.mode == "RGB" and dec.image.width * dec.image.height <= 4_000_000, item.name
            assert image_size(item.data) == (dec.width, dec.height) or dec.reduced is False, item.name
        else:
            with pytest.raises(ImageError):
                decode_image(item.data, max_decoded_pixels=4_000_000)
