"""What a pruned network physically keeps: channels, kernels, branches.

A channel of a coupled space is *needed* when some layer reads it with a
kept kernel whose output is used and the value it reads is not exactly zero,
or when something reads it in full (the logits, a LayerNorm's statistics, an
operation the graph does not follow). Every other channel is removed from
the whole space: its producers' filters, the norms, depthwise convs and
per-channel variables along it, and its readers' input columns. What
remains is exact: the removed channels are zero (or unread) wherever they
are read. The exports (``convert.description``) and the whole-model FLOPs
with dead structure removed (``models.flops``) both count this.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from models import paths
from models.graph.core import Graph, LayerInfo
from models.graph.liveness import Evaluation, evaluate

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Branch:
  """Filters of one layer that keep the same inputs (a DSP group).

  Attributes:
    inputs: kept input features, ascending (into the layer's input).
    filters: output channels, ascending.
  """

  inputs: np.ndarray
  filters: np.ndarray


@dataclasses.dataclass(frozen=True)
class LayerCut:
  """What one conv/dense layer keeps.

  Attributes:
    path: module path.
    kind: ``conv`` or ``dense``.
    inputs: kept input features, ascending (all of them where the input is
      not channel-aligned).
    outputs: kept output channels, ascending (the channels its space keeps;
      a depthwise conv: its input's).
    filters: output channels with a kept kernel (a subset of ``outputs``; a
      residual member's zero filters inside a kept channel are not filters).
    branches: the filters grouped by identical kept inputs, in order of
      first appearance when scanned in filter order.
    macs: multiply-accumulates of the kept kernels, one image.
    macs_dense: of the unpruned layer.
    kernels: boolean (in_features / groups, out_features), the kept kernels.
  """

  path: Path
  kind: str
  inputs: np.ndarray
  outputs: np.ndarray
  filters: np.ndarray
  branches: tuple[Branch, ...]
  macs: int
  macs_dense: int
  kernels: np.ndarray

  @property
  def name(self) -> str:
    return paths.name(self.path)


@dataclasses.dataclass(frozen=True, eq=False)
class Cut:
  """Channels kept per space, and per conv/dense layer its ``LayerCut``."""

  kept: Mapping[int, np.ndarray]
  layers: Mapping[Path, LayerCut]


def cut(graph: Graph, params: Mapping[str, Any],
        masks: Mapping[str, Any] | None = None) -> Cut:
  """What the physically smaller network keeps (module docstring).

  Args:
    graph: from ``models.analyze``.
    params: the ``params`` collection (numpy arrays).
    masks: the ``masks`` collection.

  Returns:
    The ``Cut``.
  """
  ev = evaluate(graph, params, masks)
  kept = {i: np.zeros(graph[next(iter(s))].out_features, bool)
          for i, s in enumerate(graph.spaces)}

  def need(spaces, chans, flags):
    for s, c, f in zip(spaces, chans, flags):
      if f and s >= 0:
        kept[int(s)][int(c)] = True

  # Read by a kept kernel of a used output, with a value that is not zero.
  for l in graph.weighted:
    if not l.aligned:
      continue
    x = ev.input_values(graph, l.path)
    used = ev.used_in.get(l.path)
    if used is None:
      continue
    spaces, chans = space_channels(graph, l)
    need(spaces, chans, used & ~(x == 0))
  # Read in full: the logits, statistics over channels, what the graph does
  # not model.
  for node in graph.program.nodes:
    if node.kind in ("sink", "stat", "opaque") and node.gid is not None:
      spaces, chans = graph.gid_space(node.gid)
      need(spaces, chans, np.ones(len(chans), bool))
  # Channels of a grouped conv (other than depthwise) stay: its groups must
  # keep equal widths.
  for l in graph.producers:
    if l.feature_groups > 1:
      kept[graph.space_index(l.path)][:] = True
  layers = {}
  for l in graph.weighted:
    layers[l.path] = _cut(graph, l, ev, kept)
  return Cut(kept, layers)


def space_channels(graph: Graph, layer: LayerInfo) -> tuple[np.ndarray, np.ndarray]:
  """(space index, channel) of each input feature of an aligned layer."""
  n = layer.in_features
  spaces = (np.asarray(layer.in_spaces) if layer.in_spaces is not None else
            np.full((n,), graph.space_index(layer.inputs[0])
                    if layer.inputs else -1))
  return spaces, layer.channel_map()


def kept_of(graph: Graph, kept: Mapping[int, np.ndarray], gid: np.ndarray
            ) -> np.ndarray:
  """Whether each global channel id of the walk is kept (the image's
  channels always are)."""
  spaces, chans = graph.gid_space(np.asarray(gid))
  return np.array([s < 0 or kept[int(s)][int(c)]
                   for s, c in zip(spaces, chans)], bool)


def _cut(graph: Graph, l: LayerInfo, ev: Evaluation, kept: Mapping[int, np.ndarray]
         ) -> LayerCut:
  live = ev.live[l.path]                                # (I / g, O)
  if l.aligned:
    spaces, chans = space_channels(graph, l)
    inputs = np.array([s < 0 or kept[int(s)][int(c)]
                       for s, c in zip(spaces, chans)], bool)
  else:
    inputs = np.ones((l.in_features,), bool)
  if l.depthwise:
    outputs = inputs.copy()
  elif l.feature_groups > 1 or l.path in graph.outputs:
    outputs = np.ones((l.out_features,), bool)
  else:
    outputs = kept[graph.space_index(l.path)].copy()
  per = l.macs // max(1, live.size)                     # MACs per kernel
  if l.feature_groups == 1:
    conn = live & inputs[:, None] & outputs[None, :]
    filters = np.flatnonzero(conn.any(axis=0))
    groups: dict[bytes, list[int]] = {}
    for o in filters:
      groups.setdefault(conn[:, o].tobytes(), []).append(int(o))
    branches = tuple(Branch(np.flatnonzero(conn[:, rows[0]]),
                            np.asarray(rows)) for rows in groups.values())
    macs = int(conn.sum()) * per
  else:  # grouped / depthwise: kernel (I / g, O), inputs per group
    conn = live & outputs[None, :]
    filters = np.flatnonzero(conn.any(axis=0))
    branches = (Branch(np.flatnonzero(inputs), filters),)
    macs = int(conn.sum()) * per
  return LayerCut(l.path, l.kind, np.flatnonzero(inputs),
                  np.flatnonzero(outputs), filters, branches, macs, l.macs,
                  conn)
