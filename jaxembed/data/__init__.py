"""Labelled image sources and the tf.data input pipeline.

Typical use (the trainer):

    data = load_source(flags.data)                 # folder, manifest, "tfds:NAME[:SPLIT]" or None
    log(data.summary())                            # sizes and every skipped file with its reason
    train, heldout = split_by_images(data, 0.1, seed=0)
    for batch in train_batches(train, image_size=224, batch_size=64, seed=0): ...
    for batch in eval_batches(heldout, image_size=224, batch_size=64): ...  # batch["mask"] marks real rows
"""

import os

# TensorFlow only feeds the host pipeline here; its start-up INFO lines (oneDNN, ...) are noise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


from jaxembed.data.dataset import BadFile, LabelledImages, load_label_map, save_label_map
from jaxembed.data.decode import ImageRef, decode_image
from jaxembed.data.pipeline import eval_batches, steps_per_epoch, train_batches
from jaxembed.data.sources import load_source, parse_tfds_spec
from jaxembed.data.splits import split_by_concepts, split_by_images
from jaxembed.data.transforms import preprocess_for_eval

__all__ = [
    "BadFile",
    "ImageRef",
    "LabelledImages",
    "decode_image",
    "eval_batches",
    "load_label_map",
    "load_source",
    "parse_tfds_spec",
    "preprocess_for_eval",
    "save_label_map",
    "split_by_concepts",
    "split_by_images",
    "steps_per_epoch",
    "train_batches",
]
