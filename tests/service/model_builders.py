"""Extra test models for the service tests, on top of tests/model_factory.py.

- a *slow* model: the tiny linear classifier plus an input-dependent matrix product that takes
  tens of milliseconds per batch, so tests can keep the runtime busy (queues, deadlines,
  draining) without sleeping in the server;
- a *broken* model: a version directory whose model.onnx is not an ONNX file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests.model_factory import TinySpec, build_tiny_model, write_version


def build_slow_model(spec: TinySpec, size: int = 768, repeats: int = 4) -> onnx.ModelProto:
    """The tiny model whose logits get + 1e-30 * sum(M @ W ... @ W), M made from the input.

    The product depends on the input (so ONNX Runtime cannot fold it away) and costs about
    2 * size^3 * repeats FLOPs per batch, whatever the batch size.
    """
    model = build_tiny_model(spec)
    graph = model.graph
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((size, size)) / size).astype(np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(weight, "slow_weight"),
            numpy_helper.from_array(np.array([size, size], dtype=np.int64), "slow_shape"),
            numpy_helper.from_array(np.array(1e-30, dtype=np.float32), "slow_scale"),
        ]
    )
    nodes = [
        helper.make_node("ReduceMean", ["scaled"], ["slow_mean"], keepdims=0),
        helper.make_node("Expand", ["slow_mean", "slow_shape"], ["slow_0"]),
    ]
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [f"slow_{i}", "slow_weight"], [f"slow_{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"slow_{repeats}"], ["slow_sum"], keepdims=0),
        helper.make_node("Mul", ["slow_sum", "slow_scale"], ["slow_tiny"]),
        helper.make_node("Add", ["linear", "slow_tiny"], ["logits"]),
    ]
    # The tiny model's Gemm writes `logits`; rename it so our Add produces the output.
    for node in graph.node:
        if node.output[0] == "logits":
            node.output[0] = "linear"
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def write_slow_version(
    repository: Path, name: str, version: int, spec: TinySpec, size: int = 768, repeats: int = 4
) -> Path:
    """Writes a slow model version (same metadata contract as write_version)."""
    directory = write_version(repository, name, version, spec)
    onnx.save(build_slow_model(spec, size, repeats), directory / "model.onnx")
    return directory


def write_broken_version(repository: Path, name: str, version: int) -> Path:
    """A version directory whose model.onnx is garbage: loading it must fail, alone."""
    directory = repository / name / str(version)
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(b"this is not an ONNX model")
    (directory / "labels.txt").write_text("a\nb\n")
    return directory


def write_model_without_metadata(repository: Path, name: str, spec: TinySpec) -> Path:
    """A valid graph whose metadata_props and metadata.json are missing."""
    model = build_tiny_model(spec)
    del model.metadata_props[:]
    directory = repository / name / "1"
    directory.mkdir(parents=True)
    onnx.save(model, directory / "model.onnx")
    return directory
