"""Device mesh, shardings, global batches and multi-process initialisation.

One mesh axis, ``data``: the train state is replicated, batches are sharded
along their leading axis. Axes are ``Auto`` so that ``jit`` propagates the
shardings (``jax.make_mesh`` defaults to Explicit axes in current JAX, which
would make every array's sharding part of its type).

Several processes (one per host of a TPU pod slice or GPU cluster) form one
job through JAX's multi-controller runtime: ``initialize_distributed``
joins it (``jax.distributed.initialize``), after which ``jax.devices()`` are
the devices of every process, the mesh spans them all, each process feeds its
slice of every global batch (``global_batch``) and every process runs the
same program. When that happens is decided by ``distributed_settings``:

* ``coordinator_address`` / ``num_processes`` / ``process_id`` (config
  fields, else the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID`` variables): explicit, e.g. a plain multi-node job or
  ``python -m training.launch``;
* ``multihost=True`` alone: JAX detects the cluster (Cloud TPU pod slices,
  SLURM, Open MPI, ...);
* neither: a single process, nothing to join.

A process that joined a job ignores SIGTERM: stop it with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from training import config as config_lib

DATA_AXIS = "data"
# Config fields that configure joining the job; they may differ between the
# processes of one job (process_id always does) and are left out of the
# cross-process config check.
DISTRIBUTED_FIELDS = ("multihost", "coordinator_address", "num_processes",
                      "process_id", "distributed_timeout")
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over ``num_devices`` (default: every device)."""
  n = jax.device_count() if num_devices is None else num_devices
  if not 1 <= n <= jax.device_count():
    raise ValueError(f"num_devices must be in [1, {jax.device_count()}], "
                     f"got {n}")
  # Ordered by process: process p's devices hold the p-th block of rows of a
  # global batch, the slice its data loader reads.
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return jax.make_mesh((n,), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:n])


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
    raise config_lib.ConfigError(
        f"{field}={batch_size} must be divisible by the number of devices "
        f"({n}, over {jax.process_count()} process(es))")


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
  """Places a pytree on every device of ``mesh``.

  In a multi-process job every process passes the same values (this is not
  checked here: ``jax.device_put`` would check every leaf with a collective,
  and refuses arrays committed to a local device); each leaf becomes a
  global array from this process's copy.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)  # Already global.
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(put, tree)


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """How this process joins a multi-process job.

  Attributes:
    coordinator_address: ``host:port`` of process 0's coordinator, or None
      (detected from the cluster).
    num_processes: processes in the job, or None (detected).
    process_id: this process's index, or None (detected).
    timeout: seconds to wait for every process to join (and the heartbeat
      and shutdown bounds).
  """

  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  timeout: int


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise config_lib.ConfigError(
        f"{name}={value!r} must be an integer") from None


def distributed_settings(config: Mapping[str, Any],
                         environ: Mapping[str, str] | None = None
                         ) -> DistributedSettings | None:
  """Whether and how to join a multi-process job (rules: module docstring).

  Args:
    config: the run config (``multihost``, ``coordinator_address``,
      ``num_processes``, ``process_id``, ``distributed_timeout``).
    environ: the environment (default ``os.environ``).

  Returns:
    The settings, or None for a single-process run.

  Raises:
    ConfigError: ``process_id`` outside ``[0, num_processes)``, or only some
      of the explicit values given.
  """
  environ = os.environ if environ is None else environ
  address = config["coordinator_address"] or environ.get(
      ENV_COORDINATOR, "").strip() or None
  num = config["num_processes"] or _env_int(environ, ENV_NUM_PROCESSES)
  pid = config["process_id"]
  if pid < 0:
    pid = _env_int(environ, ENV_PROCESS_ID)
  if not (config["multihost"] or address or num or pid is not None):
    return None
  if num is not None and num < 1:
    raise config_lib.ConfigError(f"num_processes={num} must be >= 1")
  if pid is not None and num is not None and not 0 <= pid < num:
    raise config_lib.ConfigError(
        f"process_id={pid} must be in [0, num_processes={num})")
  explicit = {"coordinator_address": address, "num_processes": num,
              "process_id": pid}
  given = [k for k, v in explicit.items() if v is not None]
  if given and len(given) < 3 and not config["multihost"]:
    missing = [k for k in explicit if k not in given]
    raise config_lib.ConfigError(
        f"{', '.join(given)} given but not {', '.join(missing)}: set all "
        f"three (config fields or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
        f"{ENV_PROCESS_ID}), or multihost=True to detect the cluster")
  return DistributedSettings(address, num, pid, config["distributed_timeout"])


def settings_hash(config: Mapping[str, Any]) -> str:
  """Hash of every field but ``DISTRIBUTED_FIELDS`` (equal across a job)."""
  d = config_lib.to_dict(config)
  for k in DISTRIBUTED_FIELDS:
    d.pop(k, None)
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _exit_after(seconds: float, text: str) -> threading.Timer:
  """Ends the process with ``error: text`` unless cancelled in time.

  ``jax.distributed.initialize`` aborts with a fatal C++ error (and a stack
  trace) when its own timeout expires; this fires first with one line.
  """
  def fire():
    print(f"error: {text}", file=sys.stderr, flush=True)
    os._exit(1)  # The main thread is blocked inside the runtime.
  timer = threading.Timer(seconds, fire)
  timer.daemon = True
  timer.start()
  return timer


def initialize_distributed(config: Mapping[str, Any]) -> None:
  """Joins the multi-process job the config (or environment) describes.

  Does nothing for a single-process run or when already joined. Otherwise:
  selects gloo for CPU collectives (multi-process CPU runs need it on every
  supported JAX), calls ``jax.distributed.initialize`` bounded by
  ``distributed_timeout`` seconds (then the process ends with one error line
  naming the coordinator), and checks that every process runs the same
  configuration.

  Args:
    config: the run config.

  Raises:
    ConfigError: invalid settings, or the processes' configurations differ.
  """
  settings = distributed_settings(config)
  if settings is None or jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  who = (f"process {settings.process_id} of {settings.num_processes}"
         if settings.process_id is not None else "this process")
  where = settings.coordinator_address or "the detected coordinator"
  timer = _exit_after(
      settings.timeout,
      f"{who} could not join the job at {where} within "
      f"distributed_timeout={settings.timeout} s (coordinator unreachable, "
      "or not every process started)")
  try:
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        initialization_timeout=settings.timeout + 30,
        heartbeat_timeout_seconds=settings.timeout,
        shutdown_timeout_seconds=settings.timeout)
  finally:
    timer.cancel()
  check_same_config(config)


def _digests(data: bytes) -> np.ndarray:
  """Every process's sha256 of ``data``, as uint8 rows [process, 32]."""
  digest = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
  return np.asarray(multihost_utils.process_allgather(digest))


def _differing(digests: np.ndarray) -> list[int]:
  return [p for p in range(len(digests))
          if not np.array_equal(digests[p], digests[0])]


def check_same_config(config: Mapping[str, Any]) -> None:
  """Raises on every process when the processes' configurations differ.

  Args:
    config: the run config.

  Raises:
    ConfigError: naming the processes whose settings differ from process
      0's.
  """
  if jax.process_count() == 1:
    return
  digests = _digests(settings_hash(config).encode())
  differ = _differing(digests)
  if differ:
    raise config_lib.ConfigError(
        f"process(es) {differ} run a configuration other than process 0's "
        f"(settings hash {digests[0].tobytes().hex()[:16]} vs "
        f"{digests[differ[0]].tobytes().hex()[:16]}); start every process "
        "with the same config file and overrides")


def is_primary() -> bool:
  """Whether this process writes files and prints progress (process 0)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process reaches this point (no-op for one process).

  Args:
    name: a name unique to this synchronisation point.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check_same_on_processes(tree: Any, what: str) -> None:
  """Raises unless ``tree`` (host values) is identical on every process.

  Guards decisions computed on each host (pruning masks, thresholds) that
  must agree bit for bit before they are placed on the global mesh.

  Args:
    tree: a pytree of numpy-convertible leaves.
    what: its name in the error.

  Raises:
    RuntimeError: the processes disagree.
  """
  if jax.process_count() == 1:
    return
  leaves, treedef = jax.tree.flatten(tree)
  data = str(treedef).encode() + b"".join(
      np.ascontiguousarray(np.asarray(x)).tobytes() for x in leaves)
  differ = _differing(_digests(data))
  if differ:
    raise RuntimeError(f"{what} differ between process 0 and process(es) "
                       f"{differ}")
