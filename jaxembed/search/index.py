"""Embed a collection of images into a search index directory.

    python -m jaxembed.index --workdir runs/inception_bn --images FOLDER|MANIFEST --out INDEX
        [--embedding_layer inception_4c --embedding_pooling gem]   # a classifier run read from another block

    summary = build_index("runs/inception_bn", "photos/", "photos.index")   # the same, from Python
    stored = read_index("photos.index")                                       # vectors, paths, labels, meta

An index directory holds:

- `meta.json`: the format, the run that made the vectors (absolute workdir, checkpoint step, embedding
  dimension, and `--embedding_layer`/`--embedding_pooling`/`--whitening`/`--flip_average` where given), the
  chunks in order, and every file that could not be read, with the reason;
- `chunk-NNNNN.npy`: float32 `(n, D)` unit vectors, and `chunk-NNNNN.json`: their `paths` and `labels`
  (the primary concept: the concept folder or the manifest's first concept; null for images directly in
  the folder given).

Vectors are written a chunk at a time: both chunk files atomically, then `meta.json` (atomically)
records the chunk. A crash therefore loses at most the chunk being written, and running the same
command again embeds only what `meta.json` does not list; a file left by a crash and never recorded is
overwritten by the same name. The same command with a collection that has grown adds the new files.
One process writes an index at a time (`fileio.exclusive_lock`); a second exits with status 2.
An index belongs to one run and checkpoint: adding with another is refused, naming both.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os

import numpy as np

from jaxembed import fileio

log = logging.getLogger("jaxembed.index")

FORMAT = "jaxembed-index/1"
META = "meta.json"
DEFAULT_CHUNK_SIZE = 4096  # vectors per chunk file: the most a crash can cost to redo


@dataclasses.dataclass(frozen=True)
class RunId:
    """Which model made an index's vectors: a run's absolute workdir, its checkpoint step, the dimension, and
    the embedding settings it was read with where they differ from the run's own (`jaxembed.load`'s
    `embedding_layer=`, `embedding_pooling=`, `whitening=`, `flip_average=`; empty in an index written before they
    existed)."""

    workdir: str
    step: int
    dim: int
    embedding: dict[str, str | bool] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        settings = "".join(f", {name}={value}" for name, value in sorted(self.embedding.items()))
        return f"run {self.workdir} at checkpoint step {self.step} (dimension {self.dim}{settings})"


@dataclasses.dataclass(frozen=True)
class StoredIndex:
    """The contents of an index directory.

    Attributes:
      vectors: float32 `(N, D)` unit vectors, in the order they were added.
      paths: `N` image paths.
      labels: `N` primary concepts (None where the image had none).
      meta: `meta.json`.
    """

    vectors: np.ndarray
    paths: tuple[str, ...]
    labels: tuple[str | None, ...]
    meta: dict

    @property
    def run(self) -> RunId:
        return RunId(**self.meta["run"])


def read_meta(index_dir: str) -> dict | None:
    """`index_dir/meta.json`, or None when the directory holds no index yet."""
    path = os.path.join(index_dir, META)
    if not os.path.exists(path):
        return None
    meta = fileio.read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a jaxembed index (expected format {FORMAT!r})")
    return meta


def read_index(index_dir: str) -> StoredIndex:
    """Everything `meta.json` records in `index_dir` (files not recorded, left by a crash, are ignored).

    Raises:
      FileNotFoundError: `index_dir` holds no index.
    """
    meta = read_meta(index_dir)
    if meta is None:
        raise FileNotFoundError(f"{index_dir} is not an index: it has no {META} (build one with python -m jaxembed.index)")
    dim = meta["run"]["dim"]
    vectors = [np.zeros((0, dim), np.float32)]
    records = []
    for chunk in meta["chunks"]:
        record = fileio.read_json(os.path.join(index_dir, chunk + ".json"))
        vectors.append(read_chunk(index_dir, chunk, dim, len(record["paths"])))
        records.append(record)
    return StoredIndex(np.concatenate(vectors), tuple(p for r in records for p in r["paths"]),
                       tuple(label for r in records for label in r["labels"]), meta)


def read_chunk(index_dir: str, chunk: str, dim: int, count: int) -> np.ndarray:
    """The float32 `(count, dim)` vectors of `index_dir/chunk.npy`, checked.

    Raises:
      ValueError: naming the index directory and the chunk file, when the file cannot be read as an array
        (e.g. truncated), or holds another dtype, width or row count than the index records, or non-finite
        values.
    """
    path = os.path.join(index_dir, chunk + ".npy")
    problem = f"index {index_dir}: chunk file {path}"
    try:
        vectors = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{problem} is missing (meta.json lists chunk {chunk})") from None
    except (ValueError, OSError, EOFError) as error:  # numpy's words for a truncated or foreign file
        raise ValueError(f"{problem} cannot be read (truncated or not a .npy array?): {error}") from None
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"{problem} holds {vectors.dtype} shape {vectors.shape}; the index's vectors are "
                         f"float32 (n, {dim}) (meta.json run dimension {dim})")
    if len(vectors) != count:
        raise ValueError(f"{problem} holds {len(vectors)} vectors but {chunk}.json lists {count} paths")
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{problem} holds {len(rows)} vector(s) with NaN or infinite values (rows "
                         f"{', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''}); "
                         "re-index those images")
    return vectors


def stored_paths(index_dir: str, meta: dict) -> list[str]:
    """The image paths the chunks recorded in `meta` hold, in order (the vectors are not read)."""
    return [path for chunk in meta["chunks"]
            for path in fileio.read_json(os.path.join(index_dir, chunk + ".json"))["paths"]]


def check_run(meta: dict, run: RunId, index_dir: str) -> None:
    """Raises ValueError naming both runs when the index in `index_dir` was made by another run."""
    stored = RunId(**meta["run"])
    if stored != run:
        raise ValueError(
            f"{index_dir} holds vectors of {stored.describe()}; refusing to add vectors of {run.describe()}. "
            "Use a new --out directory for another run or checkpoint.")


def collection_labels(images) -> list[str | None]:
    """Per image of a `LabelledImages` from a folder or manifest: its primary concept, or None for an
    image directly in the source folder (a plain folder of images has no concepts)."""
    root = images.source if os.path.isdir(images.source) else None
    return [None if root is not None and os.path.dirname(name) == root else images.concepts[labels[0]]
            for name, labels in zip(images.item_names, images.labels)]


def load_collection(spec: str):
    """The images of a folder (concept sub-folders or none) or a .csv/.jsonl manifest, as `LabelledImages`."""
    from jaxembed import data as data_lib  # imported on use: TensorFlow is slow to start

    if spec in (None, data_lib.sources.DEFAULT_SPEC) or str(spec).startswith("tfds:"):
        raise ValueError(f"--images must be a folder or a .csv/.jsonl manifest of image files, got {spec!r}")
    return data_lib.load_source(spec)


def build_index(workdir: str, images: str, out: str, *, batch_size: int = 64,
                chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = True,
                embedding: dict[str, str | bool] | None = None) -> dict:
    """Embeds the images of `images` not yet in the index `out` with the newest checkpoint of `workdir`.

    Args:
      workdir: a training workdir.
      images: a folder (with or without concept sub-folders) or a .csv/.jsonl manifest.
      out: the index directory (created if missing).
      batch_size: images per model call.
      chunk_size: images per chunk file; a multiple of batch_size.
      progress: show a progress bar.
      embedding: `jaxembed.load`'s `embedding_layer`/`embedding_pooling` to embed a classifier run from
        another block; recorded in meta.json, so `jaxembed.search` embeds its queries the same way.

    Returns:
      `{"index", "added", "already_stored", "skipped", "count"}` (skipped: unreadable files named in meta).

    Raises:
      DirectoryBusy: another process is writing `out`.
      ValueError: a bad parameter, no usable image, or `out` belongs to another run or dimension.
      FileNotFoundError: no such workdir, checkpoint or image source.
    """
    if batch_size < 1 or chunk_size < batch_size or chunk_size % batch_size:
        raise ValueError(f"chunk_size must be a positive multiple of batch_size, got {chunk_size=}, {batch_size=}")
    out = os.path.abspath(out)
    with fileio.exclusive_lock(out):
        meta = read_meta(out)
        embedder, run = load_run(workdir, **(embedding or {}))
        if meta is None:
            meta = {"format": FORMAT, "run": dataclasses.asdict(run), "chunks": [], "count": 0, "bad_files": {}}
        check_run(meta, run, out)
        data = load_collection(images)
        stored = set(stored_paths(out, meta))
        todo = [i for i, name in enumerate(data.item_names) if name not in stored]
        log.info("%s: %d images, %d already stored, %d to embed", images, len(data), len(data) - len(todo), len(todo))
        bad = {**meta["bad_files"], **{bad.path: bad.reason for bad in data.bad_files}}
        meta = _record(out, meta, bad_files={path: reason for path, reason in bad.items() if path not in stored})
        added = 0
        for vectors, names, labels, failed in _embedded_chunks(embedder, data.subset(todo), collection_labels(data),
                                                               todo, batch_size, chunk_size, progress):
            meta = _write_chunk(out, meta, vectors, names, labels, failed)
            added += len(names)
        return {"index": out, "added": added, "already_stored": len(data) - len(todo),
                "skipped": len(meta["bad_files"]), "count": meta["count"]}


def load_run(workdir: str, **embedding: str):
    """`(Embedder, RunId)` of the newest checkpoint of `workdir`, read with the `embedding` settings."""
    import jaxembed
    from jaxembed import rundir
    from jaxembed.inference import embed

    step = latest_step(workdir)
    embedding = embed.embedding_changes(rundir.RunDir(workdir).config(), embedding)
    embedder = jaxembed.load(workdir, step=step, **embedding)
    return embedder, RunId(os.path.abspath(workdir), step, int(embedder.embedding_dim), embedding)


def latest_step(workdir: str) -> int:
    """The newest checkpoint step of the training workdir."""
    from jaxembed.rundir import RunDir

    run = RunDir(workdir)
    if not run.exists():
        raise FileNotFoundError(f"{run.file('run.json')} not found: {workdir!r} is not a jaxembed training workdir")
    step = run.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run.checkpoints}")
    return int(step)


def _embedded_chunks(embedder, todo_images, labels: list[str | None], todo: list[int], batch_size: int,
                     chunk_size: int, progress: bool):
    """Yields `(vectors (n, D) float32, paths, labels, failed {path: reason})` per `chunk_size` images."""
    from tqdm.auto import tqdm

    from jaxembed import data as data_lib

    if not todo:
        return
    batches = data_lib.eval_batches(todo_images, image_size=embedder.image_size, batch_size=batch_size)
    per_chunk = chunk_size // batch_size
    parts: list = []
    for number, batch in enumerate(tqdm(batches, total=math.ceil(len(todo) / batch_size), desc="index",
                                        unit="batch", disable=not progress), start=1):
        parts.append((np.asarray(embedder.apply_fn(embedder.variables, batch["image"])["embedding"]), batch))
        if number % per_chunk == 0:
            yield _gather(parts, todo_images, labels, todo)
            parts = []
    if parts:
        yield _gather(parts, todo_images, labels, todo)


def _gather(parts, todo_images, labels, todo):
    """The real rows of embedded batches, and the images that failed to decode."""
    vectors, names, chunk_labels, failed = [], [], [], {}
    for embeddings, batch in parts:
        for row, position in enumerate(batch["index"]):
            if position < 0:
                continue  # padding
            name = todo_images.item_names[position]
            if batch["mask"][row]:
                vectors.append(embeddings[row])
                names.append(name)
                chunk_labels.append(labels[todo[position]])
            else:
                failed[name] = "could not be decoded when embedding"
    dim = parts[0][0].shape[1]
    vectors = np.asarray(vectors, np.float32).reshape(-1, dim)
    bad = [name for name, row in zip(names, vectors) if not np.isfinite(row).all()]
    if bad:
        raise ValueError(f"the model gave non-finite (NaN or infinite) embeddings for {len(bad)} image(s), "
                         f"refusing to store them: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}")
    return vectors, names, chunk_labels, failed


def _write_chunk(out: str, meta: dict, vectors: np.ndarray, paths: list[str], labels: list[str | None],
                 failed: dict[str, str]) -> dict:
    """Writes one chunk's two files, then records it in meta.json; returns the new meta."""
    name = f"chunk-{len(meta['chunks']):05d}"
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    fileio.write_bytes(os.path.join(out, name + ".npy"), buffer.getvalue())
    fileio.write_json(os.path.join(out, name + ".json"), {"paths": paths, "labels": labels})
    added = set(paths)
    bad = {path: reason for path, reason in {**meta["bad_files"], **failed}.items() if path not in added}
    return _record(out, meta, chunks=meta["chunks"] + [name], count=meta["count"] + len(paths), bad_files=bad)


def _record(out: str, meta: dict, **changes) -> dict:
    """meta.json with `changes`, written atomically; returns it."""
    meta = {**meta, **changes}
    fileio.write_json(os.path.join(out, META), meta)
    return meta
