"""Handwritten digits (scikit-learn's bundled copy) as a 32x32x3 tfds dataset.

The source is ``sklearn.datasets.load_digits``: 1,797 real 8x8 images with
16+1 grey levels (0..16) and 10 classes. It ships inside scikit-learn, so the
dataset prepares offline in about a second and is the project's default real
dataset for quick runs and tests.

Conversion rule (exact, integer arithmetic):

* grey level ``v`` in 0..16 becomes ``(255 * v + 8) // 16`` in 0..255
  (round half up of ``v * 255 / 16``; 0 -> 0, 8 -> 128, 16 -> 255);
* each pixel is repeated into a 4x4 block (nearest-neighbour, 8x8 -> 32x32);
* the grey channel is replicated to 3 channels.

Fixed split (stratified by class, deterministic): ``test`` takes 360 images by
``sklearn.model_selection.train_test_split(test_size=360, stratify=labels,
random_state=0)`` over the indices 0..1796 of ``load_digits``; ``validation``
takes 180 of the rest by the same call with ``test_size=180`` and the
remaining labels; ``train`` is the other 1,257. Every record keeps its
``load_digits`` index in the ``index`` feature.

Normalisation statistics (``DIGITS_MEAN``/``DIGITS_STD``) are the mean and
population standard deviation of all train-split pixels on the 0..1 scale;
the three channels are identical. Nearest-neighbour upsampling does not change
them, so they equal the statistics of the 8x8 images.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from training.datasets import _base

DIGITS_SPLITS = {"train": 1257, "validation": 180, "test": 360}
DIGITS_MEAN = (0.3049319887063815,) * 3
DIGITS_STD = (0.37567257751720484,) * 3
IMAGE_SIZE = 32
_UPSAMPLE = 4  # 8x8 -> 32x32
_SPLIT_SEED = 0


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Builds the converted digits images and the fixed split in memory.

  Returns:
    ``{split: (images uint8 [n, 32, 32, 3], labels int64 [n], index int64
    [n])}`` for the splits ``train``, ``validation`` and ``test``, each in
    increasing ``load_digits`` index order.
  """
  # Imported here: scikit-learn is only needed to prepare this dataset.
  # pylint: disable=g-import-not-at-top
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection
  # pylint: enable=g-import-not-at-top

  digits = sk_datasets.load_digits()
  grey = digits.images.astype(np.int64)  # [n, 8, 8], levels 0..16
  labels = digits.target.astype(np.int64)
  grey = (255 * grey + 8) // 16
  big = np.repeat(np.repeat(grey, _UPSAMPLE, axis=1), _UPSAMPLE, axis=2)
  images = np.repeat(big[..., None], 3, axis=-1).astype(np.uint8)

  all_index = np.arange(len(labels))
  rest, test = model_selection.train_test_split(
      all_index, test_size=DIGITS_SPLITS["test"], stratify=labels,
      random_state=_SPLIT_SEED)
  train, validation = model_selection.train_test_split(
      rest, test_size=DIGITS_SPLITS["validation"], stratify=labels[rest],
      random_state=_SPLIT_SEED)
  out = {}
  for split, index in (("train", train), ("validation", validation),
                       ("test", test)):
    index = np.sort(index)
    out[split] = (images[index], labels[index], index)
  return out


class Digits(_base.LocalBuilder):
  """scikit-learn digits upsampled to 32x32x3 uint8 (see module docstring)."""

  name = "dsp_ddrop_digits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "scikit-learn's handwritten digits, 8x8 levels 0..16 mapped to "
            "(255*v+8)//16, nearest x4 to 32x32, grey replicated to RGB."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    arrays = digits_arrays()
    return {split: self._generate_examples(*arrays[split])
            for split in DIGITS_SPLITS}

  def _generate_examples(self, images, labels, index):
    for image, label, i in zip(images, labels, index):
      yield int(i), {"image": image, "label": int(label), "index": int(i)}
