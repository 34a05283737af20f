"""Training losses: ArcFace (additive angular margin), sigmoid and softmax cross-entropy.

All are pure and jit-able, take float arrays of any float dtype and compute in float32 (or
float64 when given float64), and return the mean over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxembed import parallel
from jaxembed.parallel import DATA_AXIS, MODEL_AXIS

# Keeps sqrt(1 - cos^2) and the norms differentiable where cos = +-1 or a vector is zero.
_EPS = 1e-7


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """`x / ||x||` along `axis`; a zero vector stays zero (finite gradients everywhere).

    The one normalisation of the library: embeddings, class centres and search vectors all use it.
    """
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), _EPS * _EPS))


def as_float(x: jax.Array) -> jax.Array:
    """`x` as float32, or float64 when it already is (the losses compute in this dtype)."""
    x = jnp.asarray(x)
    return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def target_cosine_with_margin(cos_target: jax.Array, margin: float) -> jax.Array:
    """`cos(theta + m)` for target cosines `cos(theta)` of any shape, with ArcFace's fallback
    `cos(theta) - m sin(m)` where theta + m > pi (Deng et al., ArcFace, CVPR 2019), which keeps the
    target logit decreasing in theta; finite gradients at cos = +-1."""
    sin_target = jnp.sqrt(jnp.clip(1.0 - cos_target * cos_target, _EPS, None))
    cos_with_margin = cos_target * jnp.cos(margin) - sin_target * jnp.sin(margin)
    # theta + m > pi  <=>  theta > pi - m  <=>  cos(theta) < cos(pi - m).
    fallback = cos_target - margin * jnp.sin(margin)
    return jnp.where(cos_target >= jnp.cos(jnp.pi - margin), cos_with_margin, fallback)


def arcface_loss(
    embeddings: jax.Array, centers: jax.Array, labels: jax.Array, *, scale: float, margin: float,
    mesh: Mesh | None = None, valid_classes: int | None = None,
) -> jax.Array:
    """ArcFace loss: softmax cross-entropy over scaled cosine logits with an additive angular margin
    on each row's target class, averaged over the batch.

    With theta the angle between embedding i and the centre of class j:
      logit[i, j] = scale * cos(theta)                 for j != labels[i]
      logit[i, y] = scale * cos(theta + margin)        if theta + margin <= pi, else
                    scale * (cos(theta) - margin * sin(margin))   (`target_cosine_with_margin`).

    With a `mesh` (`jaxembed.parallel.make_mesh`) the same loss runs class-sharded, as insightface's
    Partial FC does: call it inside `jax.jit` with `centers` placed by `parallel.centers_sharding(mesh)`.
    The centres stay split over the mesh's `model` axis and the logits over `(data, model)`, so the
    full centre or logit matrix never exists on one device; sharding constraints say so and XLA's SPMD
    partitioner places the collectives (an all-gather of the embeddings over `model`, all-reduces of
    `(batch,)` vectors for the target cosine and the log-sum-exp). The formula is the same line for
    line; only the layout differs, so it equals the dense loss up to float summation order.

    Args:
      embeddings: `(batch, embed_dim)`, need not be normalised.
      centers: `(embed_dim, num_classes)`, need not be normalised.
      labels: `(batch,)` integer class indices.
      scale: logit scale s (e.g. 64).
      margin: additive angular margin m in radians (e.g. 0.5).
      mesh: optional `(data, model)` mesh to shard the classes over; the batch must divide by its
        `data` size and the classes by its `model` size.
      valid_classes: if given, only the first `valid_classes` columns of `centers` are classes; the
        rest pad the class count to a multiple of the `model` size and are left out of the softmax
        (zero gradient), so the loss equals the dense loss on `centers[:, :valid_classes]`.

    Returns:
      The scalar mean loss, float32 (float64 for float64 inputs).

    Example:
      An embedding at 90 degrees to its class centre and on top of the other one: the target
      logit is 16 cos(pi/2 + 0.5) = -7.67, the other 16, so the loss is log(1 + e^23.67).

      >>> e = jnp.array([[0.0, 2.0]]); c = jnp.eye(2)
      >>> round(float(arcface_loss(e, c, jnp.array([0]), scale=16.0, margin=0.5)), 3)
      23.671
    """
    logits, target_logit = _arcface_logits_and_targets(
        embeddings, centers, labels, scale=scale, margin=margin, mesh=mesh, valid_classes=valid_classes)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target_logit)


def arcface_logits(
    embeddings: jax.Array, centers: jax.Array, labels: jax.Array, *, scale: float, margin: float,
    mesh: Mesh | None = None, valid_classes: int | None = None,
) -> jax.Array:
    """The `(batch, num_classes)` logits whose softmax cross-entropy `arcface_loss` is (arguments as there);
    padding columns (`valid_classes`) are -inf."""
    return _arcface_logits_and_targets(embeddings, centers, labels, scale=scale, margin=margin, mesh=mesh,
                                       valid_classes=valid_classes)[0]


def _arcface_logits_and_targets(embeddings, centers, labels, *, scale, margin, mesh, valid_classes):
    """`(logits, target_logit (batch,))`; with a mesh, the layout constraints of `arcface_loss`."""
    constrain = (lambda x, _: x) if mesh is None else jax.lax.with_sharding_constraint
    if mesh is not None:
        _check_divisible(embeddings.shape[0], centers.shape[-1], mesh)
        labels = constrain(labels, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))
    centers_layout = None if mesh is None else parallel.centers_sharding(mesh)
    logits_layout = None if mesh is None else NamedSharding(mesh, PartitionSpec(DATA_AXIS, MODEL_AXIS))
    # Normalising the centres is per class (over embed_dim), so it stays local to each class shard.
    unit_centers = l2_normalize(constrain(as_float(centers), centers_layout), axis=0)
    cosine = constrain(l2_normalize(as_float(embeddings), axis=-1) @ unit_centers, logits_layout)
    # Which column is each row's class, from global class indices (iota is partitioned like cosine).
    classes = jax.lax.broadcasted_iota(jnp.int32, cosine.shape, 1)
    is_target = classes == labels.astype(jnp.int32)[:, None]
    cos_target = jnp.sum(jnp.where(is_target, cosine, 0.0), axis=-1)  # (batch,)
    target_logit = scale * target_cosine_with_margin(cos_target, margin)
    logits = jnp.where(is_target, target_logit[:, None], scale * cosine)
    if valid_classes is not None:
        logits = jnp.where(classes < valid_classes, logits, -jnp.inf)
    return logits, target_logit


def _check_divisible(batch: int, num_classes: int, mesh: Mesh) -> None:
    for name, size, axis in (("batch", batch, DATA_AXIS), ("num_classes", num_classes, MODEL_AXIS)):
        if size % mesh.shape[axis]:
            raise ValueError(f"{name}={size} must be divisible by the mesh's {axis} size ({mesh.shape[axis]})")


def softmax_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Softmax cross-entropy for single-label classes (logreg=0), averaged over the batch.

    Args:
      logits: `(batch, num_classes)`.
      labels: `(batch,)` integer class indices.
      label_smoothing: the target puts `1 - label_smoothing` on the label and spreads
        `label_smoothing` evenly over all classes (Szegedy et al. 2016, as `optax.smooth_labels`).
    """
    logits = as_float(logits)
    if not label_smoothing:
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def sigmoid_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Independent sigmoid cross-entropy per concept (logreg=1, multi-label).

    Summed over concepts and averaged over the batch, so each image contributes one loss term
    whatever the number of concepts (which keeps `per_item_lrate` meaningful). The sum's gradient
    grows with the concept count only while the negatives are not yet predicted unlikely: the
    trainer therefore starts each unit's bias at the prior `-log(C - 1)` (`tasks.Sigmoid`), where
    the C - 1 negatives of an image contribute a gradient of total size (C - 1) / C, as softmax's.

    Args:
      logits: `(batch, num_concepts)`.
      targets: `(batch, num_concepts)` multi-hot in {0, 1} (or soft targets in [0, 1]).
    """
    logits = as_float(logits)
    per_concept = optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype))
    return jnp.mean(jnp.sum(per_concept, axis=-1))
