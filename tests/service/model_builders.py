"""Extra test models for the service tests, on top of tests/model_factory.py.

- a *broken* model: a version directory whose model.onnx is not an ONNX file.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from tests.model_factory import TinySpec, build_tiny_model


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
