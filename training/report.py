"""The report written next to each version: ``<version>/report/index.md`` and its PNG figures.

Figures: loss and accuracy curves, the confusion matrix of the test split (ONNX Runtime), the
first layer's filters, the feature maps of one test image after every block, and the occlusion
maps of a few test images, right and wrong, computed on the exported model through ONNX Runtime
(see :mod:`training.occlusion`). ``index.md`` adds per-class accuracy, the occlusion settings and
the parameter arithmetic (see :mod:`training.params`).

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
from training.occlusion import (
    Occlusion,
    count_positions,
    occlusion_map,
    typical_fill,
)
from training.onnx_eval import Evaluation, onnx_logits, onnx_session
from training.params import parameter_markdown

logger = logging.getLogger(__name__)

FIGURES = (
    "curves.png",
    "confusion_matrix.png",
    "filters.png",
    "feature_maps.png",
    "occlusion.png",
)

OCCLUSION_SECTION = "## What the network looked at: occlusion sensitivity"

OCCLUSION_IMAGES = 4
"""Test images explained of each kind: correctly classified, then misclassified."""


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


def pick_explained(
    labels: np.ndarray, predictions: np.ndarray, count: int = OCCLUSION_IMAGES
) -> tuple[list[int], list[int]]:
    """Test indices to explain: ``count`` right ones of distinct classes, ``count`` wrong ones.

    The first of each kind in test order, so the same run picks the same images.
    """
    right: list[int] = []
    seen: set[int] = set()
    for index in np.flatnonzero(predictions == labels).tolist():
        if int(labels[index]) not in seen and len(right) < count:
            right.append(index)
            seen.add(int(labels[index]))
    wrong = np.flatnonzero(predictions != labels)[:count].tolist()
    return right, wrong


def explain_with_onnx(
    onnx_path: Path, images: np.ndarray, fill: tuple[int, ...]
) -> list[Occlusion]:
    """The occlusion map of each image ``[C, H, W]`` on the exported model (ONNX Runtime)."""
    session = onnx_session(onnx_path)

    def predict(batch: np.ndarray) -> np.ndarray:
        return onnx_logits(session, batch)

    return [occlusion_map(predict, image, fill=fill) for image in images]


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


def occlusion_section(
    onnx_path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    classes: list[str],
    path: Path,
) -> list[str]:
    """Draws ``occlusion.png`` for a few test images; returns the Markdown that describes it."""
    right, wrong = pick_explained(labels, predictions)
    chosen = right + wrong
    if not chosen:
        return [OCCLUSION_SECTION, "", "No test images to explain.", ""]
    fill = typical_fill(images)
    occlusions = explain_with_onnx(onnx_path, images[chosen], fill)
    plot_occlusion(images[chosen], labels[chosen], occlusions, len(right), classes, path)
    height, width = images.shape[2:]
    patch, stride = occlusions[0].patch, occlusions[0].stride
    misclassified = int(np.sum(predictions != labels))
    lines = [OCCLUSION_SECTION, ""]
    lines += [
        "A square patch slides over the image; at each position the exported model (ONNX "
        "Runtime, no gradients) scores the occluded image, and the map shows how much the "
        "softmax probability of the predicted class drops: red, the decision rests on what the "
        "patch hid; white, the region did not matter; blue, hiding it made the class more "
        "likely. Each pixel shows the mean drop of the patches that cover it. For a "
        "misclassified image the map explains the wrong class: what the model mistook for it "
        "(see docs/training.md).",
        "",
        f"- patch: {patch}x{patch} px",
        f"- stride: {stride} px ({count_positions(height, width, patch, stride)} positions "
        f"per {height}x{width} image, scored in batches)",
        f"- fill: {', '.join(map(str, fill))} (the per-channel median pixel of the test split: "
        "the background for white-on-black digits, a mid value for photos)",
        "- score: softmax probability of the class predicted for the unoccluded image",
        f"- images: {len(right)} correctly classified, {len(wrong)} of the {misclassified} "
        "misclassified",
        "",
        "![occlusion sensitivity](occlusion.png)",
        "",
        "| test image | true | predicted | probability | largest drop |",
        "|---:|---|---|---:|---:|",
    ]
    for index, occlusion in zip(chosen, occlusions, strict=True):
        lines.append(
            f"| {index} | {classes[int(labels[index])]} | {classes[occlusion.predicted]} | "
            f"{occlusion.probabilities[occlusion.target]:.4f} | {occlusion.drops.max():.4f} |"
        )
    return [*lines, ""]


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
    onnx_path: Path,
    test_images: np.ndarray,
    test_labels: np.ndarray,
) -> Path:
    """Writes the figures and ``index.md`` into ``directory``; returns the index path.

    ``onnx_path`` is the exported model, ``test_images`` and ``test_labels`` the test split it
    was evaluated on (``evaluation.predictions`` are its answers): the occlusion maps run there.
    """
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
    lines += occlusion_section(
        onnx_path,
        test_images,
        test_labels,
        evaluation.predictions,
        classes,
        directory / "occlusion.png",
    )
    lines += parameter_markdown(network)
    index = directory / "index.md"
    index.write_text("\n".join(lines) + "\n")
    logger.info("report written to %s", directory)
    return index
