"""Host transforms (RandomResizedCrop, flip, resize, center crop, RandAugment)
against an independent numpy/Pillow implementation of torchvision's
documented algorithms, and the on-device CutMix/MixUp."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import imagenet_util
from training import mix
from training import transforms

# Pixel differences allowed from resampling alone (smooth test images).
RESAMPLE_TOL = 3


def _ref_rrc_box(rng, width, height, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params, as documented."""
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*scale)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    ar = math.exp(rng.uniform(*log_r))
    w = int(round(math.sqrt(target * ar)))
    h = int(round(math.sqrt(target / ar)))
    if 0 < w <= width and 0 < h <= height:
      i = int(rng.integers(0, height - h + 1))
      j = int(rng.integers(0, width - w + 1))
      return i, j, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _ref_train(array, rng, size):
  """Crop (numpy slicing) -> Pillow bilinear resize -> flip (numpy)."""
  h_img, w_img = array.shape[:2]
  i, j, h, w = _ref_rrc_box(rng, w_img, h_img)
  crop = Image.fromarray(array[i:i + h, j:j + w])
  out = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
  flipped = rng.random() < 0.5
  return (out[:, ::-1] if flipped else out), flipped


def _jpeg_and_pixels(seed, height, width):
  image = imagenet_util.smooth_image(np.random.default_rng(seed), height,
                                     width)
  data = imagenet_util.jpeg_bytes(image)
  return data, np.asarray(transforms.decode(data, "pillow"))


@pytest.mark.parametrize("decoder", ["pillow", "auto"])
def test_random_resized_crop_and_flip_match_reference(decoder):
  flips = 0
  for seed in range(12):
    data, pixels = _jpeg_and_pixels(seed, 60 + 7 * seed, 90 - 3 * seed)
    ours = transforms.train_image(data, np.random.default_rng(seed), 32,
                                  randaugment_ops=0, decoder=decoder)
    ref_rng = np.random.default_rng(seed)
    want, flipped = _ref_train(pixels, ref_rng, 32)
    assert ours.shape == (32, 32, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - want.astype(int))
    assert diff.max() <= RESAMPLE_TOL, (seed, diff.max())
    flips += flipped
  assert 0 < flips < 12  # Both branches exercised.


def test_crop_box_follows_the_same_draws_and_falls_back():
  for seed in range(200):
    ours = transforms.random_resized_crop_box(np.random.default_rng(seed),
                                              500, 375)
    assert ours == _ref_rrc_box(np.random.default_rng(seed), 500, 375)
  # Nothing fits 10 tries of area >= 99 % at ratio 4:1 bounds -> fallback,
  # the centred crop clamped to the ratio range.
  for width, height in ((400, 50), (50, 400), (100, 90)):
    box = transforms.random_resized_crop_box(
        np.random.default_rng(0), width, height, scale=(0.99, 1.0),
        ratio=(3.9, 4.0) if width < height else (0.25, 0.26))
    ref = _ref_rrc_box(np.random.default_rng(0), width, height,
                       scale=(0.99, 1.0),
                       ratio=(3.9, 4.0) if width < height else (0.25, 0.26))
    assert box == ref
  assert transforms.random_resized_crop_box(
      np.random.default_rng(0), 400, 50, scale=(0.99, 1.0),
      ratio=(0.25, 0.26)) == (0, (400 - 13) // 2, 50, 13)


def test_eval_resize_and_center_crop_match_reference():
  for seed, (h, w) in enumerate(((375, 500), (500, 333), (300, 300))):
    data, pixels = _jpeg_and_pixels(seed, h, w)
    ours = transforms.eval_image(data, 224, 256, decoder="pillow")
    # torchvision Resize(256): shorter side 256, the other int(256*l/s).
    if w <= h:
      nw, nh = 256, int(256 * h / w)
    else:
      nw, nh = int(256 * w / h), 256
    resized = np.asarray(Image.fromarray(pixels).resize(
        (nw, nh), Image.Resampling.BILINEAR))
    top, left = int(round((nh - 224) / 2)), int(round((nw - 224) / 2))
    want = resized[top:top + 224, left:left + 224]
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - want.astype(int)).max() <= RESAMPLE_TOL


def _op_image():
  # Every channel holds each of 0..255 once: full range (AutoContrast is
  # then the identity) and a flat histogram (so is Equalize).
  rng = np.random.default_rng(0)
  planes = [rng.permutation(256).reshape(16, 16) for _ in range(3)]
  return Image.fromarray(np.stack(planes, -1).astype(np.uint8))


@pytest.mark.parametrize("name", list(transforms.RANDAUGMENT_OPS))
def test_randaugment_op_shape_dtype_and_identity_at_magnitude_0(name):
  img = _op_image()
  before = np.asarray(img)
  value = transforms.op_magnitude(name, 0, *img.size)
  out = np.asarray(transforms.apply_op(img, name, value))
  assert out.shape == before.shape and out.dtype == np.uint8
  if name == "Solarize":
    # Threshold 255 at bin 0: torchvision inverts pixels >= 255 only.
    want = np.where(before >= 255, 255 - before, before)
    np.testing.assert_array_equal(out, want)
  else:
    np.testing.assert_array_equal(out, before)
  # At magnitude 9 the magnitude-driven ops change the image.
  if name not in ("Identity", "AutoContrast", "Equalize"):
    strong = np.asarray(transforms.apply_op(
        _op_image(), name, transforms.op_magnitude(name, 9, 16, 16)))
    assert strong.shape == before.shape and strong.dtype == np.uint8
    assert not np.array_equal(strong, before), name


def test_randaugment_magnitudes_are_torchvision_defaults():
  m = lambda name: transforms.op_magnitude(name, 9, 224, 224)
  assert m("ShearX") == pytest.approx(0.09)
  assert m("TranslateX") == pytest.approx(150 / 331 * 224 * 9 / 30)
  assert m("Rotate") == pytest.approx(9.0)
  assert m("Brightness") == pytest.approx(0.27)
  assert m("Posterize") == 7  # 8 - round(9 / 7.5)
  assert m("Solarize") == pytest.approx(255 - 9 * 255 / 30)
  assert len(transforms.RANDAUGMENT_OPS) == 14


def test_train_transform_randaugment_keeps_shape_and_is_seeded():
  data, _ = _jpeg_and_pixels(0, 80, 100)
  t = transforms.TrainTransform(24)
  a = t.random_map({"image": data, "label": 3}, np.random.default_rng(5))
  b = t.random_map({"image": data, "label": 3}, np.random.default_rng(5))
  assert a["image"].shape == (24, 24, 3) and a["label"] == 3
  np.testing.assert_array_equal(a["image"], b["image"])


def test_undecodable_record_becomes_black_and_is_counted():
  before = transforms.decode_failures()
  out = transforms.EvalTransform(16, 18).map({"image": b"\xff\xd8junk",
                                              "label": 1})
  assert out["image"].shape == (16, 16, 3) and not out["image"].any()
  assert transforms.decode_failures() == before + 1


def _constant_batch(n=6, size=16, classes=6):
  # Image i is the constant i + 1: its pixels say where they came from.
  images = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32)[
      :, None, None, None], (n, size, size, 3))
  targets = mix.soft_targets(jnp.arange(n) % classes, classes)
  return images, targets


def test_cutmix_area_rule_and_targets_sum_to_one():
  images, targets = _constant_batch()
  fn = jax.jit(lambda k: mix.cutmix(k, images, targets, 1.0))
  pasted_any = False
  for seed in range(20):
    out, mixed = fn(jax.random.key(seed))
    np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-6)
    rolled = jnp.roll(images, 1, axis=0)
    frac = jnp.mean((out == rolled)[..., 0], axis=(1, 2))  # Pasted area.
    # Own label keeps 1 - area, the rolled example's label gets the area.
    own = jnp.sum(mixed * targets, -1)
    other = jnp.sum(mixed * jnp.roll(targets, 1, axis=0), -1)
    np.testing.assert_allclose(own, 1.0 - frac, atol=1e-6)
    np.testing.assert_allclose(other, frac, atol=1e-6)
    pasted_any |= bool(frac[0] > 0)
    # One box for the batch.
    assert np.allclose(frac, frac[0])
  assert pasted_any


def test_mixup_weights_and_mix_batch_choice():
  images, targets = _constant_batch()
  out, mixed = jax.jit(lambda k: mix.mixup(k, images, targets, 0.2))(
      jax.random.key(1))
  lam = (out[:, 0, 0, 0] - jnp.roll(images, 1, 0)[:, 0, 0, 0]) / (
      images[:, 0, 0, 0] - jnp.roll(images, 1, 0)[:, 0, 0, 0])
  np.testing.assert_allclose(jnp.sum(mixed * targets, -1), lam, atol=1e-5)
  np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-6)
  off = mix.MixConfig(prob=0.0)
  same = mix.mix_batch(jax.random.key(0), images, targets, off)
  assert same[0] is images
  # prob 1 + cutmix_prob 1: always CutMix, so every pixel is an original
  # value of its own or the rolled image.
  cfg = mix.MixConfig(prob=1.0, cutmix_prob=1.0)
  always = jax.jit(lambda k: mix.mix_batch(k, images, targets, cfg))
  mixed_any = False
  for seed in range(5):
    out, t = always(jax.random.key(seed))
    assert bool(jnp.all((out == images) | (out == jnp.roll(images, 1, 0))))
    mixed_any |= not np.allclose(t, targets)
  assert mixed_any
  # 90 % of the batches mixed, 40 % of those by CutMix.
  cfg = mix.MixConfig(prob=0.9, cutmix_prob=0.4)
  branch, _ = jax.vmap(lambda k: mix.mix_choice(k, cfg))(
      jax.random.split(jax.random.key(0), 4000))
  counts = np.bincount(np.asarray(branch), minlength=3) / 4000
  np.testing.assert_allclose(counts, [0.1, 0.36, 0.54], atol=0.03)


def test_label_smoothing_targets():
  t = mix.soft_targets(jnp.array([0, 2]), 4, 0.1)
  np.testing.assert_allclose(t[0], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.skipif(transforms.simplejpeg is None,
                    reason="simplejpeg (the optional faster decoder) is not "
                    "installed")
def test_simplejpeg_and_pillow_decode_the_same_pixels():
  for seed in range(3):
    data, pixels = _jpeg_and_pixels(seed, 75, 100)
    np.testing.assert_array_equal(
        np.asarray(transforms.decode(data, "simplejpeg")), pixels)
