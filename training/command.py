"""Run a method from a config file: the body of ``python run.py``.

Also the ``run`` command of ``dsp-ddrop-jax`` (``training.cli``): the code
lives in the package so that the installed entry point finds it, and
``run.py`` stays a two-line script for a clone.
"""

from __future__ import annotations

import ast
import importlib
import os
import pathlib
import sys
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from training import config as config_lib
from training import errors

USAGE = """\
Run one method (plain training, DSP or DDROP) from a config file.

usage: {prog} --config CONFIG [--workdir DIR] [--config.FIELD=VALUE ...]

CONFIG is a Python file whose get_config() returns an ml_collections
ConfigDict; a suffix :NAME picks a variant of files that have them
(configs/dsp_imagenet.py:resnet50_p70). --config.FIELD=VALUE overrides any
field of training/config.py (python -m training.config lists them all).
Every field is checked before any work starts. Restarting the same command
resumes from the last checkpoint in the workdir.

options:
  --config CONFIG         the run's config file (required)
  --workdir DIR           output directory (default: the config's workdir)
  --config.FIELD=VALUE    override one field, e.g. --config.max_steps=20
  -h, --help              show this message
  --helpfull              every absl flag

shipped configs:
"""

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run configuration file (get_config() -> ConfigDict).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory; default: the config's workdir field.")

PIPELINES = {"train": "training.pipeline", "dsp": "dsp_jax.pipeline",
             "ddrop": "ddrop_jax.pipeline"}

# The configs package holds the shipped config files (installed with it).
CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> list[tuple[str, str]]:
  """``(configs/NAME.py, first line of its docstring)`` of every shipped
  config, in name order."""
  out = []
  for path in sorted(CONFIGS_DIR.glob("*.py")):
    if path.name == "__init__.py":
      continue
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    out.append((f"configs/{path.name}", doc.split("\n", 1)[0].strip()))
  return out


def usage(prog: str = "python run.py") -> str:
  """The ``--help`` text: usage, options and the shipped configs."""
  rows = shipped_configs()
  width = max(len(name) for name, _ in rows)
  return USAGE.format(prog=prog) + "\n".join(f"  {name:<{width}}  {line}"
                           for name, line in rows) + "\n"


def dispatch(config, workdir: str):
  """Runs ``config.method``'s pipeline; returns its report."""
  module_name = PIPELINES[config.method]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name is None or not module_name.startswith(e.name):
      raise
    raise SystemExit(f"method {config.method!r} needs {module_name}.run, "
                     f"which is not available ({e})") from e
  if not hasattr(module, "run"):
    raise SystemExit(f"method {config.method!r}: {module_name} has no run()")
  return module.run(config, workdir)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Library INFO logs (orbax saves, tfds) would bury the progress bar.
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required")
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  workdir = _WORKDIR.value or config.workdir
  with errors.reported([workdir]):
    from training import checkpoint, loop  # After validation: imports JAX.
    with errors.reported([workdir], extra=(loop.TrainingDiverged,
                                           checkpoint.CheckpointError)):
      dispatch(config, workdir)


def check_config_file(argv: Sequence[str]) -> None:
  """Rejects a ``--config`` file that does not exist, before the flag parser
  (whose error is a chained traceback).

  Args:
    argv: command-line arguments.

  Raises:
    ConfigError: the file named by ``--config`` is missing.
  """
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith("--config="):
      value = arg[len("--config="):]
    else:
      continue
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      raise config_lib.ConfigError(
          f"--config: no such file {path!r}; give a Python file with "
          "get_config(), e.g. --config configs/quickstart.py")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with its errors as one ``error:`` line (its own report
  is ``FATAL Flags parsing error`` plus a hint)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")


def run(argv: Sequence[str]) -> int:
  """``python run.py ARGS``; ``argv[0]`` is the program name.

  Returns:
    The exit status (errors exit through SystemExit).
  """
  argv = list(argv)
  if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
    prog = "python run.py" if argv[0].endswith(".py") else argv[0]
    print(usage(prog), end="")
    return 0
  try:
    check_config_file(argv[1:])
    config_lib.check_override_paths(argv[1:])
    config_lib.check_override_values(argv[1:])
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  app.run(_main, argv=argv, flags_parser=_parse_flags)
  return 0
