"""Command line of every method.

    python run.py --config CONFIG [--workdir DIR] [--config.FIELD=VALUE ...]

Parses the config file (a Python file with ``get_config()``; see
``configs/``), applies the overrides, validates every field against
``training/config.py`` and dispatches on ``config.method``:

* ``train``: ``training.pipeline.run`` (plain supervised training);
* ``dsp``: ``dsp_jax.pipeline.run``;
* ``ddrop``: ``ddrop_jax.pipeline.run``.

``config.stages`` selects stages of the method. Restarting the same command
resumes from the last checkpoint in the workdir. ``python run.py --help``
lists the shipped configs. The code is ``training.command`` (also the
``run`` command of the installed ``dsp-ddrop-jax``).
"""

import sys

from training import command, errors

if __name__ == "__main__":
  sys.exit(errors.quiet_pipe(command.run, sys.argv))
