"""A trainer row on one accelerator, fed from memory, for the epochs that fit a wall-clock budget.

The machinery of the `*_gpu.py` experiments (`fashion_mnist_gpu.py`, `omniglot_gpu.py`). The lent GPU
machine's image has JAX, Flax and optax but no TensorFlow, so the tf.data pipeline of
`python -m jaxembed.train` cannot run there. Everything else is the trainer's own: the config comes from
the trainer's argument parser on the row's flags, and `prepare_run` and `compile_steps` build the same
holdout, model, loss, optimiser, schedule and jitted step. Batches come from the trainer's augmentation
(`transforms.augment_for_train`) of the encoded images (bytes or file paths), drawn with numpy per epoch
and computed by a pool of forked worker processes; evaluation preprocesses with
`transforms.preprocess_for_eval`, what `eval_batches` applies. Nothing is checkpointed.

The epoch count comes from a probe: the row is compiled with one epoch, `probe_steps` steps are timed, and
the row is rebuilt with the epochs that fit the rest of the budget (cosine decay needs its length up front).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
import runner  # experiments/runner.py: this script's folder is on sys.path

PROBE_WARMUP = 5
EVAL_BATCH = 500

# The worker processes' copy of the training images (set by `worker_pool` before it forks).
_ITEMS: tuple = ()


def _augmented_batch(task: tuple[np.ndarray, np.ndarray, int, dict]) -> np.ndarray:
    """uint8 (B, S, S, 3): the trainer's training transform of the images at `indices`."""
    from jaxembed.data import transforms
    from jaxembed.data.decode import open_image

    indices, randoms, image_size, augment = task
    images = np.zeros((len(indices), image_size, image_size, 3), np.uint8)
    for row, (index, numbers) in enumerate(zip(indices, randoms)):
        images[row] = transforms.augment_for_train(open_image(_ITEMS[index]), image_size, numbers, **augment)
    return images


@contextlib.contextmanager
def worker_pool(items: Sequence, workers: int):
    """A pool of `workers` forked processes that augment `items` (the whole data set's encoded images).

    Fork before JAX starts its backend: forking a process with a running accelerator runtime is unsafe."""
    global _ITEMS
    _ITEMS = tuple(items)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield pool


def config_of(flags: Sequence[str]):
    """The trainer's config for `python -m jaxembed.train FLAGS`."""
    from jaxembed import templates
    from jaxembed.train import cli

    flags = list(flags)
    template = templates.get(flags[flags.index("--template") + 1])
    return template.config_from_args(cli.build_parser(template).parse_args(flags))


class Feeder:
    """Endless training batches of a run, augmented by the worker pool, `AHEAD` batches ahead."""

    AHEAD = 32

    def __init__(self, pool, run, train_positions: np.ndarray):
        from jaxembed.data import transforms
        from jaxembed.train.loop import augmentation_options

        config = run.config
        self.augment = augmentation_options(config)
        self.image_size, self.batch_size, self.seed = config.image_size, config.batch_size, config.seed
        self.positions, self.randoms = train_positions, transforms.NUM_AUGMENT_RANDOMS
        self.labels = np.asarray(run.train_data.primary_labels, np.int32)
        self.num_classes = run.num_classes
        self.pool = pool

    def _tasks(self):
        """(rows of the training split, a worker's task) per batch, a new permutation every epoch."""
        steps = len(self.positions) // self.batch_size
        for epoch in itertools.count():
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.positions))[: steps * self.batch_size].reshape(steps, -1)
            numbers = rng.random((steps, self.batch_size, self.randoms), dtype=np.float32)
            for rows, randoms in zip(order, numbers):
                yield rows, (self.positions[rows], randoms, self.image_size, self.augment)

    def __iter__(self):
        # Bounded: an abandoned feeder (the probe's) leaves at most AHEAD batches in the pool's queue.
        pending = collections.deque()
        for rows, task in self._tasks():
            pending.append((rows, self.pool.apply_async(_augmented_batch, (task,))))
            if len(pending) < self.AHEAD:
                continue
            rows, result = pending.popleft()
            labels = self.labels[rows]
            yield {"image": result.get(), "label": labels, "index": rows.astype(np.int32),
                   "labels": np.eye(self.num_classes, dtype=np.float32)[labels]}


def eval_outputs(steps, variables, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Eval-mode outputs for uint8 (N, S, S, 3) `pixels`, in padded batches of one shape."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(pixels), EVAL_BATCH):
        batch = pixels[start:start + EVAL_BATCH]
        padded = np.concatenate([batch, np.zeros((EVAL_BATCH - len(batch), *batch.shape[1:]), np.uint8)])
        for name, value in steps.evaluate(variables, padded).items():
            if name in ("embedding", "logits"):
                parts.setdefault(name, []).append(np.asarray(value, np.float32)[: len(batch)])
    return {name: np.concatenate(value) for name, value in parts.items()}


def probe(run, steps, state, batches, num_steps: int) -> tuple[float, float]:
    """`(seconds of the first step, which compiles; images/s over num_steps steps after a short warmup)`."""
    import jax

    from jaxembed import parallel

    def step(state):
        return steps.train(state, parallel.global_batch(next(batches), run.mesh))

    start = time.perf_counter()
    state, metrics = step(state)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    for _ in range(PROBE_WARMUP):
        state, metrics = step(state)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(num_steps):
        state, metrics = step(state)
    jax.block_until_ready(metrics)
    return compile_seconds, num_steps * run.config.batch_size / (time.perf_counter() - start)


@dataclasses.dataclass
class BudgetRow:
    """A trained row: the trainer flags it ran, the prepared run, its compiled steps and final state."""

    flags: list[str]
    run: Any
    steps: Any
    state: Any
    num_epochs: int
    compile_seconds: float  # the probe's first step
    probe_images_per_second: float
    first_step_seconds: float  # the row's own first step, which recompiles for its schedule
    train_seconds: float  # every step of the row, its first included
    epoch_end_losses: list[float]
    loss_windows: list[dict]  # the trainer's loss records: step, epoch, loss (window mean), loss_max

    @property
    def images_seen(self) -> int:
        return self.num_epochs * self.run.steps_per_epoch * self.run.config.batch_size

    def record(self) -> dict:
        """The fields every `*_gpu.py` row keeps."""
        import jax

        batch = self.run.config.batch_size
        return {"command": "python -m jaxembed.train " + " ".join(self.flags),
                "device": jax.devices()[0].device_kind, "num_train_images": len(self.run.train_data),
                "num_epochs": self.num_epochs, "images_seen": self.images_seen,
                "compile_seconds": self.compile_seconds, "probe_images_per_second": self.probe_images_per_second,
                "first_step_seconds": self.first_step_seconds, "train_seconds": self.train_seconds,
                "images_per_second": self.images_seen / self.train_seconds,
                "images_per_second_after_first_step":
                    (self.images_seen - batch) / max(self.train_seconds - self.first_step_seconds, 1e-9),
                "epoch_end_losses": self.epoch_end_losses, "loss_windows": self.loss_windows,
                "largest_loss_spike": runner.largest_loss_spike(self.loss_windows, self.run.config.warmup_epochs)}


def loss_windows(step_losses: np.ndarray, window: int, steps_per_epoch: int) -> list[dict]:
    """The trainer's metrics.jsonl loss records (`step`, `epoch`, `loss`: the window's mean, `loss_max`) of
    each run of `window` step losses; `step` counts from 1 and ends the window. A last, shorter window is kept."""
    records = []
    for start in range(0, len(step_losses), window):
        losses, step = step_losses[start:start + window], min(start + window, len(step_losses))
        records.append({"step": step, "epoch": step / steps_per_epoch, "loss": float(np.mean(losses)),
                        "loss_max": float(np.max(losses))})
    return records


def train_within_budget(label: str, flags_for_epochs: Callable[[int], list[str]], data, pool, *, seconds: float,
                        eval_seconds: float, probe_steps: int) -> BudgetRow:
    """Trains `flags_for_epochs(n)` on the `LabelledImages` `data` (the items `pool` was forked with) for
    the most epochs `n` that fit `seconds`, keeping `eval_seconds` of it back for scoring."""
    import jax

    from jaxembed import parallel
    from jaxembed.train import compile_steps, prepare_run

    start = time.perf_counter()
    position = {name: i for i, name in enumerate(data.item_names)}

    def build(num_epochs: int):
        flags = flags_for_epochs(num_epochs)
        run = prepare_run(config_of(flags), data)
        train_positions = np.asarray([position[name] for name in run.train_data.item_names])
        steps = compile_steps(run)
        state = steps.init(jax.random.PRNGKey(run.config.seed))
        return flags, run, steps, state, iter(Feeder(pool, run, train_positions))

    # Probe: one epoch's schedule, compiled, then probe_steps timed steps (data feeding included).
    _, run, steps, state, batches = build(1)
    compile_seconds, probe_rate = probe(run, steps, state, batches, probe_steps)
    del state, batches
    left = seconds - (time.perf_counter() - start) - compile_seconds - eval_seconds
    num_epochs = max(1, math.floor(left * probe_rate / (run.steps_per_epoch * run.config.batch_size)))
    print(f"{label}: compile {compile_seconds:.0f} s, {probe_rate:.0f} images/s, {left:.0f} s left: "
          f"{num_epochs} epochs", file=sys.stderr, flush=True)

    flags, run, steps, state, batches = build(num_epochs)
    train_start = time.perf_counter()
    losses, step_losses, first_step_seconds = [], [], None
    for step in range(run.total_steps):
        state, metrics = steps.train(state, parallel.global_batch(next(batches), run.mesh))
        step_losses.append(metrics["loss"])  # device scalars, fetched at the end: no sync per step
        if first_step_seconds is None:
            jax.block_until_ready(metrics)
            first_step_seconds = time.perf_counter() - train_start
        if (step + 1) % run.steps_per_epoch == 0:
            losses.append(float(metrics["loss"]))
            print(f"{label}: epoch {len(losses)}/{num_epochs}, loss {losses[-1]:.3f}, "
                  f"{time.perf_counter() - train_start:.0f} s", file=sys.stderr, flush=True)
    jax.block_until_ready(state)
    train_seconds = time.perf_counter() - train_start
    return BudgetRow(flags=flags, run=run, steps=steps, state=state, num_epochs=num_epochs,
                     compile_seconds=compile_seconds, probe_images_per_second=probe_rate,
                     first_step_seconds=first_step_seconds, train_seconds=train_seconds, epoch_end_losses=losses,
                     loss_windows=loss_windows(np.asarray(jax.device_get(step_losses), np.float64),
                                               run.config.log_every, run.steps_per_epoch))


def collect(folder: str, results: str, settings: Sequence[str], markdown: Callable[[list[dict]], str]) -> None:
    """Writes `results`.json and .md (`markdown` of the rows): the rows of `folder/<setting>.json` (a
    `*_gpu.py` script's outputs) over the rows already in `results`.json, in the order of `settings`."""
    if not os.path.isdir(folder):
        raise SystemExit(f"--collect {folder}: no such folder")
    new = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and name[:-5] in settings:
            with open(os.path.join(folder, name)) as f:
                new[name[:-5]] = json.load(f)
    if not new:
        raise SystemExit(f"no <setting>.json of {list(settings)} in {folder}")
    rows = {row["setting"]: row for row in runner.previous_rows(results + ".json")} | new
    ordered = [rows[name] for name in settings if name in rows]
    runner.write_results(results, ordered, markdown(ordered))


def script_arguments(parser: argparse.ArgumentParser, settings: Sequence[str], results_name: str,
                     seconds: float) -> None:
    """The flags every `*_gpu.py` script shares: the rows, the budget, where rows go, `--collect`."""
    parser.add_argument("--setting", nargs="*", choices=list(settings), default=[],
                        help="rows to train, one after the other, each within --seconds")
    parser.add_argument("--out", help="folder for <setting>.json, each written as soon as its row is done")
    parser.add_argument("--collect", metavar="DIR", help="write the results tables from DIR/<setting>.json")
    parser.add_argument("--results", default=os.path.join(runner.RESULTS, results_name),
                        help="results table prefix (.json and .md) that --collect writes")
    parser.add_argument("--seconds", type=float, default=seconds, help="wall-clock budget of a row, compiles included")
    parser.add_argument("--eval_seconds", type=float, default=25, help="kept back for scoring")
    parser.add_argument("--probe_steps", type=int, default=40, help="steps timed to choose the epochs")
    parser.add_argument("--trainer_flags", default="", help="more trainer flags, overriding the row's (smoke tests)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))


def parse_or_collect(parser: argparse.ArgumentParser, argv: list[str] | None, settings: Sequence[str],
                     markdown: Callable[[list[dict]], str]) -> argparse.Namespace | None:
    """The script's arguments; None when they asked for `--collect` (done here: nothing to train)."""
    args = parser.parse_args(argv)
    if args.collect:
        collect(args.collect, args.results, list(settings), markdown)
        return None
    if not (args.setting and args.out):
        parser.error("--setting and --out are required (or --collect DIR)")
    return args


def write_row(out: str, row: dict) -> None:
    """`out/<setting>.json`, and the row's headline on stdout."""
    from jaxembed import fileio

    os.makedirs(out, exist_ok=True)
    fileio.write_json(os.path.join(out, f"{row['setting']}.json"), row)  # atomic: a killed run leaves no half row
    print(json.dumps({k: row[k] for k in ("setting", "num_epochs", "train_seconds", "test", "holdout")}), flush=True)
