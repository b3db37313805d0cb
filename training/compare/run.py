"""``python -m training compare``: a dense baseline beside the CNN, on one split, seed and budget.

Both networks are trained by :func:`training.train.fit` with one :class:`TrainConfig`: the same
split, the same epochs, batch size, optimiser, schedule and augmentation, and the same seed (so
the same batch order and augmentations). Both are exported by
:func:`training.publish.export_checked` (structure and parity checks) and measured through ONNX
Runtime, the way the service runs them. The CNN is the one ``train`` would build.

With a repository, the CNN is published as the next version (exactly as ``train`` publishes
it, report included) with ``compare/`` beside ``report/``; without one, ``compare/`` goes to
``--out`` and nothing is published.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.compare.baseline import (
    DenseConfig,
    build_dense_classifier,
    check_dense_layers,
    size_dense_baseline,
)
from training.compare.probes import (
    ChannelPatches,
    Mistake,
    ReceptiveField,
    block_receptive_fields,
    equivariance_error,
    first_layer,
    first_layer_maps,
    mistakes,
    receptive_field,
    softmax,
    strongest_patches,
)
from training.compare.shift import (
    ShiftAccuracy,
    accuracy_under_shifts,
    background_value,
    shift_images,
)
from training.config import TrainConfig
from training.data import Dataset
from training.engine import make_deterministic
from training.model import ImageClassifier, build_classifier, count_parameters
from training.onnx_eval import Evaluation, onnx_logits, onnx_session, score
from training.publish import PublishedVersion, export_checked, publish_classifier
from training.repository import check_model_name
from training.train import FitResult, fit, prepare_run, training_record

logger = logging.getLogger(__name__)

EQUIVARIANCE_SHIFT = (2, 3)
"""Rows down and columns right the weight-sharing figure moves its test digit."""


@dataclass
class Contender:
    """One trained network of the comparison."""

    name: str
    description: str
    classifier: ImageClassifier
    parameters: int
    fit: FitResult
    train_seconds: float
    """Wall time of the epoch loop (validation after each epoch included)."""


@dataclass
class EquivarianceDemo:
    """One test digit and the same digit shifted, through the first layer and the whole CNN."""

    index: int
    image: np.ndarray
    shifted: np.ndarray
    rows: int
    columns: int
    channel: int
    """The first-layer channel shown (the one whose map varies most on this digit)."""
    maps: np.ndarray
    """The shown channel: map of the digit, of the shifted digit, and the digit's map moved."""
    margin: int
    """Pixels kept out at each border: the first layer's receptive-field radius."""
    error: float
    """max |map of the shifted digit - moved map| in the interior, over every channel."""
    scale: float
    """max |map| of the digit over every channel, to read the error against."""
    predictions: tuple[tuple[int, float], tuple[int, float]]
    """(class, probability) for the digit and for the shifted digit (ONNX Runtime)."""


@dataclass
class Measurements:
    """Everything the comparison report shows."""

    cnn_test: Evaluation
    dense_test: Evaluation
    cnn_shift: ShiftAccuracy
    dense_shift: ShiftAccuracy
    fill: np.ndarray
    equivariance: EquivarianceDemo
    hierarchy: list[tuple[int, ReceptiveField, list[ChannelPatches]]]
    """(block number from 1, the block's receptive field, its strongest patches)."""
    mistakes: list[Mistake]


@dataclass
class Comparison:
    """The result of :func:`run_comparison`."""

    config: TrainConfig
    dataset: Dataset
    cnn: Contender
    dense: Contender
    measurements: Measurements
    directory: Path
    """Where compare/index.md and its figures went."""
    version: PublishedVersion | None
    """The CNN's published version, when a repository was given."""

    def summary(self) -> list[str]:
        """One line per network: parameters, accuracy unshifted and under shifts, time."""
        measured = self.measurements
        lines = []
        for contender, test, shifted in (
            (self.cnn, measured.cnn_test, measured.cnn_shift),
            (self.dense, measured.dense_test, measured.dense_shift),
        ):
            under = " / ".join(f"{a:.4f}" for a in shifted.mean())
            pixels = " / ".join(str(k) for k in shifted.shifts)
            lines.append(
                f"{contender.name}: {contender.parameters:,} parameters, test accuracy "
                f"{test.accuracy:.4f}, shifted {pixels} px: {under}, trained in "
                f"{contender.train_seconds:.1f} s"
            )
        return lines


def train_contender(
    name: str,
    description: str,
    classifier: ImageClassifier,
    dataset: Dataset,
    config: TrainConfig,
    device: torch.device,
    checkpoint_dir: Path,
) -> Contender:
    """Trains ``classifier`` with ``config`` (seeded first) and keeps its best weights."""
    logger.info("%s: %s, %d parameters", name, description, count_parameters(classifier))
    started = time.monotonic()
    result = fit(classifier, dataset, config, device, checkpoint_dir)
    seconds = time.monotonic() - started
    classifier.load_state_dict(result.best_state)
    logger.info("%s trained in %.1f s (best epoch %d)", name, seconds, result.best_epoch)
    return Contender(name, description, classifier, count_parameters(classifier), result, seconds)


def equivariance_demo(
    classifier: ImageClassifier,
    cnn_onnx: Path,
    images: np.ndarray,
    fill: np.ndarray,
    index: int = 0,
    shift: tuple[int, int] = EQUIVARIANCE_SHIFT,
) -> EquivarianceDemo:
    rows, columns = shift
    image = images[index : index + 1]
    shifted = shift_images(image, rows, columns, fill)
    maps_of = first_layer_maps(classifier)
    maps, of_shifted = maps_of(image)[0], maps_of(shifted)[0]
    channel = int(np.argmax(maps.reshape(len(maps), -1).std(axis=1)))
    moved = shift_images(maps[np.newaxis], rows, columns, 0)[0]
    field = receptive_field(first_layer(classifier.convnet))
    margin = (field.size - 1) // 2
    probabilities = softmax(onnx_logits(onnx_session(cnn_onnx), np.concatenate([image, shifted])))
    first, second = (int(p.argmax()) for p in probabilities)
    return EquivarianceDemo(
        index=index,
        image=image[0],
        shifted=shifted[0],
        rows=rows,
        columns=columns,
        channel=channel,
        maps=np.stack([maps[channel], of_shifted[channel], moved[channel]]),
        margin=margin,
        error=equivariance_error(maps_of, image, rows, columns, margin, fill),
        scale=float(np.abs(maps).max()),
        predictions=(
            (first, float(probabilities[0, first])),
            (second, float(probabilities[1, second])),
        ),
    )


def measure(
    cnn: Contender, dense: Contender, cnn_onnx: Path, dense_onnx: Path, dataset: Dataset
) -> Measurements:
    """Test accuracy and accuracy under shifts of both exported models; the CNN's probes."""
    test = dataset.test
    fill = background_value(test.images)
    classes = len(dataset.classes)
    scored = []
    shifted = []
    for path in (cnn_onnx, dense_onnx):
        session = onnx_session(path)
        logits = onnx_logits(session, test.images)
        scored.append((score(logits.argmax(axis=1), test.labels, classes), logits))
        shifted.append(
            accuracy_under_shifts(
                functools.partial(onnx_logits, session), test.images, test.labels, fill=fill
            )
        )
        logger.info("%s under shifts: %s", path.name, [round(a, 4) for a in shifted[-1].mean()])
    blocks = len(block_receptive_fields(cnn.classifier.convnet))
    hierarchy = []
    for block in (0, blocks - 1):  # the same block twice for a one-block network
        field, patches = strongest_patches(cnn.classifier, test.images, block, fill=fill)
        hierarchy.append((block + 1, field, patches))
    return Measurements(
        cnn_test=scored[0][0],
        dense_test=scored[1][0],
        cnn_shift=shifted[0],
        dense_shift=shifted[1],
        fill=fill,
        equivariance=equivariance_demo(cnn.classifier, cnn_onnx, test.images, fill),
        hierarchy=hierarchy,
        mistakes=mistakes(scored[0][1], test.labels),
    )


def run_comparison(
    config: TrainConfig, *, out: Path | None = None, dense_layers: int = 2
) -> Comparison:
    """Trains, exports and measures both networks; writes ``compare/``.

    ``out`` None: the CNN is published as the next version of ``config.repository`` /
    ``config.model_name`` with ``compare/`` inside it; else ``compare``'s files go to ``out``.
    """
    from training.compare.report import write_comparison_report

    check_dense_layers(dense_layers)
    if out is None:
        check_model_name(config.model_name)
    run = prepare_run(config)
    config, device, dataset, model_config = run.config, run.device, run.dataset, run.model_config
    mean, std = run.mean, run.std
    with tempfile.TemporaryDirectory(prefix="convserve-compare-") as scratch_name:
        scratch = Path(scratch_name)
        cnn = train_contender(
            "CNN",
            f"blocks {'/'.join(','.join(map(str, b)) for b in model_config.blocks)}, "
            f"{model_config.kernel_size}x{model_config.kernel_size} kernels, {model_config.head} "
            f"head, hidden {','.join(map(str, model_config.hidden_units)) or 'none'}",
            build_classifier(model_config, mean, std).to(device),
            dataset,
            config,
            device,
            scratch / "cnn",
        )
        dense_config = DenseConfig(
            in_channels=dataset.channels,
            image_size=dataset.image_size,
            num_classes=len(dataset.classes),
            hidden_units=size_dense_baseline(
                cnn.parameters,
                inputs=dataset.channels * dataset.image_size**2,
                num_classes=len(dataset.classes),
                layers=dense_layers,
            ),
            activation=model_config.activation,
            dropout=model_config.dropout,
        )
        make_deterministic(config.seed)  # the same initial random state as the CNN had
        dense = train_contender(
            "dense",
            dense_config.describe(),
            build_dense_classifier(dense_config, mean, std).to(device),
            dataset,
            config,
            device,
            scratch / "dense",
        )
        dense_onnx = scratch / "dense.onnx"
        export_checked(dense.classifier, dense_onnx, dataset.test.images)
        measured: list[Measurements] = []

        def write(directory: Path, cnn_onnx: Path) -> None:
            measured.append(measure(cnn, dense, cnn_onnx, dense_onnx, dataset))
            write_comparison_report(directory, config, dataset, cnn, dense, measured[-1])

        version = None
        if out is None:
            version = publish_classifier(
                cnn.classifier,
                dataset,
                training_record(config, dataset, cnn.fit, device, cnn.train_seconds),
                Path(config.repository),
                config.model_name,
                history=cnn.fit.history,
                write_report=config.report,
                write_extra=lambda staging, onnx_path: write(staging / "compare", onnx_path),
            )
            directory = version.path / "compare"
        else:
            cnn_onnx = scratch / "cnn.onnx"
            export_checked(cnn.classifier, cnn_onnx, dataset.test.images)
            write(out, cnn_onnx)
            directory = out
    return Comparison(config, dataset, cnn, dense, measured[0], directory, version)
