"""The Markdown of the reports as one HTML page: every construct they write, figures embedded."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.page import CONTENT_SECURITY_POLICY, render_page, render_part, write_page


@pytest.fixture
def figure_dir(tmp_path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(tmp_path / "plot.png")
    return tmp_path


MARKDOWN = """# model: training report

- dataset: mnist5k
- a `code <b>` bullet with **bold**

## Side by side

Some text
that goes on, with 1 < 2 & `x**2`.

| | CNN | dense |
|---|---:|:---:|
| parameters | **241,770** | 242,295 |

![a plot](plot.png)

### Detail
"""


def test_every_construct_becomes_html(figure_dir: Path) -> None:
    part = render_part(MARKDOWN, figure_dir, "report")
    body = str(part.body)
    assert part.title == "model: training report"
    assert part.sections == [("report-side-by-side", "Side by side")]
    assert '<h1 id="report">model: training report</h1>' in body
    assert (
        "<ul><li>dataset: mnist5k</li><li>a <code>code &lt;b&gt;</code> bullet with "
        "<strong>bold</strong></li></ul>"
    ) in body
    assert "<p>Some text that goes on, with 1 &lt; 2 &amp; <code>x**2</code>.</p>" in body
    assert '<tr><th></th><th class="right">CNN</th><th class="center">dense</th></tr>' in body
    assert (
        '<tr><td>parameters</td><td class="right"><strong>241,770</strong></td>'
        '<td class="center">242,295</td></tr>'
    ) in body
    assert '<h3 id="report-detail">Detail</h3>' in body
    encoded = base64.b64encode((figure_dir / "plot.png").read_bytes()).decode()
    assert f'<img src="data:image/png;base64,{encoded}" alt="a plot">' in body


def test_the_page_forbids_requests_and_lists_its_sections(figure_dir: Path) -> None:
    page = render_page("t <1>", [render_part(MARKDOWN, figure_dir, "report")])
    assert f'content="{CONTENT_SECURITY_POLICY}"' in page
    assert "<title>t &lt;1&gt;</title>" in page
    assert '<a href="#report-side-by-side">Side by side</a>' in page


def test_a_figure_that_is_not_a_file_beside_the_markdown_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="embeds its figures"):
        render_part("![remote](https://example.com/a.png)\n", tmp_path, "report")
    with pytest.raises(ValueError, match=r"cannot embed 'a\.svg': only \.png, \.jpg, \.jpeg"):
        render_part("![vector](a.svg)\n", tmp_path, "report")


def test_two_parts_get_separate_anchors(figure_dir: Path) -> None:
    (figure_dir / "index.md").write_text(MARKDOWN)
    other = figure_dir / "other"
    other.mkdir()
    (other / "index.md").write_text("# Dense vs CNN\n\n## Side by side\n\ntext\n")
    page = write_page(figure_dir / "index.html", [("report", figure_dir), ("compare", other)])
    text = page.read_text()
    assert '<h2 id="report-side-by-side">' in text and '<h2 id="compare-side-by-side">' in text
    assert "<title>model: training report</title>" in text
