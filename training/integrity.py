"""Files that are complete or absent: atomic writes and SHA-256 manifests.

Everything a run records for later (checkpoint manifests, ``report.json``,
``meta.json``, export files and their ``source.json``) is written through
``atomic_write``: into a temporary file of the same directory, then renamed,
so a kill, a full disk or an interrupt leaves the old file or nothing, never
half a file. A manifest (``{relative path: [size, sha256]}``) records a
directory once it is complete; ``check`` tells a damaged or incomplete copy
from an intact one, down to a flipped bit.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from typing import Iterable, Mapping

# Bytes read at a time while hashing.
_CHUNK = 1 << 20


def atomic_write(path: str | os.PathLike, data: bytes | str) -> pathlib.Path:
  """Writes ``data`` to ``path`` through a temporary file and a rename.

  Python's own file I/O does the writing, so a full disk is an ``OSError``
  (ENOSPC) here, not an abort in a native serializer.

  Args:
    path: the final path (its directory is created).
    data: the content (``str`` is written as UTF-8).

  Returns:
    The final path.

  Raises:
    OSError: the write or the rename failed; ``path`` is unchanged and the
      temporary file removed.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(data, str):
    data = data.encode()
  # Same directory (a rename within one filesystem); the suffix is kept for
  # readers that look at it.
  fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix,
                             dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    # mkstemp creates 0600; a written file gets the usual umask mode.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except OSError as e:
    if e.filename is None:  # A failed write names no file: name ours.
      raise OSError(e.errno, e.strerror, str(path)) from None
    raise
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _umask() -> int:
  """The process umask, read without changing it (``os.umask`` sets it, and
  a thread creating a file meanwhile would get the temporary value)."""
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  return 0o022


def file_digest(path: str | os.PathLike) -> str:
  """The hex SHA-256 of a file's content."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def manifest(directory: str | os.PathLike, exclude: Iterable[str] = ()
             ) -> dict[str, list]:
  """``{relative path: [size, sha256]}`` of every file under ``directory``.

  Args:
    directory: the directory.
    exclude: relative paths left out (e.g. the manifest file itself).

  Returns:
    The manifest, sorted by path.
  """
  directory = pathlib.Path(directory)
  skip = set(exclude)
  out = {}
  for p in sorted(directory.rglob("*")):
    rel = p.relative_to(directory).as_posix()
    if p.is_file() and rel not in skip:
      out[rel] = [p.stat().st_size, file_digest(p)]
  return out


def check(directory: str | os.PathLike, recorded: Mapping[str, list]
          ) -> str | None:
  """What differs between ``directory`` and its recorded manifest.

  Files the manifest does not name are ignored (only recorded content is
  vouched for).

  Args:
    directory: the directory.
    recorded: its manifest (``manifest``'s format).

  Returns:
    None when every recorded file is present with its size and hash; else a
    short description of the first difference.
  """
  directory = pathlib.Path(directory)
  for rel, (size, digest) in recorded.items():
    p = directory / rel
    if not p.is_file():
      return f"{rel} is missing"
    actual = p.stat().st_size
    if actual != size:
      return f"{rel} has {actual} bytes, {size} were written"
    if file_digest(p) != digest:
      return f"{rel} does not match its SHA-256 (changed after it was written)"
  return None
