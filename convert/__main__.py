"""``python -m convert``: see ``convert.cli``."""

import sys

from training import errors

if __name__ == "__main__":
  try:
    from convert.cli import main  # Imports torch and JAX: seconds.
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(errors.INTERRUPTED_STATUS)
  sys.exit(errors.quiet_pipe(main))
