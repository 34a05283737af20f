"""Input pipelines on grain: endless shuffled, augmented training batches and one-pass eval batches.

The order of images and every random augmentation number are drawn with numpy from `(seed, epoch,
process_index)` before any image is read (`TrainPlan`), so a batch is a pure function of its number:
batches are reproducible, the same whatever the number of workers, and a resumed run starts at its
step without decoding anything before it. grain turns the plan into batches: a random-access
`MapDataset` of batch numbers, mapped by `LoadBatch` (decode, augment, label), read either in the
training process by a few threads (`workers=0`; Pillow releases the GIL while it decodes and resizes)
or by `workers` separate processes, each loading whole batches (batch b comes from worker b mod
workers) and keeping `prefetch` of them ready. One call per batch, not per image, keeps grain's
per-element overhead out of the way. Batches come out as dicts of numpy arrays.

Multi-host: process `p` of `P` reads only images `p, p + P, p + 2P, ...` of `data`, and every process
yields the same number of batches per epoch (`batches_per_pass`), so hosts stay in step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from jaxembed.data.dataset import LabelledImages
from jaxembed.data.decode import describe_error, open_image
from jaxembed.data.transforms import (AFFINE_RANDOMS, CROP_FLIP_RANDOMS, ERASE_RANDOMS, NUM_AUGMENT_RANDOMS,
                                      Augmentation, center_crop)

logger = logging.getLogger(__name__)

# Stands in for an image that passed the load-time check but fails to decode later (file changed or
# removed mid-run, or loaded with verify=False): training goes on, and the failure is logged by name.
_GRAY = 128

# Threads that load batches in the training process with workers=0, and batches each worker process
# keeps ready: two hide the time one batch takes to cross from the worker.
_THREADS_IN_PROCESS = 4
_PREFETCH_PER_WORKER = 2

Batch = dict[str, np.ndarray]


class DataWorkerDied(RuntimeError):
    """A worker process loading batches ended unexpectedly (killed, out of memory); the message names it."""

    def __init__(self, message: str, *, worker: int, batch: int):
        super().__init__(message)
        self.worker, self.batch = worker, batch


def batches_per_pass(num_images: int, batch_size: int, process_count: int = 1) -> int:
    """Full batches each process cuts from one pass over `num_images` (the remainder is dropped).

    The trainer's epoch (`schedules.steps_per_epoch`) is another idea: `num_items_per_epoch` images,
    rounded up to whole steps. The two agree when an epoch is one pass that divides into batches.
    """
    return (num_images // process_count) // batch_size


def default_workers() -> int:
    """Worker processes for training batches: one per CPU core this process may use, less one for the
    training process itself, at most 16 (each holds the list of images); none below 4 cores, a machine
    without an accelerator, whose train step, not the loading, sets the pace (at 224 px on 2 cores the step
    runs at a few images/s, the in-process threads load thousands: experiments/results/data_throughput.md),
    so a worker would add only its start-up and memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores < 4 else min(16, cores - 1)


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """Batch number (from the first step of the run) -> `(indices (B,), randoms (B, NUM_AUGMENT_RANDOMS))`.

    grain reads it as a random-access source of endless length; each epoch's plan is a permutation of
    this process's shard drawn from `(seed, epoch, process_index)`, with the augmentation numbers drawn
    after it, so batch numbers map to the same images and crops in every process and every worker.
    """

    num_images: int
    batch_size: int
    seed: int
    process_index: int
    process_count: int

    @property
    def steps_per_pass(self) -> int:
        return batches_per_pass(self.num_images, self.batch_size, self.process_count)

    def __len__(self) -> int:
        return sys.maxsize  # endless: training stops by step count, never by running out

    def __getitem__(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, step = divmod(int(batch), self.steps_per_pass)
        order, randoms = self.epoch(epoch)
        return order[step], randoms[step]

    @functools.lru_cache(maxsize=2)  # consecutive batches share an epoch; a worker sees two at a boundary
    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The batches of `epoch`: image indices int64 `(steps, B)` and numbers float32 `(steps, B, 12)`."""
        steps, batch_size = self.steps_per_pass, self.batch_size
        shard = np.arange(self.process_index, self.num_images, self.process_count)
        rng = np.random.default_rng([self.seed, epoch, self.process_index])
        order = shard[rng.permutation(len(shard))[: steps * batch_size]].reshape(steps, batch_size)
        crop_flip = rng.random((steps, batch_size, CROP_FLIP_RANDOMS), dtype=np.float32)
        erasing = rng.random((steps, batch_size, ERASE_RANDOMS), dtype=np.float32)  # drawn after: see transforms
        affine = rng.random((steps, batch_size, AFFINE_RANDOMS), dtype=np.float32)
        return order, np.concatenate([crop_flip, erasing, affine], axis=-1)


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """Batch number -> `(indices (B,), no randoms (B, 0))`: this process's shard in order, padded with -1."""

    num_images: int
    batch_size: int
    process_index: int
    process_count: int

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.num_images / self.process_count) / self.batch_size)

    def __getitem__(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(batch * self.batch_size, (batch + 1) * self.batch_size)
        indices = self.process_index + rows * self.process_count
        indices[indices >= self.num_images] = -1
        return indices, np.zeros((self.batch_size, 0), np.float32)


def train_batches(
    data: LabelledImages,
    *,
    image_size: int,
    batch_size: int,
    seed: int,
    augmentation: Augmentation = Augmentation(),
    process_index: int = 0,
    process_count: int = 1,
    start_epoch: int = 0,
    skip_batches: int = 0,
    workers: int = 0,
) -> Iterator[Batch]:
    """Endless augmented training batches for this process, reshuffled every epoch.

    Each epoch is a new permutation of this process's shard (drawn from `seed`, the epoch and
    `process_index`), cut to `batches_per_pass(len(data), batch_size, process_count)` full batches;
    each image is augmented by `augmentation` (`jaxembed.data.transforms.Augmentation`) with numbers
    drawn with the plan.

    Args:
      data: the images to train on.
      image_size: side of the square output images.
      batch_size: images per batch on this process (the per-process share of the global batch).
      seed: non-negative integer; the same seed gives the same batches.
      augmentation: the random crop, flip, rotation, shear and erasing.
      process_index, process_count: this process and how many read the data (jax.process_index(),
        jax.process_count()).
      start_epoch: resume at the start of this epoch.
      skip_batches: batches to skip after that (a resumed step inside an epoch; may exceed an epoch).
      workers: processes that load batches (0: threads of this process). The batches are the same.

    Returns:
      An iterator of dicts: `image` uint8 `(B, image_size, image_size, 3)` RGB, `label` int32 `(B,)`
      (primary concept), `labels` float32 `(B, num_concepts)` multi-hot, `index` int32 `(B,)` (position
      in data). It raises `DataWorkerDied` if a worker process dies; `close()` stops the workers.

    Raises:
      ValueError: a bad argument, or a shard smaller than one batch (the message gives the sizes).
    """
    _check_sizes(image_size, batch_size, process_index, process_count, workers)
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer, got seed={seed!r}")
    if start_epoch < 0 or skip_batches < 0:
        raise ValueError(f"start_epoch and skip_batches must be >= 0, got {start_epoch}, {skip_batches}")
    if not isinstance(augmentation, Augmentation):
        raise TypeError(f"augmentation must be a jaxembed.data.transforms.Augmentation, got {augmentation!r}")
    plan = TrainPlan(len(data), batch_size, int(seed), process_index, process_count)
    if plan.steps_per_pass == 0:
        raise ValueError(
            f"{len(data)} images over {process_count} process(es) leave {len(data) // process_count} per "
            f"process, fewer than one batch of batch_size={batch_size}; use a smaller batch or more data"
        )
    # Large JPEGs are decoded at a reduced scale, as long as the smallest crop keeps its full resolution.
    draft_size = math.ceil(image_size / math.sqrt(augmentation.crop_area[0]))
    # A gray stand-in for a failed image is logged by name; training carries on with it, unmasked.
    load = LoadBatch(data, image_size, _TrainView(augmentation), draft_size=draft_size, mask_key=None,
                     on_failure="using a gray image")
    first = start_epoch * plan.steps_per_pass + skip_batches
    return _read(plan, load, first=first, workers=workers)


def eval_batches(
    data: LabelledImages,
    *,
    image_size: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
) -> Iterator[Batch]:
    """One deterministic pass over this process's images: shorter side resized, centre-cropped.

    The transform is `preprocess_for_eval`. Every process yields
    `ceil(ceil(len(data) / process_count) / batch_size)` batches; rows past the end of its shard are
    padding. An image that fails to decode (possible only with `verify=False`, or a file changed since
    loading) is logged and masked out. `workers` as for `train_batches`.

    Returns:
      An iterator of dicts: `image` uint8 `(B, image_size, image_size, 3)`, `label` int32 `(B,)`,
      `labels` float32 `(B, num_concepts)`, `index` int32 `(B,)` (position in data; -1 for padding) and
      `mask` bool `(B,)` (True for real, decoded images). Padding rows are all zeros.
    """
    _check_sizes(image_size, batch_size, process_index, process_count, workers)
    plan = EvalPlan(len(data), batch_size, process_index, process_count)
    # Full decodes (no JPEG draft), so the result equals preprocess_for_eval(decode_image(item)).
    load = LoadBatch(data, image_size, _EvalView(), draft_size=None, mask_key="mask",
                     on_failure="masked out of evaluation")
    return _read(plan, load, first=0, workers=workers)


def _check_sizes(image_size: int, batch_size: int, process_index: int, process_count: int, workers: int) -> None:
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be positive, got {image_size}, {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    if not (isinstance(workers, (int, np.integer)) and workers >= 0):
        raise ValueError(f"workers must be an integer >= 0 (0: load in this process), got workers={workers!r}")


@dataclasses.dataclass(frozen=True)
class _TrainView:
    """One decoded training image -> its augmented square (`Augmentation` with the image's numbers)."""

    augmentation: Augmentation

    def __call__(self, image: Image.Image, image_size: int, randoms: np.ndarray) -> np.ndarray:
        return self.augmentation(image, image_size, randoms)


@dataclasses.dataclass(frozen=True)
class _EvalView:
    """One decoded image -> the evaluation view (`center_crop`)."""

    def __call__(self, image: Image.Image, image_size: int, unused_randoms: np.ndarray) -> np.ndarray:
        return np.atleast_3d(np.asarray(center_crop(image, image_size)))


@dataclasses.dataclass(frozen=True)
class LoadBatch:
    """`(indices (B,), randoms (B, k))` -> a batch: each image decoded, viewed, labelled.

    Picklable, so grain can send it to worker processes. `view(image, image_size, randoms)` maps one
    decoded image to uint8 `(S, S, 1 or 3)`. Index -1 is padding. `draft_size` is passed to
    `open_image`. The batch holds `image`, `index`, `label`, `labels` and, under `mask_key` if given,
    which rows hold a decoded image (not padding, not a failure). Returns `(batch, failures)`, each failure a
    line naming an image that failed to decode and why, ending with `on_failure`: the training process logs
    them (a worker process's own log goes nowhere the user sees).
    """

    data: LabelledImages | _ImagesFile
    image_size: int
    view: Callable[[Image.Image, int, np.ndarray], np.ndarray]
    draft_size: int | None
    mask_key: str | None
    on_failure: str

    def __call__(self, plan: tuple[np.ndarray, np.ndarray]) -> tuple[Batch, tuple[str, ...]]:
        indices, randoms = plan
        data = self.data.images if isinstance(self.data, _ImagesFile) else self.data
        size = self.image_size
        images = np.zeros((len(indices), size, size, 3), np.uint8)
        decoded = np.zeros(len(indices), bool)
        label = np.zeros(len(indices), np.int32)
        labels = np.zeros((len(indices), data.num_concepts), np.float32)
        failures = []
        for row, index in enumerate(indices):
            if index < 0:
                continue
            label[row] = data.labels[index][0]
            labels[row, list(data.labels[index])] = 1.0
            try:
                image = open_image(data.items[index], draft_size=self.draft_size)
            except Exception as error:  # noqa: BLE001 - one bad file must not stop the run; it is named.
                reason = describe_error(error)
                failures.append(f"{data.item_names[index]}: could not decode ({reason}); {self.on_failure}")
                images[row] = _GRAY
                continue
            images[row] = self.view(image, size, randoms[row])  # broadcasts a gray (S, S, 1) image to RGB
            decoded[row] = True
        batch = {"image": images, "index": np.asarray(indices, np.int32), "label": label, "labels": labels}
        return (batch if self.mask_key is None else {**batch, self.mask_key: decoded}), tuple(failures)


class _ImagesFile:
    """A pipeline's images on their way to its worker processes, as the name of a file each worker reads once.

    A worker gets its arguments through a pipe, and CPython's spawn keeps that pipe's read end open in the
    parent while it writes them: a worker that dies while starting (a script re-imported without an
    `if __name__ == "__main__":` guard, a program read from stdin) would leave the parent blocked forever
    on arguments larger than the pipe's buffer (64 KiB), which the images (megabytes) are. A file name is not.
    """

    def __init__(self, path: str):
        self.path = path

    def __getstate__(self) -> dict:
        return {"path": self.path}  # never the images loaded from it

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]

    @functools.cached_property
    def images(self) -> LabelledImages:
        with open(self.path, "rb") as f:
            return pickle.load(f)


def _read(plan, load: LoadBatch, *, first: int, workers: int) -> Iterator[Batch]:
    """The batches `load(plan[first]), load(plan[first + 1]), ...` through grain, in that order."""
    import grain  # imported on the first pipeline: `import jaxembed.data` stays light

    _use_grain_defaults()
    folder = None
    if workers:
        folder = tempfile.mkdtemp(prefix="jaxembed-pipeline-")
        path = os.path.join(folder, "images.pickle")
        with open(path, "wb") as f:
            pickle.dump(load.data, f, protocol=pickle.HIGHEST_PROTOCOL)
        load = dataclasses.replace(load, data=_ImagesFile(path))
    batches = grain.MapDataset.source(plan)[first:].map(load)
    if workers == 0:
        dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=_THREADS_IN_PROCESS,
                                                            prefetch_buffer_size=2 * _THREADS_IN_PROCESS))
    else:
        # One thread per worker: the processes are the parallelism, and a batch crosses to the trainer
        # in shared memory.
        dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=_PREFETCH_PER_WORKER),
            worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
    return _named_failures(iter(dataset), workers, folder)


def _named_failures(iterator, workers: int, folder: str | None) -> Iterator[Batch]:
    """`iterator`'s batches; a dead worker becomes `DataWorkerDied` naming it. Closing (or garbage-collecting)
    this generator stops the worker processes and removes `folder` (the workers' images file)."""
    produced = 0
    try:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except RuntimeError as error:
                if workers == 0 or "terminated unexpectedly" not in str(error):
                    raise
                # grain hands batch b to worker b mod workers and waits for the batches in order, so the
                # worker found dead is the one owing the next batch (which it may have finished: a batch
                # still in a killed process's queue is lost with it).
                worker = produced % workers
                raise DataWorkerDied(
                    f"data worker {worker} of {workers} died before handing over batch {produced} of this "
                    f"pipeline ({_exit_reason(str(error))}): killed, out of memory (fewer --data_workers, "
                    "smaller batches or more memory), or failed to start (its error is printed above; a script "
                    "needs `if __name__ == '__main__':` around its work, and --data_workers 0 loads in this "
                    "process)", worker=worker, batch=produced) from None
            produced += 1
            batch, failures = batch
            for failure in failures:
                logger.warning("%s", failure)
            if workers:
                # Copied out of grain's shared memory, which is then freed at once rather than when the
                # caller lets go of the batch (a kept batch would hold a block until the process ends).
                batch = {name: np.array(value) for name, value in batch.items()}
            yield batch
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


# Seconds between a worker's checks that the training process still lives.
_PARENT_CHECK_SECONDS = 1.0


def _exit_with_parent(parent_pid: int, worker: int, workers: int) -> None:
    """Worker start-up: a thread that ends this worker once the training process is gone. Python's own clean-up
    stops workers when the trainer exits, but a trainer killed outright (kill -9, the OOM killer) would leave
    them running forever, orphaned. (The kernel's parent-death signal is no substitute: it follows the thread
    that started the worker, and grain starts workers from short-lived threads.)"""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name=f"jaxembed-data-worker-{worker}-of-{workers}-watch", daemon=True).start()


def _exit_reason(grain_message: str) -> str:
    """"exit code N", with the signal's name when a signal ended the worker (grain reports -signum)."""
    found = re.search(r"exit code (-?\d+)", grain_message)
    if found is None:
        return grain_message
    code = int(found.group(1))
    if code < 0:
        try:
            return f"exit code {code}, {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


@functools.cache
def _use_grain_defaults() -> None:
    """grain reads some settings as absl flags, which only a program started by `absl.app` has parsed;
    elsewhere (a plain script, pytest, a notebook) reading one raises. Marking the flags parsed, once,
    gives every flag its default value, as `absl.app.run` would with no flags on the command line."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
