"""experiments/fashion_mnist.py's idx reader and PNG cache, on small synthetic idx files (no training)."""

import gzip

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
