"""``python -m ddrop_jax``: the DDROP command line (see ``ddrop_jax.cli``)."""

import sys

from ddrop_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main())
