"""Self-contained HTML reports: a few block types rendered into one file that opens anywhere.

The file carries everything it shows: images as base64 PNG data URIs, CSS inline, no script
and no reference to the network, so a report can be mailed, archived or opened offline and
still look the same. Every piece of text is escaped. matplotlib figures are rendered through
their own canvas (``Figure.savefig``); pyplot and the backend are never touched.
"""

from __future__ import annotations

import base64
import html
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from .._fileio import atomic_write_bytes
from ..errors import UsageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; background: #fff; margin: 0; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 1.25rem 3rem; }
h1 { font-size: 1.6rem; margin: 0 0 0.75rem; }
h2 { font-size: 1.2rem; margin: 2rem 0 0.6rem; padding-bottom: 0.2rem; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 1.05rem; margin: 1.4rem 0 0.5rem; }
p { margin: 0.5rem 0; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.88rem; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; color: #57606a; padding-bottom: 0.3rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.55rem; vertical-align: top; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; white-space: nowrap; }
tr.highlight td { background: #dafbe1; font-weight: 600; }
figure { margin: 0.8rem 0 1.2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.88rem; margin-top: 0.3rem; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: 0.6rem 0.8rem; overflow-x: auto;
      white-space: pre-wrap; word-break: break-all; font-size: 0.85rem; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
"""


def _text(value) -> str:
    return html.escape(str(value), quote=True)


@dataclass
class Heading:
    text: str
    level: int = 2

    def html(self) -> str:
        level = min(6, max(1, int(self.level)))
        return f"<h{level}>{_text(self.text)}</h{level}>"


@dataclass
class Paragraph:
    text: str

    def html(self) -> str:
        return f"<p>{_text(self.text)}</p>"


@dataclass
class Table:
    """``rows``: lists of cell values, as many as ``columns``. Numbers (int, float) are right-aligned,
    as are the columns named in ``numeric``; ``highlight_row`` (an index into ``rows``) stands out.
    Without ``header`` (a key-value table) the first cell of each row is its label."""

    columns: list[str]
    rows: list[list]
    caption: str | None = None
    highlight_row: int | None = None
    anchor: str | None = None  # the table's id, so readers and tests can find it
    numeric: tuple[str, ...] = ()
    header: bool = True  # False: a key-value table whose column names would say nothing

    def html(self) -> str:
        ident = f' id="{_text(self.anchor)}"' if self.anchor else ""
        parts = [f"<table{ident}>"]
        if self.caption:
            parts.append(f"<caption>{_text(self.caption)}</caption>")
        if self.header:
            parts.append("<thead><tr>" + "".join(f"<th>{_text(c)}</th>" for c in self.columns) + "</tr></thead>")
        parts.append("<tbody>")
        right = {i for i, c in enumerate(self.columns) if c in self.numeric}
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise UsageError(f"Table row {i} has {len(row)} cells for {len(self.columns)} columns.")
            css = ' class="highlight"' if i == self.highlight_row else ""
            cells = "".join(f'<th scope="row">{_text(value)}</th>' if j == 0 and not self.header
                            else _cell(value, j in right) for j, value in enumerate(row))
            parts.append(f"<tr{css}>{cells}</tr>")
        parts.append("</tbody></table>")
        return "".join(parts)


def _cell(value, numeric: bool) -> str:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    css = ' class="num"' if numeric or is_number else ""
    return f"<td{css}>{_text('' if value is None else value)}</td>"


@dataclass
class Figure:
    """A matplotlib figure (rendered here, once) or the bytes of a PNG file, embedded in the page."""

    image: object
    alt: str
    caption: str | None = None

    def html(self) -> str:
        png = self.image if isinstance(self.image, (bytes, bytearray)) else png_bytes(self.image)
        if bytes(png[:8]) != PNG_SIGNATURE:
            raise UsageError("A report figure must be a matplotlib figure or the bytes of a PNG image.")
        width, height = struct.unpack(">II", bytes(png[16:24]))  # the IHDR chunk: no layout shift while loading
        src = "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii")
        caption = f"<figcaption>{_text(self.caption)}</figcaption>" if self.caption else ""
        return (f'<figure><img src="{src}" alt="{_text(self.alt)}" width="{width}" height="{height}">'
                f"{caption}</figure>")


@dataclass
class Code:
    """A command or other literal text, shown as typed (one block per command keeps each copyable)."""

    text: str

    def html(self) -> str:
        return f"<pre><code>{_text(self.text)}</code></pre>"


def png_bytes(figure) -> bytes:
    """A matplotlib figure as PNG bytes, through the figure's own canvas (no pyplot, no backend switch)."""
    if not hasattr(figure, "savefig"):
        raise UsageError(f"Cannot render {type(figure).__name__} as an image: expected a matplotlib figure.")
    buffer = BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def render(title: str, blocks: list) -> str:
    """The whole page: ``title`` as the document title and first heading, then each block in order."""
    body = "\n".join(block.html() for block in blocks)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_text(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n<main>\n<h1>{_text(title)}</h1>\n{body}\n</main>\n</body>\n</html>\n"
    )


def write_html(path: str | Path, title: str, blocks: list) -> Path:
    """Render and write the page atomically: readers see the old file or the complete new one."""
    path = Path(path)
    text = render(title, blocks)
    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))
    return path
