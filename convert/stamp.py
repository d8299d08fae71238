"""Whether an export directory is up to date with the variables it came from.

A pipeline's ``pack`` stage writes ``export/source.json`` (a fingerprint of
the exported variables and settings) after a successful export; re-running
the finished run compares fingerprints and skips the export when nothing
changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np

FILE = "source.json"


def fingerprint(variables: Mapping[str, Any], **settings: Any) -> str:
  """A sha256 of every array of ``variables`` (with its path) and settings.

  Args:
    variables: the exported variables.
    **settings: further inputs of the export (image size, format, ...).

  Returns:
    The hex digest.
  """
  h = hashlib.sha256(json.dumps(settings, sort_keys=True,
                                default=str).encode())
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(dict(variables)))
  for path, leaf in leaves[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def is_current(out_dir: str | os.PathLike, digest: str) -> bool:
  """True when ``out_dir`` holds a complete export of ``digest``."""
  path = pathlib.Path(out_dir) / FILE
  try:
    content = json.loads(path.read_text())
  except (OSError, ValueError):
    return False
  files = content.get("files", {})
  return content.get("fingerprint") == digest and bool(files) and all(
      pathlib.Path(p).is_file() for p in files.values())


def mark(out_dir: str | os.PathLike, digest: str,
         report_entry: Mapping[str, Any]) -> None:
  """Records a finished export (its report entry is reused when skipped)."""
  path = pathlib.Path(out_dir) / FILE
  path.write_text(json.dumps({"fingerprint": digest, **report_entry},
                             indent=1, default=str) + "\n")


def read(out_dir: str | os.PathLike) -> dict[str, Any]:
  """The report entry recorded by ``mark``."""
  content = json.loads((pathlib.Path(out_dir) / FILE).read_text())
  content.pop("fingerprint", None)
  return content


def export_once(out_dir: str | os.PathLike, variables: Mapping[str, Any],
                info: Any, export_fn: Any, *, force: bool = False,
                **settings: Any) -> tuple[dict[str, Any], bool]:
  """Runs an export unless ``out_dir`` already holds it; adds preprocess.json.

  Args:
    out_dir: the export directory.
    variables: the variables to export.
    info: the input's ``DatasetInfo`` (for ``preprocess.json``).
    export_fn: ``() -> report entry`` (``{'files': {name: path}, ...}``).
    force: export even when the directory is up to date.
    **settings: further inputs of the export, part of the fingerprint.

  Returns:
    ``(entry, skipped)``: the report entry (``files`` includes
    ``preprocess.json``; ``preprocess`` is its summary) and whether the
    export was skipped.
  """
  from convert import preprocess  # pylint: disable=g-import-not-at-top
  digest = fingerprint(variables, **settings)
  if not force and is_current(out_dir, digest):
    return read(out_dir), True
  entry = dict(export_fn())
  pre = preprocess.finish(out_dir, info, entry.get("files", {}))
  entry["files"] = {**entry.get("files", {}), preprocess.FILE: pre["file"]}
  entry["preprocess"] = pre
  mark(out_dir, digest, entry)
  return entry, False
