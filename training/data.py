"""Datasets: tfds preparation, grain loading and padded evaluation batches.

Names accepted by every function (``DATASETS``):

* ``"digits"`` (default real dataset): scikit-learn's bundled handwritten
  digits at 32x32x3, splits ``train``/``validation``/``test`` = 1257/180/360
  (see ``training.datasets.digits`` for the exact conversion and split).
* ``"cifar10"``, ``"cifar100"``: splits ``train``/``test``, prepared from the
  official archives (``cifar-10-python.tar.gz`` ... see
  ``training.datasets.cifar``) that the user puts in ``manual_dir``, in
  ``data_dir`` or in ``<data_dir>/downloads/manual``.
* ``"fashion_mnist"``: splits ``train``/``test`` (60,000/10,000, 28x28x1),
  prepared from the four official IDX files (``train-images-idx3-ubyte.gz``
  ... see ``training.datasets.fashion_mnist``) found in the same folders or,
  after them, in ``/usr/share/datasets/fashion-mnist`` (Debian's
  ``dataset-fashion-mnist``).
* ``"tfds:<name>"``: any tfds dataset the user already prepared in the
  ``array_record`` format under ``data_dir`` (e.g. ``"tfds:cifar10"``, prepared
  elsewhere with ``tfds build cifar10 --file_format=array_record``); it is
  read, never prepared here. Its supervised keys (or ``image``/``label``)
  give the image and label.
* ``"imagenet2012"``: tfds's stock ImageNet already prepared in
  ``array_record`` under ``data_dir``, read as it is; splits
  ``train``/``validation``.
* ``"imagefolder:PATH"``: a ``PATH/train/<class>/*.JPEG`` +
  ``PATH/val/<class>/*.JPEG`` tree, prepared once into ``data_dir``; splits
  ``train``/``validation`` (``training.datasets.imagefolder``).

The last two are *encoded* datasets (``DatasetInfo.encoded``): records hold
JPEG bytes of any size, and the loaders take host transforms
(``training.transforms``: decode, crop, resize, augment) that turn them into
fixed-size uint8 images.

Which data ``"cifar10"``/``"cifar100"``/``"fashion_mnist"`` read (first
rule that applies):
1. the project's dataset (``dsp_ddrop_<name>``) already prepared under
   ``data_dir``;
2. the official files found in the folders above (prepared on first use;
   every file is checked completely before anything is written, so a corrupt
   one leaves nothing behind);
3. tfds's stock dataset of that name already prepared under ``data_dir`` in
   ``array_record`` format;
4. otherwise preparing fails with a message naming the expected files and
   the folders searched.

``data_dir`` defaults to ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
Datasets are prepared on first use (``prepare`` does it explicitly; it is
idempotent; on several hosts sharing one ``data_dir``, prepare on one host
first). Nothing here downloads anything or needs TensorFlow; reading tfds's
stock datasets (PNG-encoded images) needs Pillow.

Throughput: reading decodes one record at a time (about 0.1 ms each on one
core). For CIFAR-sized data pass ``in_memory=True`` (the split is decoded once
into numpy arrays, ~150 MB for CIFAR train, then batches are gathered
vectorised) or ``worker_count`` > 0.

Records are ``{"image": uint8 [H, W, C], "label": int}``; batches are
``{"image": uint8 [b, H, W, C], "label": int32 [b]}`` (plus a boolean
``mask`` for evaluation). Augmentation and normalisation happen on device
(``training.augment``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import math
import os
import pathlib
import shutil
from typing import Any, Callable, Iterator, Sequence

from absl import flags
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from training import datasets
from training.datasets import fashion_mnist

# Per-channel statistics on the 0..1 scale. CIFAR: the DSP reference values
# (docs/concepts.md, DSP pretraining), used for CIFAR-100 as well.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

_BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "digits": datasets.Digits,
    "cifar10": datasets.Cifar10,
    "cifar100": datasets.Cifar100,
    "fashion_mnist": datasets.FashionMnist,
}
_NOMINAL_SPLITS = {
    "digits": datasets.DIGITS_SPLITS,
    "cifar10": datasets.CIFAR_SPLITS,
    "cifar100": datasets.CIFAR_SPLITS,
    "fashion_mnist": datasets.FASHION_MNIST_SPLITS,
}
_STATS = {
    "digits": (datasets.DIGITS_MEAN, datasets.DIGITS_STD),
    "cifar10": (CIFAR_MEAN, CIFAR_STD),
    "cifar100": (CIFAR_MEAN, CIFAR_STD),
    "fashion_mnist": (datasets.FASHION_MNIST_MEAN, datasets.FASHION_MNIST_STD),
}
# Zero padding of the training random crop: CIFAR's 4 pixels of 32 for the
# 32x32 datasets; 2 of Fashion-MNIST's 28 (the same fraction, about 1/8 of
# the side, as the usual Fashion-MNIST recipes pad).
_CROP_PAD = {"fashion_mnist": 2}
DEFAULT_CROP_PAD = 4
TFDS_PREFIX = "tfds:"
DATASETS = tuple(_BUILDERS) + (TFDS_PREFIX + "<name>", datasets.IMAGENET2012,
                                datasets.IMAGEFOLDER_PREFIX + "<path>")
HOLDOUT_SPLIT = "holdout"
# Fixed permutation seed of the train/holdout carve (validation_from_train).
_HOLDOUT_SEED = 0
# For a tfds:<name> dataset without known statistics, mean/std come from at
# most this many training images.
_STATS_SAMPLE = 10_000


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the engine needs to know about a dataset.

  Attributes:
    name: the name passed to ``get_info``.
    num_classes: number of label classes.
    image_size: height (= width) of the images.
    channels: image channels.
    splits: split name -> number of examples (with ``validation_from_train``
      > 0: ``train`` reduced and ``holdout`` added).
    mean: per-channel mean on the 0..1 scale.
    std: per-channel standard deviation on the 0..1 scale.
    hflip: whether a horizontal flip keeps the label (training augmentation
      flips only then; a mirrored digit is a different glyph).
    crop_pad: zero padding (pixels per side) of the training random crop.
    encoded: records hold encoded images of any size; the host transforms
      of ``training.transforms`` decode, crop and augment them (to
      ``image_size``), and the device step only normalises.
    eval_split: the split reported as ``test`` (``validation`` for the
      ImageNet datasets, whose test labels are not public).
  """
  name: str
  num_classes: int
  image_size: int
  channels: int
  splits: dict[str, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  hflip: bool = True
  encoded: bool = False
  eval_split: str = "test"
  crop_pad: int = DEFAULT_CROP_PAD


# Datasets whose labels a horizontal flip would change.
_NO_HFLIP = frozenset({"digits"})


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets``."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


def _archive_dirs(name: str, data_dir: str, manual_dir: str | None
                  ) -> list[str]:
  """Folders searched for ``name``'s official files, in order."""
  dirs = [manual_dir] if manual_dir else []
  dirs += [data_dir, os.path.join(data_dir, "downloads", "manual")]
  if name == "fashion_mnist":
    dirs.append(datasets.FASHION_MNIST_DIR)
  return dirs


def _find_local(name: str, archive_dirs: Sequence[str]) -> Any:
  """The official files of ``name`` in ``archive_dirs``, or None."""
  if name == "fashion_mnist":
    return fashion_mnist.find_files(archive_dirs)
  return datasets.find_archive(name, archive_dirs)


def _check_local(name: str, archive_dirs: Sequence[str]) -> None:
  """Raises the error that preparing ``name`` would meet, before tfds
  starts: it would announce a download and leave an empty dataset folder
  behind."""
  found = _find_local(name, archive_dirs)
  if found is None:
    if name == "fashion_mnist":
      raise FileNotFoundError(fashion_mnist.missing_files_message(
          archive_dirs))
    raise FileNotFoundError(datasets.missing_archive_message(
        name, archive_dirs) + " Or set data_dir to the folder holding it.")
  if name == "fashion_mnist":
    fashion_mnist.check_files(found)


def _builder(name: str, data_dir: str | None,
             manual_dir: str | None = None,
             strict: bool = False) -> tfds.core.DatasetBuilder:
  """Resolves ``name`` to a tfds builder (rules: module docstring)."""
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  if name.startswith(TFDS_PREFIX):
    return tfds.builder(name[len(TFDS_PREFIX):], data_dir=data_dir)
  if name == datasets.IMAGENET2012 or name.startswith(
      datasets.IMAGEFOLDER_PREFIX):
    return _encoded_builder(name, data_dir, strict)
  if name not in _BUILDERS:
    raise ValueError(f"Unknown dataset {name!r}; valid: {list(DATASETS)}.")
  archive_dirs = _archive_dirs(name, data_dir, manual_dir)
  own_kwargs = dict(data_dir=data_dir, file_format="array_record")
  if name != "digits":
    own_kwargs["archive_dirs"] = archive_dirs
  own = _BUILDERS[name](**own_kwargs)
  if (name == "digits" or _prepared(own)
      or _find_local(name, archive_dirs) is not None):
    return own
  stock = tfds.builder(name, data_dir=data_dir)
  if _prepared(stock) and _is_array_record(stock):
    return stock
  return own


def _encoded_builder(name: str, data_dir: str, strict: bool
                     ) -> tfds.core.DatasetBuilder:
  """The builder of ``imagenet2012`` or ``imagefolder:PATH``."""
  if name == datasets.IMAGENET2012:
    found = datasets.imagenet2012_dir(data_dir)
    if found is None:
      raise FileNotFoundError(
          f"imagenet2012 is not prepared under {data_dir} (expected "
          f"{data_dir}/imagenet2012/<version>/dataset_info.json in "
          "array_record). Prepare it once elsewhere with `tfds build "
          "imagenet2012 --file_format=array_record` from the manual "
          "download, or use dataset 'imagefolder:PATH' for a "
          "PATH/train/<class>/*.JPEG tree.")
    return tfds.builder_from_directory(str(found))
  root = name[len(datasets.IMAGEFOLDER_PREFIX):]
  if not root:
    raise ValueError("dataset 'imagefolder:' needs a path: imagefolder:PATH")
  return datasets.ImageFolder(root=root, strict=strict, data_dir=data_dir,
                              file_format="array_record")


def is_encoded(name: str) -> bool:
  """Whether dataset ``name`` holds encoded images (module docstring)."""
  return name == datasets.IMAGENET2012 or name.startswith(
      datasets.IMAGEFOLDER_PREFIX)


def _prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # Checked first: tfds logs a warning for every absent variant folder.
  return ((builder.data_path / "dataset_info.json").exists()
          and builder.is_prepared())


def _is_array_record(builder: tfds.core.DatasetBuilder) -> bool:
  return builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


def prepare(name: str, data_dir: str | None = None, *,
            manual_dir: str | None = None, strict: bool = False) -> None:
  """Prepares ``name`` under ``data_dir`` unless it is already prepared.

  Args:
    name: one of ``DATASETS``.
    data_dir: tfds data dir; defaults to ``default_data_dir()``.
    manual_dir: extra folder searched first for the CIFAR archives and the
      Fashion-MNIST files.
    strict: ``imagefolder:``: an undecodable image fails preparation
      (``CorruptImageError`` naming the file) instead of being skipped and
      counted.

  Raises:
    FileNotFoundError: a CIFAR archive or Fashion-MNIST file is missing (the
      message names the files and folders), or a ``tfds:`` dataset is not
      prepared.
    ValueError: unknown name, a ``tfds:`` dataset not in array_record, or a
      corrupt Fashion-MNIST file (named, with what is wrong).
  """
  builder = _builder(name, data_dir, manual_dir, strict)
  if _prepared(builder):
    if not _is_array_record(builder):
      raise ValueError(
          f"Dataset {name!r} at {builder.data_dir} is stored as "
          f"{builder.info.file_format}; only array_record reads without "
          "TensorFlow. Rebuild it with `tfds build "
          f"{builder.name} --file_format=array_record`.")
    return
  if name.startswith(TFDS_PREFIX):
    raise FileNotFoundError(
        f"{name!r} is not prepared at {builder.data_dir}. tfds datasets "
        "other than the built-in ones are read, not prepared, here: build it "
        f"with `tfds build {builder.name} --file_format=array_record "
        f"--data_dir={data_dir or default_data_dir()}` first.")
  if name in datasets.CIFAR_ARCHIVES or name == "fashion_mnist":
    _check_local(name, _archive_dirs(
        name, os.path.expanduser(data_dir or default_data_dir()), manual_dir))
  # tfds announces "Downloading and preparing dataset ..."; nothing is
  # downloaded here, so say what happens instead.
  print(f"preparing {name} once in {builder.data_dir} (from local files; "
        "nothing is downloaded)", flush=True)
  root = pathlib.Path(os.path.expanduser(data_dir or default_data_dir()))
  created = [p for p in (root / builder.name, root / "downloads")
             if not p.exists()]
  tfds.disable_progress_bar()  # Its nested bars garble logs.
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except BaseException:
    # Nothing half-prepared stays behind: the next attempt starts clean.
    for p in created:
      shutil.rmtree(p, ignore_errors=True)
    for p in pathlib.Path(builder.data_dir).parent.glob("*incomplete*"):
      shutil.rmtree(p, ignore_errors=True)
    raise
  finally:
    tfds.enable_progress_bar()


def _label_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  keys = builder.info.supervised_keys
  if isinstance(keys, tuple) and len(keys) == 2 and all(
      isinstance(k, str) for k in keys):
    return keys
  return "image", "label"


def _carve(num_train: int, holdout: int) -> tuple[np.ndarray, np.ndarray]:
  """Fixed split of the training indices into (train, holdout), each sorted."""
  if not 0 < holdout < num_train:
    raise ValueError(f"validation_from_train={holdout} must be in "
                     f"[1, {num_train - 1}] (train has {num_train}).")
  # RandomState: its stream is frozen by numpy, so the carve never changes.
  perm = np.random.RandomState(_HOLDOUT_SEED).permutation(num_train)
  cut = num_train - holdout
  return np.sort(perm[:cut]), np.sort(perm[cut:])


class Source:
  """A grain random-access source of ``{"image", "label"}`` records.

  Wraps a tfds array_record data source, optionally restricted to a sorted
  subset of its indices (the train/holdout carve). With ``encoded`` the
  image stays the record's encoded bytes.
  """

  def __init__(self, records: Any, image_key: str, label_key: str,
               indices: np.ndarray | None = None, encoded: bool = False):
    self._records = records
    self._image_key = image_key
    self._label_key = label_key
    self._indices = indices
    self._encoded = encoded

  def __len__(self) -> int:
    return len(self._records) if self._indices is None else len(self._indices)

  def _convert(self, record: dict[str, Any]) -> dict[str, Any]:
    image = record[self._image_key]
    return {"image": image if self._encoded else np.asarray(image, np.uint8),
            "label": int(record[self._label_key])}

  def _map(self, index: int) -> int:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    index %= len(self)
    return index if self._indices is None else int(self._indices[index])

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._convert(self._records[self._map(int(index))])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    raw = self._records.__getitems__([self._map(int(i)) for i in indices])
    return [self._convert(r) for r in raw]

  def __repr__(self) -> str:
    return (f"Source({self._records!r}, n={len(self)}, "
            f"subset={self._indices is not None})")


class ArraySource:
  """A grain random-access source over in-memory image and label arrays."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    self.images = images
    self.labels = labels

  @classmethod
  def read(cls, src: Source) -> "ArraySource":
    """Reads every record of ``src`` into memory (CIFAR train: 150 MB)."""
    batch = stack_records(src.__getitems__(range(len(src))))
    return cls(batch["image"], batch["label"])

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f"ArraySource(n={len(self)}, image={self.images.shape[1:]})"


def source(name: str, split: str, data_dir: str | None = None, *,
           validation_from_train: int = 0,
           manual_dir: str | None = None,
           in_memory: bool = False) -> Source | ArraySource:
  """Opens one split as a grain ``RandomAccessDataSource``.

  Args:
    name: one of ``DATASETS``.
    split: a split of the dataset, or ``"holdout"`` when
      ``validation_from_train`` > 0.
    data_dir: tfds data dir; defaults to ``default_data_dir()``.
    validation_from_train: N > 0 carves a model-selection split out of
      ``train``: a fixed permutation (seed 0) of the train indices puts its
      last N into ``holdout`` and the rest into ``train`` (both kept in
      stored order).
    manual_dir: extra folder searched first for the CIFAR archives.
    in_memory: read the whole split into memory first (an ``ArraySource``);
      faster to iterate, meant for small datasets and ``worker_count=0``.

  Returns:
    A source of ``{"image": uint8 [H, W, C], "label": int}`` records.
  """
  prepare(name, data_dir, manual_dir=manual_dir)
  builder = _builder(name, data_dir, manual_dir)
  splits = list(builder.info.splits)
  if validation_from_train:
    splits.append(HOLDOUT_SPLIT)
  if split not in splits:
    raise ValueError(f"Unknown split {split!r} of {name!r}; valid: {splits}"
                     + ("" if validation_from_train else
                        f" ({HOLDOUT_SPLIT!r} needs validation_from_train>0)"))
  stored = "train" if split == HOLDOUT_SPLIT else split
  encoded = is_encoded(name)
  image_key, label_key = _label_keys(builder)
  records = builder.as_data_source(split=stored, decoders={
      image_key: tfds.decode.SkipDecoding()} if encoded else None)
  indices = None
  if validation_from_train and stored == "train":
    train_idx, holdout_idx = _carve(len(records), validation_from_train)
    indices = holdout_idx if split == HOLDOUT_SPLIT else train_idx
  src = Source(records, image_key, label_key, indices=indices,
               encoded=encoded)
  if in_memory and encoded:
    raise ValueError(f"in_memory=True is for small decoded datasets; {name!r}"
                     " holds encoded images (use worker_count instead).")
  return ArraySource.read(src) if in_memory else src


def _compute_stats(src: Source | ArraySource
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean/std (0..1 scale) of the first images of ``src``."""
  n = min(len(src), _STATS_SAMPLE)
  images = np.stack([r["image"] for r in src.__getitems__(range(n))])
  x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
  return tuple(map(float, x.mean(0))), tuple(map(float, x.std(0)))


def get_info(name: str, data_dir: str | None = None, *,
             validation_from_train: int = 0,
             manual_dir: str | None = None,
             image_size: int = 224) -> DatasetInfo:
  """Describes a dataset (without preparing the built-in ones).

  Split sizes come from the prepared data when it exists, else from the
  official sizes of the built-in datasets. Mean/std: digits and CIFAR use
  fixed values (``DIGITS_MEAN``/``CIFAR_MEAN``...); other ``tfds:`` datasets
  use the statistics of their first 10,000 training images.

  Args:
    name: one of ``DATASETS``.
    data_dir: tfds data dir; defaults to ``default_data_dir()``.
    validation_from_train: as in ``source``; moves N examples from
      ``train`` to ``holdout`` in ``splits``.
    manual_dir: extra folder searched first for the CIFAR archives.
    image_size: encoded datasets: the size the host transforms produce
      (their ``image_size``; the others report their stored size).

  Returns:
    The ``DatasetInfo``.
  """
  if is_encoded(name):
    return _encoded_info(name, data_dir, image_size, validation_from_train)
  builder = _builder(name, data_dir, manual_dir)
  if not _prepared(builder) and name not in _NOMINAL_SPLITS:
    prepare(name, data_dir, manual_dir=manual_dir)  # Raises: not prepared.
  if _prepared(builder):
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  else:
    splits = dict(_NOMINAL_SPLITS[name])
  if validation_from_train:
    train_idx, holdout_idx = _carve(splits["train"], validation_from_train)
    splits["train"], splits[HOLDOUT_SPLIT] = len(train_idx), len(holdout_idx)
  _, label_key = _label_keys(builder)
  shape = _image_shape(name, builder)
  stock_name = name[len(TFDS_PREFIX):] if name.startswith(TFDS_PREFIX) else name
  if stock_name in _STATS:
    mean, std = _STATS[stock_name]
  else:
    mean, std = _compute_stats(source(name, "train", data_dir))
  return DatasetInfo(
      name=name, num_classes=builder.info.features[label_key].num_classes,
      image_size=shape[0], channels=shape[2], splits=splits,
      mean=tuple(mean), std=tuple(std), hflip=name not in _NO_HFLIP,
      crop_pad=_CROP_PAD.get(stock_name, DEFAULT_CROP_PAD))


def _image_shape(name: str, builder: tfds.core.DatasetBuilder
                 ) -> tuple[int, int, int]:
  image_key, _ = _label_keys(builder)
  shape = tuple(builder.info.features[image_key].shape)
  if len(shape) != 3 or shape[0] != shape[1]:
    raise ValueError(f"{name!r}: feature {image_key!r} has shape {shape}; "
                     "square HWC images are expected.")
  return shape


def image_shape(name: str, data_dir: str | None = None,
                image_size: int = 224) -> tuple[int, int, int]:
  """``(height, width, channels)`` of the images a model of ``name`` takes.

  Reads the dataset's declared features only: nothing is prepared or read.

  Args:
    name: one of ``DATASETS``.
    data_dir: tfds data dir; defaults to ``default_data_dir()``.
    image_size: encoded datasets: the size the host transforms produce.

  Returns:
    The NHWC image shape without the batch axis.
  """
  if is_encoded(name):
    return (image_size, image_size, 3)
  return _image_shape(name, _builder(name, data_dir))


def _encoded_info(name: str, data_dir: str | None, image_size: int,
                  validation_from_train: int) -> DatasetInfo:
  """``get_info`` of an encoded dataset (prepared first if needed)."""
  prepare(name, data_dir)
  builder = _builder(name, data_dir)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  missing = [s for s in ("train", "validation") if s not in splits]
  if missing:
    raise ValueError(f"{name!r} at {builder.data_dir} has splits "
                     f"{sorted(splits)}; expected train and validation.")
  if validation_from_train:
    train_idx, holdout_idx = _carve(splits["train"], validation_from_train)
    splits["train"], splits[HOLDOUT_SPLIT] = len(train_idx), len(holdout_idx)
  _, label_key = _label_keys(builder)
  return DatasetInfo(
      name=name, num_classes=builder.info.features[label_key].num_classes,
      image_size=image_size, channels=3, splits=splits,
      mean=datasets.IMAGENET_MEAN, std=datasets.IMAGENET_STD, hflip=True,
      encoded=True, eval_split="validation")


def _process_layout(process_index: int | None,
                    process_count: int | None) -> tuple[int, int]:
  if (process_index is None) != (process_count is None):
    raise ValueError("Give both process_index and process_count, or neither "
                     f"(got {process_index=}, {process_count=}).")
  if process_index is None:
    return jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in "
                     f"[0, {process_count}).")
  return process_index, process_count


def _local_batch(batch_size: int, process_count: int, field: str) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"{field}={batch_size} must be a positive multiple of "
                     f"the process count {process_count}.")
  return batch_size // process_count


def stack_records(records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks records into a batch: uint8 images and int32 labels."""
  return {"image": np.stack([r["image"] for r in records]),
          "label": np.asarray([r["label"] for r in records], np.int32)}


def steps_per_epoch(num_examples: int, global_batch_size: int,
                    process_count: int = 1) -> int:
  """Batches per epoch that ``train_loader`` yields on every process."""
  local = _local_batch(global_batch_size, process_count, "global_batch_size")
  return (num_examples // process_count) // local


def train_loader(name: str, split: str, data_dir: str | None = None, *,
                 global_batch_size: int, seed: int,
                 num_epochs: int | None = None, shuffle: bool = True,
                 process_index: int | None = None,
                 process_count: int | None = None, worker_count: int = 0,
                 validation_from_train: int = 0,
                 worker_buffer_size: int = 1,
                 read_options: grain.ReadOptions | None = None,
                 in_memory: bool = False,
                 manual_dir: str | None = None,
                 global_order: bool = False,
                 transforms: Sequence[grain.transforms.Map
                                      | grain.transforms.RandomMap] = ()
                 ) -> grain.DataLoader:
  """A checkpointable grain loader of shuffled training batches.

  Each process reads a disjoint shard of ``len(split) // process_count``
  examples (the remainder is dropped so every process yields the same number
  of batches), reshuffled every epoch from ``seed``, in local batches of
  ``global_batch_size // process_count`` (incomplete last batch dropped).
  Epochs follow each other in one stream: with ``num_epochs=None`` it never
  ends and a batch may span two epochs; ``steps_per_epoch`` gives the
  nominal epoch length. ``it = iter(loader)`` has ``it.get_state()`` /
  ``it.set_state(state)`` (also usable with
  ``grain.checkpoint.CheckpointHandler`` in orbax) to resume at the exact
  example; the state is only valid for the same arguments (with
  ``worker_count`` > 0 each worker batches its own slice of the stream, so
  the order depends on ``worker_count``).

  With ``global_order=True`` every process instead draws the same shuffled
  stream of the whole split in global batches of ``global_batch_size`` and
  reads only the ``process_index``-th block of ``global_batch_size //
  process_count`` examples of each: the global batches (and so a run's
  results) are the same for any process count, the number of batches is the
  same as above, and the iterator state is the same on every process.

  Args:
    name: one of ``DATASETS``.
    split: split to read (``train``; ``holdout`` with
      ``validation_from_train``).
    data_dir: tfds data dir; defaults to ``default_data_dir()``.
    global_batch_size: batch size summed over processes.
    seed: shuffling seed (0 <= seed < 2**32).
    num_epochs: number of epochs, or None for an endless stream.
    shuffle: shuffle the examples (per epoch).
    process_index: this process's index; with ``process_count`` overrides
      ``grain.sharding.ShardByJaxProcess`` (for tests).
    process_count: number of processes, see ``process_index``.
    worker_count: grain worker processes (0: read in this process).
    validation_from_train: see ``source``.
    worker_buffer_size: batches buffered per worker.
    read_options: grain read threads/prefetch; default one thread
      prefetching two local batches (record decoding holds the GIL, so more
      threads only add overhead; use ``worker_count`` to scale).
    in_memory: see ``source``.
    manual_dir: extra folder searched first for the CIFAR archives.
    global_order: one order for every process count (see above).
    transforms: per-record grain ops applied before batching, in the
      workers (encoded datasets: ``training.transforms.TrainTransform``,
      required there). A ``RandomMap`` draws from a generator fixed by
      ``seed`` and the record's position in the stream (with
      ``global_order``: its position in the global batch, whatever the
      process count), so a restored iterator repeats the same draws.

  Returns:
    A ``grain.DataLoader`` yielding ``{"image": uint8 [b, H, W, C],
    "label": int32 [b]}``.
  """
  src = source(name, split, data_dir,
               validation_from_train=validation_from_train,
               manual_dir=manual_dir, in_memory=in_memory)
  if is_encoded(name) and not transforms:
    raise ValueError(f"{name!r} holds encoded images of any size: pass "
                     "transforms (training.transforms.TrainTransform).")
  if global_order:
    return _global_order_loader(
        src, global_batch_size, seed, num_epochs, shuffle,
        _process_layout(process_index, process_count), worker_count,
        worker_buffer_size, read_options, transforms)
  if process_index is None and process_count is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  else:
    process_index, process_count = _process_layout(process_index,
                                                   process_count)
    shard_options = grain.sharding.ShardOptions(
        shard_index=process_index, shard_count=process_count,
        drop_remainder=True)
  local = _local_batch(global_batch_size, shard_options.shard_count,
                       "global_batch_size")
  if len(src) // shard_options.shard_count < local:
    raise ValueError(f"{name!r} split {split!r} has {len(src)} examples: too "
                     f"few for a local batch of {local} on "
                     f"{shard_options.shard_count} process(es).")
  if worker_count > 0 and not flags.FLAGS.is_parsed():
    # grain workers read absl flags; outside absl.app.run nothing has parsed
    # them and the read raises UnparsedFlagAccessError.
    flags.FLAGS.mark_as_parsed()
  sampler = grain.samplers.IndexSampler(
      num_records=len(src), shard_options=shard_options, shuffle=shuffle,
      num_epochs=num_epochs, seed=seed)
  if isinstance(src, ArraySource):
    # Records are indices, gathered a whole batch at a time: grain's
    # per-record cost then stays small next to the arrays' fancy indexing.
    operations = [grain.transforms.Batch(local, drop_remainder=True),
                  _Gather(src)]
    src = grain.sources.RangeDataSource(0, len(src), 1)
  else:
    operations = [*transforms,
                  grain.transforms.Batch(local, drop_remainder=True,
                                         batch_fn=stack_records)]
  return grain.DataLoader(
      data_source=src, sampler=sampler, operations=operations,
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      read_options=read_options or grain.ReadOptions(
          num_threads=1, prefetch_buffer_size=2 * local))


class _Gather(grain.transforms.Map):
  """Maps a batch of indices to those examples of an ``ArraySource``."""

  def __init__(self, arrays: ArraySource):
    self._arrays = arrays

  def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)
    return {"image": self._arrays.images[indices],
            "label": self._arrays.labels[indices]}


class _ReadPart(grain.transforms.Map):
  """Maps a global batch of indices to the examples of one block of it."""

  def __init__(self, src: Source | ArraySource, start: int, size: int):
    self._src = src
    self._part = slice(start, start + size)

  def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)[self._part]
    if isinstance(self._src, ArraySource):
      return _Gather(self._src).map(indices)
    return stack_records(self._src.__getitems__(indices))


class _TransformPart(grain.transforms.RandomMap):
  """``_ReadPart`` with per-record transforms.

  The batch's generator draws one seed per example of the whole global
  batch; each record of this process's block is transformed with a
  generator from its own seed, so the draws do not depend on the process
  count.
  """

  def __init__(self, src: Source, start: int, size: int,
               transforms: Sequence[Any]):
    self._src = src
    self._part = slice(start, start + size)
    self._transforms = tuple(transforms)

  def random_map(self, indices: np.ndarray,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)
    seeds = rng.integers(0, 2**63 - 1, size=len(indices))[self._part]
    out = []
    for record, s in zip(self._src.__getitems__(indices[self._part]), seeds):
      record_rng = np.random.default_rng(int(s))
      for t in self._transforms:
        record = (t.random_map(record, record_rng)
                  if isinstance(t, grain.transforms.RandomMap)
                  else t.map(record))
      out.append(record)
    return stack_records(out)


def _global_order_loader(src: Source | ArraySource, global_batch_size: int,
                         seed: int, num_epochs: int | None, shuffle: bool,
                         layout: tuple[int, int], worker_count: int,
                         worker_buffer_size: int,
                         read_options: grain.ReadOptions | None,
                         transforms: Sequence[Any] = ()
                         ) -> grain.DataLoader:
  """``train_loader(global_order=True)``: one stream, a block per process."""
  process_index, process_count = layout
  local = _local_batch(global_batch_size, process_count, "global_batch_size")
  if len(src) < global_batch_size:
    raise ValueError(f"{len(src)} training examples are too few for a global "
                     f"batch of {global_batch_size}.")
  if worker_count > 0 and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # As in train_loader.
  sampler = grain.samplers.IndexSampler(
      num_records=len(src), shard_options=grain.sharding.NoSharding(),
      shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  return grain.DataLoader(
      data_source=grain.sources.RangeDataSource(0, len(src), 1),
      sampler=sampler,
      operations=[grain.transforms.Batch(global_batch_size,
                                         drop_remainder=True),
                  _ReadPart(src, process_index * local, local) if not
                  transforms else _TransformPart(
                      src, process_index * local, local, transforms)],
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      read_options=read_options or grain.ReadOptions(
          num_threads=1, prefetch_buffer_size=2 * global_batch_size))


def num_eval_batches(num_examples: int, batch_size: int,
                     process_count: int = 1) -> int:
  """Number of batches ``eval_batches`` yields on every process."""
  local = _local_batch(batch_size, process_count, "batch_size")
  return math.ceil(math.ceil(num_examples / process_count) / local)


def eval_batches(name: str, split: str, data_dir: str | None = None, *,
                 batch_size: int, process_index: int | None = None,
                 process_count: int | None = None,
                 validation_from_train: int = 0,
                 manual_dir: str | None = None,
                 transform: Callable[[dict[str, Any]], dict[str, Any]]
                 | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every example of a split exactly once, in order, in padded batches.

  Process ``p`` of ``P`` reads the ``p``-th contiguous block of
  ``ceil(n / P)`` examples in local batches of ``batch_size // P``; every
  process yields ``num_eval_batches(n, batch_size, P)`` batches, padded with
  zero images/labels and ``mask`` False, so collectives stay in step and no
  example is dropped or counted twice.

  Args:
    name: one of ``DATASETS``.
    split: split to read.
    data_dir: tfds data dir; defaults to ``default_data_dir()``.
    batch_size: global batch size (a multiple of the process count).
    process_index: this process's index; defaults to ``jax.process_index()``.
    process_count: number of processes; defaults to ``jax.process_count()``.
    validation_from_train: see ``source``.
    manual_dir: extra folder searched first for the CIFAR archives.
    transform: deterministic per-record function (encoded datasets:
      ``training.transforms.EvalTransform``, required there), run on a
      thread pool (Pillow releases the GIL while decoding and resizing).

  Yields:
    ``{"image": uint8 [b, H, W, C], "label": int32 [b], "mask": bool [b]}``
    with ``b = batch_size // process_count``.
  """
  src = source(name, split, data_dir,
               validation_from_train=validation_from_train,
               manual_dir=manual_dir)
  if transform is not None:
    src = MappedSource(src, transform)
  elif is_encoded(name):
    raise ValueError(f"{name!r} holds encoded images of any size: pass "
                     "transform (training.transforms.EvalTransform).")
  process_index, process_count = _process_layout(process_index, process_count)
  local = _local_batch(batch_size, process_count, "batch_size")
  n = len(src)
  per_process = math.ceil(n / process_count)
  start = min(n, process_index * per_process)
  stop = min(n, start + per_process)
  return _padded_batches(src, start, stop, local,
                         num_eval_batches(n, batch_size, process_count))


class MappedSource:
  """A source whose records pass through a deterministic function.

  ``__getitems__`` maps the records on a thread pool of ``threads`` threads
  (default: the CPU count, at most 16).
  """

  def __init__(self, src: Any, fn: Callable[[dict[str, Any]], dict[str, Any]],
               threads: int | None = None):
    self._src = src
    self._fn = fn
    self._threads = threads or min(16, os.cpu_count() or 1)
    self._pool = None

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._fn(self._src[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    records = self._src.__getitems__(indices)
    if self._threads == 1 or len(records) == 1:
      return [self._fn(r) for r in records]
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self._threads)
    return list(self._pool.map(self._fn, records))

  def __repr__(self) -> str:
    return f"MappedSource({self._src!r}, {self._fn!r})"


def _padded_batches(src: Source | ArraySource, start: int, stop: int,
                    local: int, num_batches: int
                    ) -> Iterator[dict[str, np.ndarray]]:
  """Batches of ``src[start:stop]``, padded up to ``num_batches`` batches."""
  shape = src[0]["image"].shape
  for b in range(num_batches):
    lo = min(stop, start + b * local)
    hi = min(stop, lo + local)
    batch = {"image": np.zeros((local,) + shape, np.uint8),
             "label": np.zeros(local, np.int32),
             "mask": np.arange(local) < hi - lo}
    if hi > lo:
      real = stack_records(src.__getitems__(range(lo, hi)))
      batch["image"][:hi - lo] = real["image"]
      batch["label"][:hi - lo] = real["label"]
    yield batch
