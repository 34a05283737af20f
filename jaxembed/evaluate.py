"""Retrieval and classification metrics on embeddings, logits and labels (NumPy, host side).

Retrieval metrics use leave-one-out search: each item queries all the others by cosine similarity
(embeddings are unit vectors, so by dot product).
"""

from __future__ import annotations

import numpy as np

# Queries are scored in blocks so that the similarity matrix never exceeds this many floats.
_BLOCK_FLOATS = 1 << 24


def _ranked_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """`(n, k)` indices of each item's k most similar other items, most similar first."""
    embeddings = np.asarray(embeddings, np.float32)
    n = len(embeddings)
    k = min(k, n - 1)
    block = max(1, _BLOCK_FLOATS // max(n, 1))
    out = np.empty((n, k), np.int64)
    for start in range(0, n, block):
        sims = embeddings[start:start + block] @ embeddings.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # never retrieve the query itself
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else np.argsort(-sims, axis=1)
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[start:start + block] = np.take_along_axis(top, order, axis=1)
    return out


def recall_at_k(embeddings: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@K: the fraction of items with at least one same-label item among their K nearest others.

    Args:
      embeddings: `(n, d)` unit vectors.
      labels: `(n,)` integer labels.
      ks: the K values.

    Returns:
      `{"recall@1": ..., "recall@5": ...}`.
    """
    labels = np.asarray(labels)
    if len(labels) < 2:
        raise ValueError(f"recall@k needs at least 2 items, got {len(labels)}")
    neighbours = _ranked_neighbours(embeddings, max(ks))
    hits = labels[neighbours] == labels[:, None]
    return {f"recall@{k}": float(np.mean(hits[:, :k].any(axis=1))) for k in ks}


def map_at_r(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """MAP@R (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", 2020).

    For a query with R other items of its label: (1/R) * sum_{i<=R} precision@i * relevant(i),
    averaged over queries with R >= 1.
    """
    labels = np.asarray(labels)
    counts = np.bincount(np.unique(labels, return_inverse=True)[1])
    same_label_others = counts[np.unique(labels, return_inverse=True)[1]] - 1
    max_r = int(same_label_others.max(initial=0))
    if max_r == 0:
        raise ValueError("map@r needs at least one label with two or more items")
    relevant = labels[_ranked_neighbours(embeddings, max_r)] == labels[:, None]
    scores = []
    for row, r in zip(relevant, same_label_others):
        if r == 0:
            continue
        hits = row[:r]
        precision = np.cumsum(hits) / np.arange(1, r + 1)
        scores.append(np.sum(precision * hits) / r)
    return float(np.mean(scores))


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose highest logit is the label."""
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Multi-label mAP: average precision of each concept's ranking of the items, averaged over
    concepts with at least one positive.

    Args:
      scores: `(n, num_concepts)` logits or probabilities.
      targets: `(n, num_concepts)` multi-hot in {0, 1}.
    """
    scores, targets = np.asarray(scores), np.asarray(targets) > 0.5
    aps = []
    for concept in range(scores.shape[1]):
        positives = targets[:, concept]
        if not positives.any():
            continue
        order = np.argsort(-scores[:, concept], kind="stable")
        hits = positives[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(np.sum(precision * hits) / hits.sum())
    return float(np.mean(aps))
