"""Watching a run: metrics.jsonl, report.json and its one-screen summary.

``MetricsWriter`` appends one JSON object per record to
``workdir/metrics.jsonl`` (``{"stage", "step", "split", ...metrics}``);
``python -m training.plot WORKDIR`` draws it (``training/plot.py``).

``Report`` collects the run summary written to ``workdir/report.json``:
``method``, ``model``, ``dataset``, ``stages`` (per stage: ``seconds``,
``steps``, ``final`` and ``best`` evaluation), ``params``/``macs`` of the
model, and whatever a method pipeline adds with ``report.merge({...})``
(a recursive dict merge: nested dicts merge, other values replace), e.g.
``report.merge({"pruning": {"p_flops": 63.6, "p_params": 49.0}})``.
Paths in ``report.json`` (exported files, plots) are relative to the
workdir, so that a copied or moved workdir stays self-consistent.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import textwrap
import time
from typing import Any, Mapping, Sequence

import jax

from training import integrity
from training import progress as progress_lib


def _scalar(v: Any) -> Any:
  """A JSON-friendly value (json ``default=``: never returns ``v`` itself)."""
  if hasattr(v, "item") and getattr(v, "size", 1) == 1:
    return v.item()
  if hasattr(v, "tolist"):
    return v.tolist()
  if isinstance(v, (tuple, set)):
    return list(v)
  return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def relative_paths(value: Any, root: str | os.PathLike) -> Any:
  """``value`` with every string naming an existing file or directory inside
  ``root`` written relative to ``root`` (POSIX separators).

  Args:
    value: a JSON-like value (dicts and lists are walked).
    root: the directory paths are made relative to.

  Returns:
    The rewritten value (strings outside ``root``, or naming nothing that
    exists, are kept as they are).
  """
  base = pathlib.Path(root).resolve()

  def fix(v: Any) -> Any:
    if isinstance(v, Mapping):
      return {k: fix(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [fix(x) for x in v]
    if isinstance(v, str) and "/" in v:
      try:
        path = pathlib.Path(v).resolve()
        if path.exists():
          return path.relative_to(base).as_posix()
      except (OSError, ValueError):  # Outside root, or not a path.
        pass
    return v

  return fix(value)


# TensorBoard event files of a run (beside metrics.jsonl), when tensorboardX
# is installed (the optional ``tensorboard`` extra).
TENSORBOARD_DIR = "tensorboard"
_tensorboard_note_shown = False


def _tensorboard_writer(workdir: pathlib.Path) -> Any:
  """A tensorboardX ``SummaryWriter`` into ``workdir/tensorboard``, or None
  (tensorboardX not installed: said once per process)."""
  global _tensorboard_note_shown
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    if not _tensorboard_note_shown:
      _tensorboard_note_shown = True
      print("note: no TensorBoard event files (tensorboardX is not "
            "installed: pip install -e '.[tensorboard]'); metrics.jsonl has "
            "every metric")
    return None
  return SummaryWriter(str(workdir / TENSORBOARD_DIR))


class MetricsWriter:
  """Appends metrics to ``workdir/metrics.jsonl`` (process 0 only), and to
  TensorBoard event files in ``workdir/tensorboard/`` when tensorboardX is
  installed (tags ``stage/split/metric``).

  Args:
    workdir: the run directory.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self._tensorboard = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._tensorboard = _tensorboard_writer(self.path.parent)

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
    integrity.atomic_write(self.path, "".join(line + "\n" for line in kept))

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
    try:
      with self.path.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    except OSError as e:  # A full disk: say which file (write() does not).
      raise OSError(e.errno, e.strerror, str(self.path)) from None
    if self._tensorboard is not None:
      for k, v in rec.items():
        if k not in ("stage", "step", "split", "time") and isinstance(
            v, (int, float)) and not isinstance(v, bool):
          self._tensorboard.add_scalar(f"{stage}/{split}/{k}", v, int(step))

  def close(self) -> None:
    """Flushes the TensorBoard events (metrics.jsonl is appended and closed
    at every record)."""
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def _merge(dst: dict[str, Any], src: Mapping[str, Any]) -> dict[str, Any]:
  for k, v in src.items():
    if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
      _merge(dst[k], v)
    else:
      dst[k] = json.loads(json.dumps(v, default=_scalar))
  return dst


# Entries the summary shows in its own format (or not at all).
_SUMMARY_SKIP = ("method", "model", "dataset", "params", "macs", "stages",
                 "config", "workdir", "dsp_pflops", "dsp_pparams",
                 "macs_dense", "params_dense", "pflops_whole_model",
                 "pparams_whole_model", "export", "exported", "preprocess",
                 "plots")
# Widest summary line.
WIDTH = 120


def wrap(text: str, indent: str = "  ") -> list[str]:
  """``text`` as lines of at most ``WIDTH`` characters (breaking at spaces).

  Args:
    text: one logical line.
    indent: prefix of the continuation lines.

  Returns:
    The lines.
  """
  return textwrap.wrap(text, WIDTH, subsequent_indent=indent,
                       break_on_hyphens=False) or [""]


def _pct(a: Any) -> str:
  """A 0..1 accuracy as a percentage, ``-`` when missing."""
  if a is None or (isinstance(a, float) and math.isnan(a)):
    return "-"
  return f"{100 * a:.2f} %"


def _millions(n: Any) -> str:
  return f"{n / 1e6:.2f} M" if isinstance(n, (int, float)) else "-"


def _plain(value: Any) -> str | None:
  """A short text of a scalar or a flat dict/list of scalars, else None."""
  scalar = (int, float, str, bool, type(None))
  if isinstance(value, float):
    return f"{value:.6g}"
  if isinstance(value, scalar):
    return str(value)
  if isinstance(value, Mapping) and all(isinstance(v, scalar)
                                        for v in value.values()):
    return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
  if isinstance(value, list) and len(value) <= 8 and all(
      isinstance(v, scalar) for v in value):
    return ", ".join(_plain(v) for v in value)
  return None


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
    # Written by earlier versions; the report's own directory is the workdir.
    self.data.pop("workdir", None)
    self.merge(fields)

  def merge(self, extra: Mapping[str, Any]) -> None:
    """Recursively merges ``extra`` into the report (dicts merge, other
    values replace)."""
    _merge(self.data, extra)

  def add_stage(self, name: str, result: Mapping[str, Any]) -> None:
    """Records one stage's ``seconds``, ``steps``, ``final``, ``best``."""
    self.merge({"stages": {name: dict(result)}})

  def save(self) -> None:
    """Writes report.json atomically (process 0 only), paths relative to
    the workdir (the config keeps the values it was given)."""
    if jax.process_index() != 0:
      return
    self.data = {k: v if k == "config" else relative_paths(v, self.path.parent)
                 for k, v in self.data.items()}
    integrity.atomic_write(self.path,
                           json.dumps(self.data, indent=1, default=_scalar))

  def summary(self, method_lines: Sequence[str] = (),
              shown: Sequence[str] = ()) -> str:
    """The run on one screen (no line longer than ``WIDTH``).

    Stages (steps, time, final and best accuracy), the model's size, the
    method's own lines, which model was exported and why, the exported files
    and how to feed them.

    Args:
      method_lines: the method's figures (pruning measures, structure).
      shown: report entries those lines cover (not repeated).

    Returns:
      The text.
    """
    d = self.data
    workdir = self.path.parent
    lines = wrap(f"{d.get('method', '?')} | {d.get('model', '?')} on "
                 f"{d.get('dataset', '?')} | {workdir}")
    stages = d.get("stages", {})
    if stages:
      width = max(12, *(len(n) + 2 for n in stages))
      select = next((s.get("select_on") for s in stages.values()
                     if s.get("select_on")), "test")
      lines.append(f"{'stage':<{width}}{'steps':>7}{'time':>10}"
                   f"{'final acc':>12}{'best acc':>16}  (test accuracy; "
                   f"best by {select}, at step)")
      for name, st in stages.items():
        best = _pct(_test_accuracy(st.get("best")))
        if st.get("best_step") is not None and best != "-":
          best += f" ({st['best_step']})"
        lines.append(f"{name:<{width}}{st.get('steps', 0):>7}"
                     f"{progress_lib.clock(st.get('seconds', 0.0)):>10}"
                     f"{_pct(_test_accuracy(st.get('final'))):>12}"
                     f"{best:>16}")
    if isinstance(d.get("params"), (int, float)):
      size = f"model: params {d['params']:,}"
      if isinstance(d.get("params_dense"), (int, float)):
        size += f" of {d['params_dense']:,}"
      if isinstance(d.get("macs"), (int, float)):
        size += f" | MACs {_millions(d['macs'])}"
        if isinstance(d.get("macs_dense"), (int, float)):
          size += f" of {_millions(d['macs_dense'])}"
      lines += wrap(size)
    if d.get("dsp_pflops") or d.get("pflops_whole_model"):
      lines += wrap(
          f"pruned: P.FLOPS {d.get('dsp_pflops', 0.0):.2f} % / P.PARAMS "
          f"{d.get('dsp_pparams', 0.0):.2f} % (DSP measure: taking-part "
          f"layers); {d.get('pflops_whole_model', 0.0):.2f} % of MACs / "
          f"{d.get('pparams_whole_model', 0.0):.2f} % of params (whole model)")
    for line in method_lines:
      lines += wrap(line)
    for k, v in d.items():
      if k in _SUMMARY_SKIP or k in shown:
        continue
      text = _plain(v)
      lines += wrap(f"{k}: {text if text is not None else '(report.json)'}")
    lines += self._export_lines()
    lines.append(f"details: {self.path}")
    return "\n".join(lines)

  def _export_lines(self) -> list[str]:
    """Which model was exported and why, the files, the input they take."""
    d, lines = self.data, []
    exported = d.get("exported")
    if exported:
      lines += wrap(f"exported model: {exported.get('what', '?')} — "
                    f"{exported.get('why', '')}".rstrip(" —"))
    export = d.get("export") or {}
    files = export.get("files") or {}
    if files:
      # Relative paths are relative to the workdir (report.json's folder).
      paths = [self.path.parent / p for p in files.values()]
      parent = paths[0].parent
      names = (" ".join(p.name for p in paths)
               if all(p.parent == parent for p in paths)
               else " ".join(map(str, paths)))
      diff = export.get("max_abs_diff")
      if isinstance(diff, Mapping) and diff:
        diff = max(diff.values())
      tail = (f" (max |logits diff| vs JAX {diff:.2g})"
              if isinstance(diff, (int, float)) else "")
      lines += wrap(f"export: {parent}/ {names}{tail}")
    pre = d.get("preprocess")
    if pre:
      lines += wrap(f"input: {pre.get('summary', '')}")
    plots = d.get("plots")
    if plots:
      lines += wrap("plots: " + " ".join(pathlib.Path(p).name
                                         for p in plots.values()))
    return lines
