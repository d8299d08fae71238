"""Channel-flow structure of a model, derived from its traced jaxpr.

``analyze(model, image_size)`` traces ``model.apply`` (eval mode, one image)
with ``jax.make_jaxpr`` on abstract variables and walks the jaxpr. Nothing is
read from module classes or names except the variable paths themselves:

* every jaxpr input is labelled with its variable path
  (``('params', 'stage_1', '0', 'conv_a', 'kernel')``);
* a convolution (``conv_general_dilated``) or dense layer (``dot_general``) is
  the module whose ``params/.../kernel`` flows into the operation's weight
  operand (through the mask multiply); a norm is the module owning a
  ``params/.../scale`` that first meets an activation;
* for every activation the walk keeps the set of producer layers (convs and
  dense layers) whose output channels reach it channel-aligned, the axis that
  carries those channels and, after a flatten, the map feature -> channel.
  Elementwise operations merge the sets (a residual sum ties its producers
  into one "space"), reductions and pooling over non-channel axes keep them,
  reshapes and transposes move the channel axis. Any operation that mixes
  channels (a reduction over the channel axis, a channel concatenation, an
  operation the walk does not know) makes its producers "mixed": their
  channels are never declared dead.
* residual blocks come from the sums: each activation remembers the trail of
  convs applied along its longest path; at a sum, the part of the longer trail
  after the common prefix is the main branch and that of the shorter trail is
  the shortcut (a conv there is a shortcut conv). With two branches of equal
  length the one holding the later-called conv is the shortcut.

The only convention that is not derived is DSP's choice of taking-part layers
(spec dsp.md section 0: every conv but the first one and the shortcut convs,
plus the dense layers the model gives DSP gates, the transformers' MLP
Linears), which is a property of the method, not of the model.

``dead_channels(structure, masks, params)`` then tells which output channels of
every producer cannot affect the logits under given masks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from models.layers import input_channels

Path = tuple[str, ...]

# Normaliser of DSP's ``insize_l`` (spec dsp.md section 0).
INSIZE_NORMALISER = 16 * 32 * 32

# Elementwise primitives: channels pass through, operands merge.
_ELEMENTWISE = frozenset({
    "abs", "add", "add_any", "and", "clamp", "convert_element_type", "copy",
    "copy_p", "cos", "div", "eq", "erf", "erfc", "erf_inv", "exp", "exp2",
    "expm1",
    "ge", "gt", "integer_pow", "is_finite", "le", "log", "log1p", "logistic",
    "lt", "max", "min", "mul", "ne", "neg", "not", "or", "pow",
    "reduce_precision", "rem", "round", "rsqrt", "select_n", "sign", "sin",
    "sqrt", "square", "stop_gradient", "sub", "tan", "tanh", "floor", "ceil",
    "nextafter", "cbrt", "atan2", "optimization_barrier",
})
# Sums whose activation operands form a residual join.
_SUMS = frozenset({"add", "add_any", "sub"})
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min",
                         "reduce_prod", "argmax", "argmin", "reduce_and",
                         "reduce_or"})
_WINDOW_REDUCTIONS = frozenset({"reduce_window_sum", "reduce_window_max",
                                "reduce_window_min", "reduce_window"})


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One conv, dense or norm layer, as called in the traced forward pass.

  Attributes:
    path: module path (tuple of names; '.'-joined it is the PyTorch name).
    kind: 'conv', 'dense' or 'norm'.
    in_features: input channels (dense: input features).
    out_features: output channels.
    kernel_size: (kh, kw) for a conv, (1, 1) otherwise.
    strides: (sh, sw) for a conv, (1, 1) otherwise.
    in_hw: input height and width ((1, 1) for a dense layer).
    out_hw: output height and width.
    macs: multiply-accumulates for one image (0 for a norm).
    params: parameter count (kernel + bias; scale + bias for a norm).
    stem: the first conv of the model (it reads the image).
    shortcut: a conv inside a residual shortcut branch (or its norm).
    takes_part: DSP section 0: a conv that is neither the stem nor a shortcut,
      or a dense layer that owns ``gates/logits`` (a transformer MLP Linear).
    block_last: last conv of a residual block's main branch.
    inputs: producer layers whose output channels reach this layer's input
      (channel-aligned unless ``aligned`` is false); empty for the stem.
    aligned: input channel j of this layer is channel ``in_channel_map[j]``
      of every producer in ``inputs``.
    in_channel_map: for each input feature, the producer channel it carries
      (``f % C`` after an NHWC flatten); None means the identity.
    norm: the norm that directly follows this conv/dense layer, if any.
    kernel_path: variable path of the kernel (scale for a norm) in ``params``.
    order: position in call order among all layers.
  """

  path: Path
  kind: str
  in_features: int
  out_features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  in_hw: tuple[int, int]
  out_hw: tuple[int, int]
  macs: int
  params: int
  stem: bool = False
  shortcut: bool = False
  takes_part: bool = False
  block_last: bool = False
  inputs: tuple[Path, ...] = ()
  aligned: bool = True
  in_channel_map: tuple[int, ...] | None = None
  norm: Path | None = None
  kernel_path: Path = ()
  order: int = 0

  @property
  def name(self) -> str:
    """The '.'-joined path (the PyTorch module name)."""
    return ".".join(self.path)

  @property
  def insize(self) -> float:
    """DSP ``insize_l``: input elements of one image / (16*32*32)."""
    return self.in_hw[0] * self.in_hw[1] * self.in_features / INSIZE_NORMALISER

  @property
  def flops(self) -> int:
    """DSP ``flops_l`` = O*I*k*k*H_out*W_out (same as ``macs``)."""
    return self.macs

  @property
  def repeat(self) -> int:
    """Input features per producer channel (H*W after a flatten)."""
    if self.in_channel_map is None or not self.inputs:
      return 1
    return self.in_features // max(1, len(set(self.in_channel_map)))

  def channel_map(self) -> np.ndarray:
    """Input feature -> producer channel, as an int array of ``in_features``."""
    if self.in_channel_map is None:
      return np.arange(self.in_features)
    return np.asarray(self.in_channel_map)


@dataclasses.dataclass(frozen=True)
class Block:
  """A residual block: ``out = join(main(x), shortcut(x))``.

  Attributes:
    main: main-branch (conv, norm or None) pairs in call order.
    shortcut: the shortcut's (conv, norm or None), or None for an identity.
    space: index into ``ModelStructure.spaces`` of the sum it adds into.
  """

  main: tuple[tuple[Path, Path | None], ...]
  shortcut: tuple[Path, Path | None] | None
  space: int

  @property
  def convs(self) -> tuple[Path, ...]:
    return tuple(c for c, _ in self.main)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelStructure:
  """Channel-flow structure of one model at one input shape.

  Attributes:
    layers: path -> LayerInfo in call order (convs, dense layers, norms).
    blocks: residual blocks in call order.
    spaces: groups of producers whose output channels are tied by residual
      sums (every producer is in exactly one space; most are alone).
    outputs: producers whose channels reach the model output (the logits).
    mixed: producers whose channels reach something channel-mixing; their
      channels are never dead.
    input_shape: (H, W, C) of the traced image.
    mixed_by: for every producer in ``mixed``, the name of the operation
      (jaxpr primitive) that first mixed its channels.
    activation_macs: multiply-accumulates of contractions between two
      activations (attention scores and weighted values) for one image; they
      have no weights and are never pruned.
  """

  layers: Mapping[Path, LayerInfo]
  blocks: tuple[Block, ...]
  spaces: tuple[frozenset[Path], ...]
  outputs: frozenset[Path]
  mixed: frozenset[Path]
  input_shape: tuple[int, int, int]
  mixed_by: Mapping[Path, str] = dataclasses.field(default_factory=dict)
  activation_macs: int = 0

  def _select(self, pred) -> list[LayerInfo]:
    return [l for l in self.layers.values() if pred(l)]

  @property
  def convs(self) -> list[LayerInfo]:
    """Every conv, in call order."""
    return self._select(lambda l: l.kind == "conv")

  @property
  def producers(self) -> list[LayerInfo]:
    """Every conv and dense layer, in call order."""
    return self._select(lambda l: l.kind in ("conv", "dense"))

  @property
  def taking_part(self) -> list[LayerInfo]:
    """DSP's taking-part layers (spec dsp.md section 0), in call order."""
    return self._select(lambda l: l.takes_part)

  @property
  def block_last(self) -> list[LayerInfo]:
    """The last conv of every residual block's main branch, in call order."""
    return self._select(lambda l: l.block_last)

  def consumers(self, path: Path) -> list[LayerInfo]:
    """Convs and dense layers whose input carries ``path``'s output channels."""
    path = tuple(path)
    self[path]  # a clear error for an unknown path
    return self._select(lambda l: l.kind != "norm" and path in l.inputs)

  def space_of(self, path: Path) -> frozenset[Path]:
    """The residual space (set of producers) ``path`` belongs to."""
    path = tuple(path)
    for s in self.spaces:
      if path in s:
        return s
    raise ValueError(f"{'.'.join(path)} is not a conv or dense layer; "
                     f"producers: {[l.name for l in self.producers]}")

  def __getitem__(self, path: Path) -> LayerInfo:
    path = tuple(path)
    if path not in self.layers:
      raise KeyError(f"no layer {'.'.join(path)!r}; valid layers: "
                     f"{', '.join(l.name for l in self.layers.values())}")
    return self.layers[path]


# --------------------------------------------------------------------------
# The walk.


@dataclasses.dataclass(frozen=True)
class _Param:
  """A value computed from variables only; ``srcs`` are their leaf paths."""
  srcs: frozenset[Path]


@dataclasses.dataclass(frozen=True, eq=False)
class _Act:
  """A value that depends on the image.

  ``flow``: producers whose channels reach it; ``axis``: the axis carrying
  them (None: not channel-aligned); ``cmap``: index along ``axis`` -> channel
  (None: identity); ``trail``: convs along the longest path from the image;
  ``uniform``: axes along which the value is constant (a broadcast statistic,
  such as LayerNorm's mean, which leaves the channels of what it meets
  aligned).
  """
  flow: frozenset[Path]
  axis: int | None
  cmap: np.ndarray | None
  trail: tuple[Path, ...]
  uniform: frozenset[int] = frozenset()


def _same_cmap(a: np.ndarray | None, b: np.ndarray | None) -> bool:
  if a is None or b is None:
    return a is None and b is None
  return a.shape == b.shape and bool(np.all(a == b))


class _Walker:
  """Abstract interpretation of a jaxpr over ``_Param`` / ``_Act`` values."""

  def __init__(self, norm_modules: frozenset[Path]):
    self.norm_modules = norm_modules
    self.records: dict[Path, dict[str, Any]] = {}
    self.mixed: set[Path] = set()
    # producer -> the primitive that first made its channels mixed
    self.mixed_by: dict[Path, str] = {}
    self.parent: dict[Path, Path] = {}
    self.blocks: list[dict[str, Any]] = []
    self.activation_macs = 0

  # union-find over producers (residual spaces)
  def find(self, p: Path) -> Path:
    while self.parent.setdefault(p, p) != p:
      p = self.parent[p]
    return p

  def tie(self, flow: Iterable[Path]) -> None:
    flow = list(flow)
    for p in flow[1:]:
      ra, rb = self.find(flow[0]), self.find(p)
      if ra != rb:
        self.parent[rb] = ra

  def _unaligned(self, flow: frozenset[Path], trail) -> _Act:
    self.mixed.update(flow)
    return _Act(flow, None, None, trail)

  def run(self, jaxpr: jcore.Jaxpr, consts: Sequence[Any],
          args: Sequence[Any]) -> list[Any]:
    env: dict[Any, Any] = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c
    for v, a in zip(jaxpr.invars, args):
      env[v] = a

    def read(v):
      if isinstance(v, jcore.Literal):
        return None
      return env.get(v)

    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      n_mixed = len(self.mixed)
      outs = self._eqn(eqn, ins)
      if len(self.mixed) != n_mixed:
        for p in self.mixed:
          self.mixed_by.setdefault(p, eqn.primitive.name)
      for v, o in zip(eqn.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def _eqn(self, eqn, ins: list[Any]) -> list[Any]:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    acts = [a for a in ins if isinstance(a, _Act)]
    if not acts:
      # Variables only (mask multiplies, BN scale folding): just their sources.
      srcs = frozenset().union(*[a.srcs for a in ins if isinstance(a, _Param)])
      return [_Param(srcs) if srcs else None] * n_out
    sub = self._subjaxpr(eqn)
    if sub is not None:
      return self.run(sub[0], sub[1], ins)
    if name == "conv_general_dilated":
      return [self._conv(eqn, ins)]
    flow = frozenset().union(*[a.flow for a in acts])
    trail = max((a.trail for a in acts), key=len)
    in_shapes = [v.aval.shape for v in eqn.invars]
    out_shape = eqn.outvars[0].aval.shape
    if name in _ELEMENTWISE:
      return [self._elementwise(eqn, ins, acts, flow, trail)] * n_out
    if name == "broadcast_in_dim" and ins[0] is acts[0]:
      return [self._broadcast(eqn, acts[0], in_shapes[0], out_shape)]
    if name == "dot_general" and len(acts) == 1:
      return [self._dot_const(eqn, ins, acts[0])]
    if name == "dot_general" and len(acts) == 2:
      # Two activations contracted (attention's q.k and weights.v): MACs
      # without weights to prune; the operands' channels are mixed below.
      (lc, _), _ = eqn.params["dimension_numbers"]
      self.activation_macs += int(np.prod(out_shape)) * int(
          np.prod([in_shapes[0][d] for d in lc]))
    a = acts[0]
    if a.axis is None:
      return [self._unaligned(flow, trail)] * n_out
    if name in _REDUCTIONS and ins[0] is a:
      red = tuple(eqn.params["axes"])
      if a.axis in red:
        return [self._unaligned(flow, trail)] * n_out
      axis = a.axis - sum(1 for r in red if r < a.axis)
      return [_Act(flow, axis, a.cmap, trail)] * n_out
    if name in _WINDOW_REDUCTIONS and ins[0] is a:
      dims = eqn.params["window_dimensions"]
      strides = eqn.params["window_strides"]
      if dims[a.axis] != 1 or strides[a.axis] != 1 or (
          out_shape[a.axis] != in_shapes[0][a.axis]):
        return [self._unaligned(flow, trail)] * n_out
      return [_Act(flow, a.axis, a.cmap, trail)] * n_out
    if name == "transpose" and ins[0] is a:
      perm = tuple(eqn.params["permutation"])
      return [_Act(flow, perm.index(a.axis), a.cmap, trail)]
    if name in ("reshape", "squeeze", "expand_dims") and ins[0] is a:
      return [self._reshape(a, in_shapes[0], out_shape)]
    if name in ("pad", "slice", "rev", "concatenate"):
      # Spatial padding, cropping, flipping or stacking keeps the channels
      # when the channel axis itself is untouched.
      same = all(len(s) == len(out_shape) and s[a.axis] == out_shape[a.axis]
                 for s in in_shapes if s)
      if name == "concatenate" and eqn.params["dimension"] == a.axis:
        same = False
      if same and all(x.axis == a.axis and _same_cmap(x.cmap, a.cmap)
                      for x in acts):
        return [_Act(flow, a.axis, a.cmap, trail)] * n_out
    # Anything else may mix channels.
    return [self._unaligned(flow, trail)] * n_out

  def _elementwise(self, eqn, ins, acts, flow, trail) -> _Act:
    self._note_norm(eqn, ins, acts)
    if eqn.primitive.name in _SUMS and len(acts) == 2:
      self._join(acts)
    # Operands other than activations and scalar literals may vary anywhere.
    uniform = frozenset.intersection(*[a.uniform for a in acts]) if all(
        isinstance(x, _Act) or isinstance(v, jcore.Literal)
        for x, v in zip(ins, eqn.invars)) else frozenset()
    aligned = [a for a in acts if a.axis is not None]
    if not aligned:
      return _Act(flow, None, None, trail, uniform)
    axis, cmap = aligned[0].axis, aligned[0].cmap
    same = all(a.axis == axis and _same_cmap(a.cmap, cmap) for a in aligned)
    if same and all(axis in a.uniform for a in acts if a.axis is None):
      return _Act(flow, axis, cmap, trail, uniform - {axis})
    return self._unaligned(flow, trail)

  def _broadcast(self, eqn, a: _Act, in_shape, out_shape) -> _Act:
    dims = tuple(eqn.params["broadcast_dimensions"])
    uniform = {d for d in range(len(out_shape)) if d not in dims}
    uniform |= {dims[i] for i in range(len(in_shape))
                if in_shape[i] == 1 and out_shape[dims[i]] != 1}
    uniform |= {dims[i] for i in a.uniform}
    if a.axis is None:
      return _Act(a.flow, None, None, a.trail, frozenset(uniform))
    axis = dims[a.axis]
    if out_shape[axis] != in_shape[a.axis]:
      return self._unaligned(a.flow, a.trail)
    return _Act(a.flow, axis, a.cmap, a.trail, frozenset(uniform) - {axis})

  def _dot_const(self, eqn, ins, a: _Act) -> _Act:
    """A contraction with a constant (not a variable): pooling or a kernel."""
    act_lhs = ins[0] is a
    other = ins[1] if act_lhs else ins[0]
    if isinstance(other, _Param):
      return self._dense(eqn, ins)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if a.axis is None or a.axis in (lc if act_lhs else rc):
      return self._unaligned(a.flow, a.trail)
    ranks = [len(v.aval.shape) for v in eqn.invars]
    free = [[d for d in range(ranks[k]) if d not in (lc, rc)[k] + (lb, rb)[k]]
            for k in (0, 1)]
    batch = lb if act_lhs else rb
    if a.axis in batch:
      axis = list(batch).index(a.axis)
    elif act_lhs:
      axis = len(lb) + free[0].index(a.axis)
    else:
      axis = len(lb) + len(free[0]) + free[1].index(a.axis)
    return _Act(a.flow, axis, a.cmap, a.trail)

  @staticmethod
  def _subjaxpr(eqn):
    """(jaxpr, consts) of a call-like primitive (jit, custom_jvp/vjp, remat)."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
      j = eqn.params.get(key)
      if isinstance(j, jcore.ClosedJaxpr):
        j, consts = j.jaxpr, [None] * len(j.consts)
      elif isinstance(j, jcore.Jaxpr):
        consts = [None] * len(j.constvars)
      else:
        continue
      if len(j.invars) == len(eqn.invars) and len(j.outvars) == len(
          eqn.outvars):
        return j, consts
    return None

  def _reshape(self, a: _Act, in_shape, out_shape) -> _Act:
    c = in_shape[a.axis]
    chan = a.cmap if a.cmap is not None else np.arange(c)
    idx = [1] * len(in_shape)
    idx[a.axis] = c
    ids = np.broadcast_to(chan.reshape(idx), in_shape).reshape(out_shape)
    # The channel axis of the result is the one along which the channel id
    # varies while staying constant along every other axis.
    for ax in reversed(range(len(out_shape))):
      cand = ids[tuple(slice(None) if i == ax else 0
                       for i in range(len(out_shape)))]
      shape = [1] * len(out_shape)
      shape[ax] = out_shape[ax]
      if np.all(ids == cand.reshape(shape)):
        cmap = None if np.array_equal(cand, np.arange(c)) else np.array(cand)
        return _Act(a.flow, ax, cmap, a.trail)
    return self._unaligned(a.flow, a.trail)

  def _kernel_of(self, w: Any, what: str) -> Path:
    kernels = sorted(s for s in (w.srcs if isinstance(w, _Param) else ())
                     if s[0] == "params" and s[-1] == "kernel")
    if len(kernels) != 1:
      raise ValueError(
          f"a {what} whose weight operand comes from {len(kernels)} "
          f"params/.../kernel variables ({kernels}); the structure needs "
          "exactly one (layers with image-dependent weights are unsupported)")
    return kernels[0]

  def _record(self, kernel: Path, kind: str, a: _Act, **info) -> Path:
    path = kernel[1:-1]
    if path in self.records:
      raise ValueError(f"layer {'.'.join(path)} is called more than once; "
                       "shared layers are unsupported")
    aligned = a.axis is not None
    if not aligned:
      self.mixed.update(a.flow)
    self.tie(a.flow)
    self.records[path] = dict(
        path=path, kind=kind, inputs=tuple(sorted(a.flow)), aligned=aligned,
        in_channel_map=(None if a.cmap is None else tuple(
            int(x) for x in a.cmap)),
        kernel_path=kernel, order=len(self.records), **info)
    return path

  def _conv(self, eqn, ins) -> _Act:
    lhs, rhs = ins
    if not isinstance(lhs, _Act) or isinstance(rhs, _Act):
      raise ValueError("a convolution whose weights depend on the image is "
                       "unsupported by the structure analysis")
    kernel = self._kernel_of(rhs, "convolution")
    dn = eqn.params["dimension_numbers"]
    lshape = eqn.invars[0].aval.shape
    rshape = eqn.invars[1].aval.shape
    oshape = eqn.outvars[0].aval.shape
    if lhs.axis != dn.lhs_spec[1]:
      lhs = self._unaligned(lhs.flow, lhs.trail)
    ksize = tuple(rshape[d] for d in dn.rhs_spec[2:])
    out_hw = tuple(oshape[d] for d in dn.out_spec[2:])
    in_f, out_f = lshape[dn.lhs_spec[1]], oshape[dn.out_spec[1]]
    # Every output element costs one multiply-accumulate per kernel entry of
    # its filter (I/groups * kh * kw); the batch is one image.
    macs = int(np.prod(out_hw)) * int(np.prod(rshape))
    path = self._record(
        kernel, "conv", lhs, in_features=in_f, out_features=out_f,
        kernel_size=ksize, strides=tuple(eqn.params["window_strides"]),
        in_hw=tuple(lshape[d] for d in dn.lhs_spec[2:]), out_hw=out_hw,
        macs=macs, params=int(np.prod(rshape)))
    return _Act(frozenset({path}), dn.out_spec[1], None, lhs.trail + (path,))

  def _dense(self, eqn, ins) -> _Act:
    lhs, rhs = ins
    x_first = isinstance(lhs, _Act)
    x, w = (lhs, rhs) if x_first else (rhs, lhs)
    kernel = self._kernel_of(w, "dot_general")
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    xc = lc if x_first else rc
    xshape = eqn.invars[0 if x_first else 1].aval.shape
    wshape = eqn.invars[1 if x_first else 0].aval.shape
    oshape = eqn.outvars[0].aval.shape
    if lb or rb or len(xc) != 1 or x.axis != xc[0]:
      x = self._unaligned(x.flow, x.trail)
    in_f = int(np.prod([xshape[d] for d in xc]))
    out_f = int(np.prod(wshape)) // in_f
    macs = int(np.prod(oshape)) // xshape[0] * in_f
    path = self._record(kernel, "dense", x, in_features=in_f,
                        out_features=out_f, kernel_size=(1, 1),
                        strides=(1, 1), in_hw=(1, 1), out_hw=(1, 1),
                        macs=macs, params=int(np.prod(wshape)))
    # dot_general output: x's free dims then w's free dims; units are last.
    return _Act(frozenset({path}), len(oshape) - 1, None, x.trail + (path,))

  def _note_norm(self, eqn, ins, acts) -> None:
    """Records a norm the first time its variables meet an activation."""
    for p in ins:
      if not isinstance(p, _Param):
        continue
      for src in sorted(p.srcs):
        module = src[1:-1]
        if module in self.norm_modules and module not in self.records:
          a = acts[0]
          # A norm normalises its last axis (also when the channels reaching
          # it are not aligned, e.g. after a channel concatenation).
          c = eqn.outvars[0].aval.shape[
              a.axis if a.axis is not None else -1]
          self.records[module] = dict(
              path=module, kind="norm", inputs=tuple(sorted(a.flow)),
              aligned=a.axis is not None, in_channel_map=None,
              kernel_path=("params",) + module + ("scale",),
              order=len(self.records), in_features=c, out_features=c,
              kernel_size=(1, 1), strides=(1, 1), in_hw=(0, 0),
              out_hw=(0, 0), macs=0, params=0)

  def _join(self, acts: list[_Act]) -> None:
    """A residual sum: split the two trails into main branch and shortcut."""
    t1, t2 = acts[0].trail, acts[1].trail
    k = 0
    while k < min(len(t1), len(t2)) and t1[k] == t2[k]:
      k += 1
    e1, e2 = t1[k:], t2[k:]
    if not e1 and not e2:
      return
    if len(e1) < len(e2) or (len(e1) == len(e2) and e1 and e2 and
                             self.records[e1[-1]]["order"] <
                             self.records[e2[-1]]["order"]):
      e1, e2 = e2, e1
    self.blocks.append(dict(main=e1, shortcut=e2,
                            flow=acts[0].flow | acts[1].flow))


def _leaf_path(kp) -> Path:
  return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)


@functools.lru_cache(maxsize=64)
def _analyze(model, hw: tuple[int, int], channels: int) -> ModelStructure:
  x = jax.ShapeDtypeStruct((1,) + hw + (channels,), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  paths = [_leaf_path(kp) for kp, _ in leaves]
  norm_modules = frozenset(p[1:-1] for p in paths
                           if p[0] == "params" and p[-1] == "scale")
  closed = jax.make_jaxpr(
      lambda v, x: model.apply(v, x, train=False))(variables, x)
  walker = _Walker(norm_modules)
  args = [_Param(frozenset({p})) for p in paths] + [
      _Act(frozenset(), 3, None, ())]
  outs = walker.run(closed.jaxpr, [None] * len(closed.consts), args)
  out_flow = frozenset().union(*[o.flow for o in outs if isinstance(o, _Act)])
  walker.tie(out_flow)

  param_count = {p: int(np.prod(l.shape)) for p, (_, l) in zip(paths, leaves)
                 if p[0] == "params"}
  recs = walker.records
  producers = [p for p, r in recs.items() if r["kind"] != "norm"]
  # Norm following each producer: the first norm fed by exactly that producer.
  for p, r in recs.items():
    module_params = sum(n for q, n in param_count.items() if q[1:-1] == p)
    r["params"] = module_params
    if r["kind"] == "norm" and len(r["inputs"]) == 1 and r["aligned"]:
      prod = recs[r["inputs"][0]]
      if prod.get("norm") is None:
        prod["norm"] = p
  for r in recs.values():
    if r["kind"] == "norm" and len(r["inputs"]) == 1:
      prod = recs[r["inputs"][0]]
      r["in_hw"] = r["out_hw"] = prod["out_hw"]
  # Spaces.
  groups: dict[Path, set[Path]] = {}
  for p in producers:
    groups.setdefault(walker.find(p), set()).add(p)
  spaces = tuple(frozenset(g) for g in sorted(
      groups.values(), key=lambda g: min(recs[p]["order"] for p in g)))
  space_index = {p: i for i, s in enumerate(spaces) for p in s}
  # Blocks.
  blocks = []
  for b in walker.blocks:
    main = tuple((c, recs[c].get("norm")) for c in b["main"])
    short = (b["shortcut"][-1], recs[b["shortcut"][-1]].get("norm")) if (
        b["shortcut"]) else None
    for c in b["shortcut"]:
      recs[c]["shortcut"] = True
      if recs[c].get("norm"):
        recs[recs[c]["norm"]]["shortcut"] = True
    recs[b["main"][-1]]["block_last"] = True
    some = next(iter(b["flow"]), None)
    blocks.append(Block(main, short, space_index.get(some, -1)))
  convs = [p for p in producers if recs[p]["kind"] == "conv"]
  if convs:
    recs[convs[0]]["stem"] = True
  for p in convs:
    r = recs[p]
    r["takes_part"] = not r.get("stem") and not r.get("shortcut")
  # Dense layers take part when the model gives them DSP gates (the vision
  # transformers' MLP fc1 / fc2 built with ``groups``).
  gated = frozenset(p[1:-1] for p in paths if p[0] == "gates")
  for p in producers:
    if recs[p]["kind"] == "dense" and p in gated:
      recs[p]["takes_part"] = True
  layers = {p: LayerInfo(**r) for p, r in recs.items()}
  return ModelStructure(layers=layers, blocks=tuple(blocks), spaces=spaces,
                        outputs=out_flow, mixed=frozenset(walker.mixed),
                        input_shape=hw + (channels,),
                        mixed_by=dict(walker.mixed_by),
                        activation_macs=walker.activation_macs)


def analyze(model, image_size: int | Sequence[int] = 32,
            channels: int | None = None) -> ModelStructure:
  """Channel-flow structure of ``model`` for one ``image_size`` image.

  The result is cached per (model, shape); Flax modules are hashable
  dataclasses, so equal models share one structure.

  Args:
    model: a Flax module called as ``model.apply(variables, x, train=False)``
      with NHWC images.
    image_size: height = width, or (height, width).
    channels: image channels (None: the model's, ``layers.input_channels``).

  Returns:
    The ``ModelStructure``.
  """
  hw = (image_size, image_size) if isinstance(image_size, int) else tuple(
      int(s) for s in image_size)
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f"image_size must be an int or (height, width), got "
                     f"{image_size!r}")
  if channels is None:
    channels = input_channels(model)
  return _analyze(model, hw, int(channels))


# --------------------------------------------------------------------------
# Dead channels.


def _lookup(tree: Mapping[str, Any] | None, path: Path) -> Any:
  """``tree[path[0]][path[1]]...``, or None when absent."""
  node = tree
  for k in path:
    if not isinstance(node, Mapping) or k not in node:
      return None
    node = node[k]
  return node


def _concrete(x: Any) -> Any:
  """None for an abstract leaf (``jax.eval_shape`` output): values unknown."""
  return None if isinstance(x, jax.ShapeDtypeStruct) else x


def connectivity(layer: LayerInfo, masks: Mapping[str, Any] | None,
                 params: Mapping[str, Any] | None = None) -> np.ndarray:
  """Boolean (in_features, out_features): which kernels (i, o) are nonzero.

  Args:
    layer: a conv or dense layer.
    masks: the ``masks`` collection (None: dense).
    params: the ``params`` collection; when given, a kernel also counts as
      removed when all its weights are zero (``sum_hw |W * mask| == 0``, the
      reference's survival test). Abstract leaves (``jax.ShapeDtypeStruct``)
      of either tree count as dense.

  Returns:
    The boolean matrix.
  """
  if layer.kind == "norm":
    raise ValueError(f"{layer.name} is a norm; connectivity is for conv/dense")
  conn = np.ones((layer.in_features, layer.out_features), bool)
  mask = _concrete(_lookup(masks, layer.path + ("kernel",)))
  if mask is not None:
    conn &= np.asarray(mask).reshape(conn.shape) != 0
  kernel = _concrete(_lookup(params, layer.kernel_path[1:]))
  if kernel is not None:
    w = np.abs(np.asarray(kernel, np.float64))
    w = w.reshape((-1,) + conn.shape).sum(axis=0)
    conn &= w > 0
  return conn


def norm_alive(layer: LayerInfo, masks: Mapping[str, Any] | None,
               params: Mapping[str, Any] | None = None) -> np.ndarray:
  """Boolean (features,): norm channels whose input still matters.

  A channel whose mask (or, given ``params``, whose masked scale) is zero
  outputs its bias whatever its input is.
  """
  alive = np.ones((layer.out_features,), bool)
  mask = _concrete(_lookup(masks, layer.path + ("scale",)))
  if mask is not None:
    alive &= np.asarray(mask) != 0
  scale = _concrete(_lookup(params, layer.path + ("scale",)))
  if scale is not None:
    alive &= np.asarray(scale) != 0
  return alive


def dead_channels(structure: ModelStructure,
                  masks: Mapping[str, Any] | None,
                  params: Mapping[str, Any] | None = None,
                  propagate: bool = True) -> dict[Path, np.ndarray]:
  """Output channels of every conv/dense layer that cannot affect the logits.

  The rule (backward, conservative, deterministic): channel ``c`` of
  producer ``p`` is dead when

  * ``p``'s channels reach neither the model output directly nor anything
    that mixes channels (``structure.mixed``), and
  * either the norm right after ``p`` ignores its input at ``c`` (mask or
    scale zero: it then outputs its bias whatever ``p`` computes), or channel
    ``c`` of ``p``'s residual space is read by no consumer: for every
    conv/dense layer reading the space, every input column carrying ``c`` is
    zero in every output channel that is itself alive.

  With ``propagate`` the last condition is iterated to a fixed point (a
  consumer's dead output rows no longer keep its input columns alive);
  without it only the masks count (one pass). A channel that is alive but
  constant (an emptied filter followed by a norm bias) is not dead: its
  consumers see the constant.

  Args:
    structure: from ``analyze``.
    masks: the ``masks`` collection (kernel masks (in, out), norm masks).
    params: the ``params`` collection; when given, zero weights count as
      removed as well.
    propagate: iterate to the fixed point.

  Returns:
    Producer path -> boolean vector (out_features,), True where dead.
  """
  producers = structure.producers
  conn = {l.path: connectivity(l, masks, params) for l in producers}
  keep_norm = {l.path: norm_alive(structure[l.norm], masks, params)
               for l in producers if l.norm is not None}
  readers: dict[int, list[LayerInfo]] = {}
  index = {p: i for i, s in enumerate(structure.spaces) for p in s}
  for l in producers:
    if l.inputs:
      readers.setdefault(index[l.inputs[0]], []).append(l)
  pinned = {i for i, s in enumerate(structure.spaces)
            if s & (structure.outputs | structure.mixed)}
  alive_out = {l.path: np.ones((l.out_features,), bool) for l in producers}
  while True:
    used = {}
    for i, space in enumerate(structure.spaces):
      width = structure[next(iter(space))].out_features
      if i in pinned:
        used[i] = np.ones((width,), bool)
        continue
      u = np.zeros((width,), bool)
      for q in readers.get(i, []):
        col = (conn[q.path] & alive_out[q.path][None, :]).any(axis=1)
        np.logical_or.at(u, q.channel_map(), col)
      used[i] = u
    dead = {}
    for l in producers:
      d = ~used[index[l.path]]
      if l.path in keep_norm and l.path not in structure.mixed:
        d = d | ~keep_norm[l.path]
      if l.path in structure.outputs or l.path in structure.mixed:
        d = np.zeros_like(d)
      dead[l.path] = d
    changed = any(np.any(alive_out[p] != ~d) for p, d in dead.items())
    alive_out = {p: ~d for p, d in dead.items()}
    if not propagate or not changed:
      return dead


def zero_dead(structure: ModelStructure, params: Mapping[str, Any],
              dead: Mapping[Path, np.ndarray]) -> dict[str, Any]:
  """``params`` with the kernel slices and biases of dead channels zeroed.

  Norms are left alone (a norm after a dead channel may still emit its
  bias into a live residual space).

  Args:
    structure: from ``analyze``.
    params: the ``params`` collection.
    dead: from ``dead_channels``.

  Returns:
    A new ``params`` tree.
  """
  out = dict(params)

  def put(path: Path, value) -> None:
    node = out
    for k in path[:-1]:
      node[k] = dict(node[k])
      node = node[k]
    node[path[-1]] = value

  for p, d in dead.items():
    if not np.any(d):
      continue
    keep = jnp.asarray(~d)
    layer = structure[p]
    kernel = _lookup(params, layer.kernel_path[1:])
    put(layer.kernel_path[1:], kernel * keep.astype(kernel.dtype))
    bias = _lookup(params, p + ("bias",))
    if bias is not None:
      put(p + ("bias",), bias * keep.astype(bias.dtype))
  return out
