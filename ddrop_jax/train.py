"""DDROP train steps on top of the shared engine (``training.steps``).

The engine's ``make_train_step`` takes a ``variables_fn(state, params)``
hook; :func:`ddrop_variables_fn` is DDROP's: from the current params (and
statistics in ``state.extra['ddrop_stats']``) and the traced
``state.step`` it builds the ``ddrop`` collection of keep probabilities. The
``'ddrop'`` rng comes from the engine (``fold_in(state.rng, state.step)``,
one stream per named rng). Fine-tuning is the engine's plain step on a state
with ``masks`` set (re-applied after every update) and no hook, so nothing is
dropped.

For a loop of one's own, :func:`ddrop_collections` gives the extra variables
and rngs of one step directly.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import optax
from flax import linen as nn

from ddrop_jax.config import DdropConfig
from ddrop_jax.l1 import ddrop_l1
from ddrop_jax.probs import init_stats, keep_probabilities, tie_key
from ddrop_jax.selection import DdropLayer
from training import steps as steps_lib
from training.state import TrainState

Array = jax.Array
STATS = "ddrop_stats"


def needs_stats(cfg: DdropConfig) -> bool:
  """Whether the step must keep the ``ddrop_stats`` collection."""
  return cfg.importance == "activation"


def init_extra(layers: Sequence[DdropLayer], cfg: DdropConfig
               ) -> dict[str, Any]:
  """``TrainState.extra`` of a DDROP phase: zero statistics when needed."""
  return {STATS: init_stats(layers)} if needs_stats(cfg) else {}


def _check_cfg(cfg: DdropConfig) -> None:
  if cfg.total_steps is None:
    raise ValueError("cfg.total_steps is None: resolve it with "
                     "cfg.with_phase_steps(phase_steps)")


def ddrop_collections(params: Mapping[str, Any],
                      stats: Mapping[str, Any] | None, step: Array | int,
                      rng: Array, layers: Sequence[DdropLayer],
                      cfg: DdropConfig
                      ) -> tuple[dict[str, Any], dict[str, Array]]:
  """Extra variables and rngs that turn DDROP on for one training apply.

  Args:
    params: current params.
    stats: ``ddrop_stats`` (None unless the importance is ``activation``).
    step: optimizer step of the DDROP phase (traced).
    rng: base key; the step's ``'ddrop'`` key is ``fold_in(rng, step)``.
    layers: the DDROP layers.
    cfg: DDROP config with ``total_steps`` resolved.

  Returns:
    ``(variables, rngs)``: merge ``variables`` into the apply variables
    (``ddrop``, plus ``ddrop_stats`` when given; make ``ddrop_stats`` mutable
    then) and ``rngs`` into the apply rngs.
  """
  extra = {"ddrop": keep_probabilities(params, stats, step, cfg, layers,
                                      tie_key(rng, step))}
  if stats is not None:
    extra[STATS] = stats
  return extra, {"ddrop": jax.random.fold_in(rng, step)}


def ddrop_variables_fn(layers: Sequence[DdropLayer], cfg: DdropConfig
                       ) -> Callable[[TrainState, Any],
                                     tuple[dict[str, Any], list[str]]]:
  """The engine hook ``(state, params) -> (variables, mutable)`` of DDROP.

  Args:
    layers: the DDROP layers.
    cfg: DDROP config with ``total_steps`` resolved.

  Returns:
    The hook for ``training.steps.make_train_step(variables_fn=...)``;
    ``ddrop_stats`` is read from and written back to ``state.extra`` when
    present (see :func:`init_extra`).
  """
  _check_cfg(cfg)
  layers = tuple(layers)

  def variables_fn(state: TrainState, params: Any):
    stats = (state.extra or {}).get(STATS)
    keep = keep_probabilities(params, stats, state.step, cfg, layers,
                              tie_key(state.rng, state.step))
    if stats is None:
      return {"ddrop": keep}, []
    return {"ddrop": keep, STATS: stats}, [STATS]

  return variables_fn


def ddrop_optimizer(tx: optax.GradientTransformation,
                    layers: Sequence[DdropLayer],
                    cfg: DdropConfig) -> optax.GradientTransformation:
  """``tx`` with DDROP's L1 chained in front (a fresh one per phase)."""
  return optax.chain(ddrop_l1(layers, cfg), tx)


def make_ddrop_train_step(model: nn.Module, tx: optax.GradientTransformation,
                          info: Any, mesh: jax.sharding.Mesh,
                          layers: Sequence[DdropLayer], cfg: DdropConfig,
                          **kwargs: Any) -> steps_lib.StepFn:
  """The engine's jitted train step with DDROP switched on.

  Args:
    model: the Flax model.
    tx: the phase optimizer, L1 included (:func:`ddrop_optimizer`).
    info: dataset info (normalisation statistics), as the engine wants.
    mesh: the ``data`` mesh.
    layers: the DDROP layers.
    cfg: DDROP config with ``total_steps`` resolved.
    **kwargs: passed on to ``training.steps.make_train_step`` (``augment``,
      ``lr_schedule``, ``dtype``).

  Returns:
    ``step_fn(state, batch) -> (state, metrics)`` (the loop's contract).
  """
  return steps_lib.make_train_step(
      model, tx, info, mesh, variables_fn=ddrop_variables_fn(layers, cfg),
      **kwargs)
