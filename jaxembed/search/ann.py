"""Approximate nearest neighbours on CPU through faiss (`pip install 'jaxembed[search]'`).

    index = build(vectors, "hnsw")           # or "ivf"; vectors float32 (N, D) unit vectors
    scores, ids = search(index, queries, 10)

Exact search (`jaxembed.topk`) reads every vector for every query; at millions of vectors a graph
(HNSW) or an inverted file of k-means cells (IVF) reads a small part of them, at some loss of recall.
Scores are inner products (cosine similarity for unit vectors), as in exact search. On TPU,
`jaxembed.topk.top_k(..., recall_target=...)` is the approximate path instead.
"""

from __future__ import annotations

import math

import numpy as np

KINDS = ("hnsw", "ivf")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ValueError("approximate search on CPU needs faiss: pip install 'jaxembed[search]' (faiss-cpu)") from None
    return faiss


def build(vectors: np.ndarray, kind: str = "hnsw", *, hnsw_links: int = 32, ef_construction: int = 80,
          ef_search: int = 64, ivf_lists: int | None = None, ivf_probes: int = 16, seed: int = 0):
    """A faiss index of `vectors` (float32 `(N, D)`) for inner-product search.

    Args:
      kind: "hnsw" (a graph; `hnsw_links` neighbours per node, `ef_construction`/`ef_search` the
        candidate lists when building/searching) or "ivf" (`ivf_lists` k-means cells, default about
        4 sqrt(N); `ivf_probes` cells searched per query).
      seed: the k-means seed of "ivf".
    """
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"vectors must be a non-empty (N, D) array, got shape {vectors.shape}")
    dim = vectors.shape[1]
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_links, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    elif kind == "ivf":
        lists = ivf_lists or max(1, min(len(vectors) // 39, int(4 * math.sqrt(len(vectors)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(vectors)
        index.nprobe = min(ivf_probes, lists)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got kind={kind!r}")
    index.add(vectors)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`(scores float32 (Q, k), ids int64 (Q, k))` of the `k` best rows found for each query."""
    if not 1 <= k <= index.ntotal:
        raise ValueError(f"k={k} must be between 1 and the number of indexed vectors ({index.ntotal})")
    return index.search(np.ascontiguousarray(queries, np.float32), k)
