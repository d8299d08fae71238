"""On-device image augmentation and normalisation (pure, jittable).

The loaders yield uint8 NHWC batches; the train step calls ``cifar_augment``
with an explicit rng, the eval step only normalises (``normalize``): no
cropping, flipping or resizing at evaluation.

``cifar_augment`` follows torchvision's ``RandomCrop(32, padding=4)`` +
``RandomHorizontalFlip()`` on the PIL image followed by ``ToTensor`` and
``Normalize``: the padding is zeros in pixel space (black), applied before
normalisation, so padded pixels normalise to ``-mean/std``. The padding is
the dataset's (``DatasetInfo.crop_pad``: 4 for the 32x32 datasets, 2 for
Fashion-MNIST's 28x28, i.e. ``RandomCrop(28, padding=2)``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """``(x / 255 - mean) / std`` per channel.

  Args:
    images: [..., C] pixel values on the 0..255 scale (uint8 or float).
    mean: per-channel mean on the 0..1 scale (length C).
    std: per-channel standard deviation on the 0..1 scale (length C).
    dtype: output dtype.

  Returns:
    The normalised images as ``dtype``.
  """
  channels = images.shape[-1]
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries; images "
                     f"have {channels} channels.")
  # Compute in float32 at least, so bf16 outputs round only once.
  compute = jnp.promote_types(dtype, jnp.float32)
  x = images.astype(compute) / 255.0
  x = (x - jnp.asarray(mean, compute)) / jnp.asarray(std, compute)
  return x.astype(dtype)


def random_crop_flip(rng: jax.Array, images: jax.Array,
                     pad: int = 4, flip: bool = True) -> jax.Array:
  """Per-image random crop with zero padding, then random horizontal flip.

  Each image is padded by ``pad`` zero pixels on every side and an H x W
  window is cut at an offset drawn uniformly from ``{0, ..., 2 * pad}`` in
  each direction; then it is mirrored left-right with probability 1/2. Draws
  are independent per image.

  Args:
    rng: a ``jax.random.key``.
    images: [N, H, W, C] images, any dtype.
    pad: padding on each side (0 disables the crop).
    flip: random horizontal flips (False: crop only).

  Returns:
    Augmented images, same shape and dtype.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
  n, h, w, c = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * pad + 1)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

  cropped = jax.vmap(crop)(padded, offsets)
  if not flip:
    return cropped
  flips = jax.random.bernoulli(flip_rng, 0.5, (n,))
  return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1], cropped)


def cifar_augment(rng: jax.Array, images: jax.Array, pad: int = 4, *,
                  flip: bool = True,
                  mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None,
                  dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """CIFAR training augmentation: crop with zero padding, flip, to float.

  ``normalize(cifar_augment(rng, x), mean, std)`` and
  ``cifar_augment(rng, x, mean=mean, std=std)`` give the same result.

  Args:
    rng: a ``jax.random.key``.
    images: uint8 [N, H, W, C] batch.
    pad: zero padding of the random crop (4 for CIFAR).
    flip: random horizontal flips.
    mean: per-channel mean (0..1 scale); None: no normalisation.
    std: per-channel standard deviation (0..1 scale); with ``mean``.
    dtype: output dtype.

  Returns:
    ``normalize(augmented, mean, std, dtype)`` when ``mean``/``std`` are
    given, else the augmented pixels as ``dtype`` on the 0..255 scale (ready
    for ``normalize``).
  """
  if (mean is None) != (std is None):
    raise ValueError("Give both mean and std, or neither.")
  out = random_crop_flip(rng, images, pad, flip)
  if mean is None:
    return out.astype(dtype)
  return normalize(out, mean, std, dtype)
