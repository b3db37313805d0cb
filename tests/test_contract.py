"""The contract both halves import (contract/): one preprocessing, one set of names.

The preprocessing test runs each side's own entry point on the same encoded files: training's
ImageFolder reader (what a model is trained on) and the server's Classify decoder (what it is
asked about), with the `convserve.preprocessing` metadata training writes. Their pixels must be
equal, bit for bit, including a resize and a colour conversion.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract import layout
from contract.preprocessing import preprocessing_metadata
from service.engine.images import decode_image
from service.repository.disk import Preprocessing, valid_model_name
from training.errors import RepositoryError
from training.imagefolder import load_image_folder
from training.repository import check_model_name


@pytest.mark.parametrize(("color_mode", "size"), [("L", 28), ("RGB", 32)])
def test_the_server_prepares_an_image_exactly_as_training_did(
    tmp_path: Path, color_mode: str, size: int
) -> None:
    rng = np.random.default_rng(3)
    originals = {
        "wide.png": Image.fromarray(rng.integers(0, 256, (23, 57, 3), dtype=np.uint8), "RGB"),
        "gray.png": Image.fromarray(rng.integers(0, 256, (61, 40), dtype=np.uint8), "L"),
        "exact.png": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
        "photo.jpg": Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8), "RGB"),
    }
    encoded = {}
    for name, image in originals.items():
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG" if name.endswith(".jpg") else "PNG")
        encoded[name] = buffer.getvalue()
        folder = tmp_path / "images" / name.split(".")[0]
        folder.mkdir(parents=True)
        (folder / name).write_bytes(encoded[name])
    trained = load_image_folder(tmp_path / "images", size, color_mode)
    metadata = preprocessing_metadata(color_mode, size, size, [0.5], [0.5])
    served = Preprocessing(
        height=int(metadata["height"]),  # type: ignore[call-overload]
        width=int(metadata["width"]),  # type: ignore[call-overload]
        channels=int(metadata["channels"]),  # type: ignore[call-overload]
        color_mode=str(metadata["color_mode"]),
        resize=str(metadata["resize"]),
    )
    for row, class_name in enumerate(trained.classes):
        name = next(n for n in encoded if n.startswith(class_name + "."))
        pixels = decode_image(encoded[name], served, max_bytes=1 << 20, max_pixels=1 << 20)
        np.testing.assert_array_equal(pixels, trained.images[row], err_msg=name)
        assert pixels.shape == (len(color_mode), size, size)


def test_both_halves_agree_on_model_names(tmp_path: Path) -> None:
    for name in ("mnist_cnn", "a", "v1.2", "_x", "A-b"):
        assert valid_model_name(name) and layout.is_model_name(name)
        check_model_name(name)
    for name in ("-dash", ".hidden", "", "a b", "é", "a/b"):
        assert not valid_model_name(name)
        with pytest.raises(RepositoryError):
            check_model_name(name)


def test_version_names_are_ascii_digits_above_zero() -> None:
    assert layout.version_number("12") == 12
    for name in ("0", "²", "-1", "1a", "", "0x1", "1" * 19):
        assert layout.version_number(name) is None
