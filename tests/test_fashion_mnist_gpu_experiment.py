"""experiments/fashion_mnist_gpu.py: its batches, commands and table (no training)."""

import io
import json
from multiprocessing.pool import ThreadPool
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import _experiment_script as experiment_script
from jaxembed.data import decode_image, preprocess_for_eval


@pytest.fixture(scope="module")
def gpu():
    return experiment_script.load("fashion_mnist_gpu")


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_feeder_batches_are_the_training_split_images_with_their_labels(gpu, monkeypatch):
    """With no augmentation (pad-and-crop by 0 pixels, no flip) a batch image is the evaluation view of
    the image it names: the rows index the training split, whose images sit at `train_positions` of the
    whole data set (here every other image, so confusing the two fails)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    monkeypatch.setattr(gpu, "_ITEMS", tuple(_png(image) for image in images))
    positions = np.arange(1, 20, 2)
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    config = SimpleNamespace(min_crop_area=0.6, flip=False, crop="pad", crop_padding=0, random_erasing=0.0,
                             rotation_degrees=0.0, shear_degrees=0.0, image_size=32, batch_size=4, seed=0)
    run = SimpleNamespace(config=config, train_data=SimpleNamespace(primary_labels=labels), num_classes=10)
    with ThreadPool(2) as pool:
        batches = iter(gpu.Feeder(pool, run, positions))
        epochs = [[next(batches) for _ in range(2)] for _ in range(2)]  # 10 images: 2 batches of 4 per epoch
    for epoch in epochs:
        rows = np.concatenate([batch["index"] for batch in epoch])
        assert len(set(rows)) == 8 and set(rows) <= set(range(10))
        for batch in epoch:
            np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
            np.testing.assert_array_equal(batch["labels"], np.eye(10)[labels[batch["index"]]])
            for row, image in zip(batch["index"], batch["image"]):
                expected = preprocess_for_eval(decode_image(_png(images[positions[row]])), 32)
                np.testing.assert_array_equal(image, expected)
    assert not np.array_equal(np.concatenate([b["index"] for b in epochs[0]]),
                              np.concatenate([b["index"] for b in epochs[1]]))  # reshuffled every epoch


def test_rows_hold_the_commands_the_script_builds_and_tabulate_as_committed(gpu):
    results = experiment_script.EXPERIMENTS / "results" / "fashion_mnist_gpu"
    rows = json.loads(results.with_suffix(".json").read_text())
    assert gpu.markdown(rows) == results.with_suffix(".md").read_text()
    for row in rows:
        flags = gpu.row_flags(row["setting"], row["num_epochs"])
        assert "python -m jaxembed.train " + " ".join(flags) == row["command"]
        base, overrides = gpu.SETTINGS[row["setting"]]
        assert all(flag in flags for flag in overrides)
