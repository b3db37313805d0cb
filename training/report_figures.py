"""The figures of the training report (:mod:`training.report`), drawn with matplotlib's
``Figure`` and the Agg canvas only: no pyplot state, no display. The comparison's figures
(:mod:`training.compare.figures`) use the same helpers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from contract.occlusion import Occlusion
from training.compare.probes import Mistake
from training.model import ImageClassifier

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def save_figure(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(str(path), dpi=100, bbox_inches="tight")


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4))
    for axis, metric in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        axis.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label="train")
        axis.plot(epochs, [r[f"val_{metric}"] for r in history], "o-", label="validation")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(metric)
        axis.set_title(f"{metric} per epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    save_figure(figure, path)


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    size = max(5.0, 0.5 * len(classes) + 2)
    figure = Figure(figsize=(size, size))
    axis = figure.subplots()
    image = axis.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axis, fraction=0.046)
    ticks = range(len(classes))
    axis.set_xticks(ticks, classes, rotation=90 if len(classes) > 10 else 0)
    axis.set_yticks(ticks, classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("confusion matrix, test split (ONNX Runtime)")
    if len(classes) <= 20:
        threshold = confusion.max() / 2
        for (row, column), count in np.ndenumerate(confusion):
            color = "white" if count > threshold else "black"
            axis.text(column, row, str(count), ha="center", va="center", color=color, fontsize=8)
    save_figure(figure, path)


def plot_filters(weight: torch.Tensor, path: Path) -> None:
    """First-layer kernels ``[out, in, k, k]``: grayscale, or RGB when the input has 3 channels."""
    kernels = weight.detach().cpu().numpy()
    count = len(kernels)
    columns = min(8, count)
    rows = -(-count // columns)
    figure = Figure(figsize=(columns * 1.2, rows * 1.2 + 0.6))
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axis in axes:
        axis.axis("off")
    for axis, kernel in zip(axes, kernels, strict=False):
        low, high = kernel.min(), kernel.max()
        scaled = (kernel - low) / (high - low + 1e-12)
        if scaled.shape[0] == 3:
            axis.imshow(scaled.transpose(1, 2, 0), interpolation="nearest")
        else:
            axis.imshow(scaled[0], cmap="gray", interpolation="nearest")
    figure.suptitle(
        f"first-layer filters ({count} x {kernels.shape[1]}x{kernels.shape[2]}x{kernels.shape[3]})"
    )
    save_figure(figure, path)


def plot_feature_maps(
    classifier: ImageClassifier, image: np.ndarray, caption: str, path: Path, channels: int = 8
) -> None:
    """One image ``[C, H, W]`` and the first ``channels`` maps after each conv block."""
    module = copy.deepcopy(classifier).cpu().eval()
    with torch.inference_mode():
        normalised = module.normalise(torch.from_numpy(image[np.newaxis]))
        maps = module.convnet.feature_maps(normalised)
    figure = Figure(figsize=(channels * 1.3, (len(maps) + 1) * 1.4 + 0.4))
    axes = figure.subplots(len(maps) + 1, channels, squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    picture = image.transpose(1, 2, 0)
    axes[0, 0].imshow(picture[..., 0] if image.shape[0] == 1 else picture, cmap="gray")
    axes[0, 0].set_title(caption, fontsize=8)
    for row, feature in enumerate(maps, start=1):
        values = feature[0].numpy()
        for column in range(min(channels, len(values))):
            axes[row, column].imshow(values[column], cmap="viridis")
        axes[row, 0].set_title(
            f"block {row}: {values.shape[0]}x{values.shape[1]}x{values.shape[2]}",
            fontsize=8,
            loc="left",
        )
    save_figure(figure, path)


def plot_occlusion(
    images: np.ndarray,
    labels: np.ndarray,
    occlusions: list[Occlusion],
    right: int,
    classes: list[str],
    path: Path,
) -> None:
    """Each image with its pixel map over it; the first ``right`` (correct ones) in a row."""
    kinds = [("correct", occlusions[:right]), ("misclassified", occlusions[right:])]
    rows = [(name, items) for name, items in kinds if items]
    columns = max(len(items) for _, items in rows)
    maps = [occlusion.pixels() for occlusion in occlusions]
    scale = max(float(np.nanmax(np.abs(m))) for m in maps) or 1.0
    figure = Figure(figsize=(columns * 2.2 + 1.0, len(rows) * 2.5 + 0.8))
    axes = figure.subplots(len(rows), columns, squeeze=False)
    shown = None
    start = 0
    for row, (name, items) in enumerate(rows):
        for column, occlusion in enumerate(items):
            index = start + column
            axis = axes[row, column]
            picture = images[index].transpose(1, 2, 0)
            axis.imshow(picture[..., 0] if picture.shape[2] == 1 else picture, cmap="gray")
            # Opacity follows the size of the drop, so where nothing mattered the digit shows.
            opacity = 0.85 * np.sqrt(np.nan_to_num(np.abs(maps[index]) / scale))
            shown = axis.imshow(maps[index], cmap="RdBu_r", vmin=-scale, vmax=scale, alpha=opacity)
            axis.set_title(
                f"{name}: true {classes[int(labels[index])]}, "
                f"predicted {classes[occlusion.predicted]}\n"
                f"p={occlusion.probabilities[occlusion.target]:.2f}, "
                f"largest drop {float(occlusion.drops.max()):.2f}",
                fontsize=7,
            )
        start += len(items)
    for axis in axes.ravel():
        axis.axis("off")
    if shown is not None:
        figure.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.03, label="probability drop")
    first = occlusions[0]
    figure.suptitle(
        f"occlusion sensitivity of the predicted class (ONNX Runtime): patch {first.patch} px, "
        f"stride {first.stride} px, fill {', '.join(map(str, first.fill))}",
        fontsize=9,
    )
    save_figure(figure, path)


def show_image(axis: Axes, image: np.ndarray) -> None:
    """A uint8 image ``[C, H, W]`` on its own 0..255 scale, without ticks."""
    if image.shape[0] == 1:
        axis.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        axis.imshow(image.transpose(1, 2, 0), interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


def plot_mistakes(
    images: np.ndarray, found: list[Mistake], classes: list[str], path: Path, limit: int = 32
) -> None:
    """Misclassified test images with their true class and top-2 probabilities."""
    shown = found[:limit]
    columns = min(8, max(len(shown), 1))
    rows = max(1, -(-len(shown) // columns))
    figure = Figure(figsize=(1.6 * columns + 0.4, 1.9 * rows + 0.6))
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axis in axes:
        axis.axis("off")
    for axis, mistake in zip(axes, shown, strict=False):
        show_image(axis, images[mistake.index])
        (first, p_first), (second, p_second) = mistake.top2
        axis.set_title(
            f"true {classes[mistake.label]}\n{classes[first]} {p_first:.2f} | "
            f"{classes[second]} {p_second:.2f}",
            fontsize=8,
        )
    if not shown:
        axes[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    figure.suptitle(f"misclassified test images ({len(shown)} of {len(found)} shown)")
    save_figure(figure, path)
