"""Whether an export directory is up to date with the variables it came from.

A pipeline's ``pack`` stage writes ``export/source.json`` after a successful
export: a fingerprint of the exported variables and settings, the report
entry, and the size and SHA-256 of every exported file. Re-running the
finished run skips the export only when the fingerprint matches and every
file is still there with its recorded size and hash (a truncated, replaced
or half-copied file is exported again).

The paths in ``source.json`` are relative to the export directory's parent,
the run's workdir (``export/slim.pt``), so a copied workdir stays valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np

from training import errors
from training import finite
from training import integrity
from training import report as report_lib
from training import workdir as workdir_lib

FILE = workdir_lib.EXPORT_STAMP
# source.json's record of the exported files: {path: [size, sha256]}.
_CHECKS = "file_checks"


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


def _root(out_dir: str | os.PathLike) -> pathlib.Path:
  """The directory ``source.json``'s paths are relative to."""
  return pathlib.Path(out_dir).resolve().parent


def is_current(out_dir: str | os.PathLike, digest: str) -> bool:
  """True when ``out_dir`` holds a complete, unaltered export of ``digest``.

  Args:
    out_dir: the export directory.
    digest: ``fingerprint`` of the variables and settings to export.

  Returns:
    Whether the fingerprint matches and every recorded file has its
    recorded size and SHA-256.
  """
  path = pathlib.Path(out_dir) / FILE
  try:
    content = json.loads(path.read_text())
    checks = content[_CHECKS]
  except (OSError, ValueError, KeyError, TypeError):
    return False
  if content.get("fingerprint") != digest or not checks:
    return False
  try:
    return integrity.check(_root(out_dir), checks) is None
  except (OSError, ValueError, TypeError):
    return False


def mark(out_dir: str | os.PathLike, digest: str,
         report_entry: Mapping[str, Any]) -> dict[str, Any]:
  """Records a finished export (its report entry is reused when skipped).

  Args:
    out_dir: the export directory.
    digest: the fingerprint of what was exported.
    report_entry: the export's report entry (``files``: name -> path).

  Returns:
    The entry as recorded (paths relative to the workdir).
  """
  root = _root(out_dir)
  entry = report_lib.relative_paths(dict(report_entry), root)
  checks = {}
  for p in entry.get("files", {}).values():
    rel = pathlib.PurePosixPath(p).as_posix()
    checks[rel] = [(root / rel).stat().st_size,
                   integrity.file_digest(root / rel)]
  content = {"fingerprint": digest, **entry, _CHECKS: checks}
  integrity.atomic_write(pathlib.Path(out_dir) / FILE,
                         json.dumps(content, indent=1, default=str) + "\n")
  return entry


def read(out_dir: str | os.PathLike) -> dict[str, Any]:
  """The report entry recorded by ``mark``."""
  content = json.loads((pathlib.Path(out_dir) / FILE).read_text())
  content.pop("fingerprint", None)
  content.pop(_CHECKS, None)
  return content


def export_once(out_dir: str | os.PathLike, variables: Mapping[str, Any],
                info: Any, export_fn: Any, *, force: bool = False,
                **settings: Any) -> tuple[dict[str, Any], bool]:
  """Runs an export unless ``out_dir`` already holds it; adds preprocess.json.

  The variables must be finite (a model with NaN/Inf is never exported).
  ``source.json`` is written last, so an export cut short (an error, a full
  disk, an interrupt: SIGINT ends the process at once with ``interrupted``,
  status 130; every file is written atomically) is redone by the next run.

  Args:
    out_dir: the export directory.
    variables: the variables to export.
    info: the input's ``DatasetInfo`` (for ``preprocess.json``).
    export_fn: ``() -> report entry`` (``{'files': {name: path}, ...}``).
    force: export even when the directory is up to date.
    **settings: further inputs of the export, part of the fingerprint.

  Returns:
    ``(entry, skipped)``: the report entry (``files`` includes
    ``preprocess.json``; ``preprocess`` is its summary; paths relative to the
    workdir) and whether the export was skipped.

  Raises:
    ValueError: the variables hold NaN or Inf.
  """
  from convert import preprocess  # pylint: disable=g-import-not-at-top
  bad = finite.first_non_finite(jax.device_get(dict(variables)))
  if bad is not None:
    raise ValueError(f"the variables to export are not finite (first: {bad});"
                     f" nothing was written to {out_dir}")
  digest = fingerprint(variables, **settings)
  if not force and is_current(out_dir, digest):
    return read(out_dir), True
  with errors.exit_on_interrupt():
    (pathlib.Path(out_dir) / FILE).unlink(missing_ok=True)
    entry = dict(export_fn())
    pre = preprocess.finish(out_dir, info, entry.get("files", {}))
    entry["files"] = {**entry.get("files", {}), preprocess.FILE: pre["file"]}
    entry["preprocess"] = pre
    entry = mark(out_dir, digest, entry)
  return entry, False
