"""PyTorch -> ONNX, proven: checker, contract I/O, ONNX Runtime parity at batch 1 and N.

The exported graph takes ``images`` uint8 ``[N, C, H, W]`` (N dynamic) and returns ``logits``
float32 ``[N, classes]``; the cast, scaling and normalisation are inside it because the module
exported is :class:`training.model.ImageClassifier`. The file is self-contained (no external
data). Exporter: ``torch.onnx.export(..., dynamo=True)``, the supported one in torch 2.x.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from contract.layout import (
    CONTRACT_FORMAT,
    CREATED_KEY,
    DATASET_KEY,
    FORMAT_KEY,
    INPUT_NAME,
    LABELS_KEY,
    MODEL_CONFIG_KEY,
    OUTPUT_NAME,
    PREPROCESSING_KEY,
    QUANTIZATION_KEY,
    TEST_ACCURACY_KEY,
    TRAINING_KEY,
)
from training.errors import ExportError
from training.onnx_eval import onnx_session

logger = logging.getLogger(__name__)

OPSET = 18
RTOL = 1e-3
ATOL = 1e-5
JSON_KEYS = (LABELS_KEY, PREPROCESSING_KEY, MODEL_CONFIG_KEY, TRAINING_KEY, QUANTIZATION_KEY)


def contract_metadata(
    *,
    labels: list[str],
    preprocessing: dict[str, Any],
    model_config: dict[str, Any],
    training: dict[str, Any],
    dataset: str,
    test_accuracy: float | None,
    created: datetime | None = None,
) -> dict[str, str]:
    """The ``convserve.*`` metadata_props of docs/model-repository.md, every value a string."""
    created = created or datetime.now(timezone.utc)
    return {
        FORMAT_KEY: CONTRACT_FORMAT,
        LABELS_KEY: json.dumps(list(labels)),
        PREPROCESSING_KEY: json.dumps(preprocessing),
        MODEL_CONFIG_KEY: json.dumps(model_config),
        TRAINING_KEY: json.dumps(training),
        DATASET_KEY: dataset,
        TEST_ACCURACY_KEY: "" if test_accuracy is None else f"{test_accuracy:.4f}",
        CREATED_KEY: created.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def decoded_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """``metadata.json``: the same keys, with the JSON values decoded."""
    return {
        key: json.loads(value) if key in JSON_KEYS else value for key, value in metadata.items()
    }


def export_onnx(classifier: nn.Module, path: Path, example: np.ndarray) -> None:
    """Exports ``classifier`` (uint8 pixels -> logits) to one self-contained ONNX file.

    ``example`` is a uint8 batch of at least two images (a batch of one would fix N to 1).
    """
    if len(example) < 2:
        example = np.concatenate([example, example])
    module = copy.deepcopy(classifier).cpu().eval()
    module.to(memory_format=torch.contiguous_format)
    batch = torch.export.Dim("batch")
    # The exporter reports progress on stdout; keep the CLI's output to what it prints itself.
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        try:
            torch.onnx.export(
                module,
                (torch.from_numpy(np.ascontiguousarray(example)),),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"images": {0: batch}},
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as error:
            raise ExportError(f"torch.onnx.export failed: {error}") from error
    logger.debug("exporter output: %s", chatter.getvalue())
    model = onnx.load(str(path))
    check_structure(model, example.shape[1:])


def check_structure(model: onnx.ModelProto, image_shape: tuple[int, ...]) -> None:
    """onnx.checker plus the contract's input and output (names, dtypes, dynamic batch)."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"onnx.checker rejected the exported model: {error}") from error
    inputs = [(i.name, i.type.tensor_type) for i in model.graph.input]
    outputs = [(o.name, o.type.tensor_type) for o in model.graph.output]
    if [name for name, _ in inputs] != [INPUT_NAME] or [n for n, _ in outputs] != [OUTPUT_NAME]:
        raise ExportError(f"expected input 'images' and output 'logits', got {inputs} {outputs}")
    image, logits = inputs[0][1], outputs[0][1]
    if image.elem_type != onnx.TensorProto.UINT8 or logits.elem_type != onnx.TensorProto.FLOAT:
        raise ExportError("expected a uint8 input and a float32 output")
    dims = image.shape.dim
    if not dims[0].dim_param or [d.dim_value for d in dims[1:]] != list(image_shape):
        raise ExportError(f"expected input shape [N, {image_shape}] with N dynamic, got {dims}")


def check_parity(
    path: Path, reference: nn.Module, images: np.ndarray, batch_sizes: tuple[int, ...] = (1, 8)
) -> float:
    """ONNX Runtime output == PyTorch output (rtol 1e-3, atol 1e-5) at each batch size.

    Returns the largest absolute difference; raises ExportError naming it otherwise.
    """
    session = onnx_session(path)
    module = copy.deepcopy(reference).cpu().eval()
    largest = 0.0
    for size in batch_sizes:
        batch = np.ascontiguousarray(np.resize(images, (size, *images.shape[1:])))
        with torch.inference_mode():
            expected = module(torch.from_numpy(batch)).numpy()
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        if actual.shape != expected.shape:
            raise ExportError(
                f"ONNX Runtime returned shape {actual.shape} for batch {size}, "
                f"PyTorch {expected.shape}"
            )
        difference = float(np.max(np.abs(actual - expected)))
        largest = max(largest, difference)
        if not np.allclose(actual, expected, rtol=RTOL, atol=ATOL):
            raise ExportError(
                f"ONNX Runtime output differs from PyTorch at batch {size}: max abs diff "
                f"{difference:.3g} (allowed: rtol {RTOL}, atol {ATOL})"
            )
    logger.info("parity at batch sizes %s: max abs diff %.3g", batch_sizes, largest)
    return largest


def embed_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Writes ``metadata`` into the model's metadata_props (replacing same keys) in place."""
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), save_as_external_data=False)


def write_version_files(directory: Path, labels: list[str], metadata: dict[str, str]) -> None:
    """``labels.txt`` and ``metadata.json`` next to ``model.onnx``."""
    (directory / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    text = json.dumps(decoded_metadata(metadata), indent=2)
    (directory / "metadata.json").write_text(text + "\n")
