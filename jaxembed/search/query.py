"""Visual search in an index built by `python -m jaxembed.index`.

    python -m jaxembed.search --index INDEX --query IMAGE|FOLDER -k 10 [--json] [--html OUT.html]

    index = Index.load("photos.index")
    scores, ids = index.search(query_vectors, k=10)        # (Q, D) float32 -> (Q, k) scores and row ids
    results = search_images(index, "query.jpg", k=10)      # what the command prints with --json

Exact search on an accelerator, or on a mesh given, runs on every device (`jaxembed.topk.top_k`): the index
rows are split over a 1-D mesh. On a CPU it runs on the host with NumPy's BLAS (`jaxembed.topk.host_top_k`),
which is faster there than XLA's product (experiments/results/search_benchmark.md). With
`approximate=True` it runs `lax.approx_max_k` on TPU, and a faiss HNSW graph elsewhere (built on first
use, held by the `Index`; `pip install 'jaxembed[search]'`).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from jaxembed.search import ann, topk
from jaxembed.search.index import RunId, collection_labels, read_index

QUERY_BATCH = 1024  # queries per compiled search call (fewer are padded to a power of two)


@dataclasses.dataclass(frozen=True, eq=False)
class Index:
    """An index's vectors with their paths and labels, searchable.

    Attributes:
      vectors: float32 `(N, D)` unit vectors.
      paths: `N` image paths; labels: `N` primary concepts or None.
      meta: the index's `meta.json` (the run that made it), empty for an index made in memory.
    """

    vectors: np.ndarray
    paths: tuple[str, ...]
    labels: tuple[str | None, ...]
    meta: dict = dataclasses.field(default_factory=dict)
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)  # placed rows, faiss graphs

    @classmethod
    def load(cls, path: str) -> Index:
        """The index in directory `path` (FileNotFoundError when there is none)."""
        stored = read_index(path)
        return cls(stored.vectors, stored.paths, stored.labels, stored.meta)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def search(self, queries: np.ndarray, k: int, *, approximate: bool = False, recall_target: float = 0.95,
               mesh: jax.sharding.Mesh | None = None,
               block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest rows (largest inner product) of each query.

        Args:
          queries: float32 `(Q, D)`.
          k: 1 <= k <= len(self).
          approximate: on TPU `lax.approx_max_k` at `recall_target`; elsewhere a faiss HNSW graph.
          mesh: the 1-D mesh (axis "rows") to split the rows over; default every device, except on a CPU
            backend, where exact search runs on the host (`topk.host_top_k`) unless a mesh is given.
          block_rows: rows per matrix product (default `topk.DEFAULT_BLOCK_ROWS` on a mesh,
            `topk.host_block_rows` on the host).

        Returns:
          `(scores float32 (Q, k), ids int64 (Q, k))`, scores decreasing, equal scores by increasing id.
        """
        queries = self.checked_queries(queries, k)
        if approximate and jax.default_backend() != "tpu":
            graph = self._cached("hnsw", lambda: ann.build(self.vectors, "hnsw"))
            scores, ids = ann.search(graph, queries, k)
            return scores, ids.astype(np.int64)
        if mesh is None and not approximate and jax.default_backend() == "cpu":
            parts = [topk.host_top_k(self.vectors, queries[start:start + QUERY_BATCH], k, block_rows=block_rows)
                     for start in range(0, len(queries), QUERY_BATCH)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        mesh = mesh or topk.row_mesh()
        block_rows = block_rows or topk.DEFAULT_BLOCK_ROWS
        rows = self._cached(("rows", mesh, block_rows), lambda: topk.place_rows(self.vectors, mesh, block_rows=block_rows))
        parts = [_search_batch(rows, queries[start:start + QUERY_BATCH], k, recall_target if approximate else None)
                 for start in range(0, len(queries), QUERY_BATCH)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.int64)

    def _cached(self, key, make):
        """`make()`, made once per key and kept with the index (rows on a mesh, a faiss graph)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def checked_queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        """`queries` as float32 `(Q, D)`; ValueError for an empty index, a bad `k` or bad queries."""
        if len(self) == 0:
            raise ValueError("the index is empty: it holds no vectors to search (add images with python -m jaxembed.index)")
        if not (isinstance(k, (int, np.integer)) and 1 <= k <= len(self)):
            raise ValueError(f"k={k!r} must be between 1 and the number of indexed images ({len(self)})")
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}) to match the index's dimension, got shape {queries.shape}")
        if not np.isfinite(queries).all():
            raise ValueError("queries hold NaN or infinite values")
        return queries


def _search_batch(rows: topk.ShardedRows, queries: np.ndarray, k: int,
                  recall_target: float | None) -> tuple[np.ndarray, np.ndarray]:
    """`topk.top_k` on up to QUERY_BATCH queries, padded to a power of two so few shapes compile."""
    padded = min(QUERY_BATCH, 1 << math.ceil(math.log2(max(len(queries), 8))))
    batch = np.zeros((padded, queries.shape[1]), np.float32)
    batch[:len(queries)] = queries
    scores, ids = topk.top_k(rows, batch, k, recall_target=recall_target)
    return np.asarray(scores)[:len(queries)], np.asarray(ids)[:len(queries)]


def query_images(query: str) -> tuple[list[str], list[str | None]]:
    """The image paths of `query` (one image file, a folder, or a .csv/.jsonl manifest) and their labels.

    Raises:
      FileNotFoundError: `query` does not exist.
      ValueError: a query image cannot be read (every such file is named, with the reason).
    """
    from jaxembed import data as data_lib

    if not os.path.exists(query):
        raise FileNotFoundError(f"query {query!r} does not exist")
    if os.path.isfile(query) and not query.lower().endswith(data_lib.sources.MANIFEST_EXTENSIONS):
        path = os.path.abspath(query)
        try:
            data_lib.decode_image(path)
        except Exception as error:  # noqa: BLE001 - reported as the query's fault, with the reason.
            raise ValueError(f"query image {path} cannot be read: {data_lib.decode.describe_error(error)}") from None
        return [path], [None]
    images = data_lib.load_source(query)
    unreadable = [bad for bad in images.bad_files if os.path.isfile(bad.path)]
    if unreadable:
        named = "; ".join(f"{bad.path}: {bad.reason}" for bad in unreadable[:5])
        raise ValueError(f"{len(unreadable)} query image(s) in {query} cannot be read: {named}")
    return list(images.item_names), collection_labels(images)


def embed_queries(embedder, paths: list[str]) -> np.ndarray:
    """float32 `(len(paths), D)` embeddings; ValueError names a file the run cannot take."""
    from jaxembed import data as data_lib

    batches = []
    for path in paths:
        try:
            batches.append(embedder.preprocess(data_lib.decode_image(path)))
        except Exception as error:  # noqa: BLE001 - reported as the query's fault, with the reason.
            raise ValueError(f"query image {path} cannot be embedded by this run: "
                             f"{data_lib.decode.describe_error(error)}") from None
    return np.asarray(embedder(np.concatenate(batches)), np.float32)


def search_images(index: Index, query: str, k: int, *, embedder=None, exclude_self: bool = False,
                  approximate: bool = False) -> list[dict]:
    """Searches `index` for the images of `query` (a file, folder or manifest).

    Args:
      embedder: the `Embedder` to embed the queries; default the run, checkpoint and embedding settings that
        built the index.
      exclude_self: leave out results with the query's own path (queries taken from the index).

    Returns:
      Per query `{"query": path, "label": label or None, "results": [{"rank", "id", "path", "label",
      "score"}, ...]}` (k results, best first; every indexed image when `k` is larger than the index). A query
      stored in the index takes its stored label.
    """
    if isinstance(k, (int, np.integer)) and k > len(index) > 0:
        k = len(index)  # every indexed image (the command says so on stderr)
    index.checked_queries(np.zeros((0, index.dim), np.float32), k)  # an empty index or a bad k, before any work
    paths, labels = query_images(query)
    if embedder is None:
        import jaxembed

        if not index.meta:
            raise ValueError("this index was made in memory: pass the embedder that made its vectors")
        run = RunId(**index.meta["run"])
        embedder = jaxembed.load(run.workdir, step=run.step, **run.embedding)  # as the index's vectors were made
    vectors = embed_queries(embedder, paths)
    if vectors.shape[1] != index.dim:
        raise ValueError(f"the run embeds in dimension {vectors.shape[1]}, the index holds dimension {index.dim}")
    extra = 1 if exclude_self else 0
    scores, ids = index.search(vectors, min(k + extra, len(index)) if extra else k, approximate=approximate)
    stored_labels = dict(zip(index.paths, index.labels))
    results = []
    for path, label, row_scores, row_ids in zip(paths, labels, scores, ids):
        hits = [(score, i) for score, i in zip(row_scores, row_ids) if not (exclude_self and index.paths[i] == path)]
        results.append({
            "query": path, "label": stored_labels.get(path, label),
            "results": [{"rank": rank, "id": int(i), "path": index.paths[i], "label": index.labels[i],
                         "score": float(score)} for rank, (score, i) in enumerate(hits[:k], start=1)]})
    return results


def format_results(results: list[dict]) -> str:
    """The plain-text listing the command prints: a line per query, then rank, score, path and label."""
    lines = []
    for entry in results:
        lines.append(f"query {entry['query']}" + (f" ({entry['label']})" if entry["label"] is not None else ""))
        lines += [f"  {hit['rank']:3d}  {hit['score']:.4f}  {hit['path']}  {hit['label'] or ''}".rstrip()
                  for hit in entry["results"]]
    return "\n".join(lines)
