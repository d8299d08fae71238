"""Access to nested variable trees by module path: the one set of tree helpers.

Variable trees are Flax's nested dicts (``{'params': {'stage_1': {'0': ...}}}``).
A *path* is a tuple of keys (``('stage_1', '0', 'conv_a')``); joined with '.'
it is the PyTorch module name. Every package reads and writes trees through
these functions, built on ``flax.traverse_util``.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from flax import traverse_util

Path = tuple[str, ...]


def name(path: Path) -> str:
  """The '.'-joined path (the PyTorch module name)."""
  return ".".join(path)


def get(tree: Mapping[str, Any] | None, path: Path, default: Any = None
        ) -> Any:
  """``tree[path[0]][path[1]]...``, or ``default`` when any key is absent."""
  node = tree
  for k in path:
    if not isinstance(node, Mapping) or k not in node:
      return default
    node = node[k]
  return node


def require(tree: Mapping[str, Any], path: Path, what: str = "tree") -> Any:
  """``get`` that raises a KeyError naming the missing key and where."""
  node = tree
  for i, k in enumerate(path):
    if not isinstance(node, Mapping) or k not in node:
      raise KeyError(f"{what} has no {name(path)!r}: no entry {k!r} at "
                     f"{name(path[:i]) or '<root>'}")
    node = node[k]
  return node


def replace(tree: Mapping[str, Any], path: Path, value: Any) -> dict[str, Any]:
  """A copy of ``tree`` with the entry at ``path`` set (parents created).

  Only the dicts along ``path`` are copied; the rest is shared.
  """
  if not path:
    return value
  new = dict(tree)
  new[path[0]] = replace(tree.get(path[0], {}), path[1:], value)
  return new


def assign(tree: dict[str, Any], path: Path, value: Any) -> None:
  """Sets the entry at ``path`` of a nested dict in place, creating parents."""
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def leaves(tree: Mapping[str, Any], prefix: Path = ()
           ) -> Iterator[tuple[Path, Any]]:
  """``(path, leaf)`` of a nested dict, depth first in dict order."""
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def flatten(tree: Mapping[str, Any]) -> dict[Path, Any]:
  """``{path: leaf}`` of a nested dict."""
  return {tuple(k): v for k, v in traverse_util.flatten_dict(
      dict(tree)).items()} if tree else {}


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
  """Inverse of ``flatten``."""
  return traverse_util.unflatten_dict(dict(flat)) if flat else {}


def modules(tree: Mapping[str, Any]) -> dict[Path, dict[str, Any]]:
  """``{module path: {leaf name: leaf}}`` of a collection such as ``params``."""
  out: dict[Path, dict[str, Any]] = {}
  for path, leaf in leaves(tree):
    out.setdefault(path[:-1], {})[path[-1]] = leaf
  return out
