"""Cluster the images of an index: `python -m jaxembed.cluster --index INDEX -k K [--out DIR]`.

    assignment = cluster_index("photos.index", 20)     # -> INDEX/clusters-20/

Writes to the output directory (default `INDEX/clusters-K`, one writer at a time, every file atomic):

- `clusters.csv`: `path,label,cluster,similarity` per image (similarity: cosine to its cluster's centre);
- `clusters.json`: k, the sizes, and per cluster its most common labels and purity (share of the most
  common label) when the index has labels; then also `scores`, how well the clusters recover the
  labels (`jaxembed.metrics.clustering_metrics`: NMI, adjusted Rand index, purity) over the labelled images;
- `cluster-NNN.png`: a contact sheet per cluster, its members nearest the centre first.

Clustering is scikit-learn's k-means on the unit vectors (MiniBatchKMeans above `MINIBATCH_ABOVE`
images, where full k-means would take too long on a CPU).
"""

from __future__ import annotations

import collections
import csv
import io
import os

import numpy as np

from jaxembed import fileio, metrics
from jaxembed.search import gallery
from jaxembed.search.index import read_index

MINIBATCH_ABOVE = 200_000


def kmeans(vectors: np.ndarray, k: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means of float32 `(N, D)` unit vectors.

    Returns:
      `(assignment int64 (N,), similarity float32 (N,))`: each vector's cluster, and its cosine
      similarity to that cluster's (normalised) centre.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(vectors) == 0:
        raise ValueError("the index is empty: there is nothing to cluster")
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= len(vectors)):
        raise ValueError(f"k={k!r} must be between 1 and the number of indexed images ({len(vectors)})")
    model = (MiniBatchKMeans(k, random_state=seed, n_init=3) if len(vectors) > MINIBATCH_ABOVE
             else KMeans(k, random_state=seed, n_init=3))
    assignment = model.fit_predict(vectors)
    centres = model.cluster_centers_ / np.maximum(np.linalg.norm(model.cluster_centers_, axis=1, keepdims=True), 1e-12)
    similarity = np.einsum("nd,nd->n", vectors, centres[assignment])
    return assignment.astype(np.int64), similarity.astype(np.float32)


def describe_clusters(assignment: np.ndarray, labels: tuple[str | None, ...], k: int) -> list[dict]:
    """Per cluster: its size, and when labels are known its three most common labels and purity."""
    clusters = []
    for cluster in range(k):
        members = [labels[i] for i in np.flatnonzero(assignment == cluster)]
        known = collections.Counter(label for label in members if label is not None)
        entry = {"cluster": cluster, "size": len(members)}
        if known:
            entry["top_labels"] = known.most_common(3)
            entry["purity"] = known.most_common(1)[0][1] / sum(known.values())
        clusters.append(entry)
    return clusters


def cluster_index(index_dir: str, k: int, *, out: str | None = None, seed: int = 0, sheet_size: int = 100,
                  thumbnail: int = gallery.TILE) -> dict:
    """Clusters the index in `index_dir` into `k` groups and writes the files the module docstring lists.

    Args:
      out: the output directory; default `index_dir/clusters-k`.
      sheet_size: the most thumbnails on one contact sheet.

    Returns:
      What `clusters.json` holds, plus `"out"`.
    """
    stored = read_index(index_dir)
    assignment, similarity = kmeans(stored.vectors, k, seed=seed)
    out = os.path.abspath(out or os.path.join(index_dir, f"clusters-{k}"))
    with fileio.exclusive_lock(out):
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["path", "label", "cluster", "similarity"])
        for path, label, cluster, score in zip(stored.paths, stored.labels, assignment, similarity):
            writer.writerow([path, "" if label is None else label, int(cluster), f"{score:.6f}"])
        fileio.write_bytes(os.path.join(out, "clusters.csv"), table.getvalue().encode())
        summary = {"index": os.path.abspath(index_dir), "k": k, "seed": seed,
                   "clusters": describe_clusters(assignment, stored.labels, k)}
        labelled = [i for i, label in enumerate(stored.labels) if label is not None]
        if labelled:
            summary["scores"] = {"num_labelled": len(labelled), **metrics.clustering_metrics(
                assignment[labelled], [stored.labels[i] for i in labelled])}
        fileio.write_json(os.path.join(out, "clusters.json"), summary)
        for cluster in range(k):
            members = np.flatnonzero(assignment == cluster)
            nearest = members[np.argsort(-similarity[members], kind="stable")][:sheet_size]
            caption = f"cluster {cluster}: {len(members)} images" + (
                f" (showing the {len(nearest)} nearest the centre)" if len(nearest) < len(members) else "")
            png = gallery.contact_sheet([stored.paths[i] for i in nearest], caption=caption, size=thumbnail)
            fileio.write_bytes(os.path.join(out, f"cluster-{cluster:03d}.png"), png)
    return {**summary, "out": out}
