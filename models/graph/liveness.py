"""Which kernels and channels still matter under given masks and weights.

Everything here evaluates the graph's channel program
(``models.graph.program``) with the masked variables:

* ``connectivity``: a layer's kept kernels ``(in_per_group, out)``;
* ``evaluate``: per channel, its constant value (if any) and whether a
  gradient reaches it;
* ``dead_channels``: output channels of every producer that cannot affect
  the logits (one pass over the masks, or iterated to a fixed point);
* ``zero_dead``: params with those channels' kernels and biases zeroed.

DSP's dead-structure removal (``dsp_jax.pruning``) reads the same
evaluation: the exactly-zero-gradient pattern its reference finds with
random train-mode batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from models import paths
from models.graph import program as prog
from models.graph.core import Graph, LayerInfo

Path = tuple[str, ...]


def _concrete(x: Any) -> Any:
  """None for an abstract leaf (``jax.eval_shape`` output): values unknown."""
  return None if isinstance(x, jax.ShapeDtypeStruct) else x


def connectivity(layer: LayerInfo, masks: Mapping[str, Any] | None,
                 params: Mapping[str, Any] | None = None) -> np.ndarray:
  """Boolean ``(in_features / groups, out_features)``: kept kernels.

  Args:
    layer: a conv or dense layer.
    masks: the ``masks`` collection (None: dense).
    params: the ``params`` collection; when given, a kernel also counts as
      removed when all its weights are zero (``sum_hw |W * mask| == 0``, the
      reference's survival test). Abstract leaves of either tree count as
      dense.

  Returns:
    The boolean matrix.
  """
  if layer.kind == "norm":
    raise ValueError(f"{layer.name} is a norm; connectivity is for conv/dense")
  shape = (layer.in_features // layer.feature_groups, layer.out_features)
  conn = np.ones(shape, bool)
  mask = _concrete(paths.get(masks, layer.kernel_path[1:]))
  if mask is not None:
    conn &= np.asarray(mask).reshape(shape) != 0
  kernel = _concrete(paths.get(params, layer.kernel_path[1:]))
  if kernel is not None:
    w = np.abs(np.asarray(kernel, np.float64))
    conn &= w.reshape((-1,) + shape).sum(axis=0) > 0
  return conn


def norm_alive(layer: LayerInfo, masks: Mapping[str, Any] | None,
               params: Mapping[str, Any] | None = None) -> np.ndarray:
  """Boolean (features,): norm channels whose input still matters.

  A channel whose mask (or, given ``params``, whose masked scale) is zero
  outputs its bias whatever its input is.
  """
  alive = np.ones((layer.out_features,), bool)
  mask = _concrete(paths.get(masks, layer.path + ("scale",)))
  if mask is not None:
    alive &= np.asarray(mask) != 0
  scale = _concrete(paths.get(params, layer.path + ("scale",)))
  if scale is not None:
    alive &= np.asarray(scale) != 0
  return alive


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluation of the channel program.

  Attributes:
    values: per node, constant channel values (nan: varies).
    used: per node, channels a gradient reaches.
    used_in: per conv/dense layer, input features a gradient reaches
      through a kept kernel of a used output.
    live: the kept kernels the evaluation used.
  """

  values: list[np.ndarray]
  used: list[np.ndarray]
  used_in: dict[Path, np.ndarray]
  live: dict[Path, np.ndarray]

  def output(self, graph: Graph, layer: Path) -> tuple[np.ndarray,
                                                       np.ndarray]:
    """(constant values, used) of a conv/dense layer's output channels."""
    i = graph.program.source_of[tuple(layer)]
    return self.values[i], self.used[i]

  def input_values(self, graph: Graph, layer: Path) -> np.ndarray:
    """Constant values of a layer's input features (nan: varies)."""
    return graph.program.layer_input(self.values, tuple(layer))


def context(graph: Graph, params: Mapping[str, Any] | None,
            masks: Mapping[str, Any] | None,
            live: Mapping[Path, np.ndarray]) -> prog.Context:
  """The program's evaluation context; without ``params`` it assumes every
  unknown scale, shift and bias is non-zero (nothing is found constant by
  accident)."""
  if params is not None and not any(
      isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    return prog.context(graph.program, graph.layers, params, masks, live)
  scale, shift, bias, groups, leaves = {}, {}, {}, {}, {}
  for p, l in graph.layers.items():
    if l.kind == "norm":
      m = _concrete(paths.get(masks, p + ("scale",)))
      m = np.ones((l.out_features,)) if m is None else np.asarray(
          m, np.float64)
      scale[p], shift[p] = m, m
    else:
      groups[p] = l.feature_groups
      bias[p] = np.ones((l.out_features,))
  for n in graph.program.nodes:
    if n.kind == "affine":
      leaves[n.leaf] = np.ones((int(np.max(n.index)) + 1,))
  return prog.Context(live=dict(live), groups=groups, scale=scale,
                      shift=shift, bias=bias, leaves=leaves)


def evaluate(graph: Graph, params: Mapping[str, Any] | None,
             masks: Mapping[str, Any] | None,
             live: Mapping[Path, np.ndarray] | None = None) -> Evaluation:
  """Evaluates the channel program under ``masks`` (and weights).

  Args:
    graph: from ``models.analyze``.
    params: the ``params`` collection (None: masks only).
    masks: the ``masks`` collection (None: dense).
    live: kept kernels per conv/dense layer, overriding those the masks and
      weights give (DSP passes its candidate masks).

  Returns:
    The ``Evaluation``.
  """
  live = live or {}
  kept = {l.path: live[l.path] if l.path in live else connectivity(
      l, masks, params) for l in graph.weighted}
  ctx = context(graph, params, masks, kept)
  values = graph.program.forward(ctx)
  used, used_in = graph.program.backward(values, ctx)
  return Evaluation(values, used, used_in, kept)


def dead_channels(graph: Graph, masks: Mapping[str, Any] | None,
                  params: Mapping[str, Any] | None = None,
                  propagate: bool = True) -> dict[Path, np.ndarray]:
  """Output channels of every producer that cannot affect the logits.

  Channel ``o`` of producer ``p`` is dead when no gradient can reach it: no
  kept kernel of a used output reads it, a zero norm scale (its mask) or an
  activation flat at the constant it emits blocks it. Channels reaching the
  logits or read in full (``graph.mixed``) are never dead. A channel that is
  alive but constant (an emptied filter followed by a norm shift) is not
  dead: its consumers see the constant.

  Args:
    graph: from ``models.analyze``.
    masks: the ``masks`` collection.
    params: the ``params`` collection; when given, zero weights count as
      removed as well, and norm shifts and biases decide constants.
    propagate: iterate to the fixed point (a consumer's dead output rows no
      longer keep its input columns alive); without it one pass.

  Returns:
    Producer path -> boolean vector (out_features,), True where dead.
  """
  live = {l.path: connectivity(l, masks, params) for l in graph.weighted}
  while True:
    ev = evaluate(graph, params, masks, live)
    dead = {}
    for l in graph.producers:
      _, used = ev.output(graph, l.path)
      d = ~used
      if l.path in graph.outputs or l.path in graph.mixed:
        d = np.zeros_like(d)
      dead[l.path] = d
    if not propagate:
      return dead
    new = dict(live)
    for l in graph.producers:
      new[l.path] = live[l.path] & ~dead[l.path][None, :]
    if all(np.array_equal(new[p], live[p]) for p in live):
      return dead
    live = new


def zero_dead(graph: Graph, params: Mapping[str, Any],
              dead: Mapping[Path, np.ndarray]) -> dict[str, Any]:
  """``params`` with the kernel slices and biases of dead channels zeroed.

  Norms are left alone (a norm after a dead channel may still emit its
  bias into a live space).

  Args:
    graph: from ``models.analyze``.
    params: the ``params`` collection.
    dead: from ``dead_channels``.

  Returns:
    A new ``params`` tree.
  """
  out = params
  for p, d in dead.items():
    if not np.any(d):
      continue
    keep = jnp.asarray(~d)
    layer = graph[p]
    kernel = paths.get(params, layer.kernel_path[1:])
    out = paths.replace(out, layer.kernel_path[1:],
                        kernel * keep.astype(kernel.dtype))
    bias = paths.get(params, p + ("bias",))
    if bias is not None:
      out = paths.replace(out, p + ("bias",), bias * keep.astype(bias.dtype))
  return out
