"""Pruning after the DDROP phase, and masks held fixed while fine-tuning.

Per pruned layer the ``floor(amount * C)`` units of smallest importance
(ranked as for the keep probabilities: ascending, ties by index) are removed:

* ``masks``: column o of the producing conv/Linear ``kernel`` mask (in, out)
  and entry o of the norm's ``scale`` mask are 0 (the layers then also mask
  the bias of that output);
* ``params``: the producer's filter/row o and bias o, the norm's gamma_o and
  beta_o are zeroed;
* ``batch_stats``: mean_o -> 0 and var_o -> 1, the statistics of a constant
  zero channel normalised as identity, so the pruned model evaluates the same
  whichever way a later export reads the statistics.

The masks stay in the variables during fine-tuning (without a ``ddrop``
collection, so nothing is dropped any more); ``apply_masks`` (the engine's
``training.state.apply_masks``, re-exported here) re-zeroes the params after
each update so that weight decay or momentum cannot move a
pruned weight away from 0.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from ddrop_jax.config import DdropConfig
from ddrop_jax.probs import importance, prune_count, ranks
from ddrop_jax.selection import (DdropLayer, module_kind, module_params,
                                 prune_layers)
# The engine's masking (re-applied after every fine-tuning update).
from training.state import apply_masks  # noqa: F401  (re-exported)

Array = jax.Array


def pruned_units(layer: DdropLayer, params: Mapping[str, Any],
                 stats: Mapping[str, Any] | None, criterion: str,
                 amount: float) -> Array:
  """Boolean (C,): True for the ``floor(amount * C)`` least important units."""
  v = importance(layer, params, stats, criterion)
  return ranks(v) < prune_count(layer.units, amount)


def init_masks(params: Mapping[str, Any]) -> dict[str, Any]:
  """All-ones ``masks`` collection, as the layers' ``init`` creates it."""
  flat = {}
  for path, leaves in module_params(params).items():
    kind = module_kind(leaves)
    if kind in ("conv", "dense"):
      k = leaves["kernel"]
      flat[path + ("kernel",)] = jnp.ones(k.shape[-2:], k.dtype)
    elif kind == "norm":
      s = leaves["scale"]
      flat[path + ("scale",)] = jnp.ones(s.shape, s.dtype)
  return traverse_util.unflatten_dict(flat)


def _scale_entry(flat: dict, key: tuple, keep: Array, fill: float = 0.0):
  if key in flat:
    x = flat[key]
    flat[key] = x * keep.astype(x.dtype) + fill * (1 - keep).astype(x.dtype)


def prune(variables: Mapping[str, Any], layers: Sequence[DdropLayer],
          cfg: DdropConfig,
          stats: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Prunes ``cfg.amount`` of the units of every layer in ``cfg.prune_scope``.

  Args:
    variables: model variables with ``params`` (and ``batch_stats``,
      ``masks`` when the model has them; existing masks are kept and ANDed).
    layers: the DDROP layers (``ddrop_layers``).
    cfg: DDROP config (``amount``, ``criterion``, ``prune_scope``).
    stats: ``ddrop_stats`` collection, for the ``activation`` criterion. Layers
      that have no statistics (the extra ones of scope ``all``) are ranked by
      ``abs_gamma``.

  Returns:
    New variables: params zeroed, batch_stats reset and ``masks`` set as the
    module docstring says; the ``ddrop`` and ``ddrop_stats`` collections are
    dropped (DDROP is off from here on); other collections pass through.
  """
  variables = dict(variables)
  return _prune(variables, tuple(layers), cfg, stats)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _prune(variables, layers, cfg, stats):
  # One compiled program instead of hundreds of small eager ops.
  params = variables["params"]
  ddrop_paths = {l.path for l in layers}
  flat_p = traverse_util.flatten_dict(params)
  flat_b = traverse_util.flatten_dict(variables.get("batch_stats", {}))
  flat_m = traverse_util.flatten_dict(
      variables.get("masks") or init_masks(params))
  for layer in prune_layers(params, layers, cfg.prune_scope):
    criterion = cfg.criterion
    if criterion == "activation" and (stats is None or
                                      layer.path not in ddrop_paths):
      criterion = "abs_gamma"
    keep = 1.0 - pruned_units(layer, params, stats, criterion,
                              cfg.amount).astype(jnp.float32)
    if layer.producer is not None:
      for leaf in ("kernel", "bias"):
        _scale_entry(flat_p, layer.producer + (leaf,), keep)
      key = layer.producer + ("kernel",)
      if key in flat_m:
        flat_m[key] = flat_m[key] * keep.astype(flat_m[key].dtype)[None, :]
    if layer.norm is not None:
      for leaf in ("scale", "bias"):
        _scale_entry(flat_p, layer.norm + (leaf,), keep)
      _scale_entry(flat_m, layer.norm + ("scale",), keep)
      _scale_entry(flat_b, layer.norm + ("mean",), keep)
      _scale_entry(flat_b, layer.norm + ("var",), keep, fill=1.0)
  out = {k: v for k, v in variables.items()
         if k not in ("ddrop", "ddrop_stats")}
  out["params"] = traverse_util.unflatten_dict(flat_p)
  out["masks"] = traverse_util.unflatten_dict(flat_m)
  if "batch_stats" in variables:
    out["batch_stats"] = traverse_util.unflatten_dict(flat_b)
  return out
