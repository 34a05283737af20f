"""Labelled image sources and the grain input pipeline.

Typical use (the trainer):

    data = load_source(flags.data)                 # folder, manifest, "tfds:NAME[:SPLIT]" or None
    log(data.summary())                            # sizes and every skipped file with its reason
    train, heldout = split_by_images(data, 0.1, seed=0)
    augmentation = Augmentation(flip=True)         # crops, flips, rotations, erasing: one value
    for batch in train_batches(train, image_size=224, batch_size=64, seed=0, augmentation=augmentation,
                               workers=default_workers()): ...
    for batch in eval_batches(heldout, image_size=224, batch_size=64): ...  # batch["mask"] marks real rows
"""

from jaxembed.data.dataset import BadFile, LabelledImages, load_label_map, save_label_map
from jaxembed.data.decode import ImageRef, decode_image
from jaxembed.data.pipeline import DataWorkerDied, batches_per_pass, default_workers, eval_batches, train_batches
from jaxembed.data.sources import load_source, parse_tfds_spec
from jaxembed.data.splits import split_by_concepts, split_by_images
from jaxembed.data.transforms import Augmentation, preprocess_for_eval

__all__ = [
    "Augmentation",
    "BadFile",
    "DataWorkerDied",
    "ImageRef",
    "LabelledImages",
    "batches_per_pass",
    "decode_image",
    "default_workers",
    "eval_batches",
    "load_label_map",
    "load_source",
    "parse_tfds_spec",
    "preprocess_for_eval",
    "save_label_map",
    "split_by_concepts",
    "split_by_images",
    "train_batches",
]
