"""Unit tests for lorapipe.images: safe decoding, normalisation to RGB, aspect buckets."""

from __future__ import annotations

import io
import math
import struct
import zlib
from importlib import metadata

import numpy as np
import PIL
import pytest
from PIL import Image

from lorapipe.images import (
    Bucket,
    ImageRejected,
    load_rgb,
    make_buckets,
    nearest_bucket,
    parse_colour,
    pil_identity,
    resize_crop,
)

GREEN = parse_colour("#00ff00")
BIG = 10**8


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    """Encode ``img`` in memory."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    """A random RGB image (incompressible, so truncation always cuts pixel data)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def rejected_code(data: bytes, max_pixels: int = BIG) -> str:
    """The reason code load_rgb rejects ``data`` with (fails the test if it is accepted)."""
    with pytest.raises(ImageRejected) as info:
        load_rgb(data, max_pixels=max_pixels)
    assert info.value.message
    return info.value.code


def near(a, b, tol: int = 8) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# --- bad files -------------------------------------------------------------------------------


def test_empty_file_is_rejected_as_empty():
    """Zero bytes: code ``empty``."""
    assert rejected_code(b"") == "empty"


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    """A text file renamed to .jpg: code ``not_an_image``."""
    path = tmp_path / "notes.jpg"
    path.write_text("just some notes, not a picture\n" * 20)
    assert rejected_code(path.read_bytes()) == "not_an_image"


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.95])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_rejected_not_padded(fmt, fraction):
    """A JPEG or PNG cut short is ``truncated``, never silently padded with grey."""
    data = encode(noise(), fmt)
    assert rejected_code(data[: int(len(data) * fraction)]) == "truncated"


def test_progressive_jpeg_cut_short_is_truncated():
    """Progressive JPEGs decode in passes; a cut one is still ``truncated``."""
    data = encode(noise(), "JPEG", progressive=True)
    assert rejected_code(data[: len(data) // 2]) == "truncated"


def test_demo_dataset_truncated_jpeg_is_rejected(demo_images):
    """The fixture's deliberately truncated JPEG is rejected as truncated."""
    assert rejected_code((demo_images / "broken/truncated.jpg").read_bytes()) == "truncated"


def test_corrupt_bytes_inside_png_are_rejected():
    """Overwritten bytes in the middle of a PNG's pixel data are rejected, not decoded."""
    data = bytearray(encode(noise(), "PNG"))
    mid = len(data) // 2
    data[mid : mid + 32] = bytes(32)
    assert rejected_code(bytes(data)) in ("corrupt", "truncated")


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zeros: tiny on disk, 400 MB of pixels once decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    rows = bytes(1 + (width + 7) // 8) * height  # filter byte 0 + packed bits, per row
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 1))
            + chunk(b"IEND", b""))


def test_decompression_bomb_rejected_before_decoding():
    """A small file declaring 20000x20000 pixels is ``too_large`` (checked before decoding)."""
    data = png_bomb(20000, 20000)
    assert len(data) < 500_000
    with pytest.raises(ImageRejected, match="400000000") as info:
        load_rgb(data, max_pixels=10_000_000)
    assert info.value.code == "too_large"
    assert rejected_code(data, max_pixels=399_999_999) == "too_large"
    assert load_rgb(png_bomb(200, 100), max_pixels=BIG).size == (200, 100)  # the file is valid


def test_max_pixels_is_the_limit_both_ways(monkeypatch):
    """max_pixels decides alone: a lower one rejects, a higher one than Pillow's limit accepts.

    Pillow's own bomb limit (Image.MAX_IMAGE_PIXELS) is lowered here to stand in for its default
    89 Mpx, which is below lorapipe's default max_pixels; it must be restored after each call.
    """
    data = encode(noise(40, 40), "PNG")  # 1600 pixels
    assert rejected_code(data, max_pixels=1599) == "too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_rgb(data, max_pixels=1600).size == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == 1000


# --- odd but valid images ---------------------------------------------------------------------


def test_exif_orientation_6_is_applied():
    """EXIF orientation 6 (rotate 90° clockwise): displayed size and pixels are rotated."""
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 16, 16))  # blue block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_rgb(encode(img, "JPEG", quality=95, exif=exif.tobytes()), max_pixels=BIG)
    assert out.size == (32, 64)
    assert near(out.getpixel((28, 4)), (0, 0, 255))  # now top-right
    assert near(out.getpixel((4, 4)), (255, 0, 0))
    assert near(out.getpixel((28, 60)), (255, 0, 0))


def test_cmyk_jpeg_becomes_rgb():
    """A CMYK JPEG comes back as RGB with the right colour (C=0 M=255 Y=255 K=0 is red)."""
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    out = load_rgb(data, max_pixels=BIG)
    assert out.mode == "RGB"
    assert near(out.getpixel((8, 8)), (255, 0, 0))


def test_palette_png_with_transparency_is_composited_on_background():
    """Palette + tRNS: the transparent index shows the background, opaque ones their colour."""
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((3, 3), 1)
    out = load_rgb(encode(img, "PNG", transparency=0), max_pixels=BIG, background=GREEN)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0, 255, 0)
    assert out.getpixel((3, 3)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_png_colour_key_transparency_is_composited(mode):
    """RGB/L PNGs with a tRNS colour key: pixels of that colour show the background."""
    key = (200, 10, 10) if mode == "RGB" else 200
    other = (0, 0, 0) if mode == "RGB" else 0
    img = Image.new(mode, (8, 8), key)
    img.putpixel((5, 5), other)
    out = load_rgb(encode(img, "PNG", transparency=key), max_pixels=BIG, background=GREEN)
    assert out.getpixel((0, 0)) == (0, 255, 0)
    assert out.getpixel((5, 5)) == (0, 0, 0)


def test_la_and_rgba_are_composited_on_background():
    """LA and RGBA: alpha 0 gives the background, alpha 255 the colour, 128 a blend."""
    la = Image.new("LA", (8, 8), (200, 0))
    la.putpixel((1, 1), (200, 255))
    out = load_rgb(encode(la, "PNG"), max_pixels=BIG, background=GREEN)
    assert out.getpixel((0, 0)) == (0, 255, 0)
    assert out.getpixel((1, 1)) == (200, 200, 200)

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((2, 2), (255, 0, 0, 255))
    rgba.putpixel((3, 3), (255, 0, 0, 128))
    out = load_rgb(encode(rgba, "PNG"), max_pixels=BIG, background=GREEN)
    assert out.getpixel((0, 0)) == (0, 255, 0)
    assert out.getpixel((2, 2)) == (255, 0, 0)
    assert near(out.getpixel((3, 3)), (128, 127, 0), tol=2)


def test_16bit_grayscale_is_scaled_not_clipped():
    """A 16-bit grey of 65535/2 becomes ~127, not white; full scale becomes 255."""
    arr = np.full((8, 8), 65535 // 2, np.uint16)
    arr[0, 0] = 65535
    src = Image.fromarray(arr)
    data = encode(src, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = load_rgb(data, max_pixels=BIG)
    assert out.mode == "RGB"
    assert out.getpixel((4, 4)) in ((127, 127, 127), (128, 128, 128))
    assert out.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_gives_first_frame(fmt):
    """Animated GIF/APNG/WebP: the first frame's content, at its size."""
    from PIL import features

    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this PIL build has no WebP (pillow-simd built without libwebp-dev)")
    frames = [Image.new("RGB", (12, 10), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = load_rgb(data, max_pixels=BIG)
    assert out.size == (12, 10)
    assert near(out.getpixel((5, 5)), (255, 0, 0), tol=2)


def test_result_is_fully_loaded_rgb_independent_of_input_buffer():
    """The returned image is loaded: it stays usable after the source bytes are gone."""
    data = bytearray(encode(noise(), "PNG"))
    out = load_rgb(bytes(data), max_pixels=BIG)
    del data
    assert out.mode == "RGB"
    assert np.asarray(out).shape == (48, 64, 3)


def test_parse_colour():
    """'#rrggbb' with or without '#', any case."""
    assert parse_colour("#00ff00") == (0, 255, 0)
    assert parse_colour("FFa010") == (255, 160, 16)


def test_pil_identity_names_the_active_library():
    """pil_identity names the distribution whose version is that of the imported PIL.

    Both pillow and pillow-simd can be listed as installed while only one owns PIL/; the cache
    keys must name the one actually in use.
    """
    ident = pil_identity()
    name, version = ident.split(" ", 1)
    assert version == PIL.__version__
    if name != "PIL":
        assert metadata.version(name) == PIL.__version__


# --- buckets and resizing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolution", "step", "square"),
    [(512, 64, 512), (64, 8, 64), (96, 16, 96), (1024, 32, 1024), (100, 16, 96), (520, 64, 512)],
)
def test_buckets_are_step_multiples_within_area_and_include_square(resolution, step, square):
    """Every bucket: sides multiple of step, area ≤ resolution², aspect ≤ 2; a square present.

    When resolution is not a multiple of step the square is rounded down to one (as kohya does).
    """
    buckets = make_buckets(resolution, step)
    assert Bucket(square, square) in buckets
    assert len(set(buckets)) == len(buckets)
    for b in buckets:
        assert b.width % step == 0 and b.height % step == 0, b
        assert b.width * b.height <= resolution * resolution, b
        assert max(b.aspect, 1 / b.aspect) <= 2.0, b
    assert any(b.aspect > 1 for b in buckets) and any(b.aspect < 1 for b in buckets)
    assert [b.aspect for b in buckets] == sorted(b.aspect for b in buckets)


def test_nearest_bucket_follows_aspect_ratio():
    """A 2:1 image gets the widest landscape bucket, 1:2 the tallest portrait, 1:1 the square."""
    buckets = make_buckets(512, 64)
    wide = nearest_bucket(2000, 1000, buckets)
    tall = nearest_bucket(1000, 2000, buckets)
    assert wide.width > wide.height and tall.height > tall.width
    assert (wide.width, wide.height) == (tall.height, tall.width)
    best = min(abs(math.log(b.aspect) - math.log(2)) for b in buckets)
    assert abs(math.log(wide.aspect) - math.log(2)) == best
    assert nearest_bucket(300, 300, buckets) == Bucket(512, 512)


def test_resize_crop_covers_bucket_and_centres_the_crop():
    """resize_crop returns exactly the bucket size; the crop offset is centred on the long side."""
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # white centre third
    out, (left, top) = resize_crop(img, Bucket(64, 64))
    assert out.size == (64, 64)
    assert top == 0 and left == (192 - 64) // 2
    assert out.getpixel((32, 32)) == (255, 255, 255)
    same, crop = resize_crop(Image.new("RGB", (64, 64)), Bucket(64, 64))
    assert same.size == (64, 64) and crop == (0, 0)


def test_buckets_below_one_step_say_why_not_zero_division():
    """resolution < bucket_step was a ZeroDivisionError inside a shard job."""
    from lorapipe.images import make_buckets

    with pytest.raises(ValueError, match=r"resolution 32 is below bucket_step 64: no bucket fits"):
        make_buckets(32, 64)
