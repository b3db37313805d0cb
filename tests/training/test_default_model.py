"""The default command on the embedded digits: trained, exported, >= 98% through ONNX Runtime."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from training.cli import main


@pytest.mark.slow
def test_default_train_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repository = tmp_path / "repository"
    started = time.monotonic()
    code = main(
        [
            "train",
            "--repository",
            str(repository),
            "--model-name",
            "mnist_cnn",
            "--checkpoint-dir",
            str(tmp_path / "runs"),
            "--no-progress",
        ]
    )
    elapsed = time.monotonic() - started
    assert code == 0
    out = capsys.readouterr().out
    version = repository / "mnist_cnn" / "1"
    assert f"wrote version 1: {version}" in out
    accuracy = float(re.search(r"test accuracy \(ONNX Runtime\): ([0-9.]+)", out).group(1))
    # 0.9900 on the development machine (docs/training.md). The floor keeps a margin: another
    # CPU's kernels round differently, and one image more or less wrong is 0.001.
    assert accuracy >= 0.98
    metadata = json.loads((version / "metadata.json").read_text())
    assert metadata["convserve.test_accuracy"] == f"{accuracy:.4f}"
    assert metadata["convserve.training"]["split_sizes"] == {
        "train": 3500,
        "val": 500,
        "test": 1000,
    }
    assert (version / "report" / "index.md").is_file()
    # The 2-minute budget of `make run` is a benchmark figure (docs/training.md), not a test:
    # the time is printed for the record and asserted nowhere.
    print(f"default training took {elapsed:.0f} s")
