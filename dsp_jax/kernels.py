"""DSP's view of a model's graph: taking-part layers and their kernels (§0).

The taking-part layers, their shapes, the residual blocks and the fp layers
all come from the model's traced graph (``models.analyze``); this module
adds what is DSP's own: the ``insize`` normaliser, the HWIO view of a
kernel (a dense ``(I, O)`` kernel as the 1x1 convolution over the tokens it
is: ``kernel_shape (1, 1, I, O)``, ``in_shape (tokens, 1, I)``, flops
``I*O*tokens``), and the fp-layer rule derived from the blocks.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import models
from models import graph as graph_lib
from models import paths
from models import pruning

Path = tuple[str, ...]
LayerInfo = graph_lib.LayerInfo
Graph = graph_lib.Graph

# The reference normalises each layer's input size by one 16x32x32 feature map.
INSIZE_NORMALISER = 16 * 32 * 32


def analyze(model: Any, image_shape: Sequence[int]) -> Graph:
  """The model's graph, checked for DSP (spec §0).

  Args:
    model: any Flax Linen model (plain or ``models.prunable``-wrapped).
    image_shape: (H, W, C) of one input image (the probe of spec §0).

  Returns:
    The ``models.Graph``; ``graph.taking_part`` are DSP's layers.

  Raises:
    ValueError: no layer takes part (saying why), or a taking-part layer's
      channels reach an operation the graph cannot follow (naming both).
  """
  if len(image_shape) != 3:
    raise ValueError(f"image_shape must be (height, width, channels), got "
                     f"{tuple(image_shape)}")
  g = models.analyze(model, tuple(image_shape[:2]), image_shape[2])
  if not g.taking_part:
    raise ValueError(pruning.no_taking_part(g))
  graph_lib.check_followed(g, g.taking_part, "DSP")
  return g


def insize(layer: LayerInfo) -> float:
  """DSP ``insize_l``: input elements of one image / (16*32*32)."""
  return math.prod(layer.in_shape) / INSIZE_NORMALISER


def kernel(tree: Any, layer: LayerInfo) -> Any:
  """The layer's kernel in ``tree`` (params or grads) viewed as HWIO."""
  return paths.get(tree, layer.kernel_path[1:]).reshape(layer.kernel_shape)


def with_kernel(tree: Any, layer: LayerInfo, value: Any) -> Any:
  """A copy of ``tree`` with the layer's kernel set from an HWIO ``value``
  (reshaped back to the stored layout: ``(I, O)`` for a dense layer)."""
  shape = paths.get(tree, layer.kernel_path[1:]).shape
  return paths.replace(tree, layer.kernel_path[1:], value.reshape(shape))


def logits(gates: Any, layer: LayerInfo) -> Any:
  """The layer's group logits ``(G, O)`` in a ``gates`` tree."""
  got = paths.get(gates, layer.path + ("logits",))
  if got is None:
    raise KeyError(f"gates have no logits for the taking-part layer "
                   f"{layer.name}; build them with dsp_jax.init_gates")
  return got


def derived_fp(graph: Graph) -> tuple[int, ...]:
  """fp layer indices of a graph (spec §3, derived rather than set).

  The last producer of every residual block's main branch (every 2nd
  taking-part conv of basic blocks, every 3rd of bottlenecks; a transformer
  MLP's fc2, whose output feeds the residual sum); for a network without
  residual sums, every taking-part layer.

  Args:
    graph: the model's graph.

  Returns:
    Indices into ``graph.taking_part``.
  """
  tp = graph.taking_part
  if not graph.blocks:
    return tuple(range(len(tp)))
  return tuple(i for i, l in enumerate(tp) if l.block_last)
