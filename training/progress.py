"""What a stage shows while it runs.

On a terminal, one tqdm bar per stage: step, epoch, loss, accuracy, lr,
img/s, the last evaluation and tqdm's ETA, refreshed every step. When stdout
or stderr is not a terminal (CI logs, ``nohup``, a redirect), one plain line
per epoch instead (after a first line naming the steps), never a bar's
carriage returns::

  pretrain epoch 3/20 step 57/380 loss 0.4123 acc 0.872 lr 0.1 \
1234 img/s test 95.00% | 0:45 elapsed, ETA 4:10
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping, TextIO

from tqdm import auto as tqdm


def is_terminal() -> bool:
  """True when both stdout and stderr are terminals (a bar is readable)."""
  return all(getattr(s, "isatty", lambda: False)() for s in
             (sys.stdout, sys.stderr))


def clock(seconds: float) -> str:
  """``h:mm:ss`` / ``m:ss`` of a duration."""
  s = int(round(max(seconds, 0.0)))
  h, s = divmod(s, 3600)
  m, s = divmod(s, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def status_message(name: str, done: int, total: int, directory: Any) -> str:
  """The line a restarted stage prints: finished, or where it resumes."""
  if done >= total:
    return f"{name}: already done ({done} steps in {directory}); skipped"
  return f"{name}: resuming from step {done} of {total} ({directory})"


class Display:
  """The progress of one stage (a bar on a terminal, else epoch lines).

  Args:
    name: the stage name.
    total: the stage's last step.
    initial: steps already done (a resumed stage).
    steps_per_epoch: steps per epoch.
    enabled: False shows nothing (``config.progress_bar``, other processes).
    terminal: draw a bar; default ``is_terminal()``.
    stream: where plain lines go (default stdout).
  """

  def __init__(self, name: str, total: int, initial: int,
               steps_per_epoch: int, *, enabled: bool = True,
               terminal: bool | None = None, stream: TextIO | None = None):
    self.name, self.total, self.spe = name, total, max(steps_per_epoch, 1)
    self.enabled = enabled
    self.terminal = is_terminal() if terminal is None else terminal
    self.stream = stream or sys.stdout
    self.initial, self.done = initial, initial
    self.t0 = time.perf_counter()
    self.img_per_s: float | None = None
    self.evals: str = ""
    self._sums: dict[str, float] = {}
    self._n = 0
    self._lr: float | None = None
    self.bar = None
    if enabled and self.terminal:
      self.bar = tqdm.tqdm(total=total, initial=initial, desc=name,
                           unit="step", dynamic_ncols=True, file=stream)
    elif enabled and initial < total:  # A first line before any compile.
      epochs = -(-total // self.spe)
      print(f"{name}: steps {initial + 1}..{total} ({epochs} epoch"
            f"{'s' if epochs != 1 else ''} of {self.spe} steps)",
            file=self.stream, flush=True)

  def _means(self) -> dict[str, float]:
    return {k: v / max(self._n, 1) for k, v in self._sums.items()}

  def step(self, metrics: Mapping[str, float]) -> None:
    """Records one step's scalar metrics (``loss``, ``accuracy``, ``lr``)."""
    self.done += 1
    for k in ("loss", "accuracy"):
      if k in metrics:
        self._sums[k] = self._sums.get(k, 0.0) + float(metrics[k])
    if "lr" in metrics:
      self._lr = float(metrics["lr"])
    self._n += 1
    if self.bar is not None:
      self.bar.update(1)
      self.bar.set_postfix_str(self._fields(short=True), refresh=False)

  def throughput(self, img_per_s: float) -> None:
    """The images per second of the last logging window."""
    self.img_per_s = img_per_s

  def evaluated(self, evals: Mapping[str, Mapping[str, Any]]) -> None:
    """Shows the accuracy of an evaluation ``{split: metrics}``."""
    self.evals = " ".join(f"{split} {100 * float(m['accuracy']):.2f}%"
                          for split, m in evals.items() if "accuracy" in m)
    if self.bar is not None:
      self.bar.set_postfix_str(self._fields(short=True), refresh=False)

  def _fields(self, short: bool) -> str:
    m = self._means()
    parts = [f"epoch {self.done / self.spe:.1f}"] if short else []
    if "loss" in m:
      parts.append(f"loss {m['loss']:.4f}")
    if "accuracy" in m:
      parts.append(f"acc {m['accuracy']:.3f}")
    if self._lr is not None:
      parts.append(f"lr {self._lr:.3g}")
    if self.img_per_s:
      parts.append(f"{self.img_per_s:.0f} img/s")
    if self.evals:
      parts.append(self.evals)
    return " ".join(parts)

  def epoch_end(self) -> None:
    """Ends an epoch: the plain line (without a bar), running means reset."""
    if self.enabled and self.bar is None:
      elapsed = time.perf_counter() - self.t0
      rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
      eta = (self.total - self.done) / rate if rate > 0 else 0.0
      epochs = -(-self.total // self.spe)
      print(f"{self.name} epoch {-(-self.done // self.spe)}/{epochs} step "
            f"{self.done}/{self.total} {self._fields(short=False)} | "
            f"{clock(elapsed)} elapsed, ETA {clock(eta)}", file=self.stream,
            flush=True)
    self._sums, self._n = {}, 0

  def close(self) -> None:
    """Closes the bar; a last partial epoch still gets its line."""
    if self._n and self.done == self.total:
      self.epoch_end()
    if self.bar is not None:
      self.bar.close()
