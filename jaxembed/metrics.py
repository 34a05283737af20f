"""Retrieval, few-shot, classification and clustering metrics on embeddings, logits and labels (NumPy, host side).

Retrieval metrics use leave-one-out search: each item queries all the others by cosine similarity
(embeddings are unit vectors, so by dot product). N-way one-shot accuracy classifies items by their
nearest of N labelled examples, as in the Omniglot benchmark.
"""

from __future__ import annotations

import numpy as np

# Queries are scored in blocks so that the similarity matrix never exceeds this many floats.
_BLOCK_FLOATS = 1 << 24


def nearest_others(embeddings: np.ndarray, k: int, queries: np.ndarray | None = None) -> np.ndarray:
    """`(len(queries), k)` indices of each query's k most cosine-similar other items, nearest first
    (leave-one-out: never the query itself). The one nearest-neighbour search of the metrics and the
    report; `jaxembed.search` is the one for indexes on devices.

    Args:
      embeddings: `(n, d)` unit vectors.
      k: neighbours per query (at most n - 1 are returned).
      queries: item indices to query (default: every item).
    """
    embeddings = np.asarray(embeddings, np.float32)
    n = len(embeddings)
    queries = np.arange(n) if queries is None else np.asarray(queries, np.int64)
    k = min(k, n - 1)
    block = max(1, _BLOCK_FLOATS // max(n, 1))
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), block):
        rows = queries[start:start + block]
        sims = embeddings[rows] @ embeddings.T
        sims[np.arange(len(rows)), rows] = -np.inf  # never retrieve the query itself
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n - 1 else np.argsort(-sims, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[start:start + block] = np.take_along_axis(top, order, axis=1)
    return out


def closest_pair(vectors: np.ndarray) -> tuple[int, int, float]:
    """`(i, j, cosine)`: the two rows of `vectors` `(n >= 2, d)` at the smallest angle, and their cosine.

    For ArcFace class centres, a cosine near 1 means two concepts share one centre: nearest-centre
    classification and search cannot tell them apart (see the trainer's `closest_centres`).
    """
    vectors = np.asarray(vectors, np.float32)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    nearest = nearest_others(unit, 1)[:, 0]
    cosines = np.einsum("nd,nd->n", unit, unit[nearest])
    first = int(np.argmax(cosines))
    return first, int(nearest[first]), float(cosines[first])


def recall_at_k(embeddings: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@K: the fraction of items with at least one same-label item among their K nearest others,
    over the items whose label at least one other item has.

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
    # A query whose label no other item has can never hit: it is left out, as is usual.
    counts = np.unique(labels, return_inverse=True, return_counts=True)
    answerable = counts[2][counts[1].reshape(-1)] > 1
    if not answerable.any():
        raise ValueError("recall@k needs a label with at least 2 items")
    neighbours = nearest_others(embeddings, max(ks))
    hits = (labels[neighbours] == labels[:, None])[answerable]
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
    relevant = labels[nearest_others(embeddings, max_r)] == labels[:, None]
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


# ----------------------------------------------------------------------------- few-shot classification


def _class_members(labels) -> tuple[np.ndarray, list[np.ndarray]]:
    """`(class_of_item (n,), members)`: dense class ids and, per class, its item indices (ascending)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.zeros(0, np.int64), []
    class_of_item = np.unique(labels, return_inverse=True)[1].reshape(-1)
    order = np.argsort(class_of_item, kind="stable")
    counts = np.bincount(class_of_item)
    return class_of_item, np.split(order, np.cumsum(counts)[:-1])


def _classes_by_group(labels, groups) -> list[np.ndarray]:
    """Per group, the classes with at least two items (a support and a query); each class in one group."""
    class_of_item, members = _class_members(labels)
    if groups is None:
        group_of_item = np.zeros(len(class_of_item), np.int64)
    else:
        if len(groups) != len(class_of_item):
            raise ValueError(f"groups has {len(groups)} entries but labels has {len(class_of_item)}")
        group_of_item = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    group_of_class = np.array([group_of_item[items[0]] for items in members], np.int64)
    for c, items in enumerate(members):
        if np.any(group_of_item[items] != group_of_class[c]):
            raise ValueError(f"class {np.asarray(labels)[items[0]].item()!r} has items in more than one group")
    usable = np.array([len(items) >= 2 for items in members])
    return [np.flatnonzero(usable & (group_of_class == g)) for g in range(group_of_item.max(initial=-1) + 1)]


def max_n_way(labels, groups=None) -> int:
    """The largest `n_way` that `n_way_one_shot_accuracy` accepts for these labels and groups: the most
    classes with two or more items that one group holds."""
    return max((len(classes) for classes in _classes_by_group(labels, groups)), default=0)


def n_way_one_shot_accuracy(embeddings: np.ndarray, labels, groups=None, *, n_way: int = 20,
                            episodes: int = 1000, seed: int = 0) -> float:
    """N-way one-shot classification accuracy by nearest support (the Omniglot protocol of Lake,
    Salakhutdinov & Tenenbaum, "Human-level concept learning through probabilistic program induction", 2015).

    Each episode picks a group uniformly among those with at least `n_way` usable classes (two or more
    items), `n_way` of its classes, and one random support item per class. Every other item of those
    classes is a query, classified as the class of its most cosine-similar support. The result is the
    fraction of correct queries per episode, averaged over episodes.

    Drawing an episode's classes from one group (e.g. the characters of one Omniglot alphabet) is what
    makes the task hard: classes of one group look alike. Without `groups`, all items form one group.

    Args:
      embeddings: `(n, d)` float vectors (normalised here, so unit length is not required).
      labels: `(n,)` class of each item, integers or strings.
      groups: optional `(n,)` group of each item, integers or strings; a class must lie in one group.
      n_way: classes per episode, >= 2.
      episodes: number of episodes, >= 1.
      seed: seeds the episode draws; the result is deterministic for a given seed.

    Returns:
      The mean accuracy in [0, 1] (chance is 1 / n_way).

    Raises:
      ValueError: `n_way` < 2, `episodes` < 1, mismatched lengths, a class in two groups, or no group
        with `n_way` classes of two or more items (`max_n_way` gives the largest possible).

    Example: with labels [a, a, b, b] and embeddings at angles 0, 60, 90, 100 degrees, 2-way episodes
    whose support for `a` is the item at 0 misclassify the query at 60 (closer to `b`): accuracy 0.5;
    the other half of the episodes score 1, so the expectation is 0.75.
    """
    if n_way < 2:
        raise ValueError(f"n_way={n_way} must be >= 2")
    if episodes < 1:
        raise ValueError(f"episodes={episodes} must be >= 1")
    embeddings = np.asarray(embeddings, np.float32)
    if len(embeddings) != len(labels):
        raise ValueError(f"embeddings has {len(embeddings)} rows but labels has {len(labels)}")
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    _, members = _class_members(labels)
    eligible = [classes for classes in _classes_by_group(labels, groups) if len(classes) >= n_way]
    if not eligible:
        raise ValueError(f"n_way={n_way} is more than any group holds: at most {max_n_way(labels, groups)} "
                         "classes with two or more items share a group")
    rng = np.random.default_rng(seed)
    accuracies = np.empty(episodes)
    for episode in range(episodes):
        classes = rng.choice(eligible[rng.integers(len(eligible))], n_way, replace=False)
        supports = np.array([members[c][rng.integers(len(members[c]))] for c in classes])
        queries = np.concatenate([members[c][members[c] != s] for c, s in zip(classes, supports, strict=True)])
        truth = np.repeat(np.arange(n_way), [len(members[c]) - 1 for c in classes])  # position in `classes`
        predicted = np.argmax(unit[queries] @ unit[supports].T, axis=1)
        accuracies[episode] = np.mean(predicted == truth)
    return float(np.mean(accuracies))


def concept_groups(concepts) -> np.ndarray | None:
    """The group of each concept name for one-shot episodes: the first path component when every name
    is a path (`Alphabet/character07` -> `Alphabet`, as in Omniglot folders), else None (one group)."""
    concepts = [str(name) for name in concepts]
    if not concepts or not all("/" in name for name in concepts):
        return None
    return np.asarray([name.split("/", 1)[0] for name in concepts])


# ----------------------------------------------------------------------------- clustering


def clustering_metrics(assignment: np.ndarray, labels) -> dict[str, float]:
    """How well a clustering (k-means of the embeddings, `jaxembed.cluster`) recovers the concepts.

    Args:
      assignment: `(n,)` each item's cluster id.
      labels: `(n,)` each item's concept (any hashable values).

    Returns:
      `nmi`: mutual information of clusters and concepts over the mean of their two entropies (the
      normalisation metric-learning papers report, e.g. Song et al. 2016; scikit-learn's default);
      `adjusted_rand`: the Rand index corrected for chance (0 for a random clustering, 1 for the concepts);
      `purity`: the share of items whose cluster's most common concept is their own.
    """
    from sklearn import metrics as sk_metrics

    assignment, labels = np.asarray(assignment).reshape(-1), np.asarray(labels).reshape(-1)
    if len(assignment) != len(labels) or not len(labels):
        raise ValueError(f"{len(assignment)} cluster ids for {len(labels)} labels: need one per item, and some")
    class_ids = np.unique(labels, return_inverse=True)[1].reshape(-1)
    cluster_ids = np.unique(assignment, return_inverse=True)[1].reshape(-1)
    counts = np.zeros((cluster_ids.max() + 1, class_ids.max() + 1), np.int64)
    np.add.at(counts, (cluster_ids, class_ids), 1)
    return {"nmi": float(sk_metrics.normalized_mutual_info_score(class_ids, cluster_ids)),
            "adjusted_rand": float(sk_metrics.adjusted_rand_score(class_ids, cluster_ids)),
            "purity": float(counts.max(axis=1).sum() / len(labels))}


# ----------------------------------------------------------------------------- the raw-pixel baseline


def pixel_vectors(pixels: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """The raw-pixel "embedding" every trained model must beat: each image flattened, centred on the
    mean image (`mean`, e.g. the training images', else these images' own) and scaled to unit length,
    so cosine similarity compares deviations from the average image rather than the shared background.

    Args:
      pixels: `(N, ...)` images of one shape.
      mean: the flattened mean image `(prod(...),)` to centre on.

    Returns:
      float32 `(N, prod(...))` unit rows.
    """
    flat = np.asarray(pixels, np.float32).reshape(len(pixels), -1)
    centred = flat - (flat.mean(axis=0) if mean is None else np.asarray(mean, np.float32))
    return centred / np.maximum(np.linalg.norm(centred, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- all retrieval metrics


def retrieval_metrics(embeddings: np.ndarray, labels, *, n_way: int = 20, episodes: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """Recall@1/5, MAP@R and N-way one-shot accuracy of labelled embeddings, each where defined.

    Args:
      embeddings: `(n, d)` unit vectors.
      labels: `(n,)` concept names (strings); `Alphabet/character` names group the one-shot episodes.
      n_way: the one-shot episode size wanted; fewer when no group holds that many usable concepts
        (the key says which: `one_shot_20way`).

    Returns:
      `num_images`, `num_concepts`, `recall@1`, `recall@5`, `map@r`, `one_shot_<n>way` (the ones the
      data allow: e.g. no MAP@R when every concept has one image).
    """
    labels = np.asarray(labels)
    class_ids = np.unique(labels, return_inverse=True)[1].reshape(-1)
    metrics: dict[str, float] = {"num_images": len(labels), "num_concepts": len(np.unique(labels))}
    if len(labels) and np.bincount(class_ids).max() >= 2:  # retrieval needs a concept seen twice
        metrics.update(recall_at_k(embeddings, class_ids))
        metrics["map@r"] = map_at_r(embeddings, class_ids)
    groups = concept_groups(labels)
    n = min(n_way, max_n_way(labels, groups))
    if n >= 2:
        metrics[f"one_shot_{n}way"] = n_way_one_shot_accuracy(embeddings, labels, groups, n_way=n,
                                                              episodes=episodes, seed=seed)
    return metrics
