"""A one-page visual report of a training run: `python -m jaxembed.report --workdir DIR [--images SOURCE]`.

    paths = write_report("runs/inception_bn")          # -> DIR/report/report.png and report.html

One PNG with four panels, and a small self-contained HTML page (the PNG embedded, plus the metrics and
the configuration):

- the training loss and the learning rate per logged step, from `metrics.jsonl`;
- query images with their nearest neighbours by cosine similarity among the other report images, each
  neighbour framed green when it shows the query's concept and red when not;
- a 2-D PCA projection of the embeddings, coloured by concept.

The report images are the run's held-out split by default (the images `split.json` names, from the
data source `run.json` names), or any source given as `images_source`.
Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from typing import NamedTuple

import numpy as np

from jaxembed import data as data_lib
from jaxembed import fileio, rundir
from jaxembed.eval import evaluate
from jaxembed.inference import embed
from jaxembed import metrics as metrics_lib

log = logging.getLogger("jaxembed.report")

_GREEN, _RED, _QUERY = (26, 152, 80), (215, 48, 39), (60, 60, 60)  # RGB frame colours
_TILE = 72  # pixels per image tile in the neighbour grid (the model's input size is often smaller)
_FRAME = 4  # frame width in pixels
_GAP = 3  # white space between tiles
_LABEL = 16  # white space under each tile for its concept name


class ReportFiles(NamedTuple):
    png: str
    html: str


# ----------------------------------------------------------------------------- the report images


def heldout_images(workdir: str):
    """The held-out images of the run in `workdir`: its data loaded again and cut by its split.json.

    Raises:
      ValueError: the data source no longer holds the images the run held out (the message names split.json).
    """
    run = rundir.RunDir(workdir)
    return run.heldout(run.data())


def pca_2d(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings' projection on their top two principal components.

    Args:
      embeddings: `(n, d)` float, n >= 2.

    Returns:
      `(points (n, 2) float32, explained (2,) float)`: coordinates and the fraction of the variance each
      component explains.
    """
    centred = np.asarray(embeddings, np.float64) - np.mean(embeddings, axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    points = centred @ components[:2].T
    if points.shape[1] < 2:  # 1-d embeddings: plot them on a line
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    explained = np.pad(variance[:2] / max(variance.sum(), 1e-30), (0, max(0, 2 - len(variance))))
    return points.astype(np.float32), explained


def pick_queries(labels: np.ndarray, num_queries: int, seed: int) -> np.ndarray:
    """Indices of up to `num_queries` images whose concept has another image, as many concepts as
    possible (one image each before any second), sorted by concept."""
    names, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(counts[inverse] >= 2)
    shuffled = np.random.default_rng(seed).permutation(candidates)
    _, first = np.unique(labels[shuffled], return_index=True)
    firsts = shuffled[np.sort(first)]
    chosen = set(firsts.tolist())
    order = list(firsts) + [i for i in shuffled if i not in chosen]
    picked = np.asarray(order[:num_queries], np.int64)
    return picked[np.argsort(labels[picked], kind="stable")]


# ----------------------------------------------------------------------------- drawing


def _tile(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """uint8 `(S, S, 3)` -> uint8 `(_TILE, _TILE, 3)` with a coloured frame."""
    from PIL import Image

    inner = _TILE - 2 * _FRAME
    # Small inputs (e.g. 32 px) are enlarged with visible pixels rather than blurred.
    resample = Image.Resampling.NEAREST if image.shape[0] < inner else Image.Resampling.BILINEAR
    pixels = np.asarray(Image.fromarray(image).resize((inner, inner), resample))
    tile = np.empty((_TILE, _TILE, 3), np.uint8)
    tile[:] = colour
    tile[_FRAME:_FRAME + inner, _FRAME:_FRAME + inner] = pixels
    return tile


def neighbour_grid(images: list[list[np.ndarray]], colours: list[list[tuple[int, int, int]]]) -> np.ndarray:
    """One uint8 RGB picture of rows of framed tiles on white, a wider gap after the first column
    (the query), and `_LABEL` pixels under each row for names. `images[r][c]` is uint8 `(S, S, 3)`."""
    rows, cols = len(images), max(len(row) for row in images)
    cell_w, cell_h = _TILE + _GAP, _TILE + _LABEL
    canvas = np.full((rows * cell_h, cols * cell_w + 3 * _GAP, 3), 255, np.uint8)
    for r, (row_images, row_colours) in enumerate(zip(images, colours, strict=True)):
        for c, (image, colour) in enumerate(zip(row_images, row_colours, strict=True)):
            x = c * cell_w + (3 * _GAP if c else 0)
            canvas[r * cell_h:r * cell_h + _TILE, x:x + _TILE] = _tile(image, colour)
    return canvas


def _tile_origin(row: int, col: int) -> tuple[float, float]:
    return col * (_TILE + _GAP) + (3 * _GAP if col else 0), row * (_TILE + _LABEL)


def _short(name: str, width: int = 11) -> str:
    """A label that fits under a tile: the last path component (`Alphabet/character07` -> `character07`)."""
    name = name.rsplit("/", 1)[-1]
    return name if len(name) <= width else name[:width - 1] + "…"


def _plot_curves(ax_loss, ax_lr, records: list[dict], steps_per_epoch: int | None) -> None:
    from matplotlib.ticker import MaxNLocator

    steps = [r for r in records if "loss" in r and "step" in r]
    for ax, key, title, colour in ((ax_loss, "loss", "training loss", "tab:blue"),
                                   (ax_lr, "learning_rate", "learning rate", "tab:orange")):
        points = [(r["step"], r[key]) for r in steps if key in r]
        ax.set_title(title, fontsize=11, loc="left")
        ax.set_xlabel("step" + (f" ({steps_per_epoch} per epoch)" if steps_per_epoch else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not points:
            ax.text(0.5, 0.5, "nothing logged in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
            continue
        x, y = np.asarray(points, np.float64).T
        ax.plot(x, y, color=colour, lw=1.5, marker="o" if len(x) <= 30 else None, ms=3,
                label="mean over the logging window")
        if key == "loss" and all("loss_max" in r for r in steps):  # the largest step loss of each window
            ax.plot(x, [r["loss_max"] for r in steps], color=colour, lw=0.8, alpha=0.4, label="largest step")
            ax.legend(fontsize=8, loc="upper right")
        if key == "learning_rate" and y.min() > 0 and y.max() / y.min() > 10:
            ax.set_yscale("log")  # step decays by 10x are straight stairs on a log axis
        if steps_per_epoch and x.max() / steps_per_epoch <= 40:
            for epoch in range(1, int(x.max() // steps_per_epoch) + 1):
                ax.axvline(epoch * steps_per_epoch, color="0.8", lw=0.8, ls=":", zorder=0)


def _plot_projection(ax, embeddings: np.ndarray, labels: np.ndarray) -> None:
    import matplotlib
    from matplotlib.lines import Line2D

    points, explained = pca_2d(embeddings)
    names, inverse = np.unique(labels, return_inverse=True)
    palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "turbo"]
    colours = palette(inverse / max(len(names) - 1, 1)) if len(names) > 20 else palette(inverse % palette.N)
    size = float(np.clip(4000 / len(labels), 12, 40))  # larger dots when there are few
    ax.scatter(points[:, 0], points[:, 1], c=colours, s=size, alpha=0.85, linewidths=0)
    title = f"embeddings, PCA ({len(labels)} images, {len(names)} concepts)"
    # A few far outliers would squeeze everything else into a corner: zoom on the bulk, and say so.
    low, high = np.percentile(points, [2, 98], axis=0)
    margin = 0.15 * (high - low)
    low, high = low - margin, high + margin
    outside = int(np.sum(np.any((points < low) | (points > high), axis=1)))
    if outside and np.all(high > low) and np.any(np.ptp(points, axis=0) > 1.5 * (high - low)):
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
        title += f"; {outside} outlier{'s' if outside > 1 else ''} outside the view"
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)", fontsize=9)
    ax.set_ylabel(f"PC 2 ({explained[1]:.0%})", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(names) <= 20:  # more would hide the points; the colours still separate concepts
        handles = [Line2D([], [], ls="", marker="o", ms=6, color=palette(i % palette.N),
                                           label=_short(str(name), 16)) for i, name in enumerate(names)]
        ax.legend(handles=handles, fontsize=8, ncol=1 if len(names) <= 10 else 2, loc="center left",
                  bbox_to_anchor=(1.01, 0.5), frameon=False, title="concept", title_fontsize=8)


def _plot_neighbours(ax, grid: np.ndarray, queries, neighbours, labels, hits, recall: float | None) -> None:
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    for row, (query, row_neighbours) in enumerate(zip(queries, neighbours, strict=True)):
        for col, index in enumerate([query, *row_neighbours]):
            x, y = _tile_origin(row, col)
            colour = "black" if col == 0 else np.array(_GREEN if hits[row, col - 1] else _RED) / 255
            ax.text(x + _TILE / 2, y + _TILE + 1, _short(str(labels[index])), ha="center", va="top",
                    fontsize=7, color=colour)
    title = f"queries (left) and their {neighbours.shape[1]} nearest neighbours\n"
    title += "green: the query's concept, red: another"
    if recall is not None:
        title += f" (Recall@1 {recall:.2f})"
    ax.set_title(title, fontsize=11, loc="left")


# ----------------------------------------------------------------------------- the report


def write_report(workdir: str, *, images_source: str | None = None, out_dir: str | None = None,
                 max_images: int = 1000, num_queries: int = 10, num_neighbours: int = 6, seed: int = 0) -> ReportFiles:
    """Writes `report.png` and `report.html` for the run in `workdir`.

    Args:
      workdir: a training workdir (`run.json`, checkpoints, `metrics.jsonl`).
      images_source: the images to embed: a folder, manifest, `tfds:NAME[:SPLIT]` or "default"; None =
        the run's held-out split.
      out_dir: where to write (created); default `workdir/report`.
      max_images: embed at most this many (a random subset of a larger source).
      num_queries, num_neighbours: the rows and the neighbours per row of the neighbour grid.
      seed: picks the subset and the queries.

    Returns:
      The paths of the PNG and the HTML page.

    Raises:
      ImportError: matplotlib is not installed.
      ValueError: fewer than 2 images.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("jaxembed.report needs matplotlib: pip install matplotlib") from error

    workdir = os.path.abspath(workdir)
    out_dir = out_dir or os.path.join(workdir, "report")
    embedder = embed.load(workdir)
    if images_source is None:
        images = heldout_images(workdir)
        described = f"the run's held-out split ({len(images)} images)"
    else:
        images = data_lib.load_source(images_source)
        described = f"{images_source} ({len(images)} images)"
    if len(images) > max_images:
        images = images.subset(np.sort(np.random.default_rng(seed).choice(len(images), max_images, replace=False)))
        described += f", a random {max_images}"
    outputs = embed.embed_dataset(embedder.apply_fn, embedder.variables, images, image_size=embedder.image_size)
    embeddings = outputs["embedding"]
    labels = np.asarray(images.concepts)[images.primary_labels[outputs["index"]]]
    if len(labels) < 2:
        raise ValueError(f"a report needs at least 2 images; {described} gives {len(labels)}")
    metrics = evaluate.dataset_metrics(outputs, images, embedder.concepts, embedder.task, episodes=200, seed=seed)

    run = rundir.RunDir(workdir)
    record, summary, records = run.record(), run.summary() or {}, run.metrics()

    figure = Figure(figsize=(17, 10.5), dpi=100)  # not pyplot: no global state, no display needed
    layout = figure.add_gridspec(2, 3, width_ratios=[1, 1, 1.25], height_ratios=[1, 1.7], hspace=0.32, wspace=0.28,
                                 left=0.05, right=0.98, top=0.86, bottom=0.06)
    _plot_curves(figure.add_subplot(layout[0, 0]), figure.add_subplot(layout[0, 1]), records,
                 record.get("steps_per_epoch"))
    _plot_projection(figure.add_subplot(layout[1, :2]), embeddings, labels)
    queries = pick_queries(labels, num_queries, seed)
    if len(queries):  # none when every concept has a single image
        neighbours = metrics_lib.nearest_others(embeddings, min(num_neighbours, len(labels) - 1), queries)
        hits = labels[neighbours] == labels[queries][:, None]
        pixels = {i: data_lib.preprocess_for_eval(data_lib.decode_image(images.items[outputs["index"][i]]),
                                                  embedder.image_size)
                  for i in {*queries.tolist(), *neighbours.ravel().tolist()}}
        rows = [[pixels[q], *(pixels[n] for n in row)] for q, row in zip(queries, neighbours, strict=True)]
        grid = neighbour_grid(rows, [[_QUERY, *(_GREEN if hit else _RED for hit in row)] for row in hits])
        _plot_neighbours(figure.add_subplot(layout[:, 2]), grid, queries, neighbours, labels, hits,
                         metrics.get("recall@1"))
    figure.suptitle(_headline(workdir, embedder, summary), x=0.05, y=0.985, ha="left", fontsize=14,
                    fontweight="bold")
    figure.text(0.05, 0.935, f"images: {described}.  " + _metrics_line(metrics), fontsize=10, ha="left")

    os.makedirs(out_dir, exist_ok=True)
    png_path, html_path = os.path.join(out_dir, "report.png"), os.path.join(out_dir, "report.html")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    png = buffer.getvalue()
    fileio.write_bytes(png_path, png)
    page = _html_page(workdir, embedder, record, summary, metrics, described, png)
    fileio.write_bytes(html_path, page.encode("utf-8"))
    return ReportFiles(png=png_path, html=html_path)


def _headline(workdir: str, embedder, summary: dict) -> str:
    config = embedder.config
    step = f", step {summary['step']} of {summary['total_steps']}" if "step" in summary else ""
    return f"{os.path.basename(workdir)}: {config.template.name} ({config.arch}, {config.image_size} px){step}"


def _metric_label(key: str) -> str:
    """A metric's name for people: `one_shot_20way` -> `20-way one-shot`, `recall@1` -> `Recall@1`."""
    if key.startswith("one_shot_") and key.endswith("way"):
        return f"{key[len('one_shot_'):-len('way')]}-way one-shot"
    return {"recall@1": "Recall@1", "recall@5": "Recall@5", "map@r": "MAP@R", "top1": "top-1"}.get(key, key)


def _metrics_line(metrics: dict) -> str:
    shown = {k: v for k, v in metrics.items() if not k.startswith("num_")}
    return "   ".join(f"{_metric_label(name)} {value:.3f}" for name, value in shown.items())


def _html_page(workdir, embedder, record, summary, metrics, described, png: bytes) -> str:
    esc = html.escape
    final = {k.removeprefix("eval/"): v for k, v in summary.items() if k.startswith("eval/")}
    names = list(dict.fromkeys([*metrics, *final]))

    def cell(name, value):
        if value is None:
            return "<td></td>"
        text = str(int(value)) if name.startswith("num_") else f"{value:.4f}"  # counts, then rates
        return f'<td class="num">{text}</td>'

    metric_rows = "\n".join(
        f"<tr><th>{esc(_metric_label(name))}</th>{cell(name, metrics.get(name))}{cell(name, final.get(name))}</tr>"
        for name in names)
    settings = {**record.get("config", {}), "data": record.get("data"),
                **{k: record.get(k) for k in ("num_train_images", "num_eval_images", "steps_per_epoch", "total_steps")}}
    setting_rows = "\n".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in settings.items())
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>jaxembed report: {esc(os.path.basename(workdir))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1700px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ padding: 3px 12px; border-bottom: 1px solid #ddd; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; }}
.note {{ color: #a33; }}
</style></head>
<body>
<h1>{esc(_headline(workdir, embedder, summary))}</h1>
<p>Workdir <code>{esc(workdir)}</code>. Report images: {esc(described)}.</p>
<h2>Metrics</h2>
<table>
<tr><th>metric</th><th>report images</th><th>held-out, end of training</th></tr>
{metric_rows}
</table>
<img alt="loss and learning rate, nearest neighbours, PCA of the embeddings" src="data:image/png;base64,{image}">
<h2>Run</h2>
<table>
{setting_rows}
</table>
<p>Made by <code>python -m jaxembed.report</code>. Neighbours: cosine similarity among the report images;
green frames show the query's concept, red ones another.</p>
</body></html>
"""
