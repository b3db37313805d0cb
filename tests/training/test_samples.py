"""`python -m training samples`: held-out images as PNG files, classes in turn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.data import Split
from training.samples import write_samples


def test_samples_interleave_classes_and_keep_the_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 1, 8, 8), dtype=np.uint8)
    split = Split(images=images, labels=np.array([0, 0, 0, 1, 1, 2]))

    paths = write_samples(split, ["zero", "one", "two"], tmp_path, count=5)

    assert [p.name for p in paths] == [
        "0000-label-zero.png",
        "0001-label-one.png",
        "0002-label-two.png",
        "0003-label-zero.png",
        "0004-label-one.png",
    ]
    # Index 0 (first zero), 3 (first one), 5 (the two), 1 (second zero), 4 (second one).
    for path, index in zip(paths, [0, 3, 5, 1, 4], strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), images[index, 0])


def test_rgb_samples_are_written_as_rgb(tmp_path: Path) -> None:
    images = np.zeros((1, 3, 4, 4), dtype=np.uint8)
    images[0, 0] = 255  # red
    (path,) = write_samples(Split(images, np.array([0])), ["red/ish"], tmp_path, count=3)
    assert path.name == "0000-label-red_ish.png"
    with Image.open(path) as image:
        assert image.mode == "RGB"
        assert image.getpixel((0, 0)) == (255, 0, 0)
