"""Flax Linen layers with PyTorch's numerics (the reference implementations).

Symmetric integer padding, Kaiming-normal (fan_out) conv init,
``torch.nn.Linear``'s init, BatchNorm with momentum 0.1, eps 1e-5 and the
unbiased running variance, LayerNorm eps 1e-5. They are plain layers: the
pruning collections (masks, gates, DDROP) are honoured by
``models.prunable`` for these and for any other Flax layer alike.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
Initializer = Callable[..., Array]

# Kaiming normal, fan_out, ReLU gain: the conv init of both reference code bases.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_linear_init(fan_in: int) -> Initializer:
  """``torch.nn.Linear``'s default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv(nn.Module):
  """2-D convolution (NHWC, HWIO kernel), padded as ``torch.nn.Conv2d``.

  Attributes:
    features: output channels.
    kernel_size: spatial kernel size.
    strides: stride, both axes.
    padding: symmetric zero padding in pixels, as ``torch.nn.Conv2d``.
    use_bias: add a bias.
    kernel_init: kernel initializer.
    param_dtype: dtype of created variables.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int = 1
  use_bias: bool = False
  kernel_init: Initializer = kaiming_fan_out
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, in_features, self.features), self.param_dtype)
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
      y = y + bias
    return y


class Dense(nn.Module):
  """Fully connected layer, initialised as ``torch.nn.Linear`` by default.

  Attributes:
    features: output units.
    use_bias: add a bias.
    kernel_init, bias_init: initialisers (None: ``torch.nn.Linear``'s).
    param_dtype: dtype of created variables.
  """

  features: int
  use_bias: bool = True
  kernel_init: Initializer | None = None
  bias_init: Initializer | None = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    default = torch_linear_init(in_features)
    kernel = self.param("kernel", self.kernel_init or default,
                        (in_features, self.features), self.param_dtype)
    dtype = jnp.result_type(x.dtype, kernel.dtype)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias = self.param("bias", self.bias_init or default, (self.features,),
                        self.param_dtype)
      y = y + bias
    return y


def _affine(module: nn.Module, c: int,
            scale_init: Initializer) -> tuple[Array, Array]:
  """A norm's (scale, bias)."""
  scale = module.param("scale", scale_init, (c,), module.param_dtype)
  bias = module.param("bias", nn.initializers.zeros, (c,), module.param_dtype)
  return scale, bias


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with PyTorch's numerics.

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
    scale, bias = _affine(self, c, self.scale_init)
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
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class LayerNorm(nn.Module):
  """LayerNorm over the last axis (``torch.nn.LayerNorm``)."""

  epsilon: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale, bias = _affine(self, x.shape[-1], nn.initializers.ones)
    dtype = jnp.result_type(x.dtype, scale.dtype)
    x = x.astype(dtype)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def input_channels(model: nn.Module) -> int:
  """Image channels ``model`` takes: its ``in_channels``, else 3 (RGB).

  Args:
    model: a Flax module (a zoo model, or any model taking NHWC images),
      possibly wrapped by ``models.prunable``.

  Returns:
    The channel count of its input images.
  """
  # A ``models.prunable`` wrapper takes the images of the model it wraps.
  model = getattr(model, "plain_model", model)
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
