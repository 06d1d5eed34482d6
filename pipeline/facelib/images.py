"""Decode untrusted image bytes into bounded BGR arrays for face detection.

The format comes from magic bytes, never from the server's Content-Type, and
only the five plugins we sniff for are ever handed the data. The pixel count
is checked from the header before any pixel is decoded, so a 20000x20000 PNG
of a few kilobytes costs nothing. JPEGs are decoded at 1/2, 1/4 or 1/8 scale
by libjpeg (Image.draft) when the detector needs far fewer pixels.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import (
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    WebPImagePlugin,
)

from pipeline.errors import PoisonRecord
from pipeline.facelib.geometry import fit_scale, fitted_size

logger = logging.getLogger(__name__)

# Calling the plugin classes directly skips Image.open's probing of every
# other format and its global MAX_IMAGE_PIXELS check; we apply our own cap.
_OPENERS: dict[str, type[ImageFile.ImageFile]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
}
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
# What a truncated or malformed file raises from PIL's parsers and decoders.
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees


@dataclass(frozen=True)
class DecodePolicy:
    """Limits for decoding; max_side=0 keeps full resolution."""

    max_pixels: int = 40_000_000
    max_side: int = 640


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded, upright, possibly downscaled image."""

    bgr: np.ndarray  # uint8, (H, W, 3)
    scale: float  # original pixels per decoded pixel (>= 1.0)
    original_size: tuple[int, int]  # (width, height) of the upright original


def sniff_format(data: bytes) -> str | None:
    """The image format named by data's magic bytes, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and len(data) >= 18 and struct.unpack_from("<I", data, 14)[0] in _BMP_HEADER_SIZES:
        return "BMP"
    return None


def _describe_prefix(data: bytes) -> str:
    """A short human guess at what non-image bytes are, for error messages."""
    if not data:
        return "nothing (empty body)"
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        kind = "<html>"
    elif head.startswith((b"<?xml", b"<svg")):
        kind = "XML/SVG (vector images are not supported)"
    elif data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        kind = "HEIC/AVIF (not supported)"
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        kind = "TIFF (not supported)"
    elif head.startswith((b"{", b"[")):
        kind = "JSON"
    else:
        text = data[:64].decode("utf-8", "replace")
        printable = all(c.isprintable() or c.isspace() for c in text.replace("\ufffd", ""))
        kind = "text" if printable and text.count("\ufffd") <= 1 else "unknown binary data"
    return f"{kind} ({data[:16]!r})"


def decode_image(data: bytes, policy: DecodePolicy = DecodePolicy()) -> DecodedImage:
    """Decode image bytes to an upright BGR array; raise PoisonRecord for anything unusable."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some import flipped PIL's global; truncated uploads would decode as grey garbage.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; FaceMatch requires it False")
    fmt = sniff_format(data)
    if fmt is None:
        raise PoisonRecord(
            "not_an_image",
            f"expected JPEG, PNG, WebP, GIF or BMP, but the first bytes look like {_describe_prefix(data)}",
        )
    try:
        with _OPENERS[fmt](io.BytesIO(data)) as im:  # parses the header only
            _check_pixels(im.size, policy.max_pixels)
            return _decode(im, fmt, policy)
    except Image.DecompressionBombError as exc:  # PIL's own checks inside some plugins
        raise PoisonRecord("image_too_many_pixels", f"{fmt} image: {exc}") from None
    except _CORRUPT as exc:
        raise PoisonRecord("image_corrupt", f"{fmt} data ({len(data)} bytes) is truncated or corrupt: {exc}") from None


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise PoisonRecord("image_corrupt", f"image header declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise PoisonRecord(
            "image_too_many_pixels",
            f"{width}x{height} = {width * height} pixels exceeds the cap of {max_pixels} pixels",
        )


def _decode(im: ImageFile.ImageFile, fmt: str, policy: DecodePolicy) -> DecodedImage:
    """Load pixels (reduced early where possible), orient, convert to BGR and fit max_side."""
    width, height = im.size
    if fmt == "JPEG" and policy.max_side and max(width, height) > 2 * policy.max_side:
        ratio = policy.max_side / max(width, height)
        # libjpeg picks the largest 1/2^k scale that still covers this size.
        im.draft("RGB", (math.ceil(width * ratio), math.ceil(height * ratio)))
    im.load()  # raises OSError on truncation because LOAD_TRUNCATED_IMAGES is False
    orientation = _orientation(im)
    if orientation in _SWAPS_AXES:
        width, height = height, width
    small = _reduce(_normalize_mode(im), policy.max_side)
    if orientation != 1:
        # Rotating after the reduction copies a small image, not the full-size one.
        small.getexif()[ExifTags.Base.Orientation] = orientation
        ImageOps.exif_transpose(small, in_place=True)
    bgr = cv2.cvtColor(np.asarray(_to_rgb(small)), cv2.COLOR_RGB2BGR)
    scale = fit_scale(width, height, policy.max_side)
    bgr = resize_to(bgr, fitted_size(width, height, scale))
    return DecodedImage(bgr=np.ascontiguousarray(bgr), scale=scale, original_size=(width, height))


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8); malformed EXIF counts as upright rather than failing the photo."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except _CORRUPT as exc:
        logger.debug("ignoring unreadable EXIF: %s", exc)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _normalize_mode(im: Image.Image) -> Image.Image:
    """Bring exotic modes (palette, CMYK, 16-bit...) to L/LA/RGB/RGBA, keeping transparency."""
    if im.mode in ("L", "LA", "RGB", "RGBA"):
        return im
    has_alpha = im.mode in ("PA", "La", "RGBa") or "transparency" in im.info
    return im.convert("RGBA" if has_alpha else "RGB")


def _reduce(im: Image.Image, max_side: int) -> Image.Image:
    """Box-reduce by an integer factor while staying at or above max_side (cheap and alias-free)."""
    factor = max(im.size) // max_side if max_side else 1
    return im.reduce(factor) if factor >= 2 else im


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (transparent pixels hold arbitrary colors)."""
    if im.mode in ("RGBA", "LA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def resize_to(bgr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The image at (width, height), area-averaged; the same array when it already has that size."""
    if (bgr.shape[1], bgr.shape[0]) == size:
        return bgr
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)


def fit_to_side(bgr: np.ndarray, max_side: int) -> np.ndarray:
    """A decoded BGR image downscaled so its long side is at most max_side."""
    height, width = bgr.shape[:2]
    return resize_to(bgr, fitted_size(width, height, fit_scale(width, height, max_side)))
