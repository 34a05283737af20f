"""Device mesh, shardings and multi-host start-up.

Training is data-parallel: every device holds the whole train state (replicated) and a slice of
the global batch (sharded over the mesh axis `data`). `jax.jit` places the collectives, so batch
norm statistics and gradients are computed over the whole global batch.
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
        mesh = make_mesh()
        ones = global_batch({"x": np.ones(jax.local_device_count(), np.float32)}, mesh)["x"]
        jax.block_until_ready(jax.jit(jax.numpy.sum, out_shardings=replicated(mesh))(ones))
        multihost_utils.sync_global_devices("jaxembed: connect CPU collectives")
    logging.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes) named `data`."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


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
    """Assembles each process's rows into global arrays sharded over `data`."""
    sharding = batch_sharded(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in local_batch.items()
    }
