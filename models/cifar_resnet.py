"""DSP's CIFAR ResNet (``CifarResNet`` of the reference), depth 6n+2.

Stem 3x3 conv (16) -> BN -> ReLU, three stages of n basic blocks with 16, 32
and 64 channels (stride 2 at the first block of stages 2 and 3), option-B
shortcuts (1x1 conv + BN) where the shape changes, global average pooling and
a linear classifier. Module paths equal the reference's PyTorch names
(``conv_1_3x3``, ``bn_1``, ``stage_1.0.conv_a``, ``stage_2.0.downsample.0``,
``classifier``), so checkpoints map one-to-one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from models import layers


class Downsample(nn.Module):
  """Option-B shortcut: ``downsample.0`` (1x1 conv) and ``downsample.1`` (BN)."""

  features: int
  strides: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.Conv(self.features, 1, self.strides, 0, name="0",
                    param_dtype=self.param_dtype)(x)
    return layers.BatchNorm(name="1", param_dtype=self.param_dtype)(x, train)


class BasicBlock(nn.Module):
  """conv_a -> bn_a -> ReLU -> conv_b -> bn_b, + shortcut, ReLU."""

  features: int
  strides: int = 1
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(param_dtype=self.param_dtype)
    y = layers.Conv(self.features, 3, self.strides, 1, name="conv_a", **kw)(x)
    y = layers.BatchNorm(name="bn_a", param_dtype=self.param_dtype)(y, train)
    y = nn.relu(y)
    y = layers.Conv(self.features, 3, 1, 1, name="conv_b", **kw)(y)
    y = layers.BatchNorm(name="bn_b", param_dtype=self.param_dtype)(y, train)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = Downsample(self.features, self.strides, self.param_dtype,
                     name="downsample")(x, train)
    return nn.relu(x + y)


class Stage(nn.Module):
  """``blocks`` basic blocks named ``0 .. blocks-1`` (PyTorch ``stage_s.b``)."""

  features: int
  blocks: int
  strides: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for b in range(self.blocks):
      x = BasicBlock(self.features, self.strides if b == 0 else 1,
                     self.param_dtype, name=str(b))(x, train)
    return x


class CifarResNet(nn.Module):
  """CIFAR ResNet of depth 6n+2 (20, 32, 44, 56, 110; 8 is the tiny variant).

  Attributes:
    depth: network depth, 6n+2.
    num_classes: classifier outputs.
    widths: channels of the stem and of the three stages.
    image_size: expected input height/width; None accepts any size.
    param_dtype: dtype of the variables (float64 for parity checks).
    in_channels: image channels of the input (3: RGB; 1: grey images).
  """

  depth: int = 20
  num_classes: int = 10
  widths: tuple[int, int, int] = (16, 32, 64)
  image_size: int | None = 32
  param_dtype: Any = jnp.float32
  in_channels: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if (self.depth - 2) % 6 or self.depth < 8:
      raise ValueError(f"CifarResNet depth must be 6n+2 >= 8, got {self.depth}")
    layers.check_input(x, self.in_channels, self.image_size,
                       f"CifarResNet-{self.depth}")
    n = (self.depth - 2) // 6
    pd = self.param_dtype
    x = layers.Conv(self.widths[0], 3, 1, 1, name="conv_1_3x3",
                    param_dtype=pd)(x)
    x = nn.relu(layers.BatchNorm(name="bn_1", param_dtype=pd)(x, train))
    for s, width in enumerate(self.widths):
      x = Stage(width, n, 1 if s == 0 else 2, pd,
                name=f"stage_{s + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return layers.Dense(
        self.num_classes, name="classifier", param_dtype=pd,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
        bias_init=nn.initializers.zeros)(x)
