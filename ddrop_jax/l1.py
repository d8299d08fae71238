"""L1 on the DDROP layers' norm scales as optax transformations (spec 5).

``add_l1(lam, mask)`` adds the subgradient of ``lam * sum |gamma|`` to the
updates: ``u <- u + lam * w * sign(gamma)`` with ``sign(0) = 0`` (the
subgradient of |x| at 0 chosen as 0, so a scale that reached exactly zero,
e.g. a pruned one, stays put). Chain it BEFORE the optimizer, like
``optax.add_decayed_weights``, so the penalty goes through the learning rate
and momentum as a loss term would:
``optax.chain(ddrop_l1(layers, cfg), optimizer)``.

The rank-weighted variant (the paper's intent: push hardest on the units most
likely to be dropped) uses per-unit weights
``w_c = (1 - keep_c) / (1 - p_min)`` where ``keep_c`` is the unit's keep
probability at the current step (same schedule and ranks as the dropping),
so ``w`` grows with the unit's drop probability: at the end of the schedule
the least important unit gets the full ``lam`` and the most important one
``lam (1 - p_max) / (1 - p_min)``; before the schedule starts (keep = 1) there
is no penalty. When ``p_min = 1`` nothing is ever dropped and ``w = 0``.

Only norm layers have a scale; DDROP's Linear layers (VGG's hidden
classifier layers) get no L1.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from ddrop_jax.config import DdropConfig
from ddrop_jax.probs import importance, layer_keep
from ddrop_jax.selection import NORM, DdropLayer

Params = Any
WeightsFn = Callable[[Params, jax.Array], Params]


class AddL1State(NamedTuple):
  """Step count (drives the rank weights' schedule)."""
  count: jax.Array


def add_l1(lam: float, mask: Params | Callable[[Params], Params] | None = None,
           weights: WeightsFn | None = None) -> optax.GradientTransformation:
  """Adds ``lam * w * sign(params)`` to the updates.

  Args:
    lam: L1 strength lambda (>= 0).
    mask: pytree of bools with the params' structure (or a callable returning
      one): True where the penalty applies. None applies it everywhere.
    weights: optional ``weights(params, count) -> pytree`` of per-element
      coefficients ``w`` with the params' structure (broadcastable leaves);
      default 1.

  Returns:
    An ``optax.GradientTransformation`` with state ``AddL1State``.

  Example:
    >>> tx = add_l1(0.5)
    >>> p = {'scale': jnp.array([2.0, 0.0, -1.0])}
    >>> u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    >>> u['scale'].tolist()
    [0.5, 0.0, -0.5]
  """
  if not lam >= 0:
    raise ValueError(f"L1 strength must be >= 0, got {lam!r}")

  def init_fn(params):
    del params
    return AddL1State(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_l1 needs the params: call "
                       "tx.update(updates, state, params)")
    m = mask(params) if callable(mask) else mask
    if m is None:
      m = jax.tree.map(lambda _: True, params)
    w = (weights(params, state.count) if weights is not None
         else jax.tree.map(lambda _: 1.0, params))

    def add(u, p, on, wt):
      if not on:
        return u
      return u + (lam * wt * jnp.sign(p)).astype(u.dtype)

    new = jax.tree.map(add, updates, params, m, w)
    return new, AddL1State(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _scale_paths(layers: Sequence[DdropLayer]) -> set[tuple[str, ...]]:
  return {l.scale for l in layers if l.kind == NORM}


def l1_mask(layers: Sequence[DdropLayer]) -> Callable[[Params], Params]:
  """Mask callable: True on the ``scale`` of every DDROP norm layer."""
  paths = _scale_paths(layers)

  def mask(params):
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: tuple(k) in paths for k in flat})

  return mask


def rank_weights(layers: Sequence[DdropLayer], cfg: DdropConfig) -> WeightsFn:
  """``weights(params, count)``: ``(1 - keep_c) / (1 - p_min)`` on scales.

  Keep probabilities come from the params-based criterion of ``cfg``;
  ``activation`` statistics are not visible to an optax transformation, so
  with that criterion the weights rank units by |gamma|, the quantity the L1
  acts on.
  """
  criterion = "norm" if cfg.importance == "activation" else cfg.importance
  paths = {l.scale: l for l in layers if l.kind == NORM}
  denom = 1.0 - cfg.p_min

  def weights(params, count):
    flat = traverse_util.flatten_dict(params)
    out = {}
    for k, leaf in flat.items():
      layer = paths.get(tuple(k))
      if layer is None:
        out[k] = 1.0
      elif denom <= 0.0:
        out[k] = jnp.zeros_like(leaf)
      else:
        keep = layer_keep(importance(layer, params, None, criterion), count,
                          cfg)
        out[k] = (1.0 - keep) / denom
    return traverse_util.unflatten_dict(out)

  return weights


def ddrop_l1(layers: Sequence[DdropLayer],
             cfg: DdropConfig) -> optax.GradientTransformation:
  """The L1 transformation ``cfg`` asks for (identity when ``cfg.l1 == 0``).

  Args:
    layers: the DDROP layers.
    cfg: config with ``l1``, ``l1_rank_weighted`` (and then a resolved
      ``total_steps``).

  Returns:
    A transformation to chain before the optimizer. Its step count must match
    the optimizer step of the DDROP phase (a fresh optimizer per phase).
  """
  if cfg.l1 == 0.0:
    return optax.identity()
  weights = rank_weights(layers, cfg) if cfg.l1_rank_weighted else None
  return add_l1(cfg.l1, mask=l1_mask(layers), weights=weights)
