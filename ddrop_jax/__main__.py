"""``python -m ddrop_jax``: the DDROP command line (see ``ddrop_jax.cli``)."""

import sys

from ddrop_jax import cli
from training import errors

if __name__ == "__main__":
  sys.exit(errors.quiet_pipe(cli.main))
