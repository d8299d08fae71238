"""Baseline channel pruning: L1-norm filters and random units.

* ``l1``: Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017):
  in every pruned layer the filters (output units) of smallest
  ``sum |W|`` go first;
* ``random``: units drawn uniformly at random per layer.

Both prune the units of the same layers DDROP prunes
(``ddrop_jax.ddrop_layers``, or ``prune_layers`` of them) and build their
variables
through ``ddrop_jax.prune`` (``floor(amount * C)`` units per layer; kernel
and norm masks, zeroed params, identity statistics), so the pruned model
trains, counts its FLOPs and exports exactly as a DDROP-pruned one does.
``ddrop_jax.prune`` ranks units by a per-unit importance tree under its
``activation`` importance; the baselines hand it theirs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from ddrop_jax.config import DdropConfig
from ddrop_jax.pruning import prune as ddrop_prune
from ddrop_jax.selection import DdropLayer
from models import paths

CRITERIA = ("l1", "random")
# The key ``ddrop_jax.probs.importance`` reads under ``activation``.
_SCORE_KEY = "abs_mean"


def l1_scores(params: Mapping[str, Any], layers: Sequence[DdropLayer]
              ) -> dict[tuple[str, ...], jax.Array]:
  """``sum |W|`` of each unit's producing filter (conv) or row (Linear).

  Args:
    params: params pytree.
    layers: the layers to score (each needs a producer).

  Returns:
    ``layer.path -> (C,)`` importances.
  """
  out = {}
  for layer in layers:
    k = paths.require(params, layer.producer + ("kernel",), "params")
    # Output units are the last axis of HWIO conv and (in, out) dense kernels.
    out[layer.path] = jnp.sum(jnp.abs(k), axis=tuple(range(k.ndim - 1)))
  return out


def random_scores(rng: jax.Array, layers: Sequence[DdropLayer]
                  ) -> dict[tuple[str, ...], jax.Array]:
  """Independent uniform importances per unit (a random ranking per layer).

  Args:
    rng: a ``jax.random.key``.
    layers: the layers to score.

  Returns:
    ``layer.path -> (C,)`` importances.
  """
  return {layer.path: jax.random.uniform(jax.random.fold_in(rng, i),
                                         (layer.units,))
          for i, layer in enumerate(layers)}


def prune(variables: Mapping[str, Any], layers: Sequence[DdropLayer], *,
          criterion: str, amount: float,
          rng: jax.Array | None = None) -> dict[str, Any]:
  """Prunes ``floor(amount * C)`` units of every layer of ``layers``.

  Args:
    variables: model variables (``params``, ``batch_stats``, optional
      ``masks``, which are kept and ANDed).
    layers: the layers to prune (``ddrop_jax.ddrop_layers``, or
      ``ddrop_jax.prune_layers`` of them).
    criterion: ``l1`` or ``random``.
    amount: fraction of units pruned per layer, in [0, 1).
    rng: the key of ``random``.

  Returns:
    The pruned variables (``ddrop_jax.prune``'s contract).

  Raises:
    ValueError: an unknown criterion, or ``random`` without ``rng``.
  """
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got "
                     f"{criterion!r}")
  if criterion == "l1":
    scores = l1_scores(variables["params"], layers)
  elif rng is None:
    raise ValueError("criterion 'random' needs an rng key")
  else:
    scores = random_scores(rng, layers)
  tree = paths.unflatten(
      {path + (_SCORE_KEY,): v for path, v in scores.items()})
  # Every layer is ranked by the supplied scores.
  cfg = DdropConfig(importance="activation", amount=amount)
  return ddrop_prune(variables, tuple(layers), cfg, stats=tree)
