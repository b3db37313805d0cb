"""``python -m training compare`` end to end on a tiny budget: both networks trained, exported
and measured; the CNN published with compare/ beside report/; every section and figure there."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.training.browser import render_in_chromium
from tests.training.conftest import tiny_train_config
from training.cli import main
from training.compare.report import FIGURES, SECTIONS
from training.compare.run import Comparison, run_comparison
from training.compare.shift import SHIFTS
from training.page import PAGE
from training.report import FIGURES as REPORT_FIGURES
from training.report import SECTIONS as REPORT_SECTIONS


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Comparison:
    """The tiny CNN and its dense baseline (3 epochs each), the CNN published as version 1."""
    base = tmp_path_factory.mktemp("compare")
    return run_comparison(tiny_train_config(base))


def assert_real_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width > 200 and height > 100, path.name
        # Not a blank canvas: a plot or a picture has many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20, path.name


def test_the_cnn_is_published_with_compare_beside_its_report(comparison: Comparison) -> None:
    version = comparison.version
    assert version is not None and version.version == 1
    assert comparison.directory == version.path / "compare"
    assert sorted(p.name for p in version.path.iterdir()) == [
        "compare",
        "labels.txt",
        "metadata.json",
        "model.onnx",
        "report",
    ]
    assert (version.path / "report" / "index.md").is_file()  # the existing report still there
    # compare/ measured the very model that was published.
    metadata = json.loads((version.path / "metadata.json").read_text())
    cnn_accuracy = comparison.measurements.cnn_test.accuracy
    assert metadata["convserve.test_accuracy"] == f"{cnn_accuracy:.4f}"


def test_the_compared_cnn_is_the_one_train_builds(comparison: Comparison, tiny_version) -> None:
    # Same configuration (tiny_train_config) through `train` and through `compare`: the same
    # weights, so the same predictions on every test image.
    assert tiny_version.evaluation is not None
    np.testing.assert_array_equal(
        comparison.measurements.cnn_test.predictions, tiny_version.evaluation.predictions
    )


def test_the_report_holds_every_section_and_valid_figures(comparison: Comparison) -> None:
    directory = comparison.directory
    assert sorted(p.name for p in directory.iterdir()) == sorted([*FIGURES, "index.md", PAGE])
    index = (directory / "index.md").read_text()
    for section in SECTIONS:
        assert f"\n{section}\n" in index
    for name in FIGURES:
        assert f"]({name})" in index
        assert_real_png(directory / name)


def test_the_versions_page_holds_the_report_then_the_comparison_all_decoded(
    comparison: Comparison, tmp_path: Path
) -> None:
    version = comparison.version
    assert version is not None
    rendered = render_in_chromium(version.path / "report" / PAGE, tmp_path)
    headings = [text for tag, text in rendered.headings if tag in ("h1", "h2")]
    report = ["tiny_cnn: training report", *(section[3:] for section in REPORT_SECTIONS)]
    compare = ["Dense vs CNN: what the convolutions buy", *(section[3:] for section in SECTIONS)]
    assert headings == report + compare
    figures = len(REPORT_FIGURES) + len(FIGURES)
    assert rendered.probed == str(figures) and len(rendered.images) == figures
    for image in rendered.images:
        width, height = (int(v) for v in image["data-decoded"].split("x"))
        assert width > 200 and height > 100, image["alt"]
    assert all(url.startswith(("data:", "#")) for url in rendered.urls)


def test_the_report_states_the_measured_numbers(comparison: Comparison) -> None:
    index = (comparison.directory / "index.md").read_text()
    cnn, dense, measured = comparison.cnn, comparison.dense, comparison.measurements
    assert dense.parameters >= cnn.parameters
    assert f"| parameters | {cnn.parameters:,} | {dense.parameters:,} |" in index
    assert f"{measured.cnn_test.accuracy:.4f} | {measured.dense_test.accuracy:.4f} |" in index
    for k, a, b in zip(SHIFTS, measured.cnn_shift.mean(), measured.dense_shift.mean(), strict=True):
        assert f"| {k} px | {a:.4f} | {b:.4f} |" in index
    assert "**What the numbers say.** Averaged over the four directions" in index
    # The tiny CNN has two blocks: receptive fields 4 and 10 pixels, from its layers.
    assert "| 1 | 4x4 px | 2 px |" in index and "| 2 | 10x10 px | 4 px |" in index
    wrong = len(measured.mistakes)
    assert f"gets {wrong} of {len(comparison.dataset.test)} test images wrong" in index
    assert wrong == round((1 - measured.cnn_test.accuracy) * len(comparison.dataset.test))


def test_the_first_layer_map_moves_with_the_digit(comparison: Comparison) -> None:
    demo = comparison.measurements.equivariance
    assert demo.error <= 1e-4 * demo.scale
    assert demo.margin == 1  # a 3x3 convolution sees one pixel around its centre
    index = (comparison.directory / "index.md").read_text()
    assert "equal up to float rounding: the map moved with the digit" in index
    first, second = (c for c, _ in demo.predictions)
    holds = "the prediction holds" if first == second else "the prediction **changed**"
    assert holds in index


def test_both_networks_had_the_same_budget(comparison: Comparison) -> None:
    for contender in (comparison.cnn, comparison.dense):
        assert [row["epoch"] for row in contender.fit.history] == [1, 2, 3]
    assert comparison.dense.description.startswith("flatten 784 -> ")
    index = (comparison.directory / "index.md").read_text()
    assert "budget, the same for both: 3 epochs, batch 16" in index


def test_compare_cli_writes_to_out_and_publishes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where a default model_repository/ or runs/ would appear
    out = tmp_path / "compare"
    args = ["compare", "--max-samples", "200", "--epochs", "1", "--blocks", "4/8"]
    args += ["--hidden", "16", "--batch-size", "16", "--augment", "none", "--no-progress", "-q"]
    args += ["--dense-layers", "1", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert re.search(
        r"^CNN: [\d,]+ parameters, test accuracy 0\.\d{4}, shifted 0 / 1 / 2 / 3 / 4 px",
        printed,
        re.M,
    )
    assert re.search(r"^dense: [\d,]+ parameters, .* trained in [\d.]+ s$", printed, re.M)
    assert f"report: {out / 'index.md'}" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted([*FIGURES, "index.md", PAGE])
    assert "flatten 784 -> " in (out / "index.md").read_text()
    page = (out / PAGE).read_text()
    assert page.count('<img src="data:image/png;base64,') == len(FIGURES)
    assert f"page: {out / PAGE}" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["compare"]


def test_compare_refuses_a_bad_dense_depth_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["compare", "--dense-layers", "3", "--out", str(tmp_path / "c")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --dense-layers 3: the dense baseline has 1 or 2 hidden layers; choose one of: 1, 2"
    )
    assert not (tmp_path / "c").exists()
