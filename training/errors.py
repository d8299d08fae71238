"""Ordinary user mistakes at the command line: one line, no traceback.

Every user-facing entry point (``run.py``, ``python -m ddrop_jax``,
``python -m convert``) runs its work inside ``reported(...)``: a missing
file, unreadable data, a wrong file kind or an invalid value ends the
program with ``error: <message>`` on stderr and a non-zero exit status, and
an output directory the failed command created is removed again. Anything
else (a bug) keeps its traceback. Ctrl-C prints ``interrupted`` and exits
with status 130. Importing this module imports nothing heavy, so it can wrap
the imports of JAX itself.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

# Exceptions that mean "the input is wrong", not "the code is wrong".
USER_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, ImportError, EOFError)
# Exit status of a user error (argparse uses 2 for usage errors).
EXIT_STATUS = 1
# Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED_STATUS = 130


def message(error: BaseException) -> str:
  """The one-line text of ``error`` (a KeyError without its quotes).

  Args:
    error: the exception.

  Returns:
    Its message on one line (continuation lines indented after ``; ``).
  """
  if isinstance(error, KeyError) and len(error.args) == 1:
    text = str(error.args[0])
  elif isinstance(error, OSError) and error.filename and error.strerror:
    text = f"{error.strerror}: {error.filename}"
  else:
    text = str(error) or type(error).__name__
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return "; ".join(lines)


def _remove_if_new(path: pathlib.Path, existed: bool) -> None:
  """Removes ``path`` when this command created it and it holds no
  checkpoint (a run that trained keeps what it trained)."""
  if existed or not path.is_dir():
    return
  if any(path.rglob("meta.json")):
    return
  shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def reported(outputs: Sequence[str | os.PathLike] = (),
             extra: tuple[type[BaseException], ...] = (),
             status: int = EXIT_STATUS) -> Iterator[None]:
  """Turns user errors raised in the block into ``error: ...`` and an exit.

  Args:
    outputs: directories the block may create; those that did not exist
      before are removed again when the block fails with a user error.
    extra: further exception classes to report this way (e.g. a training
      divergence).
    status: the exit status.

  Yields:
    Nothing.

  Raises:
    SystemExit: with ``status`` after printing the message. Ctrl-C
      (KeyboardInterrupt) prints ``interrupted`` and ends the process with
      status 130 once the block has unwound.
  """
  paths = [pathlib.Path(p).expanduser() for p in outputs if p]
  existed = [p.exists() for p in paths]
  try:
    yield
  except USER_ERRORS + tuple(extra) as e:
    for p, ex in zip(paths, existed):
      _remove_if_new(p, ex)
    print(f"error: {message(e)}", file=sys.stderr, flush=True)
    raise SystemExit(status) from None
  except KeyboardInterrupt:
    # The work has unwound (checkpoints closed, locks released); the
    # interpreter's own shutdown is skipped: native threads still compiling
    # or writing can crash it (SIGSEGV) after a Ctrl-C.
    _exit_interrupted()


def _exit_interrupted() -> None:
  """Prints ``interrupted`` and ends the process with status 130 at once."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError, RuntimeError):
      pass
  os.write(2, b"interrupted\n")
  os._exit(INTERRUPTED_STATUS)  # pylint: disable=protected-access


@contextlib.contextmanager
def exit_on_interrupt() -> Iterator[None]:
  """Ctrl-C (SIGINT) inside the block ends the process at once.

  For work that only writes files atomically (exports): a KeyboardInterrupt
  unwinding through torch's tracing and serialisers leaves native state that
  crashes the interpreter's shutdown (SIGSEGV), and one raised inside a
  garbage-collector callback is swallowed. Here SIGINT prints
  ``interrupted`` and exits with status 130 without unwinding; the files
  written so far are complete, and what was being written is a temporary
  file.

  Yields:
    Nothing. Outside the main thread the block runs unchanged.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def stop(signum: int, frame: Any) -> None:
    del signum, frame
    _exit_interrupted()

  previous = signal.signal(signal.SIGINT, stop)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)


def call(fn: Callable[[], Any], outputs: Sequence[str | os.PathLike] = (),
         extra: tuple[type[BaseException], ...] = (),
         status: int = EXIT_STATUS) -> int:
  """Runs ``fn()`` inside ``reported``; returns the exit status.

  Args:
    fn: the work.
    outputs: as in ``reported``.
    extra: as in ``reported``.
    status: the status of a user error.

  Returns:
    0, or ``status`` after the one-line message.
  """
  try:
    with reported(outputs, extra, status):
      fn()
  except SystemExit as e:
    return int(e.code or 0)
  return 0


def quiet_pipe(fn: Callable[..., Any], *args: Any) -> int:
  """Runs ``fn(*args)``; a reader that stops early ends the program quietly.

  ``python -m training.config | head`` closes the pipe after ten lines; the
  next write (or the interpreter's final flush) would raise
  ``BrokenPipeError`` and print a traceback. Here it ends the program with
  the status a shell gives a process killed by SIGPIPE (141), silently.

  Args:
    fn: an entry point's main function.
    *args: its arguments.

  Returns:
    ``fn``'s exit status (None counts as 0), or 141 after a broken pipe.
  """
  try:
    status = fn(*args)
    sys.stdout.flush()
  except BrokenPipeError:
    # Stdout is gone: point it at /dev/null so that the interpreter's flush
    # at exit does not report the same error again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE
  return int(status or 0)
