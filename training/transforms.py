"""Host-side image transforms of encoded-image datasets (ImageNet recipe).

Records of ``imagenet2012`` and ``imagefolder:PATH`` hold encoded JPEG bytes
of any size. The loader decodes and augments them on the host, inside grain's
worker processes, and ships fixed-size uint8 images to the device, where the
step only normalises (``training.augment.normalize``) and mixes
(``training.mix``).

Training (``TrainTransform``, a grain ``RandomMap``: its draws come from the
per-record generator grain derives from the loader's seed and the record's
position, so a resumed iterator repeats them exactly), as torchvision's
``RandomResizedCrop(size)`` + ``RandomHorizontalFlip()`` + ``RandAugment()``
on a PIL image:

* ``random_resized_crop_box``: torchvision's ``RandomResizedCrop.get_params``
  (area fraction uniform in ``scale``, log-uniform aspect ratio in ``ratio``,
  10 tries, then the central crop clamped to ``ratio``); the box is resized
  to ``size x size`` with Pillow's bilinear filter (antialiased, as
  torchvision on PIL images);
* a horizontal flip with probability 1/2;
* RandAugment with torchvision's defaults: ``num_ops=2`` ops drawn uniformly
  (with replacement) from the 14 ops of ``RANDAUGMENT_OPS``, ``magnitude=9``
  of ``31`` bins, nearest-neighbour geometry, black fill, a random sign on
  the signed ops.

Evaluation (``EvalTransform``): torchvision's ``Resize(resize)`` (shorter side
to ``resize``, bilinear) + ``CenterCrop(size)``.

Decoding: ``decode`` uses ``simplejpeg`` (libjpeg-turbo) where it is
installed and the bytes are a JPEG, else (and for a JPEG it rejects)
Pillow; both give the same pixels for RGB and greyscale JPEGs
(``bench/input_pipeline.py`` measures both). A record that
fails to decode becomes a black image and is counted (``decode_failures``)
rather than stopping an epoch; ``imagefolder`` datasets are checked when they
are prepared, so this only guards data prepared elsewhere.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any, Callable

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

try:  # Optional: a faster JPEG decoder (same libjpeg-turbo pixels).
  import simplejpeg  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - depends on the environment
  simplejpeg = None

DECODERS = ("auto", "pillow", "simplejpeg")
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# torchvision.transforms.RandAugment defaults.
RANDAUGMENT_BINS = 31
_BILINEAR = Image.Resampling.BILINEAR
_NEAREST = Image.Resampling.NEAREST
_JPEG_MAGIC = b"\xff\xd8"

_failures = 0


def decode_failures() -> int:
  """Records of this process that failed to decode (replaced by black)."""
  return _failures


def decode(data: bytes | np.ndarray, decoder: str = "auto") -> Image.Image:
  """Encoded image bytes (or an already decoded array) -> RGB PIL image.

  Args:
    data: JPEG/PNG/... bytes, or a uint8 [H, W, 3] array (tfds may hand
      decoded images).
    decoder: ``auto`` (simplejpeg for JPEGs where installed, else Pillow),
      ``pillow`` or ``simplejpeg``.

  Returns:
    An RGB ``PIL.Image``.
  """
  if isinstance(data, np.ndarray):
    return Image.fromarray(data).convert("RGB")
  if decoder not in DECODERS:
    raise ValueError(f"decoder={decoder!r}; valid: {', '.join(DECODERS)}")
  data = bytes(data)
  use_simplejpeg = (decoder == "simplejpeg" or (
      decoder == "auto" and simplejpeg is not None
      and data[:2] == _JPEG_MAGIC))
  if use_simplejpeg:
    if simplejpeg is None:
      raise ImportError("decoder='simplejpeg' needs `pip install simplejpeg`")
    try:
      return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    except ValueError:
      if decoder == "simplejpeg":
        raise
      # What libjpeg-turbo's RGB output rejects, Pillow may still read.
  with Image.open(io.BytesIO(data)) as img:
    return img.convert("RGB")


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float] = RRC_SCALE,
                            ratio: tuple[float, float] = RRC_RATIO
                            ) -> tuple[int, int, int, int]:
  """torchvision's ``RandomResizedCrop.get_params`` with numpy draws.

  Args:
    rng: the generator (draw order: per try ``uniform(*scale)``,
      ``uniform(*log(ratio))``; on success ``integers(0, H - h + 1)``,
      ``integers(0, W - w + 1)``).
    width: image width W.
    height: image height H.
    scale: range of the crop's area fraction.
    ratio: range of the crop's aspect ratio w / h.

  Returns:
    ``(top, left, h, w)`` of the crop box.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the whole image, clamped to the ratio range, centred.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
  """torchvision ``Resize(size)``: shorter side to ``size``, bilinear."""
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  if (new_w, new_h) == (w, h):
    return img
  return img.resize((new_w, new_h), _BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
  """torchvision ``CenterCrop(size)`` (the image is at least ``size``)."""
  w, h = img.size
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


# RandAugment (torchvision.transforms.RandAugment on PIL images).


def _inverse_affine(center, angle, translate, shear) -> list[float]:
  """torchvision's ``_get_inverse_affine_matrix`` (scale 1)."""
  rot = math.radians(angle)
  sx, sy = math.radians(shear[0]), math.radians(shear[1])
  cx, cy = center
  tx, ty = translate
  a = math.cos(rot - sy) / math.cos(sy)
  b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
  c = math.sin(rot - sy) / math.cos(sy)
  d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
  m = [d, -b, 0.0, -c, a, 0.0]
  m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
  m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
  m[2] += cx
  m[5] += cy
  return m


def _affine(img: Image.Image, *, angle=0.0, translate=(0, 0),
            shear=(0.0, 0.0), center=None) -> Image.Image:
  w, h = img.size
  center = (w * 0.5, h * 0.5) if center is None else center
  matrix = _inverse_affine(center, angle, translate, shear)
  return img.transform(img.size, Image.Transform.AFFINE, matrix, _NEAREST,
                       fillcolor=(0, 0, 0))


def _shear_x(img, m):
  return _affine(img, shear=(math.degrees(math.atan(m)), 0.0), center=(0, 0))


def _shear_y(img, m):
  return _affine(img, shear=(0.0, math.degrees(math.atan(m))), center=(0, 0))


def _translate_x(img, m):
  return _affine(img, translate=(int(m), 0))


def _translate_y(img, m):
  return _affine(img, translate=(0, int(m)))


def _rotate(img, m):
  return img.rotate(m, _NEAREST, expand=False, fillcolor=(0, 0, 0))


def _enhance(kind):
  return lambda img, m: kind(img).enhance(1.0 + m)


def _posterize(img, m):
  return ImageOps.posterize(img, int(m))


def _solarize(img, m):
  return ImageOps.solarize(img, m)


def _identity(img, m):
  del m
  return img


def _linspace(hi: float, bins: int) -> np.ndarray:
  # float32 as torch.linspace gives.
  return np.linspace(0.0, hi, bins, dtype=np.float32)


# name -> (op, magnitudes(bins, width, height), signed); torchvision's order.
RANDAUGMENT_OPS: dict[str, tuple[Callable[[Image.Image, float], Image.Image],
                                 Callable[[int, int, int], np.ndarray],
                                 bool]] = {
    "Identity": (_identity, lambda n, w, h: np.zeros(n, np.float32), False),
    "ShearX": (_shear_x, lambda n, w, h: _linspace(0.3, n), True),
    "ShearY": (_shear_y, lambda n, w, h: _linspace(0.3, n), True),
    "TranslateX": (_translate_x,
                   lambda n, w, h: _linspace(150.0 / 331.0 * w, n), True),
    "TranslateY": (_translate_y,
                   lambda n, w, h: _linspace(150.0 / 331.0 * h, n), True),
    "Rotate": (_rotate, lambda n, w, h: _linspace(30.0, n), True),
    "Brightness": (_enhance(ImageEnhance.Brightness),
                   lambda n, w, h: _linspace(0.9, n), True),
    "Color": (_enhance(ImageEnhance.Color),
              lambda n, w, h: _linspace(0.9, n), True),
    "Contrast": (_enhance(ImageEnhance.Contrast),
                 lambda n, w, h: _linspace(0.9, n), True),
    "Sharpness": (_enhance(ImageEnhance.Sharpness),
                  lambda n, w, h: _linspace(0.9, n), True),
    "Posterize": (_posterize, lambda n, w, h: (
        8 - np.round(np.arange(n) / ((n - 1) / 4))).astype(np.int64), False),
    "Solarize": (_solarize, lambda n, w, h: np.linspace(
        255.0, 0.0, n, dtype=np.float32), False),
    "AutoContrast": (lambda img, m: ImageOps.autocontrast(img),
                     lambda n, w, h: np.zeros(n, np.float32), False),
    "Equalize": (lambda img, m: ImageOps.equalize(img),
                 lambda n, w, h: np.zeros(n, np.float32), False),
}
_OP_NAMES = tuple(RANDAUGMENT_OPS)


def apply_op(img: Image.Image, name: str, magnitude: float) -> Image.Image:
  """Applies one RandAugment op at an explicit (signed) magnitude value."""
  return RANDAUGMENT_OPS[name][0](img, magnitude)


def op_magnitude(name: str, magnitude_bin: int, width: int, height: int,
                 bins: int = RANDAUGMENT_BINS) -> float:
  """The unsigned magnitude value of op ``name`` at ``magnitude_bin``."""
  return float(RANDAUGMENT_OPS[name][1](bins, width, height)[magnitude_bin])


def rand_augment(img: Image.Image, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: int = 9, bins: int = RANDAUGMENT_BINS
                 ) -> Image.Image:
  """torchvision's ``RandAugment(num_ops, magnitude, bins)`` forward.

  Args:
    img: an RGB PIL image.
    rng: the generator (per op: ``integers(14)``, then ``integers(2)`` for
      the sign of a signed op).
    num_ops: ops applied in sequence.
    magnitude: magnitude bin in ``[0, bins)``.
    bins: number of magnitude bins.

  Returns:
    The augmented image (same size).
  """
  if not 0 <= magnitude < bins:
    raise ValueError(f"magnitude={magnitude} must be in [0, {bins}).")
  w, h = img.size
  for _ in range(num_ops):
    name = _OP_NAMES[int(rng.integers(len(_OP_NAMES)))]
    _, magnitudes, signed = RANDAUGMENT_OPS[name]
    value = float(magnitudes(bins, w, h)[magnitude])
    if signed and int(rng.integers(2)):
      value = -value
    img = apply_op(img, name, value)
  return img


def _black(size: int) -> np.ndarray:
  return np.zeros((size, size, 3), np.uint8)


def _safe(fn: Callable[[], np.ndarray], size: int) -> np.ndarray:
  """``fn()``, or a black image (counted) when the record does not decode."""
  global _failures
  try:
    return fn()
  except (OSError, ValueError, SyntaxError) as e:  # PIL's decode errors.
    _failures += 1
    if _failures <= 10:
      logging.warning("undecodable image record replaced by black (%d so "
                      "far in this process): %s", _failures, e)
    return _black(size)


def train_image(data: bytes | np.ndarray, rng: np.random.Generator, size: int,
                *, flip: bool = True, randaugment_ops: int = 2,
                randaugment_magnitude: int = 9,
                decoder: str = "auto") -> np.ndarray:
  """Decode + RandomResizedCrop + flip + RandAugment -> uint8 [size, size, 3].

  Args:
    data: the encoded image (or a decoded uint8 array).
    rng: the record's generator.
    size: output height and width.
    flip: random horizontal flip.
    randaugment_ops: RandAugment ops (0: none).
    randaugment_magnitude: RandAugment magnitude bin.
    decoder: see ``decode``.

  Returns:
    The augmented image.
  """
  img = decode(data, decoder)
  top, left, h, w = random_resized_crop_box(rng, *img.size)
  # Crop, then resize (as torchvision): the filter sees no pixels outside.
  img = img.crop((left, top, left + w, top + h)).resize((size, size),
                                                       _BILINEAR)
  if flip and rng.random() < 0.5:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if randaugment_ops:
    img = rand_augment(img, rng, randaugment_ops, randaugment_magnitude)
  return np.asarray(img, np.uint8)


def eval_image(data: bytes | np.ndarray, size: int, resize: int,
               decoder: str = "auto") -> np.ndarray:
  """Decode + Resize(resize) + CenterCrop(size) -> uint8 [size, size, 3]."""
  if resize < size:
    raise ValueError(f"eval resize {resize} is smaller than the crop {size}.")
  img = center_crop(resize_shorter(decode(data, decoder), resize), size)
  return np.asarray(img, np.uint8)


class TrainTransform(grain.transforms.RandomMap):
  """grain op: ``{"image": bytes, "label"}`` -> augmented uint8 record."""

  def __init__(self, size: int, *, flip: bool = True, randaugment_ops: int = 2,
               randaugment_magnitude: int = 9, decoder: str = "auto"):
    self.size = size
    self.kwargs = dict(flip=flip, randaugment_ops=randaugment_ops,
                       randaugment_magnitude=randaugment_magnitude,
                       decoder=decoder)

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    image = _safe(lambda: train_image(element["image"], rng, self.size,
                                      **self.kwargs), self.size)
    return {"image": image, "label": element["label"]}


class EvalTransform(grain.transforms.Map):
  """grain op (or plain callable): resize + center crop, uint8 record."""

  def __init__(self, size: int, resize: int, decoder: str = "auto"):
    if resize < size:
      raise ValueError(f"eval resize {resize} is smaller than the crop "
                       f"{size}.")
    self.size = size
    self.resize = resize
    self.decoder = decoder

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = _safe(lambda: eval_image(element["image"], self.size, self.resize,
                                     self.decoder), self.size)
    return {"image": image, "label": element["label"]}

  __call__ = map
