"""Swin Transformer (torchvision's ``swin_t`` architecture, V1) in Flax.

Patch embedding (stride-``patch`` conv + LayerNorm), stages of Swin blocks
(LayerNorm -> shifted-window attention with a relative position bias ->
residual, LayerNorm -> MLP -> residual; odd blocks shift the windows by
``window // 2`` with torchvision's cyclic-shift attention mask), patch
merging between stages (2x2 neighbours concatenated, LayerNorm, Linear 4C ->
2C without bias), a final LayerNorm, global average pool and a Linear head.
Feature maps are padded to multiples of the window and cropped back, and a
window at least as large as the (padded) map is not shifted, all as
torchvision does, so any image size that is a multiple of the patch size
works. Module paths follow torchvision's::

  features/0/{0 conv, 2 norm}, features/{1,3,5,7}/{j}/{norm1, attn, norm2, mlp},
  features/{2,4,6}/{norm, reduction}, norm, head

except that the attention's fused ``qkv`` is ``attn/{query,key,value}`` and
the MLP's ``mlp.0`` / ``mlp.3`` are ``mlp/fc1`` / ``mlp/fc2`` (the
converter's name tables map them); ``mlp_scale`` adds DDROP's
``mlp/dummy_norm``. Stochastic depth is not implemented (evaluation is
exact; training runs without it).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models import layers
from models.transformer import Attention, Mlp, check_divisible

LN_EPS = 1e-5
linear_init = nn.initializers.truncated_normal(0.02)


def attention_mask(pad_h: int, pad_w: int, window: int,
                   shift: tuple[int, int]) -> np.ndarray:
  """torchvision's shifted-window mask, (windows, w*w, w*w), 0 or -100."""
  img = np.zeros((pad_h, pad_w), np.float32)
  h_slices = ((0, -window), (-window, -shift[0]), (-shift[0], None))
  w_slices = ((0, -window), (-window, -shift[1]), (-shift[1], None))
  count = 0
  for h in h_slices:
    for w in w_slices:
      img[h[0]:h[1], w[0]:w[1]] = count
      count += 1
  m = img.reshape(pad_h // window, window, pad_w // window, window)
  m = m.transpose(0, 2, 1, 3).reshape(-1, window * window)
  diff = m[:, None, :] - m[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


class SwinBlock(nn.Module):
  """Swin block (torchvision ``SwinTransformerBlock``)."""

  heads: int
  window: int
  shift: int
  mlp_ratio: float = 4.0
  mlp_scale: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.param_dtype
    c = x.shape[-1]
    y = layers.LayerNorm(LN_EPS, dt, name="norm1")(x)
    y = window_attention(y, self.window, self.shift, Attention(
        self.heads, "proj", window=self.window, kernel_init=linear_init,
        bias_init=nn.initializers.zeros, param_dtype=dt, name="attn"))
    x = x + y
    y = layers.LayerNorm(LN_EPS, dt, name="norm2")(x)
    y = Mlp(int(c * self.mlp_ratio), self.mlp_scale, kernel_init=linear_init,
            bias_init=nn.initializers.zeros, param_dtype=dt,
            name="mlp")(y)
    return x + y


def window_attention(x: jax.Array, window: int, shift: int,
                     attend: Attention) -> jax.Array:
  """torchvision's ``shifted_window_attention`` around ``attend``.

  Args:
    x: (B, H, W, C) map.
    window: window side.
    shift: cyclic shift (0 for even blocks).
    attend: the attention module, applied to (B, windows, w*w, C) tokens.

  Returns:
    The (B, H, W, C) result.
  """
  b, h, w, c = x.shape
  ws = window
  pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
  x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
  ph, pw = h + pad_b, w + pad_r
  shifts = (0 if ws >= ph else shift, 0 if ws >= pw else shift)
  if sum(shifts):
    x = jnp.roll(x, (-shifts[0], -shifts[1]), axis=(1, 2))
  nh, nw = ph // ws, pw // ws
  x = x.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, nh * nw, ws * ws, c)
  mask = None
  if sum(shifts):
    # (windows, 1, N, N): broadcast over the batch and the heads.
    mask = jnp.asarray(attention_mask(ph, pw, ws, shifts), x.dtype)[:, None]
  x = attend(x, mask)
  x = x.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, ph, pw, c)
  if sum(shifts):
    x = jnp.roll(x, shifts, axis=(1, 2))
  return x[:, :h, :w]


class PatchMerging(nn.Module):
  """2x2 neighbours -> LayerNorm(4C) -> Linear(4C, 2C, no bias)."""

  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, w = x.shape[1:3]
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                         x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = layers.LayerNorm(LN_EPS, self.param_dtype, name="norm")(x)
    return layers.Dense(x.shape[-1] // 2, use_bias=False,
                        kernel_init=linear_init,
                        param_dtype=self.param_dtype, name="reduction")(x)


class _PatchEmbed(nn.Module):
  dim: int
  patch: int
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch
    x = layers.Conv(self.dim, p, p, 0, use_bias=True,
                    kernel_init=layers.torch_linear_init(3 * p * p),
                    param_dtype=self.param_dtype, name="0")(x)
    return layers.LayerNorm(LN_EPS, self.param_dtype, name="2")(x)


class _Stage(nn.Module):
  depth: int
  heads: int
  window: int
  mlp_ratio: float
  mlp_scale: bool
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.depth):
      x = SwinBlock(self.heads, self.window, 0 if j % 2 == 0 else
                    self.window // 2, self.mlp_ratio, self.mlp_scale,
                    self.param_dtype, name=str(j))(x)
    return x


class _Features(nn.Module):
  patch: int
  embed_dim: int
  depths: Sequence[int]
  heads: Sequence[int]
  window: int
  mlp_ratio: float
  mlp_scale: bool
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.param_dtype
    x = _PatchEmbed(self.embed_dim, self.patch, dt, name="0")(x)
    index = 1
    for s, (depth, heads) in enumerate(zip(self.depths, self.heads)):
      x = _Stage(depth, heads, self.window, self.mlp_ratio, self.mlp_scale,
                 dt, name=str(index))(x)
      index += 1
      if s + 1 < len(self.depths):
        x = PatchMerging(dt, name=str(index))(x)
        index += 1
    return x


class SwinTransformer(nn.Module):
  """Swin Transformer V1 (torchvision layout), NHWC input.

  Attributes:
    image_size: expected input height = width (a multiple of
      ``patch_size``); None accepts any such size.
    patch_size: patch side.
    embed_dim: width of the first stage (doubled by every patch merging).
    depths: blocks per stage.
    num_heads: attention heads per stage.
    window_size: attention window side.
    mlp_ratio: MLP hidden units per token width.
    num_classes: head outputs.
    mlp_scale: add DDROP's ``dummy_norm`` after every ``fc1``.
    param_dtype: dtype of the variables.
    in_channels: image channels of the input (3: RGB; 1: grey images).
  """

  image_size: int | None = 224
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  mlp_scale: bool = False
  param_dtype: Any = jnp.float32
  in_channels: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    name = f"Swin (patch {self.patch_size}, window {self.window_size})"
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"{name}: depths {tuple(self.depths)} and num_heads "
                       f"{tuple(self.num_heads)} differ in length")
    check_divisible(name, self.image_size, self.patch_size, self.window_size)
    layers.check_input(x, self.in_channels, self.image_size, name)
    if self.image_size is None:
      for size in x.shape[1:3]:
        check_divisible(name, size, self.patch_size, self.window_size)
    dt = self.param_dtype
    x = _Features(self.patch_size, self.embed_dim, tuple(self.depths),
                  tuple(self.num_heads), self.window_size, self.mlp_ratio,
                  self.mlp_scale, dt, name="features")(x)
    x = layers.LayerNorm(LN_EPS, dt, name="norm")(x)
    x = jnp.mean(x, axis=(1, 2))
    return layers.Dense(self.num_classes, kernel_init=linear_init,
                        bias_init=nn.initializers.zeros, param_dtype=dt,
                        name="head")(x)


def swin(variant: str, num_classes: int = 1000, **overrides: Any
         ) -> SwinTransformer:
  """A Swin of a named size (``VARIANTS``) with attributes overridden."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown Swin variant {variant!r}; valid: "
                     f"{', '.join(VARIANTS)}")
  return SwinTransformer(num_classes=num_classes,
                         **{**VARIANTS[variant], **overrides})


VARIANTS: dict[str, dict[str, Any]] = {
    "t": dict(image_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2),
              num_heads=(3, 6, 12, 24), window_size=7),
    # Tests and CPU demos: 32x32 input, 2x2 patches, 4x4 windows, two stages.
    "tiny": dict(image_size=32, patch_size=2, embed_dim=16, depths=(2, 2),
                 num_heads=(2, 4), window_size=4),
}
