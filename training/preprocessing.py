"""Training's side of the preprocessing contract (contract/preprocessing.py holds the recipe).

Training applies `prepare_image` to every ImageFolder image, the server the same recipe to every
image Classify receives, so a model sees the same pixels in training as in serving. This module
imports neither torch nor the service.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from contract import preprocessing as recipe

COLOR_MODES = tuple(recipe.COLOR_MODES)
"""Pillow modes a model can take: grayscale (1 channel) or RGB (3 channels)."""

RESIZE_FILTER = recipe.DEFAULT_RESIZE
"""The Pillow resampling filter training uses, by the name written into the metadata."""

GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
"""Pillow modes that hold no colour; ``--color-mode auto`` picks L when every image has one."""

channels_of = recipe.channels_of
preprocessing_metadata = recipe.preprocessing_metadata


def prepare_image(image: Image.Image, color_mode: str, width: int, height: int) -> np.ndarray:
    """Decoded Pillow image -> uint8 array ``[C, H, W]``: the contract's convert, then resize
    with the filter training writes into the metadata."""
    return recipe.prepare(image, color_mode, width, height, RESIZE_FILTER)
