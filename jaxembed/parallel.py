"""Device mesh, shardings and multi-host start-up.

The mesh is 2-D, `("data", "model")`. Every device computes the backbone on its own slice of the
global batch (the batch is split over all devices, both axes); the `model` axis only shards what is
too large to replicate: the ArcFace class centres (`centers_sharding`). Everything else in
the train state is replicated. With `model` of size 1 (the default) this is plain data parallelism.
`jax.jit` places the collectives, so batch-norm statistics and gradients are computed over the
whole global batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Starts JAX's multi-host runtime when a cluster is configured; a no-op on one host.

    Explicit arguments win; otherwise `jax.distributed.initialize()` reads the usual cluster
    environment (TPU pods, SLURM, ...) when `JAX_COORDINATOR_ADDRESS` is set or a cluster is detected.
    """
    if coordinator_address or num_processes is not None:
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES"):
        jax.distributed.initialize()
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # Gloo connects a device group on its first collective and waits only 30 s for the others;
        # processes compiling at different speeds miss that. Connect the groups now, while in step.
        jax.block_until_ready(max_over_processes(0, make_mesh()))
        multihost_utils.sync_global_devices("jaxembed: connect CPU collectives")
    logging.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def make_mesh(devices: list[jax.Device] | None = None, *, model_parallelism: int = 1) -> Mesh:
    """A `(data, model)` mesh over `devices` (default: all devices of all processes).

    `model_parallelism` consecutive devices form each group along `model`, and `data` is the device
    count divided by it. Consecutive devices are those of one host (`jax.devices()` lists each
    process's devices together), so the every-step traffic of a model group (gathering embeddings,
    reducing per-row softmax terms) stays inside a host, and only the gradient all-reduce over
    `data` crosses hosts. Keeping `jax.devices()`'s order also keeps each process's batch rows
    contiguous, as `global_batch` needs.

    Raises:
      ValueError: naming model_parallelism and the device count when it is < 1 or does not divide it.
    """
    devices = jax.devices() if devices is None else list(devices)
    if model_parallelism < 1 or len(devices) % model_parallelism:
        divisors = [d for d in range(1, len(devices) + 1) if len(devices) % d == 0]
        raise ValueError(f"model_parallelism={model_parallelism} must divide the number of devices "
                         f"({len(devices)}): use one of {divisors}")
    return Mesh(np.asarray(devices).reshape(-1, model_parallelism), (DATA_AXIS, MODEL_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over all devices (`data` and `model`).

    Not over `data` alone: then the devices of a model group would all compute the backbone on the
    same rows, `model` times the work. Split over every device, the backbone is data-parallel
    everywhere and only the small embeddings are gathered within a model group for the loss (as
    insightface's Partial FC does).
    """
    return NamedSharding(mesh, PartitionSpec((DATA_AXIS, MODEL_AXIS)))


def centers_sharding(mesh: Mesh) -> NamedSharding:
    """ArcFace class centres `(embed_dim, num_classes)`: classes split over `model`, replicated over `data`.

    With many classes the centre matrix dominates memory (1,000,000 x 512 is 2 GB in float32, 6 GB
    with its gradient and momentum); split this way each device holds `1 / model` of it, and
    `jaxembed.losses.arcface_loss(..., mesh=mesh)` never gathers it.
    """
    return NamedSharding(mesh, PartitionSpec(None, MODEL_AXIS))


def state_shardings(tree, mesh: Mesh, *, centers_key: str = "centers"):
    """Shardings for a pytree of arrays (params, optimiser state, a whole train state): every leaf
    under a dict key or attribute named `centers_key` gets `centers_sharding(mesh)`, the rest are
    replicated. optax states mirror the params' structure, so the momentum of the centres is sharded
    like the centres themselves.

    Args:
      tree: a pytree whose leaves have `.ndim` (arrays or `jax.ShapeDtypeStruct`s from `jax.eval_shape`).
      mesh: the `(data, model)` mesh.
      centers_key: the name of the class-centre parameter.

    Returns:
      A pytree of `NamedSharding`s with the structure of `tree`, for `jax.jit`'s in/out_shardings.
    """

    def sharding(path, leaf):
        names = {getattr(entry, "key", getattr(entry, "name", None)) for entry in path}
        if centers_key in names and getattr(leaf, "ndim", 0) == 2:
            return centers_sharding(mesh)
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(sharding, tree)


def per_process_batch_size(batch_size: int, mesh: Mesh) -> int:
    """The rows each process loads for a global `batch_size`, checking it divides evenly.

    Raises:
      ValueError: naming batch_size and the device count when the batch cannot be split evenly.
    """
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by the number of devices ({devices}): "
            f"use a multiple of {devices}, e.g. {max(devices, batch_size // devices * devices)}"
        )
    return batch_size // jax.process_count()


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays split over all devices (`batch_sharded`)."""
    sharding = batch_sharded(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in local_batch.items()
    }


def max_over_processes(value: int, mesh: Mesh) -> jax.Array:
    """The largest of every process's `value`, as a replicated int32 scalar on `mesh`.

    A collective: every process must call it, in the same order. Like any JAX computation it is
    dispatched asynchronously, and reading it (`int(result)`) waits for it; a training loop reads it
    a step later, so the devices never wait for the host.
    """
    votes = global_batch({"value": np.full(jax.local_device_count(), value, np.int32)}, mesh)["value"]
    return jax.numpy.max(votes)
