"""Encoded image -> model input row, exactly as training prepares images.

docs/model-repository.md: decode with Pillow, `convert(color_mode)`, resize to (width, height)
with the metadata's filter unless the size already matches, then uint8 [C, H, W]. The size is
checked against a pixel limit before any pixel is decoded (decompression bombs), and the
encoded size against a byte limit.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput
from service.repository import Preprocessing

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def preprocess(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """A decoded image -> uint8 [C, H, W]: the contract's convert + resize."""
    converted = image.convert(preprocessing.color_mode)
    size = (preprocessing.width, preprocessing.height)
    if converted.size != size:
        converted = converted.resize(size, RESAMPLING[preprocessing.resize])
    array = np.asarray(converted, dtype=np.uint8)
    if array.ndim == 2:
        return array[np.newaxis, :, :].copy()
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def decode_image(
    data: bytes, preprocessing: Preprocessing, *, max_bytes: int, max_pixels: int
) -> np.ndarray:
    """Encoded bytes (PNG, JPEG, anything Pillow reads) -> uint8 [C, H, W]; InvalidInput if not."""
    if not data:
        raise InvalidInput("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InvalidInput(f"the image is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidInput(
                    f"the image is {width}x{height} = {width * height} pixels; "
                    f"the limit is {max_pixels} pixels"
                )
            image.load()
            return preprocess(image, preprocessing)
    except InvalidInput:
        raise
    except Image.DecompressionBombError as error:
        raise InvalidInput(f"the image is too large to decode: {error}") from None
    except UnidentifiedImageError:
        raise InvalidInput(
            f"cannot decode the image ({len(data)} bytes): not a format Pillow reads "
            "(expected PNG, JPEG, BMP, GIF, TIFF, WebP, ...)"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise InvalidInput(f"cannot decode the image: {error}") from None
