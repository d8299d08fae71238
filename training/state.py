"""The train state pytree and the masks applied to parameters."""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax import traverse_util

from models import layers


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes; a pytree.

  Attributes:
    step: optimizer steps taken (int32 scalar); schedules and the per-step
      rng derive from it.
    params: the dense model (``params`` collection).
    batch_stats: BatchNorm running statistics.
    masks: ``masks`` collection (0/1), or ``{}`` for a dense model. When
      present, the model applies them and ``apply_masks`` is re-applied to the
      params after every update.
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
      v[layers.MASKS] = self.masks
    if self.gates:
      v[layers.GATES] = self.gates
    return v


def create_train_state(model: flax.linen.Module,
                       tx: optax.GradientTransformation, rng: jax.Array, image_shape: tuple[int, int, int], *,
                       with_masks: bool = False, with_gates: bool = False,
                       extra: Any = None) -> TrainState:
  """Initialises the model and the optimizer.

  Args:
    model: the Flax module.
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
  variables = jax.jit(functools.partial(model.init, train=False))(
      init_key, jnp.zeros((1,) + tuple(image_shape)))
  params = variables["params"]
  return TrainState(
      step=jnp.zeros([], jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}),
      masks=variables.get(layers.MASKS, {}) if with_masks else {},
      gates=variables.get(layers.GATES, {}) if with_gates else {},
      opt_state=tx.init(params), rng=train_rng,
      extra={} if extra is None else extra)


def apply_masks(params: Any, masks: Any) -> Any:
  """``params ⊙ masks``, as the layers apply them in the forward pass.

  A conv/dense ``kernel`` mask of shape (in, out) multiplies the kernel
  (broadcast over the spatial axes of a conv kernel) and the layer's ``bias``
  by whether its output unit keeps any input; a norm ``scale`` mask (C,)
  multiplies ``scale`` and ``bias``. Parameters without a mask pass through.

  Args:
    params: the ``params`` collection.
    masks: the ``masks`` collection (same module paths), possibly ``{}``.

  Returns:
    The masked params (a new pytree).
  """
  if not masks:
    return params
  flat = traverse_util.flatten_dict(params)
  for path, mask in traverse_util.flatten_dict(masks).items():
    module, leaf = path[:-1], path[-1]
    if module + (leaf,) not in flat:
      raise KeyError(f"mask {'/'.join(path)} has no parameter to mask")
    p = flat[module + (leaf,)]
    if leaf == "kernel":
      m = mask.reshape((1,) * (p.ndim - 2) + mask.shape).astype(p.dtype)
      flat[module + (leaf,)] = p * m
      if module + ("bias",) in flat:
        flat[module + ("bias",)] = flat[module + ("bias",)] * jnp.max(
            mask, axis=0).astype(p.dtype)
    elif leaf == "scale":
      flat[module + (leaf,)] = p * mask.astype(p.dtype)
      if module + ("bias",) in flat:
        flat[module + ("bias",)] = flat[module + ("bias",)] * mask.astype(
            p.dtype)
    else:
      raise KeyError(f"unexpected mask {'/'.join(path)}; masks are named "
                     "'kernel' or 'scale'")
  return traverse_util.unflatten_dict(flat)


def count_params(params: Any) -> int:
  """Number of parameter elements."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
