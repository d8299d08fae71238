"""Pieces shared by the vision transformers (``models.vit``, ``models.swin``).

* ``DummyNorm``: DDROP's learnable per-unit scale (spec ddrop.md section 2),
  initialised to 1; to the channel graph it is a norm right after ``fc1``,
  so DDROP acts on its output and ranks units by it.
* ``Mlp``: ``fc1`` (Dense) -> [``dummy_norm``] -> GELU -> ``fc2`` (Dense);
  the hidden units are ``fc1``'s outputs, the units DDROP drops and prunes
  (DSP treats both Linears as 1x1 convolutions over the tokens).
* ``Attention``: multi-head attention over a token axis from separate
  ``query``, ``key`` and ``value`` Dense layers and an output projection (the
  fused PyTorch ``qkv`` / ``in_proj`` weights are split on import, merged on
  export), with an optional additive bias on the attention logits.

Attention mixes tokens (and, through the head split, the q/k/v units); the
channel-flow structure sees its q/k/v outputs meet another activation in a
contraction and marks them mixed, so only the MLP hidden units are prunable.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models import layers

Array = jax.Array


class DummyNorm(nn.Module):
  """``y = x * scale`` per unit (last axis), scale initialised to 1."""

  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],),
                       self.param_dtype)
    return x * scale


class Mlp(nn.Module):
  """Transformer MLP block: fc1 -> (DummyNorm) -> GELU (exact) -> fc2.

  Attributes:
    hidden: hidden units (fc1 outputs).
    scale: insert the DDROP ``dummy_norm`` after fc1.
    kernel_init, bias_init: Dense initialisers (None: torch.nn.Linear's).
    param_dtype: dtype of the variables.
  """

  hidden: int
  scale: bool = False
  kernel_init: Callable[..., Array] | None = None
  bias_init: Callable[..., Array] | None = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(kernel_init=self.kernel_init, bias_init=self.bias_init,
              param_dtype=self.param_dtype)
    y = layers.Dense(self.hidden, name="fc1", **kw)(x)
    if self.scale:
      y = DummyNorm(self.param_dtype, name="dummy_norm")(y)
    y = nn.gelu(y, approximate=False)
    return layers.Dense(x.shape[-1], name="fc2", **kw)(y)


def split_heads(x: Array, heads: int) -> Array:
  """(..., N, D) -> (..., heads, N, D / heads)."""
  *lead, n, d = x.shape
  return jnp.swapaxes(x.reshape(*lead, n, heads, d // heads), -3, -2)


def merge_heads(x: Array) -> Array:
  """(..., heads, N, d) -> (..., N, heads * d)."""
  *lead, h, n, d = x.shape
  return jnp.swapaxes(x, -3, -2).reshape(*lead, n, h * d)


class Attention(nn.Module):
  """Multi-head self-attention over axis -2 of (..., N, D) tokens.

  Attributes:
    heads: attention heads (must divide D).
    out_name: name of the output projection (``out_proj`` in torchvision's
      ViT, ``proj`` in Swin).
    window: Swin's window side; when set the module holds a
      ``relative_position_bias_table`` ((2w-1)^2, heads) added to the logits
      at ``relative_position_index(window)``.
    kernel_init, bias_init: Dense initialisers (None: torch.nn.Linear's).
    param_dtype: dtype of the variables.
  """

  heads: int
  out_name: str = "out_proj"
  window: int | None = None
  kernel_init: Callable[..., Array] | None = None
  bias_init: Callable[..., Array] | None = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Array | None = None) -> Array:
    """Attention of ``x`` with an optional additive logit ``bias``."""
    d = x.shape[-1]
    if d % self.heads:
      raise ValueError(f"{'/'.join(self.scope.path)}: {self.heads} heads do "
                       f"not divide the width {d}")
    kw = dict(kernel_init=self.kernel_init, bias_init=self.bias_init,
              param_dtype=self.param_dtype)
    q, k, v = (split_heads(layers.Dense(d, name=n, **kw)(x), self.heads)
               for n in ("query", "key", "value"))
    q = q * (d // self.heads) ** -0.5
    logits = jnp.einsum("...qd,...kd->...qk", q, k)
    if self.window is not None:
      n = self.window * self.window
      table = self.param("relative_position_bias_table",
                         nn.initializers.truncated_normal(0.02),
                         ((2 * self.window - 1) ** 2, self.heads),
                         self.param_dtype)
      rel = table[relative_position_index(self.window)].reshape(n, n, -1)
      logits = logits + jnp.transpose(rel, (2, 0, 1)).astype(logits.dtype)
    if bias is not None:
      logits = logits + bias
    w = jax.nn.softmax(logits, axis=-1)
    y = merge_heads(jnp.einsum("...qk,...kd->...qd", w, v))
    return layers.Dense(d, name=self.out_name, **kw)(y)


def relative_position_index(window: int) -> np.ndarray:
  """Swin's (w*w * w*w,) index into the relative position bias table."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window),
                                indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel = rel + (window - 1)
  return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).reshape(-1)


def check_divisible(model: str, image_size: int | None, patch: int,
                    window: int | None = None) -> None:
  """A clear error when ``image_size`` is no multiple of the patch size."""
  if image_size is None:
    return
  if image_size < patch or image_size % patch:
    win = f" (window {window})" if window is not None else ""
    raise ValueError(f"{model}: image size {image_size} is incompatible with "
                     f"patch size {patch}{win}: it must be a positive "
                     f"multiple of {patch}")
