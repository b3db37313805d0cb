"""Encoded image -> model input row, exactly as training prepares images.

docs/model-repository.md: decode with Pillow, `convert(color_mode)`, resize to (width, height)
with the metadata's filter unless the size already matches, then uint8 [C, H, W]. The size is
checked against a pixel limit before any pixel is decoded (decompression bombs), the encoded
size against a byte limit, and only the allowed formats' decoders are tried (Pillow reads
over 40 formats, EPS among them; each is code that parses untrusted bytes).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from contract.preprocessing import prepare
from service.errors import InvalidInput, client_text
from service.repository.disk import Preprocessing

DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")


def readable_formats() -> tuple[str, ...]:
    """Every format this Pillow can open, by its format name (PNG, JPEG, EPS, ...)."""
    Image.init()  # registers every plugin; cheap after the first call
    return tuple(sorted(Image.OPEN))


def preprocess(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """A decoded image -> uint8 [C, H, W]: the contract's recipe, with the model's metadata."""
    p = preprocessing
    return prepare(image, p.color_mode, p.width, p.height, p.resize)


def header_pixels(data: bytes, formats: Sequence[str] = DEFAULT_IMAGE_FORMATS) -> int | None:
    """Width x height from the image's header alone (nothing is decoded); None when no decoder
    of `formats` reads it (decode_image then says why)."""
    try:
        with Image.open(io.BytesIO(data), formats=tuple(formats)) as image:
            width, height = image.size
    except Exception:  # whatever Pillow raises, decode_image explains it
        return None
    return int(width) * int(height)


def decode_image(
    data: bytes,
    preprocessing: Preprocessing,
    *,
    max_bytes: int,
    max_pixels: int,
    formats: Sequence[str] = DEFAULT_IMAGE_FORMATS,
) -> np.ndarray:
    """Encoded bytes in one of `formats` -> uint8 [C, H, W]; InvalidInput if not."""
    if not data:
        raise InvalidInput("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InvalidInput(f"the image is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data), formats=tuple(formats)) as image:
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
            f"cannot decode the image ({len(data)} bytes): not an image in an accepted format; "
            f"accepted: {', '.join(formats)}"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error) as error:
        # what Pillow's decoders raise on malformed data (open() itself treats SyntaxError,
        # IndexError and struct.error as "not this format")
        reason = client_text(str(error) or type(error).__name__, 200, quote=False)
        raise InvalidInput(f"cannot decode the image: {reason}") from None
