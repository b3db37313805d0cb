"""Tiny ONNX models that follow docs/model-repository.md, built with onnx.helper (no torch).

Used by the service and deployment tests so they need neither PyTorch nor a training run.
The model is a fixed linear classifier on the raw pixels: deterministic, fast, and its answer
for a given input can be recomputed in numpy by the test (`reference_logits`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class TinySpec:
    """Shape and labels of a tiny test model."""

    channels: int = 1
    height: int = 28
    width: int = 28
    labels: tuple[str, ...] = tuple(str(i) for i in range(10))
    seed: int = 0

    @property
    def color_mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        features = self.channels * self.height * self.width
        weight = rng.normal(0.0, 0.05, size=(features, len(self.labels))).astype(np.float32)
        bias = rng.normal(0.0, 0.01, size=(len(self.labels),)).astype(np.float32)
        return weight, bias


def reference_logits(spec: TinySpec, images: np.ndarray) -> np.ndarray:
    """What the tiny model computes, in numpy: uint8 [N, C, H, W] -> float32 [N, classes]."""
    weight, bias = spec.weights()
    flat = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
    return (flat @ weight + bias).astype(np.float32)


def build_tiny_model(spec: TinySpec) -> onnx.ModelProto:
    weight, bias = spec.weights()
    nodes = [
        helper.make_node("Cast", ["images"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["as_float", "scale"], ["scaled"]),
        helper.make_node("Flatten", ["scaled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_linear",
        inputs=[
            helper.make_tensor_value_info(
                "images", TensorProto.UINT8, ["N", spec.channels, spec.height, spec.width]
            )
        ],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(spec.labels)])
        ],
        initializer=[
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in contract_metadata(spec).items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value
    onnx.checker.check_model(model)
    return model


def contract_metadata(spec: TinySpec) -> dict[str, str]:
    preprocessing = {
        "height": spec.height,
        "width": spec.width,
        "channels": spec.channels,
        "color_mode": spec.color_mode,
        "resize": "bilinear",
        "layout": "NCHW",
        "input_name": "images",
        "input_dtype": "uint8",
        "output_name": "logits",
        "mean": [0.0] * spec.channels,
        "std": [1.0] * spec.channels,
    }
    return {
        "convserve.format": "1",
        "convserve.labels": json.dumps(list(spec.labels)),
        "convserve.preprocessing": json.dumps(preprocessing),
        "convserve.model_config": json.dumps({"kind": "tiny_linear"}),
        "convserve.training": json.dumps({}),
        "convserve.dataset": "synthetic",
        "convserve.test_accuracy": "",
        "convserve.created": "1970-01-01T00:00:00Z",
    }


def write_version(repository: Path, name: str, version: int, spec: TinySpec) -> Path:
    """Writes one version of a tiny model into a repository, as training would."""
    directory = repository / name / str(version)
    directory.mkdir(parents=True)
    onnx.save(build_tiny_model(spec), directory / "model.onnx")
    (directory / "labels.txt").write_text("\n".join(spec.labels) + "\n")
    metadata = {
        key: (
            json.loads(value)
            if key.endswith(("labels", "preprocessing", "config", "training"))
            else value
        )
        for key, value in contract_metadata(spec).items()
    }
    (directory / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return directory


REGION = (slice(8, 14), slice(16, 22))
"""Rows and columns of the only pixels the region model reads."""


def region_graph() -> onnx.ModelProto:
    """uint8 ``[N, 1, 28, 28]`` -> logits ``[N, 2]``: class 0 = 4 x the mean of REGION / 255.

    Class 1's logit is 0, so on a white image class 0 wins with p = sigmoid(4) = 0.982; hiding
    the whole region brings it down to p = 0.5. Nothing outside REGION reaches the output.
    """
    rows, columns = REGION
    pixels = (rows.stop - rows.start) * (columns.stop - columns.start)
    weight = np.zeros((pixels, 2), dtype=np.float32)
    weight[:, 0] = 4.0 / pixels
    nodes = [
        helper.make_node("Cast", ["images"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["as_float", "scale"], ["scaled"]),
        helper.make_node("Slice", ["scaled", "starts", "ends", "axes"], ["region"]),
        helper.make_node("Flatten", ["region"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "weight"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "region_only",
        inputs=[helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 1, 28, 28])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array([rows.start, columns.start]), "starts"),
            numpy_helper.from_array(np.array([rows.stop, columns.stop]), "ends"),
            numpy_helper.from_array(np.array([2, 3]), "axes"),
            numpy_helper.from_array(weight, "weight"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def region_model(path: Path) -> Path:
    """The region model, saved to `path` without metadata (what the occlusion tests read)."""
    onnx.save(region_graph(), path)
    return path


REGION_SPEC = TinySpec(labels=("region", "other"))
"""The region model's contract: 1 x 28 x 28 grayscale, two classes."""


def write_region_version(repository: Path, name: str, version: int) -> Path:
    """The region model as a repository version, with the contract's metadata."""
    model = region_graph()
    for key, value in contract_metadata(REGION_SPEC).items():
        model.metadata_props.add(key=key, value=value)
    directory = repository / name / str(version)
    directory.mkdir(parents=True)
    onnx.save(model, directory / "model.onnx")
    return directory
