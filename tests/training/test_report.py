"""The report next to each version: valid PNG figures and an index with the arithmetic."""

from __future__ import annotations

from PIL import Image

from training.report import FIGURES


def test_report_figures_are_real_images(tiny_version) -> None:
    report = tiny_version.path / "report"
    assert sorted(p.name for p in report.iterdir()) == sorted([*FIGURES, "index.md"])
    for name in FIGURES:
        with Image.open(report / name) as image:
            image.verify()
        with Image.open(report / name) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert width > 200 and height > 100, name
            # Not a blank canvas: a plot has many distinct colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20, name


def test_index_links_the_figures_and_shows_the_parameter_arithmetic(tiny_version) -> None:
    index = (tiny_version.path / "report" / "index.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in index
    assert f"Accuracy **{tiny_version.test_accuracy:.4f}**" in index
    # Tiny CNN's first conv: 1 -> 8 channels, 3x3, no bias (batch norm follows).
    assert "| blocks.0.0 | Conv2d | 1x28x28 | 8x28x28 | 72 | 4,917,248 |" in index
    assert "one dense layer from it to 1,000 units needs 150,528,000 weights" in index
