"""experiments/fashion_mnist.py's idx reader, PNG cache, pixel baseline and table (no training)."""

import argparse
import gzip
import json
import shlex

import numpy as np
import pytest

import _experiment_script as experiment_script
from jaxembed import data as data_lib


@pytest.fixture(scope="module")
def fashion():
    return experiment_script.load("fashion_mnist")


def _write_idx(path, array: np.ndarray, *, magic: bytes | None = None, extra: bytes = b"") -> str:
    magic = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    header = magic + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes() + extra)
    return str(path)


def test_read_idx_round_trips(fashion, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], np.uint8)
    np.testing.assert_array_equal(fashion.read_idx(_write_idx(tmp_path / "i.gz", images), ndim=3), images)
    np.testing.assert_array_equal(fashion.read_idx(_write_idx(tmp_path / "l.gz", labels), ndim=1), labels)


def test_read_idx_rejects_wrong_magic_and_length(fashion, tmp_path):
    labels = np.arange(4, dtype=np.uint8)
    with pytest.raises(ValueError, match="magic number 00000901"):  # int8 (0x09), not unsigned byte
        fashion.read_idx(_write_idx(tmp_path / "a.gz", labels, magic=bytes([0, 0, 0x09, 1])), ndim=1)
    with pytest.raises(ValueError, match="magic number"):  # labels read where images are expected
        fashion.read_idx(_write_idx(tmp_path / "b.gz", labels), ndim=3)
    with pytest.raises(ValueError, match="promises"):
        fashion.read_idx(_write_idx(tmp_path / "c.gz", labels, extra=b"\0"), ndim=1)


def test_missing_file_names_path_and_package(fashion, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz.*apt-get install dataset-fashion-mnist"):
        fashion.read_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), ndim=1)
    assert fashion.main(["--source", str(tmp_path), "--workdir", str(tmp_path / "w"),
                         "--results", str(tmp_path / "r")]) == 1


def test_cache_folder_reads_back_with_concept_names(fashion, tmp_path):
    images = np.stack([np.full((28, 28), 10 * label, np.uint8) for label in range(10)])
    labels = np.arange(10, dtype=np.uint8)
    folder = fashion.write_folder(images, labels, str(tmp_path / "train"))
    assert fashion.write_folder(images[:1], labels[:1], folder) == folder  # complete: left as it is
    loaded = data_lib.load_source(folder)
    assert sorted(loaded.concepts) == sorted(fashion.folder_name(c) for c in fashion.CONCEPTS)
    assert {"T-shirt_top", "Ankle_boot"} <= set(loaded.concepts)
    for item, item_labels in zip(loaded.items, loaded.labels, strict=True):
        concept = loaded.concepts[item_labels[0]]
        label = [fashion.folder_name(c) for c in fashion.CONCEPTS].index(concept)
        np.testing.assert_array_equal(data_lib.decode_image(item)[..., 0], images[label])


def test_pixel_baseline_is_nearest_neighbours_on_pixels_centred_on_the_training_mean(fashion):
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (10, 28, 28)).astype(np.float32)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 3)

    def noisy(scale):  # three images per concept, each its pattern plus a little noise
        return np.clip(patterns[labels] + rng.normal(0, scale, (30, 28, 28)), 0, 255).astype(np.uint8)

    metrics = fashion.pixel_baseline((noisy(5), labels), (noisy(5), labels))
    assert metrics["accuracy"] == metrics["recall@1"] == metrics["map@r"] == 1.0
    assert (metrics["accuracy_kind"], metrics["num_test_images"]) == ("1-NN vs train pixels", 30)
    # The nearest training image decides: swap the training labels of two concepts, and their test
    # images are all wrong.
    swapped = np.where(labels == 0, 1, np.where(labels == 1, 0, labels)).astype(np.uint8)
    assert fashion.pixel_baseline((noisy(5), swapped), (noisy(5), labels))["accuracy"] == pytest.approx(0.8)


@pytest.mark.results
def test_rows_train_with_the_committed_commands_and_tabulate_as_committed(fashion):
    results = experiment_script.EXPERIMENTS / "results" / "fashion_mnist"
    rows = json.loads(results.with_suffix(".json").read_text())
    assert fashion.markdown(rows) == results.with_suffix(".md").read_text()
    defaults = argparse.Namespace(num_epochs=None, num_items_per_epoch=None, image_size=32, batch_size=32,
                                  min_crop_area=0.6, holdout_fraction=0.05)
    for row in rows:
        if row["setting"] in fashion.SETTINGS:
            flags = fashion.train_flags(row["setting"], defaults, "/tmp/jaxembed-fashion-mnist/train")
            assert shlex.join(["python", "-m", "jaxembed.train", *flags]) == row["command"]


def test_merged_flags_name_each_flag_once_in_its_first_place_with_its_last_value(fashion):
    merged = fashion.runner.merged_flags(["--batch_size", "32", "--flip", "--stem", "small_s2", "--no_progress"],
                                         ["--stem", "imagenet", "--batch_size", "128", "--nesterov"],
                                         ["--batch_size", "64"])
    assert merged == ["--batch_size", "64", "--flip", "--stem", "imagenet", "--no_progress", "--nesterov"]
    # A flag may be given again without values, and a value must follow a flag.
    assert fashion.runner.merged_flags(["--holdout", "images"], ["--holdout"]) == ["--holdout"]
    with pytest.raises(ValueError, match="'0.1' is not after a --flag"):
        fashion.runner.merged_flags(["0.1", "--label_smoothing"])
