"""The one runner of experiments/: train a template with the real command line, score it, tabulate, save.

    run = runner.train(["--template", "inception_bn", "--data", folder, ...], workdir)   # a fresh run
    embedder, outputs = runner.embed(run.workdir, test_images)
    row = {"command": run.command, "train_minutes": run.seconds / 60, "holdout": run.holdout(),
           "images_per_second": run.images_per_second(), **runner.retrieval(outputs["embedding"], names)}
    baseline = runner.raw_pixel_baseline(runner.eval_pixels(test_images, 48), names)
    runner.write_results(prefix, rows, runner.markdown_table(header, cells))

Training runs `python -m jaxembed.train` in a subprocess, as a user would, with its output in
WORKDIR/train.log; a run's files are read only through `jaxembed.rundir.RunDir`. Results files are
written whole (`jaxembed.fileio`), so an interrupted experiment never leaves half a table. Also the
one step timer of the speed experiments (`timed`).

Imports nothing heavy at import time: `benchmark.py`'s PyTorch worker imports this module and must
never load TensorFlow (which `jaxembed.data` does), so jaxembed's modules are imported on use.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from jaxembed import fileio, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A finished `python -m jaxembed.train` run.

    Attributes:
      command: the command as a user would type it, without `--workdir` (which is this machine's).
      workdir: the run directory.
      seconds: wall time of the whole command: start-up, data loading, compiling, training, evaluation.
    """

    command: str
    workdir: str
    seconds: float

    @property
    def run_dir(self):
        from jaxembed import rundir

        return rundir.RunDir(self.workdir)

    def summary(self) -> dict:
        """summary.json (the run finished, so it has one)."""
        summary = self.run_dir.summary()
        if summary is None:
            raise FileNotFoundError(f"{self.run_dir.file('summary.json')} not found: the run did not finish")
        return summary

    def holdout(self) -> dict:
        """The trainer's metrics on its held-out split, without their `eval/` prefix."""
        return {k.removeprefix("eval/"): v for k, v in self.summary().items() if k.startswith("eval/")}

    def images_per_second(self) -> float | None:
        return median_images_per_second(self.run_dir)

    def largest_loss_spike(self) -> float | None:
        """After the warmup, the largest ratio of a step's loss to the mean loss of its logging window
        (`loss_max / loss` in metrics.jsonl): over 3 means a spike. None for a run that logged no
        `loss_max` (older runs) or nothing after the warmup."""
        return largest_loss_spike(self.run_dir.metrics(), self.run_dir.config().warmup_epochs)

    def loss_curve(self, png: str) -> str:
        """Writes the run's one-page report (loss and learning-rate curves, neighbours, PCA of its
        held-out images) to `png`; returns `png`."""
        from jaxembed.eval import report

        files = report.write_report(self.workdir, out_dir=os.path.join(self.workdir, "report"), max_images=300)
        os.makedirs(os.path.dirname(png), exist_ok=True)
        shutil.copyfile(files.png, png)
        return png


def refuse_unfinished(parser, workdirs: Sequence[str]) -> None:
    """`parser.error` naming the first of `workdirs` that holds no finished run (no summary.json)."""
    for workdir in workdirs:
        if not os.path.isfile(os.path.join(workdir, "summary.json")):
            parser.error(f"{workdir}: no summary.json, not a finished run")


def windows_after_warmup(records: Sequence[dict], warmup_epochs: float) -> list[dict]:
    """The metrics.jsonl records of training windows after the warmup that log `loss_max` (a positive mean
    `loss` beside it): those issue 18's spike criterion reads."""
    return [r for r in records if "loss_max" in r and r.get("epoch", 0) > warmup_epochs and r["loss"] > 0]


def largest_loss_spike(records: Sequence[dict], warmup_epochs: float) -> float | None:
    """After the warmup, the largest ratio of a logging window's largest step loss to its mean (`loss_max /
    loss` of metrics.jsonl records): over 3 means a spike. None when no record has both after the warmup."""
    return max((r["loss_max"] / r["loss"] for r in windows_after_warmup(records, warmup_epochs)), default=None)


def train(flags: Sequence[str], workdir: str, *, env: dict | None = None) -> TrainedRun:
    """Runs `python -m jaxembed.train FLAGS --workdir WORKDIR` from scratch in a subprocess.

    Always a fresh run, never a resumed one, so the time is a whole run's: an unfinished `workdir` is
    removed first, a finished one moved aside (`set_aside`). The trainer's output goes to `workdir/train.log`.

    Raises:
      RuntimeError: the command failed; the message holds it and the end of its log.
    """
    command = ["python", "-m", "jaxembed.train", *flags]
    set_aside(workdir)
    os.makedirs(workdir)
    log_path = os.path.join(workdir, "train.log")
    print(f"{shlex.join(command)} (log: {log_path})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, *command[1:], "--workdir", workdir], stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO, env=env, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"{shlex.join(command)} failed (exit status {result.returncode}); end of "
                           f"{log_path}:\n{tail}")
    return TrainedRun(command=shlex.join(command), workdir=workdir, seconds=seconds)


def set_aside(workdir: str) -> str | None:
    """Clears `workdir` for a fresh run: a finished run there (summary.json) is renamed to
    `workdir.previous-N` (the first free N) and that path returned, for results may still point at it;
    anything else there (a run that never finished) is removed. None when nothing was kept."""
    if not os.path.isdir(workdir):
        return None
    if not os.path.isfile(os.path.join(workdir, "summary.json")):
        shutil.rmtree(workdir)
        return None
    number = 1
    while os.path.exists(f"{workdir}.previous-{number}"):
        number += 1
    kept = f"{workdir}.previous-{number}"
    os.rename(workdir, kept)
    print(f"{workdir} held a finished run: moved to {kept}", file=sys.stderr, flush=True)
    return kept


def merged_flags(*flag_lists: Sequence[str]) -> list[str]:
    """Command-line flags of several lists, later lists overriding earlier ones: `["--stem", "a",
    "--flip"]` then `["--stem", "b"]` gives `["--stem", "b", "--flip"]`. A flag given again keeps its
    first place with its new value(s), so a printed command names each flag once (argparse would take
    the last of two, but a reader should not have to know that). A flag is a `--name` token, its values
    the tokens after it up to the next `--name`; `--flip` and `--no-flip` count as different flags.
    """
    merged: dict[str, list[str]] = {}
    for flags in flag_lists:
        name = None
        for token in flags:
            if token.startswith("--"):
                name = token
                merged[name] = []  # an existing key keeps its place in the dict
            elif name is None:
                raise ValueError(f"{shlex.join(flags)}: {token!r} is not after a --flag")
            else:
                merged[name].append(token)
    return [token for name, values in merged.items() for token in (name, *values)]


RESULTS = os.path.join(REPO, "experiments", "results")


def loss_curve_record(run: TrainedRun, name: str) -> dict:
    """The run's report page as `experiments/results/curves/<name>.png`, and its largest loss spike:
    `{"loss_curve": path relative to experiments/results, "largest_loss_spike": ratio or None}`."""
    png = run.loss_curve(os.path.join(RESULTS, "curves", f"{name}.png"))
    return {"loss_curve": os.path.relpath(png, RESULTS), "largest_loss_spike": run.largest_loss_spike()}


def loss_curve_cell(row: dict) -> str:
    """A table cell: the largest step loss over its window's mean after warmup, linked to the curves."""
    spike = row.get("largest_loss_spike")
    text = "-" if spike is None else f"{spike:.1f}x"
    return f"[{text}]({row['loss_curve']})" if row.get("loss_curve") else text


def median_images_per_second(run_dir) -> float | None:
    """Median training images/s over the trainer's logged windows after the first (which includes the
    compilation); None when the run logged no such window."""
    rates = [record["images_per_second"] for record in run_dir.metrics() if "images_per_second" in record]
    return statistics.median(rates[1:]) if len(rates) > 1 else None


# ----------------------------------------------------------------------------- scoring


def embed(workdir: str, images, **embedding) -> tuple[Any, dict[str, np.ndarray]]:
    """`(embedder, outputs)`: the run's newest checkpoint (`jaxembed.load`, given `embedding` settings)
    and its `embed_dataset` outputs (`embedding`, `logits` for classifiers, `index`) for the
    `LabelledImages` `images`."""
    import jaxembed
    from jaxembed.inference import embed as embed_lib

    embedder = jaxembed.load(workdir, **embedding)
    outputs = embed_lib.embed_dataset(embedder.apply_fn, embedder.variables, images,
                                      image_size=embedder.image_size)
    return embedder, outputs


def concept_names(images, index: np.ndarray | None = None) -> np.ndarray:
    """The primary concept name of each image of `images` (or of those at `index`)."""
    labels = images.primary_labels if index is None else images.primary_labels[index]
    return np.asarray(images.concepts)[labels]


def retrieval(embeddings: np.ndarray, labels, **options) -> dict[str, float]:
    """Leave-one-out Recall@1/@5, MAP@R and N-way one-shot accuracy (`jaxembed.metrics.retrieval_metrics`)."""
    return metrics.retrieval_metrics(embeddings, labels, **options)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def eval_images(images, image_size: int) -> np.ndarray:
    """uint8 `(N, S, S, 3)`: each image after the evaluation preprocessing (resize and centre crop to
    `image_size`), the pixels a trained model sees."""
    from jaxembed import data as data_lib

    return np.stack([data_lib.preprocess_for_eval(data_lib.decode_image(item), image_size) for item in images.items])


def eval_pixels(images, image_size: int) -> np.ndarray:
    """uint8 `(N, S, S)`: the first channel of `eval_images` (the grey pixels of the raw-pixel baselines)."""
    return eval_images(images, image_size)[..., 0]


def raw_pixel_baseline(pixels: np.ndarray, labels, *, reference: tuple[np.ndarray, np.ndarray] | None = None,
                       **options) -> dict[str, float]:
    """The nearest-neighbour baseline on raw pixels that every trained model must beat.

    Each image's pixels are flattened, centred on the mean image (of `reference` when given, else of
    `pixels`) and L2-normalised; neighbours are then the most cosine-similar images.

    Args:
      pixels: `(N, ...)` images, all of one shape.
      labels: `(N,)` concept of each image.
      reference: optional `(pixels (M, ...), labels (M,))`, e.g. the training split.
      options: for `retrieval` (n_way, episodes, seed).

    Returns:
      `retrieval` metrics of the pixels among themselves (leave-one-out), and with `reference`
      `accuracy`: the fraction of images whose nearest reference image has their concept.
    """
    if reference is None:
        return retrieval(metrics.pixel_vectors(pixels), labels, **options)
    mean = np.asarray(reference[0], np.float32).reshape(len(reference[0]), -1).mean(axis=0)
    vectors, reference_vectors = metrics.pixel_vectors(pixels, mean), metrics.pixel_vectors(reference[0], mean)
    nearest = np.concatenate([np.argmax(vectors[start:start + 1000] @ reference_vectors.T, axis=1)
                              for start in range(0, len(vectors), 1000)])
    accuracy = float(np.mean(np.asarray(reference[1])[nearest] == np.asarray(labels)))
    return {"accuracy": accuracy, **retrieval(vectors, labels, **options)}


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], steps: int, warmup: int = 0) -> list[float]:
    """Seconds of each of `steps` calls of `fn` (which must wait for its result), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------- tables and files


def number(value: float | None, digits: int = 3) -> str:
    """`value` with `digits` decimals, or "-" when there is none."""
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table: the header, its rule, one line per row of cells."""
    return [f"| {' | '.join(header)} |", "|" + " --- |" * len(header),
            *(f"| {' | '.join(str(cell) for cell in row)} |" for row in rows)]


def previous_rows(json_path: str) -> list[dict]:
    """The rows an earlier run of an experiment wrote to `json_path` (none if it does not exist)."""
    return fileio.read_json(json_path) if os.path.exists(json_path) else []


def write_results(prefix: str, value: Any, table: str | None = None) -> None:
    """Writes `value` to PREFIX.json and `table` to PREFIX.md (when given), each atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    fileio.write_json(prefix + ".json", value)
    if table is not None:
        fileio.write_bytes(prefix + ".md", table.encode())
