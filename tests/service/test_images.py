"""service.engine.images: decode, convert, resize as the contract says; limits on bytes, pixels."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from service.engine.images import DEFAULT_IMAGE_FORMATS, decode_image, readable_formats
from service.errors import InvalidInput
from service.repository.disk import Preprocessing
from tests.service.conftest import encode_image

GRAY = Preprocessing(height=28, width=28, channels=1, color_mode="L")
RGB = Preprocessing(height=32, width=24, channels=3, color_mode="RGB")
LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1 << 22}


def contract_reference(data: bytes, p: Preprocessing) -> np.ndarray:
    """docs/model-repository.md, written out independently of service.engine.images."""
    import io

    image = Image.open(io.BytesIO(data)).convert(p.color_mode)
    if image.size != (p.width, p.height):
        image = image.resize((p.width, p.height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def test_gray_png_of_the_right_size_is_taken_as_is() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    decoded = decode_image(encode_image(pixels), GRAY, **LIMITS)
    assert decoded.shape == (1, 28, 28) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[0], pixels)


@pytest.mark.parametrize("fmt", DEFAULT_IMAGE_FORMATS)
def test_colour_image_is_converted_and_resized_like_training(fmt: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    data = encode_image(pixels, fmt)
    np.testing.assert_array_equal(
        decode_image(data, GRAY, **LIMITS), contract_reference(data, GRAY)
    )
    rgb = decode_image(data, RGB, **LIMITS)
    assert rgb.shape == (3, 32, 24)
    np.testing.assert_array_equal(rgb, contract_reference(data, RGB))


def test_garbage_is_refused_with_the_reason() -> None:
    with pytest.raises(
        InvalidInput,
        match=r"^cannot decode the image \(23 bytes\): not an image in an accepted format; "
        r"accepted: PNG, JPEG, BMP, GIF, TIFF, WEBP$",
    ):
        decode_image(b"definitely not an image", GRAY, **LIMITS)
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"", GRAY, **LIMITS)


def test_truncated_image_is_refused() -> None:
    data = encode_image(np.zeros((64, 64, 3), dtype=np.uint8), "JPEG")
    with pytest.raises(InvalidInput, match="cannot decode"):
        decode_image(data[: len(data) // 2], GRAY, **LIMITS)


def test_oversized_payload_is_refused_before_decoding() -> None:
    data = encode_image(np.zeros((28, 28), dtype=np.uint8))
    with pytest.raises(InvalidInput, match=f"{len(data)} bytes; the limit is 10 bytes"):
        decode_image(data, GRAY, max_bytes=10, max_pixels=1 << 22)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG claiming a huge size: what a decompression bomb looks like to open()."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_pixel_limit_is_checked_before_pixels_are_decoded() -> None:
    # 81 M pixels in under 100 bytes: over max_pixels, but under Pillow's own decompression-bomb
    # threshold (Image.MAX_IMAGE_PIXELS), so only the project's check can refuse it.
    data = png_header_only(9000, 9000)
    assert len(data) < 100
    assert Image.MAX_IMAGE_PIXELS > 9000 * 9000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail here
        with pytest.raises(
            InvalidInput, match=r"^the image is 9000x9000 = 81000000 pixels; the limit is 4194304"
        ):
            decode_image(data, GRAY, **LIMITS)
    with pytest.raises(InvalidInput, match="5000x5000 = 25000000 pixels; the limit is 4194304"):
        decode_image(png_header_only(5000, 5000), GRAY, **LIMITS)


@pytest.mark.parametrize("fmt", ["EPS", "PCX", "TGA", "PPM"])
def test_formats_outside_the_allowed_ones_are_refused_unread(fmt: str) -> None:
    # Pillow reads each of these (EPS up to its Ghostscript call); none is accepted by default.
    assert fmt in readable_formats()
    data = encode_image(np.zeros((28, 28), dtype=np.uint8), fmt)
    with pytest.raises(InvalidInput) as caught:
        decode_image(data, GRAY, **LIMITS)
    assert str(caught.value) == (
        f"cannot decode the image ({len(data)} bytes): not an image in an accepted format; "
        "accepted: PNG, JPEG, BMP, GIF, TIFF, WEBP"
    )


def test_the_allowed_formats_are_a_parameter() -> None:
    jpeg = encode_image(np.zeros((28, 28), dtype=np.uint8), "JPEG")
    with pytest.raises(InvalidInput, match=r"accepted: PNG$"):
        decode_image(jpeg, GRAY, **LIMITS, formats=("PNG",))
    ppm = encode_image(np.full((28, 28), 9, dtype=np.uint8), "PPM")
    assert decode_image(ppm, GRAY, **LIMITS, formats=("PNG", "PPM"))[0, 0, 0] == 9
