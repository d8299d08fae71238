"""Whether a train state is finite: the guard between a step and a checkpoint.

A diverging run can keep a finite loss while its parameters, BatchNorm
statistics or optimizer moments are already NaN or Inf (the loss of step t
is computed before step t's update). Every training step therefore returns
``metrics[KEY]``, one ``jnp.isfinite`` reduction over the floating-point
leaves of the new state, computed inside the jitted step; ``training.loop``
never saves, selects or exports a state whose flag is 0, and names the first
bad leaf with :func:`first_non_finite` (on the host, only then).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The metrics key of the flag (1.0: every floating-point leaf is finite).
KEY = "state_finite"


def _floating(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point leaf of ``tree`` is finite (jittable).

  Args:
    tree: a pytree (a train state, variables); integer leaves (the step,
      raw rng keys) and typed keys are skipped.

  Returns:
    A float32 scalar: 1.0 when finite, else 0.0 (a float, so that it travels
    with the other metrics).
  """
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if _floating(x)]
  if not flags:
    return jnp.ones((), jnp.float32)
  return jnp.all(jnp.stack(flags)).astype(jnp.float32)


def first_non_finite(tree: Any) -> str | None:
  """The path of the first leaf of ``tree`` holding NaN or Inf (host side).

  Args:
    tree: a pytree (a train state: the path starts with its collection,
      e.g. ``params/stage_1/0/conv_a/kernel`` or ``opt_state/...``).

  Returns:
    The ``/``-joined path with the number of bad values, or None when every
    leaf is finite.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in leaves:
    if not _floating(leaf):
      continue
    value = np.asarray(jax.device_get(leaf))
    bad = int(value.size - np.count_nonzero(np.isfinite(value)))
    if bad:
      return f"{_path_text(path)} ({bad} of {value.size} values)"
  return None


def _path_text(path: tuple[Any, ...]) -> str:
  """``params/stage_1/0/kernel`` from a jax key path."""
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)
