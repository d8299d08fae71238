"""Encoded-image datasets: a class-per-folder JPEG tree, and tfds's imagenet2012.

``imagefolder:PATH`` reads the layout users have::

  PATH/train/<class>/*.JPEG
  PATH/val/<class>/*.JPEG        (``validation`` also accepted)

and prepares it once into ``array_record`` (builder ``dsp_ddrop_imagefolder``,
one builder config per resolved ``PATH``, under ``data_dir``). Images are
stored as their original encoded bytes (tfds ``Image`` feature, JPEG), never
decoded and re-encoded; the class index is the sorted list of class-folder
names, saved with the data (the label feature's names). Splits: ``train`` and
``validation`` (from ``val/``). Every file is decoded once while preparing:
an undecodable file is skipped and counted (``strict=True``: an error naming
it instead), so reading never meets a corrupt record.

``imagenet2012``: tfds's stock dataset already prepared in ``array_record``
under ``data_dir`` (``data_dir/imagenet2012/<version>/``), read as it is
through ``tfds.builder_from_directory`` (no TensorFlow, no tfds builder
code): variable-size JPEG bytes, labels 0..999, splits ``train`` and
``validation``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
import re
import sys
from typing import Iterator, Sequence

import tensorflow_datasets as tfds
from PIL import Image

from training.datasets import _base

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Folder names of the split folders, first match wins.
SPLIT_FOLDERS = {"train": ("train",), "validation": ("val", "validation")}
IMAGEFOLDER_PREFIX = "imagefolder:"
IMAGENET2012 = "imagenet2012"
# ImageNet statistics on the 0..1 scale (torchvision's), used for every
# encoded-image dataset (natural photographs).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _DropCustomConfigNotice(logging.Filter):
  """tfds warns about every builder config not declared in advance; ours
  are one per tree by design."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_DropCustomConfigNotice())


class LayoutError(FileNotFoundError):
  """The image-folder tree does not have the expected layout."""


class CorruptImageError(ValueError):
  """An image file does not decode (``strict`` preparation)."""


def _is_image(path: pathlib.Path) -> bool:
  return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def split_dir(root: pathlib.Path, split: str) -> pathlib.Path | None:
  """The folder of ``split`` under ``root``, or None."""
  for name in SPLIT_FOLDERS[split]:
    if (root / name).is_dir():
      return root / name
  return None


def scan(root: str | os.PathLike) -> tuple[list[str],
                                           dict[str, list[tuple[str, int]]]]:
  """Checks the layout and lists ``(relative path, class index)`` per split.

  Args:
    root: the tree's root (``PATH``).

  Returns:
    ``(class_names, {split: [(path relative to root, label), ...]})``;
    class names sorted, files sorted within each class.

  Raises:
    LayoutError: ``PATH``, ``train/`` or ``val/`` missing, no class folders,
      an empty class folder, or different class sets in train and val; the
      message names the paths.
  """
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise LayoutError(f"image folder {root} does not exist (expected "
                      f"{root}/train/<class>/*.JPEG and "
                      f"{root}/val/<class>/*.JPEG).")
  dirs = {s: split_dir(root, s) for s in SPLIT_FOLDERS}
  missing = [str(root / SPLIT_FOLDERS[s][0]) for s, d in dirs.items()
             if d is None]
  if missing:
    raise LayoutError(f"image folder {root} lacks {', '.join(missing)} "
                      f"(expected {root}/train/<class>/*.JPEG and "
                      f"{root}/val/<class>/*.JPEG).")
  classes = {}
  for split, d in dirs.items():
    names = sorted(p.name for p in d.iterdir() if p.is_dir())
    if not names:
      raise LayoutError(f"{d} has no class folders (expected "
                        f"{d}/<class>/*.JPEG).")
    classes[split] = names
  if classes["train"] != classes["validation"]:
    train, val = set(classes["train"]), set(classes["validation"])
    raise LayoutError(
        f"class folders differ between {dirs['train']} and "
        f"{dirs['validation']}: only in train: {sorted(train - val)[:10]}, "
        f"only in val: {sorted(val - train)[:10]}.")
  names = classes["train"]
  files = {}
  for split, d in dirs.items():
    files[split] = []
    empty = []
    for label, name in enumerate(names):
      found = sorted(p for p in (d / name).iterdir() if _is_image(p))
      if not found:
        empty.append(str(d / name))
      files[split].extend((str(p.relative_to(root)), label) for p in found)
    if empty:
      raise LayoutError(f"empty class folder(s) (no {'/'.join(IMAGE_EXTENSIONS)}"
                        f" files): {', '.join(empty[:10])}"
                        + (f" and {len(empty) - 10} more" if len(empty) > 10
                           else ""))
  return names, files


def check_image(data: bytes) -> None:
  """Raises (OSError/ValueError) when ``data`` does not decode fully."""
  with Image.open(io.BytesIO(data)) as img:
    # DCT-domain downscaling: the whole entropy-coded stream is still read,
    # at a fraction of a full decode's cost.
    img.draft("RGB", (64, 64))
    img.load()


def config_name(root: str | os.PathLike) -> str:
  """The builder-config name of a tree: its folder name + a path hash."""
  path = str(pathlib.Path(root).expanduser().resolve())
  slug = re.sub(r"[^a-z0-9]+", "_", pathlib.Path(path).name.lower()).strip("_")
  return f"{slug or 'root'}_{hashlib.sha1(path.encode()).hexdigest()[:10]}"


class ImageFolder(_base.LocalBuilder):
  """A class-per-folder JPEG tree as an encoded-image dataset."""

  name = "dsp_ddrop_imagefolder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, root: str | os.PathLike, strict: bool = False,
               **kwargs):
    """Constructs the builder.

    Args:
      root: the tree's root (``PATH``; only read while preparing).
      strict: an undecodable file fails preparation instead of being skipped.
      **kwargs: forwarded to ``tfds.core.GeneratorBasedBuilder``.
    """
    self._root = pathlib.Path(root).expanduser().resolve()
    self._strict = strict
    self._scan = None
    self.skipped: dict[str, list[str]] = {}
    kwargs.pop("config", None)  # Always derived from root (unpickling).
    config = tfds.core.BuilderConfig(
        name=config_name(root), description=f"image folder {self._root}")
    super().__init__(config=config, **kwargs)
    # tfds rebuilds an unpickled builder (in grain workers) from this.
    self._original_state = dict(self._original_state, root=str(self._root),
                                strict=strict)

  def _classes(self):
    if self._scan is None:
      self._scan = scan(self._root)
    return self._scan

  def _info(self) -> tfds.core.DatasetInfo:
    if self._scan is None and not (self.data_path / "dataset_info.json"
                                   ).exists():
      self._classes()
    # Once prepared, the class names are restored from the saved info.
    names = self._scan[0] if self._scan else None
    label = (tfds.features.ClassLabel(names=names) if names
             else tfds.features.ClassLabel())
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Encoded images of {self._root} (class = sorted folder "
        "name index).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "label": label,
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files; nothing is downloaded.
    _, files = self._classes()
    return {split: self._generate_examples(split, entries)
            for split, entries in files.items()}

  def _generate_examples(self, split: str, entries: Sequence[tuple[str, int]]
                         ) -> Iterator[tuple[str, dict]]:
    skipped = self.skipped.setdefault(split, [])
    for rel, label in entries:
      data = (self._root / rel).read_bytes()
      try:
        check_image(data)
      except (OSError, ValueError, SyntaxError) as e:
        if self._strict:
          raise CorruptImageError(
              f"{self._root / rel} does not decode ({e}); remove or replace "
              "it, or prepare without strict to skip such files.") from None
        skipped.append(rel)
        logging.warning("skipping undecodable image %s: %s",
                        self._root / rel, e)
        continue
      yield rel, {"image": data, "label": label, "file_name": rel}
    if skipped:
      # On stderr: the one report a user sees of files left out (stdout is
      # quietened while tfds prepares).
      print(f"{split}: skipped {len(skipped)} undecodable image(s) under "
            f"{self._root} (first: {skipped[:3]})", file=sys.stderr)


def imagenet2012_dir(data_dir: str | os.PathLike) -> pathlib.Path | None:
  """The newest prepared ``imagenet2012`` version folder, or None."""
  base = pathlib.Path(data_dir).expanduser() / IMAGENET2012
  if not base.is_dir():
    return None
  versions = []
  for d in base.iterdir():
    if (d / "dataset_info.json").exists():
      try:
        versions.append((tfds.core.Version(d.name), d))
      except ValueError:
        continue
  return max(versions)[1] if versions else None


def imagenet_dataset(data_dir: str | os.PathLike) -> str:
  """The dataset name for ``--dataset imagenet --data-dir data_dir``.

  Args:
    data_dir: the directory given.

  Returns:
    ``"imagenet2012"`` when tfds's imagenet2012 is prepared under it, else
    ``"imagefolder:<data_dir>"`` when it holds a ``train/`` folder.

  Raises:
    LayoutError: neither layout is there (the message names both).
  """
  path = pathlib.Path(data_dir).expanduser()
  if imagenet2012_dir(path) is not None:
    return IMAGENET2012
  if split_dir(path, "train") is not None:
    return IMAGEFOLDER_PREFIX + str(path)
  raise LayoutError(
      f"no ImageNet data at {path}: expected tfds's imagenet2012 prepared in "
      f"array_record ({path}/imagenet2012/<version>/dataset_info.json) or an "
      f"image-folder tree ({path}/train/<class>/*.JPEG and "
      f"{path}/val/<class>/*.JPEG).")
