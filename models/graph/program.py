"""The channel program: what every channel of a traced network computes.

The walk (``models.graph.walk``) turns the model's jaxpr into a small
dataflow graph over *channel vectors*: each ``Node`` computes one vector of
channels (a producer's outputs, a norm's outputs, a residual sum, an
activation function...) from the channels of earlier nodes. A channel of an
activation is referred to by a *ref*, ``node index << 32 | element``.

Two evaluations over it give the exactly-zero-gradient pattern the DSP
reference measures with random train-mode batches (``models.graph.liveness``):

* ``forward``: per channel, is it identically a constant, and which one
  (``nan`` = varies with the image)? A producer whose kept kernels read only
  zero channels emits its bias; a BatchNorm (train mode) of a constant emits
  its shift; an activation function maps constants through itself...
* ``backward``: per channel, can a gradient reach it (``used``)? A channel
  read by no kept kernel of a used output, or behind a zero scale, or behind
  an activation whose derivative at the channel's constant is 0 (ReLU of a
  negative shift), gets none.

Node kinds (``Node.kind``) and their forward/backward rules are listed in
``KINDS``. Variables enter through the evaluation context, so one program
serves every set of masks and weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Path = tuple[str, ...]

SHIFT = 32
ELEMENT = (1 << SHIFT) - 1

KINDS = {
    "input": "the image: varies",
    "source": "a conv/dense producer's outputs: its bias where no kept kernel "
              "reads a channel that is not zero, else varies",
    "depthwise": "a depthwise conv: its bias where the channel or its kernel "
                 "is zero; a constant through a 1x1 kernel without padding; "
                 "else varies",
    "norm": "a norm module (scale, bias; batch statistics when it centres): "
            "a centred constant becomes the shift; a zero scale emits the "
            "shift",
    "affine": "one per-channel variable multiplied or added",
    "act": "an elementwise function of one activation (ReLU, GELU, ...)",
    "sum": "a sum of activations (residual joins, couplings)",
    "prod": "a product of activations (gating): zero where a factor is zero",
    "scale": "a linear map of each channel by a constant factor (sums over "
             "spatial positions)",
    "pad": "spatial zero padding: zero stays zero, a constant varies",
    "stat": "normalised by statistics over channels (LayerNorm, GroupNorm): "
            "varies; every input channel is read",
    "opaque": "an elementwise operation the program does not model: varies",
    "sink": "channels read in full (model outputs, channel-mixing operations)",
}


def ref(node: int, element: np.ndarray | int) -> np.ndarray:
  """Refs of ``element`` (array) of node ``node``."""
  return (np.int64(node) << SHIFT) | np.asarray(element, np.int64)


@dataclasses.dataclass(eq=False)
class Node:
  """One channel vector of the program.

  Attributes:
    kind: one of ``KINDS``.
    size: channels.
    inputs: one refs array (``size`` entries) per operand, in order.
    layer: the module of a ``source``, ``depthwise`` or ``norm`` node.
    leaf: the variable path (collection first) of an ``affine`` node.
    op: ``'mul'`` or ``'add'`` for ``affine``.
    index: per channel, the index into the module's per-channel variables.
    fn: ``act``: ``fn(x) -> (f(x), f'(x))`` elementwise on float64 arrays.
    factor: ``scale``: the constant factor.
    centres: ``norm``: the module subtracts batch statistics (BatchNorm).
    spatial: ``depthwise``: the kernel is larger than 1x1 or pads, so a
      non-zero constant input channel does not stay constant.
    gid: the walk's channel id of every element (which producer channel it
      carries; ``Graph.gid_space`` maps it to a space and channel).
  """

  kind: str
  size: int
  inputs: tuple[np.ndarray, ...] = ()
  layer: Path | None = None
  leaf: Path | None = None
  op: str | None = None
  index: np.ndarray | None = None
  fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
  factor: float = 1.0
  centres: bool = False
  spatial: bool = True
  gid: np.ndarray | None = None
  # Filled by ``Program``: per operand, (node, positions, elements) groups.
  _groups: tuple = ()


@dataclasses.dataclass
class Context:
  """The values a program evaluation reads.

  Attributes:
    live: per producer/depthwise module, boolean ``(in_per_group, out)``
      kernels kept (mask and non-zero weights, as the layer counts them).
    groups: feature groups per module (1 for a full conv/dense).
    scale: per norm module, its masked scale (C,) (ones where it has none).
    shift: per norm module, its masked shift (C,) (zeros where it has none).
    bias: per producer/depthwise module, its masked bias (zeros if none).
    leaves: per ``affine`` leaf path, its value (C,).
  """

  live: Mapping[Path, np.ndarray]
  groups: Mapping[Path, int]
  scale: Mapping[Path, np.ndarray]
  shift: Mapping[Path, np.ndarray]
  bias: Mapping[Path, np.ndarray]
  leaves: Mapping[Path, np.ndarray]


class Program:
  """The nodes of one traced model and their two evaluations.

  Args:
    nodes: in evaluation order (every operand refers to an earlier node).
    layer_inputs: per producer/depthwise module, the refs of its input
      features (None where the input is not channel-aligned).
  """

  def __init__(self, nodes: Sequence[Node],
               layer_inputs: Mapping[Path, np.ndarray | None]):
    self.nodes = list(nodes)
    self.layer_inputs = dict(layer_inputs)
    for n in self.nodes:
      n._groups = tuple(_groups(r) for r in n.inputs)
    self.source_of = {n.layer: i for i, n in enumerate(self.nodes)
                      if n.kind in ("source", "depthwise")}
    self.norm_of = {n.layer: i for i, n in enumerate(self.nodes)
                    if n.kind == "norm"}
    self._input_groups = {p: None if r is None else _groups(r)
                          for p, r in self.layer_inputs.items()}

  # ---------------------------------------------------------------- forward
  def forward(self, ctx: Context) -> list[np.ndarray]:
    """Per node, its channels' constant values (``nan``: varies)."""
    vals: list[np.ndarray] = []
    for n in self.nodes:
      ins = [_gather(vals, g, n.size) for g in n._groups]
      vals.append(self._forward(n, ins, ctx, vals))
    return vals

  def node_input(self, vals: list[np.ndarray], node: int) -> np.ndarray:
    """Constant values of a node's first operand (``nan``: varies)."""
    n = self.nodes[node]
    return _gather(vals, n._groups[0], n.size)

  def layer_input(self, vals: list[np.ndarray], layer: Path) -> np.ndarray:
    """Constant values of a layer's input features (``nan``: varies)."""
    groups = self._input_groups.get(layer)
    size = self._input_size(layer)
    if groups is None:
      return np.full((size,), np.nan)
    return _gather(vals, groups, size)

  def _input_size(self, layer: Path) -> int:
    r = self.layer_inputs.get(layer)
    return 0 if r is None else len(r)

  def _forward(self, n: Node, ins, ctx: Context, vals) -> np.ndarray:
    k = n.kind
    if k in ("input", "stat", "opaque"):
      return np.full((n.size,), np.nan)
    if k == "source":
      x = self.layer_input(vals, n.layer)
      reads = _full_live(ctx, n.layer, len(x) if len(x) else None)
      if reads is None:  # input not aligned: assume it varies
        return np.full((n.size,), np.nan)
      hot = ~(x == 0)  # nan (varies) or a non-zero constant
      const = ~np.any(reads & hot[:, None], axis=0)
      return np.where(const, ctx.bias[n.layer], np.nan)
    if k == "depthwise":
      (x,) = ins
      alive = ctx.live[n.layer].reshape(-1)
      b = ctx.bias[n.layer]
      off = (x == 0) | ~alive
      if n.spatial:
        return np.where(off, b, np.nan)
      # A 1x1 kernel without padding maps a constant to a constant.
      return np.where(off, b, x * ctx.leaves.get(n.layer + ("<w>",), np.nan)
                      + b)
    if k == "norm":
      (x,) = ins
      s, b = ctx.scale[n.layer][n.index], ctx.shift[n.layer][n.index]
      if n.centres:  # (x - batch mean) is 0 for a constant channel
        y = np.where(np.isnan(x), np.nan, b)
      else:
        y = x * s + b
      return np.where(s == 0, b, y)
    if k == "affine":
      (x,) = ins
      p = ctx.leaves[n.leaf][n.index]
      if n.op == "mul":
        return np.where(p == 0, 0.0, x * p)
      return x + p
    if k == "act":
      (x,) = ins
      var = np.isnan(x)
      y, _ = n.fn(np.where(var, 0.0, x))
      return np.where(var, np.nan, y)
    if k == "sum":
      return np.sum(ins, axis=0)
    if k == "prod":
      zero = np.any([x == 0 for x in ins], axis=0)
      return np.where(zero, 0.0, np.prod(ins, axis=0))
    if k == "scale":
      return ins[0] * n.factor
    if k == "pad":
      return np.where(ins[0] == 0, 0.0, np.nan)
    if k == "sink":
      return np.full((n.size,), np.nan)
    raise ValueError(f"unknown channel-program node kind {k!r}")

  # --------------------------------------------------------------- backward
  def backward(self, vals: list[np.ndarray], ctx: Context
               ) -> tuple[list[np.ndarray], dict[Path, np.ndarray]]:
    """Per node, which channels a gradient can reach; per layer, its inputs.

    Returns:
      ``(used, used_in)``: per node a boolean vector; per producer/depthwise
      module a boolean vector over its input features (a gradient reaches
      the feature through a kept kernel of a used output).
    """
    used = [np.zeros((n.size,), bool) for n in self.nodes]
    used_in: dict[Path, np.ndarray] = {}
    for i in reversed(range(len(self.nodes))):
      n = self.nodes[i]
      u = used[i]
      k = n.kind
      if k == "sink":
        u[:] = True
      if k == "source":
        x = self.layer_input(vals, n.layer)
        reads = _full_live(ctx, n.layer, len(x) if len(x) else None)
        if reads is None:
          continue
        ui = np.any(reads & u[None, :], axis=1)
        used_in[n.layer] = ui
        _scatter(used, self._input_groups[n.layer], ui)
        continue
      ins = [_gather(vals, g, n.size) for g in n._groups]
      for j, g in enumerate(n._groups):
        _scatter(used, g, self._backward(n, j, u, ins, ctx))
      if k == "depthwise":
        used_in[n.layer] = self._backward(n, 0, u, ins, ctx)
    return used, used_in

  def _backward(self, n: Node, j: int, u: np.ndarray, ins,
                ctx: Context) -> np.ndarray:
    k = n.kind
    if k in ("sum", "scale", "pad", "opaque"):
      return u
    if k in ("stat", "sink"):
      return np.full((n.size,), bool(u.any()) or k == "sink")
    if k == "depthwise":
      return u & ctx.live[n.layer].reshape(-1)
    if k == "norm":
      return u & (ctx.scale[n.layer][n.index] != 0)
    if k == "affine":
      if n.op == "mul":
        return u & (ctx.leaves[n.leaf][n.index] != 0)
      return u
    if k == "act":
      x = ins[0]
      const = ~np.isnan(x)
      if not const.any():
        return u
      flat = np.zeros_like(x, bool)
      flat[const] = n.fn(x[const])[1] == 0
      return u & ~flat
    if k == "prod":
      others = [x for i, x in enumerate(ins) if i != j]
      zero = np.any([x == 0 for x in others], axis=0)
      return u & ~zero
    raise ValueError(f"node kind {k!r} has no operands")


def _groups(refs: np.ndarray):
  """(node, positions, elements) per node referenced by ``refs``."""
  refs = np.asarray(refs, np.int64)
  nid = refs >> SHIFT
  el = refs & ELEMENT
  out = []
  for node in np.unique(nid):
    pos = np.flatnonzero(nid == node)
    out.append((int(node), pos, el[pos]))
  return tuple(out)


def _gather(vals: list[np.ndarray], groups, size: int) -> np.ndarray:
  n = sum(len(p) for _, p, _ in groups)
  out = np.empty((n,), np.float64)
  for node, pos, el in groups:
    out[pos] = vals[node][el]
  return out


def _scatter(used: list[np.ndarray], groups, flags: np.ndarray) -> None:
  for node, pos, el in groups:
    np.logical_or.at(used[node], el, flags[pos])


def _full_live(ctx: Context, layer: Path, in_features: int | None
               ) -> np.ndarray | None:
  """``(in_features, out)`` kept kernels, block-diagonal for grouped convs."""
  if in_features is None:
    return None
  live = ctx.live[layer]
  g = ctx.groups.get(layer, 1)
  if g == 1:
    return live
  ipg, out = live.shape
  opg = out // g
  full = np.zeros((ipg * g, out), bool)
  for k in range(g):
    full[k * ipg:(k + 1) * ipg, k * opg:(k + 1) * opg] = live[:, k * opg:
                                                               (k + 1) * opg]
  return full


def context(program: Program, layers: Mapping[Path, Any],
            params: Mapping[str, Any], masks: Mapping[str, Any] | None,
            live: Mapping[Path, np.ndarray],
            batch_stats: Mapping[str, Any] | None = None) -> Context:
  """The evaluation context of masked variables.

  Args:
    program: the program.
    layers: the graph's layers (``LayerInfo`` by module path).
    params: the ``params`` collection (numpy or jax arrays).
    masks: the ``masks`` collection (None: dense).
    live: kept kernels per producer/depthwise module (see ``Context``).
    batch_stats: unused (statistics cancel in the rules); accepted so that a
      variables dict can be passed through.

  Returns:
    The context.
  """
  del batch_stats
  from models import paths  # pylint: disable=import-outside-toplevel
  scale, shift, bias, leaves, groups = {}, {}, {}, {}, {}
  for path, l in layers.items():
    node = paths.get(params, path) or {}
    if l.kind == "norm":
      c = l.out_features
      m = paths.get(masks, path + ("scale",))
      m = np.ones((c,)) if m is None else np.asarray(m, np.float64)
      s = node.get("scale")
      b = node.get("bias")
      scale[path] = (np.ones((c,)) if s is None
                     else np.asarray(s, np.float64)) * m
      shift[path] = (np.zeros((c,)) if b is None
                     else np.asarray(b, np.float64)) * m
    elif l.kind in ("conv", "dense"):
      groups[path] = l.feature_groups
      b = node.get("bias")
      # A bias is masked with its output unit (models.pruning.apply_masks).
      m = paths.get(masks, l.kernel_path[1:])
      keep = 1.0 if m is None else np.max(np.asarray(m, np.float64), axis=0)
      bias[path] = (np.zeros((l.out_features,)) if b is None
                    else np.asarray(b, np.float64) * keep)
      if l.depthwise and tuple(l.kernel_size) == (1, 1):
        k = np.asarray(paths.get(params, l.kernel_path[1:]), np.float64)
        leaves[path + ("<w>",)] = k.reshape(-1) * live[path].reshape(-1)
  for n in program.nodes:
    if n.kind == "affine":
      leaves[n.leaf] = np.asarray(paths.require(
          {"params": params}, n.leaf), np.float64).reshape(-1)
  return Context(live=live, groups=groups, scale=scale, shift=shift,
                 bias=bias, leaves=leaves)
