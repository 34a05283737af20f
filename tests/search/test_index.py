"""Index directories checked on read and on write: a damaged chunk file (truncated, of another width, holding NaN
vectors, or holding another number of rows than its paths) is refused naming the index directory and the chunk
file, by `read_index` and by the commands that read an index; `build_index` refuses non-finite embeddings, naming
the image.

The indexes here are written by hand (no model): `write_index` stores chunks the way `build_index` does.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

from jaxembed.cli import cluster as cluster_cli
from jaxembed.cli import search as search_cli
from jaxembed.search import index
from jaxembed.search import query as search

DIM = 6


def write_index(out: str, chunks: list[np.ndarray]) -> str:
    """An index in `out` holding `chunks` (float32 `(n, DIM)` each), as `build_index` writes them."""
    os.makedirs(out, exist_ok=True)
    run = index.RunId(workdir="/nowhere/run", step=1, dim=DIM)
    meta = index._record(out, {"format": index.FORMAT, "run": dataclasses.asdict(run), "chunks": [], "count": 0,
                               "bad_files": {}})
    number = 0
    for vectors in chunks:
        paths = [f"/images/{number + i:03d}.png" for i in range(len(vectors))]
        meta = index._write_chunk(out, meta, vectors, paths, ["x"] * len(vectors), {})
        number += len(vectors)
    return out


def unit_rows(count: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def truncate(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) - 20])


def save(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def with_nan(path: str) -> None:
    vectors = np.load(path)
    vectors[2, 3] = np.nan
    save(path, vectors)


DAMAGE = {
    "truncated": (truncate, "cannot be read"),
    "another width": (lambda path: save(path, unit_rows(4, 9)[:, :DIM - 1].copy()), r"float32 shape \(4, 5\)"),
    "NaN vectors": (with_nan, r"1 vector\(s\) with NaN or infinite values \(rows 2\)"),
    "another row count": (lambda path: save(path, unit_rows(3, 9)), "holds 3 vectors but chunk-00001.json lists 4"),
}


def test_an_intact_index_reads_back_what_was_written(tmp_path):
    chunks = [unit_rows(4, 0), unit_rows(4, 1), unit_rows(2, 2)]
    stored = index.read_index(write_index(str(tmp_path / "index"), chunks))
    np.testing.assert_array_equal(stored.vectors, np.concatenate(chunks))
    assert len(stored.paths) == 10 and stored.paths[4] == "/images/004.png"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_chunk_is_refused_naming_the_index_and_the_chunk_file(tmp_path, damage, capsys):
    out = write_index(str(tmp_path / "index"), [unit_rows(4, 0), unit_rows(4, 1), unit_rows(2, 2)])
    chunk = os.path.join(out, "chunk-00001.npy")
    change, reason = DAMAGE[damage]
    change(chunk)
    message = f"index {out}: chunk file {chunk} .*{reason}"
    with pytest.raises(ValueError, match=message):
        index.read_index(out)
    with pytest.raises(ValueError, match=message):
        search.Index.load(out)
    # The commands that read an index: a usage error (exit 1) on stderr, nothing searched or clustered.
    for main, argv in ((search_cli.main, ["--index", out, "--query", out]),
                       (cluster_cli.main, ["--index", out, "-k", "2", "--out", str(tmp_path / "clusters")])):
        assert main(argv) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and f"chunk file {chunk}" in captured.err and out in captured.err


class NanForBlackImages:
    """Stands in for an `Embedder`: unit vectors, except NaN for an all-black image (a model gone wrong)."""

    image_size = 16
    variables = None

    @staticmethod
    def apply_fn(variables, images):
        images = np.asarray(images, np.float32)
        vectors = np.ones((len(images), DIM), np.float32) / np.sqrt(DIM)
        vectors[images.reshape(len(images), -1).max(axis=1) == 0] = np.nan
        return {"embedding": vectors}


def test_index_refuses_to_store_non_finite_embeddings_naming_the_image(tmp_path, monkeypatch):
    images = tmp_path / "images" / "cats"
    images.mkdir(parents=True)
    for n in range(5):
        Image.new("RGB", (16, 16), (40 * n + 10, 20, 30)).save(images / f"{n}.png")
    Image.new("RGB", (16, 16), (0, 0, 0)).save(images / "black.png")
    run = index.RunId(workdir="/nowhere/run", step=1, dim=DIM)
    monkeypatch.setattr(index, "load_run", lambda workdir, **embedding: (NanForBlackImages(), run))
    out = str(tmp_path / "index")
    with pytest.raises(ValueError, match=r"non-finite .* 1 image\(s\), refusing to store them: .*black\.png"):
        index.build_index("/nowhere/run", str(tmp_path / "images"), out, batch_size=4, chunk_size=4, progress=False)
    stored = index.read_index(out)  # what was stored before the bad chunk is intact, and holds no NaN
    assert np.isfinite(stored.vectors).all() and not any(path.endswith("black.png") for path in stored.paths)
