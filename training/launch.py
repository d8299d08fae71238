"""Local multi-process launcher: rehearse a pod or cluster job on one machine.

    python -m training.launch -n N [--devices-per-process D] -- \\
        run.py --config CONFIG --workdir DIR [--config.FIELD=VALUE ...]

Starts N copies of the command (``python`` followed by the arguments after
``--``) as processes 0..N-1 of one JAX job: each gets
``JAX_COORDINATOR_ADDRESS`` (a free loopback port), ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` and D simulated CPU devices
(``--xla_force_host_platform_device_count``; ``JAX_PLATFORMS=cpu``), which
``training.mesh.initialize_distributed`` turns into one job of N x D devices.
Process 0's output is streamed; the other processes' output is kept in a
temporary file and printed only when that process fails. The launcher
exits with the first failing process's status (0 when all succeed) and
SIGKILLs every process (and its children) as soon as one fails, on Ctrl-C or
after ``--timeout`` seconds: a process that joined a JAX job ignores SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from training import mesh as mesh_lib

# Lines of a failed process's output shown.
_TAIL_LINES = 20
_POLL_SECONDS = 0.1


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], address: str, num_processes: int,
                process_id: int, devices: int) -> dict[str, str]:
  """The environment of process ``process_id`` of a local job.

  Args:
    base: the launcher's environment.
    address: ``host:port`` of the coordinator (process 0).
    num_processes: processes in the job.
    process_id: this process's index.
    devices: simulated CPU devices of the process.

  Returns:
    ``base`` with the JAX job variables, the CPU platform and the device
    count flag (replacing any device count already in ``XLA_FLAGS``).
  """
  flags = [f for f in base.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  return {**base, mesh_lib.ENV_COORDINATOR: address,
          mesh_lib.ENV_NUM_PROCESSES: str(num_processes),
          mesh_lib.ENV_PROCESS_ID: str(process_id), "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": " ".join(flags), "PYTHONUNBUFFERED": "1"}


def _kill_all(procs: Sequence[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)  # The process and its children.
      except ProcessLookupError:
        pass
  for p in procs:
    p.wait()


def _failure_lines(lines: Sequence[str]) -> list[str]:
  """What to show of a failed process's output: its error lines (ours, and
  the runtime's fatal ``F...`` log lines, which precede long stack dumps),
  then its last lines."""
  errors = [l for l in lines if l.startswith("error: ") or (
      l[:1] == "F" and l[1:5].isdigit())]
  return errors[:5] + ["..."] * bool(errors) + list(lines[-_TAIL_LINES:])


def _status(code: int) -> int:
  """A shell-style exit status (128 + signal for a killed process)."""
  return 128 - code if code < 0 else code


def launch(command: Sequence[str], num_processes: int, devices: int = 1,
           timeout: float | None = None, port: int | None = None) -> int:
  """Runs ``python command...`` as a local job of ``num_processes``.

  Args:
    command: arguments after ``python`` (e.g. ``["run.py", "--config",
      ...]``).
    num_processes: processes to start.
    devices: simulated CPU devices per process.
    timeout: seconds after which every process is killed (None: no limit).
    port: coordinator port on 127.0.0.1 (default: a free one).

  Returns:
    0 when every process exits with 0, else the first failure's status (124
    after ``timeout``, 130 on Ctrl-C).
  """
  address = f"127.0.0.1:{port or free_port()}"
  procs: list[subprocess.Popen] = []
  logs = []
  start = time.monotonic()
  try:
    for i in range(num_processes):
      log = None if i == 0 else tempfile.TemporaryFile(mode="w+")
      logs.append(log)
      procs.append(subprocess.Popen(
          [sys.executable, *command],
          env=process_env(dict(os.environ), address, num_processes, i,
                          devices),
          stdout=log, stderr=subprocess.STDOUT if log else None,
          start_new_session=True))  # Own group: killpg reaches its children.
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i = failed[0]
        _kill_all(procs)
        if logs[i] is not None:
          logs[i].seek(0)
          print(f"process {i} failed (status {_status(codes[i])}):",
                *_failure_lines(logs[i].read().splitlines()), sep="\n",
                file=sys.stderr, flush=True)
        return _status(codes[i])
      if all(c == 0 for c in codes):
        return 0
      if timeout is not None and time.monotonic() - start > timeout:
        _kill_all(procs)
        print(f"error: the job ran past --timeout={timeout:g} s; every "
              "process was killed", file=sys.stderr, flush=True)
        return 124
      time.sleep(_POLL_SECONDS)
  except KeyboardInterrupt:
    _kill_all(procs)
    return 130
  finally:
    _kill_all(procs)
    for log in logs:
      if log is not None:
        log.close()


def main(argv: Sequence[str] | None = None,
         prog: str = "python -m training.launch") -> int:
  """The command line (module docstring); returns the exit status."""
  parser = argparse.ArgumentParser(
      prog=prog,
      description="Run a command as N local processes of one JAX job.")
  parser.add_argument("-n", "--num-processes", type=int, required=True,
                      help="processes of the job (N)")
  parser.add_argument("--devices-per-process", type=int, default=1,
                      help="simulated CPU devices per process (default 1)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="kill every process after this many seconds")
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port on 127.0.0.1 (default: free)")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="-- SCRIPT [ARGS...] run with this Python")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after --, e.g. -- run.py --config ...")
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("-n and --devices-per-process must be >= 1")
  # SIGTERM to the launcher kills the job too.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  return launch(command, args.num_processes, args.devices_per_process,
                args.timeout, args.port)


if __name__ == "__main__":
  from training import errors  # pylint: disable=g-import-not-at-top
  sys.exit(errors.quiet_pipe(main))
