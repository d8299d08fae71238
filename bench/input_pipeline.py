"""Host input-pipeline throughput: img/s per worker process, ImageNet recipe.

    nice -n 10 python bench/input_pipeline.py [--images 200] [--repeats 3] \\
        [--accelerator-img-s 3000]

Generates ``--images`` ImageNet-like JPEGs (500x375, quality 90, smooth
structure plus texture so that files are of ImageNet's typical size, about
100 KB) in memory, then times in this one process and thread (= one grain
worker):

* JPEG decode alone: Pillow, simplejpeg and OpenCV, where installed;
* the training transform (decode + RandomResizedCrop 224 + flip +
  RandAugment 2/9) and the evaluation transform (decode + resize 256 +
  center crop 224) of ``training.transforms``, with each decoder it has.

Prints img/s per worker (images per CPU second of this process, the best
of ``--repeats`` passes, so that other load on the machine does not count;
the transforms are single-threaded) and the worker
processes one accelerator needs to feed ResNet-50 training at
``--accelerator-img-s`` images per second (pass the figure measured on your
device; the default is an assumption, not a measurement).
"""

from __future__ import annotations

import argparse
import io
import math
import pathlib
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from training import transforms  # pylint: disable=g-import-not-at-top

try:
  import cv2  # pylint: disable=g-import-not-at-top
except ImportError:
  cv2 = None


def make_jpegs(n: int, width: int = 500, height: int = 375,
               quality: int = 90, seed: int = 0) -> list[bytes]:
  """``n`` synthetic photographs-like JPEGs (smooth field + texture)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    coarse = rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                    Image.Resampling.BICUBIC),
                     np.float32)
    img += rng.normal(0, 12, img.shape)  # Texture: ImageNet-like file sizes.
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=quality)
    out.append(buf.getvalue())
  return out


def rate(fn, items, repeats: int) -> float:
  """Best images per CPU second of ``repeats`` passes of ``fn``.

  The process's CPU time, not wall time: the rate of one worker on a core of
  its own, whatever else the machine runs (the work is single-threaded).
  """
  best = 0.0
  for _ in range(repeats):
    t = time.process_time()
    for x in items:
      fn(x)
    best = max(best, len(items) / max(time.process_time() - t, 1e-9))
  return best


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=200)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--resize", type=int, default=256)
  p.add_argument("--accelerator-img-s", type=float, default=3000.0,
                 help="ResNet-50 training img/s of one accelerator (assumed "
                 "default; pass your device's measurement)")
  args = p.parse_args(argv)

  jpegs = make_jpegs(args.images)
  print(f"{len(jpegs)} JPEGs 500x375 q90, mean "
        f"{np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB; one process, one "
        "thread")
  decoders = {"pillow": lambda b: transforms.decode(b, "pillow")}
  if transforms.simplejpeg is not None:
    decoders["simplejpeg"] = lambda b: transforms.decode(b, "simplejpeg")
  rows = []
  for name, fn in decoders.items():
    rows.append(("decode", name, rate(fn, jpegs, args.repeats)))
  if cv2 is not None:
    rows.append(("decode", "opencv", rate(
        lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
        jpegs, args.repeats)))
  rng = np.random.default_rng(0)
  for name in decoders:
    rows.append(("train (RRC+flip+RandAugment)", name, rate(
        lambda b, n=name: transforms.train_image(b, rng, args.size,
                                                 decoder=n),
        jpegs, args.repeats)))
    rows.append(("train (RRC+flip, no RandAugment)", name, rate(
        lambda b, n=name: transforms.train_image(b, rng, args.size,
                                                 randaugment_ops=0,
                                                 decoder=n),
        jpegs, args.repeats)))
    rows.append((f"eval (resize {args.resize} + crop {args.size})", name,
                 rate(lambda b, n=name: transforms.eval_image(
                     b, args.size, args.resize, decoder=n),
                      jpegs, args.repeats)))
  print("| stage | decoder | img/s per worker | workers for "
        f"{args.accelerator_img_s:.0f} img/s |")
  print("|---|---|---|---|")
  for stage, name, r in rows:
    need = math.ceil(args.accelerator_img_s / r)
    print(f"| {stage} | {name} | {r:.0f} | {need} |")
  train = {n: r for s, n, r in rows if s.startswith("train (RRC+flip+")}
  fastest = max(train, key=train.get)
  print(f"fastest training decoder: {fastest} ({train[fastest]:.0f} img/s "
        f"per worker) -> {math.ceil(args.accelerator_img_s / train[fastest])}"
        f" workers per accelerator at {args.accelerator_img_s:.0f} img/s")


if __name__ == "__main__":
  main()
