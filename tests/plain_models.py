"""Models written in plain Flax, the way users write them (test helpers).

Nothing here uses the project's layers: ``nn.Conv``, ``nn.BatchNorm``,
``nn.Dense``, ``nn.LayerNorm`` as the Flax examples use them.

* ``ResNet``: the Flax examples' ResNet (``examples/imagenet/models.py``
  style): ``stage_sizes`` given as a list, basic or bottleneck blocks, a
  ``conv_proj``/``norm_proj`` projection shortcut, ``train`` defaulting to
  True.
* ``MobileNetV2``: inverted residuals (1x1 expand, 3x3 depthwise conv with
  ``feature_group_count``, 1x1 project, ReLU6), residual when the shape
  allows.
* ``ConvNeXt``: depthwise 7x7 conv, LayerNorm, a Dense MLP with GELU, a
  per-channel layer scale ``gamma``; no ``train`` argument.
* ``DenseNet``: a dense block (BN -> ReLU -> conv, concatenated to its
  input) and a transition.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax.numpy as jnp
from flax import linen as nn

ModuleDef = Any


class ResNetBlock(nn.Module):
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides,
                           name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (1, 1))(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3), self.strides)(y)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides,
                           name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int = 10
  num_filters: int = 8
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5)
    x = conv(self.num_filters, (3, 3), name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = nn.relu(x)
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(self.num_filters * 2**i, strides=strides,
                           conv=conv, norm=norm, act=self.act)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


# The Flax examples pass stage sizes as a list.
ResNetTiny = functools.partial(ResNet, stage_sizes=[1, 1],
                               block_cls=ResNetBlock)
BottleneckTiny = functools.partial(ResNet, stage_sizes=[1, 1],
                                   block_cls=BottleneckResNetBlock,
                                   num_filters=16)


class InvertedResidual(nn.Module):
  out: int
  expand: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train)
    hidden = x.shape[-1] * self.expand
    y = nn.Conv(hidden, (1, 1), use_bias=False, name="expand")(x)
    y = nn.relu6(norm(name="expand_bn")(y))
    y = nn.Conv(hidden, (3, 3), (self.strides, self.strides),
                feature_group_count=hidden, use_bias=False,
                name="depthwise")(y)
    y = nn.relu6(norm(name="depthwise_bn")(y))
    y = nn.Conv(self.out, (1, 1), use_bias=False, name="project")(y)
    y = norm(name="project_bn")(y)
    if self.strides == 1 and x.shape[-1] == self.out:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), (2, 2), use_bias=False, name="stem")(x)
    x = nn.relu6(nn.BatchNorm(use_running_average=not train,
                              name="stem_bn")(x))
    x = InvertedResidual(8, 2, name="block1")(x, train)    # residual
    x = InvertedResidual(12, 2, 2, name="block2")(x, train)
    x = InvertedResidual(12, 2, name="block3")(x, train)   # residual
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


class ConvNeXtBlock(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.dim, (7, 7), feature_group_count=self.dim,
                name="dwconv")(x)
    y = nn.LayerNorm(epsilon=1e-6, name="norm")(y)
    y = nn.Dense(4 * self.dim, name="pwconv1")(y)
    y = nn.gelu(y)
    y = nn.Dense(self.dim, name="pwconv2")(y)
    gamma = self.param("gamma", nn.initializers.constant(1e-1), (self.dim,))
    return x + gamma * y


class ConvNeXt(nn.Module):
  num_classes: int = 10
  dims: Sequence[int] = (8, 16)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.dims[0], (2, 2), (2, 2), name="stem")(x)
    x = nn.LayerNorm(epsilon=1e-6, name="stem_norm")(x)
    for i, dim in enumerate(self.dims):
      if i > 0:
        x = nn.LayerNorm(epsilon=1e-6, name=f"down_norm{i}")(x)
        x = nn.Conv(dim, (2, 2), (2, 2), name=f"down{i}")(x)
      x = ConvNeXtBlock(dim, name=f"stage{i}")(x)
    x = nn.LayerNorm(epsilon=1e-6, name="head_norm")(jnp.mean(x, (1, 2)))
    return nn.Dense(self.num_classes, name="head")(x)


class DenseNet(nn.Module):
  num_classes: int = 10
  growth: int = 4
  layers: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train)
    x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
    for i in range(self.layers):
      y = nn.relu(norm(name=f"dense{i}_bn")(x))
      y = nn.Conv(self.growth, (3, 3), use_bias=False, name=f"dense{i}")(y)
      x = jnp.concatenate([x, y], axis=-1)
    x = nn.relu(norm(name="transition_bn")(x))
    x = nn.Conv(8, (1, 1), use_bias=False, name="transition")(x)
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(norm(name="final_bn")(x))
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, (1, 2)))
