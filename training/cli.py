"""``dsp-ddrop-jax COMMAND ...``: the installed command line.

One program for every entry point, so that an installed copy needs no
clone: ``dsp-ddrop-jax run ...`` is ``python run.py ...``,
``dsp-ddrop-jax convert ...`` is ``python -m convert ...``, and so on.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from training import errors

PROG = "dsp-ddrop-jax"
# command -> (module, its main, the same command from a clone, summary).
COMMANDS = {
    "run": ("training.command", "run", "python run.py",
            "run a method (train, DSP, DDROP) from a config file"),
    "convert": ("convert.cli", "main", "python -m convert",
                "import, export and inspect PyTorch / ONNX files"),
    "ddrop": ("ddrop_jax.cli", "main", "python -m ddrop_jax",
              "DDROP with the original tool's flags"),
    "launch": ("training.launch", "main", "python -m training.launch",
               "run a command as N local processes of one JAX job"),
    "config": ("training.config", "main", "python -m training.config",
               "print the table of every configuration field"),
    "plot": ("training.plot", "main", "python -m training.plot",
             "redraw the plots of a run directory"),
}


def usage() -> str:
  """The ``--help`` text."""
  rows = "\n".join(f"  {name:<8} {summary} (= {clone})"
                   for name, (_, _, clone, summary) in COMMANDS.items())
  return (f"usage: {PROG} COMMAND [ARGS...]\n\n"
          "Structured pruning in JAX/Flax: DSP and DDROP.\n\n"
          f"commands:\n{rows}\n\n"
          f"{PROG} COMMAND --help describes a command.\n")


def _dispatch(argv: Sequence[str]) -> int:
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage(), end="")
    return 0 if argv else 2
  name, rest = argv[0], list(argv[1:])
  if name not in COMMANDS:
    print(f"error: unknown command {name!r}; valid: "
          f"{', '.join(COMMANDS)}", file=sys.stderr)
    return 2
  module_name, function, _, _ = COMMANDS[name]
  fn = getattr(importlib.import_module(module_name), function)
  if name == "run":  # absl-style: argv[0] is the program.
    return fn([f"{PROG} run", *rest])
  if name == "config":
    return fn()
  if name in ("convert", "launch"):
    return fn(rest, prog=f"{PROG} {name}")
  return fn(rest)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``dsp-ddrop-jax``; returns the exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  return errors.quiet_pipe(_dispatch, argv)


if __name__ == "__main__":
  sys.exit(main())
