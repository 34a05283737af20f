"""Fashion-MNIST rows on one accelerator within a wall-clock budget: what the recipe reaches with compute.

    python experiments/fashion_mnist_gpu.py --setting resnext_small_stem --seconds 250 --out DIR
    python experiments/fashion_mnist_gpu.py --collect DIR        # DIR/*.json -> experiments/results/fashion_mnist_gpu.*

The 2-core CPU rows of `experiments/fashion_mnist.py` fit 7-11 epochs with the ImageNet stem (8x8 maps into
stage 1 at 32 px). This script trains the same rows with the stride-1 small stem (32x32 into stage 1, the
usual CIFAR setting) in bfloat16, for as many epochs as fit in `--seconds` on the machine it runs on.

The lent GPU machine's image has JAX, Flax and optax but no TensorFlow, so the tf.data pipeline of
`python -m jaxembed.train` cannot run there. Everything else is the trainer's own: the config comes from
the trainer's argument parser on the row's flags (printed as the equivalent command), and `prepare_run`
and `compile_steps` build the same 5% holdout by images, model, loss, optimiser, schedule and jitted step.
Batches come from the trainer's augmentation (`transforms.augment_for_train`: pad-and-crop, flips) of
the PNG-encoded images, drawn with numpy per epoch and computed by a pool of forked worker processes;
evaluation preprocesses with `transforms.preprocess_for_eval`, what `eval_batches` applies. Nothing is
checkpointed. The epoch count comes from a probe: the row is compiled with one epoch, 40 steps are
timed, and the row is rebuilt with the epochs that fit the rest of the budget (cosine decay needs its
length up front).

Scores on the official 10,000 test images with `fashion_mnist.scores` (top-1 and mAP of classifiers,
nearest ArcFace centre, leave-one-out Recall@1 and MAP@R), and the same on the holdout. Writes
OUT/<setting>.json; `--collect OUT` gathers those into experiments/results/fashion_mnist_gpu.json and .md
(rows already there for other settings are kept).
"""

from __future__ import annotations

import argparse
import collections
import io
import itertools
import json
import math
import multiprocessing
import os
import shlex
import sys
import time

import numpy as np
import fashion_mnist  # experiments/fashion_mnist.py: this script's folder is on sys.path
import runner

# Row -> (the fashion_mnist.py row it starts from, flags overriding that row's).
GPU_FLAGS = ["--stem", "small", "--dtype", "bfloat16"]
SETTINGS = {
    "resnext_small_stem": ("resnext_imagenet_stem", GPU_FLAGS),
    "resnet_arcface_small_stem": ("resnet_arcface_imagenet_stem", GPU_FLAGS),
    "resnet_arcface_margin_0.2_small_stem": ("resnet_arcface_margin_0.2", GPU_FLAGS),
    "inception_bn_small_stem": ("inception_bn_imagenet_stem", GPU_FLAGS),
}
PROBE_WARMUP = 5
EVAL_BATCH = 500

# The worker processes' copy of the training images (set before the pool forks).
_ITEMS: tuple[bytes, ...] = ()


def _augmented_batch(task: tuple[np.ndarray, np.ndarray, int, dict]) -> np.ndarray:
    """uint8 (B, S, S, 3): the trainer's training transform of the images at `indices`."""
    from jaxembed.data import transforms
    from jaxembed.data.decode import open_image

    indices, randoms, image_size, augment = task
    images = np.zeros((len(indices), image_size, image_size, 3), np.uint8)
    for row, (index, numbers) in enumerate(zip(indices, randoms)):
        images[row] = transforms.augment_for_train(open_image(_ITEMS[index]), image_size, numbers, **augment)
    return images


def in_memory_images(images: np.ndarray, labels: np.ndarray, split: str):
    """A `LabelledImages` of PNG bytes with the concept names of the PNG cache (`fashion_mnist.folder_name`)."""
    from PIL import Image

    from jaxembed import data as data_lib

    def png(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    concepts = tuple(sorted(fashion_mnist.folder_name(c) for c in fashion_mnist.CONCEPTS))
    names = fashion_mnist.concept_names(labels)
    return data_lib.LabelledImages(
        items=tuple(png(image) for image in images), labels=tuple((concepts.index(n),) for n in names),
        concepts=concepts, item_names=tuple(f"fashion_mnist:{split}[{i}]" for i in range(len(images))),
        source=f"fashion_mnist:{split}")


def row_flags(setting: str, num_epochs: int, trainer_flags: str = "") -> list[str]:
    """The trainer flags of a row: fashion_mnist.py's row with this script's overrides, then `trainer_flags`."""
    base, overrides = SETTINGS[setting]
    script_args = argparse.Namespace(num_epochs=num_epochs, num_items_per_epoch=None, image_size=32,
                                     batch_size=32, min_crop_area=0.6, holdout_fraction=0.05)
    return runner.merged_flags(fashion_mnist.train_flags(base, script_args, "<in-memory>"), overrides,
                               shlex.split(trainer_flags))


def config_of(flags: list[str]):
    from jaxembed import templates
    from jaxembed.train import cli

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


def train_row(setting: str, args, pool, data, test_images) -> dict:
    import jax

    from jaxembed import parallel
    from jaxembed.train import compile_steps, prepare_run

    start = time.perf_counter()
    position = {name: i for i, name in enumerate(data.item_names)}

    def build(num_epochs: int):
        flags = row_flags(setting, num_epochs, args.trainer_flags)
        run = prepare_run(config_of(flags), data)
        train_positions = np.asarray([position[name] for name in run.train_data.item_names])
        steps = compile_steps(run)
        state = steps.init(jax.random.PRNGKey(run.config.seed))
        return flags, run, steps, state, iter(Feeder(pool, run, train_positions))

    # Probe: one epoch's schedule, compiled, then --probe_steps timed steps (data feeding included).
    _, run, steps, state, batches = build(1)
    compile_seconds, probe_rate = probe(run, steps, state, batches, args.probe_steps)
    del state, batches
    left = args.seconds - (time.perf_counter() - start) - compile_seconds - args.eval_seconds
    num_epochs = max(1, math.floor(left * probe_rate / (run.steps_per_epoch * run.config.batch_size)))
    print(f"{setting}: compile {compile_seconds:.0f} s, {probe_rate:.0f} images/s, {left:.0f} s left: "
          f"{num_epochs} epochs", file=sys.stderr, flush=True)

    flags, run, steps, state, batches = build(num_epochs)
    train_start = time.perf_counter()
    losses = []
    for step in range(run.total_steps):
        state, metrics = steps.train(state, parallel.global_batch(next(batches), run.mesh))
        if (step + 1) % run.steps_per_epoch == 0:
            losses.append(float(metrics["loss"]))
            print(f"{setting}: epoch {len(losses)}/{num_epochs}, loss {losses[-1]:.3f}, "
                  f"{time.perf_counter() - train_start:.0f} s", file=sys.stderr, flush=True)
    jax.block_until_ready(state)
    train_seconds = time.perf_counter() - train_start

    variables = state.variables
    scored = {}
    for split, images in (("test", test_images), ("holdout", run.eval_data)):
        outputs = eval_outputs(steps, variables, runner.eval_images(images, run.config.image_size))
        scored[split] = fashion_mnist.scores(outputs, runner.concept_names(images), concepts=run.concepts,
                                             task=run.task, variables=variables, run=setting)
    return {"setting": setting, "template": run.config.template.name, "arch": run.config.arch,
            "device": jax.devices()[0].device_kind, "settings": " ".join(SETTINGS[setting][1]),
            "command": "python -m jaxembed.train " + " ".join(flags),
            "num_train_images": len(run.train_data), "num_epochs": num_epochs,
            "images_seen": num_epochs * run.steps_per_epoch * run.config.batch_size,
            "compile_seconds": compile_seconds, "probe_images_per_second": probe_rate,
            "train_seconds": train_seconds,
            "images_per_second": num_epochs * run.steps_per_epoch * run.config.batch_size / train_seconds,
            "epoch_end_losses": losses, "test": scored["test"], "holdout": scored["holdout"],
            "total_seconds": time.perf_counter() - start}


def markdown(rows: list[dict]) -> str:
    cells = []
    for row in rows:
        test, holdout = row["test"], row["holdout"]
        cells.append([f"{row['template']} ({row['arch']}), {row['num_epochs']} epochs", row["settings"],
                      f"{test['accuracy']:.3f} ({test['accuracy_kind']})", runner.number(test.get("mAP")),
                      f"{test['recall@1']:.3f}", f"{test['map@r']:.3f}",
                      f"accuracy {holdout['accuracy']:.3f}; recall@1 {holdout['recall@1']:.3f}",
                      f"{row['train_seconds']:.0f} s", f"{row['images_per_second']:,.0f}", row["device"]])
    table = runner.markdown_table(["method", "settings over the CPU row", "accuracy", "mAP", "R@1", "MAP@R",
                                   "holdout (train split)", "train time", "images/s", "device"], cells)
    commands = [f"- {row['template']}: `{row['command']}`" for row in rows]
    caption = ("Fashion-MNIST test split (10,000 images) after training on one accelerator for the epochs that fit "
               "the row's budget (`experiments/fashion_mnist_gpu.py`); metrics as in fashion_mnist.md. The "
               "trainer flags of each row (the script feeds the trainer's step from memory; with `--data` the "
               "PNG cache of fashion_mnist.py, `python -m jaxembed.train` runs the same recipe, holding out "
               "other images of the same 5%):")
    return "\n".join([caption, "", *table, "", *commands, ""])


def collect(folder: str, results: str) -> None:
    """Rows from `folder/*.json` (this script's outputs) over the previous results, in SETTINGS order."""
    new = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and name[:-5] in SETTINGS:
            with open(os.path.join(folder, name)) as f:
                new[name[:-5]] = json.load(f)
    if not new:
        raise SystemExit(f"fashion_mnist_gpu: no <setting>.json of {list(SETTINGS)} in {folder}")
    rows = {row["setting"]: row for row in runner.previous_rows(results + ".json")} | new
    ordered = [rows[name] for name in SETTINGS if name in rows]
    runner.write_results(results, ordered, markdown(ordered))


def main(argv: list[str] | None = None) -> int:
    global _ITEMS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=list(SETTINGS))
    parser.add_argument("--collect", metavar="DIR", help="write the results tables from DIR/<setting>.json")
    parser.add_argument("--results", default=os.path.join(runner.REPO, "experiments", "results", "fashion_mnist_gpu"))
    parser.add_argument("--seconds", type=float, default=240, help="wall-clock budget of the row, compiles included")
    parser.add_argument("--eval_seconds", type=float, default=25, help="kept back for scoring")
    parser.add_argument("--probe_steps", type=int, default=40, help="steps timed to choose the epochs")
    parser.add_argument("--trainer_flags", default="", help="more trainer flags, overriding the row's (smoke tests)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--source", default=fashion_mnist.SOURCE)
    parser.add_argument("--out", help="folder for <setting>.json")
    args = parser.parse_args(argv)
    if args.collect:
        collect(args.collect, args.results)
        return 0
    if not (args.setting and args.out):
        parser.error("--setting and --out are required (or --collect DIR)")

    data = in_memory_images(*fashion_mnist.read_split(args.source, "train"), "train")
    test_images = in_memory_images(*fashion_mnist.read_split(args.source, "test"), "test")
    _ITEMS = data.items
    # Forked before JAX starts its backend (forking a process with a running accelerator runtime is unsafe).
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        row = train_row(args.setting, args, pool, data, test_images)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.setting}.json"), "w") as f:
        json.dump(row, f, indent=1)
    print(json.dumps({k: row[k] for k in ("setting", "num_epochs", "train_seconds", "test", "holdout")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
