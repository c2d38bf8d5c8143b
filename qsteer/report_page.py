"""Self-contained HTML pages for `qsteer-report`: tables and plots in one file, nothing fetched.

Plots are matplotlib figures embedded as base64 PNG (`data:` URLs) and the style sheet is inline,
so a page opens offline, from a mail or an archive, and shows what it showed the day it was
written. The one script is inline too: it marks each plot with the width it decoded to
(`data-width`) and puts a visible note under one that did not decode, so a broken plot is never
a silent blank.
"""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Any

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
caption { text-align: left; color: #555; padding: 0.2em 0; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.note, caption { font-size: 0.9em; color: #666; }
.broken { color: #b00; font-weight: bold; }
td.text { max-width: 40em; white-space: pre-wrap; word-break: break-word; }
"""

# Marks every plot once it decoded (or failed to): data-width is the decoded width, 0 when broken.
SCRIPT = """
for (const img of document.images) {
  const mark = () => {
    img.dataset.width = img.naturalWidth;
    if (!img.naturalWidth) img.insertAdjacentHTML('afterend', '<p class="broken">this plot did not decode</p>');
  };
  if (img.complete) mark(); else { img.addEventListener('load', mark); img.addEventListener('error', mark); }
}
"""


def page(title: str, *sections: str) -> str:
    """A whole page: the title, then the sections in order."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{escape(title)}</h1>\n" + "\n".join(sections)
            + f"\n<script>{SCRIPT}</script>\n</body>\n</html>\n")


def section(heading: str, *parts: str) -> str:
    return f"<section>\n<h2>{escape(heading)}</h2>\n" + "\n".join(parts) + "\n</section>"


def cell(value: Any) -> str:
    """A value as table cell text: floats to 4 significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value, ensure_ascii=False)
    return str(value)


def table(rows: list[dict[str, Any]], table_id: str, columns: list[str] | None = None, caption: str | None = None,
          text_columns: tuple[str, ...] = ()) -> str:
    """An HTML table of `rows` (dicts) with a header; numbers right-aligned, `text_columns` wrapped."""
    columns = columns if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            kind = ("num" if isinstance(value, (int, float)) and not isinstance(value, bool)
                    else "text" if c in text_columns else "")
            cells.append(f'<td class="{kind}">{escape(cell(value))}</td>' if kind else f"<td>{escape(cell(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    title = f"<caption>{escape(caption)}</caption>" if caption else ""
    return (f'<table id="{escape(table_id)}">{title}\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + "\n</tbody>\n</table>")


def key_values(values: dict[str, Any], table_id: str, caption: str | None = None) -> str:
    """A two-column table, one row per key."""
    return table([{"key": k, "value": v} for k, v in values.items()], table_id, ["key", "value"], caption)


def png(data: bytes, alt: str, img_id: str) -> str:
    """An <img> holding PNG bytes as a data: URL."""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img id="{escape(img_id)}" alt="{escape(alt)}" src="data:image/png;base64,{encoded}">'


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'
