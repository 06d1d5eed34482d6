"""decode_image on images generated here: formats, orientation, downscaling, hostile inputs."""

from __future__ import annotations

import io
import resource
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.errors import PoisonRecord
from pipeline.facelib.geometry import map_box_to_original, map_landmarks_to_original
from pipeline.facelib.images import DecodePolicy, decode_image, sniff_format

RED_BGR = (0, 0, 255)
BLUE_BGR = (255, 0, 0)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def two_tone(width: int, height: int) -> Image.Image:
    """Red left half, blue right half: shows both BGR order and orientation."""
    img = Image.new("RGB", (width, height), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, width // 2, height))
    return img


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def one_color_png(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A 1-bit grey PNG built chunk by chunk, so a huge one never exists in memory uncompressed."""
    if idat is None:
        row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed bits
        packer = zlib.compressobj(9)
        rows_per_batch = max(1, (1 << 20) // len(row))
        parts = [packer.compress(row * min(rows_per_batch, height - y)) for y in range(0, height, rows_per_batch)]
        idat = b"".join(parts) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def assert_color(pixel: np.ndarray, bgr: tuple[int, int, int], tolerance: int = 12) -> None:
    assert np.all(np.abs(pixel.astype(int) - np.array(bgr)) <= tolerance), (pixel, bgr)


# --- ordinary photos ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True}), ("GIF", {}), ("BMP", {})],
)
def test_formats_decode_to_bgr(fmt: str, params: dict[str, object]) -> None:
    data = encode(two_tone(320, 240), fmt, **params)
    assert sniff_format(data) == fmt
    decoded = decode_image(data)
    assert decoded.bgr.dtype == np.uint8
    assert decoded.bgr.shape == (240, 320, 3)
    assert decoded.bgr.flags["C_CONTIGUOUS"]
    assert decoded.scale == 1.0
    assert decoded.original_size == (320, 240)
    assert_color(decoded.bgr[120, 40], RED_BGR)
    assert_color(decoded.bgr[120, 280], BLUE_BGR)


def test_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert_color(decode_image(buf.getvalue()).bgr[32, 32], RED_BGR)


def test_transparent_png_is_composited_on_white() -> None:
    img = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # fully transparent black
    img.paste((255, 0, 0, 255), (0, 0, 20, 20))
    decoded = decode_image(encode(img, "PNG"))
    assert_color(decoded.bgr[10, 5], RED_BGR, tolerance=0)
    assert_color(decoded.bgr[10, 35], (255, 255, 255), tolerance=0)


@pytest.mark.parametrize("size", [(300, 200), (1600, 1200)])
def test_exif_orientation_6_rotates_upright(size: tuple[int, int]) -> None:
    """Orientation 6: the stored landscape must be turned 90 degrees clockwise for display."""
    width, height = size
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(two_tone(width, height), "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(data)
    assert decoded.original_size == (height, width)  # upright: portrait
    rows, cols = decoded.bgr.shape[:2]
    assert rows > cols
    assert max(rows, cols) == min(640, width)
    # Clockwise rotation puts the stored left (red) half on top.
    assert_color(decoded.bgr[rows // 4, cols // 2], RED_BGR)
    assert_color(decoded.bgr[3 * rows // 4, cols // 2], BLUE_BGR)


def test_downscale_to_max_side_and_scale_factor() -> None:
    decoded = decode_image(encode(two_tone(2000, 1000), "PNG"))
    assert decoded.bgr.shape == (320, 640, 3)
    assert decoded.scale == pytest.approx(2000 / 640)
    assert decoded.original_size == (2000, 1000)
    full = decode_image(encode(two_tone(2000, 1000), "PNG"), DecodePolicy(max_side=0))
    assert full.bgr.shape == (1000, 2000, 3) and full.scale == 1.0


def test_boxes_map_back_to_original_coordinates_through_jpeg_draft() -> None:
    """A square drawn at known spot in a 12 MP JPEG is found at the same spot after mapping back."""
    img = Image.new("L", (4000, 3000), 0)
    img.paste(255, (2000, 1000, 2400, 1400))
    decoded = decode_image(encode(img.convert("RGB"), "JPEG", quality=90))
    assert decoded.bgr.shape == (480, 640, 3)
    assert decoded.scale == pytest.approx(6.25)
    ys, xs = np.nonzero(decoded.bgr[:, :, 0] > 128)
    box = (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())
    x, y, w, h = map_box_to_original(box, decoded.scale)
    assert (x, y, w, h) == pytest.approx((2000, 1000, 400, 400), abs=2 * decoded.scale)


def test_mapping_helpers() -> None:
    assert map_box_to_original((10, 20, 30, 40), 2.5) == (25.0, 50.0, 75.0, 100.0)
    assert map_landmarks_to_original((1, 2, 3, 4), 2.0) == (2.0, 4.0, 6.0, 8.0)
    assert map_landmarks_to_original(None, 2.0) is None


# --- hostile or broken input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "looks_like"),
    [
        (b"<!DOCTYPE html><html><body>Access denied</body></html>", "<html>"),
        (b'{"error": "expired token"}', "JSON"),
        (b"Bad gateway, please retry", "text"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (b"\x00\x01\x02\x03binary", "unknown binary data"),
        (b"", "empty body"),
    ],
)
def test_non_images_are_rejected_by_magic_bytes(data: bytes, looks_like: str) -> None:
    with pytest.raises(PoisonRecord) as err:
        decode_image(data)
    assert err.value.reason == "not_an_image"
    assert "first bytes look like" in str(err.value)
    assert looks_like in str(err.value)


def test_truncated_images_are_corrupt_not_silently_padded() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    jpeg = encode(two_tone(1600, 1200), "JPEG", quality=90)
    png = encode(two_tone(400, 300), "PNG")
    for data, policy in ((jpeg, DecodePolicy()), (jpeg, DecodePolicy(max_side=0)), (png, DecodePolicy())):
        with pytest.raises(PoisonRecord) as err:
            decode_image(data[: len(data) * 2 // 3], policy)
        assert err.value.reason == "image_corrupt"
        assert "truncated" in str(err.value)


def test_flipped_truncation_global_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(two_tone(32, 32), "PNG"))


def test_png_bomb_is_refused_from_the_header_without_allocating() -> None:
    bomb = one_color_png(20000, 20000)
    assert len(bomb) < 200_000  # 400 million pixels in a small file
    assert decode_image(one_color_png(64, 48)).bgr.shape == (48, 64, 3)  # the builder makes valid PNGs
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PoisonRecord) as err:
        decode_image(bomb)
    assert err.value.reason == "image_too_many_pixels"
    assert "20000x20000 = 400000000 pixels exceeds the cap of 40000000" in str(err.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50_000  # KiB


def test_declared_huge_headers_with_tiny_data_are_refused() -> None:
    png = one_color_png(20000, 20000, idat=zlib.compress(b"\x00" * 10))
    jpeg = bytearray(encode(two_tone(64, 48), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)  # height, width
    for data, size in ((png, "20000x20000"), (bytes(jpeg), "30000x30000")):
        with pytest.raises(PoisonRecord, match=f"{size} = ") as err:
            decode_image(data)
        assert err.value.reason == "image_too_many_pixels"


def test_pixel_cap_is_ours_not_pils_global() -> None:
    data = encode(two_tone(40, 40), "PNG")
    with pytest.raises(PoisonRecord, match="40x40 = 1600 pixels exceeds the cap of 1000") as err:
        decode_image(data, DecodePolicy(max_pixels=1000))
    assert err.value.reason == "image_too_many_pixels"
    assert decode_image(data, DecodePolicy(max_pixels=1600)).bgr.shape == (40, 40, 3)


def test_within_cap_header_with_missing_data_is_corrupt() -> None:
    with pytest.raises(PoisonRecord) as err:
        decode_image(one_color_png(2000, 2000, idat=zlib.compress(b"\x00" * 10)))
    assert err.value.reason == "image_corrupt"
