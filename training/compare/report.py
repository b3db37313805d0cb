"""``compare/index.md``, its figures and ``compare/index.html`` (the same as one self-contained
page, :mod:`training.page`): the dense baseline and the CNN side by side.

Every sentence that states a result is computed from the measurements; the text says when the
numbers go against the claim instead of asserting it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.augment import make_augment
from training.compare.figures import (
    plot_equivariance,
    plot_patches,
    plot_shift_accuracy,
    plot_shift_examples,
    plot_side_by_side,
)
from training.compare.shift import DIRECTIONS, shift_verdict
from training.config import TrainConfig
from training.data import Dataset
from training.page import PAGE, write_page
from training.report import mistakes_table
from training.report_figures import plot_mistakes

if TYPE_CHECKING:
    from training.compare.run import Contender, EquivarianceDemo, Measurements

logger = logging.getLogger(__name__)

FIGURES = (
    "side_by_side.png",
    "shift_examples.png",
    "shift_accuracy.png",
    "equivariance.png",
    "hierarchy_first.png",
    "hierarchy_last.png",
    "mistakes.png",
)
SECTIONS = (
    "## Side by side",
    "## Under shifts",
    "## Weight sharing: the map moves with the digit",
    "## The hierarchy: what excites the first and the last block",
    "## The mistakes",
)
ROUNDING = 1e-4
"""An equivariance error below this share of the maps' largest value is float rounding."""


def _budget(config: TrainConfig) -> str:
    return (
        f"{config.resolved_epochs()} epochs, batch {config.resolved_batch_size()}, "
        f"{config.optimizer} (peak lr {config.resolved_lr():g}, {config.schedule} schedule, "
        f"weight decay "
        f"{config.weight_decay:g}), label smoothing {config.label_smoothing:g}, augmentation "
        f"`{config.augment}`, seed {config.seed}"
    )


def _augment_note(config: TrainConfig, image_size: int) -> list[str]:
    augment = make_augment(config.augment)
    if augment is None:
        return ["- no augmentation: neither network saw a shifted digit in training."]
    pixels = augment.max_translation * image_size
    return [
        f"- augmentation `{config.augment}` moves each training image of both networks by up to "
        f"{augment.max_translation:.0%} of its size (up to {pixels:.1f} px here), so both have "
        f"seen small shifts; larger ones are new to both. `--augment none` compares the bare "
        f"architectures."
    ]


def _header(config: TrainConfig, dataset: Dataset, cnn: Contender, dense: Contender) -> list[str]:
    return [
        "# Dense vs CNN: what the convolutions buy",
        "",
        "`python -m training compare` trained both networks on the same split with the same "
        "seed and budget, exported both to ONNX, and measured both through ONNX Runtime.",
        "",
        f"- data: {dataset.summary()}, split seed {config.data.split_seed}",
        f"- budget, the same for both: {_budget(config)}",
        f"- CNN (preset `{config.preset}`): {cnn.description}",
        f"- dense: {dense.description}, the narrowest equal hidden layers with at least the "
        f"CNN's parameters",
        *_augment_note(config, dataset.image_size),
        "",
    ]


def _side_by_side(cnn: Contender, dense: Contender, measured: Measurements) -> list[str]:
    tests = len(measured.cnn_test.predictions)
    shift = measured.cnn_shift.shifts[-1]
    extra = dense.parameters - cnn.parameters
    rows = [
        ("parameters", f"{cnn.parameters:,}", f"{dense.parameters:,}"),
        (
            f"test accuracy (ONNX Runtime, {tests} images)",
            f"{measured.cnn_test.accuracy:.4f}",
            f"{measured.dense_test.accuracy:.4f}",
        ),
        (
            f"test accuracy, shifted {shift} px (mean of 4 directions)",
            f"{measured.cnn_shift.mean()[-1]:.4f}",
            f"{measured.dense_shift.mean()[-1]:.4f}",
        ),
        (
            "training time (epoch loop, validation included)",
            f"{cnn.train_seconds:.1f} s",
            f"{dense.train_seconds:.1f} s",
        ),
        ("best epoch (validation)", str(cnn.fit.best_epoch), str(dense.fit.best_epoch)),
    ]
    return [
        SECTIONS[0],
        "",
        "| | CNN | dense |",
        "|---|---:|---:|",
        *(f"| {name} | {a} | {b} |" for name, a, b in rows),
        "",
        f"The dense baseline has {dense.parameters:,} parameters, {extra:,} more than the CNN's "
        f"{cnn.parameters:,} ({100 * extra / cnn.parameters:+.2f}%).",
        "",
        "![parameters, accuracy and training time](side_by_side.png)",
        "",
    ]


def _under_shifts(measured: Measurements) -> list[str]:
    cnn, dense = measured.cnn_shift, measured.dense_shift
    fill = ", ".join(str(int(v)) for v in measured.fill)
    lines = [
        SECTIONS[1],
        "",
        "The test split moved by whole pixels in each of the four directions (no interpolation: "
        "the shifted image holds the original pixels, moved); the pixels left empty take the "
        f"background value ({fill}: the median of the test images' border pixels).",
        "",
        "![a test digit, shifted](shift_examples.png)",
        "",
        "Mean over the four directions:",
        "",
        "| shift | CNN | dense | CNN - dense |",
        "|---:|---:|---:|---:|",
    ]
    for k, a, b in zip(cnn.shifts, cnn.mean(), dense.mean(), strict=True):
        lines.append(f"| {k} px | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    lines += ["", "Per direction:", ""]
    lines.append("| model | direction | " + " | ".join(f"{k} px" for k in cnn.shifts) + " |")
    lines.append("|---|---|" + "---:|" * len(cnn.shifts))
    for name, accuracy in (("CNN", cnn), ("dense", dense)):
        for direction in DIRECTIONS:
            values = " | ".join(f"{v:.4f}" for v in accuracy.by_direction[direction])
            lines.append(f"| {name} | {direction} | {values} |")
    lines += ["", "![accuracy under shifts](shift_accuracy.png)", ""]
    tests = len(measured.cnn_test.predictions)
    verdict = shift_verdict(cnn, dense, tolerance=1 / tests)
    lines += [
        f"**What the numbers say.** {verdict} (Losses are in accuracy points against each "
        f"network's own unshifted accuracy; one test image is {100 / tests:.2g} points.)",
        "",
    ]
    return lines


def _weight_sharing(demo: EquivarianceDemo, classes: list[str]) -> list[str]:
    (first, p_first), (second, p_second) = demo.predictions
    if demo.error <= ROUNDING * max(demo.scale, 1.0):
        equal = "equal up to float rounding: the map moved with the digit"
    else:
        equal = "so the map did **not** simply move with the digit"
    holds = "the prediction holds" if first == second else "the prediction **changed**"
    return [
        SECTIONS[2],
        "",
        "The first layer applies one small kernel per channel at every position, so moving the "
        f"digit moves its maps. Test image #{demo.index} shifted {demo.rows} px down and "
        f"{demo.columns} px right:",
        "",
        f"- max |map of the shifted digit - the digit's map moved| = **{demo.error:.3g}**, over "
        f"every channel of the first layer, at least {demo.margin} px from the borders (the "
        f"first layer's receptive-field radius: nearer the border the convolution's zero padding "
        f"meets the filled-in background); the maps' values reach {demo.scale:.3g}: {equal}.",
        f"- after the pooling and the dense head the CNN predicts {classes[first]} "
        f"({p_first:.2f}) for the digit and {classes[second]} ({p_second:.2f}) for the shifted "
        f"digit: {holds}.",
        "",
        f"![channel {demo.channel}: map of the shifted digit vs the map moved](equivariance.png)",
        "",
        "Each 2x2 pooling keeps the strongest response of a window, so a shift of a pixel or two "
        "changes little after it; it is tolerance, not exact invariance, and the head still "
        "reads positions of the last map.",
        "",
    ]


def _hierarchy(measured: Measurements) -> list[str]:
    lines = [
        SECTIONS[3],
        "",
        "For the most active channels of the first and of the last block (highest mean peak "
        "response over the test split), the test images whose strongest unit responds most, "
        "cropped to that unit's receptive field (number above a patch: the activation). The "
        "receptive fields are computed from the layers (kernel, stride, padding and dilation of "
        "every convolution and pooling).",
        "",
        "| block | receptive field | units apart |",
        "|---:|---:|---:|",
    ]
    for block, field, _ in measured.hierarchy:
        lines.append(f"| {block} | {field.size}x{field.size} px | {field.jump} px |")
    lines.append("")
    for name, (block, field, _) in zip(("first", "last"), measured.hierarchy, strict=True):
        lines += [
            f"Block {block}, receptive field {field.size}x{field.size} px:",
            "",
            f"![block {block} strongest patches](hierarchy_{name}.png)",
            "",
        ]
    return lines


def _mistakes(measured: Measurements, classes: list[str]) -> list[str]:
    found = measured.mistakes
    tests = len(measured.cnn_test.predictions)
    confusion = measured.dense_test.confusion
    dense_wrong = int(confusion.sum() - np.trace(confusion))
    lines = [
        SECTIONS[4],
        "",
        f"The CNN (ONNX Runtime) gets {len(found)} of {tests} test images wrong (the dense "
        f"network {dense_wrong}). Each with its true class and the two highest probabilities:",
        "",
        "![misclassified test images](mistakes.png)",
        "",
    ]
    return lines + mistakes_table(found, classes)


def write_comparison_report(
    directory: Path,
    config: TrainConfig,
    dataset: Dataset,
    cnn: Contender,
    dense: Contender,
    measured: Measurements,
) -> Path:
    """Writes ``FIGURES``, ``index.md`` and ``index.html`` into ``directory``; returns the
    index path."""
    directory.mkdir(parents=True, exist_ok=True)
    test = dataset.test
    classes = dataset.classes
    plot_side_by_side(
        [(cnn, measured.cnn_test.accuracy), (dense, measured.dense_test.accuracy)],
        directory / "side_by_side.png",
    )
    plot_shift_examples(
        test.images[measured.equivariance.index],
        measured.fill,
        measured.cnn_shift.shifts,
        directory / "shift_examples.png",
    )
    plot_shift_accuracy(
        {"CNN": measured.cnn_shift, "dense": measured.dense_shift}, directory / "shift_accuracy.png"
    )
    plot_equivariance(measured.equivariance, classes, directory / "equivariance.png")
    for name, (block, field, patches) in zip(("first", "last"), measured.hierarchy, strict=True):
        plot_patches(block, field, patches, directory / f"hierarchy_{name}.png")
    plot_mistakes(test.images, measured.mistakes, classes, directory / "mistakes.png")
    lines = _header(config, dataset, cnn, dense)
    lines += _side_by_side(cnn, dense, measured)
    lines += _under_shifts(measured)
    lines += _weight_sharing(measured.equivariance, classes)
    lines += _hierarchy(measured)
    lines += _mistakes(measured, classes)
    index = directory / "index.md"
    index.write_text("\n".join(lines) + "\n")
    write_page(directory / PAGE, [("compare", directory)])
    logger.info("comparison written to %s", directory)
    return index
