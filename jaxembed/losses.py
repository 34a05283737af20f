"""Training losses: ArcFace (additive angular margin), sigmoid and softmax cross-entropy.

All are pure and jit-able, take float arrays of any float dtype and compute in float32 (or
float64 when given float64), and return the mean over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Keeps sqrt(1 - cos^2) and the norms differentiable where cos = +-1 or a vector is zero.
_EPS = 1e-7


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """`x / ||x||` along `axis`; a zero vector stays zero (finite gradients everywhere)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), _EPS * _EPS))


def as_float(x: jax.Array) -> jax.Array:
    """`x` as float32, or float64 when it already is (the losses compute in this dtype)."""
    x = jnp.asarray(x)
    return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def arcface_logits(
    embeddings: jax.Array, centers: jax.Array, labels: jax.Array, *, scale: float, margin: float
) -> jax.Array:
    """Scaled cosine logits with the additive angular margin on each row's target class.

    With theta the angle between embedding i and the centre of class j:
      logit[i, j] = scale * cos(theta)                 for j != labels[i]
      logit[i, y] = scale * cos(theta + margin)         if theta + margin <= pi
                  = scale * (cos(theta) - margin * sin(margin))   otherwise,
    the fallback of Deng et al. (ArcFace, CVPR 2019) that keeps the target logit decreasing in theta.

    Args:
      embeddings: `(batch, embed_dim)`, need not be normalised.
      centers: `(embed_dim, num_classes)` class centres, need not be normalised.
      labels: `(batch,)` integer class indices.
      scale: s, the radius of the hypersphere the logits live on.
      margin: m, the additive angular margin in radians.

    Returns:
      `(batch, num_classes)` float logits.
    """
    cosine = l2_normalize(as_float(embeddings), axis=-1) @ l2_normalize(as_float(centers), axis=0)
    one_hot = jax.nn.one_hot(labels, cosine.shape[-1], dtype=cosine.dtype)
    cos_target = jnp.sum(cosine * one_hot, axis=-1)
    cos_target_new = target_cosine_with_margin(cos_target, margin)
    cosine = cosine + one_hot * (cos_target_new - cos_target)[:, None]
    return scale * cosine


def target_cosine_with_margin(cos_target: jax.Array, margin: float) -> jax.Array:
    """`cos(theta + m)` for target cosines `cos(theta)` of any shape, with ArcFace's fallback
    `cos(theta) - m sin(m)` where theta + m > pi; finite gradients at cos = +-1."""
    sin_target = jnp.sqrt(jnp.clip(1.0 - cos_target * cos_target, _EPS, None))
    cos_with_margin = cos_target * jnp.cos(margin) - sin_target * jnp.sin(margin)
    # theta + m > pi  <=>  theta > pi - m  <=>  cos(theta) < cos(pi - m).
    fallback = cos_target - margin * jnp.sin(margin)
    return jnp.where(cos_target >= jnp.cos(jnp.pi - margin), cos_with_margin, fallback)


def arcface_loss(
    embeddings: jax.Array, centers: jax.Array, labels: jax.Array, *, scale: float, margin: float
) -> jax.Array:
    """ArcFace loss: softmax cross-entropy over `arcface_logits`, averaged over the batch.

    Args:
      embeddings: `(batch, embed_dim)`, need not be normalised.
      centers: `(embed_dim, num_classes)`, need not be normalised.
      labels: `(batch,)` integer class indices.
      scale: logit scale s (e.g. 64).
      margin: additive angular margin m in radians (e.g. 0.5).

    Returns:
      The scalar mean loss.

    Example:
      An embedding at 90 degrees to its class centre and on top of the other one: the target
      logit is 16 cos(pi/2 + 0.5) = -7.67, the other 16, so the loss is log(1 + e^23.67).

      >>> e = jnp.array([[0.0, 2.0]]); c = jnp.eye(2)
      >>> round(float(arcface_loss(e, c, jnp.array([0]), scale=16.0, margin=0.5)), 3)
      23.671
    """
    logits = arcface_logits(embeddings, centers, labels, scale=scale, margin=margin)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def softmax_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy for single-label classes (logreg=0), averaged over the batch.

    Args:
      logits: `(batch, num_classes)`.
      labels: `(batch,)` integer class indices.
    """
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(as_float(logits), labels))


def sigmoid_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Independent sigmoid cross-entropy per concept (logreg=1, multi-label).

    Summed over concepts and averaged over the batch, so each image contributes one loss term
    whatever the number of concepts (which keeps `per_item_lrate` meaningful).

    Args:
      logits: `(batch, num_concepts)`.
      targets: `(batch, num_concepts)` multi-hot in {0, 1} (or soft targets in [0, 1]).
    """
    logits = as_float(logits)
    per_concept = optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype))
    return jnp.mean(jnp.sum(per_concept, axis=-1))
