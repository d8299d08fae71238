"""Pruning after the DDROP phase, and masks held fixed while fine-tuning.

Per pruned layer the ``floor(amount * C)`` units of smallest importance
(ranked as for the keep probabilities: ascending, ties by index) are removed
(with ``round_to`` r > 1, fewer: the kept count is rounded up to a multiple
of r):

* ``masks``: column o of the producing conv/Linear kernel mask
  ``(in / groups, out)``, entry o of the norm's ``scale`` mask and of every
  norm and depthwise conv of the unit's chain are 0 (the model's biases of
  those outputs are masked with them);
* ``params``: the producer's filter/row o and bias o, the norms' gamma_o and
  beta_o, the chain's depthwise filter o and the unit's ``ddrop_scale`` o
  are zeroed;
* ``batch_stats``: mean_o -> 0 and var_o -> 1, the statistics of a constant
  zero channel normalised as identity, so the pruned model evaluates the same
  whichever way a later export reads the statistics.

The masks stay in the variables during fine-tuning (without a ``ddrop``
collection, so nothing is dropped any more); ``models.apply_masks``
re-zeroes the params after each update so that weight decay or momentum
cannot move a pruned weight away from 0.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from ddrop_jax.config import DdropConfig
from ddrop_jax.probs import importance, prune_count, ranks
from ddrop_jax.selection import DdropLayer
from models import paths
from models.pruning import apply_masks  # noqa: F401  (re-exported)

Array = jax.Array


def pruned_units(layer: DdropLayer, params: Mapping[str, Any],
                 stats: Mapping[str, Any] | None, criterion: str,
                 amount: float, round_to: int = 0) -> Array:
  """Boolean (C,): True for the ``floor(amount * C)`` least important units
  (fewer with ``round_to``: see ``prune_count``)."""
  v = importance(layer, params, stats, criterion)
  return ranks(v) < prune_count(layer.units, amount, round_to)


def check_round_to(layers: Sequence[DdropLayer], round_to: int) -> None:
  """A ``round_to`` wider than a layer cannot be met: names the layer."""
  for layer in layers:
    if round_to > layer.units:
      raise ValueError(f"ddrop.round_to={round_to} exceeds the "
                       f"{layer.units} units of layer "
                       f"{'/'.join(layer.path)}")


def _scale_entry(flat: dict, key: tuple, keep: Array, fill: float = 0.0):
  if key in flat:
    x = flat[key]
    shape = (1,) * (x.ndim - 1) + (-1,)
    k = keep.reshape(shape).astype(x.dtype)
    flat[key] = x * k + fill * (1 - k)


def prune(variables: Mapping[str, Any], layers: Sequence[DdropLayer],
          cfg: DdropConfig,
          stats: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Prunes ``cfg.amount`` of the units of every layer in ``layers``.

  Args:
    variables: model variables with ``params`` (and ``batch_stats``,
      ``masks`` when the model has them; existing masks are kept and ANDed).
    layers: the layers to prune: ``ddrop_layers``, or ``prune_layers`` of
      them for ``cfg.prune_residual``.
    cfg: DDROP config (``amount``, ``importance``).
    stats: ``ddrop_stats`` collection, for the ``activation`` importance.
      Layers that have no statistics (the extra ones of ``prune_residual``)
      are ranked by ``norm``.

  Returns:
    New variables: params zeroed, batch_stats reset and ``masks`` set as the
    module docstring says; the ``ddrop`` and ``ddrop_stats`` collections are
    dropped (DDROP is off from here on); other collections pass through.
  """
  check_round_to(layers, cfg.round_to)
  return _prune(dict(variables), tuple(layers), cfg, stats)


def importance_of(layer: DdropLayer, cfg: DdropConfig, stats) -> str:
  """``cfg.importance``, or ``norm`` for a layer without activation
  statistics (the extra layers of ``prune_residual``)."""
  if cfg.importance == "activation" and (
      stats is None or paths.get(stats, layer.path) is None):
    return "norm"
  return cfg.importance


@functools.partial(jax.jit, static_argnums=(1, 2))
def _prune(variables, layers, cfg, stats):
  # One compiled program instead of hundreds of small eager ops.
  params = variables["params"]
  flat_p = paths.flatten(params)
  flat_b = paths.flatten(variables.get("batch_stats", {}))
  flat_m = paths.flatten(variables.get("masks") or {})
  for layer in layers:
    criterion = importance_of(layer, cfg, stats)
    keep = 1.0 - pruned_units(layer, params, stats, criterion, cfg.amount,
                              cfg.round_to).astype(jnp.float32)
    kernel = layer.producer + ("kernel",)
    for leaf in (kernel, layer.producer + ("bias",)):
      _scale_entry(flat_p, leaf, keep)
    _mask(flat_m, kernel, flat_p[kernel], keep)
    if layer.added_scale:
      _scale_entry(flat_p, layer.scale, keep)
    members = ((layer.norm, keep),) if layer.norm else ()
    for module, pairs in layer.chain:
      pos, unit = (jnp.asarray(x) for x in zip(*pairs))
      size = (flat_p.get(module + ("scale",)) if module + ("scale",) in flat_p
              else flat_p.get(module + ("kernel",)))
      width = size.shape[-1]
      members += ((module, jnp.ones((width,), keep.dtype).at[pos].set(
          keep[unit])),)
    for module, k in members:
      if module + ("kernel",) in flat_p:  # a depthwise conv of the chain
        dw = module + ("kernel",)
        for leaf in (dw, module + ("bias",)):
          _scale_entry(flat_p, leaf, k)
        _mask(flat_m, dw, flat_p[dw], k)
        continue
      for leaf in ("scale", "bias"):
        _scale_entry(flat_p, module + (leaf,), k)
      if module + ("scale",) in flat_p:
        _mask(flat_m, module + ("scale",), flat_p[module + ("scale",)], k)
      _scale_entry(flat_b, module + ("mean",), k)
      _scale_entry(flat_b, module + ("var",), k, fill=1.0)
  out = {k: v for k, v in variables.items()
         if k not in ("ddrop", "ddrop_stats")}
  out["params"] = paths.unflatten(flat_p)
  out["masks"] = paths.unflatten(flat_m)
  if "batch_stats" in variables:
    out["batch_stats"] = paths.unflatten(flat_b)
  return out


def _mask(flat_m: dict, key: tuple, leaf: Array, keep: Array) -> None:
  """ANDs ``keep`` into the mask of ``leaf`` at ``key`` (created as ones
  ``(in / groups, out)`` or ``(C,)`` if absent)."""
  if key not in flat_m:
    shape = leaf.shape[-2:] if leaf.ndim >= 2 else leaf.shape
    flat_m[key] = jnp.ones(shape, leaf.dtype)
  m = flat_m[key]
  flat_m[key] = m * keep.reshape((1,) * (m.ndim - 1) + (-1,)).astype(m.dtype)
