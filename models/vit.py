"""Vision Transformer (torchvision's ``vit_b_16`` architecture) in Flax.

``conv_proj`` patch embedding (a stride-``patch`` conv), a class token, a
learned position embedding, ``num_layers`` pre-norm encoder blocks
(LayerNorm -> multi-head self-attention -> residual, LayerNorm -> MLP with
exact GELU -> residual), a final LayerNorm and a Linear head on the class
token. LayerNorm eps is 1e-6, as torchvision's. Module paths follow
torchvision's names where the tensors are the same::

  conv_proj, class_token, encoder/pos_embedding,
  encoder/layers/encoder_layer_{i}/{ln_1, self_attention, ln_2, mlp},
  encoder/ln, heads/head

with two differences the converter's name tables cover: the attention has
separate ``query``/``key``/``value`` Dense layers (torchvision: one fused
``in_proj_weight``), and the MLP's Linears are ``mlp/fc1`` / ``mlp/fc2``
(torchvision: ``mlp.0`` / ``mlp.3``). With ``mlp_scale`` (DDROP) every MLP
has a ``dummy_norm`` after ``fc1``. The image size is fixed by the position
embedding and must be a multiple of the patch size.

Initialisation follows torchvision: conv_proj truncated normal with std
sqrt(1 / fan_in), MLP Linears Xavier-uniform with N(0, 1e-6) biases,
attention Xavier-uniform with zero biases, position embedding N(0, 0.02),
class token and head zero.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from models import layers
from models.transformer import Attention, Mlp, check_divisible

LN_EPS = 1e-6


class EncoderBlock(nn.Module):
  """Pre-norm transformer block (torchvision ``EncoderBlock``)."""

  heads: int
  mlp_dim: int
  mlp_scale: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.param_dtype
    y = layers.LayerNorm(LN_EPS, dt, name="ln_1")(x)
    y = Attention(self.heads, "out_proj",
                  kernel_init=nn.initializers.xavier_uniform(),
                  bias_init=nn.initializers.zeros, param_dtype=dt,
                  name="self_attention")(y)
    x = x + y
    y = layers.LayerNorm(LN_EPS, dt, name="ln_2")(x)
    y = Mlp(self.mlp_dim, self.mlp_scale,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(1e-6), param_dtype=dt,
            name="mlp")(y)
    return x + y


class _Layers(nn.Module):
  """torchvision's ``encoder.layers`` container."""

  num_layers: int
  heads: int
  mlp_dim: int
  mlp_scale: bool
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = EncoderBlock(self.heads, self.mlp_dim, self.mlp_scale,
                       self.param_dtype,
                       name=f"encoder_layer_{i}")(x)
    return x


class Encoder(nn.Module):
  """Position embedding, the blocks and the final LayerNorm."""

  num_layers: int
  heads: int
  mlp_dim: int
  mlp_scale: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (1,) + x.shape[1:], self.param_dtype)
    x = x + pos
    x = _Layers(self.num_layers, self.heads, self.mlp_dim, self.mlp_scale,
                self.param_dtype, name="layers")(x)
    return layers.LayerNorm(LN_EPS, self.param_dtype, name="ln")(x)


class _Heads(nn.Module):
  num_classes: int
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                        bias_init=nn.initializers.zeros,
                        param_dtype=self.param_dtype, name="head")(x)


class VisionTransformer(nn.Module):
  """ViT (torchvision layout), NHWC input of ``image_size`` x ``image_size``.

  Attributes:
    image_size: input height = width (a multiple of ``patch_size``).
    patch_size: patch side (conv_proj kernel and stride).
    num_layers: encoder blocks.
    num_heads: attention heads.
    hidden_dim: token width.
    mlp_dim: MLP hidden units per block.
    num_classes: head outputs.
    mlp_scale: add DDROP's ``dummy_norm`` after every ``fc1``.
    param_dtype: dtype of the variables.
    in_channels: image channels of the input (3: RGB; 1: grey images).
  """

  image_size: int = 224
  patch_size: int = 16
  num_layers: int = 12
  num_heads: int = 12
  hidden_dim: int = 768
  mlp_dim: int = 3072
  num_classes: int = 1000
  mlp_scale: bool = False
  param_dtype: Any = jnp.float32
  in_channels: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    name = f"ViT (patch {self.patch_size})"
    check_divisible(name, self.image_size, self.patch_size)
    layers.check_input(x, self.in_channels, self.image_size, name)
    dt = self.param_dtype
    p = self.patch_size
    fan_in = self.in_channels * p * p
    x = layers.Conv(self.hidden_dim, p, p, 0, use_bias=True,
                    kernel_init=nn.initializers.truncated_normal(
                        math.sqrt(1.0 / fan_in)),
                    param_dtype=dt, name="conv_proj")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    cls = self.param("class_token", nn.initializers.zeros, (1, 1, c), dt)
    x = jnp.concatenate(
        [jnp.broadcast_to(cls, (n, 1, c)).astype(x.dtype), x], axis=1)
    x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.mlp_scale,
                dt, name="encoder")(x)
    return _Heads(self.num_classes, dt, name="heads")(x[:, 0])


def vit(variant: str, num_classes: int = 1000, **overrides: Any
        ) -> VisionTransformer:
  """A ViT of a named size (``VARIANTS``) with attributes overridden."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; valid: "
                     f"{', '.join(VARIANTS)}")
  return VisionTransformer(num_classes=num_classes,
                           **{**VARIANTS[variant], **overrides})


VARIANTS: dict[str, dict[str, Any]] = {
    "b_16": dict(image_size=224, patch_size=16, num_layers=12, num_heads=12,
                 hidden_dim=768, mlp_dim=3072),
    # Tests and CPU demos: 32x32 input, 8x8 patches (16 tokens + class).
    "tiny": dict(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                 hidden_dim=32, mlp_dim=64),
}
