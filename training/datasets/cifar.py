"""CIFAR-10/100 tfds builders that read the official archives with numpy.

The user downloads the archives once
(https://www.cs.toronto.edu/~kriz/cifar.html) and puts them, packed or
extracted, in one of the folders the builder is given (``archive_dirs``;
``training.data`` passes the manual dir, the data dir and
``<data_dir>/downloads/manual``). Accepted, in this order of preference:

* CIFAR-10: ``cifar-10-python.tar.gz``, ``cifar-10-batches-py/``,
  ``cifar-10-binary.tar.gz``, ``cifar-10-batches-bin/``;
* CIFAR-100: ``cifar-100-python.tar.gz``, ``cifar-100-python/``,
  ``cifar-100-binary.tar.gz``, ``cifar-100-binary/``.

The python version holds pickled dicts (``data``: uint8 [n, 3072] as three
1024-byte colour planes R, G, B, each row-major 32x32; ``labels`` for CIFAR-10,
``fine_labels``/``coarse_labels`` for CIFAR-100). They are read by a
restricted unpickler that builds only what such a batch holds (dicts, lists,
strings, numbers and integer numpy arrays): a pickle naming any other
callable (code it would run) is refused with an error naming the file, and
nothing in it is executed. The binary version holds
fixed-size records: one label byte (CIFAR-10) or coarse then fine label bytes
(CIFAR-100), then the same 3072 image bytes. Both versions hold the same
examples in the same order; ``index`` stores each example's position in that
official order (train batches 1..5 concatenated for CIFAR-10).

Splits: ``train`` (50,000) and ``test`` (10,000). CIFAR-100 uses the fine
labels as ``label`` and keeps ``coarse_label``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import pickle
import tarfile
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from training.datasets import _base


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where one archive version keeps each split."""
  version: str        # "python" or "binary"
  tarball: str        # e.g. "cifar-10-python.tar.gz"
  folder: str         # top-level folder, inside the tarball or extracted
  files: dict[str, tuple[str, ...]]  # split -> member files, in order


_C10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_ARCHIVES: dict[str, tuple[_Layout, ...]] = {
    "cifar10": (
        _Layout("python", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                {"train": _C10_TRAIN, "test": ("test_batch",)}),
        _Layout("binary", "cifar-10-binary.tar.gz", "cifar-10-batches-bin",
                {"train": tuple(f + ".bin" for f in _C10_TRAIN),
                 "test": ("test_batch.bin",)}),
    ),
    "cifar100": (
        _Layout("python", "cifar-100-python.tar.gz", "cifar-100-python",
                {"train": ("train",), "test": ("test",)}),
        _Layout("binary", "cifar-100-binary.tar.gz", "cifar-100-binary",
                {"train": ("train.bin",), "test": ("test.bin",)}),
    ),
}
CIFAR_SPLITS = {"train": 50_000, "test": 10_000}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                   "frog", "horse", "ship", "truck")
_IMAGE_BYTES = 32 * 32 * 3


def expected_files(name: str) -> list[str]:
  """Archives/folders accepted for ``name``, in order of preference."""
  return [n for layout in CIFAR_ARCHIVES[name]
          for n in (layout.tarball, layout.folder + "/")]


def find_archive(name: str, archive_dirs: Sequence[str | os.PathLike]
                 ) -> tuple[_Layout, pathlib.Path] | None:
  """Finds the preferred official archive of ``name`` in ``archive_dirs``.

  Args:
    name: ``"cifar10"`` or ``"cifar100"``.
    archive_dirs: folders to search, first match wins. A folder may also be
      the extracted archive folder itself.

  Returns:
    ``(layout, path)`` where ``path`` is a tarball or an extracted folder, or
    None when nothing is found.
  """
  for layout in CIFAR_ARCHIVES[name]:
    for d in archive_dirs:
      d = pathlib.Path(d).expanduser()
      for path in (d / layout.tarball, d / layout.folder):
        if path.is_file() or path.is_dir():
          return layout, path
      if d.name == layout.folder and d.is_dir():
        return layout, d
  return None


def missing_archive_message(name: str,
                            archive_dirs: Sequence[str | os.PathLike]) -> str:
  dirs = ", ".join(str(pathlib.Path(d).expanduser()) for d in archive_dirs)
  return (f"No {name} archive found. Put one of {expected_files(name)} "
          f"(the official files from https://www.cs.toronto.edu/~kriz/"
          f"cifar.html, packed or extracted) into one of: [{dirs}].")


def _read_members(layout: _Layout, path: pathlib.Path,
                  split: str) -> list[tuple[str, bytes]]:
  """``(name, raw bytes)`` of the split's member files, in the layout's
  order; the name says where the bytes come from (for errors)."""
  wanted = layout.files[split]
  if path.is_dir():
    return [(str(path / f), (path / f).read_bytes()) for f in wanted]
  found = {}
  # One sequential pass: seeking backwards in a gzip stream restarts it.
  with tarfile.open(path, "r:*") as tar:
    for member in tar:
      base = pathlib.PurePosixPath(member.name)
      if (member.isfile() and base.name in wanted
          and base.parent.name == layout.folder):
        found[base.name] = tar.extractfile(member).read()
  missing = [f for f in wanted if f not in found]
  if missing:
    raise FileNotFoundError(
        f"{path} lacks {[layout.folder + '/' + f for f in missing]}; is it "
        f"the official {layout.version} archive?")
  return [(f"{path}:{layout.folder}/{f}", found[f]) for f in wanted]


def _get(d: dict, key: str):
  # The official pickles were written by Python 2: keys load as bytes.
  return d[key.encode()] if key.encode() in d else d[key]


def _integer_dtype(*args: Any) -> np.dtype:
  """``numpy.dtype`` for the unpickler: integer dtypes only (an object
  array would hold arbitrary Python objects)."""
  dtype = np.dtype(*args)
  if dtype.kind not in "ui":
    raise pickle.UnpicklingError(f"an array of dtype {dtype} (a CIFAR batch "
                                 "holds integer arrays only)")
  return dtype


def _latin1(text: str, encoding: str = "latin1") -> bytes:
  """``_codecs.encode`` as Python 3 pickles ``bytes`` at protocol 2."""
  # Compared as text: a codec lookup would import modules by name.
  if encoding.lower().replace("-", "").replace("_", "") not in ("latin1",
                                                                "iso88591"):
    raise pickle.UnpicklingError(f"an encoding other than latin1 "
                                 f"({encoding!r})")
  return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Callable[..., Any]]:
  """What numpy's pickles of integer arrays and scalars need, under the
  module names of numpy 1.x (``numpy.core``) and 2.x (``numpy._core``); the
  functions themselves come from numpy's own reductions of such objects."""
  reconstruct = np.zeros(1, np.uint8).__reduce__()[0]
  scalar = np.int64(0).__reduce__()[0]
  frombuffer = np.zeros(1, np.uint8).__reduce_ex__(5)[0]
  out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _integer_dtype,
         ("_codecs", "encode"): _latin1}
  for core in ("numpy.core", "numpy._core"):
    out[(f"{core}.multiarray", "_reconstruct")] = reconstruct
    out[(f"{core}.multiarray", "scalar")] = scalar
    out[(f"{core}.numeric", "_frombuffer")] = frombuffer
  return out


class _BatchUnpickler(pickle.Unpickler):
  """Unpickles a CIFAR batch and nothing else: only the callables of
  ``_numpy_globals`` can be named, so a payload cannot run code."""

  ALLOWED = _numpy_globals()

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self.ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"it refers to {module}.{name}, which a CIFAR batch never "
          "holds") from None


def load_batch(raw: bytes, where: str) -> dict:
  """A CIFAR python batch from its pickle bytes, without running any code.

  Args:
    raw: the pickle.
    where: the file it came from (named in errors).

  Returns:
    The batch dict (keys as bytes, as the official Python-2 pickles have).

  Raises:
    ValueError: not a CIFAR batch (the file and the reason named).
  """
  try:
    d = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
  except Exception as e:  # Unpickling fails in many ways; all mean "not a batch".
    raise ValueError(f"{where} is not an official CIFAR python batch "
                     f"({e or type(e).__name__}); nothing in it was "
                     "run") from None
  if not isinstance(d, dict):
    raise ValueError(f"{where} is not an official CIFAR python batch (it "
                     f"holds a {type(d).__name__}, not a dict)")
  return d


def read_cifar(name: str, split: str, layout: _Layout, path: pathlib.Path
               ) -> dict[str, np.ndarray]:
  """Reads one split of an official CIFAR archive into numpy arrays.

  Args:
    name: ``"cifar10"`` or ``"cifar100"``.
    split: ``"train"`` or ``"test"``.
    layout: the archive layout, from ``find_archive``.
    path: the tarball or extracted folder, from ``find_archive``.

  Returns:
    ``{"image": uint8 [n, 32, 32, 3], "label": int64 [n]}`` plus
    ``"coarse_label"`` for CIFAR-100; ``label`` is the fine label.
  """
  images, labels, coarse = [], [], []
  for where, raw in _read_members(layout, path, split):
    if layout.version == "python":
      d = load_batch(raw, where)
      try:
        data = np.asarray(_get(d, "data"), dtype=np.uint8).reshape(
            -1, _IMAGE_BYTES)
        if name == "cifar10":
          labels.append(np.asarray(_get(d, "labels"), np.int64))
        else:
          labels.append(np.asarray(_get(d, "fine_labels"), np.int64))
          coarse.append(np.asarray(_get(d, "coarse_labels"), np.int64))
      except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{where} is not an official CIFAR python batch "
                         f"({type(e).__name__}: {e})") from None
      if len(labels[-1]) != len(data):
        raise ValueError(f"{where} is not an official CIFAR python batch "
                         f"({len(data)} images but {len(labels[-1])} labels)")
    else:
      n_label = 1 if name == "cifar10" else 2
      rec = np.frombuffer(raw, np.uint8)
      if rec.size % (n_label + _IMAGE_BYTES):
        raise ValueError(f"{where}: {split} has a truncated record "
                         f"({rec.size} bytes).")
      rec = rec.reshape(-1, n_label + _IMAGE_BYTES)
      data = rec[:, n_label:]
      labels.append(rec[:, n_label - 1].astype(np.int64))
      if n_label == 2:
        coarse.append(rec[:, 0].astype(np.int64))
    # Colour planes -> HWC.
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  out = {"image": np.concatenate(images), "label": np.concatenate(labels)}
  if coarse:
    out["coarse_label"] = np.concatenate(coarse)
  return out


class _CifarBuilder(_base.LocalBuilder, skip_registration=True):
  """Shared CIFAR builder; subclasses set ``name`` and the label features."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  _DATASET = ""  # key of CIFAR_ARCHIVES

  def __init__(self, *, archive_dirs: Sequence[str | os.PathLike] = (),
               **kwargs):
    """Constructs the builder.

    Args:
      archive_dirs: folders searched for the official archive (only needed to
        prepare; reading a prepared dataset does not look at them).
      **kwargs: forwarded to ``tfds.core.GeneratorBasedBuilder``.
    """
    self._archive_dirs = tuple(archive_dirs)
    super().__init__(**kwargs)

  def _label_features(self) -> dict[str, tfds.features.FeatureConnector]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self._DATASET} read from the official archive.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
            "index": tfds.features.Scalar(dtype=np.int64),
            **self._label_features(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The archives are local; nothing is downloaded.
    found = find_archive(self._DATASET, self._archive_dirs)
    if found is None:
      raise FileNotFoundError(
          missing_archive_message(self._DATASET, self._archive_dirs))
    return {split: self._generate_examples(found, split)
            for split in CIFAR_SPLITS}

  def _generate_examples(self, found, split):
    arrays = read_cifar(self._DATASET, split, *found)
    for i in range(len(arrays["label"])):
      example = {k: v[i] if k == "image" else int(v[i])
                 for k, v in arrays.items()}
      example["index"] = i
      yield i, example


class Cifar10(_CifarBuilder):
  """CIFAR-10 from the official archive (python or binary version)."""

  name = "dsp_ddrop_cifar10"
  _DATASET = "cifar10"

  def _label_features(self):
    return {"label": tfds.features.ClassLabel(names=CIFAR10_CLASSES)}


class Cifar100(_CifarBuilder):
  """CIFAR-100 from the official archive; ``label`` is the fine label."""

  name = "dsp_ddrop_cifar100"
  _DATASET = "cifar100"

  def _label_features(self):
    return {"label": tfds.features.ClassLabel(num_classes=100),
            "coarse_label": tfds.features.ClassLabel(num_classes=20)}
