"""Fine-tuning pieces of DSP (spec §3, end): masks, best-so-far, re-prune.

The training loop applies the masks (``models.apply_masks``) after every
optimizer step — the prune's norm masks zero γ and β together, which is the
reference's zeroing of every BatchNorm shift whose γ is 0 — keeps the best
weights with ``update_best``, and between cycles calls ``reprune`` and
builds a fresh optimizer with ``cycle_optimizer``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from dsp_jax import kernels as kernels_lib
from dsp_jax import pruning as prune_lib

PyTree = Any
Array = jax.Array


class Best(NamedTuple):
  """Best-so-far fine-tuning result (higher ``metric`` is better)."""

  metric: float
  epoch: int
  params: PyTree
  batch_stats: PyTree
  p_flops: float


def update_best(best: Best | None, metric: float, epoch: int, params: PyTree,
                batch_stats: PyTree, p_flops: float) -> Best:
  """Returns the better of ``best`` and the new result (ties keep the old).

  Args:
    best: the current best, or None.
    metric: selection metric of the new result (validation accuracy).
    epoch: its epoch.
    params: its params (copied to host memory).
    batch_stats: its BN statistics.
    p_flops: its reference P.FLOPS.

  Returns:
    The best result.
  """
  if best is not None and not metric > best.metric:
    return best
  host = lambda t: jax.tree.map(lambda x: jax.device_get(x), t)
  return Best(float(metric), int(epoch), host(params), host(batch_stats),
              float(p_flops))


def reprune(best: Best, gates: PyTree, info: kernels_lib.Graph, *,
            groups: int,
            fp_every: int | None = None,
            fp_layers: Sequence[int] | None = None,
            parity: bool = True, round_to: int = 0,
            latency: Any = None) -> prune_lib.PruneResult:
  """Between cycles: re-run the rate search at (best P.FLOPS / 100 + 0.001).

  Args:
    best: the best result so far (its weights are the search's start).
    gates: the group logits.
    info: the model's graph (``dsp_jax.analyze``).
    groups: G.
    fp_every: n of the filter-pruning rule (None: derived, see ``prune``).
    fp_layers: explicit fp layer indices.
    parity: keep the cnt_g = 0 defect.
    round_to: round kept counts up to a multiple of this (``prune``).
    latency: a latency model, for the result's predicted latency. The
      re-prune keeps the FLOPs target even under a latency target: the best
      model already meets it, and its zeroed kernels are the search's floor.

  Returns:
    The new prune (params and masks for the next cycle).
  """
  return prune_lib.prune(best.params, gates, info, groups=groups,
                         rate=best.p_flops / 100.0 + 0.001, fp_every=fp_every,
                         fp_layers=fp_layers, parity=parity,
                         round_to=round_to, latency=latency)


def cycle_schedule(lr: float, epochs: int, steps_per_epoch: int):
  """Cosine learning rate over one cycle, stepped per epoch."""

  def schedule(step):
    epoch = jnp.floor_divide(step, steps_per_epoch)
    return lr * 0.5 * (1 + jnp.cos(math.pi * epoch / epochs))

  return schedule


def cycle_optimizer(lr: float = 0.015, epochs: int = 80,
                    steps_per_epoch: int = 391, momentum: float = 0.9,
                    weight_decay: float = 1e-3) -> optax.GradientTransformation:
  """A fresh fine-tuning optimizer for one cycle (SGD, coupled decay)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(cycle_schedule(lr, epochs, steps_per_epoch), momentum))
