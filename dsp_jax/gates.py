"""DSP group logits: creation, Gumbel noise, soft and hard assignments (§2.1).

Gate trees have the layout of the model's ``gates`` collection:
``{module path...: {'logits': (G, O)}}``. Noise trees have the same layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dsp_jax import kernels as kernels_lib
from models import paths
from models import pruning

Array = jax.Array
PyTree = Any


def init_gates(info: kernels_lib.Graph, groups: int, *,
               key: Array | None = None, scale: float = 1.0,
               dtype: Any = jnp.float32) -> PyTree:
  """Group logits for every taking-part layer.

  Args:
    info: the model's graph (``dsp_jax.analyze``).
    groups: G.
    key: when given, logits are ``scale * N(0, 1)`` (random logits, as parity
      tests need); otherwise zeros, as the reference initialises them.
    scale: standard deviation of random logits.
    dtype: logits dtype.

  Returns:
    A gates tree ``{path: {'logits': (G, O)}}``.

  Raises:
    ValueError: if ``groups`` exceeds the filters of a layer.
  """
  pruning.check_groups(info, groups)
  flat = {}
  for j, c in enumerate(info.taking_part):
    shape = (groups, c.out_features)
    if key is None:
      logits = jnp.zeros(shape, dtype)
    else:
      logits = scale * jax.random.normal(jax.random.fold_in(key, j), shape,
                                         dtype)
    flat[c.path + ("logits",)] = logits
  return paths.unflatten(flat)


def gumbel_noise(key: Array, gates: PyTree) -> PyTree:
  """Standard Gumbel noise shaped like ``gates``, one folded key per layer.

  The key is the step's ``'gumbel'`` key; layer ``j`` (leaf order) uses
  ``fold_in(key, j)``.
  """
  leaves, treedef = jax.tree.flatten(gates)
  noise = [jax.random.gumbel(jax.random.fold_in(key, j), x.shape, x.dtype)
           for j, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, noise)


def soft_assignment(logits: Array, noise: Array | None,
                    temperature: float) -> Array:
  """``P = softmax_g(A / tau + g)``; the noise is not divided by tau."""
  z = logits / temperature
  if noise is not None:
    z = z + noise
  return jax.nn.softmax(z, axis=0)


def hard_assignment(logits: Array) -> Array:
  """``H[:, o] = one_hot(argmax_g A[g, o])`` (ties to the lowest group)."""
  return jax.nn.one_hot(jnp.argmax(logits, axis=0), logits.shape[0],
                        axis=0, dtype=logits.dtype)


def check_groups(gates: PyTree, groups: int) -> None:
  """Raises a clear error if a gate tree has another group count than asked."""
  for kp, x in jax.tree_util.tree_flatten_with_path(gates)[0]:
    if x.shape[0] != groups:
      name = ".".join(str(k.key) for k in kp)
      raise ValueError(f"gates {name} have {x.shape[0]} groups, but groups="
                       f"{groups} was requested")
