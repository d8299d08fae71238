"""Base class of the project's local (offline, TensorFlow-free) builders."""

from __future__ import annotations

import inspect
import sys

from etils import epath
import tensorflow_datasets as tfds


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A ``GeneratorBasedBuilder`` whose code path is its own source file.

  tfds derives ``code_path`` (where it looks for ``checksums.tsv``) through
  ``importlib_resources``, a package the project does not otherwise need;
  our builders download nothing, so the module file is all it needs.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pytype: disable=signature-mismatch
    return epath.Path(inspect.getfile(sys.modules[cls.__module__]))
