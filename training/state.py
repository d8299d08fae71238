"""The train state pytree and the masks applied to parameters."""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct

import models


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes; a pytree.

  Attributes:
    step: optimizer steps taken (int32 scalar); schedules and the per-step
      rng derive from it.
    params: the dense model (``params`` collection).
    batch_stats: BatchNorm running statistics.
    masks: ``masks`` collection (0/1), or ``{}`` for a dense model. When
      present, the model applies them and ``models.apply_masks`` is
      re-applied to the params after every update.
    gates: DSP group logits (``gates`` collection), or ``{}``.
    opt_state: optax state of the params optimizer.
    rng: a ``jax.random.key``; step t uses ``fold_in(rng, t)``.
    extra: method-specific pytree (e.g. gate optimizer state, DDROP keep
      probabilities and statistics); ``{}`` for plain training.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  masks: Any
  gates: Any
  opt_state: Any
  rng: jax.Array
  extra: Any = struct.field(default_factory=dict)

  def variables(self) -> dict[str, Any]:
    """The model variables (``params``, ``batch_stats``, masks, gates)."""
    v = {"params": self.params, "batch_stats": self.batch_stats}
    if self.masks:
      v[models.MASKS] = self.masks
    if self.gates:
      v[models.GATES] = self.gates
    return v


def create_train_state(model: flax.linen.Module,
                       tx: optax.GradientTransformation, rng: jax.Array, image_shape: tuple[int, int, int], *,
                       with_masks: bool = False, with_gates: bool = False,
                       extra: Any = None) -> TrainState:
  """Initialises the model and the optimizer.

  Args:
    model: any Flax module (wrapped by ``models.prunable``).
    tx: params optimizer.
    rng: a ``jax.random.key``; split into init and training keys.
    image_shape: (H, W, C) of one input image.
    with_masks: keep the ``masks`` collection (all ones at init).
    with_gates: keep the ``gates`` collection (models built with groups).
    extra: the method-specific pytree (default ``{}``).

  Returns:
    The state at step 0.
  """
  init_rng, train_rng = jax.random.split(rng)
  # Initialisers draw from an 'rbg' key derived from ``rng``: XLA:CPU takes
  # ~5x longer to compile a ResNet init with threefry keys (~30 s on 2 busy
  # cores for ResNet-8), and the draws only need to be deterministic.
  init_key = jax.random.wrap_key_data(
      jax.random.bits(init_rng, (4,), jnp.uint32), impl="rbg")
  model = models.prunable(model)
  variables = jax.jit(functools.partial(model.init, train=False))(
      init_key, jnp.zeros((1,) + tuple(image_shape)))
  params = variables["params"]
  return TrainState(
      step=jnp.zeros([], jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}),
      masks=variables.get(models.MASKS, {}) if with_masks else {},
      gates=variables.get(models.GATES, {}) if with_gates else {},
      opt_state=tx.init(params), rng=train_rng,
      extra={} if extra is None else extra)


def count_params(params: Any) -> int:
  """Number of parameter elements."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
