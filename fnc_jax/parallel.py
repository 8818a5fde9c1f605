"""Device mesh, shardings, and host-local numpy batches → global `jax.Array`s.

fnc_jax is data parallel over one mesh axis, `data`, spanning every device of every process. The
train step runs under `jax.jit` on global arrays (XLA inserts the gradient all-reduce and makes
BatchNorm statistics global); only the loss runs under `jax.shard_map` over the same axis, where the
objective all-gathers its candidates explicitly.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(devices: list | None = None) -> Mesh:
    """1-D mesh over all global devices (process-major order, as jax.devices() returns them)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (sample) axis split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's host batch into global arrays sharded over the sample axis."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}


def device_prefetch(batches: Iterator[dict[str, np.ndarray]], mesh: Mesh, size: int = 2) -> Iterator[dict[str, Any]]:
    """Keeps `size` batches in flight to the devices so host→device copies overlap the step."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(global_batch(batch, mesh))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def barrier(name: str) -> None:
    """All processes wait here (a no-op with one process).

    A coordination-service barrier, not a device collective: a CPU (gloo) collective fails when a peer
    reaches it over 30 s late, and a process can be minutes late (compiling, moving an old run aside,
    writing files).
    """
    if jax.process_count() > 1:
        import orbax.checkpoint as ocp  # noqa: PLC0415 (only multi-process runs need it)

        ocp.multihost.sync_global_processes(
            name.replace(" ", "_"), timeout=1800, processes=set(range(jax.process_count()))
        )
