"""The run directory as a whole: one run at a time, its log, its stages.

* ``hold``: a run holds an exclusive ``flock`` on ``WORKDIR/.lock`` (process
  0 of a multi-process job), so a second run on the same directory stops at
  once, naming the first one's pid. The kernel drops the lock when the
  holder ends, however it ends (``kill -9`` too): a lock is never stale.
* Library messages (orbax, TensorStore, asyncio and absl logging, exceptions
  of background threads) go to ``WORKDIR/log.txt`` while the run holds the
  directory, not to the terminal: a failing checkpoint write shows as one
  ``error:`` line, and its details are in the log.
* ``later_results``: which stages after a given one already left results in
  the directory (a stage that would train again would make them stale).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pathlib
import re
import socket
import sys
import threading
import time
from typing import Any, Iterator, Sequence

from training import checkpoint as ckpt_lib

LOCK_FILE = ".lock"
LOG_FILE = "log.txt"
# The export of the ``pack`` stage and the file that vouches for it
# (``convert.stamp``).
EXPORT_DIR = "export"
EXPORT_STAMP = "source.json"


class WorkdirInUse(BlockingIOError):
  """Another run holds the workdir."""


def _holder(fd: int) -> str:
  """What the lock file says about its holder."""
  try:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
  except OSError:
    text = ""
  return text or "pid unknown"


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds ``workdir`` for this process (exclusive, non-blocking).

  Args:
    workdir: the run directory (created when missing).

  Yields:
    Nothing; the lock is released on exit (or by the kernel when the
    process dies).

  Raises:
    WorkdirInUse: another process holds it (its pid named).
    OSError: the directory cannot be created or written.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirInUse(
          f"{workdir} is in use by another run ({_holder(fd)}); wait for it "
          "to finish or stop it, or use another workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # Releases the lock; the file stays (no unlink race).


class _QuietFileHandler(logging.FileHandler):
  """A log file that never reports its own failures (on a full disk the
  run's one error line says what went wrong)."""

  def handleError(self, record: logging.LogRecord) -> None:
    del record

  def close(self) -> None:
    try:
      super().close()
    except OSError:  # Flushing onto a full disk.
      pass


@contextlib.contextmanager
def library_log(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Sends logging records and background-thread exceptions to ``path``.

  The root logger's handlers (absl's terminal handler among them) are
  replaced for the block and restored after it, as are
  ``threading.excepthook`` and ``sys.unraisablehook`` (TensorStore's native
  threads report a failed write's late callbacks through the latter).

  Args:
    path: the log file (appended to; created on the first record).

  Yields:
    The path.
  """
  path = pathlib.Path(path)
  handler = _QuietFileHandler(path, delay=True)
  handler.setFormatter(logging.Formatter(
      "%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s"))
  root = logging.getLogger()
  saved = root.handlers[:], threading.excepthook, sys.unraisablehook
  log = logging.getLogger(__name__)

  def thread_hook(args: Any) -> None:
    log.error("exception in thread %s", getattr(args.thread, "name", "?"),
              exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

  def unraisable_hook(args: Any) -> None:
    log.error("exception ignored in %r", args.object,
              exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

  root.handlers = [handler]
  threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook
  try:
    yield path
  finally:
    root.handlers, threading.excepthook, sys.unraisablehook = saved
    handler.close()


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, process: int = 0) -> Iterator[None]:
  """A run's hold on its directory: the lock (on process 0) and the library
  log (``log.txt``; ``log.<process>.txt`` on the other processes).

  Args:
    workdir: the run directory.
    process: this process's index in the job (only process 0 locks).

  Yields:
    Nothing.

  Raises:
    WorkdirInUse: another run holds the directory.
  """
  workdir = pathlib.Path(workdir)
  with contextlib.ExitStack() as stack:
    if process == 0:
      stack.enter_context(lock(workdir))
    else:
      workdir.mkdir(parents=True, exist_ok=True)
    name = LOG_FILE if process == 0 else f"log.{process}.txt"
    stack.enter_context(library_log(workdir / name))
    yield


def _natural(text: str) -> tuple[Any, ...]:
  """Sort key that puts ``cycle_2`` before ``cycle_10``."""
  return tuple(int(t) if t.isdigit() else t
               for t in re.split(r"(\d+)", text))


def _has_results(workdir: pathlib.Path, stage: str) -> bool:
  """Whether ``stage`` left checkpoints (or, ``pack``, an export)."""
  if stage == "pack":
    return (workdir / EXPORT_DIR / EXPORT_STAMP).is_file()
  return (workdir / stage / ckpt_lib.META_FILE).is_file()


def later_results(workdir: str | os.PathLike, order: Sequence[str],
                  stage: str) -> list[str]:
  """Stages after ``stage`` whose results are already in ``workdir``.

  Args:
    workdir: the run directory.
    order: the method's stages in order (``config.STAGES[method]``).
    stage: a stage name, possibly a sub-stage ``top/part`` (e.g.
      ``prune_finetune/cycle_2``: the cycles after it count as later).

  Returns:
    Their names (sub-stages as ``top/part``), in order; empty when ``stage``
    is not one of ``order``.
  """
  workdir = pathlib.Path(workdir)
  top, _, part = stage.partition("/")
  if top not in order:
    return []
  found = []
  if part and (workdir / top).is_dir():
    found += [f"{top}/{p.name}" for p in sorted(
        (workdir / top).iterdir(), key=lambda p: _natural(p.name))
              if _natural(p.name) > _natural(part)
              and _has_results(workdir / top, p.name)]
  for later in order[order.index(top) + 1:]:
    if _has_results(workdir, later) or any(
        (workdir / later).glob(f"*/{ckpt_lib.META_FILE}")):
      found.append(later)
  return found
