"""Losses against independent NumPy computations of their formulas, and their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxembed import losses


def numpy_arcface(embeddings, centers, labels, scale, margin):
    """ArcFace written from the paper with arccos, in float64, one row at a time."""
    total = 0.0
    for e, y in zip(embeddings, labels):
        cos = (e / np.linalg.norm(e)) @ (centers / np.linalg.norm(centers, axis=0))
        cos = np.clip(cos, -1.0, 1.0)
        theta = np.arccos(cos[y])
        logits = scale * cos
        if theta + margin <= np.pi:
            logits[y] = scale * np.cos(theta + margin)
        else:
            logits[y] = scale * (cos[y] - margin * np.sin(margin))
        top = logits.max()
        total += -(logits[y] - top - np.log(np.sum(np.exp(logits - top))))
    return total / len(labels)


def _random_case(seed, batch=6, dim=5, classes=7):
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(batch, dim)) * rng.uniform(0.1, 10, size=(batch, 1))
    centers = rng.normal(size=(dim, classes))
    labels = rng.integers(0, classes, size=batch)
    return embeddings, centers, labels


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale,margin", [(64, 0.5), (16, 0.1), (32, 0.9), (128, 0.3)])
def test_arcface_equals_numpy(seed, scale, margin):
    embeddings, centers, labels = _random_case(seed)
    expected = numpy_arcface(embeddings, centers, labels, scale, margin)
    got = jax.jit(losses.arcface_loss, static_argnames=("scale", "margin"))(
        jnp.asarray(embeddings, jnp.float32), jnp.asarray(centers, jnp.float32), jnp.asarray(labels),
        scale=scale, margin=margin)
    np.testing.assert_allclose(float(got), expected, rtol=2e-4, atol=1e-4)


def test_arcface_fallback_branch():
    # theta = 170 degrees and m = 0.5 rad: theta + m > pi, so the target uses cos(theta) - m sin(m).
    theta = np.deg2rad(170.0)
    embeddings = np.array([[np.cos(theta), np.sin(theta)]])
    centers = np.array([[1.0, 0.0], [0.0, 1.0]])  # class 0 along x, class 1 along y
    labels = np.array([0])
    logits = losses.arcface_logits(embeddings, centers, labels, scale=16, margin=0.5)
    np.testing.assert_allclose(logits[0, 0], 16 * (np.cos(theta) - 0.5 * np.sin(0.5)), rtol=1e-5)
    np.testing.assert_allclose(logits[0, 1], 16 * np.sin(theta), rtol=1e-5)
    expected = numpy_arcface(embeddings, centers, labels, 16, 0.5)
    np.testing.assert_allclose(float(losses.arcface_loss(embeddings, centers, labels, scale=16, margin=0.5)),
                               expected, rtol=1e-5)
    # and just inside the normal branch: theta + m < pi uses cos(theta + m).
    theta = np.pi - 0.6
    embeddings = np.array([[np.cos(theta), np.sin(theta)]])
    logits = losses.arcface_logits(embeddings, centers, labels, scale=16, margin=0.5)
    np.testing.assert_allclose(logits[0, 0], 16 * np.cos(theta + 0.5), rtol=1e-5)


def test_arcface_margin_zero_is_normalised_softmax():
    embeddings, centers, labels = _random_case(7)
    cos = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)) @ (
        centers / np.linalg.norm(centers, axis=0))
    expected = losses.softmax_loss(jnp.asarray(30 * cos, jnp.float32), jnp.asarray(labels))
    got = losses.arcface_loss(embeddings, centers, labels, scale=30, margin=0.0)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


@pytest.mark.parametrize("direction", [1.0, -1.0], ids=["equal", "opposite"])
def test_arcface_finite_at_cos_plus_minus_one(direction):
    centers = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (dim=2, classes=3), class 2 is a zero centre
    embeddings = jnp.array([[direction * 3.0, 0.0]])
    labels = jnp.array([0])
    loss, grads = jax.value_and_grad(
        lambda e, c: losses.arcface_loss(e, c, labels, scale=64, margin=0.5), argnums=(0, 1))(embeddings, centers)
    assert np.isfinite(float(loss))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


def test_arcface_gradients_match_finite_differences():
    embeddings, centers, labels = _random_case(3, batch=4, dim=4, classes=5)
    with jax.enable_x64(True):
        f = lambda e, c: losses.arcface_loss(e, c, jnp.asarray(labels), scale=16.0, margin=0.5)  # noqa: E731
        check_grads(f, (jnp.asarray(embeddings, jnp.float64), jnp.asarray(centers, jnp.float64)),
                    order=2, modes=["rev"], eps=1e-4, atol=1e-4, rtol=1e-4)
        # including a row in the fallback branch (theta + m > pi)
        theta = np.deg2rad(165.0)
        e = jnp.array([[np.cos(theta), np.sin(theta)]], jnp.float64)
        c = jnp.array([[1.0, 0.2], [0.1, 1.0]], jnp.float64)
        g = lambda e, c: losses.arcface_loss(e, c, jnp.array([0]), scale=16.0, margin=0.5)  # noqa: E731
        check_grads(g, (e, c), order=1, modes=["rev"], eps=1e-5, atol=1e-4, rtol=1e-4)


def test_softmax_loss_equals_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4)) * 3
    labels = rng.integers(0, 4, size=5)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(5), labels].mean()
    np.testing.assert_allclose(float(losses.softmax_loss(logits, labels)), expected, rtol=1e-5)


def test_sigmoid_loss_equals_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 4)) * 3
    targets = (rng.uniform(size=(5, 4)) < 0.4).astype(np.float32)
    p = 1 / (1 + np.exp(-logits))
    expected = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).sum(axis=1).mean()
    np.testing.assert_allclose(float(losses.sigmoid_loss(logits, targets)), expected, rtol=1e-5)
    # extreme logits stay finite (log-sigmoid, not log(sigmoid))
    big = losses.sigmoid_loss(jnp.array([[1e4, -1e4]]), jnp.array([[0.0, 1.0]]))
    np.testing.assert_allclose(float(big), 2e4, rtol=1e-5)


def test_losses_accept_bfloat16_and_compute_in_float32():
    embeddings, centers, labels = _random_case(2)
    ref = losses.arcface_loss(embeddings, centers, labels, scale=64, margin=0.5)
    low = losses.arcface_loss(jnp.asarray(embeddings, jnp.bfloat16), jnp.asarray(centers, jnp.bfloat16),
                              labels, scale=64, margin=0.5)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(float(low), float(ref), rtol=0.1)


def test_l2_normalize_zero_vector_is_finite():
    value, grad = jax.value_and_grad(lambda x: losses.l2_normalize(x).sum())(jnp.zeros((1, 3)))
    assert np.all(np.isfinite(np.asarray(grad))) and float(value) == 0.0


def test_docstring_examples():
    import doctest

    from jaxembed import schedules, templates

    for module in (losses, schedules, templates):
        result = doctest.testmod(module, extraglobs={"jnp": jnp})
        assert result.attempted > 0 and result.failed == 0, module.__name__
