"""DDROP: dynamic dropout pruning (importance-ranked unit dropout, L1, pruning).

Functional API, pure functions over pytrees, for any Flax model:

* ``ddrop_layers(model, input_shape)``: the units DDROP acts on, from the
  model's traced graph; ``init_scales(layers, params)`` adds the per-unit
  scale of units that have no norm.
* ``keep_probabilities(params, stats, step, cfg, layers)``: the ``ddrop``
  collection to pass to ``models.prunable(model).apply`` with a ``'ddrop'``
  rng.
* ``ddrop_l1(layers, cfg)`` / ``add_l1(lam, mask)``: L1 on the DDROP scales,
  an optax transformation to chain before the optimizer.
* ``prune(variables, layers, cfg)``: zero the least important units and set
  the ``masks`` collection; ``apply_masks(params, masks)`` keeps them zero.
* ``make_ddrop_train_step(model, tx, info, mesh, layers, cfg)``: the
  engine's jitted step with the ``ddrop_variables_fn`` hook;
  ``ddrop_collections`` gives one step's variables/rngs for a custom loop.

Typical use with the engine::

  layers = ddrop_layers(model, (32, 32, 3))
  cfg = DdropConfig.from_engine(config.ddrop).with_phase_steps(n)
  params = init_scales(layers, state.params)
  tx = ddrop_optimizer(optimizer, layers, cfg)
  state = state.replace(params=params, opt_state=tx.init(params), step=0,
                        extra=init_extra(layers, cfg))
  step = make_ddrop_train_step(model, tx, info, mesh, layers, cfg)
  ...  # train, then prune and fine-tune with the masks held fixed:
  v = prune(state.variables(), layers, cfg)
  state = state.replace(params=v["params"], batch_stats=v["batch_stats"],
                        masks=v["masks"], extra={})
  step = training.steps.make_train_step(model, ft_tx, info, mesh)
"""

from ddrop_jax.config import (DEFAULT_L1, IMPORTANCES, SCHEDULES,
                              DdropConfig)
from ddrop_jax.l1 import (AddL1State, add_l1, ddrop_l1, l1_mask,
                          rank_weights)
from ddrop_jax.probs import (importance, init_stats, keep_probabilities,
                             keep_range, layer_keep, prune_count, ranks,
                             relative_ranks, schedule_scale)
from ddrop_jax.pruning import apply_masks, prune, pruned_units
from ddrop_jax.selection import (DdropLayer, ddrop_layers, init_scales,
                                 prune_layers)
from ddrop_jax.train import (ddrop_collections, ddrop_optimizer,
                             ddrop_variables_fn, init_extra,
                             make_ddrop_train_step, needs_stats)

__all__ = [
    "AddL1State", "DEFAULT_L1", "DdropConfig", "DdropLayer", "IMPORTANCES",
    "SCHEDULES", "add_l1", "apply_masks", "ddrop_collections", "ddrop_l1",
    "ddrop_layers", "ddrop_optimizer", "ddrop_variables_fn", "importance",
    "init_extra", "init_scales", "init_stats", "keep_probabilities",
    "keep_range", "l1_mask", "layer_keep", "make_ddrop_train_step",
    "needs_stats", "prune", "prune_count", "prune_layers", "pruned_units",
    "rank_weights", "ranks", "relative_ranks", "schedule_scale",
]
