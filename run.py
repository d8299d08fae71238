"""Command line of every method.

    python run.py --config CONFIG [--workdir DIR] [--config.FIELD=VALUE ...]

Parses the config file (a Python file with ``get_config()``; see
``configs/``), applies the overrides, validates every field against
``training/config.py`` and dispatches on ``config.method``:

* ``train``: ``training.pipeline.run`` (plain supervised training);
* ``dsp``: ``dsp_jax.pipeline.run``;
* ``ddrop``: ``ddrop_jax.pipeline.run``.

``config.stages`` selects stages of the method. Restarting the same command
resumes from the last checkpoint in the workdir.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from training import config as config_lib
from training import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run configuration file (get_config() -> ConfigDict).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory; default: the config's workdir field.")

PIPELINES = {"train": "training.pipeline", "dsp": "dsp_jax.pipeline",
             "ddrop": "ddrop_jax.pipeline"}


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


def main(argv):
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


def check_config_file(argv: list[str]) -> None:
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


if __name__ == "__main__":
  try:
    check_config_file(sys.argv[1:])
    config_lib.check_override_paths(sys.argv[1:])
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  app.run(main)
