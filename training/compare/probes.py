"""What the CNN's layers do, measured: receptive fields, equivariance, strongest patches, mistakes.

Receptive fields come from the layers themselves (kernel, stride, padding, dilation of every
convolution and pooling), by the usual recurrence: a layer with kernel ``k``, dilation ``d`` and
stride ``s`` after a field of size ``r`` whose units are ``j`` input pixels apart gives
``r + (k - 1) d j`` pixels, ``j s`` apart.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.compare.shift import shift_images
from training.model import ACTIVATION_MODULES, ConvNet, ImageClassifier

_NO_SPATIAL_EFFECT = (nn.BatchNorm2d, nn.Dropout, nn.Identity, *ACTIVATION_MODULES.values())


@dataclass(frozen=True)
class ReceptiveField:
    """Which input pixels one unit of a feature map sees."""

    size: int
    """Side of the (square) field in input pixels."""
    jump: int
    """Input pixels between neighbouring units of the map."""
    center: float
    """Input coordinate (pixel index) of the centre of unit 0's field."""

    def origin(self, index: int) -> int:
        """Input coordinate of the first pixel in the field of unit ``index`` (may be < 0)."""
        return round(self.center + index * self.jump - (self.size - 1) / 2)


INPUT_FIELD = ReceptiveField(size=1, jump=1, center=0.0)


def _square(value: int | tuple[int, ...], name: str, layer: nn.Module) -> int:
    values = (value,) if isinstance(value, int) else tuple(value)
    if len(set(values)) != 1 or not isinstance(values[0], int):
        raise ValueError(f"{type(layer).__name__}: only square, numeric {name} is supported")
    return values[0]


def grow(field: ReceptiveField, layer: nn.Module) -> ReceptiveField:
    """The receptive field after ``layer`` (convolution, pooling, or a pointwise layer)."""
    if isinstance(layer, _NO_SPATIAL_EFFECT):
        return field
    if not isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        raise ValueError(f"no receptive-field rule for {type(layer).__name__}")
    kernel = _square(layer.kernel_size, "kernel", layer)
    stride = _square(layer.stride or kernel, "stride", layer)
    padding = _square(layer.padding, "padding", layer)  # type: ignore[arg-type]
    dilation = _square(getattr(layer, "dilation", 1), "dilation", layer)
    return ReceptiveField(
        size=field.size + (kernel - 1) * dilation * field.jump,
        jump=field.jump * stride,
        center=field.center + ((kernel - 1) * dilation / 2 - padding) * field.jump,
    )


def receptive_field(
    layers: Iterable[nn.Module], field: ReceptiveField = INPUT_FIELD
) -> ReceptiveField:
    """The receptive field after ``layers`` in order (containers are walked, leaves applied)."""
    for layer in layers:
        children = list(layer.children())
        field = receptive_field(children, field) if children else grow(field, layer)
    return field


def block_receptive_fields(network: ConvNet) -> list[ReceptiveField]:
    """The receptive field of one unit of each block's output (after its pooling)."""
    fields, field = [], INPUT_FIELD
    for block in network.blocks:
        field = receptive_field([block], field)
        fields.append(field)
    return fields


def first_layer(network: ConvNet) -> nn.Sequential:
    """The first convolution with what follows it pointwise (batch norm, activation)."""
    layers: list[nn.Module] = []
    for layer in network.blocks[0].children():
        if layers and not isinstance(layer, _NO_SPATIAL_EFFECT):
            break
        layers.append(layer)
    return nn.Sequential(*layers)


def cpu_copy(classifier: ImageClassifier) -> ImageClassifier:
    return copy.deepcopy(classifier).cpu().eval()


def first_layer_maps(classifier: ImageClassifier) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images ``[N, C, H, W]`` -> the first layer's maps ``[N, channels, H, W]``."""
    module = cpu_copy(classifier)
    layer = first_layer(module.convnet)

    def maps(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return layer(module.normalise(torch.from_numpy(images))).numpy()

    return maps


def interior(height: int, width: int, rows: int, columns: int, margin: int) -> tuple[slice, slice]:
    """Where a map of the shifted image and the moved map both lie ``margin`` px from a border."""
    return (
        slice(margin + max(rows, 0), height - margin + min(rows, 0)),
        slice(margin + max(columns, 0), width - margin + min(columns, 0)),
    )


def equivariance_error(
    layer: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    rows: int,
    columns: int,
    margin: int,
    fill: np.ndarray | float = 0,
) -> float:
    """max |layer(shift(image)) - shift(layer(image))| away from the borders.

    ~0 (float rounding) for a convolution followed by pointwise layers: the same kernel at every
    position means a moved input gives a moved map. ``margin`` (the layer's receptive-field
    radius) keeps out the units whose field reaches the zero padding or the filled-in border.
    """
    maps = layer(images)
    of_shifted = layer(shift_images(images, rows, columns, fill))
    moved = shift_images(maps, rows, columns, 0)
    region = (..., *interior(maps.shape[-2], maps.shape[-1], rows, columns, margin))
    return float(np.max(np.abs(of_shifted[region] - moved[region])))


@dataclass(frozen=True)
class ChannelPatches:
    """The input patches that excite one channel of a block most, strongest first."""

    channel: int
    patches: np.ndarray
    """uint8 ``[k, C, size, size]``."""
    activations: list[float]
    image_indices: list[int]


def strongest_patches(
    classifier: ImageClassifier,
    images: np.ndarray,
    block: int,
    *,
    channels: int = 4,
    per_channel: int = 6,
    fill: np.ndarray | float = 0,
    batch_size: int = 500,
) -> tuple[ReceptiveField, list[ChannelPatches]]:
    """For the ``channels`` most active channels of ``block``'s output, the ``per_channel``
    images whose strongest unit is strongest, cropped to that unit's receptive field.

    "Most active": the highest mean over images of the channel's largest response.
    """
    module = cpu_copy(classifier)
    field = block_receptive_fields(module.convnet)[block]
    peaks, places = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size])
            maps = module.convnet.feature_maps(module.normalise(batch))[block]
            flat = maps.flatten(start_dim=2)  # [n, channels, h * w]
            best = flat.max(dim=2)
            peaks.append(best.values.numpy())
            places.append(best.indices.numpy())
        map_width = int(maps.shape[-1])
    peak, place = np.concatenate(peaks), np.concatenate(places)  # [N, channels]
    chosen = np.argsort(-peak.mean(axis=0), kind="stable")[:channels]
    pad = field.size
    fill_values = np.asarray(fill, dtype=images.dtype).reshape(-1, 1, 1)
    result = []
    for channel in chosen:
        order = np.argsort(-peak[:, channel], kind="stable")[:per_channel]
        patches = []
        for index in order:
            row, column = divmod(int(place[index, channel]), map_width)
            padded = np.empty(
                (images.shape[1], images.shape[2] + 2 * pad, images.shape[3] + 2 * pad),
                dtype=images.dtype,
            )
            padded[...] = fill_values
            padded[:, pad:-pad, pad:-pad] = images[index]
            top, left = field.origin(row) + pad, field.origin(column) + pad
            patches.append(padded[:, top : top + field.size, left : left + field.size])
        result.append(
            ChannelPatches(
                channel=int(channel),
                patches=np.stack(patches),
                activations=[float(peak[i, channel]) for i in order],
                image_indices=[int(i) for i in order],
            )
        )
    return field, result


@dataclass(frozen=True)
class Mistake:
    """A misclassified image: its index, true class, and the two highest scores."""

    index: int
    label: int
    top2: tuple[tuple[int, float], tuple[int, float]]
    """(class, softmax probability) of the first and second choice."""


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def mistakes(logits: np.ndarray, labels: np.ndarray) -> list[Mistake]:
    """Every image whose top class is not its label, in split order."""
    scores = softmax(logits.astype(np.float64))
    ranked = np.argsort(-scores, axis=1, kind="stable")
    found = []
    for index in np.flatnonzero(ranked[:, 0] != labels):
        first, second = (int(c) for c in ranked[index, :2])
        found.append(
            Mistake(
                int(index),
                int(labels[index]),
                ((first, float(scores[index, first])), (second, float(scores[index, second]))),
            )
        )
    return found
