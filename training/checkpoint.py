"""Checkpoints of one stage: periodic, last N + best, resumable, guarded.

Layout of a stage directory ``workdir/<stage>/``::

  meta.json      what the checkpoints belong to (method, stage, model, dataset,
                 config hash); checked before anything is read or written
  steps/<step>/  the last ``keep`` periodic checkpoints (orbax, atomic)
  best/<step>/   the checkpoint with the best selection accuracy
  damaged/       checkpoints found damaged, moved aside (never deleted)

Each checkpoint holds the whole ``TrainState`` (the rng as raw key data) and
a JSON ``progress`` item: the data iterator's state, the best accuracy so far
and any loop bookkeeping, so a restarted run continues bit-identically.
A directory holding checkpoints of another run (different meta), or whose
meta cannot be read, raises ``CheckpointError`` and is never written to.

Once orbax has committed a checkpoint, its files are sealed: ``sha256.json``
in the step directory records every file's size and SHA-256. A restart
checks the newest checkpoint against it (a truncated file, garbage or a
single flipped bit is found), moves a damaged one to ``damaged/`` with one
line saying so, and resumes from the next older intact checkpoint (periodic
or best). A checkpoint not sealed yet (the run was killed right after the
commit) is trusted as far as orbax can read it.

Saves are asynchronous on one process; a save that failed (a full disk) is
raised as one ``CheckpointError`` naming its step as soon as its background
work ends (``poll``), and at the latest by ``wait``/``close``, which the loop
calls before it reports a stage finished.

In a multi-process job every process saves and restores (orbax writes each
process's part of the global state and commits on process 0); only process
0 writes ``meta.json``, seals checkpoints and moves damaged ones aside.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from training import integrity
from training import mesh as mesh_lib
from training.state import TrainState

META_FILE = "meta.json"
# The manifest of a committed checkpoint, inside its step directory.
MANIFEST = "sha256.json"
# Where damaged checkpoints are moved, inside the stage directory.
DAMAGED_DIR = "damaged"
# Longest error text quoted from orbax / TensorStore (their messages embed
# whole storage specs).
_QUOTE = 300


class CheckpointError(RuntimeError):
  """A foreign, mismatched, damaged or unsavable checkpoint directory."""


def _to_tree(state: TrainState) -> TrainState:
  # Typed PRNG keys are stored as their raw uint32 data.
  return state.replace(rng=jax.random.key_data(state.rng))


def _from_tree(tree: TrainState, like: TrainState) -> TrainState:
  impl = jax.random.key_impl(like.rng)
  return tree.replace(rng=jax.random.wrap_key_data(tree.rng, impl=impl))


def _write_json_atomic(path: pathlib.Path, data: dict[str, Any]) -> None:
  integrity.atomic_write(path, json.dumps(data, indent=1, sort_keys=True))


def _quote(error: BaseException) -> str:
  """The first line of an error, shortened; a full disk said plainly."""
  text = str(error) or type(error).__name__
  if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text:
    return "no space left on device"
  line = text.strip().splitlines()[0] if text.strip() else text
  return line if len(line) <= _QUOTE else line[:_QUOTE] + " ..."


def seal(step_dir: str | os.PathLike) -> None:
  """Records the size and SHA-256 of every file of a committed checkpoint.

  Args:
    step_dir: the checkpoint's step directory (``steps/<step>``).
  """
  step_dir = pathlib.Path(step_dir)
  files = integrity.manifest(step_dir, exclude=[MANIFEST])
  _write_json_atomic(step_dir / MANIFEST, {"files": files})


def is_sealed(step_dir: str | os.PathLike) -> bool:
  """Whether a checkpoint has its manifest."""
  return (pathlib.Path(step_dir) / MANIFEST).is_file()


def damage(step_dir: str | os.PathLike) -> str | None:
  """What is wrong with a checkpoint's files, judged by its manifest.

  Args:
    step_dir: the step directory.

  Returns:
    None when the checkpoint matches its manifest, or has none yet (then
    only restoring it can tell); else a short description.
  """
  step_dir = pathlib.Path(step_dir)
  if not step_dir.is_dir():
    return "the directory is missing"
  if not is_sealed(step_dir):
    return None
  try:
    recorded = json.loads((step_dir / MANIFEST).read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError):
    return f"its {MANIFEST} is unreadable"
  return integrity.check(step_dir, recorded)


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
    self.name = str(self.meta.get("stage", self.directory.name))
    # Several processes: synchronous saves. The two managers' asynchronous
    # commits each end in a cross-process barrier from a background thread,
    # and those can interleave differently on each process (a barrier then
    # waits for one the other process never enters).
    self._async = jax.process_count() == 1
    opts = dict(create=True, cleanup_tmp_directories=True,
                enable_async_checkpointing=self._async)
    self._steps = ocp.CheckpointManager(
        self.directory / "steps",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts))
    self._best = ocp.CheckpointManager(
        self.directory / "best",
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **opts))
    # Saved but not sealed yet: (manager, step).
    self._unsealed: list[tuple[Any, int]] = []
    # Set by ``restore_latest`` when the best checkpoint was damaged and
    # moved aside: the loop then selects a best one again.
    self.best_lost = False

  def latest_step(self) -> int | None:
    """Step of the newest complete periodic checkpoint, or None."""
    return self._steps.latest_step()

  def best_step(self) -> int | None:
    """Step of the best checkpoint, or None."""
    return self._best.latest_step()

  def _save(self, mgr, step: int, state: TrainState, progress: dict[str, Any]):
    # The previous save of this manager ends first: its failure is reported
    # with its own step, and it is sealed before orbax may delete older ones.
    self._settle(mgr)
    try:
      mgr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_to_tree(state)),
          progress=ocp.args.JsonSave(progress)), force=True)
    except Exception as e:  # Orbax raises many types; all mean "not saved".
      raise self._save_failed(mgr, step, e) from e
    self._unsealed.append((mgr, step))
    if not self._async:
      self._settle(mgr)

  def _save_failed(self, mgr, step: int, error: BaseException
                   ) -> CheckpointError:
    return CheckpointError(
        f"{self.name}: checkpoint step {step} could not be saved in "
        f"{mgr.directory} ({_quote(error)}); the checkpoints before it are "
        "kept, and the next run resumes from the newest of them")

  def _settle(self, mgr) -> None:
    """Waits for ``mgr``'s pending save; raises its failure; seals it."""
    pending = [s for m, s in self._unsealed if m is mgr]
    self._unsealed = [(m, s) for m, s in self._unsealed if m is not mgr]
    if not pending:
      return
    try:
      mgr.wait_until_finished()
    except Exception as e:  # The background save's own exception.
      raise self._save_failed(mgr, pending[-1], e) from e
    if not mesh_lib.is_primary():
      return
    for step in pending:
      step_dir = pathlib.Path(mgr.directory) / str(step)
      if step_dir.is_dir():  # Not yet rotated out by ``max_to_keep``.
        try:
          seal(step_dir)
        except OSError as e:
          raise self._save_failed(mgr, step, e) from e

  def poll(self) -> None:
    """Ends finished background saves: raises a failed one, seals the rest.

    Cheap; the loop calls it after every step, so that a failed save stops
    the run at once and a committed checkpoint is sealed soon after.
    """
    for mgr in (self._steps, self._best):
      if (any(m is mgr for m, _ in self._unsealed)
          and not mgr.is_saving_in_progress()):
        self._settle(mgr)

  def save(self, step: int, state: TrainState,
           progress: dict[str, Any]) -> None:
    """Saves a periodic checkpoint (asynchronously; see ``wait``).

    Args:
      step: the state's step.
      state: the train state.
      progress: JSON-serialisable loop bookkeeping (data iterator state, best
        accuracy, ...).

    Raises:
      CheckpointError: this or the previous periodic save failed.
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
          f"({type(e).__name__}: {_quote(e)}); it is from another model or "
          f"version of the code; move {self.directory} away to start over"
      ) from e
    return _from_tree(out.state, like), dict(out.progress)

  def _set_aside(self, mgr, step: int, problem: str) -> None:
    """Moves a damaged checkpoint to ``damaged/`` and says so (process 0)."""
    mesh_lib.sync(f"checkpoint-damaged:{mgr.directory}/{step}")
    if mesh_lib.is_primary():
      source = pathlib.Path(mgr.directory) / str(step)
      target = self.directory / DAMAGED_DIR / f"{source.parent.name}-{step}"
      n = 1
      while target.exists():
        n += 1
        target = target.with_name(f"{source.parent.name}-{step}.{n}")
      target.parent.mkdir(parents=True, exist_ok=True)
      os.replace(source, target)
      print(f"{self.name}: checkpoint {source.parent.name}/{step} is damaged "
            f"({problem}); moved to {target}, falling back to an older "
            "checkpoint", flush=True)
    mesh_lib.sync(f"checkpoint-set-aside:{mgr.directory}/{step}")
    mgr.reload()

  def restore_latest(self, like: TrainState
                     ) -> tuple[TrainState, dict[str, Any]] | None:
    """The newest intact checkpoint restored onto ``like``'s structure and
    shardings, as ``(state, progress)``; None when there is none.

    Candidates are the periodic checkpoints and the best one, newest first.
    A damaged candidate (its files differ from its manifest, or, not sealed
    yet, orbax cannot read it) is moved aside with one line and the next
    one is tried.

    Raises:
      CheckpointError: an intact, sealed checkpoint that does not restore
        onto ``like`` (another model or code version).
    """
    best = self._best.latest_step()
    if best is not None:
      problem = damage(pathlib.Path(self._best.directory) / str(best))
      if problem is not None:
        self._set_aside(self._best, best, problem)
        self.best_lost = True
    # Newest first; at the same step the periodic checkpoint first.
    candidates = sorted(
        [(s, 1, self._steps) for s in self._steps.all_steps()]
        + [(s, 0, self._best) for s in self._best.all_steps()],
        key=lambda c: (c[0], c[1]), reverse=True)
    for step, _, mgr in candidates:
      step_dir = pathlib.Path(mgr.directory) / str(step)
      problem = damage(step_dir)
      if problem is None:
        try:
          return self._restore(mgr, step, like)
        except CheckpointError as e:
          if is_sealed(step_dir):
            raise
          problem = f"orbax cannot read it: {_quote(e.__cause__ or e)}"
      self._set_aside(mgr, step, problem)
      if mgr is self._best:
        self.best_lost = True
    return None

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk and sealed.

    Raises:
      CheckpointError: a pending save failed (naming its step).
    """
    for mgr in (self._steps, self._best):
      self._settle(mgr)

  def close(self) -> None:
    """Waits for pending saves (``wait``) and releases the managers."""
    try:
      self.wait()
    finally:
      for mgr in (self._steps, self._best):
        try:
          mgr.close()
        except Exception:  # pylint: disable=broad-except
          pass  # A failed save was raised by ``wait`` (or is being handled).

  def abandon(self) -> None:
    """Releases the managers after a failure, raising nothing: the failure
    being reported wins over a save that failed because of it."""
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass
