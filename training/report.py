"""The report written next to each version: ``<version>/report/index.md``, its PNG figures and
``index.html``, the same as one self-contained page (:mod:`training.page`).

It teaches by showing the trained network: loss and accuracy curves; the test split through the
exported model (ONNX Runtime): accuracy, per-class accuracy, the confusion matrix and a gallery
of the mistakes with their top-2 probabilities; the first layer's filters; the feature maps of
one test image after every block; the occlusion maps of a few test images, right and wrong
(see :mod:`contract.occlusion`); and the parameter arithmetic (see :mod:`training.params`).
Each section says in words how to read its figure.

The figures are drawn by :mod:`training.report_figures`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract.occlusion import Occlusion, count_positions, occlusion_map, typical_fill
from training.compare.probes import Mistake, mistakes
from training.model import ImageClassifier
from training.onnx_eval import Evaluation, onnx_logits, onnx_session
from training.params import PARAMETER_SECTION, parameter_markdown
from training.report_figures import (
    plot_confusion,
    plot_curves,
    plot_feature_maps,
    plot_filters,
    plot_mistakes,
    plot_occlusion,
)

logger = logging.getLogger(__name__)

FIGURES = (
    "curves.png",
    "confusion_matrix.png",
    "mistakes.png",
    "filters.png",
    "feature_maps.png",
    "occlusion.png",
)

OCCLUSION_SECTION = "## What the network looked at: occlusion sensitivity"

SECTIONS = (
    "## Curves",
    "## Test split (the exported model, ONNX Runtime)",
    "## The mistakes",
    "## The first layer's filters",
    "## Feature maps: one test image through every block",
    OCCLUSION_SECTION,
    PARAMETER_SECTION,
)
"""The report's sections, in order."""

INTRODUCTION = (
    "A dense layer gives every pixel a weight of its own for every unit, so it must learn a "
    "pattern again at each position. A convolutional network slides a few small filters over "
    "the image instead, the same weights everywhere, pools to make the picture smaller and "
    "the view of each unit wider, builds up from edges and strokes to larger shapes, and "
    "leaves the decision to a few dense layers at the end. The sections below show this "
    "trained network doing it: how it learned, how well it does on images it never saw, "
    "where it fails, what its filters and feature maps look like, which regions of an image "
    "its decision rests on, and what the weight sharing saves in parameters."
)

OCCLUSION_IMAGES = 4
"""Test images explained of each kind: correctly classified, then misclassified."""

MISTAKES_LISTED = 50
"""Misclassified test images listed in the table (the figure shows the first 32)."""


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


def _most_confused(confusion: np.ndarray, classes: list[str]) -> str:
    off_diagonal = confusion - np.diag(np.diag(confusion))
    if not off_diagonal.any():
        return "Every test image is on the diagonal: no class was mistaken for another."
    true, predicted = np.unravel_index(int(off_diagonal.argmax()), off_diagonal.shape)
    return (
        f"The most frequent confusion here: {int(off_diagonal[true, predicted])} test images of "
        f"class {classes[int(true)]} predicted as {classes[int(predicted)]}."
    )


def accuracy_section(evaluation: Evaluation, classes: list[str]) -> list[str]:
    lines = [SECTIONS[1], ""]
    lines += [
        f"Accuracy **{evaluation.accuracy:.4f}** on {len(evaluation.predictions)} images.",
        "",
        "The test split is held out: never trained on and never used to pick the epoch, so this "
        "is what to expect on new images like these. It is measured on the exported ONNX file "
        "through ONNX Runtime, the way the service runs the model.",
        "",
        "| class | accuracy | images |",
        "|---|---:|---:|",
    ]
    for name, accuracy, row in zip(
        classes, evaluation.per_class_accuracy, evaluation.confusion, strict=True
    ):
        lines.append(f"| {name} | {accuracy:.4f} | {int(row.sum())} |")
    lines += [
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "How to read the confusion matrix: each row is a true class, each column the class the "
        "model answered; the diagonal counts the right answers and every count off it is a "
        f"mistake. {_most_confused(evaluation.confusion, classes)}",
        "",
    ]
    return lines


def mistakes_section(
    found: list[Mistake], tests: int, classes: list[str], images: np.ndarray, path: Path
) -> list[str]:
    """Draws ``mistakes.png``; returns the Markdown that describes it."""
    plot_mistakes(images, found, classes, path)
    lines = [SECTIONS[2], ""]
    lines += [
        f"The exported model gets {len(found)} of {tests} test images wrong. Each is shown with "
        "its true class and the model's two highest probabilities (softmax of the ONNX Runtime "
        "logits): a close second choice says the model hesitated, a confident wrong answer "
        "that it saw something else (the occlusion maps below show what).",
        "",
        "![misclassified test images](mistakes.png)",
        "",
    ]
    return lines + mistakes_table(found, classes)


def mistakes_table(found: Sequence[Mistake], classes: Sequence[str]) -> list[str]:
    """The first MISTAKES_LISTED mistakes as a Markdown table (none: no table)."""
    if not found:
        return []
    lines = ["| test image | true | first choice | second choice |", "|---:|---|---|---|"]
    for mistake in found[:MISTAKES_LISTED]:
        (first, p_first), (second, p_second) = mistake.top2
        lines.append(
            f"| {mistake.index} | {classes[mistake.label]} | {classes[first]} "
            f"({p_first:.3f}) | {classes[second]} ({p_second:.3f}) |"
        )
    return [*lines, ""]


def filters_section(weight: torch.Tensor, path: Path) -> list[str]:
    """Draws ``filters.png``; returns the Markdown that describes it."""
    plot_filters(weight, path)
    out_channels, in_channels, height, width = weight.shape
    return [
        SECTIONS[3],
        "",
        "![filters](filters.png)",
        "",
        f"Each square is one kernel of the first convolution: {height}x{width} weights for each "
        f"of the {in_channels} input channel(s), {in_channels * height * width} in all, drawn on "
        "its own scale (light: a large weight, dark: a small or negative one). The layer slides "
        "every kernel over the whole image and answers, at each position, how much the patch "
        "under it looks like the kernel. Trained kernels tend to be small edge and stroke "
        "detectors: light beside dark is an edge of that orientation. Because one kernel serves "
        "every position (weight sharing), a stroke is detected wherever it is, with "
        f"{out_channels} x {in_channels * height * width} weights in the whole layer, whatever "
        "the image size.",
        "",
    ]


def feature_maps_section(blocks: int) -> list[str]:
    return [
        SECTIONS[4],
        "",
        "![feature maps](feature_maps.png)",
        "",
        "Top left: a test image. Each following row is the output of one block (convolution, "
        f"batch norm, activation, pooling) for that image, first 8 channels, {blocks} block(s) "
        "in all. Bright is a strong response. The first block's maps still look like the digit: "
        "each is the image seen through one kernel, lighting up the edges and strokes that "
        "kernel detects. Every pooling halves the resolution, so each later unit sees a larger "
        "part of the image (its receptive field) and responds to combinations of the earlier "
        "patterns: the maps get coarser and more abstract, and the dense head at the end "
        "reads the last of them to decide.",
        "",
    ]


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
    was evaluated on (``evaluation.predictions`` are its answers): the mistakes and the
    occlusion maps are computed there. :func:`training.page.write_version_page` turns the
    result into ``index.html``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    network = classifier.convnet
    plot_curves(history, directory / "curves.png")
    plot_confusion(evaluation.confusion, classes, directory / "confusion_matrix.png")
    plot_feature_maps(
        classifier,
        test_image,
        f"test image, class {classes[test_label]}",
        directory / "feature_maps.png",
    )
    lines = [f"# {summary['model_name']}: training report", ""]
    lines += [f"- {key}: {value}" for key, value in summary.items()]
    lines += ["", INTRODUCTION, ""]
    lines += [SECTIONS[0], "", "![loss and accuracy](curves.png)", ""]
    lines += [
        "Training loss and accuracy are measured on augmented batches with dropout and label "
        "smoothing, so they sit below the validation figures. The version published is the "
        "epoch with the best validation accuracy.",
        "",
    ]
    lines += accuracy_section(evaluation, classes)
    logits = onnx_logits(onnx_session(onnx_path), test_images)
    lines += mistakes_section(
        mistakes(logits, test_labels),
        len(test_labels),
        classes,
        test_images,
        directory / "mistakes.png",
    )
    first_conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    lines += filters_section(first_conv.weight, directory / "filters.png")
    lines += feature_maps_section(len(network.config.blocks))
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
