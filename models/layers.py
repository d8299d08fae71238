"""Flax Linen layers with explicit pruning variables.

Every layer keeps the dense model in ``params`` and its pruning state in
collections of its own:

* ``masks``   0/1 masks multiplied into the forward pass. A conv or dense
  kernel mask has shape ``(in_features, out_features)`` and is broadcast over
  the spatial kernel; a norm mask has shape ``(features,)`` and multiplies
  both scale and bias. Masks are created by ``init`` (all ones) and are
  optional at ``apply``: without them the layer is dense.
* ``gates``   DSP group logits of shape ``(groups, out_features)`` for the
  convolutions (and transformer MLP Linears) that take part in DSP; created
  only when ``groups`` is given.
* ``ddrop``   DDROP keep probabilities ``(features,)``; when present and
  ``train`` is true the layer output is multiplied by one Bernoulli draw per
  sample and unit from the ``'ddrop'`` rng (no 1/keep rescaling).
* ``ddrop_stats``  running mean of |activation| per unit, kept when that
  collection is passed as mutable (DDROP's activation-statistics criterion).

Numerics follow PyTorch (the reference implementations): symmetric integer
padding, BatchNorm with momentum 0.1, eps 1e-5 and the unbiased running
variance, LayerNorm eps 1e-5.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
Initializer = Callable[..., Array]

MASKS = "masks"
GATES = "gates"
DDROP = "ddrop"
DDROP_STATS = "ddrop_stats"

# Kaiming normal, fan_out, ReLU gain: the conv init of both reference code bases.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_linear_init(fan_in: int) -> Initializer:
  """``torch.nn.Linear``'s default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _optional_variable(module: nn.Module, col: str, name: str, init_fn, *args):
  """A variable created by ``init`` and optional at ``apply``; None if absent."""
  if module.is_initializing() or module.has_variable(col, name):
    return module.variable(col, name, init_fn, *args).value
  return None


def _group_gates(module: nn.Module, groups: int | None, features: int) -> None:
  """DSP's ``gates/logits`` ``(groups, features)`` (zeros) when ``groups`` is set.

  Gates only feed DSP's regulariser, never the forward pass: optional at
  apply.
  """
  if groups is None:
    return
  if not 1 <= groups <= features:
    raise ValueError(
        f"{'/'.join(module.scope.path)}: groups must be in [1, {features}]"
        f" (the layer has {features} filters), got {groups}")
  _optional_variable(module, GATES, "logits", jnp.zeros, (groups, features),
                     module.param_dtype)


def unit_dropout(module: nn.Module, y: Array, train: bool) -> Array:
  """DDROP: multiply units (last axis) by Bernoulli(keep) when keep is given.

  One draw per sample and unit, broadcast over every axis between the batch
  and the unit axis (spatial positions, tokens). Identity at evaluation.
  """
  if not module.has_variable(DDROP, "keep"):
    return y
  if module.is_mutable_collection(DDROP_STATS) and train:
    stat = module.variable(DDROP_STATS, "abs_mean", jnp.zeros, (y.shape[-1],),
                           y.dtype)
    batch_mean = jnp.mean(jnp.abs(y), axis=tuple(range(y.ndim - 1)))
    stat.value = 0.9 * stat.value + 0.1 * jax.lax.stop_gradient(batch_mean)
  if not train:
    return y
  keep = jax.lax.stop_gradient(module.get_variable(DDROP, "keep"))
  shape = (y.shape[0],) + (1,) * (y.ndim - 2) + (y.shape[-1],)
  draw = jax.random.bernoulli(module.make_rng(DDROP), keep, shape)
  return y * draw.astype(y.dtype)


class Conv(nn.Module):
  """2-D convolution (NHWC, HWIO kernel) with a kernel-connectivity mask.

  Attributes:
    features: output channels.
    kernel_size: spatial kernel size.
    strides: stride, both axes.
    padding: symmetric zero padding in pixels, as ``torch.nn.Conv2d``.
    use_bias: add a bias.
    groups: DSP group count; when set, a ``gates/logits`` variable of shape
      ``(groups, features)`` is created (zeros, as the reference).
    kernel_init: kernel initializer.
    param_dtype: dtype of created variables.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int = 1
  use_bias: bool = False
  groups: int | None = None
  kernel_init: Initializer = kaiming_fan_out
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, in_features, self.features), self.param_dtype)
    mask = _optional_variable(self, MASKS, "kernel", jnp.ones,
                              (in_features, self.features), self.param_dtype)
    _group_gates(self, self.groups, self.features)
    if mask is not None:
      kernel = kernel * mask[None, None]
    dtype = jnp.result_type(x.dtype, kernel.dtype)
    p = self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype),
        window_strides=(self.strides, self.strides),
        padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,),
                        self.param_dtype)
      if mask is not None:
        bias = bias * jnp.max(mask, axis=0)
      y = y + bias
    return y


class Dense(nn.Module):
  """Fully connected layer with an (in, out) connectivity mask.

  Initialised as ``torch.nn.Linear`` unless ``kernel_init``/``bias_init`` are
  given. A bias entry is masked with its output unit (a unit with no input
  left is removed whole).

  Attributes:
    features: output units.
    use_bias: add a bias.
    kernel_init, bias_init: initialisers (None: ``torch.nn.Linear``'s).
    param_dtype: dtype of created variables.
    groups: DSP group count; when set, a ``gates/logits`` variable of shape
      ``(groups, features)`` is created exactly as ``Conv``'s (DSP treats the
      ``(I, O)`` kernel as a 1x1 convolution over the tokens).
  """

  features: int
  use_bias: bool = True
  kernel_init: Initializer | None = None
  bias_init: Initializer | None = None
  param_dtype: Any = jnp.float32
  groups: int | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    in_features = x.shape[-1]
    default = torch_linear_init(in_features)
    kernel = self.param("kernel", self.kernel_init or default,
                        (in_features, self.features), self.param_dtype)
    mask = _optional_variable(self, MASKS, "kernel", jnp.ones,
                              (in_features, self.features), self.param_dtype)
    _group_gates(self, self.groups, self.features)
    if mask is not None:
      kernel = kernel * mask
    dtype = jnp.result_type(x.dtype, kernel.dtype)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias = self.param("bias", self.bias_init or default, (self.features,),
                        self.param_dtype)
      if mask is not None:
        bias = bias * jnp.max(mask, axis=0)
      y = y + bias
    return unit_dropout(self, y, train)


def _masked_affine(module: nn.Module, c: int,
                   scale_init: Initializer) -> tuple[Array, Array]:
  """A norm's (scale, bias), both multiplied by its channel mask if present."""
  scale = module.param("scale", scale_init, (c,), module.param_dtype)
  bias = module.param("bias", nn.initializers.zeros, (c,), module.param_dtype)
  mask = _optional_variable(module, MASKS, "scale", jnp.ones, (c,),
                            module.param_dtype)
  if mask is None:
    return scale, bias
  return scale * mask, bias * mask


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with PyTorch's numerics and a channel mask.

  Training mode normalises with the batch statistics (over every device of
  the mesh when the batch is a sharded global array) and updates
  ``batch_stats`` with momentum 0.1 and the unbiased batch variance, as
  ``torch.nn.BatchNorm2d`` does.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  scale_init: Initializer = nn.initializers.ones
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = x.shape[-1]
    scale, bias = _masked_affine(self, c, self.scale_init)
    mean_v = self.variable("batch_stats", "mean", jnp.zeros, (c,),
                           self.param_dtype)
    var_v = self.variable("batch_stats", "var", jnp.ones, (c,),
                          self.param_dtype)
    dtype = jnp.result_type(x.dtype, scale.dtype)
    x = x.astype(dtype)
    axes = tuple(range(x.ndim - 1))
    if train:
      mean = jnp.mean(x, axis=axes)
      var = jnp.mean(jnp.square(x - mean), axis=axes)
      if not self.is_initializing():
        n = math.prod(x.shape[:-1])
        m = self.momentum
        mean_v.value = (1 - m) * mean_v.value + m * jax.lax.stop_gradient(mean)
        var_v.value = (1 - m) * var_v.value + m * jax.lax.stop_gradient(
            var * (n / max(n - 1, 1)))
    else:
      mean, var = mean_v.value.astype(dtype), var_v.value.astype(dtype)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return unit_dropout(self, y, train)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis (``torch.nn.LayerNorm``) with a unit mask."""

  epsilon: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    scale, bias = _masked_affine(self, x.shape[-1], nn.initializers.ones)
    dtype = jnp.result_type(x.dtype, scale.dtype)
    x = x.astype(dtype)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return unit_dropout(self, y, train)


def input_channels(model: nn.Module) -> int:
  """Image channels ``model`` takes: its ``in_channels``, else 3 (RGB).

  Args:
    model: a Flax module (a zoo model, or any model taking NHWC images).

  Returns:
    The channel count of its input images.
  """
  return int(getattr(model, "in_channels", 3))


def check_input(x: Array, channels: int, size: int | Sequence[int] | None,
                model: str) -> None:
  """Raise a clear error when ``x`` is not an NHWC image batch of the right size."""
  if x.ndim != 4 or x.shape[-1] != channels or (
      size is not None and tuple(x.shape[1:3]) != tuple(
          (size, size) if isinstance(size, int) else size)):
    want = (f"(batch, {size}, {size}, {channels})" if isinstance(size, int)
            else f"(batch, height, width, {channels})")
    raise ValueError(
        f"{model} expects NHWC input of shape {want}, got {tuple(x.shape)}")
