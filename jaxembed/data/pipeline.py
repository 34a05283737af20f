"""tf.data input pipelines: endless shuffled, augmented training batches and one-pass eval batches.

The order of images and every random augmentation number are drawn with numpy from `(seed, epoch,
process_index)` before any image is read, so batches are reproducible and a resumed run skips ahead
without decoding. tf.data then loads whole batches in parallel threads (`num_parallel_calls`; Pillow
releases the GIL while it decodes and resizes) and prefetches them. One Python call per batch rather
than per image keeps tf.data's per-element overhead (~0.1 ms, as much as decoding a small PNG) out of
the way. Batches come out as dicts of numpy arrays.

Multi-host: process `p` of `P` reads only images `p, p + P, p + 2P, ...` of `data`, and every process
yields the same number of batches per epoch (`steps_per_epoch`), so hosts stay in step.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from jaxembed.data.dataset import LabelledImages
from jaxembed.data.decode import describe_error, open_image
from jaxembed.data.transforms import (AFFINE_RANDOMS, CROPS, CROP_FLIP_RANDOMS, ERASE_RANDOMS, MAX_ROTATION_DEGREES,
                                      MAX_SHEAR_DEGREES, NUM_AUGMENT_RANDOMS, augment_for_train, center_crop)

if TYPE_CHECKING:
    import tensorflow as tf

logger = logging.getLogger(__name__)


@functools.cache
def host_tensorflow():
    """TensorFlow, imported when the first pipeline (or event file) needs it, not when jaxembed.data is
    imported: the models, losses and jitted steps then import without it (the lent GPU image has JAX and
    no TensorFlow), and a process that only embeds or evaluates skips its ~2 s import.

    The host pipeline must not claim accelerator memory that JAX needs (relevant where the full
    TensorFlow build is installed; tensorflow-cpu sees no GPU anyway). Only possible before TF starts.
    """
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass
    return tf

# Stands in for an image that passed the load-time check but fails to decode later (file changed or
# removed mid-run, or loaded with verify=False): training goes on, and the failure is logged by name.
_GRAY = 128

Batch = dict[str, np.ndarray]


def steps_per_epoch(num_images: int, batch_size: int, process_count: int = 1) -> int:
    """Batches each process yields per pass over the data (the remainder is dropped)."""
    return (num_images // process_count) // batch_size


def train_batches(
    data: LabelledImages,
    *,
    image_size: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_epoch: int = 0,
    skip_batches: int = 0,
    crop_area: tuple[float, float] = (0.25, 1.0),
    flip: bool = False,
    crop: str = "resized",
    crop_padding: int = 4,
    erase_probability: float = 0.0,
    rotation_degrees: float = 0.0,
    shear_degrees: float = 0.0,
) -> Iterator[Batch]:
    """Endless augmented training batches for this process, reshuffled every epoch.

    Each epoch is a new permutation of this process's shard (drawn from `seed`, the epoch and
    `process_index`), cut to `steps_per_epoch(len(data), batch_size, process_count)` full batches.
    Each image gets a random-resized crop (area fraction in `crop_area`, aspect 3/4..4/3) or, with
    `crop="pad"`, a random shift of up to `crop_padding` pixels; with `flip`, a random horizontal flip
    (off by default: a mirrored character or digit is another concept); with `rotation_degrees` and
    `shear_degrees`, a random rotation and shear of up to that many degrees either way; and with
    `erase_probability`, random erasing (`jaxembed.data.transforms.augment_for_train`).

    `crop_area` defaults to (0.25, 1) rather than ImageNet's (0.08, 1): for embeddings the concept must
    remain recognisable in the crop, and small images (8x8 digits, 105x105 glyphs) have little to spare.

    Args:
      data: the images to train on.
      image_size: side of the square output images.
      batch_size: images per batch on this process (the per-process share of the global batch).
      seed: non-negative integer; the same seed gives the same batches.
      process_index, process_count: this process and how many read the data (jax.process_index(),
        jax.process_count()).
      start_epoch: resume at the start of this epoch.
      skip_batches: batches to skip after that (a resumed step inside an epoch; may exceed an epoch).

    Returns:
      An iterator of dicts: `image` uint8 `(B, image_size, image_size, 3)` RGB, `label` int32 `(B,)`
      (primary concept), `labels` float32 `(B, num_concepts)` multi-hot, `index` int32 `(B,)` (position
      in data).

    Raises:
      ValueError: a bad argument, or a shard smaller than one batch (the message gives the sizes).
    """
    _check_sizes(image_size, batch_size, process_index, process_count)
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer, got seed={seed!r}")
    if start_epoch < 0 or skip_batches < 0:
        raise ValueError(f"start_epoch and skip_batches must be >= 0, got {start_epoch}, {skip_batches}")
    if not 0 < crop_area[0] <= crop_area[1] <= 1:
        raise ValueError(f"crop_area must satisfy 0 < min <= max <= 1, got crop_area={crop_area}")
    if crop not in CROPS or crop_padding < 0 or not 0 <= erase_probability <= 1:
        raise ValueError(f"crop={crop!r} (expected one of {', '.join(CROPS)}), crop_padding={crop_padding} "
                         f"(expected >= 0), erase_probability={erase_probability} (expected 0..1)")
    if not (0 <= rotation_degrees <= MAX_ROTATION_DEGREES and 0 <= shear_degrees <= MAX_SHEAR_DEGREES):
        raise ValueError(f"rotation_degrees={rotation_degrees} (expected 0..{MAX_ROTATION_DEGREES}) and "
                         f"shear_degrees={shear_degrees} (expected 0..{MAX_SHEAR_DEGREES})")
    steps = steps_per_epoch(len(data), batch_size, process_count)
    if steps == 0:
        raise ValueError(
            f"{len(data)} images over {process_count} process(es) leave {len(data) // process_count} per "
            f"process, fewer than one batch of batch_size={batch_size}; use a smaller batch or more data"
        )
    shard = np.arange(process_index, len(data), process_count)
    first_epoch, first_step = start_epoch + skip_batches // steps, skip_batches % steps

    def epoch_plan(epoch: np.int64) -> tuple[np.ndarray, np.ndarray]:
        """The batches of `epoch`: image indices `(steps, B)` and augmentation numbers `(steps, B, 12)`."""
        rng = np.random.default_rng([int(seed), int(epoch), process_index])
        order = shard[rng.permutation(len(shard))[: steps * batch_size]].reshape(steps, batch_size)
        crop_flip = rng.random((steps, batch_size, CROP_FLIP_RANDOMS), dtype=np.float32)
        erasing = rng.random((steps, batch_size, ERASE_RANDOMS), dtype=np.float32)  # drawn after: see transforms
        affine = rng.random((steps, batch_size, AFFINE_RANDOMS), dtype=np.float32)
        randoms = np.concatenate([crop_flip, erasing, affine], axis=-1)
        first = first_step if epoch == first_epoch else 0
        return order[first:], randoms[first:]

    tf = host_tensorflow()

    def plan_in_tf(epoch):
        order, randoms = tf.numpy_function(epoch_plan, [epoch], (tf.int64, tf.float32), stateful=False)
        order.set_shape((None, batch_size))
        randoms.set_shape((None, batch_size, NUM_AUGMENT_RANDOMS))
        return order, randoms

    def load(image: Image.Image, randoms: np.ndarray) -> np.ndarray:
        return augment_for_train(image, image_size, randoms, crop_area=crop_area, flip=flip, crop=crop,
                                 crop_padding=crop_padding, erase_probability=erase_probability,
                                 rotation_degrees=rotation_degrees, shear_degrees=shear_degrees)

    planned_batches = tf.data.Dataset.counter(first_epoch).map(plan_in_tf).unbatch()
    # Large JPEGs are decoded at a reduced scale, as long as the smallest crop keeps its full resolution.
    draft_size = math.ceil(image_size / math.sqrt(crop_area[0]))
    # A gray stand-in for a failed image is logged by name; training carries on with it, unmasked.
    return _load_batches(
        planned_batches, data, load, image_size, draft_size=draft_size, mask_key=None, on_failure="using a gray image"
    )


def eval_batches(
    data: LabelledImages,
    *,
    image_size: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """One deterministic pass over this process's images: shorter side resized, centre-cropped.

    The transform is `preprocess_for_eval`. Every process yields
    `ceil(ceil(len(data) / process_count) / batch_size)` batches; rows past the end of its shard are
    padding. An image that fails to decode (possible only with `verify=False`, or a file changed since
    loading) is logged and masked out.

    Returns:
      An iterator of dicts: `image` uint8 `(B, image_size, image_size, 3)`, `label` int32 `(B,)`,
      `labels` float32 `(B, num_concepts)`, `index` int32 `(B,)` (position in data; -1 for padding) and
      `mask` bool `(B,)` (True for real, decoded images). Padding rows are all zeros.
    """
    _check_sizes(image_size, batch_size, process_index, process_count)
    shard = np.arange(process_index, len(data), process_count)
    num_batches = math.ceil(math.ceil(len(data) / process_count) / batch_size)
    indices = np.full(num_batches * batch_size, -1, np.int64)
    indices[: len(shard)] = shard
    # No randomness in evaluation; the zero array only gives every batch the same structure.
    tf = host_tensorflow()
    planned_batches = tf.data.Dataset.from_tensor_slices(
        (indices.reshape(num_batches, batch_size), np.zeros((num_batches, batch_size, 0), np.float32))
    )

    def load(image: Image.Image, unused_randoms: np.ndarray) -> np.ndarray:
        return np.atleast_3d(np.asarray(center_crop(image, image_size)))

    # Full decodes (no JPEG draft), so the result equals preprocess_for_eval(decode_image(item)).
    return _load_batches(
        planned_batches, data, load, image_size, draft_size=None, mask_key="mask", on_failure="masked out of evaluation"
    )


def _check_sizes(image_size: int, batch_size: int, process_index: int, process_count: int) -> None:
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be positive, got {image_size}, {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")


def _load_batches(
    planned_batches: "tf.data.Dataset",
    data: LabelledImages,
    load: Callable[[Image.Image, np.ndarray], np.ndarray],
    image_size: int,
    *,
    draft_size: int | None,
    mask_key: str | None,
    on_failure: str,
) -> Iterator[Batch]:
    """Turns `(indices (B,), randoms (B, k))` elements into batches of images, loaded in parallel.

    `load(image, randoms)` maps one decoded image to uint8 `(S, S, 1 or 3)`. Index -1 is padding.
    `draft_size` is passed to `open_image`.
    Yields `image`, `index`, `label`, `labels` and, under `mask_key` if given, which rows hold a
    decoded image (not padding, not a failure). `on_failure` ends the log line naming an image that failed to decode.
    """

    def load_batch(indices: np.ndarray, randoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.zeros((len(indices), image_size, image_size, 3), np.uint8)
        decoded = np.zeros(len(indices), bool)
        for row, index in enumerate(indices):
            if index < 0:
                continue
            try:
                image = open_image(data.items[index], draft_size=draft_size)
            except Exception as error:  # noqa: BLE001 - one bad file must not stop the run; it is named.
                reason = describe_error(error)
                logger.warning("%s: could not decode (%s); %s", data.item_names[index], reason, on_failure)
                images[row] = _GRAY
                continue
            images[row] = load(image, randoms[row])  # broadcasts a gray (S, S, 1) image to RGB
            decoded[row] = True
        return images, decoded

    tf = host_tensorflow()

    def load_batch_in_tf(indices, randoms):
        images, decoded = tf.numpy_function(load_batch, [indices, randoms], (tf.uint8, tf.bool), stateful=False)
        batch_size = indices.shape[0]
        images.set_shape((batch_size, image_size, image_size, 3))
        decoded.set_shape((batch_size,))
        batch = {"image": images, "index": tf.cast(indices, tf.int32)}
        return batch if mask_key is None else {**batch, mask_key: decoded}

    batches = planned_batches.map(load_batch_in_tf, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    for batch in batches.as_numpy_iterator():
        yield _with_labels(batch, data)


def _with_labels(batch: Batch, data: LabelledImages) -> Batch:
    """Adds `label` (primary concept, int32) and `labels` (multi-hot float32) for `batch["index"]`."""
    indices = batch["index"]
    label = np.zeros(len(indices), np.int32)
    labels = np.zeros((len(indices), data.num_concepts), np.float32)
    for row, index in enumerate(indices):
        if index >= 0:
            label[row] = data.labels[index][0]
            labels[row, list(data.labels[index])] = 1.0
    return {**batch, "label": label, "labels": labels}
