"""Safe image decoding, normalisation to RGB, and aspect-ratio buckets.

Everything here is pure Pillow (pillow-simd when the set-up built it); no torch. `load_rgb` is
the one way an image enters the pipeline: it decodes fully (so truncation is caught, never padded),
applies EXIF orientation, and turns every mode (CMYK, palette, alpha, 16-bit, animated) into RGB.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"}
)
# Never let Pillow pad a truncated file with grey: a truncated image is a rejected image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageRejected(Exception):
    """An image that cannot be used; ``code`` is a stable reason code for rejected.tsv."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def pil_identity() -> str:
    """Which imaging library is active, e.g. ``pillow-simd 12.1.1.post0`` or ``pillow 13.0.0``.

    Resized pixels differ between the two (±1 in ~0.5 % of values), so this is part of every cache
    key of resized images. Both distributions install the same ``PIL`` package, and a later
    ``pip install`` of Pillow can overwrite pillow-simd's files while both stay listed as installed,
    so the answer is the distribution whose version is that of the ``PIL`` actually imported.
    """
    from importlib import metadata

    import PIL

    active = PIL.__version__
    for dist in ("pillow-simd", "pillow"):
        try:
            if metadata.version(dist) == active:
                return f"{dist} {active}"
        except metadata.PackageNotFoundError:
            continue
    return f"PIL {active}"


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit single-channel images into 0..255 instead of clipping them to white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        img = img.convert("I")
        return img.point(lambda v: v / 257).convert("L")
    if img.mode == "I":
        lo, hi = img.getextrema()
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        return img.point(lambda v: v * scale).convert("L")
    if img.mode == "F":
        lo, hi = img.getextrema()
        scale = 255.0 / hi if hi > 1.0 else 255.0
        return img.point(lambda v: v * scale).convert("L")
    return img


def load_rgb(data: bytes, *, max_pixels: int, background: tuple[int, int, int] = (255, 255, 255)):
    """Decode ``data`` into an RGB image, or raise ImageRejected with a reason code.

    Args:
        data: the file's bytes.
        max_pixels: decompression-bomb limit (width * height).
        background: colour composited under transparent pixels.

    Returns:
        A fully loaded RGB ``PIL.Image`` in displayed orientation.
    """
    if not data:
        raise ImageRejected("empty", "file is empty (0 bytes)")
    # Pillow's own bomb check (warning above MAX_IMAGE_PIXELS, ~89 Mpx by default) would reject
    # images the configured max_pixels allows: make the configured limit the one Pillow uses.
    saved_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageRejected(
                    "too_large", f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}"
                )
            img.seek(0)  # animated images: first frame
            img.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected("too_large", f"decompression bomb: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise ImageRejected("too_large", f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageRejected("not_an_image", "not a recognised image format") from None
    except OSError as e:
        msg = str(e)
        code = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise ImageRejected(code, f"cannot decode: {msg}") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a rejected file, never a crash
        raise ImageRejected("corrupt", f"cannot decode: {type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block leaves the image as stored
        pass
    img = _to_8bit(img)
    if img.mode in ("1", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")  # PNG tRNS colour key: that colour is transparent
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        base = Image.new("RGB", img.size, background)
        base.paste(img, mask=img.getchannel("A"))
        img = base
    if img.mode != "RGB":
        img = img.convert("RGB")  # CMYK, L, YCbCr, 1, ...
    return img


def parse_colour(hex_colour: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` → (r, g, b)."""
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


@dataclass(frozen=True)
class Bucket:
    """A training resolution (pixels); both sides are multiples of the bucket step."""

    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[Bucket]:
    """Buckets of about ``resolution**2`` pixels, sides multiples of ``step``, aspect ≤ max_ratio.

    As in kohya's bucketing: for each width from small to large, the largest height that keeps the
    area within resolution², both rounded down to ``step``.
    """
    if step < 1 or resolution < step:
        raise ValueError(
            f"resolution {resolution} is below bucket_step {step}: no bucket fits "
            "(raise resolution or lower bucket_step)"
        )
    area = resolution * resolution
    side = resolution // step * step  # the square bucket, rounded down like kohya's
    out: set[Bucket] = {Bucket(side, side)}
    w = step
    while w <= resolution * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add(Bucket(w, h))
        w += step
    return sorted(out, key=lambda b: (b.aspect, b.width))


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest (in log space) to ``width / height``."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - target), -b.width * b.height))


def resize_crop(img, bucket: Bucket):
    """Resize ``img`` to cover ``bucket`` (LANCZOS), then center-crop to it.

    Returns:
        (image, (crop_left, crop_top)) — offsets in the resized image, which SDXL conditions on.
    """
    w, h = img.size
    scale = max(bucket.width / w, bucket.height / h)
    rw, rh = max(bucket.width, round(w * scale)), max(bucket.height, round(h * scale))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - bucket.width) // 2, (rh - bucket.height) // 2
    return img.crop((left, top, left + bucket.width, top + bucket.height)), (left, top)
