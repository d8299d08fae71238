"""Watching a run: metrics.jsonl (+ TensorBoard if available) and report.json.

``MetricsWriter`` appends one JSON object per record to
``workdir/metrics.jsonl`` (``{"stage", "step", "split", ...metrics}``) and,
when ``tensorboardX`` or ``torch.utils.tensorboard`` is importable, mirrors
the scalars into TensorBoard event files under ``workdir/tb``.

``Report`` collects the run summary written to ``workdir/report.json``:
``method``, ``model``, ``dataset``, ``stages`` (per stage: ``seconds``,
``steps``, ``final`` and ``best`` evaluation), ``params``/``macs`` of the
model, and whatever a method pipeline adds with ``report.merge({...})``
(a recursive dict merge: nested dicts merge, other values replace), e.g.
``report.merge({"pruning": {"p_flops": 63.6, "p_params": 49.0}})``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any, Mapping

import jax


def _scalar(v: Any) -> Any:
  """A JSON-friendly value (json ``default=``: never returns ``v`` itself)."""
  if hasattr(v, "item") and getattr(v, "size", 1) == 1:
    return v.item()
  if hasattr(v, "tolist"):
    return v.tolist()
  if isinstance(v, (tuple, set)):
    return list(v)
  return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def _tb_writer(logdir: pathlib.Path):
  """A TensorBoard SummaryWriter, or None when no writer library exists."""
  for module in ("tensorboardX", "torch.utils.tensorboard"):
    try:
      mod = __import__(module, fromlist=["SummaryWriter"])
      return mod.SummaryWriter(str(logdir))
    except Exception:  # Not installed, or tensorboard itself is missing.
      continue
  return None


class MetricsWriter:
  """Appends metrics to ``workdir/metrics.jsonl`` (process 0 only).

  Args:
    workdir: the run directory.
    tensorboard: also write TensorBoard events when a writer is available.
  """

  def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        self._tb = _tb_writer(self.path.parent / "tb")

  def truncate(self, stage: str, after_step: int) -> None:
    """Drops records of ``stage`` past ``after_step`` (before a resume, so the
    re-run steps are not logged twice)."""
    if not self.enabled or not self.path.exists():
      return
    kept = []
    for line in self.path.read_text().splitlines():
      try:
        rec = json.loads(line)
      except ValueError:  # A line cut short by a kill.
        continue
      if not (rec.get("stage") == stage and rec.get("step", 0) > after_step):
        kept.append(line)
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, self.path)

  def write(self, stage: str, step: int, split: str,
            metrics: Mapping[str, Any]) -> None:
    """Appends one record.

    Args:
      stage: stage name.
      step: the stage's step.
      split: 'train', 'test', 'validation', ...
      metrics: scalar metrics.
    """
    if not self.enabled:
      return
    rec = {"stage": stage, "step": int(step), "split": split,
           "time": round(time.time(), 3)}
    rec.update({k: _scalar(v) for k, v in metrics.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(rec) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        v = _scalar(v)
        if isinstance(v, (int, float)):
          self._tb.add_scalar(f"{stage}/{split}/{k}", v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _merge(dst: dict[str, Any], src: Mapping[str, Any]) -> dict[str, Any]:
  for k, v in src.items():
    if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
      _merge(dst[k], v)
    else:
      dst[k] = json.loads(json.dumps(v, default=_scalar))
  return dst


# Entries the summary table shows in its own format (or not at all).
_SUMMARY_SKIP = ("method", "model", "dataset", "params", "macs", "stages",
                 "config", "workdir", "dsp_pflops", "dsp_pparams",
                 "macs_dense", "params_dense", "pflops_whole_model",
                 "pparams_whole_model")


def _test_accuracy(evals: Mapping[str, Any] | None) -> float | None:
  """Test accuracy of an evaluation ``{split: metrics}`` (or flat metrics)."""
  if not evals:
    return None
  if "accuracy" in evals:
    return evals["accuracy"]
  split = evals.get("test") or next(iter(evals.values()))
  return split.get("accuracy")


class Report:
  """The run summary (``report.json``).

  Args:
    directory: the run directory.
    **fields: top-level entries (method, model, dataset, ...).
  """

  def __init__(self, directory: str | os.PathLike, **fields: Any):
    self.path = pathlib.Path(directory) / "report.json"
    self.data: dict[str, Any] = {"stages": {}}
    if self.path.exists():  # A resumed run keeps earlier stages' figures.
      try:
        self.data = _merge(self.data, json.loads(self.path.read_text()))
      except ValueError:
        pass
    self.merge(fields)

  def merge(self, extra: Mapping[str, Any]) -> None:
    """Recursively merges ``extra`` into the report (dicts merge, other
    values replace)."""
    _merge(self.data, extra)

  def add_stage(self, name: str, result: Mapping[str, Any]) -> None:
    """Records one stage's ``seconds``, ``steps``, ``final``, ``best``."""
    self.merge({"stages": {name: dict(result)}})

  def save(self) -> None:
    """Writes report.json atomically (process 0 only)."""
    if jax.process_index() != 0:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(self.data, indent=1, default=_scalar))
    os.replace(tmp, self.path)

  def summary(self) -> str:
    """A one-screen table of the report."""
    d = self.data
    lines = [f"{d.get('method', '?')} | {d.get('model', '?')} on "
             f"{d.get('dataset', '?')}"]
    if "params" in d:
      macs = d.get("macs")
      lines.append(f"params {d['params']:,}" + (
          f" | MACs {macs:,}" if isinstance(macs, (int, float)) else ""))
    header = (f"{'stage':<12}{'steps':>8}{'seconds':>10}{'final acc':>11}"
              f"{'best acc':>10}   (test accuracy; best by select_on)")
    lines += [header, "-" * len(header)]
    for name, s in d["stages"].items():
      final = _test_accuracy(s.get("final"))
      best = _test_accuracy(s.get("best"))
      fmt = lambda a: "-" if a is None or (isinstance(a, float) and
                                           math.isnan(a)) else f"{100 * a:.2f}"
      lines.append(f"{name:<12}{s.get('steps', 0):>8}"
                   f"{s.get('seconds', 0.0):>10.1f}{fmt(final):>11}"
                   f"{fmt(best):>10}")
    if d.get("dsp_pflops") or d.get("pflops_whole_model"):
      lines.append(f"pruned FLOPs: {d.get('dsp_pflops', 0.0):.2f}% (DSP "
                   f"measure), {d.get('pflops_whole_model', 0.0):.2f}% (whole "
                   f"model); pruned params: {d.get('dsp_pparams', 0.0):.2f}% / "
                   f"{d.get('pparams_whole_model', 0.0):.2f}%")
    for k, v in d.items():
      if k not in _SUMMARY_SKIP:
        lines.append(f"{k}: {json.dumps(v, default=_scalar)[:200]}")
    return "\n".join(lines)
