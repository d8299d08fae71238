"""One description of a pruned network: what every layer keeps.

``describe(model, variables, input_shape)`` reads the model's traced graph
(``models.analyze``) and its masked variables and says, per conv/dense layer,
which input features and output channels the physically smaller network
keeps, and how the filters group into branches (DSP: filters with the same
kept inputs). Every exporter reads it: the compact JAX function
(``convert.program``), the PyTorch and ONNX files, the packed, slim,
branched and fast lowerings, and the structural check that every written
file has exactly these widths (``check_widths``).

What is kept is ``models.graph.cut``'s (the whole-model FLOPs with dead
structure removed count the same); the description adds the norms and
per-channel variables along the kept channels. Numpy and JAX only; no
torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

import models
from models import graph as graph_lib
from training import artifacts

Path = tuple[str, ...]
Branch, LayerCut = graph_lib.Branch, graph_lib.LayerCut


@dataclasses.dataclass(frozen=True, eq=False)
class Description:
  """A pruned network's description.

  Attributes:
    graph: the model's traced graph.
    input_shape: (H, W, C).
    kept: per space index, boolean (width,) of the channels kept.
    layers: per conv/dense module path, its ``LayerCut``.
    norms: per norm module path, the kept channels (ascending).
    affine: per per-channel variable path, the kept channels (ascending).
  """

  graph: graph_lib.Graph
  input_shape: tuple[int, int, int]
  kept: Mapping[int, np.ndarray]
  layers: Mapping[Path, LayerCut]
  norms: Mapping[Path, np.ndarray]
  affine: Mapping[Path, np.ndarray]

  @property
  def macs(self) -> int:
    """Multiply-accumulates of every kept kernel (branch form)."""
    return sum(l.macs for l in self.layers.values()) + (
        self.graph.activation_macs)

  def kept_gid(self, gid: np.ndarray) -> np.ndarray:
    """Whether each global channel id of the walk is kept."""
    return graph_lib.kept_of(self.graph, self.kept, gid)

  def summary(self) -> str:
    """One line per pruned layer: kept inputs x kept outputs, branches."""
    lines = []
    for l in self.layers.values():
      layer = self.graph[l.path]
      if (len(l.inputs), len(l.outputs)) == (layer.in_features,
                                            layer.out_features):
        continue
      lines.append(f"{l.name}: {len(l.inputs)}/{layer.in_features} inputs x "
                   f"{len(l.outputs)}/{layer.out_features} outputs, "
                   f"{len(l.branches)} branch(es)")
    return "\n".join(lines) or "nothing removed"


def describe(model: Any, variables: Mapping[str, Any],
             input_shape: Sequence[int] | None = None) -> Description:
  """The description of ``model`` pruned as ``variables`` say.

  Args:
    model: any Flax Linen model (plain or ``models.prunable``-wrapped).
    variables: its variables with ``params`` and, for a pruned model,
      ``masks`` (numpy or jax arrays).
    input_shape: (H, W, C); default the model's ``image_size`` (or 32) and
      3 channels.

  Returns:
    The ``Description``.
  """
  if input_shape is None:
    size = getattr(models.unwrap(model), "image_size", None) or 32
    input_shape = (size, size, 3)
  input_shape = tuple(int(s) for s in input_shape)
  graph = models.analyze(model, input_shape[:2], input_shape[2])
  masks = variables.get(models.MASKS)
  params = artifacts.to_numpy_tree(variables["params"])
  c = graph_lib.cut(graph, params, masks)
  kept, layers = c.kept, c.layers
  norms = {}
  for l in graph.norms:
    if l.aligned and l.inputs:
      spaces, chans = graph_lib.space_channels(graph, l)
      flags = np.array([s < 0 or kept[int(s)][int(c)]
                        for s, c in zip(spaces, chans)], bool)
      norms[l.path] = np.flatnonzero(flags)
  affine = {}
  for leaf, gid in graph.affine.items():
    affine[leaf] = np.flatnonzero(graph_lib.kept_of(graph, kept, gid))
  return Description(graph, input_shape, kept, layers, norms, affine)


class WidthMismatch(ValueError):
  """An exported file's widths differ from the description's."""


def check_module_widths(description: Description,
                        widths: Mapping[str, tuple[int, int]],
                        required: bool = True,
                        only: Sequence[Path] | None = None) -> None:
  """Raises ``WidthMismatch`` naming the first layer of a family module
  (one conv/Linear per layer, named as the model's) that lost structure.

  Family formats keep more than the description where their layout says so
  (the released DSP format keeps every filter with a kept kernel, even one
  no later layer reads; slimmed ResNets keep residual streams at full width;
  a slimmed LayerNorm drops constant inputs), so a layer must keep at least
  every filter the description keeps and at most its unpruned width.

  Args:
    description: the pruned network's description.
    widths: per module name, its ``(inputs, outputs)``.
    required: every layer of the description with kept filters must appear.
    only: check these layers only (default: every conv/dense layer).
  """
  graph = description.graph
  for cut in description.layers.values():
    if only is not None and cut.path not in only:
      continue
    got = widths.get(cut.name)
    if got is None:
      if required and len(cut.filters):
        raise WidthMismatch(
            f"{cut.name}: the exported module has no such layer, but the "
            f"pruned network keeps {len(cut.filters)} of its filters")
      continue
    g_in, g_out = got
    info = graph[cut.path]
    if not (len(cut.filters) <= g_out <= info.out_features
            and g_in <= info.in_features):
      raise WidthMismatch(
          f"{cut.name}: the exported module keeps {g_in} inputs x {g_out} "
          f"outputs; the pruned network keeps {len(cut.filters)} filters of "
          f"{info.out_features} (inputs: {info.in_features})")


def check_widths(description: Description,
                 widths: Mapping[str, tuple[int, int]],
                 kind: str = "outputs") -> None:
  """Raises ``WidthMismatch`` naming the first layer whose exported widths
  differ from the description's.

  Args:
    description: the pruned network's description.
    widths: per layer name (module path joined with '.'), the exported
      ``(inputs, outputs)`` counts; every layer of the description with kept
      filters must be present.
    kind: which outputs the format keeps per layer: ``outputs`` (every kept
      channel of the space, a dense lowering) or ``filters`` (only the
      filters with a kept kernel, a branch or index-add lowering).
  """
  for cut in description.layers.values():
    want = (len(cut.inputs), len(getattr(cut, kind)))
    if cut.name not in widths:
      if len(cut.filters):
        raise WidthMismatch(
            f"{cut.name}: the exported file has no such layer, but the "
            f"pruned network keeps {want[1]} of its outputs")
      continue
    got = tuple(widths[cut.name])
    if got != want:
      raise WidthMismatch(
          f"{cut.name}: the exported file keeps {got[0]} inputs x {got[1]} "
          f"outputs, the pruned network {want[0]} x {want[1]}")
