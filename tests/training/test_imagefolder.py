"""The user's images: the shared preprocessing function, colour inference, and bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.training.conftest import write_image_folder
from training.data import DataConfig, load_data
from training.errors import DatasetError
from training.imagefolder import load_image_folder
from training.preprocessing import prepare_image


def test_prepare_image_is_convert_then_bilinear_resize() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
    expected = np.asarray(image.convert("L").resize((16, 12), Image.Resampling.BILINEAR))
    pixels = prepare_image(image, "L", width=16, height=12)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 12, 16)
    np.testing.assert_array_equal(pixels[0], expected)
    rgb = prepare_image(image, "RGB", width=40, height=30)  # already that size: no resize
    np.testing.assert_array_equal(rgb, np.asarray(image).transpose(2, 0, 1))


def test_folder_of_rgb_pngs_is_read_resized_and_labelled(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=3, per_class=4, size=20)
    folder = load_image_folder(tmp_path, image_size=12)
    assert folder.classes == ["class_0", "class_1", "class_2"]
    assert folder.color_mode == "RGB"
    assert folder.images.shape == (12, 3, 12, 12)
    assert folder.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_grayscale_images_give_l_and_a_default_size_of_28(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=2, per_class=3, size=20, mode="L")
    folder = load_image_folder(tmp_path, image_size=None)
    assert folder.color_mode == "L"
    assert folder.images.shape == (6, 1, 28, 28)
    forced = load_image_folder(tmp_path, image_size=10, color_mode="RGB")
    assert forced.images.shape == (6, 3, 10, 10)


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "photos"
    with pytest.raises(DatasetError) as raised:
        load_data(DataConfig(dataset="imagefolder", data_dir=str(missing)))
    assert str(raised.value) == (
        f"data directory '{missing}' does not exist; pass --data-dir pointing at a folder with "
        f"one subfolder of images per class"
    )


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"data directory '.*' is empty: it has no class"):
        load_image_folder(tmp_path, 28)


def test_class_folder_without_images(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=2, per_class=3)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / ".hidden").write_text("not an image")
    with pytest.raises(DatasetError) as raised:
        load_image_folder(tmp_path, 28)
    assert str(raised.value) == f"class folder '{tmp_path / 'empty_class'}' has no images"


def test_undecodable_image_is_named(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=2, per_class=3)
    broken = tmp_path / "class_1" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetError) as raised:
        load_image_folder(tmp_path, 28)
    message = str(raised.value)
    assert message.startswith(f"cannot decode image '{broken}': ")
    assert message.endswith("remove the file or pass --skip-bad-images")


def test_undecodable_images_can_be_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_image_folder(tmp_path, classes=2, per_class=3)
    (tmp_path / "class_0" / "notes.txt").write_text("hello")
    (tmp_path / "class_1" / "truncated.jpg").write_bytes(b"\xff\xd8\xff")
    with caplog.at_level(logging.WARNING, logger="training"):
        folder = load_image_folder(tmp_path, 28, skip_bad_images=True)
    assert len(folder.labels) == 6
    assert sorted(Path(p).name for p in folder.skipped_files) == ["notes.txt", "truncated.jpg"]
    assert "skipped 2 of 8 files that do not decode" in caplog.text


def test_class_whose_files_all_fail_to_decode(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=2, per_class=3)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("x")
    with pytest.raises(DatasetError, match=r"class folder '.*junk' has no images that decode"):
        load_image_folder(tmp_path, 28, skip_bad_images=True)


def test_unknown_color_mode(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError, match="unknown color mode 'CMYK'; choose one of: auto, L, RGB"
    ):
        load_image_folder(tmp_path, 28, color_mode="CMYK")
