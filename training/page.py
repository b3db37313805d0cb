"""The report as one self-contained HTML page: ``index.html`` beside each ``index.md``.

The page is rendered from the Markdown the report already writes (one source for both), with
every figure embedded as a ``data:`` URI, so it opens from disk in any browser, offline, and can
be mailed as one file. A Content-Security-Policy in the page forbids every request (no scripts,
no fonts, no images but ``data:``), so a figure that was not embedded shows as broken rather
than being fetched.

The Markdown is the subset the report modules write, one construct per line: ``#`` headings,
``- `` bullets, ``|`` tables (the second row gives the alignment), a figure alone on its line
(``![alt](file.png)``), paragraphs; inline ``**bold**`` and ```code```. Anything else is text.
The page itself is a Jinja2 template (autoescaped).

- ``report/index.html`` of a version: ``report/index.md``, then ``compare/index.md`` when
  ``python -m training compare --repository ...`` put one beside it (:func:`write_version_page`).
- ``compare/index.html``: the comparison alone (``python -m training compare --out DIR``).
"""

from __future__ import annotations

import base64
import html
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
from markupsafe import Markup

logger = logging.getLogger(__name__)

PAGE = "index.html"
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
"""No request of any kind leaves the page: images only from ``data:``, styles only inline."""

_FIGURE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)$")
_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_SLUG = re.compile(r"[^a-z0-9]+")
_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{{ policy }}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font: 16px/1.5 system-ui, sans-serif; max-width: 64rem; margin: 0 auto;
       padding: 1rem 1.5rem 4rem; color: #1b1f24; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; margin-top: 2.5rem; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; }
th { background: #f6f8fa; }
.right { text-align: right; } .center { text-align: center; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { font-size: .85rem; color: #57606a; }
code { background: #f6f8fa; padding: 0 .2rem; border-radius: 3px; }
nav { background: #f6f8fa; border: 1px solid #d0d7de; padding: .5rem 1rem; }
nav ul { margin: .2rem 0; }
footer { margin-top: 3rem; font-size: .85rem; color: #57606a; }
</style>
</head>
<body>
<nav aria-label="contents"><strong>Contents</strong>
{% for part in parts %}<ul><li><a href="#{{ part.anchor }}">{{ part.title }}</a><ul>
{% for anchor, heading in part.sections %}<li><a href="#{{ anchor }}">{{ heading }}</a></li>
{% endfor %}</ul></li></ul>
{% endfor %}</nav>
{% for part in parts %}<article id="{{ part.anchor }}-part">
{{ part.body }}
</article>
{% endfor %}<footer>Written by <code>python -m training</code>. Every figure is embedded in
this file; the page makes no network requests and reads the same offline.</footer>
</body>
</html>
"""


@dataclass(frozen=True)
class RenderedPart:
    """One ``index.md`` as HTML: its title, its ``##`` sections (anchor, text) and body."""

    anchor: str
    title: str
    sections: list[tuple[str, str]]
    body: Markup


def inline(text: str) -> str:
    """Escaped text with ```code``` and ``**bold**`` as HTML (no bold inside code)."""
    pieces = []
    for index, piece in enumerate(_CODE.split(text)):
        escaped = html.escape(piece, quote=False)
        if index % 2:
            pieces.append(f"<code>{escaped}</code>")
        else:
            pieces.append(_BOLD.sub(r"<strong>\1</strong>", escaped))
    return "".join(pieces)


def data_uri(path: Path) -> str:
    """The file as a ``data:`` URI (PNG or JPEG)."""
    media_type = _MEDIA_TYPES.get(path.suffix.lower())
    if media_type is None:
        raise ValueError(f"cannot embed '{path.name}': only {', '.join(_MEDIA_TYPES)} figures")
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def _alignment(separator: str) -> list[str]:
    aligns = []
    for cell in _cells(separator):
        if cell.startswith(":") and cell.endswith(":"):
            aligns.append("center")
        elif cell.endswith(":"):
            aligns.append("right")
        else:
            aligns.append("")
    return aligns


def _table(rows: list[str]) -> str:
    header, separator, *body = rows
    aligns = _alignment(separator)

    def row_html(row: str, tag: str) -> str:
        cells = []
        for cell, align in zip(_cells(row), aligns, strict=False):
            attribute = f' class="{align}"' if align else ""
            cells.append(f"<{tag}{attribute}>{inline(cell)}</{tag}>")
        return "<tr>" + "".join(cells) + "</tr>"

    lines = ["<table>", "<thead>" + row_html(header, "th") + "</thead>", "<tbody>"]
    lines += [row_html(row, "td") for row in body]
    return "\n".join([*lines, "</tbody>", "</table>"])


def _figure(alt: str, src: str, directory: Path) -> str:
    if src.startswith(("http:", "https:", "//")):
        raise ValueError(f"the page embeds its figures; '{src}' is not a file beside index.md")
    return (
        f'<figure><img src="{data_uri(directory / src)}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(alt)}</figcaption></figure>"
    )


def _slug(text: str) -> str:
    return _SLUG.sub("-", text.lower()).strip("-") or "section"


def render_part(markdown: str, directory: Path, anchor: str) -> RenderedPart:
    """The report Markdown in ``directory`` as HTML, its figures read from ``directory``."""
    out: list[str] = []
    title = anchor
    sections: list[tuple[str, str]] = []
    paragraph: list[str] = []
    bullets: list[str] = []
    table: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append(f"<p>{inline(' '.join(paragraph))}</p>")
            paragraph.clear()
        if bullets:
            out.append("<ul>" + "".join(f"<li>{inline(b)}</li>" for b in bullets) + "</ul>")
            bullets.clear()
        if table:
            out.append(_table(table) if len(table) >= 2 else f"<p>{inline(table[0])}</p>")
            table.clear()

    for line in markdown.splitlines():
        stripped = line.strip()
        kind = (
            "blank"
            if not stripped
            else "heading"
            if stripped.startswith("#")
            else "bullet"
            if stripped.startswith("- ")
            else "table"
            if stripped.startswith("|")
            else "figure"
            if _FIGURE.match(stripped)
            else "text"
        )
        if (kind != "bullet" and bullets) or (kind != "table" and table):
            flush()
        if kind in ("blank", "heading", "figure"):
            flush()
        if kind == "heading":
            level = min(len(stripped) - len(stripped.lstrip("#")), 4)
            text = stripped[level:].strip()
            if level == 1:
                title = text
                out.append(f'<h1 id="{anchor}">{inline(text)}</h1>')
            else:
                section = f"{anchor}-{_slug(text)}"
                if level == 2:
                    sections.append((section, text))
                out.append(f'<h{level} id="{section}">{inline(text)}</h{level}>')
        elif kind == "bullet":
            bullets.append(stripped[2:])
        elif kind == "table":
            table.append(stripped)
        elif kind == "figure":
            match = _FIGURE.match(stripped)
            assert match is not None
            out.append(_figure(match["alt"], match["src"], directory))
        elif kind == "text":
            paragraph.append(stripped)
    flush()
    return RenderedPart(anchor, title, sections, Markup("\n".join(out)))


def render_page(title: str, parts: list[RenderedPart]) -> str:
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = environment.from_string(_TEMPLATE)
    # The policy is a constant without double quotes: safe inside the attribute as it is.
    return template.render(title=title, parts=parts, policy=Markup(CONTENT_SECURITY_POLICY))


def write_page(path: Path, directories: list[tuple[str, Path]]) -> Path:
    """Writes one page from each ``(anchor, directory)``'s ``index.md``, in order."""
    parts = [
        render_part((directory / "index.md").read_text(), directory, anchor)
        for anchor, directory in directories
    ]
    path.write_text(render_page(parts[0].title, parts))
    logger.info("page written to %s", path)
    return path


def write_version_page(version: Path) -> Path:
    """``<version>/report/index.html``: the report, then the comparison when there is one."""
    directories = [("report", version / "report")]
    if (version / "compare" / "index.md").is_file():
        directories.append(("compare", version / "compare"))
    return write_page(version / "report" / PAGE, directories)
