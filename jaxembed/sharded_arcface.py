"""ArcFace with the class centres sharded over devices along the class axis (model parallelism).

With many classes the centre matrix dominates memory: 1,000,000 classes x 512 dims is 2 GB in float32,
and 6 GB with its gradient and SGD momentum, on every device when replicated. insightface's Partial FC
splits the classes over the devices; so does this module, on the trainer's 2-D mesh `("data", "model")`
(`jaxembed.parallel.make_mesh`; `jaxembed.train` uses this loss when `model_parallelism` > 1):

- centres `(embed_dim, num_classes)`: classes split over `model`, replicated over `data`
  (`centers_sharding`); each device stores `num_classes / model` of them, and so do their gradient
  and optimiser state when the train step's shardings say so.
- logits `(batch, num_classes)`: rows split over `data`, classes over `model` (`logits_sharding`).
  Each device computes the cosines of its rows with its own centres; the whole matrix never exists.
- communication per step: the embeddings are all-gathered over `model` (each class shard needs every
  row of its data shard: `batch / data x embed_dim` floats), the target cosine and the log-sum-exp's
  max and sum are all-reduces of `(batch / data,)` vectors over `model`, and the centre gradient is
  all-reduced over `data` (`embed_dim x num_classes / model` floats; none when `data` is 1). With all
  devices on `model` this is Partial FC's traffic: gather the features, never move the centres.

Why sharding annotations and `jit` rather than `shard_map` with hand-written `psum`/`pmax`: XLA's SPMD
partitioner already splits this computation as above. With the centres placed by `centers_sharding`,
the compiled step holds `(batch / data, num_classes / model)` logits per device, gathers only the
embeddings and reduces only `(batch,)` vectors over `model` (checked in tests/test_sharded_arcface.py;
in jax 0.10 even the dense `jaxembed.losses.arcface_loss` partitions this way once the centres
are sharded). So a `shard_map` version would save neither memory nor communication, and would need
its own backward pass through `pmax` and per-axis code for every mesh shape. What this function adds to
the dense loss is `with_sharding_constraint` on the centres and the logits, so the layout holds
whatever shardings the surrounding train step lets the partitioner infer (replicated centres coming
in, unspecified output shardings, embeddings sharded over all devices by a data-parallel backbone).

The formula is `jaxembed.losses.arcface_loss`'s, with each row's target picked by comparing a class
iota with the label (what `jax.nn.one_hot` does) and the margin computed on the `(batch,)` target
cosines only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxembed import losses, parallel
from jaxembed.parallel import DATA_AXIS, MODEL_AXIS


def centers_sharding(mesh: Mesh) -> NamedSharding:
    """Class centres `(embed_dim, num_classes)`: classes split over `model`, replicated over `data`."""
    return NamedSharding(mesh, PartitionSpec(None, MODEL_AXIS))


def logits_sharding(mesh: Mesh) -> NamedSharding:
    """Logits `(batch, num_classes)`: rows split over `data`, classes over `model`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, MODEL_AXIS))


def tree_shardings(tree, mesh: Mesh, *, centers_key: str = "centers"):
    """Shardings for a pytree of arrays (params, optimiser state, a whole train state).

    Every leaf under a dict key or attribute named `centers_key` gets `centers_sharding(mesh)`; the
    rest are replicated. optax states mirror the params' structure, so the momentum of the centres
    (`opt_state[...]["centers"]`) is sharded like the centres themselves.

    Args:
      tree: a pytree whose leaves have `.ndim` (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`).
      mesh: the `(data, model)` mesh.
      centers_key: the name of the class-centre parameter (`ArcFaceModel`'s is "centers").

    Returns:
      A pytree of `NamedSharding`s with the structure of `tree`, for `jax.jit`'s in/out_shardings.
    """

    def sharding(path, leaf):
        names = {getattr(entry, "key", getattr(entry, "name", None)) for entry in path}
        if centers_key in names and getattr(leaf, "ndim", 0) == 2:
            return centers_sharding(mesh)
        return parallel.replicated(mesh)

    return jax.tree_util.tree_map_with_path(sharding, tree)


def sharded_arcface_loss(
    embeddings: jax.Array, centers: jax.Array, labels: jax.Array, *, scale: float, margin: float, mesh: Mesh,
    valid_classes: int | None = None,
) -> jax.Array:
    """`jaxembed.losses.arcface_loss`, computed without gathering the centres or the logits.

    Call it inside `jax.jit` (as part of a train step) with `centers` placed by `centers_sharding(mesh)`;
    the result equals the dense loss up to float rounding, and so does its gradient. The batch must
    divide by the mesh's `data` size and the classes by its `model` size.

    Args:
      embeddings: `(batch, embed_dim)`, need not be normalised; any sharding (e.g. rows over `data`).
      centers: `(embed_dim, num_classes)`, need not be normalised.
      labels: `(batch,)` integer class indices in `[0, num_classes)`.
      scale: logit scale s (e.g. 64).
      margin: additive angular margin m in radians (e.g. 0.5).
      mesh: a mesh with axes `data` and `model` (`jaxembed.parallel.make_mesh`).
      valid_classes: if given, only the first `valid_classes` columns of `centers` are classes; the
        rest are padding, left out of the softmax (and so given zero gradient). This lets any class
        count be padded to a multiple of the `model` size: the loss then equals the dense loss on
        `centers[:, :valid_classes]`.

    Returns:
      The scalar mean loss, float32 (float64 for float64 inputs).
    """
    batch, num_classes = embeddings.shape[0], centers.shape[-1]
    for name, size, axis in (("batch", batch, DATA_AXIS), ("num_classes", num_classes, MODEL_AXIS)):
        if size % mesh.shape[axis]:
            raise ValueError(f"{name}={size} must be divisible by the mesh's {axis} size ({mesh.shape[axis]})")
    constrain = jax.lax.with_sharding_constraint
    rows = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    # Normalising the centres is per class (over embed_dim), so it stays local to each class shard.
    unit_centers = losses.l2_normalize(constrain(losses.as_float(centers), centers_sharding(mesh)), axis=0)
    cosine = constrain(losses.l2_normalize(losses.as_float(embeddings), axis=-1) @ unit_centers, logits_sharding(mesh))
    # Which column is each row's class, from global class indices (iota is partitioned like cosine).
    classes = jax.lax.broadcasted_iota(jnp.int32, cosine.shape, 1)
    is_target = classes == constrain(labels.astype(jnp.int32), rows)[:, None]
    cos_target = jnp.sum(jnp.where(is_target, cosine, 0.0), axis=-1)  # (batch,): an all-reduce over model
    target_logit = scale * losses.target_cosine_with_margin(cos_target, margin)
    logits = jnp.where(is_target, target_logit[:, None], scale * cosine)
    if valid_classes is not None:
        logits = jnp.where(classes < valid_classes, logits, -jnp.inf)
    # logsumexp subtracts the (stop-gradient) row maximum: a max all-reduce, then a sum all-reduce.
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target_logit)
