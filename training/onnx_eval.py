"""Accuracy of an exported model, measured the way the service runs it: through ONNX Runtime.

``python -m training evaluate --model model_repository/mnist_cnn/1`` (see ``training.cli``) and
the test accuracy written into the metadata both come from :func:`evaluate_onnx`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from training.errors import ConfigError

logger = logging.getLogger(__name__)


def onnx_session(path: Path) -> ort.InferenceSession:
    """A CPU session: the reference the parity check and the test accuracy are measured on."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; the GPU build warns about missing CUDA
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, as ONNX Runtime reads them."""
    return dict(onnx_session(path).get_modelmeta().custom_metadata_map)


def training_arguments(metadata: dict[str, str]) -> dict[str, Any]:
    text = metadata.get("convserve.training", "")
    return json.loads(text) if text else {}


def onnx_logits(
    session: ort.InferenceSession, images: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Logits float32 ``[N, classes]`` for uint8 images ``[N, C, H, W]``."""
    expected = session.get_inputs()[0].shape[1:]
    if list(images.shape[1:]) != list(expected):
        raise ConfigError(
            f"the model takes images of shape {expected} (C, H, W) but the data set has "
            f"{list(images.shape[1:])}; evaluate with the data set the model was trained on"
        )
    input_name = session.get_inputs()[0].name
    outputs = [
        session.run(None, {input_name: np.ascontiguousarray(images[start : start + batch_size])})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs)


@dataclass
class Evaluation:
    """What the exported model gets right on one split."""

    accuracy: float
    per_class_accuracy: list[float]
    confusion: np.ndarray
    """``confusion[true, predicted]`` counts."""
    predictions: np.ndarray

    def to_text(self, classes: list[str]) -> str:
        lines = [f"accuracy: {self.accuracy:.4f} ({len(self.predictions)} images)"]
        lines.append("per-class accuracy:")
        width = max(len(name) for name in classes)
        for name, accuracy, row in zip(
            classes, self.per_class_accuracy, self.confusion, strict=True
        ):
            lines.append(f"  {name:<{width}}  {accuracy:.4f}  ({int(row.sum())} images)")
        return "\n".join(lines)


def score(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> Evaluation:
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    totals = confusion.sum(axis=1)
    per_class = [
        float(confusion[i, i] / totals[i]) if totals[i] else float("nan")
        for i in range(num_classes)
    ]
    accuracy = float(np.mean(predictions == labels)) if len(labels) else float("nan")
    return Evaluation(accuracy, per_class, confusion, predictions)


def evaluate_onnx(
    path: Path, images: np.ndarray, labels: np.ndarray, num_classes: int
) -> Evaluation:
    """Runs the ONNX file on ``images`` with ONNX Runtime and scores the argmax."""
    logits = onnx_logits(onnx_session(path), images)
    if logits.shape[1] != num_classes:
        raise ConfigError(
            f"the model has {logits.shape[1]} outputs but the data set {num_classes} classes"
        )
    evaluation = score(logits.argmax(axis=1), labels, num_classes)
    logger.info("ONNX Runtime accuracy of %s: %.4f", path, evaluation.accuracy)
    return evaluation
