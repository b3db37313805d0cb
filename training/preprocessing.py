"""The one function that turns a decoded image into model input, shared in spirit with the service.

docs/model-repository.md fixes it: ``image.convert(color_mode)``, then
``image.resize((width, height), BILINEAR)`` unless it already has that size, then the pixels as
uint8 ``[C, H, W]``. Training applies it to every ImageFolder image, so a model sees the same
pixels in training as in serving. This module imports neither torch nor the service.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

COLOR_MODES = ("L", "RGB")
"""Pillow modes a model can take: grayscale (1 channel) or RGB (3 channels)."""

RESIZE_FILTER = "bilinear"
"""The Pillow resampling filter, by the name written into the ``preprocessing`` metadata."""

GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
"""Pillow modes that hold no colour; ``--color-mode auto`` picks L when every image has one."""


def channels_of(color_mode: str) -> int:
    return 1 if color_mode == "L" else 3


def prepare_image(image: Image.Image, color_mode: str, width: int, height: int) -> np.ndarray:
    """Decoded Pillow image -> uint8 array ``[C, H, W]``: convert, then bilinear resize."""
    image = image.convert(color_mode)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[np.newaxis] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels)


def preprocessing_metadata(
    color_mode: str, height: int, width: int, mean: list[float], std: list[float]
) -> dict[str, object]:
    """The ``convserve.preprocessing`` object of the contract."""
    return {
        "height": height,
        "width": width,
        "channels": channels_of(color_mode),
        "color_mode": color_mode,
        "resize": RESIZE_FILTER,
        "layout": "NCHW",
        "input_name": "images",
        "input_dtype": "uint8",
        "output_name": "logits",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }
