"""TensorFlow-free tfds builders for the project's datasets.

Every builder writes ``array_record`` files, needs no network and no
TensorFlow, and stores images as raw ``uint8`` tensors (no image codec) or,
for the image folders, as the files' own JPEG bytes, so prepared data reads
back through ``builder.as_data_source()``.

* ``dsp_ddrop_digits``: scikit-learn's bundled handwritten digits at 32x32x3.
* ``dsp_ddrop_cifar10`` / ``dsp_ddrop_cifar100``: CIFAR from the official
  archives already on disk.
* ``dsp_ddrop_fashion_mnist``: Fashion-MNIST at 28x28x1 from its four
  official IDX files already on disk.
* ``dsp_ddrop_imagefolder``: a class-per-folder JPEG tree (tfds's stock
  ``imagenet2012``, prepared elsewhere, is read the same way).

The ``dsp_ddrop_`` prefix keeps the names apart from tfds's stock ``cifar10``
and ``cifar100``.
"""

from training.datasets.cifar import (CIFAR_ARCHIVES, CIFAR_SPLITS, Cifar10,
                                     Cifar100, find_archive,
                                     missing_archive_message, read_cifar)
from training.datasets.digits import (DIGITS_MEAN, DIGITS_SPLITS, DIGITS_STD,
                                      Digits, digits_arrays)
from training.datasets.fashion_mnist import (FASHION_MNIST_DIR,
                                             FASHION_MNIST_MEAN,
                                             FASHION_MNIST_SPLITS,
                                             FASHION_MNIST_STD, FashionMnist)
from training.datasets.imagefolder import (IMAGEFOLDER_PREFIX, IMAGENET2012,
                                           IMAGENET_MEAN, IMAGENET_STD,
                                           CorruptImageError, ImageFolder,
                                           LayoutError, imagenet2012_dir,
                                           imagenet_dataset)

__all__ = ["CIFAR_ARCHIVES", "CIFAR_SPLITS", "Cifar10", "Cifar100",
           "DIGITS_MEAN", "DIGITS_SPLITS", "DIGITS_STD", "Digits",
           "digits_arrays", "FASHION_MNIST_DIR", "FASHION_MNIST_MEAN",
           "FASHION_MNIST_SPLITS", "FASHION_MNIST_STD", "FashionMnist",
           "find_archive", "missing_archive_message",
           "read_cifar", "IMAGEFOLDER_PREFIX", "IMAGENET2012", "IMAGENET_MEAN",
           "IMAGENET_STD", "CorruptImageError", "ImageFolder", "LayoutError",
           "imagenet2012_dir", "imagenet_dataset"]
