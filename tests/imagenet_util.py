"""Generated image-folder trees of real JPEG files for the ImageNet tests."""

from __future__ import annotations

import io
import pathlib

import numpy as np
from PIL import Image

CLASSES = ("n01440764", "n01443537", "n01484850")


def smooth_image(rng: np.random.Generator, height: int, width: int
                 ) -> np.ndarray:
  """A smooth random RGB image (resampling differences stay small)."""
  coarse = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(coarse).resize(
      (width, height), Image.Resampling.BICUBIC), np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def make_tree(root: pathlib.Path, train: int = 4, val: int = 2,
              classes=CLASSES, seed: int = 0,
              sizes=((40, 56), (48, 36), (64, 80))) -> dict[str, int]:
  """Writes ``root/{train,val}/<class>/*.JPEG``; returns {relpath: label}."""
  rng = np.random.default_rng(seed)
  labels = {}
  for split, n in (("train", train), ("val", val)):
    for label, name in enumerate(sorted(classes)):
      d = root / split / name
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        h, w = sizes[(i + label) % len(sizes)]
        path = d / f"{name}_{i}.JPEG"
        path.write_bytes(jpeg_bytes(smooth_image(rng, h, w)))
        labels[str(path.relative_to(root))] = label
  return labels
