"""export-arch: an untrained torchvision resnet18 through the same export path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.cli import main
from training.onnx_eval import onnx_session


def test_resnet18_is_exported_with_the_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "export-arch",
            "resnet18",
            "--num-classes",
            "10",
            "--input-size",
            "32",
            "--channels",
            "3",
            "--repository",
            str(tmp_path),
            "--model-name",
            "resnet18",
        ]
    )
    assert code == 0
    version = tmp_path / "resnet18" / "1"
    assert f"wrote version 1: {version}" in capsys.readouterr().out
    metadata = json.loads((version / "metadata.json").read_text())
    # torchvision resnet18 with a 10-way head: 11,689,512 - 512*1000 - 1000 + 512*10 + 10.
    assert metadata["convserve.model_config"]["parameters"] == 11_181_642
    assert metadata["convserve.preprocessing"]["color_mode"] == "RGB"
    assert metadata["convserve.test_accuracy"] == ""
    images = np.zeros((3, 3, 32, 32), dtype=np.uint8)
    (logits,) = onnx_session(version / "model.onnx").run(None, {"images": images})
    assert logits.shape == (3, 10)


def test_unknown_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export-arch", "vgg99", "--repository", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown architecture 'vgg99'; choose one of: resnet18, resnet34, resnet50"
    )
