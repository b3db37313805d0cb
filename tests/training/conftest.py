"""Fixtures of the training tests: small real data, a tiny CNN, one tiny published version."""

from __future__ import annotations

import os
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.config import TrainConfig
from training.data import DataConfig, Dataset, load_data
from training.model_config import ModelConfig

# As the CLI does (training/cli.py): no spinning OpenMP threads when other tests share the
# cores; before any test module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TINY_MODEL = {"blocks": ((8,), (16,)), "hidden_units": (32,), "dropout": 0.1}
"""A CNN small enough to train in a fraction of a second per epoch."""


def tiny_train_config(tmp_path: Path, **changes: object) -> TrainConfig:
    """Three epochs of the tiny CNN on 300 embedded digits (210 train / 30 val / 60 test).

    No augmentation by default: in 39 steps it costs more accuracy than it gives.
    """
    config = TrainConfig(
        data=DataConfig(max_samples=300),
        model_overrides=dict(TINY_MODEL),
        epochs=3,
        batch_size=16,
        augment="none",
        repository=str(tmp_path / "repository"),
        model_name="tiny_cnn",
        checkpoint_dir=str(tmp_path / "runs"),
        progress=False,
    )
    return replace(config, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_dataset() -> Dataset:
    return load_data(DataConfig(max_samples=300))


@pytest.fixture(scope="session")
def tiny_model_config() -> ModelConfig:
    return ModelConfig(**TINY_MODEL)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_version(tmp_path_factory: pytest.TempPathFactory):
    """One trained tiny model published as version 1 (with its report). Read-only for tests."""
    from training.train import main

    base = tmp_path_factory.mktemp("tiny_version")
    return main(tiny_train_config(base))


def write_image_folder(
    root: Path, classes: int = 3, per_class: int = 8, size: int = 20, mode: str = "RGB"
) -> Path:
    """PNG images of ``classes`` easy patterns (bars at different places) with noise."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            start = label * size // classes
            pixels[:, start : start + size // classes] = 255
            Image.fromarray(pixels, "RGB").convert(mode).save(folder / f"{index}.png")
    return root


def write_idx_mnist(root: Path, train: int = 200, test: int = 50) -> Path:
    """Files in the layout torchvision's MNIST reads (``<root>/MNIST/raw/*-idx?-ubyte``)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        header = struct.pack(">BBBBIII", 0, 0, 8, 3, count, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = struct.pack(">BBBBI", 0, 0, 8, 1, count)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    return root
