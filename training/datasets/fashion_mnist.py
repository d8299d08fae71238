"""Fashion-MNIST from its four official IDX files, as a 28x28x1 tfds dataset.

The dataset's official distribution is four IDX files (Xiao, Rasul and
Vollgraf, 2017; https://github.com/zalandoresearch/fashion-mnist), the files
Debian's ``dataset-fashion-mnist`` package installs into
``/usr/share/datasets/fashion-mnist`` (``FASHION_MNIST_DIR``)::

  train-images-idx3-ubyte.gz   train-labels-idx1-ubyte.gz
  t10k-images-idx3-ubyte.gz    t10k-labels-idx1-ubyte.gz

Each may also be stored uncompressed (the same name without ``.gz``). IDX
layout: a big-endian header of a 4-byte magic number (``0x00000803`` for
the uint8 image file, 3 dimensions; ``0x00000801`` for the uint8 label
file, 1 dimension) and one 4-byte size per dimension, then the raw bytes in
row-major order. Every file is checked completely before anything is
written: a wrong magic number, a size other than 28x28, a body shorter or
longer than its header says, a corrupt gzip stream, labels outside 0..9 or
image and label files of different counts raise ``ValueError`` naming the
file(s) and what is wrong.

Splits: ``train`` (60,000) and ``test`` (10,000) in the files' order; the
``index`` feature keeps each example's position. Images are stored as
uint8 [28, 28, 1] (native resolution, one grey channel).

``FASHION_MNIST_MEAN``/``FASHION_MNIST_STD`` are the mean and population
standard deviation of all training pixels on the 0..1 scale, computed from
the official training file (``tests/test_fashion_mnist.py`` recomputes them
where the files are installed).
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from training.datasets import _base

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_SPLITS = {"train": 60_000, "test": 10_000}
# (images file, labels file) of each split, without the optional ".gz".
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress",
                         "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
FASHION_MNIST_MEAN = (0.2860405969887955,)
FASHION_MNIST_STD = (0.35302424451492254,)
IMAGE_SIZE = 28
_IMAGE_MAGIC = 0x00000803  # uint8, 3 dimensions (count, rows, columns)
_LABEL_MAGIC = 0x00000801  # uint8, 1 dimension (count)


def expected_files() -> list[str]:
  """The four file names, gzip-compressed form (the official one)."""
  return [f + ".gz" for pair in FASHION_MNIST_FILES.values() for f in pair]


def _find(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
  for name in (stem + ".gz", stem):
    if (folder / name).is_file():
      return folder / name
  return None


def find_files(folders: Sequence[str | os.PathLike]
               ) -> dict[str, pathlib.Path] | None:
  """The four IDX files in the first of ``folders`` that holds any of them.

  Args:
    folders: folders to search, in order.

  Returns:
    ``{file stem: path}`` for the four files, or None when no folder holds
    any of them.

  Raises:
    FileNotFoundError: the first folder holding some of the files lacks
      others (the message names the folder and the missing files).
  """
  stems = [f for pair in FASHION_MNIST_FILES.values() for f in pair]
  for folder in folders:
    folder = pathlib.Path(folder).expanduser()
    found = {s: _find(folder, s) for s in stems}
    if not any(found.values()):
      continue
    missing = [s + ".gz" for s, p in found.items() if p is None]
    if missing:
      raise FileNotFoundError(
          f"{folder} holds only part of Fashion-MNIST: {', '.join(missing)} "
          f"(or uncompressed) missing; {install_hint()}")
    return found
  return None


def install_hint() -> str:
  """How to get the files (one sentence)."""
  return (f"install them with `apt-get install {FASHION_MNIST_PACKAGE}` "
          f"(into {FASHION_MNIST_DIR}) or set data_dir to the folder holding "
          "them")


def missing_files_message(folders: Sequence[str | os.PathLike]) -> str:
  """The one-line error of a search that found no Fashion-MNIST file."""
  where = ", ".join(str(pathlib.Path(f).expanduser()) for f in folders)
  return (f"No Fashion-MNIST files in {where}: expected "
          f"{', '.join(expected_files())} (or uncompressed); "
          f"{install_hint()}.")


def _read_bytes(path: pathlib.Path) -> bytes:
  raw = path.read_bytes()
  if path.suffix != ".gz":
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e


def read_idx(path: str | os.PathLike, kind: str) -> np.ndarray:
  """Reads one IDX file and checks its header against its body.

  Args:
    path: the file (``.gz`` is decompressed).
    kind: ``images`` (uint8 [n, 28, 28]) or ``labels`` (uint8 [n], 0..9).

  Returns:
    The array (``images`` as [n, 28, 28, 1]).

  Raises:
    ValueError: naming the file and what is wrong with it.
  """
  path = pathlib.Path(path)
  raw = _read_bytes(path)
  magic, ndim = (_IMAGE_MAGIC, 3) if kind == "images" else (_LABEL_MAGIC, 1)
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes; an "
                     f"IDX {kind} file starts with {header})")
  got = int.from_bytes(raw[:4], "big")
  if got != magic:
    raise ValueError(f"{path}: not an IDX {kind} file (magic number "
                     f"0x{got:08x}, expected 0x{magic:08x})")
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  if kind == "images" and dims[1:] != [IMAGE_SIZE, IMAGE_SIZE]:
    raise ValueError(f"{path}: images of {dims[1]}x{dims[2]} pixels, "
                     f"Fashion-MNIST's are {IMAGE_SIZE}x{IMAGE_SIZE}")
  want = int(np.prod(dims))
  body = len(raw) - header
  if body != want:
    what = "truncated" if body < want else "too long"
    raise ValueError(
        f"{path}: {what}: the header announces {dims[0]} {kind} "
        f"({want} bytes after the header), the file has {body}")
  array = np.frombuffer(raw, np.uint8, offset=header).reshape(dims)
  if kind == "labels":
    if array.size and array.max() >= len(FASHION_MNIST_CLASSES):
      raise ValueError(f"{path}: label {int(array.max())} outside 0..9")
    return array
  return array[..., None]


def read_split(files: dict[str, pathlib.Path], split: str
               ) -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 [n, 28, 28, 1] and labels int64 [n] of one split.

  Args:
    files: ``find_files``'s result.
    split: ``train`` or ``test``.

  Returns:
    ``(images, labels)``.

  Raises:
    ValueError: a file is corrupt, or the image and label files hold
      different counts (both named).
  """
  image_stem, label_stem = FASHION_MNIST_FILES[split]
  images = read_idx(files[image_stem], "images")
  labels = read_idx(files[label_stem], "labels")
  if len(images) != len(labels):
    raise ValueError(f"{files[image_stem]} holds {len(images)} images but "
                     f"{files[label_stem]} holds {len(labels)} labels")
  return images, labels.astype(np.int64)


def check_files(files: dict[str, pathlib.Path]) -> None:
  """Reads and checks all four files (``read_split``'s errors), writing
  nothing: called before preparation starts, so a bad file leaves no
  half-prepared dataset behind."""
  for split in FASHION_MNIST_FILES:
    read_split(files, split)


class FashionMnist(_base.LocalBuilder):
  """Fashion-MNIST from the four IDX files (see the module docstring)."""

  name = "dsp_ddrop_fashion_mnist"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, archive_dirs: Sequence[str | os.PathLike] = (),
               **kwargs):
    """Constructs the builder.

    Args:
      archive_dirs: folders searched for the IDX files, in order (only
        needed to prepare).
      **kwargs: forwarded to ``tfds.core.GeneratorBasedBuilder``.
    """
    self._archive_dirs = tuple(archive_dirs)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST read from the four official IDX files.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are local; nothing is downloaded.
    files = find_files(self._archive_dirs)
    if files is None:
      raise FileNotFoundError(missing_files_message(self._archive_dirs))
    return {split: self._generate_examples(*read_split(files, split))
            for split in FASHION_MNIST_SPLITS}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label), "index": i}
