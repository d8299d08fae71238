"""The generic stage loop: steps, checkpoints/resume, progress, metrics, NaN.

Every method runs its phases as stages of ``run_stage``, with its own jitted
step function. The contract of ``step_fn``::

  step_fn(state, batch) -> (state, metrics)

* ``state``: a ``TrainState`` (any pytree with an int ``step`` field and a
  ``replace`` method works); the function may donate it.
* ``batch``: ``{'image': uint8 [B,H,W,C], 'label': int32 [B]}`` global arrays
  sharded on the mesh's ``data`` axis (B = global batch size).
* it must return the new state with ``step`` incremented by exactly one, and
  a dict of scalar metrics containing ``loss`` (checked for NaN/Inf every
  step) and, as the engine's steps do, ``training.finite.KEY`` (whether the
  new state is finite; a step without it has its state checked before every
  save instead); other scalars (``accuracy``, ``lr``, ...) are averaged and
  logged. A state that is not finite is never saved, selected as best or
  returned: the stage stops with ``TrainingDiverged``.
* it must be a pure function of (state, batch): the loop's bit-identical
  resume relies on it (derive randomness from ``fold_in(state.rng,
  state.step)``).

``eval_fn(state) -> {split: {'accuracy': float, 'loss': float, ...}}`` is
called every ``config.eval_every_epochs`` epochs and at the end of the stage;
``config.select_on`` names the split whose accuracy picks the best
checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from training import checkpoint as ckpt_lib
from training import config as config_lib
from training import finite
from training import mesh as mesh_lib
from training import progress as progress_lib
from training import workdir as workdir_lib
from training.report import MetricsWriter

EvalFn = Callable[[Any], dict[str, dict[str, float]]]


class TrainingDiverged(RuntimeError):
  """The loss or the train state became NaN or Inf."""


@dataclasses.dataclass
class StageResult:
  """What a stage produced.

  Attributes:
    state: the final state (after the last step).
    steps: steps of the stage taken in total (over restarts).
    seconds: wall-clock training seconds of the stage (over restarts).
    final: the last evaluation (``{split: metrics}``), or None.
    best: the evaluation with the best selection accuracy, or None.
    best_step: the step of ``best``.
  """

  state: Any
  steps: int
  seconds: float
  final: dict[str, Any] | None
  best: dict[str, Any] | None
  best_step: int | None

  def summary(self, select_on: str) -> dict[str, Any]:
    """The stage entry of report.json: ``final`` and ``best`` are
    ``{split: metrics}``; ``best`` is chosen by ``select_on``'s accuracy."""
    return {"steps": self.steps, "seconds": round(self.seconds, 2),
            "select_on": select_on, "final": self.final, "best": self.best,
            "best_step": self.best_step}


def _mean_metrics(sums: dict[str, float], n: int) -> dict[str, float]:
  return {k: v / max(n, 1) for k, v in sums.items()}


def _diverged(name: str, done: int, loss: float | None, state: Any,
              ckpt: ckpt_lib.StageCheckpointer) -> TrainingDiverged:
  """The error of a stage whose loss or state is no longer finite: the step,
  the first bad leaf and the newest checkpoint (every saved one is finite)."""
  bad = finite.first_non_finite(state)
  loss_text = "" if loss is None else f"; loss {loss:.6g}"
  what = (f"the state is not finite (first: {bad}{loss_text})" if bad
          else f"the loss is {loss}")
  try:
    ckpt.wait()  # The newest checkpoint may still be on its way to disk.
  except ckpt_lib.CheckpointError:
    pass
  last = ckpt.latest_step()
  kept = (f"the last checkpoint (step {last}) is finite and kept in "
          f"{ckpt.directory}" if last is not None else
          "no checkpoint was saved before it")
  return TrainingDiverged(
      f"stage {name!r}: {what} at step {done}, which is not saved; "
      f"{kept}; lower the learning rate (or check the data) and restart")


def _selection(evals: Mapping[str, Any], select_on: str) -> float:
  if select_on not in evals:
    raise KeyError(f"select_on={select_on!r} but eval_fn returned splits "
                   f"{sorted(evals)}")
  return float(evals[select_on]["accuracy"])


def run_stage(name: str, state: Any, step_fn: Callable[..., Any], *,
              num_steps: int, train_data: Iterable[Mapping[str, np.ndarray]],
              steps_per_epoch: int, mesh: jax.sharding.Mesh,
              workdir: str | pathlib.Path, config: Mapping[str, Any],
              eval_fn: EvalFn | None = None,
              meta: Mapping[str, Any] | None = None,
              writer: MetricsWriter | None = None,
              config_hash: str | None = None) -> StageResult:
  """Runs (or resumes, or skips when done) one stage of training.

  Args:
    name: stage name; checkpoints go to ``workdir/name``.
    state: the initial state, replicated on ``mesh``; also the template a
      checkpoint is restored onto.
    step_fn: the jitted step (contract in the module docstring).
    num_steps: steps of the stage.
    train_data: iterable of local batches whose iterator has
      ``get_state()``/``set_state()`` (a grain DataLoader), endless or at
      least ``num_steps`` long.
    steps_per_epoch: steps per epoch (for evaluation and epoch display).
    mesh: the ``data`` mesh.
    workdir: the run directory.
    config: the run config (checkpoint_every_steps, keep_checkpoints,
      log_every_steps, eval_every_epochs, select_on, max_steps, progress_bar
      and the fields hashed into the checkpoint identity).
    eval_fn: evaluation, or None.
    meta: extra identity of the checkpoints (e.g. a cycle index).
    writer: metrics writer (default: ``workdir/metrics.jsonl``).
    config_hash: identity of the settings the stage depends on (default:
      ``config_lib.config_hash(config)``, every non-runtime field). A method
      may hash only the sections its stage reads, so that changing a later
      stage's field does not invalidate finished stages.

  Returns:
    The ``StageResult``.

  Raises:
    TrainingDiverged: NaN/Inf loss or state (the last checkpoint, finite, is
      kept).
    CheckpointError: the stage directory holds another run's checkpoints, a
      save failed (e.g. a full disk), or the stage would train although
      later stages of the method already hold results computed from it.
  """
  workdir = pathlib.Path(workdir)
  own_writer = writer is None
  writer = writer or MetricsWriter(workdir)
  identity = {"stage": name, "method": config["method"],
              "model": config["model"], "dataset": config["dataset"],
              "config_hash": config_hash or config_lib.config_hash(config),
              "num_steps": int(num_steps), **dict(meta or {})}
  ckpt = ckpt_lib.StageCheckpointer(workdir / name, identity,
                                    keep=config["keep_checkpoints"])
  iterator = iter(train_data)
  progress: dict[str, Any] = {"first_step": int(state.step), "seconds": 0.0,
                              "best": None, "best_acc": None,
                              "best_step": None, "final": None}
  try:
    restored = ckpt.restore_latest(state)
  except BaseException:
    ckpt.abandon()
    raise
  if restored is not None:
    state, saved = restored
    progress.update(saved)
    if saved.get("data") is not None:
      iterator.set_state(saved["data"].encode())
    writer.truncate(name, int(state.step) - progress["first_step"])
  if ckpt.best_lost:  # Its best checkpoint was damaged: select one again.
    progress.update(best=None, best_acc=None, best_step=None, final=None)
  first = progress["first_step"]
  done = int(state.step) - first
  end = num_steps if not config["max_steps"] else min(num_steps,
                                                      config["max_steps"])
  later = workdir_lib.later_results(
      workdir, config_lib.STAGES.get(config["method"], ()), name)
  if done < end and later:
    ckpt.abandon()
    raise ckpt_lib.CheckpointError(
        f"stage {name!r} would train (from step {done} to {end}), but "
        f"{workdir} already holds the later stage(s) {', '.join(later)}, "
        "computed from its current result; move them away (or use another "
        "workdir) to re-run it")
  if restored is not None and jax.process_index() == 0:
    print(progress_lib.status_message(name, done, end, ckpt.directory),
          flush=True)
  select_on = config["select_on"]
  # Steps that do not report whether their state is finite have it checked
  # before every save (a second, small jitted computation).
  check_state = jax.jit(finite.all_finite)
  state_reported = True

  def guard_save():
    if not state_reported and not float(check_state(state)):
      raise _diverged(name, done, None, state, ckpt)

  def snapshot() -> dict[str, Any]:
    data_state = (iterator.get_state() if hasattr(iterator, "get_state")
                  else None)
    if isinstance(data_state, bytes):
      data_state = data_state.decode()
    return {**progress, "data": data_state}

  def do_eval(step: int):
    evals = eval_fn(state)
    progress["final"] = evals
    for split, metrics in evals.items():
      writer.write(name, step, split, metrics)
    acc = _selection(evals, select_on)
    if progress["best_acc"] is None or acc > progress["best_acc"]:
      guard_save()
      progress.update(best=evals, best_acc=acc, best_step=step)
      ckpt.save_best(first + step, state, snapshot())
    return evals

  bar = progress_lib.Display(
      name, end, done, steps_per_epoch,
      enabled=config["progress_bar"] and jax.process_index() == 0)
  sums: dict[str, float] = {}
  n_logged, t_log, t_start = 0, time.perf_counter(), time.perf_counter()
  seconds0 = progress["seconds"]
  try:
    while done < end:
      batch = mesh_lib.global_batch(next(iterator), mesh)
      state, metrics = step_fn(state, batch)
      done += 1
      # Reading the loss every step blocks on the step: it bounds the queue
      # of dispatched collectives (which can deadlock on few CPU cores) and
      # checks for divergence before anything is saved.
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      state_reported = finite.KEY in metrics
      state_ok = metrics.pop(finite.KEY, 1.0) > 0
      if not (math.isfinite(metrics["loss"]) and state_ok):
        raise _diverged(name, done, metrics["loss"], state, ckpt)
      ckpt.poll()  # A failed background save stops the run here.
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + v
      n_logged += 1
      progress["seconds"] = seconds0 + time.perf_counter() - t_start
      bar.step(metrics)
      if done % config["log_every_steps"] == 0 or done == end:
        now = time.perf_counter()
        mean = _mean_metrics(sums, n_logged)
        mean["img_per_s"] = n_logged * batch["label"].shape[0] / (now - t_log)
        mean["epoch"] = done / steps_per_epoch
        writer.write(name, done, "train", mean)
        bar.throughput(mean["img_per_s"])
        sums, n_logged, t_log = {}, 0, now
      epoch_end = done % steps_per_epoch == 0 and (
          (done // steps_per_epoch) % config["eval_every_epochs"] == 0)
      if eval_fn is not None and (epoch_end or done == end):
        bar.evaluated(do_eval(done))
      if done % steps_per_epoch == 0:
        bar.epoch_end()
      if done % config["checkpoint_every_steps"] == 0 or done == end:
        guard_save()
        ckpt.save(first + done, state, snapshot())
    if eval_fn is not None and progress["final"] is None:
      do_eval(done)  # A resumed, finished stage without an evaluation.
  except BaseException:
    ckpt.abandon()  # The error being raised wins over a save it broke.
    raise
  else:
    ckpt.close()  # Every save is on disk before the stage reports success.
  finally:
    bar.close()
    if own_writer:
      writer.close()
  return StageResult(state=state, steps=done, seconds=progress["seconds"],
                     final=progress["final"], best=progress["best"],
                     best_step=progress["best_step"])
