"""CutMix / MixUp and soft targets, on device (pure, jittable).

The ImageNet recipe of docs/data.md: with probability ``prob`` a
training batch is mixed, by CutMix (Beta(``cutmix_alpha``)) with probability
``cutmix_prob``, else by MixUp (Beta(``mixup_alpha``)). As torchvision's
``transforms.v2.CutMix``/``MixUp``, one λ per batch and the batch is paired
with itself rolled by one (example ``i`` with ``i - 1``):

* MixUp: ``x = λ x + (1 - λ) x_rolled``, targets with the same λ;
* CutMix: a box centred uniformly in the image, of half-sides
  ``int(0.5 sqrt(1 - λ) W)`` × ``int(0.5 sqrt(1 - λ) H)`` clipped to the
  image, is pasted from the rolled batch; the target weight of the rolled
  label is the pasted area fraction (the "area rule"), so the weights sum
  to 1.

Targets start as one-hot labels, smoothed first when ``label_smoothing`` > 0
(``(1 - s) onehot + s / C``). Every draw comes from the step's key, so a
resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixConfig:
  """Batch mixing settings (the ``mix`` config section)."""

  prob: float = 0.0
  cutmix_prob: float = 0.4
  cutmix_alpha: float = 1.0
  mixup_alpha: float = 0.2

  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> "MixConfig":
    """From the ``mix`` section of a run config."""
    return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})


def soft_targets(labels: jax.Array, num_classes: int,
                 label_smoothing: float = 0.0) -> jax.Array:
  """One-hot float32 targets, smoothed: ``(1 - s) onehot + s / C``."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
  return onehot


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """torchvision v2 CutMix's box ``(y1, y2, x1, x2)`` for weight ``lam``."""
  ry, rx = jax.random.split(rng)
  cy = jax.random.randint(ry, (), 0, height)
  cx = jax.random.randint(rx, (), 0, width)
  r = 0.5 * jnp.sqrt(1.0 - lam)
  half_w = (r * width).astype(jnp.int32)
  half_h = (r * height).astype(jnp.int32)
  x1 = jnp.maximum(cx - half_w, 0)
  y1 = jnp.maximum(cy - half_h, 0)
  x2 = jnp.minimum(cx + half_w, width)
  y2 = jnp.minimum(cy + half_h, height)
  return y1, y2, x1, x2


def cutmix(rng: jax.Array, images: jax.Array, targets: jax.Array,
           alpha: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """CutMix of a batch with itself rolled by one.

  Args:
    rng: a ``jax.random.key``.
    images: [N, H, W, C] float images.
    targets: [N, K] soft targets.
    alpha: Beta(alpha, alpha) of λ.

  Returns:
    ``(images, targets)``; the rolled example's target weight is the pasted
    box's area fraction.
  """
  lam_rng, box_rng = jax.random.split(rng)
  lam = jax.random.beta(lam_rng, alpha, alpha)
  _, h, w, _ = images.shape
  y1, y2, x1, x2 = cutmix_box(box_rng, lam, h, w)
  ys = jnp.arange(h)[:, None]
  xs = jnp.arange(w)[None, :]
  inside = (ys >= y1) & (ys < y2) & (xs >= x1) & (xs < x2)
  rolled = jnp.roll(images, 1, axis=0)
  out = jnp.where(inside[None, :, :, None], rolled, images)
  area = ((x2 - x1) * (y2 - y1)).astype(jnp.float32) / (h * w)
  mixed = targets * (1.0 - area) + jnp.roll(targets, 1, axis=0) * area
  return out, mixed


def mixup(rng: jax.Array, images: jax.Array, targets: jax.Array,
          alpha: float = 0.2) -> tuple[jax.Array, jax.Array]:
  """MixUp of a batch with itself rolled by one (arguments as ``cutmix``)."""
  lam = jax.random.beta(rng, alpha, alpha).astype(jnp.float32)
  out = (images.astype(jnp.float32) * lam
         + jnp.roll(images, 1, axis=0).astype(jnp.float32) * (1.0 - lam))
  mixed = targets * lam + jnp.roll(targets, 1, axis=0) * (1.0 - lam)
  return out.astype(images.dtype), mixed


def mix_choice(rng: jax.Array, cfg: MixConfig) -> tuple[jax.Array, jax.Array]:
  """``(branch, key)``: 0 = no mix, 1 = CutMix, 2 = MixUp, and its key."""
  apply_rng, choice_rng, mix_rng = jax.random.split(rng, 3)
  use_cutmix = jax.random.bernoulli(choice_rng, cfg.cutmix_prob)
  branch = jnp.where(jax.random.bernoulli(apply_rng, cfg.prob),
                     jnp.where(use_cutmix, 1, 2), 0)
  return branch, mix_rng


def mix_batch(rng: jax.Array, images: jax.Array, targets: jax.Array,
              cfg: MixConfig) -> tuple[jax.Array, jax.Array]:
  """With probability ``cfg.prob`` CutMix or MixUp the batch (module doc).

  Args:
    rng: a ``jax.random.key`` (the step's).
    images: [N, H, W, C] float images (normalised or not: both mixes are
      affine per pixel).
    targets: [N, K] soft targets.
    cfg: the settings.

  Returns:
    ``(images, targets)``, unchanged when the batch is not mixed.
  """
  if cfg.prob <= 0.0:
    return images, targets
  branch, mix_rng = mix_choice(rng, cfg)
  return jax.lax.switch(branch, [
      lambda: (images, targets),
      lambda: cutmix(mix_rng, images, targets, cfg.cutmix_alpha),
      lambda: mixup(mix_rng, images, targets, cfg.mixup_alpha),
  ])
