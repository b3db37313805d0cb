"""The report written next to each version: ``<version>/report/index.md`` and its PNG figures.

Figures: loss and accuracy curves, the confusion matrix of the test split (ONNX Runtime), the
first layer's filters, the feature maps of one test image after every block. ``index.md`` adds
per-class accuracy and the parameter arithmetic (see :mod:`training.params`).

Matplotlib is used through ``Figure`` + the Agg canvas only: no pyplot state, no display.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from training.model import ImageClassifier
from training.onnx_eval import Evaluation
from training.params import parameter_markdown

logger = logging.getLogger(__name__)

FIGURES = ("curves.png", "confusion_matrix.png", "filters.png", "feature_maps.png")


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


def write_report(
    directory: Path,
    *,
    classifier: ImageClassifier,
    classes: list[str],
    history: list[dict[str, float]],
    evaluation: Evaluation,
    test_image: np.ndarray,
    test_label: int,
    summary: dict[str, Any],
) -> Path:
    """Writes the figures and ``index.md`` into ``directory``; returns the index path."""
    directory.mkdir(parents=True, exist_ok=True)
    network = classifier.convnet
    plot_curves(history, directory / "curves.png")
    plot_confusion(evaluation.confusion, classes, directory / "confusion_matrix.png")
    first_conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    plot_filters(first_conv.weight, directory / "filters.png")
    plot_feature_maps(
        classifier,
        test_image,
        f"test image, class {classes[test_label]}",
        directory / "feature_maps.png",
    )
    lines = [f"# {summary['model_name']}: training report", ""]
    lines += [f"- {key}: {value}" for key, value in summary.items()]
    lines += ["", "## Curves", "", "![loss and accuracy](curves.png)", ""]
    lines += [
        "Training loss and accuracy are measured on augmented batches with dropout and label "
        "smoothing, so they sit below the validation figures.",
        "",
    ]
    lines += ["## Test split (the exported model, ONNX Runtime)", ""]
    lines += [
        f"Accuracy **{evaluation.accuracy:.4f}** on {len(evaluation.predictions)} images.",
        "",
    ]
    lines += ["| class | accuracy | images |", "|---|---:|---:|"]
    for name, accuracy, row in zip(
        classes, evaluation.per_class_accuracy, evaluation.confusion, strict=True
    ):
        lines.append(f"| {name} | {accuracy:.4f} | {int(row.sum())} |")
    lines += ["", "![confusion matrix](confusion_matrix.png)", ""]
    lines += ["## What the network looks at", "", "First-layer filters:", ""]
    lines += ["![filters](filters.png)", "", "One test image after each block:", ""]
    lines += ["![feature maps](feature_maps.png)", ""]
    lines += parameter_markdown(network)
    index = directory / "index.md"
    index.write_text("\n".join(lines) + "\n")
    logger.info("report written to %s", directory)
    return index
