"""Dynamic Structure Pruning (DSP) in JAX: a functional API.

For users with their own training loop::

  info = dsp_jax.analyze(model, (32, 32, 3))     # any Flax model
  gates = dsp_jax.init_gates(info, groups=4)
  state = dsp_jax.init_group_state(variables, gates, rng=jax.random.key(0))
  step = dsp_jax.make_group_step(model, groups=4, lam=2e-3,
                                 lr_schedule=sched, total_steps=T,
                                 layer_info=info)
  state, metrics = step(state, batch)                    # group learning
  res = dsp_jax.prune(state.params, state.gates, info, groups=4, rate=0.5)
  params = dsp_jax.apply_masks(params, res.masks)        # after every step
  print(dsp_jax.format_table(res))                       # FLOPs report
"""

from dsp_jax.finetune import (Best, cycle_optimizer, cycle_schedule, reprune,
                              update_best)
from dsp_jax.gates import (gumbel_noise, hard_assignment, init_gates,
                           soft_assignment)
from dsp_jax.group_step import (GroupState, init_group_state, make_group_step,
                                sgd_direction)
from dsp_jax.kernels import analyze
from dsp_jax.pruning import PruneResult, format_table, prune, prune_at
from models.pruning import apply_masks

__all__ = [
    "Best", "GroupState", "PruneResult", "analyze",
    "apply_masks", "cycle_optimizer", "cycle_schedule", "format_table",
    "gumbel_noise", "hard_assignment", "init_gates", "init_group_state",
    "make_group_step", "prune", "prune_at", "reprune", "sgd_direction",
    "soft_assignment", "update_best",
]
