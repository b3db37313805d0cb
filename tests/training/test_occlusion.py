"""Occlusion sensitivity: right where the model looks, batched, validated, and in the report."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from contract.occlusion import (
    count_positions,
    occlusion_map,
    patch_starts,
    pixel_map,
    softmax,
    typical_fill,
)
from tests.model_factory import REGION, TinySpec, build_tiny_model, reference_logits, region_model
from training.onnx_eval import onnx_logits, onnx_session


class CountingPredict:
    """ONNX Runtime behind the ``predict`` interface, recording the size of every call."""

    def __init__(self, path: Path) -> None:
        self.session = onnx_session(path)
        self.calls: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.uint8 and batch.ndim == 4
        self.calls.append(len(batch))
        return onnx_logits(self.session, batch)


@pytest.fixture(scope="module")
def region_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return region_model(tmp_path_factory.mktemp("region") / "model.onnx")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    onnx.save(build_tiny_model(TinySpec()), path)
    return path


WHITE = np.full((1, 28, 28), 255, dtype=np.uint8)
FULL_DROP = 1 / (1 + math.exp(-4)) - 0.5
"""What hiding all of REGION takes from class 0 on WHITE."""


def overlaps_region(top: int, left: int, patch: int) -> bool:
    rows, columns = REGION
    return (
        top < rows.stop
        and top + patch > rows.start
        and left < columns.stop
        and left + patch > columns.start
    )


def test_the_map_is_high_exactly_over_the_region_the_model_reads(region_onnx: Path) -> None:
    predict = CountingPredict(region_onnx)
    result = occlusion_map(predict, WHITE, patch=7, stride=2, fill=0)

    assert result.target == 0 and result.predicted == 0
    assert result.drops.shape == (12, 12)
    assert result.tops.tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 21]
    for i, top in enumerate(result.tops):
        for j, left in enumerate(result.lefts):
            drop = result.drops[i, j]
            if overlaps_region(int(top), int(left), 7):
                assert drop > 1e-4, (top, left)
            else:
                assert abs(drop) < 1e-6, (top, left)
    # A patch that hides all of the region takes the class from p = 0.982 to p = 0.5.
    assert result.drops.max() == pytest.approx(FULL_DROP, abs=1e-5)
    best = np.unravel_index(np.argmax(result.drops), result.drops.shape)
    top, left = int(result.tops[best[0]]), int(result.lefts[best[1]])
    assert top <= 8 and top + 7 >= 14 and left <= 16 and left + 7 >= 22

    pixels = result.pixels()
    assert pixels.shape == (28, 28) and pixels.dtype == np.float32
    region = np.zeros((28, 28), dtype=bool)
    region[REGION] = True
    touched = np.zeros((28, 28), dtype=bool)
    touched[2:20, 10:28] = True  # the region grown by the patch: pixels a touching patch covers
    assert np.abs(pixels[~touched]).max() < 1e-6
    # Averaging the patches over each pixel blurs the edge, but the region stands out.
    assert region[np.unravel_index(np.argmax(pixels), pixels.shape)]
    assert pixels[region].min() > 0.05
    assert pixels[region].mean() > 4 * pixels[touched & ~region].mean()


def test_a_class_that_the_region_speaks_against_gets_negative_drops(region_onnx: Path) -> None:
    result = occlusion_map(CountingPredict(region_onnx), WHITE, patch=7, stride=2, target=1)
    assert result.target == 1 and result.predicted == 0
    assert result.drops.min() == pytest.approx(-FULL_DROP, abs=1e-5)
    assert result.drops.max() < 1e-6


@pytest.mark.parametrize("batch_size", [1, 7, 145, 256])
def test_every_variant_is_scored_in_bounded_batches(region_onnx: Path, batch_size: int) -> None:
    predict = CountingPredict(region_onnx)
    reference = occlusion_map(CountingPredict(region_onnx), WHITE)
    result = occlusion_map(predict, WHITE, batch_size=batch_size)

    positions = count_positions(28, 28, 7, 2)
    assert positions == 144
    assert len(predict.calls) == math.ceil((1 + positions) / batch_size)
    assert sum(predict.calls) == 1 + positions
    assert max(predict.calls) <= batch_size
    np.testing.assert_allclose(result.drops, reference.drops, atol=1e-6)


def test_drops_equal_one_occluded_image_at_a_time(tiny_onnx: Path) -> None:
    """Against the numpy reference of the tiny linear model, one hand-occluded image per position:
    positions, fill per channel, the flush last position and the softmax all agree."""
    spec = TinySpec()
    image = np.random.default_rng(3).integers(0, 256, size=(1, 28, 28), dtype=np.uint8)
    result = occlusion_map(CountingPredict(tiny_onnx), image, patch=5, stride=4, fill=17)

    assert result.tops.tolist() == [0, 4, 8, 12, 16, 20, 23]
    base = softmax(reference_logits(spec, image[np.newaxis]))[0]
    assert result.target == int(np.argmax(base))
    for i, top in enumerate(result.tops):
        for j, left in enumerate(result.lefts):
            occluded = image.copy()
            occluded[:, top : top + 5, left : left + 5] = 17
            probability = softmax(reference_logits(spec, occluded[np.newaxis]))[0, result.target]
            assert result.drops[i, j] == pytest.approx(base[result.target] - probability, abs=1e-5)


def test_an_rgb_image_is_filled_per_channel() -> None:
    seen: list[np.ndarray] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return np.zeros((len(batch), 3), dtype=np.float32)

    image = np.full((3, 8, 8), 200, dtype=np.uint8)
    occlusion_map(predict, image, patch=4, stride=4, fill=(1, 2, 3))
    batch = np.concatenate(seen)
    assert (batch[0] == 200).all()  # the unoccluded image comes first
    assert batch[1, :, :4, :4].reshape(3, -1).tolist() == [[1] * 16, [2] * 16, [3] * 16]
    assert (batch[1, :, 4:, :] == 200).all() and (batch[1, :, :, 4:] == 200).all()


def test_pixel_map_averages_the_patches_that_cover_each_pixel() -> None:
    drops = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    starts = patch_starts(3, 2, 1)
    assert starts.tolist() == [0, 1]
    pixels = pixel_map(drops, starts, starts, 2, 3, 3)
    expected = [[1.0, 1.5, 2.0], [2.0, 2.5, 3.0], [3.0, 3.5, 4.0]]
    np.testing.assert_allclose(pixels, expected)


def test_pixels_no_patch_covers_are_nan() -> None:
    starts = patch_starts(7, 2, 5)
    assert starts.tolist() == [0, 5]
    pixels = pixel_map(np.ones((2, 2), dtype=np.float32), starts, starts, 2, 7, 7)
    assert np.isnan(pixels[2:5]).all() and np.isnan(pixels[:, 2:5]).all()
    assert (pixels[:2, :2] == 1).all() and (pixels[5:, 5:] == 1).all()


def zero_logits(batch: np.ndarray) -> np.ndarray:
    return np.zeros((len(batch), 10), dtype=np.float32)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"patch": 0}, r"patch must be an integer in 1\.\.28 .*got 0"),
        ({"patch": 29}, r"patch must be an integer in 1\.\.28 .*got 29"),
        ({"patch": 2.5}, r"patch must be an integer in 1\.\.28"),
        ({"patch": True}, r"patch must be an integer in 1\.\.28"),
        ({"stride": 0}, r"stride must be an integer >= 1, got 0"),
        ({"stride": "2"}, r"stride must be an integer >= 1, got '2'"),
        ({"fill": 256}, r"fill must be a pixel value in 0\.\.255 or 1 of them"),
        ({"fill": -1}, r"fill must be a pixel value in 0\.\.255"),
        ({"fill": (0, 0, 0)}, r"fill must be a pixel value in 0\.\.255 or 1 of them"),
        ({"target": 10}, r"target must be a class index in 0\.\.9, got 10"),
        ({"target": -1}, r"target must be a class index >= 0"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_settings_name_the_allowed_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        occlusion_map(zero_logits, WHITE, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((1, 28, 28), dtype=np.float32),
        np.zeros((28, 28), dtype=np.uint8),
        [[[0]]],
        np.zeros((1, 0, 28), dtype=np.uint8),
    ],
)
def test_an_image_that_is_not_uint8_chw_is_refused(image: object) -> None:
    with pytest.raises(ValueError, match=r"image must"):
        occlusion_map(zero_logits, image)  # type: ignore[arg-type]


def test_a_predict_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"predict must return scores \[N, classes\]"):
        occlusion_map(lambda batch: np.zeros(len(batch)), WHITE)


def test_typical_fill_is_the_background_of_digits() -> None:
    digits = np.zeros((4, 1, 28, 28), dtype=np.uint8)
    digits[:, :, 10:18, 12:16] = 255
    assert typical_fill(digits) == (0,)
    photos = np.stack([np.full((2, 4, 4), value, dtype=np.uint8) for value in (10, 120, 250)], 1)
    assert typical_fill(photos) == (10, 120, 250)


def test_the_module_does_not_import_torch() -> None:
    """The service will share it, and the serving image has no torch."""
    code = "import sys, contract.occlusion; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    ).stdout
    assert output.strip() == "False"


def test_the_report_section_explains_right_and_wrong_images(
    region_onnx: Path, tmp_path: Path
) -> None:
    from training.report import OCCLUSION_SECTION, occlusion_section

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 1, 28, 28), dtype=np.uint8)
    labels = np.arange(12) % 2
    predictions = labels.copy()
    predictions[[3, 6, 9]] = 1 - predictions[[3, 6, 9]]
    path = tmp_path / "occlusion.png"

    lines = occlusion_section(region_onnx, images, labels, predictions, ["zero", "one"], path)
    text = "\n".join(lines)

    assert lines[0] == OCCLUSION_SECTION
    assert "- patch: 7x7 px" in text
    assert "- stride: 2 px (144 positions per 28x28 image, scored in batches)" in text
    assert f"- fill: {int(np.median(images))} " in text
    assert "- images: 2 correctly classified, 3 of the 3 misclassified" in text
    assert "![occlusion sensitivity](occlusion.png)" in text
    table = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert [int(line.split("|")[1]) for line in table] == [0, 1, 3, 6, 9]
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20


def test_the_published_report_holds_the_occlusion_section(tiny_version) -> None:
    from training.report import OCCLUSION_SECTION

    report = tiny_version.path / "report"
    index = (report / "index.md").read_text()
    assert OCCLUSION_SECTION in index
    assert "![occlusion sensitivity](occlusion.png)" in index
    assert "- patch: 7x7 px" in index and "- fill: 0 " in index
    with Image.open(report / "occlusion.png") as image:
        image.verify()
    with Image.open(report / "occlusion.png") as image:
        assert image.format == "PNG" and image.size[0] > 200
