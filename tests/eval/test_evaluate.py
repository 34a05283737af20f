"""Metrics (`jaxembed.metrics`) on small hand-computed cases."""

import numpy as np
import pytest

from jaxembed import metrics


def _unit(angles_degrees):
    a = np.deg2rad(np.asarray(angles_degrees, float))
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_recall_at_k_hand_computed():
    # points on a circle: 0 and 10 degrees are label 0, 100 and 115 label 1, 200 label 0.
    embeddings = _unit([0, 10, 100, 115, 200])
    labels = np.array([0, 0, 1, 1, 0])
    # nearest others: 0->10 (hit), 10->0 (hit), 100->115 (hit), 115->100 (hit), 200->115 (miss; 85 deg vs 160/170/100)
    got = metrics.recall_at_k(embeddings, labels, ks=(1, 2))
    assert got["recall@1"] == pytest.approx(4 / 5)
    # 200's two nearest: 115 (85 deg) and 100 (100 deg): still a miss
    assert got["recall@2"] == pytest.approx(4 / 5)
    assert metrics.recall_at_k(embeddings, labels, ks=(4,))["recall@4"] == 1.0


def test_map_at_r_hand_computed():
    embeddings = _unit([0, 10, 100, 115, 200])
    labels = np.array([0, 0, 1, 1, 0])
    # query 0: R=2, ranking 10 (rel), 100 (not): (1/1)/2 = 0.5
    # query 10: R=2, ranking 0 (rel), 100 (not): 0.5
    # query 100: R=1, ranking 115 (rel): 1
    # query 115: R=1: 100 (rel): 1
    # query 200: R=2, ranking 115, 100: 0
    assert metrics.map_at_r(embeddings, labels) == pytest.approx((0.5 + 0.5 + 1 + 1 + 0) / 5)


def test_top1_accuracy():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    assert metrics.top1_accuracy(logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_mean_average_precision_hand_computed():
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.6]])
    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    # concept 0 ranking: items 0 (pos), 1, 2 (pos), 3 -> AP = (1/1 + 2/3) / 2
    # concept 1 ranking: items 1 (pos), 3, 0, 2 -> AP = 1
    assert metrics.mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_clustering_metrics_hand_computed():
    # concepts a a b b, clusters 0 0 0 1: p(a, 0) = 1/2, p(b, 0) = 1/4, p(b, 1) = 1/4; p(a) = p(b) = 1/2,
    # p(0) = 3/4, p(1) = 1/4. I = sum p(y, c) log(p(y, c) / (p(y) p(c))); NMI = I / mean(H(concepts), H(clusters)).
    mutual = 0.5 * np.log(4 / 3) + 0.25 * np.log(2 / 3) + 0.25 * np.log(2)
    entropies = np.log(2), -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    # Pairs in one cluster and one concept: 1 (the two a's); pairs in one concept: 2, in one cluster: 3, of 6:
    # expected 2 * 3 / 6 = 1, so the adjusted Rand index is (1 - 1) / ((2 + 3) / 2 - 1) = 0.
    got = metrics.clustering_metrics(np.array([0, 0, 0, 1]), np.array(["a", "a", "b", "b"]))
    assert got == pytest.approx({"nmi": mutual / np.mean(entropies), "adjusted_rand": 0.0, "purity": 3 / 4}, abs=1e-12)
    # concepts a a a b b b, clusters 0 0 1 1 2 2: I = (2/3) log 2, H = log 2 and log 3; pairs: 2 joint,
    # 6 within concepts, 3 within clusters, of 15: ARI = (2 - 6 * 3 / 15) / ((6 + 3) / 2 - 6 * 3 / 15).
    got = metrics.clustering_metrics([7, 7, 3, 3, 9, 9], ["a", "a", "a", "b", "b", "b"])  # any cluster ids
    assert got == pytest.approx({"nmi": (2 / 3) * np.log(2) / ((np.log(2) + np.log(3)) / 2),
                                 "adjusted_rand": (2 - 1.2) / (4.5 - 1.2), "purity": 5 / 6}, abs=1e-12)
    assert metrics.clustering_metrics([5, 5, 2, 2], ["x", "x", "y", "y"]) == {"nmi": 1.0, "adjusted_rand": 1.0,
                                                                            "purity": 1.0}
    with pytest.raises(ValueError, match="3 cluster ids for 4 labels"):
        metrics.clustering_metrics([0, 0, 1], ["a", "a", "b", "b"])


def test_blocked_search_equals_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(300, 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = rng.integers(0, 10, size=300)
    full = metrics.recall_at_k(embeddings, labels, ks=(1, 5))
    monkeypatch.setattr(metrics, "_BLOCK_FLOATS", 300 * 7)  # 7 queries per block
    assert metrics.recall_at_k(embeddings, labels, ks=(1, 5)) == full
    sims = embeddings @ embeddings.T
    np.fill_diagonal(sims, -np.inf)
    brute = np.mean(labels[np.argmax(sims, axis=1)] == labels)
    assert full["recall@1"] == pytest.approx(brute)


def test_closest_pair_is_the_brute_force_pair_at_the_smallest_angle(monkeypatch):
    # Rows of any length: the pair is chosen by angle, not by dot product (row 0 is long).
    assert metrics.closest_pair(_unit([0, 50, 65, 200]) * [[10.0], [1.0], [1.0], [1.0]]) == \
        pytest.approx((1, 2, np.cos(np.deg2rad(15.0))))
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 6)) * rng.uniform(0.1, 10, size=(50, 1))
    monkeypatch.setattr(metrics, "_BLOCK_FLOATS", 50 * 7)  # blocked search: 7 rows per block
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosines = unit @ unit.T
    brute = max(((i, j) for i in range(50) for j in range(i + 1, 50)), key=lambda pair: cosines[pair])
    first, second, cosine = metrics.closest_pair(vectors)
    assert (first, second) == brute and cosine == pytest.approx(cosines[brute], abs=1e-6)


def test_recall_leaves_out_queries_with_no_other_item_of_their_label():
    embeddings = _unit([0, 10, 100, 200])
    labels = np.array([0, 0, 1, 2])  # labels 1 and 2 occur once: no query of theirs can hit
    assert metrics.recall_at_k(embeddings, labels, ks=(1,))["recall@1"] == 1.0
    with pytest.raises(ValueError, match="at least 2 items"):
        metrics.recall_at_k(embeddings, np.array([0, 1, 2, 3]))
