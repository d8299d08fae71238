"""Plots of a run: ``python -m training.plot WORKDIR``.

Writes PNGs into ``WORKDIR/plots/`` (run automatically at the end of a run;
``report.json``'s ``plots`` names them):

* ``curves.png``: per stage, training loss, training and evaluation
  accuracy, and the learning rate over the stage's steps (from
  ``metrics.jsonl``);
* ``structure.png``: per pruned layer, kept filters x kept inputs against
  the dense layer (DSP: per group; DDROP: kept units), when the report has a
  pruned structure;
* ``pflops.png`` (DSP): P.FLOPS and test accuracy of every fine-tuning
  cycle's prune, against the target rate.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any, Mapping, Sequence

DIR = "plots"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # Files only: no display needed.
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  return pyplot


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` (lines cut short are skipped)."""
  out = []
  for line in pathlib.Path(path).read_text().splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      continue
  return out


def _series(records: Sequence[Mapping[str, Any]], stage: str, split: str,
            key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
  pts = [(r["step"], r[key]) for r in records
         if r.get("stage") == stage and r.get("split") == split
         and isinstance(r.get(key), (int, float))]
  return [p[0] for p in pts], [scale * p[1] for p in pts]


def run_title(workdir: str | os.PathLike, report: Mapping[str, Any]) -> str:
  """``run NAME: METHOD, MODEL on DATASET`` (what the report names)."""
  what = ", ".join(str(report[k]) for k in ("method", "model")
                   if report.get(k))
  if report.get("dataset"):
    what += f" on {report['dataset']}"
  name = pathlib.Path(workdir).resolve().name
  return f"run {name}" + (f": {what}" if what else "")


def plot_curves(records: Sequence[Mapping[str, Any]],
                path: str | os.PathLike, title: str | None = None
                ) -> pathlib.Path:
  """Loss, accuracy (%) and lr per stage (one column per stage).

  Args:
    records: ``metrics.jsonl`` records.
    path: the PNG to write.
    title: the figure's title (the run's name).

  Returns:
    ``path``.
  """
  plt = _pyplot()
  stages = list(dict.fromkeys(r["stage"] for r in records if "stage" in r))
  splits = sorted({r["split"] for r in records if r.get("split") != "train"})
  fig, axes = plt.subplots(3, max(len(stages), 1), squeeze=False,
                           figsize=(3.2 * max(len(stages), 1), 7.5))
  for col, stage in enumerate(stages):
    ax_loss, ax_acc, ax_lr = axes[:, col]
    ax_loss.set_title(stage, fontsize=9)
    ax_loss.plot(*_series(records, stage, "train", "loss"), label="train")
    ax_acc.plot(*_series(records, stage, "train", "accuracy", 100),
                label="train")
    for split in splits:
      ax_loss.plot(*_series(records, stage, split, "loss"), "o-", ms=3,
                   label=split)
      ax_acc.plot(*_series(records, stage, split, "accuracy", 100), "o-",
                  ms=3, label=split)
    ax_lr.plot(*_series(records, stage, "train", "lr"))
    ax_lr.set_xlabel("step")
    if col == 0:
      ax_loss.set_ylabel("loss")
      ax_acc.set_ylabel("accuracy (%)")
      ax_lr.set_ylabel("lr")
      ax_acc.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return pathlib.Path(path)


def structure_rows(report: Mapping[str, Any]
                   ) -> list[tuple[str, list[tuple[int, int]], int | None]]:
  """``(layer, [(filters, inputs) per group or unit set], dense)`` rows.

  DSP reports have ``structure`` (per group: kept filters x kept inputs);
  DDROP reports ``pruned_units`` (layer -> [pruned, units]), drawn as one
  group of kept units.
  """
  if report.get("structure"):
    return [(r["layer"], [tuple(g) for g in r["groups"]], None)
            for r in report["structure"]]
  units = report.get("pruned_units") or {}
  return [(name, [(n - p, 1)], n) for name, (p, n) in units.items()]


def plot_structure(report: Mapping[str, Any], path: str | os.PathLike,
                   title: str | None = None) -> pathlib.Path | None:
  """Kept filters x kept inputs per layer and group (None: nothing pruned).

  Args:
    report: the report dict.
    path: the PNG to write.
    title: the figure's title (the run's name).

  Returns:
    ``path``, or None when the report has no pruned structure.
  """
  rows = structure_rows(report)
  if not rows:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.5))
  names = [r[0] for r in rows]
  ddrop = rows[0][2] is not None
  for y, (_, groups, dense) in enumerate(rows):
    left = 0
    for g, (filters, inputs) in enumerate(groups):
      size = filters * inputs
      ax.barh(y, size, left=left, color=f"C{g % 10}", edgecolor="white")
      left += size
    if dense is not None:
      ax.barh(y, dense, fill=False, edgecolor="grey")
  ax.set_yticks(range(len(rows)), names, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("kept units (outline: dense)" if ddrop else
                "kept filters x kept inputs, one colour per group")
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return pathlib.Path(path)


def plot_pflops(report: Mapping[str, Any], path: str | os.PathLike,
                title: str | None = None) -> pathlib.Path | None:
  """DSP: P.FLOPS and accuracy per fine-tuning cycle (None: not DSP)."""
  cycles = report.get("cycles")
  if not cycles:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.2))
  xs = [c["cycle"] for c in cycles]
  ax.plot(xs, [c["pflops_reference"] for c in cycles], "o-", label="P.FLOPS")
  rate = (report.get("config") or {}).get("dsp", {}).get("prune_rate")
  if rate is not None:
    ax.axhline(100 * rate, ls="--", color="grey", label="target")
  ax.set_xlabel("fine-tuning cycle")
  ax.set_ylabel("P.FLOPS (%)")
  acc = ax.twinx()
  acc.plot(xs, [100 * c["best"] for c in cycles], "s-", color="C1",
           label="best accuracy")
  acc.set_ylabel("best accuracy (%)")
  ax.legend(loc="lower left", fontsize=7)
  acc.legend(loc="lower right", fontsize=7)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return pathlib.Path(path)


def plot_run(workdir: str | os.PathLike) -> dict[str, str]:
  """Writes every plot of a run directory.

  Args:
    workdir: the run directory (``metrics.jsonl``, ``report.json``).

  Returns:
    ``{name: path}`` of the written PNGs.

  Raises:
    FileNotFoundError: neither file exists.
  """
  workdir = pathlib.Path(workdir)
  metrics, report_path = workdir / "metrics.jsonl", workdir / "report.json"
  if not metrics.is_file() and not report_path.is_file():
    raise FileNotFoundError(f"{workdir}: no metrics.jsonl or report.json "
                            "(expected a run directory)")
  report = (json.loads(report_path.read_text()) if report_path.is_file()
            else {})
  out = workdir / DIR
  out.mkdir(parents=True, exist_ok=True)
  written = {}
  title = run_title(workdir, report)
  if metrics.is_file():
    written["curves"] = plot_curves(read_metrics(metrics), out / "curves.png",
                                    title)
  for name, fn in (("structure", plot_structure), ("pflops", plot_pflops)):
    p = fn(report, out / f"{name}.png", title)
    if p is not None:
      written[name] = p
  return {k: str(v) for k, v in written.items()}


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m training.plot WORKDIR``; returns the exit status."""
  from training import errors  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else list(argv)
  if len(argv) != 1 or argv[0].startswith("-"):
    print("usage: python -m training.plot WORKDIR", file=sys.stderr)
    return 2

  def work():
    for path in plot_run(argv[0]).values():
      print(f"wrote {path}")

  return errors.call(work)


if __name__ == "__main__":
  from training import errors  # pylint: disable=g-import-not-at-top
  sys.exit(errors.quiet_pipe(main))
