"""Fashion-MNIST: IDX reading, preparation, errors, 1-channel models/exports.

Loader tests run on small IDX files written here; the test reading the real
files skips (saying why) where Debian's ``dataset-fashion-mnist`` is not
installed.
"""

import gzip
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from training import data, datasets, errors, pipeline, steps
from training.datasets import fashion_mnist as fm

_SIZES = {"train": 12, "test": 6}


def _idx(array: np.ndarray, magic: int) -> bytes:
  header = magic.to_bytes(4, "big") + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _arrays(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  rng = np.random.default_rng(seed)
  return {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, n).astype(np.uint8))
          for split, n in _SIZES.items()}


def _write(folder: pathlib.Path, arrays, gz_train: bool = True,
           gz_test: bool = False) -> dict[str, pathlib.Path]:
  """The four files: train gzip-compressed, test raw (both forms read)."""
  folder.mkdir(parents=True, exist_ok=True)
  paths = {}
  for split, (images, labels) in arrays.items():
    gz = gz_train if split == "train" else gz_test
    for stem, raw in zip(fm.FASHION_MNIST_FILES[split],
                         (_idx(images, 0x803), _idx(labels, 0x801))):
      path = folder / (stem + (".gz" if gz else ""))
      path.write_bytes(gzip.compress(raw) if gz else raw)
      paths[stem] = path
  return paths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A data dir with the tiny dataset prepared; returns (data_dir, arrays)."""
  root = tmp_path_factory.mktemp("fmnist")
  arrays = _arrays()
  _write(root / "idx", arrays)
  data.prepare("fashion_mnist", str(root / "tfds"),
               manual_dir=str(root / "idx"))
  return str(root / "tfds"), arrays


def test_prepares_the_idx_files_at_28x28x1(tiny):
  data_dir, arrays = tiny
  builder = data._builder("fashion_mnist", data_dir)
  assert builder.name == "dsp_ddrop_fashion_mnist" and builder.is_prepared()
  for split, (images, labels) in arrays.items():
    stored = builder.as_data_source(split=split)
    records = sorted(stored.__getitems__(range(len(stored))),
                     key=lambda r: r["index"])
    got = np.stack([r["image"] for r in records])
    assert got.shape == (len(labels), 28, 28, 1)
    np.testing.assert_array_equal(got[..., 0], images)
    np.testing.assert_array_equal([r["label"] for r in records], labels)
  info = data.get_info("fashion_mnist", data_dir)
  assert (info.image_size, info.channels, info.num_classes) == (28, 1, 10)
  assert info.splits == _SIZES and info.hflip and info.crop_pad == 2
  assert info.mean == fm.FASHION_MNIST_MEAN and info.std == fm.FASHION_MNIST_STD
  assert data.image_shape("fashion_mnist", data_dir) == (28, 28, 1)


def test_validation_from_train_and_loaders(tiny):
  data_dir, arrays = tiny
  info = data.get_info("fashion_mnist", data_dir, validation_from_train=4)
  assert info.splits == {"train": 8, "test": 6, "holdout": 4}
  train = data.source("fashion_mnist", "train", data_dir,
                      validation_from_train=4)
  holdout = data.source("fashion_mnist", "holdout", data_dir,
                        validation_from_train=4)
  images = [r["image"][..., 0] for r in (*train.__getitems__(range(8)),
                                         *holdout.__getitems__(range(4)))]
  # The two parts are the training set, each example once.
  np.testing.assert_array_equal(
      np.sort(np.stack(images).reshape(12, -1), 0),
      np.sort(arrays["train"][0].reshape(12, -1), 0))
  batch = next(iter(data.train_loader(
      "fashion_mnist", "train", data_dir, global_batch_size=4, seed=0,
      validation_from_train=4, process_index=0, process_count=1)))
  assert batch["image"].shape == (4, 28, 28, 1)
  assert batch["image"].dtype == np.uint8


def test_augmentation_pads_two_pixels(tiny):
  info = data.get_info("fashion_mnist", tiny[0])
  images = jnp.full((64, 28, 28, 1), 255, jnp.uint8)
  x = jax.jit(lambda k, im: steps.preprocess(k, im, info))(
      jax.random.key(0), images)
  assert x.shape == (64, 28, 28, 1)
  padded = np.asarray(x[..., 0]) < 0  # zero pixels normalise below 0
  rows = padded.all(axis=2)
  border = np.maximum(rows.sum(1), padded.all(axis=1).sum(1))
  assert border.max() == 2  # at most the 2-pixel padding, and it is drawn


def test_missing_files_name_folder_files_and_package(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path / "sys"))
  data_dir = tmp_path / "tfds"
  with pytest.raises(FileNotFoundError) as e:
    data.prepare("fashion_mnist", str(data_dir))
  text = errors.message(e.value)
  assert "\n" not in text and str(tmp_path / "sys") in text
  for name in fm.expected_files():
    assert name in text
  assert "apt-get install dataset-fashion-mnist" in text
  assert not data_dir.exists()


def test_partial_folder_names_the_missing_files(tmp_path):
  paths = _write(tmp_path / "idx", _arrays())
  paths["t10k-labels-idx1-ubyte"].unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
    data.prepare("fashion_mnist", str(tmp_path / "tfds"),
                 manual_dir=str(tmp_path / "idx"))


def _corrupt_magic(path):
  raw = bytearray(path.read_bytes())
  raw[3] = 0x01
  path.write_bytes(bytes(raw))


def _truncate(path):
  path.write_bytes(path.read_bytes()[:-3])


def _append(path):
  path.write_bytes(path.read_bytes() + b"\0")


@pytest.mark.parametrize("stem,gz,corrupt,what", [
    ("t10k-images-idx3-ubyte", False, _corrupt_magic,
     "not an IDX images file (magic number 0x00000801, expected 0x00000803)"),
    ("t10k-labels-idx1-ubyte", False, _truncate,
     "truncated: the header announces 6 labels (6 bytes after the header), "
     "the file has 3"),
    ("t10k-images-idx3-ubyte", False, _append, "too long"),
    ("train-images-idx3-ubyte", True, _truncate,
     "corrupt or truncated gzip stream"),
])
def test_corrupt_file_is_named_and_nothing_is_left(tmp_path, stem, gz,
                                                    corrupt, what):
  paths = _write(tmp_path / "idx", _arrays())
  corrupt(paths[stem])
  data_dir = tmp_path / "tfds"
  with pytest.raises(ValueError) as e:
    data.prepare("fashion_mnist", str(data_dir),
                 manual_dir=str(tmp_path / "idx"))
  text = errors.message(e.value)
  assert text.startswith(f"{paths[stem]}: ") and what in text, text
  assert "\n" not in text
  assert not data_dir.exists()


def test_count_mismatch_names_both_files(tmp_path):
  arrays = _arrays()
  images, labels = arrays["test"]
  arrays["test"] = (images, labels[:5])
  paths = _write(tmp_path / "idx", arrays)
  with pytest.raises(ValueError) as e:
    data.prepare("fashion_mnist", str(tmp_path / "tfds"),
                 manual_dir=str(tmp_path / "idx"))
  text = str(e.value)
  assert (f"{paths['t10k-images-idx3-ubyte']} holds 6 images but "
          f"{paths['t10k-labels-idx1-ubyte']} holds 5 labels") == text
  assert not (tmp_path / "tfds").exists()


def test_real_files_counts_and_statistics():
  try:
    files = fm.find_files([fm.FASHION_MNIST_DIR])
  except FileNotFoundError as e:
    pytest.skip(f"incomplete Fashion-MNIST install: {e}")
  if files is None:
    pytest.skip(f"Fashion-MNIST not installed in {fm.FASHION_MNIST_DIR} "
                "(apt-get install dataset-fashion-mnist)")
  images, labels = fm.read_split(files, "train")
  assert images.shape == (60_000, 28, 28, 1)
  assert np.bincount(labels).tolist() == [6000] * 10
  x = images.astype(np.float64) / 255
  assert x.mean() == pytest.approx(fm.FASHION_MNIST_MEAN[0], abs=1e-12)
  assert x.std() == pytest.approx(fm.FASHION_MNIST_STD[0], abs=1e-12)
  test_images, test_labels = fm.read_split(files, "test")
  assert test_images.shape == (10_000, 28, 28, 1) and len(test_labels) == 10_000


def test_one_channel_run_trains_and_exports(tiny, tmp_path):
  """A 1-channel 28x28 model from the config, trained, exported and reloaded
  by the converter: preprocess.json says 1 x 28 x 28, logits match."""
  from configs import base
  from convert import cli
  data_dir, _ = tiny
  config = base.get_config()
  config.dataset, config.data_dir = "fashion_mnist", data_dir
  config.model, config.epochs, config.batch_size = "cifar_resnet8", 1, 4
  config.test_batch_size, config.progress_bar = 6, False
  workdir = tmp_path / "run"
  model = pipeline.build_model(config, 10)
  assert (model.in_channels, model.image_size) == (1, 28)
  report = pipeline.run(config, workdir)
  assert report["macs"] == models.flops.report(
      model, model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                        train=False), 28).macs
  out = tmp_path / "export"
  # The stage directory: the model is rebuilt from its checkpoint (channels
  # from the stem kernel), the size from the run's dataset.
  assert cli.main(["export", str(workdir / "train"), "--out", str(out),
                   "--no-program", "--no-fast"]) == 0
  pre = json.loads((out / "preprocess.json").read_text())
  assert pre["shape"] == [1, 28, 28] and pre["channel_order"] == "grey"
  assert pre["mean"] == list(fm.FASHION_MNIST_MEAN)
  io = np.load(out / "reference_io.npz")
  assert io["images_nchw"].shape[1:] == (1, 28, 28)


def test_converted_directory_rebuilds_a_one_channel_model(tmp_path):
  from training import artifacts
  overrides = {"in_channels": 1, "image_size": 28}
  model = models.create_model("cifar_vgg_tiny", 10, **overrides)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                         train=False)
  artifacts.save_variables(tmp_path, "cifar_vgg_tiny", 10, overrides,
                           jax.device_get(variables))
  loaded, back, _ = artifacts.load_variables(tmp_path)
  assert loaded.in_channels == 1 and loaded.image_size == 28
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 28, 28, 1)))
  np.testing.assert_array_equal(artifacts.logits(loaded, back, x),
                                artifacts.logits(model, variables, x))
