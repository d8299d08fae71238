"""torchvision-layout ResNet-18/34/50 with an ImageNet or a CIFAR stem.

The blocks follow torchvision v1.5: ``BasicBlock`` (two 3x3 convs) and
``Bottleneck`` (1x1 -> 3x3 -> 1x1, expansion 4, stride on the 3x3 conv), with
a 1x1-conv + BN ``downsample`` shortcut wherever the shape changes. Module
paths joined with '.' equal torchvision's state-dict prefixes (``conv1``,
``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``), so a
torchvision checkpoint maps one-to-one.

Stems:

* ``imagenet``: 7x7 stride-2 conv (pad 3), BN, ReLU, 3x3 stride-2 max-pool
  (pad 1); stage widths 64, 128, 256, 512.
* ``cifar``: 3x3 stride-1 conv (pad 1), BN, ReLU, no max-pool; stage widths
  8f, 16f, 32f, 64f with ``f = factor`` (the DDROP reference's CIFAR models).

Every conv except the stem and the shortcut convs takes part in DSP (the
graph derives it).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from models import layers
from models.cifar_resnet import Downsample

STEMS = ("imagenet", "cifar")
BLOCKS = ("basic", "bottleneck")
# Output channels of a block = planes * expansion.
EXPANSION = {"basic": 1, "bottleneck": 4}
# (block kind, blocks per stage) of each torchvision depth.
DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


class BasicBlock(nn.Module):
  """conv1 -> bn1 -> ReLU -> conv2 -> bn2, + shortcut, ReLU.

  Attributes:
    planes: output channels.
    strides: stride of ``conv1`` and of the shortcut.
    param_dtype: dtype of the variables.
  """

  planes: int
  strides: int = 1
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(param_dtype=self.param_dtype)
    bn = dict(param_dtype=self.param_dtype)
    y = layers.Conv(self.planes, 3, self.strides, 1, name="conv1", **kw)(x)
    y = nn.relu(layers.BatchNorm(name="bn1", **bn)(y, train))
    y = layers.Conv(self.planes, 3, 1, 1, name="conv2", **kw)(y)
    y = layers.BatchNorm(name="bn2", **bn)(y, train)
    if self.strides != 1 or x.shape[-1] != self.planes:
      x = Downsample(self.planes, self.strides, self.param_dtype,
                     name="downsample")(x, train)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """conv1 (1x1) -> conv2 (3x3, strided) -> conv3 (1x1, 4x planes), + shortcut.

  Attributes:
    planes: width of the inner convs; the block outputs ``4 * planes``.
    strides: stride of ``conv2`` (torchvision v1.5) and of the shortcut.
    param_dtype: dtype of the variables.
  """

  planes: int
  strides: int = 1
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(param_dtype=self.param_dtype)
    bn = dict(param_dtype=self.param_dtype)
    out = self.planes * EXPANSION["bottleneck"]
    y = layers.Conv(self.planes, 1, 1, 0, name="conv1", **kw)(x)
    y = nn.relu(layers.BatchNorm(name="bn1", **bn)(y, train))
    y = layers.Conv(self.planes, 3, self.strides, 1, name="conv2", **kw)(y)
    y = nn.relu(layers.BatchNorm(name="bn2", **bn)(y, train))
    y = layers.Conv(out, 1, 1, 0, name="conv3", **kw)(y)
    y = layers.BatchNorm(name="bn3", **bn)(y, train)
    if self.strides != 1 or x.shape[-1] != out:
      x = Downsample(out, self.strides, self.param_dtype,
                     name="downsample")(x, train)
    return nn.relu(x + y)


class Layer(nn.Module):
  """One stage (torchvision ``layerN``): blocks named ``0 .. blocks-1``."""

  block: str
  planes: int
  blocks: int
  strides: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cls = BasicBlock if self.block == "basic" else Bottleneck
    for b in range(self.blocks):
      x = cls(self.planes, self.strides if b == 0 else 1,
              self.param_dtype, name=str(b))(x, train)
    return x


class ResNet(nn.Module):
  """torchvision ResNet with an ImageNet or a CIFAR stem.

  Attributes:
    block: ``'basic'`` or ``'bottleneck'``.
    stage_sizes: blocks per stage (``layer1`` .. ``layerN``).
    num_classes: classifier outputs.
    stem: ``'imagenet'`` or ``'cifar'`` (see the module docstring).
    factor: CIFAR width factor; stage widths 8f, 16f, 32f, 64f.
    widths: explicit stage widths (``planes``); overrides the stem's default
      widths (used by the tiny test variant).
    image_size: expected input height/width; None accepts any size.
    param_dtype: dtype of the variables (float64 for parity checks).
    in_channels: image channels of the input (3: RGB; 1: grey images).
  """

  block: str = "basic"
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 1000
  stem: str = "imagenet"
  factor: int = 1
  widths: Sequence[int] | None = None
  image_size: int | None = None
  param_dtype: Any = jnp.float32
  in_channels: int = 3

  def stage_widths(self) -> tuple[int, ...]:
    """The ``planes`` of each stage."""
    if self.widths is not None:
      widths = tuple(self.widths)
    elif self.stem == "imagenet":
      widths = (64, 128, 256, 512)
    else:
      widths = tuple(8 * self.factor * 2**s for s in range(4))
    if len(widths) != len(self.stage_sizes):
      raise ValueError(
          f"ResNet: widths {widths} and stage_sizes {tuple(self.stage_sizes)} "
          "must have the same length")
    return widths

  def _validate(self) -> None:
    if self.block not in BLOCKS:
      raise ValueError(
          f"ResNet.block must be one of {BLOCKS}, got {self.block!r}")
    if self.stem not in STEMS:
      raise ValueError(f"ResNet.stem must be one of {STEMS}, got {self.stem!r}")
    if not isinstance(self.factor, int) or self.factor < 1:
      raise ValueError(f"ResNet.factor must be an integer >= 1, got "
                       f"{self.factor!r}")
    if not self.stage_sizes or min(self.stage_sizes) < 1:
      raise ValueError("ResNet.stage_sizes must be non-empty positive counts, "
                       f"got {tuple(self.stage_sizes)}")

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    self._validate()
    widths = self.stage_widths()
    depth = sum(self.stage_sizes) * (2 if self.block == "basic" else 3) + 2
    layers.check_input(x, self.in_channels, self.image_size,
                       f"ResNet-{depth} ({self.stem} stem)")
    pd = self.param_dtype
    if self.stem == "imagenet":
      x = layers.Conv(widths[0], 7, 2, 3, name="conv1", param_dtype=pd)(x)
    else:
      x = layers.Conv(widths[0], 3, 1, 1, name="conv1", param_dtype=pd)(x)
    x = nn.relu(layers.BatchNorm(name="bn1", param_dtype=pd)(x, train))
    if self.stem == "imagenet":
      # torch's MaxPool2d pads with -inf, as reduce_window's init value here.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, (planes, blocks) in enumerate(zip(widths, self.stage_sizes)):
      x = Layer(self.block, planes, blocks, 1 if s == 0 else 2,
                pd, name=f"layer{s + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    # torchvision keeps nn.Linear's default init for fc (Dense's default).
    return layers.Dense(self.num_classes, name="fc", param_dtype=pd)(x)


def resnet(depth: int, num_classes: int = 1000, **overrides: Any) -> ResNet:
  """A torchvision ResNet of the given depth.

  Args:
    depth: 18, 34 or 50.
    num_classes: classifier outputs.
    **overrides: other ``ResNet`` attributes (``stem``, ``factor``,
      ``groups``, ``image_size``, ``param_dtype``, ...).

  Returns:
    The module.
  """
  if depth not in DEPTHS:
    raise ValueError(
        f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth!r}")
  block, stage_sizes = DEPTHS[depth]
  return ResNet(block=block, stage_sizes=stage_sizes, num_classes=num_classes,
                **overrides)
