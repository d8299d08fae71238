"""Device mesh, shardings and global batches for data parallelism.

One mesh axis, ``data``: the train state is replicated, batches are sharded
along their leading axis. Axes are ``Auto`` so that ``jit`` propagates the
shardings (``jax.make_mesh`` defaults to Explicit axes in current JAX, which
would make every array's sharding part of its type).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over ``num_devices`` (default: every device)."""
  n = jax.device_count() if num_devices is None else num_devices
  if not 1 <= n <= jax.device_count():
    raise ValueError(f"num_devices must be in [1, {jax.device_count()}], "
                     f"got {n}")
  return jax.make_mesh((n,), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of the replicated train state."""
  return NamedSharding(mesh, P())


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over ``data``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh,
                     field: str = "batch_size") -> None:
  """Raises a clear error when the global batch does not split evenly."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{field}={batch_size} must be divisible by the number "
                     f"of devices ({n})")


def global_batch(local: Mapping[str, Any], mesh: jax.sharding.Mesh
                 ) -> dict[str, jax.Array]:
  """Global arrays from this process's part of a batch.

  Args:
    local: arrays whose leading axis is this process's share of the batch.
    mesh: the ``data`` mesh.

  Returns:
    The same keys as global ``jax.Array``s sharded on ``data``.
  """
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a pytree on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def maybe_initialize_distributed(multihost: bool) -> None:
  """``jax.distributed.initialize()`` when configured for multiple hosts.

  Only then: a process that called it ignores SIGTERM (stop it with SIGKILL).
  """
  if multihost:
    jax.distributed.initialize()
