"""VGG-11/13/16/19 with BatchNorm in torchvision's layout (``vgg*_bn``).

``features`` is torchvision's Sequential: every conv entry of the config
occupies three indices (conv, BN, ReLU) and every max-pool one, so module
paths are ``features.0`` (conv), ``features.1`` (BN), ``features.3`` (conv)
... exactly as torchvision's state-dict prefixes. Two heads:

* ``imagenet`` (torchvision): adaptive average pool to 7x7, flatten,
  ``classifier.0`` Linear(512*49, 4096), ReLU, Dropout, ``classifier.3``
  Linear(4096, 4096), ReLU, Dropout, ``classifier.6`` Linear(4096, classes).
  The flatten here is NHWC (H, W, C order); PyTorch flattens (C, H, W), so a
  converter must permute the input rows of ``classifier.0``: torch weight
  ``(out, C*7*7)`` -> ``reshape(out, C, 7, 7).transpose(2, 3, 1, 0)
  .reshape(7*7*C, out)``.
* ``cifar`` (the DDROP reference): global average pool, then
  ``classifier.{0,4}`` Linear(C, hidden) each followed by LayerNorm
  (``.1``/``.5``), ReLU and Dropout, and ``classifier.8`` Linear(hidden,
  classes).

Initialisation is torchvision's VGG init for both heads: conv kaiming normal
(fan_out, ReLU), conv bias 0, BN and LayerNorm 1/0, Linear N(0, 0.01), bias
0 (``linear_std`` changes the 0.01).

Every conv except the first (the stem) takes part in DSP (the graph derives
it).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models import layers

HEADS = ("imagenet", "cifar")
# torchvision's feature configs: channels of each 3x3 conv, 'M' a 2x2 max-pool.
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512,
         "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512,
         512, "M", 512, 512, 512, 512, "M"),
}

LINEAR_STD = 0.01  # torchvision's Linear init, N(0, 0.01)


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
  """``(out, size)`` averaging matrix of ``torch.nn.AdaptiveAvgPool1d``.

  Output bin ``i`` averages inputs ``floor(i*size/out)`` up to (excluding)
  ``ceil((i+1)*size/out)``, PyTorch's bins (overlapping when ``size`` is not
  a multiple of ``out``; repeating inputs when ``size < out``).

  Args:
    size: input length.
    out: output length.

  Returns:
    The float64 matrix.
  """
  m = np.zeros((out, size))
  for i in range(out):
    start, end = (i * size) // out, -((-(i + 1) * size) // out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
  """``AdaptiveAvgPool2d((out, out))`` of an NHWC batch."""
  ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], out), x.dtype)
  pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], out), x.dtype)
  return jnp.einsum("oh,nhwc,pw->nopc", ph, x, pw)


class Features(nn.Module):
  """torchvision's ``features`` Sequential, modules named by their index.

  Attributes:
    config: conv widths and ``'M'`` (2x2 max-pool, stride 2).
    param_dtype: dtype of the variables.
  """

  config: Sequence[int | str]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    index = 0
    for v in self.config:
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        index += 1
        continue
      x = layers.Conv(int(v), 3, 1, 1, use_bias=True,
                      param_dtype=self.param_dtype, name=str(index))(x)
      x = layers.BatchNorm(param_dtype=self.param_dtype,
                           name=str(index + 1))(x, train)
      x = nn.relu(x)
      index += 3
    return x


class Classifier(nn.Module):
  """torchvision's ``classifier`` Sequential, modules named by their index.

  Hidden blocks are Linear [-> LayerNorm] -> ReLU -> Dropout; the last entry
  is the output Linear.

  Attributes:
    hidden: width of the hidden Linear layers.
    num_classes: outputs.
    layer_norm: insert a LayerNorm after each hidden Linear (CIFAR head).
    num_hidden: number of hidden blocks.
    dropout_rate: Dropout rate (uses the ``'dropout'`` rng in training).
    linear_std: std of the Linear layers' normal initialisation.
    param_dtype: dtype of the variables.
  """

  hidden: int
  num_classes: int
  layer_norm: bool
  num_hidden: int = 2
  dropout_rate: float = 0.5
  linear_std: float = LINEAR_STD
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dense = dict(kernel_init=nn.initializers.normal(self.linear_std),
                 bias_init=nn.initializers.zeros,
                 param_dtype=self.param_dtype)
    index = 0
    for _ in range(self.num_hidden):
      x = layers.Dense(self.hidden, name=str(index), **dense)(x)
      index += 1
      if self.layer_norm:
        x = layers.LayerNorm(param_dtype=self.param_dtype,
                             name=str(index))(x)
        index += 1
      x = nn.relu(x)
      x = nn.Dropout(self.dropout_rate, name=str(index + 1))(
          x, deterministic=not train)
      index += 2
    return layers.Dense(self.num_classes, name=str(index), **dense)(x)


class VGG(nn.Module):
  """VGG with BatchNorm (torchvision ``vgg*_bn``) and an ImageNet/CIFAR head.

  Attributes:
    config: feature config (``CONFIGS[depth]`` or a custom one).
    num_classes: classifier outputs.
    head: ``'imagenet'`` (7x7 adaptive pool, 4096-wide hidden layers) or
      ``'cifar'`` (global average pool, LayerNorm hidden layers).
    hidden: hidden width; None means 4096 (ImageNet) or the last conv width
      (CIFAR: 512).
    dropout_rate: rate of the classifier's Dropout layers.
    linear_std: std of the classifier Linears' normal init (torchvision:
      0.01).
    pool_size: ImageNet head's adaptive pool output size.
    image_size: expected input height/width; None accepts any size that
      survives the max-pools.
    param_dtype: dtype of the variables (float64 for parity checks).
    in_channels: image channels of the input (3: RGB; 1: grey images).
  """

  config: Sequence[int | str] = CONFIGS[16]
  num_classes: int = 1000
  head: str = "imagenet"
  hidden: int | None = None
  dropout_rate: float = 0.5
  linear_std: float = LINEAR_STD
  pool_size: int = 7
  image_size: int | None = None
  param_dtype: Any = jnp.float32
  in_channels: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.head not in HEADS:
      raise ValueError(f"VGG.head must be one of {HEADS}, got {self.head!r}")
    convs = [v for v in self.config if v != "M"]
    if not convs or any(not isinstance(v, int) or v < 1 for v in convs):
      raise ValueError("VGG.config must hold positive conv widths and 'M', "
                       f"got {tuple(self.config)}")
    name = f"VGG-{len(convs) + 3}-bn ({self.head} head)"
    layers.check_input(x, self.in_channels, self.image_size, name)
    pools = sum(v == "M" for v in self.config)
    if min(x.shape[1:3]) < 2**pools:
      raise ValueError(
          f"{name} has {pools} max-pools and needs input height and width "
          f">= {2**pools}, got shape {tuple(x.shape)}")
    x = Features(self.config, self.param_dtype,
                 name="features")(x, train)
    if self.head == "imagenet":
      x = adaptive_avg_pool(x, self.pool_size).reshape(x.shape[0], -1)
      hidden, layer_norm = self.hidden or 4096, False
    else:
      x = jnp.mean(x, axis=(1, 2))
      hidden, layer_norm = self.hidden or convs[-1], True
    return Classifier(hidden, self.num_classes, layer_norm,
                      dropout_rate=self.dropout_rate,
                      linear_std=self.linear_std, param_dtype=self.param_dtype, name="classifier")(x, train)


def vgg(depth: int, num_classes: int = 1000, **overrides: Any) -> VGG:
  """A VGG-bn of the given depth with torchvision's feature config.

  Args:
    depth: 11, 13, 16 or 19.
    num_classes: classifier outputs.
    **overrides: other ``VGG`` attributes (``head``,
      ``dropout_rate``, ``image_size``, ``param_dtype``, ...).

  Returns:
    The module.
  """
  if depth not in CONFIGS:
    raise ValueError(
        f"VGG depth must be one of {sorted(CONFIGS)}, got {depth!r}")
  return VGG(config=CONFIGS[depth], num_classes=num_classes, **overrides)
