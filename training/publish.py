"""From a trained module to a new version in the model repository, in one staging directory.

Order: export -> checker and parity (batch 1 and 8) -> test accuracy of the *exported* file
through ONNX Runtime -> metadata embedded -> labels.txt, metadata.json, report/ (index.md, its
figures, and index.html, the same as one self-contained page) -> one rename
to the next version. Any failure leaves no version behind (the staging directory is removed).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from training.data import Dataset
from training.export import (
    check_parity,
    contract_metadata,
    embed_metadata,
    export_onnx,
    write_version_files,
)
from training.model import ImageClassifier
from training.onnx_eval import Evaluation, evaluate_onnx
from training.page import write_version_page
from training.preprocessing import preprocessing_metadata
from training.repository import check_model_name, publish, staging_directory

logger = logging.getLogger(__name__)

PARITY_BATCH_SIZES = (1, 8)


@dataclass
class PublishedVersion:
    """Where a new version went, and what its exported model scored."""

    version: int
    path: Path
    test_accuracy: float | None
    evaluation: Evaluation | None = None


def _normalisation(module: nn.Module) -> tuple[list[float], list[float]]:
    mean = module.get_buffer("mean").flatten().tolist()
    std = module.get_buffer("std").flatten().tolist()
    return [round(m, 6) for m in mean], [round(s, 6) for s in std]


def export_checked(module: nn.Module, onnx_path: Path, images: np.ndarray) -> None:
    """Exports ``module`` to ``onnx_path`` and proves it: structure, then parity at batch 1 and 8.

    The one export path of every model this package writes, published or not (the comparison's
    dense baseline goes through it too).
    """
    export_onnx(module, onnx_path, images[:2])
    check_parity(onnx_path, module, images, PARITY_BATCH_SIZES)


@contextlib.contextmanager
def _exported(
    module: nn.Module, repository: Path, model_name: str, images: np.ndarray
) -> Iterator[tuple[Path, Path]]:
    """A staging directory holding the module's parity-checked ONNX export: (staging, onnx)."""
    check_model_name(model_name)
    with staging_directory(repository / model_name) as staging:
        onnx_path = staging / "model.onnx"
        export_checked(module, onnx_path, images)
        yield staging, onnx_path


def _publish(
    staging: Path, onnx_path: Path, labels: list[str], metadata: dict[str, str]
) -> tuple[int, Path]:
    """Embeds the metadata, writes labels.txt and metadata.json, renames to the next version."""
    embed_metadata(onnx_path, metadata)
    write_version_files(staging, labels, metadata)
    return publish(staging, staging.parent)


def publish_classifier(
    classifier: ImageClassifier,
    dataset: Dataset,
    training_record: dict[str, Any],
    repository: Path,
    model_name: str,
    *,
    history: list[dict[str, float]],
    write_report: bool = True,
    write_extra: Callable[[Path, Path], None] | None = None,
) -> PublishedVersion:
    """Exports a trained classifier with its test accuracy and report as the next version.

    ``write_extra(staging, onnx_path)``, when given, writes more files into the version before
    it is published (``python -m training compare`` adds ``compare/``).
    """
    test = dataset.test
    mean, std = _normalisation(classifier)
    with _exported(classifier, repository, model_name, test.images) as (staging, onnx_path):
        evaluation = evaluate_onnx(onnx_path, test.images, test.labels, len(dataset.classes))
        metadata = contract_metadata(
            labels=dataset.classes,
            preprocessing=preprocessing_metadata(
                dataset.color_mode, dataset.image_size, dataset.image_size, mean, std
            ),
            model_config=classifier.network_config(),
            training=training_record,
            dataset=dataset.name,
            test_accuracy=evaluation.accuracy,
        )
        if write_report:
            from training.report import write_report as write_report_files

            write_report_files(
                staging / "report",
                classifier=classifier,
                classes=dataset.classes,
                history=history,
                evaluation=evaluation,
                test_image=test.images[0],
                test_label=int(test.labels[0]),
                summary={
                    "model_name": model_name,
                    "dataset": dataset.summary(),
                    "test accuracy (ONNX Runtime)": f"{evaluation.accuracy:.4f}",
                    "best epoch (validation)": training_record.get("best_epoch"),
                    "created": metadata["convserve.created"],
                },
                onnx_path=onnx_path,
                test_images=test.images,
                test_labels=test.labels,
            )
        if write_extra is not None:
            write_extra(staging, onnx_path)
        if write_report:
            # Last, so that the page also holds what write_extra added (compare/).
            write_version_page(staging)
        version, path = _publish(staging, onnx_path, dataset.classes, metadata)
    return PublishedVersion(version, path, evaluation.accuracy, evaluation)


def publish_untrained(
    module: nn.Module,
    *,
    labels: list[str],
    color_mode: str,
    image_size: int,
    model_config: dict[str, Any],
    repository: Path,
    model_name: str,
    seed: int = 0,
) -> PublishedVersion:
    """Exports an untrained module (uint8 pixels -> logits) through the same checks."""
    channels = 1 if color_mode == "L" else 3
    images = np.random.default_rng(seed).integers(
        0, 256, size=(8, channels, image_size, image_size), dtype=np.uint8
    )
    mean, std = _normalisation(module)
    with _exported(module, repository, model_name, images) as (staging, onnx_path):
        metadata = contract_metadata(
            labels=labels,
            preprocessing=preprocessing_metadata(color_mode, image_size, image_size, mean, std),
            model_config=model_config,
            training={"trained": False, "seed": seed},
            dataset="none",
            test_accuracy=None,
        )
        version, path = _publish(staging, onnx_path, labels, metadata)
    return PublishedVersion(version, path, None)
