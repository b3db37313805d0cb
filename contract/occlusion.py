"""Occlusion sensitivity: which regions of an image the model's decision rests on.

The method (Zeiler and Fergus, 2014) needs only the model's outputs, no gradients, so it runs on
the exported ONNX model exactly as the service runs it:

1. Score the image as it is: ``p = softmax(logits)``; the class explained is the predicted one
   (``argmax p``) unless a ``target`` is given.
2. Slide a square of ``patch`` x ``patch`` pixels, painted with ``fill``, over the image: top-left
   corners at ``0, stride, 2 * stride, ...`` along each axis, plus one last position flush with
   the bottom (right) edge when the stride does not land there, so with ``stride <= patch`` every
   pixel is hidden at least once. A ``H`` x ``W`` image gives ``rows x columns`` positions, with
   ``rows = ceil((H - patch) / stride) + 1`` (:func:`count_positions`).
3. Score every occluded variant, in batches: the unoccluded image and all variants go to
   ``predict`` in ``ceil((1 + rows * columns) / batch_size)`` calls, never one call per position.
4. ``drops[i, j] = p[target](image) - p[target](image with the patch at (tops[i], lefts[j]))``.

**What the numbers mean.** A drop is a difference of softmax probabilities of the class
explained, in ``[-1, 1]``: ``0.6`` means hiding that square took 0.6 of probability away from
the class, so the decision rests on what is there; ``~0``: the model did not need that region;
negative: hiding it made the class *more* likely (the region spoke against it). ``predict`` must
return logits (the model repository's ``logits`` output); the softmax is applied here.

**Output.** :class:`Occlusion` holds ``drops`` float32 ``[rows, columns]`` over the patch
positions, their corners ``tops`` and ``lefts``, the class explained and the unoccluded
probabilities. :func:`pixel_map` (``Occlusion.pixels()``) spreads it back to float32 ``[H, W]``
for an overlay: each pixel gets the mean drop of every position whose patch covers it (NaN for a
pixel no patch covers, possible only with ``stride > patch``).

**Defaults** (for 28x28 digits): ``patch=7`` (a quarter of the side: wider than a pen stroke,
2-3 px, so it can hide a stroke segment, yet small enough to tell a digit's parts apart),
``stride=2`` (positions overlap, so the pixel map is smooth; 12 x 12 = 144 variants, one call at
the default batch size), ``fill=0``: the background. A patch must *remove* evidence, not add any:
on white-on-black digits a black patch erases the ink beneath it, whereas a mid-grey one (the
choice for photos, whose mean is mid-grey) would paint a blob no training image has, and the drop
would mix "evidence removed" with "distractor added". For photos pass the per-channel data set
mean; :func:`typical_fill` (the per-channel median pixel) gives 0 for digits and a mid value for
photos, and is what the training report uses.

This module imports only numpy: the training report and the server's Explain RPC both use it,
so the server explains a decision exactly as the report did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]
"""uint8 images ``[N, C, H, W]`` -> logits ``[N, classes]``."""

DEFAULT_PATCH = 7
"""Side of the square hidden, in pixels."""

DEFAULT_STRIDE = 2
"""Step between patch positions, in pixels."""

DEFAULT_FILL = 0
"""Pixel value painted into the patch: the background of white-on-black digits."""

DEFAULT_BATCH_SIZE = 256
"""Most images in one ``predict`` call."""


@dataclass(frozen=True)
class Occlusion:
    """The occlusion sensitivity of one image ``[C, H, W]`` for one class."""

    drops: np.ndarray
    """float32 ``[rows, columns]``: drop of the class's softmax probability per patch position."""
    tops: np.ndarray
    """int ``[rows]``: the top edge of the patch in each row of positions."""
    lefts: np.ndarray
    """int ``[columns]``: the left edge of the patch in each column of positions."""
    target: int
    """The class explained."""
    probabilities: np.ndarray
    """float32 ``[classes]``: softmax of the unoccluded image's logits."""
    height: int
    width: int
    patch: int
    stride: int
    fill: tuple[int, ...]
    """One value per channel."""

    @property
    def predicted(self) -> int:
        """The model's class for the unoccluded image."""
        return int(np.argmax(self.probabilities))

    def pixels(self) -> np.ndarray:
        """float32 ``[H, W]``: the mean drop over the patches covering each pixel."""
        return pixel_map(self.drops, self.tops, self.lefts, self.patch, self.height, self.width)


def _as_int(value: object) -> int | None:
    """``value`` as an int when it is an integer (numpy's too; not a bool), else None."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    return None


def patch_starts(size: int, patch: int, stride: int) -> np.ndarray:
    """Start of each patch position along one axis: ``0, stride, ...`` and ``size - patch``."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return np.asarray(starts, dtype=np.int64)


def count_positions(height: int, width: int, patch: int, stride: int) -> int:
    """How many occluded variants an image of ``height`` x ``width`` gives (validated)."""
    check_settings(height, width, patch, stride)
    rows = math.ceil((height - patch) / stride) + 1
    columns = math.ceil((width - patch) / stride) + 1
    return rows * columns


def check_settings(height: int, width: int, patch: object, stride: object) -> None:
    """Raises ``ValueError`` naming the allowed values when ``patch`` or ``stride`` is bad."""
    side = min(height, width)
    patch_value = _as_int(patch)
    if patch_value is None or not 1 <= patch_value <= side:
        raise ValueError(
            f"patch must be an integer in 1..{side} (the shorter side of a {height}x{width} "
            f"image), got {patch!r}"
        )
    stride_value = _as_int(stride)
    if stride_value is None or stride_value < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")


def check_fill(fill: object, channels: int) -> tuple[int, ...]:
    """``fill`` as one value per channel; ``ValueError`` naming the allowed values otherwise."""
    values = [fill] * channels if _as_int(fill) is not None else fill
    checked = [_as_int(v) for v in values] if isinstance(values, Sequence | np.ndarray) else []
    if len(checked) != channels or not all(v is not None and 0 <= v <= 255 for v in checked):
        raise ValueError(
            f"fill must be a pixel value in 0..255 or {channels} of them (one per channel), "
            f"got {fill!r}"
        )
    return tuple(v for v in checked if v is not None)


def check_image(image: object) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        described = (
            f"dtype {image.dtype}, shape {list(image.shape)}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(
            f"image must be a uint8 array [C, H, W] (the model input), got {described}"
        )
    if 0 in image.shape:
        raise ValueError(f"image must not be empty, got shape {list(image.shape)}")
    return image


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def occluded_batch(
    image: np.ndarray,
    corners: Sequence[tuple[int, int]],
    patch: int,
    fill: tuple[int, ...],
) -> np.ndarray:
    """uint8 ``[len(corners), C, H, W]``: copies of ``image``, each with one patch painted."""
    batch = np.repeat(image[np.newaxis], len(corners), axis=0)
    values = np.asarray(fill, dtype=np.uint8)[:, np.newaxis, np.newaxis]
    for item, (top, left) in enumerate(corners):
        batch[item, :, top : top + patch, left : left + patch] = values
    return batch


def _scores(predict: Predict, images: np.ndarray, classes: int | None) -> np.ndarray:
    logits = np.asarray(predict(images))
    if logits.ndim != 2 or logits.shape[0] != len(images):
        raise ValueError(
            f"predict must return scores [N, classes] for N = {len(images)} images, "
            f"got shape {list(logits.shape)}"
        )
    if classes is not None and logits.shape[1] != classes:
        raise ValueError(f"predict returned {classes} classes, then {logits.shape[1]}")
    return softmax(logits)


def occlusion_map(
    predict: Predict,
    image: np.ndarray,
    *,
    patch: int = DEFAULT_PATCH,
    stride: int = DEFAULT_STRIDE,
    fill: int | Sequence[int] = DEFAULT_FILL,
    target: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Occlusion:
    """The occlusion sensitivity of ``image`` (uint8 ``[C, H, W]``); see the module docstring.

    ``predict`` is called ``ceil((1 + positions) / batch_size)`` times with at most
    ``batch_size`` images, the unoccluded one first. ``target`` is the class explained (default:
    the predicted class).
    """
    image = check_image(image)
    channels, height, width = image.shape
    check_settings(height, width, patch, stride)
    fills = check_fill(fill, channels)
    if (_as_int(batch_size) or 0) < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if target is not None and (_as_int(target) is None or target < 0):
        raise ValueError(f"target must be a class index >= 0 or None, got {target!r}")
    tops = patch_starts(height, patch, stride)
    lefts = patch_starts(width, patch, stride)
    corners = [(int(top), int(left)) for top in tops for left in lefts]
    # Item 0 is the unoccluded image, so a small image costs one call in all.
    probabilities: list[np.ndarray] = []
    classes: int | None = None
    for start in range(0, 1 + len(corners), batch_size):
        chunk = corners[max(start - 1, 0) : start - 1 + batch_size]
        batch = occluded_batch(image, chunk, patch, fills)
        if start == 0:
            batch = np.concatenate([image[np.newaxis], batch])
        scores = _scores(predict, batch, classes)
        classes = scores.shape[1]
        probabilities.append(scores)
    everything = np.concatenate(probabilities)
    base = everything[0]
    if target is None:
        target = int(np.argmax(base))
    elif target >= len(base):
        raise ValueError(f"target must be a class index in 0..{len(base) - 1}, got {target}")
    drops = (base[target] - everything[1:, target]).reshape(len(tops), len(lefts))
    return Occlusion(
        drops=drops.astype(np.float32),
        tops=tops,
        lefts=lefts,
        target=int(target),
        probabilities=base.astype(np.float32),
        height=height,
        width=width,
        patch=patch,
        stride=stride,
        fill=fills,
    )


def pixel_map(
    drops: np.ndarray, tops: np.ndarray, lefts: np.ndarray, patch: int, height: int, width: int
) -> np.ndarray:
    """float32 ``[H, W]``: each pixel's mean drop over the positions whose patch covers it.

    NaN where no patch covers the pixel (only when ``stride > patch``).
    """
    rows = np.arange(height)
    columns = np.arange(width)
    # covers_row[i, y]: the patch of row i of positions covers pixel row y (same for columns),
    # so the sum over covering positions is covers_row.T @ drops @ covers_column.
    covers_row = ((rows >= tops[:, None]) & (rows < tops[:, None] + patch)).astype(np.float64)
    covers_column = ((columns >= lefts[:, None]) & (columns < lefts[:, None] + patch)).astype(
        np.float64
    )
    total = covers_row.T @ drops.astype(np.float64) @ covers_column
    count = np.outer(covers_row.sum(axis=0), covers_column.sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
    return mean.astype(np.float32)


def typical_fill(images: np.ndarray) -> tuple[int, ...]:
    """The per-channel median pixel of uint8 images ``[N, C, H, W]``.

    The background for digits (most MNIST pixels are black: 0), a mid value close to the mean for
    photos: a patch of it hides what is beneath without adding a shape of its own.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {images.shape}")
    return tuple(int(np.median(images[:, channel])) for channel in range(images.shape[1]))
