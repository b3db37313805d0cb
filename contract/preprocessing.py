"""The one preprocessing recipe: a decoded image -> one model input row, uint8 [C, H, W].

`image.convert(color_mode)` (skipped when the image already has that mode: same pixels), then
`image.resize((width, height), filter)` unless it already has that size, then the pixels as
uint8 [C, H, W]. Training applies it to every image it reads from folders, the server to every
image Classify receives, with the filter written into the `convserve.preprocessing` metadata:
so a model sees the same pixels in serving as in training.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from contract.layout import INPUT_NAME, OUTPUT_NAME

COLOR_MODES = {"L": 1, "RGB": 3}
"""Pillow modes a model can take, with their channel counts."""

RESIZE_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
DEFAULT_RESIZE = "bilinear"


def channels_of(color_mode: str) -> int:
    return COLOR_MODES[color_mode]


def prepare(
    image: Image.Image, color_mode: str, width: int, height: int, resize: str = DEFAULT_RESIZE
) -> np.ndarray:
    """A decoded Pillow image -> uint8 [C, H, W]: convert, resize, transpose."""
    converted = image if image.mode == color_mode else image.convert(color_mode)
    if converted.size != (width, height):
        converted = converted.resize((width, height), RESIZE_FILTERS[resize])
    pixels = np.asarray(converted, dtype=np.uint8)
    if pixels.ndim == 2:
        return pixels[np.newaxis, :, :].copy()
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def preprocessing_metadata(
    color_mode: str, height: int, width: int, mean: list[float], std: list[float]
) -> dict[str, object]:
    """The `convserve.preprocessing` object training writes and the server reads."""
    return {
        "height": height,
        "width": width,
        "channels": channels_of(color_mode),
        "color_mode": color_mode,
        "resize": DEFAULT_RESIZE,
        "layout": "NCHW",
        "input_name": INPUT_NAME,
        "input_dtype": "uint8",
        "output_name": OUTPUT_NAME,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }
