"""Opening a report page in headless Chromium, as a person would open it from disk.

``chromium --dump-dom`` prints the DOM after the page has loaded. A copy of the page gets a small
script that, once every image has loaded, writes each image's decoded size onto it
(``data-decoded="WxH"``, 0x0 when it did not decode) and the headings it found onto ``<body>``.
The page's own Content-Security-Policy stays in force (only the script is allowed in addition),
so an image that is not a ``data:`` URI is blocked and shows as not decoded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from training.page import CONTENT_SECURITY_POLICY

_PROBE = """<script>
window.addEventListener("load", () => {
  for (const image of document.images) {
    image.setAttribute("data-decoded", image.naturalWidth + "x" + image.naturalHeight);
  }
  document.body.setAttribute("data-probed", String(document.images.length));
});
</script>"""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def chromium_or_skip() -> str:
    """Chromium's path; skips the test without it (fails under CI, where `make tools` ran)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = (
            "chromium not found: the HTML report is rendered in headless Chromium; install "
            "Debian's chromium package (`make tools`, scripts/install-system-tools.sh)"
        )
        if in_ci():
            pytest.fail(f"{message}; CI must run this check")
        pytest.skip(message)
    return path


@dataclass
class RenderedPage:
    """What Chromium made of a page: every image and heading, and every URL it refers to."""

    images: list[dict[str, str]]
    headings: list[tuple[str, str]]
    """(tag, text) of every h1-h3, in order."""
    urls: list[str]
    """Every src and href value of the page."""
    probed: str | None
    """The number of images the probe saw (None: the probe did not run)."""


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = RenderedPage([], [], [], None)
        self._heading: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "img":
            self.page.images.append(values)
        if tag == "body":
            self.page.probed = values.get("data-probed")
        for name in ("src", "href"):
            if name in values:
                self.page.urls.append(values[name])
        if tag in ("h1", "h2", "h3"):
            self._heading, self._text = tag, []

    def handle_endtag(self, tag: str) -> None:
        if tag == self._heading:
            self.page.headings.append((tag, " ".join("".join(self._text).split())))
            self._heading = None

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._text.append(data)


def render_in_chromium(page: Path, scratch: Path) -> RenderedPage:
    """Loads a probed copy of ``page`` in headless Chromium and parses the DOM it dumps."""
    chromium = chromium_or_skip()
    text = page.read_text()
    policy = f'content="{CONTENT_SECURITY_POLICY}"'
    assert policy in text, "the page must carry its Content-Security-Policy"
    probed = text.replace(
        policy, f"content=\"{CONTENT_SECURITY_POLICY}; script-src 'unsafe-inline'\""
    )
    probed = probed.replace("</body>", _PROBE + "</body>")
    copy = scratch / "probed.html"
    copy.write_text(probed)
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={scratch / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            copy.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=300,  # a hung browser, not a speed limit
        env={**os.environ, "HOME": str(scratch)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    collector = _Collector()
    collector.feed(result.stdout)
    return collector.page


def section_headings(markdown: str) -> list[str]:
    """The ``##`` headings of a report's Markdown, as text."""
    return [line[3:].strip() for line in markdown.splitlines() if re.match(r"^## ", line)]
