"""Pictures of search and clustering results: thumbnails, contact sheets, and a self-contained HTML page.

    png = contact_sheet(paths, caption="cluster 3: 41 images")              # PNG bytes
    page = search_page(results)                                            # HTML text

Thumbnails are the image scaled to fit a square tile, on white. In the search page each result is
framed green when its label equals the query's and red when not (grey when either has no label);
images are inline base64 PNGs, so the page is one file to open or send.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageOps

log = logging.getLogger("jaxembed.gallery")

GREEN, RED, GREY = "#1a9850", "#d73027", "#9e9e9e"
TILE = 96  # thumbnail side in pixels


def thumbnail(path: str, size: int = TILE) -> Image.Image:
    """The image at `path` scaled to fit `size` x `size` on white (RGB); a grey tile when unreadable."""
    from jaxembed.data import decode_image

    try:
        image = Image.fromarray(decode_image(path))
    except Exception as error:  # noqa: BLE001 - a picture must not fail for one image; it is logged.
        log.warning("%s: could not be read for a thumbnail (%s)", path, error)
        return Image.new("RGB", (size, size), (200, 200, 200))
    return ImageOps.pad(image, (size, size), color=(255, 255, 255))


def contact_sheet(paths: Sequence[str], *, caption: str = "", size: int = TILE, columns: int = 10) -> bytes:
    """PNG bytes of the thumbnails of `paths` in a grid of `columns`, under a one-line `caption`."""
    if not paths:
        raise ValueError("a contact sheet needs at least one image path")
    columns = min(columns, len(paths))
    rows, gap, header = math.ceil(len(paths) / columns), 2, 20 if caption else 0
    sheet = Image.new("RGB", (columns * (size + gap) + gap, header + rows * (size + gap) + gap), "white")
    for position, path in enumerate(paths):
        row, column = divmod(position, columns)
        sheet.paste(thumbnail(path, size), (gap + column * (size + gap), header + gap + row * (size + gap)))
    if caption:
        ImageDraw.Draw(sheet).text((gap + 2, 4), caption, fill="black")
    return png_bytes(sheet)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _img_tag(path: str, border: str, title: str, size: int) -> str:
    data = base64.b64encode(png_bytes(thumbnail(path, size))).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" width="{size}" height="{size}" '
            f'style="border:4px solid {border}" title="{html.escape(title)}">')


def match_colour(query_label: str | None, label: str | None) -> str:
    """Green for the query's label, red for another, grey when either is unknown."""
    if query_label is None or label is None:
        return GREY
    return GREEN if label == query_label else RED


def search_page(results: list[dict], *, title: str = "jaxembed visual search", size: int = TILE) -> str:
    """An HTML page with one row per query: the query, then its results framed by `match_colour`.

    Args:
      results: what `jaxembed.search.search_images` returns: per query `{"query", "label", "results":
        [{"path", "label", "score"}, ...]}`.
    """
    rows = []
    for entry in results:
        cells = [f'<td class="query">{_img_tag(entry["query"], "#333", entry["query"], size)}'
                 f'<div>{html.escape(str(entry["label"] or ""))}</div></td>']
        for hit in entry["results"]:
            colour = match_colour(entry["label"], hit["label"])
            cells.append(f'<td>{_img_tag(hit["path"], colour, hit["path"], size)}'
                         f'<div>{html.escape(str(hit["label"] or ""))}<br>{hit["score"]:.3f}</div></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    hits = [match_colour(e["label"], h["label"]) for e in results for h in e["results"]]
    judged = [c for c in hits if c != GREY]
    summary = (f"{sum(c == GREEN for c in judged)} of {len(judged)} results show the query's label"
               if judged else "no labels to compare")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} td{{text-align:center;font-size:11px;vertical-align:top;padding:2px}}
td.query{{padding-right:14px}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(results)} queries; green frame: same label as the query, red: another label. {summary}.</p>
<table>
{chr(10).join(rows)}
</table></body></html>
"""
