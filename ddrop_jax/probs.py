"""Unit importance, ranks, schedules and keep probabilities (spec section 3).

Everything here is a pure function of the params (and ``ddrop_stats``) and a
traced step, so it runs inside the jitted train step; no gradient flows
through the probabilities.

Ranks are ascending by importance. Equal importances (every γ = 1 at
initialisation, all activation statistics still zero) are ordered at random
from the training step's key (``tie_key``), so that dropping does not follow
the unit index; without a key they are ordered by index (a stable sort: of
two equal units the lower index gets the lower rank). The relative
rank is ``a_c = r_c / (C - 1)``; a layer with a single unit has ``a = 0``
(its unit keeps with ``p'_min``), since it is both the least and the most
important unit and the least important one decides.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from ddrop_jax.config import DdropConfig
from ddrop_jax.selection import DENSE, DdropLayer
from models import paths

Array = jax.Array


def importance(layer: DdropLayer, params: Mapping[str, Any],
               stats: Mapping[str, Any] | None = None,
               criterion: str = "norm") -> Array:
  """Per-unit importance of one layer, shape (C,).

  Args:
    layer: the layer.
    params: params pytree.
    stats: the ``ddrop_stats`` collection (``abs_mean`` per layer); needed
      for ``activation`` only.
    criterion: ``norm`` (|scale| of the unit's norm or scale; the squared L2
      norm of each output unit's weight row for a ``dense`` unit),
      ``weight_norm`` (squared L2 norm of the producing conv filter / Linear
      row) or ``activation`` (running mean of |activation|).

  Returns:
    Importance values (larger = more important), without gradient.
  """
  if criterion == "norm":
    if layer.kind == DENSE:
      v = _row_sq_norm(paths.require(params, layer.producer + ("kernel",),
                                     "params"))
    else:
      v = jnp.abs(paths.require(params, layer.scale, "params"))
  elif criterion == "weight_norm":
    v = _row_sq_norm(paths.require(params, layer.producer + ("kernel",),
                                   "params"))
  elif criterion == "activation":
    if stats is None:
      raise ValueError(f"{layer.name}: importance activation needs the "
                       "ddrop_stats collection (see init_stats)")
    v = paths.require(stats, layer.path + ("abs_mean",), "ddrop_stats")
  else:
    raise ValueError(f"importance must be one of norm, weight_norm, "
                     f"activation; got {criterion!r}")
  return jax.lax.stop_gradient(v)


def _row_sq_norm(kernel: Array) -> Array:
  # Output units are the last axis of HWIO conv and (in, out) dense kernels.
  return jnp.sum(jnp.square(kernel), axis=tuple(range(kernel.ndim - 1)))


# fold_in index of the tie-breaking key within a step's key (the model's
# named rng streams use 0, 1, 2: ``training.steps.model_rngs``).
TIE_STREAM = 101


def tie_key(rng: Array, step: Array | int) -> Array:
  """The key that orders equal importances at ``step`` (from the step's)."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), TIE_STREAM)


def ranks(v: Array, key: Array | None = None) -> Array:
  """Ascending ranks 0..C-1 of ``v``.

  Args:
    v: importances (C,).
    key: orders equal importances at random (e.g. every γ = 1 at
      initialisation); None orders them by index (stable sort).

  Returns:
    int32 ranks (C,).
  """
  c = v.shape[0]
  if key is None:
    order = jnp.argsort(v, stable=True)
  else:
    perm = jax.random.permutation(key, c)
    order = perm[jnp.argsort(v[perm], stable=True)]
  return jnp.zeros(v.shape, jnp.int32).at[order].set(
      jnp.arange(c, dtype=jnp.int32))


def relative_ranks(v: Array, key: Array | None = None) -> Array:
  """``a_c = r_c / (C - 1)`` in [0, 1]; zeros when C = 1 (``key``: ties)."""
  c = v.shape[0]
  if c == 1:
    return jnp.zeros((1,), jnp.float32)
  return ranks(v, key).astype(jnp.float32) / (c - 1)


def schedule_scale(step: Array | int, total_steps: int, schedule: str) -> Array:
  """How far the keep range still is from the target (1 = no dropping).

  ``u = min(step, total_steps) / total_steps``; cosine: ``cos(pi u / 2)``,
  linear: ``1 - u``, constant: ``0``.

  Args:
    step: optimizer step (may be traced).
    total_steps: schedule length in optimizer steps, >= 1.
    schedule: ``constant``, ``cosine`` or ``linear``.

  Returns:
    A float32 scalar in [0, 1].
  """
  if total_steps is None or total_steps < 1:
    raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}"
                     " (DdropConfig.with_phase_steps fills in the default)")
  u = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps) / total_steps
  if schedule == "cosine":
    return jnp.cos(jnp.pi * u / 2)
  if schedule == "linear":
    return 1.0 - u
  if schedule == "constant":
    return jnp.zeros_like(u)
  raise ValueError(f"schedule must be one of constant, cosine, linear; got "
                   f"{schedule!r}")


def keep_range(step: Array | int, cfg: DdropConfig) -> tuple[Array, Array]:
  """The effective range ``(p'_min, p'_max)`` at ``step``."""
  scale = schedule_scale(step, cfg.total_steps, cfg.schedule)
  return (cfg.p_min + (1.0 - cfg.p_min) * scale,
          cfg.p_max + (1.0 - cfg.p_max) * scale)


def layer_keep(v: Array, step: Array | int, cfg: DdropConfig,
               key: Array | None = None) -> Array:
  """Keep probability ``p'_min + a_c (p'_max - p'_min)`` for importances v
  (``key``: random order of equal importances)."""
  lo, hi = keep_range(step, cfg)
  return lo + relative_ranks(v, key) * (hi - lo)


def keep_probabilities(params: Mapping[str, Any],
                       stats: Mapping[str, Any] | None,
                       step: Array | int, cfg: DdropConfig,
                       layers: Sequence[DdropLayer],
                       key: Array | None = None) -> dict[str, Any]:
  """The ``ddrop`` collection for one train step.

  Args:
    params: params pytree (importance is read from it; no gradient).
    stats: ``ddrop_stats`` collection, or None unless the criterion is
      ``activation``.
    step: optimizer step of the DDROP phase (may be traced).
    cfg: DDROP config with ``total_steps`` resolved.
    layers: the DDROP layers (``ddrop_layers``).
    key: orders equal importances at random (``tie_key``; one key per
      layer is folded from it); None orders them by unit index.

  Returns:
    Nested dict ``{module path...: {'keep': (C,) float32}}`` to pass as
    ``variables['ddrop']``.
  """
  flat = {}
  for i, layer in enumerate(layers):
    v = importance(layer, params, stats, cfg.importance)
    k = None if key is None else jax.random.fold_in(key, i)
    flat[layer.path + ("keep",)] = jax.lax.stop_gradient(
        layer_keep(v, step, cfg, k))
  return traverse_util.unflatten_dict(flat)


def init_stats(layers: Sequence[DdropLayer]) -> dict[str, Any]:
  """A zero ``ddrop_stats`` collection (``abs_mean`` per DDROP layer).

  Passing it in the variables (and as mutable) fixes the collection's
  structure from the first step, as jit needs. Before any statistics exist all
  units tie (the training step orders them at random).
  """
  return traverse_util.unflatten_dict(
      {l.path + ("abs_mean",): jnp.zeros((l.units,), jnp.float32)
       for l in layers})


def prune_count(units: int, amount: float, round_to: int = 0) -> int:
  """``floor(amount * C)`` units removed from a layer of C units.

  With ``round_to`` r > 1 the KEPT count ``C - floor(amount * C)`` is
  rounded up to a multiple of r (at most C), so fewer units are removed:
  rounding never prunes beyond ``amount``.
  """
  # A small tolerance keeps e.g. 0.3 * 10 at 3 despite float rounding.
  pruned = int(math.floor(amount * units + 1e-9))
  if round_to > 1:
    kept = units - pruned
    pruned = units - min(-(-kept // round_to) * round_to, units)
  return pruned
