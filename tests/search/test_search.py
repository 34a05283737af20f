"""Visual search: exact top-k over a mesh against NumPy, the index directory (resume, lock, refusals), the
search and cluster commands, and their errors.

The top-k tests run on synthetic vectors (deliberate ties included) and on real embeddings, on 1 and on
the 8 fake CPU devices conftest.py sets up. The command tests index 120 of scikit-learn's handwritten
digits with the session's shared tiny run (conftest.py's `tiny_run`: arch "tiny", 4 steps; its quality
does not matter: the tests compare the index with itself and with NumPy). The tools run in this process
(`main(argv)`), except where the test is about the process: its exit status, a kill, a lock held by another
process. `test_approximate_search_on_cpu_finds_most_neighbours` needs faiss (the `search` extra) and is
skipped without it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from jaxembed.cli import cluster as cluster_cli
from jaxembed.cli import index as index_cli
from jaxembed.cli import search as search_cli
from jaxembed.cli import whitening as whitening_cli
import tiny
import jaxembed
from jaxembed import fileio, metrics
from jaxembed.search import cluster
from jaxembed.search import gallery
from jaxembed.search import index
from jaxembed.search import query as search
from jaxembed.search import topk

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- the NumPy reference


def numpy_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64: per query the k largest inner products, equal scores by lower row first."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def assert_same_top_k(scores, ids, vectors, queries, k, *, near_tie=0.0):
    """Scores within 1e-5 of the reference, and the same ids, except (when `near_tie` > 0) where two
    rows' scores differ by less than `near_tie`, a difference float32 rounding may reorder."""
    ref_scores, ref_ids = numpy_top_k(vectors, queries, k)
    np.testing.assert_allclose(np.asarray(scores), ref_scores, atol=1e-5)
    ids = np.asarray(ids)
    differ = ids != ref_ids
    if near_tie:
        exact = queries.astype(np.float64) @ vectors.astype(np.float64).T
        ours = np.take_along_axis(exact, ids, axis=1)
        differ &= np.abs(ours - ref_scores) >= near_tie
    assert not differ.any(), f"{differ.sum()} of {differ.size} ids differ from NumPy, first at {np.argwhere(differ)[0]}"


def tied_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    """Entries in {-1, 0, 1}: every inner product is a small exact integer, so many rows tie exactly."""
    return np.random.default_rng(seed).integers(-1, 2, (count, dim)).astype(np.float32)


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def mesh_of(num_devices: int):
    return topk.row_mesh(jax.devices()[:num_devices])


# ----------------------------------------------------------------------------- exact top-k


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("count, k, block_rows", [(1003, 25, 64), (1003, 25, 100_000), (10, 10, 64), (300, 1, 16)])
def test_top_k_breaks_ties_like_numpy(num_devices, count, k, block_rows):
    vectors, queries = tied_vectors(count, 16, seed=0), tied_vectors(37, 16, seed=1)
    rows = topk.place_rows(vectors, mesh_of(num_devices), block_rows=block_rows)
    scores, ids = topk.top_k(rows, queries, k)
    assert_same_top_k(scores, ids, vectors, queries, k)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_top_k_on_random_unit_vectors(num_devices):
    vectors, queries = unit_vectors(5000, 32, seed=2), unit_vectors(50, 32, seed=3)
    rows = topk.place_rows(vectors, mesh_of(num_devices), block_rows=256)
    scores, ids = topk.top_k(rows, queries, 10)
    assert_same_top_k(scores, ids, vectors, queries, 10)


@pytest.mark.parametrize("count, num_queries, k, block_rows, group", [
    (1003, 37, 25, 64, 16), (1003, 40, 25, 100_000, 16), (10, 37, 10, None, 16), (300, 37, 1, 16, 16),
    (1003, 40, 7, 64, 5), (1003, 37, 30, 8, 4), (5000, 40, 100, None, 16)])
@pytest.mark.parametrize("merge_every", [1, topk.HOST_MERGE_CANDIDATES])
@pytest.mark.parametrize("threads", [1, 3])  # 3: ranges scanned in parallel, ties across their edges
def test_host_top_k_breaks_ties_like_numpy(monkeypatch, count, num_queries, k, block_rows, group, merge_every,
                                           threads):
    # merge_every=1: the candidates are merged after every block (a threshold raised each time).
    monkeypatch.setattr(topk, "HOST_MERGE_CANDIDATES", merge_every)
    vectors, queries = tied_vectors(count, 16, seed=0), tied_vectors(num_queries, 16, seed=1)
    scores, ids = topk.host_top_k(vectors, queries, k, block_rows=block_rows, group=group, threads=threads)
    assert scores.dtype == np.float32 and ids.shape == (num_queries, k)
    assert_same_top_k(scores, ids, vectors, queries, k)


def test_host_merge_orders_zero_and_minus_zero_as_equal_scores_by_row():
    # BLAS may give -0.0 or 0.0 for a zero inner product: the merge's sort key must not tell them apart.
    # (Candidates reach the merge in increasing row order.)
    merged = topk._Candidates(np.zeros(4, np.intp), np.array([0.0, -0.0, 0.5, 0.0], np.float32),
                              np.array([1, 2, 3, 7], np.int64)).top(3, 1)
    assert merged.ids.tolist() == [3, 1, 2]


@pytest.mark.parametrize("count, block, k, parts", [(1000, 64, 10, 3), (1000, 64, 50, 8), (130, 64, 10, 3),
                                                    (129, 64, 2, 3), (64, 64, 64, 2)])
def test_host_ranges_are_whole_blocks_of_at_least_k_rows(count, block, k, parts):
    edges = topk._ranges(count, block, k, parts)
    assert edges[0] == 0 and edges[-1] == count and 2 <= len(edges) <= parts + 1
    assert all(edge % block == 0 for edge in edges[1:-1])
    assert all(stop - start >= k for start, stop in zip(edges[:-1], edges[1:]))


def test_host_top_k_on_random_unit_vectors_equals_the_mesh():
    vectors, queries = unit_vectors(5000, 32, seed=2), unit_vectors(50, 32, seed=3)
    scores, ids = topk.host_top_k(vectors, queries, 10, block_rows=256)
    assert_same_top_k(scores, ids, vectors, queries, 10)
    mesh_scores, mesh_ids = topk.top_k(topk.place_rows(vectors, mesh_of(8), block_rows=256), queries, 10)
    np.testing.assert_array_equal(ids, np.asarray(mesh_ids))
    # float32 sums of 32 products in two orders (NumPy's BLAS, XLA): 1.8e-7 apart at most, measured.
    np.testing.assert_allclose(scores, np.asarray(mesh_scores), rtol=0, atol=5e-7)


def test_top_k_with_recall_target_is_exact_off_tpu():
    vectors, queries = tied_vectors(1003, 16, seed=0), tied_vectors(37, 16, seed=1)
    rows = topk.place_rows(vectors, mesh_of(8), block_rows=64)
    if jax.default_backend() == "tpu":
        pytest.skip("approx_max_k is approximate on TPU")
    assert_same_top_k(*topk.top_k(rows, queries, 10, recall_target=0.9), vectors, queries, 10)


def test_layout_of_ten_million_rows_puts_an_eighth_on_each_device():
    layout = topk.row_layout(10_000_000, 8)
    shard_shape = topk.row_sharding(mesh_of(8)).shard_shape((layout.padded_count, 512))
    assert shard_shape == (layout.rows_per_device, 512)
    assert layout.rows_per_device % layout.block == 0 and layout.block <= topk.DEFAULT_BLOCK_ROWS
    assert 10_000_000 / 8 <= layout.rows_per_device < 1.001 * 10_000_000 / 8


def test_index_search_batches_queries_and_checks_arguments(monkeypatch):
    vectors, queries = unit_vectors(700, 24, seed=4), unit_vectors(30, 24, seed=5)
    monkeypatch.setattr(search, "QUERY_BATCH", 16)  # 30 queries: a batch of 16 and one of 14 padded to 16
    found = search.Index(vectors, tuple(map(str, range(700))), (None,) * 700)
    assert_same_top_k(*found.search(queries, 7), vectors, queries, 7)  # on the host (a CPU backend)
    assert_same_top_k(*found.search(queries, 7, mesh=mesh_of(8)), vectors, queries, 7)  # over a mesh
    with pytest.raises(ValueError, match="k=701 must be between 1 and the number of indexed images"):
        found.search(queries, 701)
    with pytest.raises(ValueError, match=r"queries must be \(Q, 24\)"):
        found.search(queries[:, :10], 5)
    empty = search.Index(np.zeros((0, 24), np.float32), (), ())
    with pytest.raises(ValueError, match="the index is empty"):
        empty.search(queries, 1)


def test_approximate_search_on_cpu_finds_most_neighbours():
    pytest.importorskip("faiss")
    vectors, queries = unit_vectors(3000, 32, seed=6), unit_vectors(100, 32, seed=7)
    found = search.Index(vectors, tuple(map(str, range(3000))), (None,) * 3000)
    _, approximate = found.search(queries, 10, approximate=True)
    _, exact = numpy_top_k(vectors, queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall > 0.9


# ----------------------------------------------------------------------------- clusters and pictures


def test_kmeans_separates_separated_groups_and_checks_k():
    centres = 10 * np.eye(3, 8, dtype=np.float32)
    vectors = np.concatenate([centres[i] + unit_vectors(20, 8, seed=i) for i in range(3)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assignment, similarity = cluster.kmeans(vectors, 3)
    labels = tuple(str(i // 20) for i in range(60))
    assert all(c["size"] == 20 and c["purity"] == 1.0 for c in cluster.describe_clusters(assignment, labels, 3))
    assert (similarity > 0.9).all()
    with pytest.raises(ValueError, match="k=61 must be between 1"):
        cluster.kmeans(vectors, 61)


def test_search_page_frames_matches_green_and_others_red(tmp_path):
    path = str(tmp_path / "a.png")
    Image.new("RGB", (10, 10), "blue").save(path)
    hits = [{"path": path, "label": label, "score": 0.5} for label in ("x", "y", None)]
    page = gallery.search_page([{"query": path, "label": "x", "results": hits}])
    assert page.count(gallery.GREEN) == page.count(gallery.RED) == page.count(gallery.GREY) == 1
    assert page.count("data:image/png;base64,") == 4 and "1 of 2 results show the query's label" in page


# ----------------------------------------------------------------------------- the commands, on a tiny run


def write_digits(root: str, per_digit: int, start: int = 0) -> str:
    """`per_digit` of scikit-learn's real 8x8 handwritten digits per digit, as `root/<digit>/<n>.png`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        folder = os.path.join(root, str(digit))
        os.makedirs(folder, exist_ok=True)
        for n in np.flatnonzero(digits.target == digit)[start:start + per_digit]:
            pixels = np.round(digits.images[n] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{n:04d}.png"))
    return root


def run_tool(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m jaxembed.<module> args` in a subprocess (8 fake devices, as this process has), for a test that
    fails before the run's model is loaded (a fresh process does not know the arch "tiny": `tiny.tool_command`)."""
    done = subprocess.run([sys.executable, "-m", f"jaxembed.{module}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"jaxembed.{module} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def indexed(tiny_run, tmp_path_factory):
    """The shared tiny run, 120 digit images (+ one corrupt file) and an index of them, in chunks of 8."""
    base = tmp_path_factory.mktemp("search")
    images = write_digits(str(base / "digits"), per_digit=12)
    with open(os.path.join(images, "3", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    out = str(base / "index")
    summary = index.build_index(tiny_run.workdir, images, out, batch_size=8, chunk_size=8, progress=False)
    return {"base": base, "images": images, "workdir": tiny_run.workdir, "index": out, "summary": summary}


SMALL_CHUNKS = ("--batch_size", "8", "--chunk_size", "8", "--no_progress")


def test_index_records_the_run_the_vectors_and_the_unreadable_file(indexed):
    assert indexed["summary"] == {"index": indexed["index"], "added": 120, "already_stored": 0, "skipped": 1,
                                  "count": 120}
    stored = index.read_index(indexed["index"])
    assert stored.meta["run"] == {"workdir": os.path.abspath(indexed["workdir"]), "step": tiny.NUM_STEPS,
                                  "dim": tiny.FEATURES, "embedding": {}}  # the run's last checkpoint; the backbone's width
    assert stored.vectors.shape == (120, tiny.FEATURES) and stored.vectors.dtype == np.float32
    assert len(stored.meta["chunks"]) == 15 and stored.meta["count"] == 120
    assert [os.path.basename(os.path.dirname(p)) for p in stored.paths] == list(stored.labels)
    np.testing.assert_allclose(np.linalg.norm(stored.vectors, axis=1), 1.0, atol=1e-5)
    broken = os.path.join(indexed["images"], "3", "broken.png")
    assert list(stored.meta["bad_files"]) == [broken]


@pytest.mark.parametrize("num_devices", [1, 8])
def test_top_k_on_real_embeddings(indexed, num_devices):
    vectors = index.read_index(indexed["index"]).vectors
    rows = topk.place_rows(vectors, mesh_of(num_devices), block_rows=32)
    scores, ids = topk.top_k(rows, vectors[::6], 15)
    # A barely trained model puts many digits within 1e-6 of each other; only those may swap.
    assert_same_top_k(scores, ids, vectors, vectors[::6], 15, near_tie=1e-6)


# In the process below, SIGKILL arrives as chunk 3's label file is about to be written: its vectors are on disk
# and meta.json does not record them, the worst moment for a crash (a tiny model indexes 15 chunks in a fraction
# of a second, too fast to interrupt reliably from outside).
CRASH_AT_CHUNK_3 = """
import os, signal
from jaxembed import fileio
_write_json = fileio.write_json
def write_json(path, value):
    if os.path.basename(path) == "chunk-00003.json":
        os.kill(os.getpid(), signal.SIGKILL)
    _write_json(path, value)
fileio.write_json = write_json
"""


def test_a_crash_mid_index_then_the_same_command_ends_equal(indexed, capsys):
    out = str(indexed["base"] / "crashed")
    args = ["--workdir", indexed["workdir"], "--images", indexed["images"], "--out", out, *SMALL_CHUNKS]
    killed = subprocess.run(tiny.tool_command("index", *args, setup=CRASH_AT_CHUNK_3), cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    recorded = index.read_meta(out)["chunks"]
    assert recorded == ["chunk-00000", "chunk-00001", "chunk-00002"]
    leftover = os.path.join(out, "chunk-00003.npy")  # written, never recorded: must be redone, not trusted
    assert os.path.exists(leftover)
    np.save(leftover, np.zeros((8, tiny.FEATURES), np.float32))
    first_chunk = os.stat(os.path.join(out, recorded[0] + ".npy"))

    assert index_cli.main(args) == 0  # the same command again
    summary = json.loads(capsys.readouterr().out)
    assert summary["already_stored"] == 8 * len(recorded) and summary["added"] == 120 - 8 * len(recorded)
    assert os.stat(os.path.join(out, recorded[0] + ".npy")).st_mtime_ns == first_chunk.st_mtime_ns  # not redone
    resumed, clean = index.read_index(out), index.read_index(indexed["index"])
    assert resumed.meta["chunks"] == [f"chunk-{n:05d}" for n in range(15)] and resumed.meta["count"] == 120
    assert resumed.paths == clean.paths and resumed.labels == clean.labels
    np.testing.assert_array_equal(resumed.vectors, clean.vectors)
    assert resumed.meta["bad_files"] == clean.meta["bad_files"]


def test_a_second_writer_exits_2_naming_the_holder(indexed):
    with fileio.exclusive_lock(indexed["index"]):
        done = run_tool("index", "--workdir", indexed["workdir"], "--images", indexed["images"], "--out", indexed["index"],
                        check=False)
    assert done.returncode == 2, done.stderr
    assert "is in use by another writer" in done.stderr and f"pid {os.getpid()}" in done.stderr


def test_adding_skips_stored_files_and_refuses_another_run(indexed):
    out = str(indexed["base"] / "grown")
    first = index.build_index(indexed["workdir"], os.path.join(indexed["images"], "1"), out, batch_size=8, chunk_size=8,
                              progress=False)
    assert first["added"] == 12 and index.read_index(out).labels == (None,) * 12  # a plain folder: no labels
    plain = write_digits(str(indexed["base"] / "more"), per_digit=2, start=12)
    second = index.build_index(indexed["workdir"], os.path.join(plain, "1"), out, batch_size=8, chunk_size=8,
                               progress=False)
    assert second == {**second, "added": 2, "already_stored": 0, "count": 14}
    again = index.build_index(indexed["workdir"], os.path.join(indexed["images"], "1"), out, batch_size=8, chunk_size=8,
                              progress=False)
    assert again["added"] == 0 and again["already_stored"] == 12
    manifest = os.path.join(plain, "sevens.csv")
    with open(manifest, "w") as f:
        f.write("path,concepts\n" + "".join(f"7/{name},seven;odd\n" for name in sorted(os.listdir(f"{plain}/7"))))
    from_manifest = index.build_index(indexed["workdir"], manifest, out, batch_size=8, chunk_size=8, progress=False)
    assert from_manifest["added"] == 2 and index.read_index(out).labels[-2:] == ("seven", "seven")

    meta = index.read_meta(out)
    fileio.write_json(os.path.join(out, index.META), {**meta, "run": {**meta["run"], "step": 999, "dim": 7}})
    workdir = os.path.abspath(indexed["workdir"])
    both = (f"{out} holds vectors of run {workdir} at checkpoint step 999 (dimension 7); refusing to add vectors "
            f"of run {workdir} at checkpoint step {meta['run']['step']} (dimension {meta['run']['dim']})")
    with pytest.raises(ValueError, match=re.escape(both)):
        index.build_index(indexed["workdir"], plain, out, batch_size=8, chunk_size=8, progress=False)
    assert index.read_meta(out)["count"] == 16


def assert_each_query_finds_its_own_vector(out: str, folder: str, stored) -> None:
    """Searching the index `out` for each image of `folder` (the images `stored` holds) finds that image's
    own vector first: search embedded it as the index was. Two compiled batch shapes (8 and 64) leave
    float32 rounding: a few ulps (1.2e-7) in a short dot product."""
    results = search.search_images(search.Index.load(out), folder, 1)
    assert [r["query"] for r in results] == list(stored.paths)
    assert min(r["results"][0]["score"] for r in results) > 1 - 1e-6


TAPPED = {"embedding_layer": "conv", "embedding_pooling": "gem"}  # the tiny backbone's block, 8 channels


def test_an_index_read_from_another_block_records_it_and_search_embeds_queries_the_same_way(indexed, capsys):
    out, sevens = str(indexed["base"] / "tapped"), os.path.join(indexed["images"], "7")
    assert index_cli.main(["--workdir", indexed["workdir"], "--images", sevens, "--out", out, *SMALL_CHUNKS,
                       "--embedding_layer", "conv", "--embedding_pooling", "gem"]) == 0
    capsys.readouterr()
    stored = index.read_index(out)
    assert stored.meta["run"]["embedding"] == TAPPED
    assert stored.vectors.shape == (12, tiny.CHANNELS)  # the run's own embedding has tiny.FEATURES
    # Queries from the index: the search must embed them as the index was (the run's own embedding would
    # not even match the dimension); 1 ulp from its own vector was seen.
    assert_each_query_finds_its_own_vector(out, sevens, stored)

    workdir = os.path.abspath(indexed["workdir"])
    both = (f"{out} holds vectors of run {workdir} at checkpoint step {tiny.NUM_STEPS} (dimension {tiny.CHANNELS}, "
            f"embedding_layer=conv, embedding_pooling=gem); refusing to add vectors of run {workdir} at checkpoint "
            f"step {tiny.NUM_STEPS} (dimension {tiny.FEATURES})")
    with pytest.raises(ValueError, match=re.escape(both)):
        index.build_index(indexed["workdir"], sevens, out, batch_size=8, chunk_size=8, progress=False)
    # A setting equal to the run's own (its pooling) is no other embedding: an index of the run's own takes it.
    plain = str(indexed["base"] / "plain_sevens")
    index.build_index(indexed["workdir"], sevens, plain, batch_size=8, chunk_size=8, progress=False)
    same = index.build_index(indexed["workdir"], sevens, plain, batch_size=8, chunk_size=8, progress=False,
                             embedding={"embedding_pooling": "avg"})
    assert same == {**same, "added": 0, "already_stored": 12}


def test_an_index_made_with_a_whitening_records_its_path_and_search_projects_queries_by_it(indexed, capsys,
                                                                                          monkeypatch):
    from jaxembed.inference import whitening

    fitted = str(indexed["base"] / "whitening.npz")
    assert whitening_cli.main(["--workdir", indexed["workdir"], "--images", indexed["images"], "--out", fitted,
                           "--dims", "4"]) == 0
    out, sevens = str(indexed["base"] / "whitened"), os.path.join(indexed["images"], "7")
    monkeypatch.chdir(indexed["base"])  # a relative --whitening is recorded by its absolute path
    assert index_cli.main(["--workdir", indexed["workdir"], "--images", sevens, "--out", out, *SMALL_CHUNKS,
                       "--whitening", "whitening.npz"]) == 0
    capsys.readouterr()
    stored = index.read_index(out)
    assert stored.meta["run"]["embedding"] == {"whitening": fitted}
    assert stored.vectors.shape == (12, 4)
    monkeypatch.chdir("/")
    # As above: each query, embedded again with the recorded whitening, finds its own vector (float32 rounding).
    assert_each_query_finds_its_own_vector(out, sevens, stored)


def test_an_index_made_with_flip_averaging_records_it_and_search_averages_queries_too(indexed, capsys):
    out, sevens = str(indexed["base"] / "flip_averaged"), os.path.join(indexed["images"], "7")
    assert index_cli.main(["--workdir", indexed["workdir"], "--images", sevens, "--out", out, *SMALL_CHUNKS,
                       "--flip_average"]) == 0
    capsys.readouterr()
    stored = index.read_index(out)
    assert stored.meta["run"]["embedding"] == {"flip_average": True}
    # Each query, embedded again flip-averaged, finds its own vector (float32 rounding, as above); a digit's
    # mirror image is another shape, so the run's plain embedding of it would not.
    assert_each_query_finds_its_own_vector(out, sevens, stored)
    plain = jaxembed.load(indexed["workdir"])
    images = [np.asarray(Image.open(path).convert("RGB")) for path in stored.paths]
    assert np.min(np.sum(plain(images) * stored.vectors, axis=1)) < 1 - 1e-3


def test_search_command_prints_json_and_writes_the_page(indexed, capsys):
    page = str(indexed["base"] / "search.html")
    assert search_cli.main(["--index", indexed["index"], "--query", os.path.join(indexed["images"], "7"), "-k", "5",
                        "--json", "--html", page]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 12 and all(len(r["results"]) == 5 for r in results)
    top = results[0]["results"][0]
    assert top["path"] == results[0]["query"] and top["score"] == pytest.approx(1.0, abs=1e-5)
    assert results[0]["label"] == "7"
    # Each score is the inner product of the query's and the result's stored vectors (the queries are indexed).
    stored = index.read_index(indexed["index"])
    row = {path: i for i, path in enumerate(stored.paths)}
    for entry in results:
        for hit in entry["results"]:
            assert hit["path"] == stored.paths[hit["id"]] and hit["label"] == stored.labels[hit["id"]]
            expected = float(stored.vectors[row[entry["query"]]] @ stored.vectors[hit["id"]])
            assert hit["score"] == pytest.approx(expected, abs=1e-5)
    with open(page) as f:
        assert f.read().count("data:image/png;base64,") == 12 * 6


def test_search_command_with_k_larger_than_the_index_returns_every_image_with_a_note(indexed, capsys):
    query = os.path.join(indexed["images"], "7", sorted(os.listdir(os.path.join(indexed["images"], "7")))[0])
    assert search_cli.main(["--index", indexed["index"], "--query", query, "-k", "121", "--json"]) == 0
    captured = capsys.readouterr()
    assert "note: -k 121 is more than the 120 indexed images: returning all 120" in captured.err
    (entry,) = json.loads(captured.out)
    assert sorted(hit["id"] for hit in entry["results"]) == list(range(120))
    scores = [hit["score"] for hit in entry["results"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("query, message", [
    ("3/broken.png", "query image .*broken.png cannot be read: "),
    ("3", "1 query image\\(s\\) in .*3 cannot be read: .*broken.png: "),
    ("7/missing.png", "query .*missing.png' does not exist"),
])
def test_search_names_an_unreadable_query(indexed, query, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        search.search_images(search.Index.load(indexed["index"]), os.path.join(indexed["images"], query), 5)


def test_search_of_an_empty_index_is_refused(indexed, capsys):
    empty = indexed["base"] / "empty"
    empty.mkdir()
    meta = index.read_meta(indexed["index"])
    fileio.write_json(str(empty / index.META), {**meta, "chunks": [], "count": 0, "bad_files": {}})
    assert search_cli.main(["--index", str(empty), "--query", os.path.join(indexed["images"], "7")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "python -m jaxembed.search: error: the index is empty" in captured.err


def test_cluster_command_writes_assignments_and_contact_sheets(indexed, capsys):
    out = str(indexed["base"] / "clusters")
    assert cluster_cli.main(["--index", indexed["index"], "-k", "4", "--out", out]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["k"] == 4 and sum(summary["sizes"]) == 120
    # The printed scores are the clusters.csv assignment's, scored against the indexed labels.
    with open(os.path.join(out, "clusters.csv")) as f:
        rows = list(csv.DictReader(f))
    assert summary["scores"] == {"num_labelled": 120, **metrics.clustering_metrics(
        [int(row["cluster"]) for row in rows], [row["label"] for row in rows])}
    with open(os.path.join(out, "clusters.csv")) as f:
        assert len(f.read().splitlines()) == 121
    for cluster_id in range(4):
        with Image.open(os.path.join(out, f"cluster-{cluster_id:03d}.png")) as sheet:
            assert sheet.width > 0
