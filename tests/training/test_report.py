"""The report next to each version: valid PNG figures, an index with the arithmetic, and the same
as one self-contained HTML page that Chromium renders with every figure decoded."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from PIL import Image

from tests.training.browser import render_in_chromium, section_headings
from training.page import PAGE
from training.report import FIGURES, SECTIONS


def test_report_figures_are_real_images(tiny_version) -> None:
    report = tiny_version.path / "report"
    assert sorted(p.name for p in report.iterdir()) == sorted([*FIGURES, "index.md", PAGE])
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
    assert section_headings(index) == [section[3:] for section in SECTIONS]
    assert f"Accuracy **{tiny_version.test_accuracy:.4f}**" in index
    # Tiny CNN's first conv: 1 -> 8 channels, 3x3, no bias (batch norm follows).
    assert "| blocks.0.0 | Conv2d | 1x28x28 | 8x28x28 | 72 | 4,917,248 |" in index
    assert "one dense layer from it to 1,000 units needs 150,528,000 weights" in index
    assert "3x3 weights for each of the 1 input channel(s), 9 in all" in index


def test_the_mistakes_are_the_exported_models_wrong_answers(tiny_version) -> None:
    index = (tiny_version.path / "report" / "index.md").read_text()
    evaluation = tiny_version.evaluation
    labels = evaluation.confusion.sum(axis=1)
    wrong = int(labels.sum() - evaluation.confusion.trace())
    assert f"The exported model gets {wrong} of {int(labels.sum())} test images wrong" in index
    rows = re.findall(
        r"^\| (\d+) \| (\d) \| (\d) \(0\.\d{3}\) \| (\d) \(0\.\d{3}\) \|$", index, re.M
    )
    assert len(rows) == min(wrong, 50)
    for index_, true, first, _ in rows:
        assert int(first) == evaluation.predictions[int(index_)] != int(true)


def _embedded_pngs(page: str) -> list[bytes]:
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert all(src.startswith("data:image/png;base64,") for src in sources), sources
    return [base64.b64decode(src.split(",", 1)[1]) for src in sources]


def test_the_page_embeds_every_figure_and_refers_to_nothing_outside(tiny_version) -> None:
    report = tiny_version.path / "report"
    page = (report / PAGE).read_text()
    index = (report / "index.md").read_text()
    shown = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", index, re.M)
    assert _embedded_pngs(page) == [(report / name).read_bytes() for name in shown]
    assert sorted(shown) == sorted(FIGURES)
    # No URL but the embedded figures and the page's own anchors.
    urls = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert all(url.startswith(("data:", "#")) for url in urls), urls
    assert "http://" not in page and "https://" not in page
    # Every construct of the Markdown became HTML.
    text = re.sub(r"<[^>]+>", "", re.sub(r'src="[^"]*"', "", page))
    for leftover in ("**", "![", "|---", "\n## ", "\n- "):
        assert leftover not in text, leftover
    assert f"Accuracy <strong>{tiny_version.test_accuracy:.4f}</strong>" in page


def test_the_page_renders_in_chromium_with_every_image_decoded(
    tiny_version, tmp_path: Path
) -> None:
    report = tiny_version.path / "report"
    rendered = render_in_chromium(report / PAGE, tmp_path)
    assert rendered.probed == str(len(FIGURES)), "the probe did not run after the page loaded"
    assert len(rendered.images) == len(FIGURES)
    index = (report / "index.md").read_text()
    shown = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", index, re.M)
    for image, name in zip(rendered.images, shown, strict=True):
        with Image.open(io.BytesIO((report / name).read_bytes())) as png:
            assert image["data-decoded"] == f"{png.size[0]}x{png.size[1]}", name
    assert all(url.startswith(("data:", "#")) for url in rendered.urls)
    h2 = [text for tag, text in rendered.headings if tag == "h2"]
    assert h2 == [section[3:] for section in SECTIONS]
    assert rendered.headings[0] == ("h1", "tiny_cnn: training report")
