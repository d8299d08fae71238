"""Datasets, loaders and augmentation: everything offline on tiny data."""

import io
import pathlib
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from training import augment
from training import data
from training import datasets
from training.datasets import _base as dataset_base

# Jitted once per shape: eager calls would compile every op separately.
_crop_flip = jax.jit(augment.random_crop_flip, static_argnums=2)
_augment = jax.jit(augment.cifar_augment,
                   static_argnames=("pad", "mean", "std", "dtype"))
_normalize = jax.jit(augment.normalize, static_argnums=(1, 2, 3))

# Tiny official-format archives: 5 CIFAR-10 train batches of 8, 6 test images;
# CIFAR-100 12 train, 6 test.
_SIZES = {"cifar10": {"train": 40, "test": 6},
          "cifar100": {"train": 12, "test": 6}}


def _fake_cifar(name, seed=0):
  """Random unique images and labels, per split, in official order."""
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in _SIZES[name].items():
    out[split] = {
        "image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10 if name == "cifar10" else 100, n),
        "coarse_label": rng.integers(0, 20, n),
    }
  return out


def _write_cifar(root, name, version, packed, arrays):
  """Writes ``arrays`` as the official python/binary archive under ``root``."""
  layout = next(l for l in datasets.CIFAR_ARCHIVES[name]
                if l.version == version)
  members = {}
  for split, files in layout.files.items():
    a = arrays[split]
    chunks = np.array_split(np.arange(len(a["label"])), len(files))
    for f, idx in zip(files, chunks):
      planes = a["image"][idx].transpose(0, 3, 1, 2).reshape(len(idx), -1)
      if version == "python":
        # Python-2 pickles of the official archive have bytes keys.
        d = {b"batch_label": f.encode(), b"data": planes,
             b"filenames": [b"x.png"] * len(idx)}
        if name == "cifar10":
          d[b"labels"] = [int(v) for v in a["label"][idx]]
        else:
          d[b"fine_labels"] = [int(v) for v in a["label"][idx]]
          d[b"coarse_labels"] = [int(v) for v in a["coarse_label"][idx]]
        members[f] = pickle.dumps(d, protocol=2)
      else:
        labels = [a["label"][idx, None]]
        if name == "cifar100":
          labels.insert(0, a["coarse_label"][idx, None])
        members[f] = np.concatenate(
            [l.astype(np.uint8) for l in labels] + [planes], axis=1).tobytes()
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  if packed:
    with tarfile.open(root / layout.tarball, "w:gz") as tar:
      for f, raw in members.items():
        info = tarfile.TarInfo(f"{layout.folder}/{f}")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
  else:
    (root / layout.folder).mkdir()
    for f, raw in members.items():
      (root / layout.folder / f).write_bytes(raw)


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
  """A data dir with the tiny CIFAR-10 prepared; returns (dir, arrays)."""
  root = tmp_path_factory.mktemp("cifar10")
  arrays = _fake_cifar("cifar10")
  _write_cifar(root / "downloads" / "manual", "cifar10", "python", True,
               arrays)
  data.prepare("cifar10", str(root))
  return str(root), arrays


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("digits"))
  data.prepare("digits", root)
  return root


@pytest.mark.parametrize("name,version,packed", [
    ("cifar10", "python", True), ("cifar10", "binary", False),
    ("cifar100", "python", False), ("cifar100", "binary", True)])
def test_cifar_builder_reads_official_archives(tmp_path, name, version,
                                               packed):
  arrays = _fake_cifar(name, seed=1)
  _write_cifar(tmp_path / "archives", name, version, packed, arrays)
  data_dir = str(tmp_path / "tfds")
  data.prepare(name, data_dir, manual_dir=str(tmp_path / "archives"))
  builder = data._builder(name, data_dir)
  assert builder.name == f"dsp_ddrop_{name}" and builder.is_prepared()
  for split, expected in arrays.items():
    stored = builder.as_data_source(split=split)
    records = sorted(stored.__getitems__(range(len(stored))),
                     key=lambda r: r["index"])
    assert [r["index"] for r in records] == list(range(len(expected["label"])))
    np.testing.assert_array_equal(np.stack([r["image"] for r in records]),
                                  expected["image"])
    np.testing.assert_array_equal([r["label"] for r in records],
                                  expected["label"])
    if name == "cifar100":
      np.testing.assert_array_equal([r["coarse_label"] for r in records],
                                    expected["coarse_label"])
  info = data.get_info(name, data_dir)
  assert info.splits == _SIZES[name]
  assert info.num_classes == (10 if name == "cifar10" else 100)
  assert (info.image_size, info.channels) == (32, 3)
  assert info.mean == data.CIFAR_MEAN and info.std == data.CIFAR_STD


def test_cifar_missing_archive_names_expected_files(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    data.prepare("cifar100", str(tmp_path))
  message = str(err.value)
  for expected in ("cifar-100-python.tar.gz", "cifar-100-python/",
                   "cifar-100-binary.tar.gz", str(tmp_path)):
    assert expected in message


def test_unknown_dataset_and_split_are_named(cifar10_dir):
  with pytest.raises(ValueError, match="digits"):
    data.get_info("mnist")
  with pytest.raises(ValueError, match="holdout"):
    data.source("cifar10", "validation", cifar10_dir[0])


def test_tfds_prefix_reads_a_prepared_dataset(cifar10_dir):
  root, arrays = cifar10_dir
  ours = data.source("cifar10", "test", root)
  via_tfds = data.source("tfds:dsp_ddrop_cifar10", "test", root)
  assert len(ours) == len(via_tfds) == 6
  for i in range(len(ours)):
    np.testing.assert_array_equal(ours[i]["image"], via_tfds[i]["image"])
    assert ours[i]["label"] == via_tfds[i]["label"]
  info = data.get_info("tfds:dsp_ddrop_cifar10", root)
  assert info.num_classes == 10 and info.splits == _SIZES["cifar10"]
  # No fixed statistics for this name: computed from the training images.
  x = arrays["train"]["image"].reshape(-1, 3) / 255.0
  np.testing.assert_allclose(info.mean, x.mean(0), rtol=1e-9)
  np.testing.assert_allclose(info.std, x.std(0), rtol=1e-9)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    data.prepare("tfds:dsp_ddrop_cifar100", root)


def _png(image):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  buffer.seek(0)
  return buffer


def test_cifar10_falls_back_to_stock_tfds_array_record(tmp_path):
  """A stock ``cifar10`` prepared in array_record is read when no archive is.

  The stock builder class writes it, with its own features (PNG images, text
  ids), from in-memory examples: preparing it the stock way needs TensorFlow.
  """
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.image_classification import cifar
  arrays = _fake_cifar("cifar10", seed=2)

  class StockCifar10(cifar.Cifar10, skip_registration=True):
    name = "cifar10"
    # Like ours, avoids tfds's importlib_resources lookup of the code path.
    code_path = dataset_base.LocalBuilder.code_path

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in arrays}

    def _generate_examples(self, split):
      for i, (image, label) in enumerate(zip(arrays[split]["image"],
                                             arrays[split]["label"])):
        yield i, {"id": f"{split}_{i:05d}", "image": _png(image),
                  "label": int(label)}

  data_dir = str(tmp_path)
  StockCifar10(data_dir=data_dir, file_format="array_record"
              ).download_and_prepare(download_config=tfds.download
                                     .DownloadConfig(try_download_gcs=False))
  data.prepare("cifar10", data_dir)  # Already prepared: nothing to do.
  assert data._builder("cifar10", data_dir).name == "cifar10"
  info = data.get_info("cifar10", data_dir)
  assert info.splits == _SIZES["cifar10"] and info.num_classes == 10
  for name in ("cifar10", "tfds:cifar10"):
    src = data.source(name, "test", data_dir)
    got = {src[i]["image"].tobytes(): src[i]["label"] for i in range(len(src))}
    want = {im.tobytes(): l for im, l in zip(arrays["test"]["image"],
                                             arrays["test"]["label"])}
    assert got == want


def test_digits_splits_rule_and_stats(digits_dir):
  info = data.get_info("digits", digits_dir)
  assert info.splits == {"train": 1257, "validation": 180, "test": 360}
  assert (info.num_classes, info.image_size, info.channels) == (10, 32, 3)
  arrays = datasets.digits_arrays()
  again = datasets.digits_arrays()
  all_index = np.concatenate([arrays[s][2] for s in arrays])
  all_labels = np.concatenate([arrays[s][1] for s in arrays])
  np.testing.assert_array_equal(np.sort(all_index), np.arange(1797))
  for split, (images, labels, index) in arrays.items():
    np.testing.assert_array_equal(images, again[split][0])
    np.testing.assert_array_equal(index, again[split][2])
    assert len(labels) == info.splits[split]
    # Stratified: every class within one example of its proportional share.
    share = len(labels) * np.bincount(all_labels) / len(all_labels)
    assert np.abs(np.bincount(labels, minlength=10) - share).max() <= 1
  images = arrays["train"][0]
  # Rule: (255 v + 8) // 16 levels, 4x4 nearest blocks, grey in all channels.
  assert set(np.unique(images)) <= {(255 * v + 8) // 16 for v in range(17)}
  np.testing.assert_array_equal(images, np.repeat(np.repeat(
      images[:, ::4, ::4], 4, axis=1), 4, axis=2))
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  x = images.astype(np.float64) / 255
  np.testing.assert_allclose(info.mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(info.std, x.std(axis=(0, 1, 2)), rtol=1e-12)
  # The prepared records are exactly these arrays.
  src = data.source("digits", "validation", digits_dir)
  by_image = {r["image"].tobytes(): r["label"]
              for r in src.__getitems__(range(len(src)))}
  images, labels, _ = arrays["validation"]
  assert sum(by_image.get(im.tobytes()) == l
             for im, l in zip(images, labels)) == len(labels)


def _keys(batches):
  """Example identities (image bytes) of a sequence of batches."""
  return [im.tobytes() for b in batches for im in b["image"]]


def test_train_loader_shards_are_disjoint_and_complete(cifar10_dir):
  root, arrays = cifar10_dir
  per_process = []
  for p in range(2):
    loader = data.train_loader("cifar10", "train", root, global_batch_size=4,
                               seed=3, num_epochs=2, process_index=p,
                               process_count=2)
    batches = list(loader)
    assert len(batches) == 2 * data.steps_per_epoch(40, 4, 2) == 20
    for b in batches:
      assert b["image"].shape == (2, 32, 32, 3) and b["image"].dtype == np.uint8
      assert b["label"].dtype == np.int32
    keys = _keys(batches)
    epoch_1, epoch_2 = keys[:20], keys[20:]
    assert sorted(epoch_1) == sorted(epoch_2)  # Same shard every epoch...
    assert epoch_1 != epoch_2  # ...reshuffled.
    per_process.append(set(epoch_1))
  assert not per_process[0] & per_process[1]
  expected = {im.tobytes() for im in arrays["train"]["image"]}
  assert per_process[0] | per_process[1] == expected


def test_train_loader_labels_match_images(cifar10_dir):
  root, arrays = cifar10_dir
  label_of = {im.tobytes(): l for im, l in
              zip(arrays["train"]["image"], arrays["train"]["label"])}
  batch = next(iter(data.train_loader("cifar10", "train", root,
                                      global_batch_size=8, seed=0)))
  assert [label_of[im.tobytes()] for im in batch["image"]] == list(
      batch["label"])


@pytest.mark.parametrize("in_memory", [False, True])
def test_train_loader_state_round_trips_across_epochs(cifar10_dir, in_memory):
  root, _ = cifar10_dir
  kwargs = dict(global_batch_size=4, seed=7, process_index=0, process_count=1,
                in_memory=in_memory)
  it = iter(data.train_loader("cifar10", "train", root, **kwargs))
  for _ in range(8):  # 10 batches per epoch: resume near the boundary.
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  resumed = iter(data.train_loader("cifar10", "train", root, **kwargs))
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(5)]):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])
  first = iter(data.train_loader("cifar10", "train", root, **kwargs))
  other_seed = iter(data.train_loader("cifar10", "train", root,
                                      **{**kwargs, "seed": 8}))
  assert _keys([next(first) for _ in range(10)]) != _keys(
      [next(other_seed) for _ in range(10)])


def test_in_memory_loader_matches_disk_loader(cifar10_dir):
  root, _ = cifar10_dir
  kwargs = dict(global_batch_size=8, seed=5, num_epochs=1, process_index=1,
                process_count=2)
  disk = list(data.train_loader("cifar10", "train", root, **kwargs))
  memory = list(data.train_loader("cifar10", "train", root, in_memory=True,
                                  **kwargs))
  assert len(disk) == len(memory) == 5
  for a, b in zip(disk, memory):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize("process_count,batch_size", [(1, 4), (2, 6), (3, 6)])
def test_eval_batches_cover_every_example_once(cifar10_dir, process_count,
                                               batch_size):
  root, arrays = cifar10_dir
  stored = data.source("cifar10", "train", root)
  in_order = [stored[i]["image"].tobytes() for i in range(len(stored))]
  seen, counts = [], set()
  for p in range(process_count):
    batches = list(data.eval_batches("cifar10", "train", root,
                                     batch_size=batch_size, process_index=p,
                                     process_count=process_count))
    counts.add(len(batches))
    assert len(batches) == data.num_eval_batches(40, batch_size,
                                                 process_count)
    for b in batches:
      assert b["image"].shape[0] == batch_size // process_count
      assert not b["image"][~b["mask"]].any()
      seen += [im.tobytes() for im in b["image"][b["mask"]]]
  assert len(counts) == 1  # Every process runs the same number of steps.
  assert seen == in_order
  assert sorted(seen) == sorted(im.tobytes()
                                for im in arrays["train"]["image"])


def test_validation_from_train_carves_a_fixed_holdout(cifar10_dir):
  root, _ = cifar10_dir
  info = data.get_info("cifar10", root, validation_from_train=5)
  assert info.splits == {"train": 35, "test": 6, "holdout": 5}
  train = data.source("cifar10", "train", root, validation_from_train=5)
  holdout = data.source("cifar10", "holdout", root, validation_from_train=5)
  full = data.source("cifar10", "train", root)
  keys = lambda s: [s[i]["image"].tobytes() for i in range(len(s))]
  assert (len(train), len(holdout)) == (35, 5)
  assert not set(keys(train)) & set(keys(holdout))
  assert sorted(keys(train) + keys(holdout)) == sorted(keys(full))
  assert keys(holdout) == keys(data.source("cifar10", "holdout", root,
                                           validation_from_train=5))
  batches = list(data.eval_batches("cifar10", "holdout", root, batch_size=4,
                                   validation_from_train=5))
  assert sum(b["mask"].sum() for b in batches) == 5


def _windows(padded, h, w):
  """All crops (and their mirror images) of one padded image."""
  out = []
  for dy in range(padded.shape[0] - h + 1):
    for dx in range(padded.shape[1] - w + 1):
      win = padded[dy:dy + h, dx:dx + w]
      out += [(dy, dx, False, win), (dy, dx, True, win[:, ::-1])]
  return out


def test_random_crop_flip_is_a_window_of_the_padded_image():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (16, 8, 8, 3), dtype=np.uint8)
  out = np.asarray(_crop_flip(jax.random.key(0), images, 2))
  assert out.shape == images.shape and out.dtype == np.uint8
  choices = []
  for image, result in zip(images, out):
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    match = [(dy, dx, f) for dy, dx, f, win in _windows(padded, 8, 8)
             if np.array_equal(win, result)]
    assert len(match) == 1, match
    choices.append(match[0])
  # Per image: the 16 images do not all share one crop/flip.
  assert len(set(choices)) > 4
  assert {f for _, _, f in choices} == {False, True}


def test_random_crop_flip_draws_cover_offsets_and_flips():
  # One ramp image repeated: copies differ only by their (dy, dx, flip).
  image = np.arange(32 * 32, dtype=np.int32).reshape(1, 32, 32, 1) + 1
  images = np.repeat(image, 4096, axis=0)
  out = np.asarray(_crop_flip(jax.random.key(1), images, 4))
  # Unflipped, output (16, 16) is image (12 + dy, 12 + dx); flipped it is
  # image (12 + dy, 11 + dx) and the ramp runs right to left.
  flip = out[:, 16, 17, 0] < out[:, 16, 16, 0]
  v = out[:, 16, 16, 0] - 1
  dy, dx = v // 32 - 12, v % 32 - 12 + flip
  combos = np.unique(np.stack([dy, dx, flip], 1), axis=0, return_counts=True)
  assert len(combos[0]) == 9 * 9 * 2  # every offset in 0..8, both flips
  assert combos[1].min() > 5  # roughly uniform (expected 25 each)
  assert abs(flip.mean() - 0.5) < 0.05
  np.testing.assert_array_equal(
      out, np.asarray(_crop_flip(jax.random.key(1), images, 4)))
  assert not np.array_equal(
      out, np.asarray(_crop_flip(jax.random.key(2), images, 4)))


def test_normalize_and_cifar_augment():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  images[4:] = 255  # all white: padded pixels stand out
  mean, std = data.CIFAR_MEAN, data.CIFAR_STD
  got = _normalize(images, mean, std, jnp.float32)
  want = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert _normalize(images, mean, std, jnp.bfloat16).dtype == jnp.bfloat16
  key = jax.random.key(3)
  aug = _augment(key, images, mean=mean, std=std)
  assert aug.shape == images.shape and aug.dtype == jnp.float32
  np.testing.assert_allclose(
      np.asarray(aug),
      np.asarray(_normalize(_crop_flip(key, images, 4), mean, std,
                            jnp.float32)), rtol=1e-6, atol=1e-6)
  # Zero padding happens before normalisation: padded pixels are -mean/std.
  pad_value = -np.asarray(mean) / np.asarray(std)
  white = np.asarray(aug)[4:]
  is_pad = np.isclose(white, pad_value, atol=1e-5).all(-1)
  is_white = np.isclose(white, (1 - np.asarray(mean)) / np.asarray(std),
                        atol=1e-5).all(-1)
  assert (is_pad | is_white).all() and is_pad.any() and is_white.any()
  # Without statistics: float pixels on the 0..255 scale, for normalize.
  unscaled = _augment(key, images)
  assert unscaled.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(unscaled),
                                np.asarray(_crop_flip(key, images, 4)))
  np.testing.assert_allclose(
      np.asarray(_normalize(unscaled, mean, std, jnp.float32)),
      np.asarray(aug), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="channels"):
    augment.normalize(images, mean[:2], std[:2])


def test_digits_are_never_flipped_but_cifar_images_are(digits_dir,
                                                       cifar10_dir):
  from training import steps  # pylint: disable=import-outside-toplevel
  assert not data.get_info("digits", digits_dir).hflip
  assert data.get_info("cifar10", cifar10_dir[0]).hflip
  images = np.tile(np.arange(32, dtype=np.uint8)[None, None, :, None],
                   (64, 32, 1, 3))
  rng = jax.random.key(0)
  cropped = augment.random_crop_flip(rng, jnp.asarray(images), 0, flip=False)
  np.testing.assert_array_equal(cropped, images)
  flipped = augment.random_crop_flip(rng, jnp.asarray(images), 0)
  assert (np.asarray(flipped)[:, 0, 0, 0] == 31).any()
  info = data.get_info("digits", digits_dir)
  x = steps.preprocess(rng, jnp.asarray(images), info)
  # Columns still increase left to right in every image: no flip.
  assert (np.diff(np.asarray(x)[:, 5, 4:28, 0], axis=-1) > 0).all()
