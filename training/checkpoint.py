"""Checkpoints of one stage: periodic, last N + best, resumable, guarded.

Layout of a stage directory ``workdir/<stage>/``::

  meta.json      what the checkpoints belong to (method, stage, model, dataset,
                 config hash); checked before anything is read or written
  steps/<step>/  the last ``keep`` periodic checkpoints (orbax, atomic)
  best/<step>/   the checkpoint with the best selection accuracy

Each checkpoint holds the whole ``TrainState`` (the rng as raw key data) and
a JSON ``progress`` item: the data iterator's state, the best accuracy so far
and any loop bookkeeping, so a restarted run continues bit-identically.
A directory holding checkpoints of another run (different meta), or whose
meta or checkpoints cannot be read, raises ``CheckpointError`` and is never
written to.

In a multi-process job every process saves and restores (orbax writes each
process's part of the global state and commits on process 0); only process
0 writes ``meta.json``.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from training import mesh as mesh_lib
from training.state import TrainState

META_FILE = "meta.json"


class CheckpointError(RuntimeError):
  """A foreign, mismatched or unreadable checkpoint directory."""


def _to_tree(state: TrainState) -> TrainState:
  # Typed PRNG keys are stored as their raw uint32 data.
  return state.replace(rng=jax.random.key_data(state.rng))


def _from_tree(tree: TrainState, like: TrainState) -> TrainState:
  impl = jax.random.key_impl(like.rng)
  return tree.replace(rng=jax.random.wrap_key_data(tree.rng, impl=impl))


def _write_json_atomic(path: pathlib.Path, data: dict[str, Any]) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
  os.replace(tmp, path)


class StageCheckpointer:
  """Checkpoints of one stage of one run.

  Args:
    directory: the stage directory (``workdir/<stage>``).
    meta: identity of the run (e.g. method, stage, model, dataset,
      config_hash); an existing directory must have the same.
    keep: periodic checkpoints kept.
  """

  def __init__(self, directory: str | os.PathLike, meta: dict[str, Any],
               keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self.meta = json.loads(json.dumps(meta))
    meta_path = self.directory / META_FILE
    existing = self.directory.exists() and any(self.directory.iterdir())
    # Every process inspects the directory before process 0 writes to it.
    mesh_lib.sync(f"checkpoint-inspect:{self.directory}")
    if existing:
      if not meta_path.exists():
        raise CheckpointError(
            f"{self.directory} is not empty and has no {META_FILE}: it does "
            "not hold checkpoints of this project; choose another workdir")
      try:
        stored = json.loads(meta_path.read_text())
      except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{meta_path} is unreadable ({e}); move the directory away to "
            "start over") from e
      diff = sorted(k for k in set(stored) | set(self.meta)
                    if stored.get(k) != self.meta.get(k))
      if diff:
        details = "; ".join(f"{k}: stored {stored.get(k)!r}, this run "
                            f"{self.meta.get(k)!r}" for k in diff)
        raise CheckpointError(
            f"checkpoints in {self.directory} belong to another run ({details})"
            "; use another workdir or the same configuration")
    elif mesh_lib.is_primary():
      self.directory.mkdir(parents=True, exist_ok=True)
      _write_json_atomic(meta_path, self.meta)
    mesh_lib.sync(f"checkpoint-meta:{self.directory}")
    # Several processes: synchronous saves. The two managers' asynchronous
    # commits each end in a cross-process barrier from a background thread,
    # and those can interleave differently on each process (a barrier then
    # waits for one the other process never enters).
    opts = dict(create=True, cleanup_tmp_directories=True,
                enable_async_checkpointing=jax.process_count() == 1)
    self._steps = ocp.CheckpointManager(
        self.directory / "steps",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts))
    self._best = ocp.CheckpointManager(
        self.directory / "best",
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **opts))

  def latest_step(self) -> int | None:
    """Step of the newest complete periodic checkpoint, or None."""
    return self._steps.latest_step()

  def best_step(self) -> int | None:
    """Step of the best checkpoint, or None."""
    return self._best.latest_step()

  def _save(self, mgr, step: int, state: TrainState, progress: dict[str, Any]):
    mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_tree(state)),
        progress=ocp.args.JsonSave(progress)), force=True)

  def save(self, step: int, state: TrainState,
           progress: dict[str, Any]) -> None:
    """Saves a periodic checkpoint (asynchronously; see ``wait``).

    Args:
      step: the state's step.
      state: the train state.
      progress: JSON-serialisable loop bookkeeping (data iterator state, best
        accuracy, ...).
    """
    if self._steps.latest_step() == step:
      return
    self._save(self._steps, step, state, progress)

  def save_best(self, step: int, state: TrainState,
                progress: dict[str, Any]) -> None:
    """Replaces the best checkpoint."""
    if self._best.latest_step() == step:
      return
    self._save(self._best, step, state, progress)

  def _restore(self, mgr, step: int, like: TrainState
               ) -> tuple[TrainState, dict[str, Any]]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_tree(like))
    try:
      out = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          progress=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types; all mean "unreadable".
      raise CheckpointError(
          f"checkpoint {mgr.directory}/{step} cannot be restored "
          f"({type(e).__name__}: {e}); it is corrupted or from another model; "
          f"move "
          f"{self.directory} away to start over") from e
    return _from_tree(out.state, like), dict(out.progress)

  def restore_latest(self, like: TrainState
                     ) -> tuple[TrainState, dict[str, Any]] | None:
    """The newest periodic checkpoint restored onto ``like``'s structure and
    shardings, as ``(state, progress)``; None when there is none."""
    step = self.latest_step()
    return None if step is None else self._restore(self._steps, step, like)

  def restore_best(self, like: TrainState
                   ) -> tuple[TrainState, dict[str, Any]] | None:
    """The best checkpoint, as ``restore_latest``."""
    step = self.best_step()
    return None if step is None else self._restore(self._best, step, like)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._steps.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the managers."""
    self.wait()
    self._steps.close()
    self._best.close()
