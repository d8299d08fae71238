"""Benchmark results as files: ``NAME.json`` and ``NAME.md`` in one folder.

Both carry the command, the machine, the date and the load average, so a
number is never read without what it was measured under.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import sys
from typing import Any, Sequence


def load_average() -> str:
  """The 1, 5 and 15 minute load averages."""
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def command(script: str, argv: Sequence[str] | None) -> str:
  """The command line that reproduces a run, the user's XLA_FLAGS with it."""
  env = ([f'XLA_FLAGS="{os.environ["XLA_FLAGS"]}"']
         if os.environ.get("XLA_FLAGS") else [])
  return " ".join([*env, "python", script,
                   *(sys.argv[1:] if argv is None else argv)])


def machine() -> str:
  cpu = platform.processor() or platform.platform()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f
                  if line.startswith("model name")), cpu)
  except OSError:
    pass  # not Linux: the platform string stands in.
  return f"{platform.machine()}, {os.cpu_count()} cores, {cpu}"


def write(out: pathlib.Path, name: str, title: str, cmd: str,
          started: datetime.datetime, loads: Sequence[str],
          data: dict[str, Any], table: Sequence[str]) -> None:
  """Writes ``out/name.json`` (``data`` and the run's facts) and ``.md``."""
  out.mkdir(parents=True, exist_ok=True)
  meta = {"command": cmd, "date": started.isoformat(timespec="seconds"),
          "machine": machine(), "load_average_1_5_15": list(loads),
          "user_XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  (out / f"{name}.json").write_text(json.dumps({**meta, **data}, indent=1)
                                    + "\n")
  (out / f"{name}.md").write_text(
      f"# {title}\n\nCommand: `{cmd}`\n\nMachine: {meta['machine']}; date "
      f"{meta['date']}; load average (1/5/15 min) during the run: "
      f"{'; '.join(loads)}\n\n" + "\n".join(table) + "\n")


def now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)
