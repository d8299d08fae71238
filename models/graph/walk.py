"""The walk: abstract interpretation of a model's jaxpr over channels.

Every jaxpr input is labelled with its variable path (``('params',
'stage_1', '0', 'conv_a', 'kernel')``) or as the image. Values that depend
only on variables are ``_Param`` (their source leaves); values that depend on
the image are ``_Act``: which axis carries channels, and for every position
along it the *global channel id* (``gid``: producer block + channel) and the
*ref* of the channel-program node that computes it (``models.graph.program``).

* A convolution (``conv_general_dilated``) or dense layer (``dot_general``
  with a variable) is the module owning the kernel leaf that flows into its
  weight operand. A full one (``feature_group_count == 1``) *produces* new
  channels; a depthwise one (groups == input == output channels) passes its
  input channels on (they are coupled); a grouped one produces new channels
  and reads its input channels in full.
* Variables that meet an activation channel by channel become program
  nodes: a module owning a 1-D ``scale`` (or batch statistics) is a *norm*
  (all its variables' operations fold into one node); any other per-channel
  variable an *affine* node. A producer's own bias folds into its output.
* Elementwise operations keep the channels; a sum (or product) of two
  activations *couples* their channels (a residual join ties the producers
  into one "space"); a concatenation along channels concatenates the
  channel ids; reductions, pooling, reshapes, transposes, slices and pads
  move or keep them.
* Statistics over channels broadcast back (LayerNorm, GroupNorm) keep the
  channels aligned but read every channel (``READS_ALL``). Known operations
  that mix channels by design (two activations contracted, as attention
  does; a grouped convolution's input; a reshape that splits the channel
  axis) lose the alignment (``MIXES``); anything else the walk does not know
  loses it as ``UNKNOWN`` and is an error when a method needs those channels.
* Residual blocks come from the sums: each activation remembers the trail of
  producers along its longest path; at a sum the part of the longer trail
  after the common prefix is the main branch and that of the shorter trail
  the shortcut. With two branches of equal length the one holding the
  later-called producer is the shortcut.
* ``name`` equations of the primitive ``checkpoint_name`` written by the
  tracer (``out:<module path>``) mark every module call's output, so that a
  method acting on a module's output (DDROP) knows what that output carries.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.extend.core as jcore
import numpy as np

from models.graph import program as prog

Path = tuple[str, ...]

# Categories of a producer's channels reaching something that reads them in
# full (see the module docstring).
READS_ALL = "reads_all"
MIXES = "mixes"
UNKNOWN = "unknown"

OUTPUT_TAG = "out:"

# Elementwise primitives: channels pass through, operands merge.
ELEMENTWISE = frozenset({
    "abs", "add", "add_any", "and", "clamp", "convert_element_type", "copy",
    "copy_p", "cos", "div", "eq", "erf", "erfc", "erf_inv", "exp", "exp2",
    "expm1", "ge", "gt", "integer_pow", "is_finite", "le", "log", "log1p",
    "logistic", "lt", "max", "min", "mul", "ne", "neg", "not", "or", "pow",
    "reduce_precision", "rem", "round", "rsqrt", "select_n", "sign", "sin",
    "sqrt", "square", "stop_gradient", "sub", "tan", "tanh", "floor", "ceil",
    "nextafter", "cbrt", "atan2", "optimization_barrier",
})
# Elementwise primitives that are the identity on values.
_IDENTITY = frozenset({"convert_element_type", "copy", "copy_p",
                       "reduce_precision", "stop_gradient",
                       "optimization_barrier"})
_SUMS = frozenset({"add", "add_any", "sub"})
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min",
                         "reduce_prod", "argmax", "argmin", "reduce_and",
                         "reduce_or"})
_WINDOW_REDUCTIONS = frozenset({"reduce_window_sum", "reduce_window_max",
                                "reduce_window_min", "reduce_window"})


@dataclasses.dataclass(frozen=True)
class _Param:
  """A value computed from variables only; ``srcs`` are their leaf paths."""
  srcs: frozenset[Path]


@dataclasses.dataclass(frozen=True, eq=False)
class _Act:
  """A value that depends on the image.

  ``axis``: the axis carrying channels (None: not channel-aligned); ``gid``
  and ``ref``: per position along it, the global channel id and the program
  ref; ``flow``: producers whose channels reach it; ``trail``: producers
  along the longest path from the image; ``uniform``: axes along which the
  value is constant (a broadcast statistic); ``norm``: the norm module whose
  operations are still being folded into the node ``ref`` points at.
  """
  axis: int | None
  gid: np.ndarray | None
  ref: np.ndarray | None
  flow: frozenset[Path]
  trail: tuple[Path, ...]
  uniform: frozenset[int] = frozenset()
  norm: Path | None = None

  @property
  def aligned(self) -> bool:
    return self.axis is not None


class WalkError(ValueError):
  """The model cannot be traced into a channel graph (a clear message)."""


class Walker:
  """Walks one jaxpr; the results are its attributes (see ``run``).

  Args:
    norm_modules: modules owning a 1-D ``params`` leaf named ``scale`` or
      ``batch_stats`` leaves (norms).
    centring: modules with batch statistics (they centre per channel).
    leaf_shapes: shape of every variable leaf, by path.
  """

  IMAGE: Path = ("<image>",)

  def __init__(self, norm_modules: frozenset[Path],
               centring: frozenset[Path],
               leaf_shapes: dict[Path, tuple[int, ...]]):
    self.norm_modules = norm_modules
    self.centring = centring
    self.leaf_shapes = leaf_shapes
    self.records: dict[Path, dict[str, Any]] = {}
    self.nodes: list[prog.Node] = []
    self.layer_inputs: dict[Path, np.ndarray | None] = {}
    # producer path -> gid base; union-find parent over producer paths
    self.base: dict[Path, int] = {}
    self.width: dict[Path, int] = {}
    self.parent: dict[Path, Path] = {}
    self.mixed: dict[Path, tuple[str, str]] = {}
    self.blocks: list[dict[str, Any]] = []
    self.module_out: dict[Path, _Act] = {}
    self.affine: dict[Path, dict[str, Any]] = {}
    self.activation_macs = 0
    self._next_gid = 0
    self._bases: list[tuple[int, Path]] = []

  # ---------------------------------------------------------- bookkeeping
  def _new_block(self, path: Path, width: int) -> np.ndarray:
    self.base[path] = self._next_gid
    self.width[path] = width
    self._bases.append((self._next_gid, path))
    self._next_gid += width
    self.parent[path] = path
    return self.base[path] + np.arange(width, dtype=np.int64)

  def owner(self, gid: np.ndarray) -> tuple[list[Path], np.ndarray]:
    """(producer path per position, channel per position) of gids."""
    starts = np.array([b for b, _ in self._bases], np.int64)
    k = np.searchsorted(starts, gid, side="right") - 1
    paths_ = [self._bases[i][1] for i in k]
    chan = gid - starts[k]
    return paths_, chan

  def find(self, p: Path) -> Path:
    while self.parent[p] != p:
      self.parent[p] = self.parent[self.parent[p]]
      p = self.parent[p]
    return p

  def _tie(self, a: Path, b: Path) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[rb] = ra

  def _node(self, kind: str, size: int, inputs: Sequence[np.ndarray] = (),
            gid: np.ndarray | None = None, **kw) -> np.ndarray:
    self.nodes.append(prog.Node(kind, size, tuple(
        np.asarray(r, np.int64) for r in inputs), gid=gid, **kw))
    return prog.ref(len(self.nodes) - 1, np.arange(size))

  def _mark(self, flow: Iterable[Path], category: str, primitive: str
            ) -> None:
    order = {READS_ALL: 0, MIXES: 1, UNKNOWN: 2}
    for p in flow:
      if p == self.IMAGE:
        continue
      old = self.mixed.get(p)
      if old is None or order[category] > order[old[0]]:
        self.mixed[p] = (category, primitive)

  def _unaligned(self, a: _Act, category: str, primitive: str) -> _Act:
    """``a`` with its channel alignment lost; its channels are read in full.

    Only the loss is recorded: an activation that is already unaligned was
    marked when it lost its alignment.
    """
    if a.aligned:
      self._node("sink", len(a.ref), (a.ref,), gid=a.gid)
      self._mark(a.flow, category, primitive)
    return _Act(None, None, None, a.flow, a.trail)

  # ----------------------------------------------------------------- walk
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
      outs = self._eqn(eqn, ins)
      for v, o in zip(eqn.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def image(self, channels: int, axis: int = 3) -> _Act:
    gid = self._new_block(self.IMAGE, channels)
    ref = self._node("input", channels, gid=gid)
    return _Act(axis, gid, ref, frozenset({self.IMAGE}), ())

  def _eqn(self, eqn, ins: list[Any]) -> list[Any]:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    acts = [a for a in ins if isinstance(a, _Act)]
    if not acts:
      # Variables only (BN scale folding, mask products): their sources.
      srcs = frozenset().union(*[a.srcs for a in ins if isinstance(a, _Param)])
      return [_Param(srcs) if srcs else None] * n_out
    if name == "name":
      return [self._tag(eqn, acts[0])]
    unary = self._unary_function(eqn, ins, acts)
    if unary is not None:
      return [unary]
    sub = call_body(eqn)
    if sub is not None:
      return self.run(sub[0], [None] * len(sub[1]), ins)
    if name == "conv_general_dilated":
      return [self._conv(eqn, ins)]
    flow = frozenset().union(*[a.flow for a in acts])
    trail = max((a.trail for a in acts), key=len)
    in_shapes = [v.aval.shape for v in eqn.invars]
    out_shape = eqn.outvars[0].aval.shape
    if name in ELEMENTWISE:
      return [self._elementwise(eqn, ins, acts, flow, trail)] * n_out
    if name == "broadcast_in_dim" and ins[0] is acts[0]:
      return [self._broadcast(eqn, acts[0], in_shapes[0], out_shape)]
    if name == "dot_general" and len(acts) == 1:
      return [self._dot_one(eqn, ins, acts[0])]
    if name == "dot_general" and len(acts) == 2:
      # Two activations contracted (attention's q.k and weights.v): MACs
      # without weights to prune; the channels are mixed by design.
      (lc, _), _ = eqn.params["dimension_numbers"]
      self.activation_macs += int(np.prod(out_shape)) * int(
          np.prod([in_shapes[0][d] for d in lc]))
      for a in acts:
        self._unaligned(a, MIXES, name)
      return [_Act(None, None, None, flow, trail)] * n_out
    a = acts[0]
    if not a.aligned:
      for x in acts:
        self._unaligned(x, UNKNOWN, name)
      return [_Act(None, None, None, flow, trail)] * n_out
    if name in _REDUCTIONS and ins[0] is a:
      red = tuple(eqn.params["axes"])
      if a.axis in red:
        # A statistic over channels; what it meets decides (see _stat).
        out = self._unaligned(a, READS_ALL, name)
        return [out] * n_out
      axis = a.axis - sum(1 for r in red if r < a.axis)
      ref = a.ref
      if name == "reduce_sum":
        n = int(np.prod([in_shapes[0][r] for r in red]))
        ref = self._node("scale", len(a.ref), (a.ref,), gid=a.gid,
                         factor=float(n))
      return [dataclasses.replace(a, axis=axis, ref=ref, norm=None,
                                  uniform=frozenset())] * n_out
    if name in _WINDOW_REDUCTIONS and ins[0] is a:
      dims = eqn.params["window_dimensions"]
      strides = eqn.params["window_strides"]
      if dims[a.axis] != 1 or strides[a.axis] != 1 or (
          out_shape[a.axis] != in_shapes[0][a.axis]):
        return [self._unaligned(a, MIXES, name)] * n_out
      ref = a.ref
      if name != "reduce_window_max":
        # Sums over windows (average pooling) may include padding.
        ref = self._node("pad", len(a.ref), (a.ref,), gid=a.gid)
      return [dataclasses.replace(a, ref=ref, norm=None)] * n_out
    if name == "transpose" and ins[0] is a:
      perm = tuple(eqn.params["permutation"])
      return [dataclasses.replace(a, axis=perm.index(a.axis), norm=None)]
    if name in ("reshape", "squeeze", "expand_dims") and ins[0] is a:
      return [self._reshape(a, in_shapes[0], out_shape, name)]
    if name in ("pad", "slice", "rev", "concatenate"):
      out = self._structural(eqn, name, ins, acts, a, in_shapes, out_shape,
                             flow, trail)
      if out is not None:
        return [out] * n_out
    # Anything else: the walk cannot follow the channels.
    for x in acts:
      self._unaligned(x, UNKNOWN, name)
    return [_Act(None, None, None, flow, trail)] * n_out

  # ------------------------------------------------------- module outputs
  def _tag(self, eqn, a: _Act) -> _Act:
    tag = str(eqn.params.get("name", ""))
    if tag.startswith(OUTPUT_TAG):
      path = tuple(p for p in tag[len(OUTPUT_TAG):].split("/") if p)
      if path:
        self.module_out.setdefault(path, a)
      return dataclasses.replace(a, norm=None)
    return a

  # ------------------------------------------------ elementwise functions
  def _unary_function(self, eqn, ins, acts) -> _Act | None:
    """An elementwise function of one activation and constants: an ``act``
    node evaluating the equation itself (its own JVP rules included)."""
    if len(acts) != 1 or eqn.primitive.name in ("name",):
      return None
    a = acts[0]
    if not a.aligned or len(eqn.outvars) != 1:
      return None
    # Every other operand must be a literal (a constant of the program).
    if any(x is not a and not isinstance(v, jcore.Literal)
           for v, x in zip(eqn.invars, ins)):
      return None
    out_shape = eqn.outvars[0].aval.shape
    x_var = eqn.invars[ins.index(a)]
    if tuple(x_var.aval.shape) != tuple(out_shape):
      return None
    name = eqn.primitive.name
    if name in _IDENTITY:
      return a
    if name not in ELEMENTWISE and not _is_elementwise_call(eqn):
      return None
    fn = _equation_function(eqn, ins.index(a), a.axis)
    ref = self._node("act", len(a.ref), (a.ref,), gid=a.gid, fn=fn)
    return dataclasses.replace(a, ref=ref, norm=None, uniform=frozenset())

  def _elementwise(self, eqn, ins, acts, flow, trail) -> _Act:
    name = eqn.primitive.name
    params = [x for x in ins if isinstance(x, _Param)]
    aligned = [a for a in acts if a.aligned]
    if len(acts) == 1 and aligned and params:
      return self._with_variables(eqn, ins, acts[0], params)
    if name in _SUMS and len(acts) == 2:
      self._join(acts)
    uniform = frozenset.intersection(*[a.uniform for a in acts]) if all(
        isinstance(x, _Act) or isinstance(v, jcore.Literal)
        for x, v in zip(ins, eqn.invars)) else frozenset()
    if not aligned:
      return _Act(None, None, None, flow, trail, uniform)
    base = aligned[0]
    others = [a for a in acts if a is not base]
    if not others:
      # One activation with non-literal constants: its values are not
      # modelled, its channels stay.
      ref = self._node("opaque", len(base.ref), (base.ref,),
                       gid=base.gid)
      return dataclasses.replace(base, ref=ref, norm=None)
    if all(a.aligned for a in acts):
      # Two aligned activations: their channels are coupled.
      if not all(self._couple(base, a, name) for a in others):
        for a in acts:
          self._unaligned(a, MIXES, name)
        return _Act(None, None, None, flow, trail)
      kind = ("sum" if name in _SUMS else "prod" if name == "mul"
              else "opaque")
      ref = self._node(kind, len(base.ref), [a.ref for a in acts],
                       gid=base.gid)
      return _Act(base.axis, base.gid, ref, flow, trail, uniform - {
          base.axis})
    # An aligned activation and a statistic (unaligned): LayerNorm's
    # centring and scaling, GroupNorm's. The statistic must come from the
    # same channels (or be uniform across them); it reads them all.
    unaligned = [a for a in acts if not a.aligned]
    if all(a.flow <= base.flow or base.axis in a.uniform for a in unaligned):
      ref = base.ref
      if not (self.nodes[int(ref[0] >> prog.SHIFT)].kind == "stat"
              and base.norm is None):
        ref = self._node("stat", len(base.ref), (base.ref,),
                         gid=base.gid)
      return _Act(base.axis, base.gid, ref, flow, trail,
                  uniform - {base.axis})
    for a in acts:
      self._unaligned(a, UNKNOWN, name)
    return _Act(None, None, None, flow, trail)

  def _with_variables(self, eqn, ins, a: _Act, params) -> _Act:
    """One activation meeting variables: a bias, a norm or an affine."""
    srcs = sorted(frozenset().union(*[p.srcs for p in params]))
    modules = {s[1:-1] for s in srcs}
    # A producer's own bias (or a depthwise conv's) folds into its output.
    if len(modules) == 1:
      module = next(iter(modules))
      rec = self.records.get(module)
      if rec is not None and rec["kind"] in ("conv", "dense") and (
          self._is_output_of(a, module)):
        if eqn.primitive.name in ("add", "add_any"):
          rec["has_bias"] = True
        return a
      if module in self.norm_modules:
        return self._norm(eqn, a, module)
    if len(srcs) == 1 and eqn.primitive.name in ("mul", "add", "sub"):
      leaf = srcs[0]
      shape = self.leaf_shapes.get(leaf, ())
      out_shape = eqn.outvars[0].aval.shape
      if len(shape) >= 1 and int(np.prod(shape)) == out_shape[a.axis]:
        op = "mul" if eqn.primitive.name == "mul" else "add"
        if eqn.primitive.name == "sub":
          op = "opaque"
        if op != "opaque":
          self.affine.setdefault(leaf, dict(
              leaf=leaf, gid=a.gid, order=len(self.records) + len(
                  self.affine)))
          ref = self._node("affine", len(a.ref), (a.ref,), gid=a.gid, leaf=leaf,
                           op=op,
                           index=np.arange(len(a.ref)))
          return dataclasses.replace(a, ref=ref, norm=None,
                                     uniform=frozenset())
    # Variables that vary along other axes (positional embeddings) or mix:
    # the channels stay aligned, their values are not modelled.
    ref = self._node("opaque", len(a.ref), (a.ref,), gid=a.gid)
    return dataclasses.replace(a, ref=ref, norm=None, uniform=frozenset())

  def _is_output_of(self, a: _Act, module: Path) -> bool:
    node = self.nodes[int(a.ref[0] >> prog.SHIFT)]
    return node.kind in ("source", "depthwise") and node.layer == module

  def _norm(self, eqn, a: _Act, module: Path) -> _Act:
    """A norm module's operation: one ``norm`` node per call."""
    if a.norm == module:
      return a  # another of its operations (centre, scale, shift)
    if module in self.records:
      raise WalkError(f"norm {'.'.join(module)} is called more than once; "
                      "shared layers are unsupported")
    c = eqn.outvars[0].aval.shape[a.axis]
    ref = self._node("norm", c, (a.ref,), gid=a.gid, layer=module,
                     index=np.arange(c), centres=module in self.centring)
    src = self.nodes[int(a.ref[0] >> prog.SHIFT)]
    follows = None
    if src.kind == "source" and np.array_equal(
        a.ref & prog.ELEMENT, np.arange(src.size)) and len(
            set((a.ref >> prog.SHIFT).tolist())) == 1:
      follows = src.layer
    self.records[module] = dict(
        path=module, kind="norm", gid=a.gid, in_ref=a.ref,
        node=len(self.nodes) - 1, follows=follows,
        inputs=tuple(sorted(p for p in a.flow if p != self.IMAGE)),
        order=len(self.records), in_features=c, out_features=c,
        kernel_size=(1, 1), strides=(1, 1), in_hw=(0, 0), out_hw=(0, 0),
        macs=0, params=0, feature_groups=1, depthwise=False,
        kernel_path=("params",) + module + ("scale",))
    return dataclasses.replace(a, ref=ref, norm=module, uniform=frozenset())

  def _couple(self, base: _Act, other: _Act, primitive: str) -> bool:
    """Ties the channels of two aligned operands; False if they disagree."""
    if base.axis != other.axis or len(base.gid) != len(other.gid):
      return False
    if np.array_equal(base.gid, other.gid):
      return True
    pa, ca = self.owner(base.gid)
    pb, cb = self.owner(other.gid)
    if not np.array_equal(ca, cb):
      return False
    pairs = sorted(set(zip(pa, pb)))
    for x, y in pairs:
      # Only whole producers of equal width are tied channel by channel.
      if self.width[x] != self.width[y]:
        return False
    for x, y in pairs:
      self._tie(x, y)
    return True

  def _broadcast(self, eqn, a: _Act, in_shape, out_shape) -> _Act:
    dims = tuple(eqn.params["broadcast_dimensions"])
    uniform = {d for d in range(len(out_shape)) if d not in dims}
    uniform |= {dims[i] for i in range(len(in_shape))
                if in_shape[i] == 1 and out_shape[dims[i]] != 1}
    uniform |= {dims[i] for i in a.uniform}
    if not a.aligned:
      return _Act(None, None, None, a.flow, a.trail, frozenset(uniform))
    axis = dims[a.axis]
    if out_shape[axis] != in_shape[a.axis]:
      return self._unaligned(a, MIXES, "broadcast_in_dim")
    return dataclasses.replace(a, axis=axis, uniform=frozenset(uniform) -
                               {axis})

  # --------------------------------------------------------------- layers
  def _dot_one(self, eqn, ins, a: _Act) -> _Act:
    """A contraction of one activation with a variable (a dense layer) or a
    constant (pooling)."""
    act_lhs = ins[0] is a
    other = ins[1] if act_lhs else ins[0]
    if isinstance(other, _Param):
      return self._dense(eqn, ins)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if not a.aligned or a.axis in (lc if act_lhs else rc):
      return self._unaligned(a, MIXES, "dot_general")
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
    ref = self._node("opaque", len(a.ref), (a.ref,), gid=a.gid)
    return dataclasses.replace(a, axis=axis, ref=ref, norm=None)

  def _kernel_of(self, w: Any, what: str, ndim: int) -> Path:
    cands = sorted(s for s in (w.srcs if isinstance(w, _Param) else ())
                   if s[0] == "params" and len(self.leaf_shapes.get(s, ()))
                   == ndim)
    if len(cands) != 1:
      raise WalkError(
          f"a {what} whose weight comes from {len(cands)} {ndim}-D params "
          f"variables ({['/'.join(c) for c in cands]}); the graph needs "
          "exactly one (layers with image-dependent weights are unsupported)")
    return cands[0]

  def _record(self, kernel: Path, kind: str, a: _Act, **info) -> Path:
    path = kernel[1:-1]
    if path in self.records:
      raise WalkError(f"layer {'.'.join(path)} is called more than once; "
                      "shared layers are unsupported")
    self.records[path] = dict(
        path=path, kind=kind, gid=a.gid if a.aligned else None,
        in_ref=a.ref if a.aligned else None,
        inputs=tuple(sorted(p for p in a.flow if p != self.IMAGE)),
        reads_image=self.IMAGE in a.flow,
        kernel_path=kernel, order=len(self.records), **info)
    self.layer_inputs[path] = a.ref if a.aligned else None
    return path

  def _conv(self, eqn, ins) -> _Act:
    lhs, rhs = ins
    if not isinstance(lhs, _Act) or isinstance(rhs, _Act):
      raise WalkError("a convolution whose weights depend on the image is "
                      "unsupported by the channel graph")
    kernel = self._kernel_of(rhs, "convolution", 4)
    dn = eqn.params["dimension_numbers"]
    lshape = eqn.invars[0].aval.shape
    rshape = eqn.invars[1].aval.shape
    oshape = eqn.outvars[0].aval.shape
    if lhs.aligned and lhs.axis != dn.lhs_spec[1]:
      lhs = self._unaligned(lhs, MIXES, "conv_general_dilated")
    groups = int(eqn.params.get("feature_group_count", 1))
    ksize = tuple(rshape[d] for d in dn.rhs_spec[2:])
    out_hw = tuple(oshape[d] for d in dn.out_spec[2:])
    in_f, out_f = lshape[dn.lhs_spec[1]], oshape[dn.out_spec[1]]
    depthwise = groups > 1 and groups == in_f == out_f
    padding = eqn.params.get("padding", ())
    padded = any(lo or hi for lo, hi in padding)
    if groups > 1 and not depthwise:
      # A grouped conv reads its input channels group by group: they cannot
      # be removed one by one.
      lhs = self._unaligned(lhs, MIXES, f"conv_general_dilated with "
                            f"feature_group_count={groups}")
    # Every output element costs one multiply-accumulate per kernel entry of
    # its filter (I/groups * kh * kw); the batch is one image.
    macs = int(np.prod(out_hw)) * int(np.prod(rshape))
    path = self._record(
        kernel, "conv", lhs, in_features=in_f, out_features=out_f,
        kernel_size=ksize, strides=tuple(eqn.params["window_strides"]),
        in_hw=tuple(lshape[d] for d in dn.lhs_spec[2:]), out_hw=out_hw,
        macs=macs, params=int(np.prod(rshape)), feature_groups=groups,
        depthwise=depthwise, padded=padded)
    axis = dn.out_spec[1]
    if depthwise and lhs.aligned:
      ref = self._node("depthwise", out_f, (lhs.ref,), gid=lhs.gid, layer=path,
                       spatial=padded or ksize != (1, 1))
      return _Act(axis, lhs.gid, ref, lhs.flow, lhs.trail)
    gid = self._new_block(path, out_f)
    ref = self._node("source", out_f, gid=gid, layer=path)
    return _Act(axis, gid, ref, frozenset({path}), lhs.trail + (path,))

  def _dense(self, eqn, ins) -> _Act:
    lhs, rhs = ins
    x_first = isinstance(lhs, _Act)
    x, w = (lhs, rhs) if x_first else (rhs, lhs)
    kernel = self._kernel_of(w, "dot_general", 2)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    xc = lc if x_first else rc
    xshape = eqn.invars[0 if x_first else 1].aval.shape
    wshape = eqn.invars[1 if x_first else 0].aval.shape
    oshape = eqn.outvars[0].aval.shape
    if x.aligned and (lb or rb or len(xc) != 1 or x.axis != xc[0]):
      x = self._unaligned(x, MIXES, "dot_general")
    in_f = int(np.prod([xshape[d] for d in xc]))
    out_f = int(np.prod(wshape)) // in_f
    macs = int(np.prod(oshape)) // xshape[0] * in_f
    positions = int(np.prod(oshape)) // xshape[0] // out_f
    path = self._record(kernel, "dense", x, in_features=in_f,
                        out_features=out_f, kernel_size=(1, 1),
                        strides=(1, 1), in_hw=(1, 1), out_hw=(1, 1),
                        macs=macs, params=int(np.prod(wshape)),
                        feature_groups=1, depthwise=False, padded=False,
                        positions=positions, in_rank=len(xshape))
    gid = self._new_block(path, out_f)
    ref = self._node("source", out_f, gid=gid, layer=path)
    # dot_general output: x's free dims then w's free dims; units are last.
    return _Act(len(oshape) - 1, gid, ref, frozenset({path}),
                x.trail + (path,))

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

  # ------------------------------------------------------ structural ops
  def _reshape(self, a: _Act, in_shape, out_shape, name: str) -> _Act:
    c = in_shape[a.axis]
    pos = np.arange(c)
    idx = [1] * len(in_shape)
    idx[a.axis] = c
    ids = np.broadcast_to(pos.reshape(idx), in_shape).reshape(out_shape)
    # The channel axis of the result is the one along which the position
    # varies while staying constant along every other axis.
    for ax in reversed(range(len(out_shape))):
      cand = ids[tuple(slice(None) if i == ax else 0
                       for i in range(len(out_shape)))]
      shape = [1] * len(out_shape)
      shape[ax] = out_shape[ax]
      if np.all(ids == cand.reshape(shape)):
        return dataclasses.replace(a, axis=ax, gid=a.gid[cand],
                                   ref=a.ref[cand], uniform=frozenset())
    return self._unaligned(a, MIXES, name)

  def _structural(self, eqn, name, ins, acts, a, in_shapes, out_shape, flow,
                  trail) -> _Act | None:
    if name == "concatenate" and eqn.params["dimension"] == a.axis:
      if not all(isinstance(x, _Act) and x.aligned and x.axis == a.axis
                 for x in ins):
        return None
      return _Act(a.axis, np.concatenate([x.gid for x in ins]),
                  np.concatenate([x.ref for x in ins]), flow, trail)
    if name == "slice":
      start = eqn.params["start_indices"][a.axis]
      limit = eqn.params["limit_indices"][a.axis]
      strides = eqn.params.get("strides") or (1,) * len(out_shape)
      sel = np.arange(start, limit, strides[a.axis])
      return dataclasses.replace(a, gid=a.gid[sel], ref=a.ref[sel],
                                 norm=None)
    if name == "rev" and a.axis in eqn.params["dimensions"]:
      return dataclasses.replace(a, gid=a.gid[::-1], ref=a.ref[::-1],
                                 norm=None)
    # Padding, flipping or stacking along other axes keeps the channels when
    # every activation operand carries the same ones.
    if not all(len(s) == len(out_shape) and s[a.axis] == out_shape[a.axis]
               for s, x in zip(in_shapes, ins) if isinstance(x, _Act)):
      return None
    for x in acts[1:]:
      if not (x.aligned and x.axis == a.axis and self._couple(a, x, name)):
        return None
    if name == "pad":
      cfg = eqn.params["padding_config"]
      if cfg[a.axis] != (0, 0, 0):
        return None
      ref = self._node("pad", len(a.ref), (a.ref,), gid=a.gid)
      return dataclasses.replace(a, ref=ref, norm=None)
    if name == "concatenate" and len(acts) > 1:
      ref = self._node("opaque", len(a.ref), [x.ref for x in acts],
                       gid=a.gid)
      return _Act(a.axis, a.gid, ref, flow, trail)
    if name == "concatenate":  # with variables (a class token): not modelled
      ref = self._node("opaque", len(a.ref), (a.ref,), gid=a.gid)
      return _Act(a.axis, a.gid, ref, flow, trail)
    return dataclasses.replace(a, norm=None)


def _is_elementwise_call(eqn) -> bool:
  """A call (custom_jvp/vjp, jit) whose body is elementwise (ReLU, GELU)."""
  sub = call_body(eqn)
  if sub is None or len(sub[0].outvars) != 1:
    return False
  for e in sub[0].eqns:
    if e.primitive.name in ELEMENTWISE or e.primitive.name in (
        "broadcast_in_dim",):
      continue
    if _is_elementwise_call(e):
      continue
    return False
  return True


def _equation_function(eqn, act_index: int, axis: int
                       ) -> Callable[[np.ndarray], tuple[np.ndarray,
                                                         np.ndarray]]:
  """``fn(v) -> (f(v), f'(v))`` of an elementwise equation, per value.

  The equation is bound at its traced shape (so that calls with custom JVP
  rules, such as ReLU's derivative 0 at 0, evaluate as traced): up to C
  values at a time are broadcast along the channel axis. The function does
  not depend on the channel (the other operands are scalar literals), so
  results are memoised per value.
  """
  shape = tuple(eqn.invars[act_index].aval.shape)
  dtype = eqn.invars[act_index].aval.dtype
  literals = {j: v.val for j, v in enumerate(eqn.invars) if j != act_index}
  params = dict(eqn.params)
  c = shape[axis]
  memo: dict[float, tuple[float, float]] = {}

  def call(x):
    args = [x if j == act_index else literals[j]
            for j in range(len(eqn.invars))]
    return _bind(eqn, args, params)

  def evaluate(chunk: np.ndarray) -> None:
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    v = np.zeros((c,), np.float64)
    v[:len(chunk)] = chunk
    bshape = [1] * len(shape)
    bshape[axis] = c
    x = jnp.broadcast_to(jnp.asarray(v.reshape(bshape), dtype), shape)
    y, dy = jax.jvp(call, (x,), (jnp.ones_like(x),))
    first = tuple(0 if i != axis else slice(None) for i in range(len(shape)))
    y, dy = np.asarray(y[first], np.float64), np.asarray(dy[first],
                                                         np.float64)
    for k, val in enumerate(chunk):
      memo[float(val)] = (float(y[k]), float(dy[k]))

  def fn(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, np.float64)
    new = [v for v in np.unique(values) if float(v) not in memo]
    for i in range(0, len(new), c):
      evaluate(np.asarray(new[i:i + c]))
    f = np.array([memo[float(v)][0] for v in values.reshape(-1)])
    df = np.array([memo[float(v)][1] for v in values.reshape(-1)])
    return f.reshape(values.shape), df.reshape(values.shape)

  return fn


def _bind(eqn, args, params):
  """Binds ``eqn``'s primitive on new operands, as ``jax.core.eval_jaxpr``."""
  prim = eqn.primitive
  out = prim.bind(*args, **prim.get_bind_params(params))
  return out[0] if prim.multiple_results else out


def call_body(eqn) -> tuple[jcore.Jaxpr, list] | None:
  """(jaxpr, const values) of a call-like equation (jit, custom_jvp/vjp,
  remat); None for any other. An open jaxpr's consts are None."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = eqn.params.get(key)
    if isinstance(j, jcore.ClosedJaxpr):
      j, consts = j.jaxpr, list(j.consts)
    elif isinstance(j, jcore.Jaxpr):
      consts = [None] * len(j.constvars)
    else:
      continue
    if len(j.invars) == len(eqn.invars) and len(j.outvars) == len(
        eqn.outvars):
      return j, consts
  return None


def leaf_path(kp) -> Path:
  return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)


def trace(apply: Callable[..., Any], variables: Any, x: jax.ShapeDtypeStruct,
          ) -> tuple[Walker, list[Any], list[Path], list[Any]]:
  """Traces ``apply(variables, x)`` and walks its jaxpr.

  Args:
    apply: the model's eval-mode apply function (module outputs tagged).
    variables: abstract variables (``jax.eval_shape`` output).
    x: the abstract image (N=1, H, W, C).

  Returns:
    ``(walker, outputs, leaf paths, leaves)``.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
  paths = [leaf_path(kp) for kp, _ in leaves]
  shapes = {p: tuple(l.shape) for p, (_, l) in zip(paths, leaves)}
  norm_modules = frozenset(
      {p[1:-1] for p in paths if p[0] == "params" and p[-1] == "scale"
       and len(shapes[p]) == 1}
      | {p[1:-1] for p in paths if p[0] == "batch_stats"})
  centring = frozenset(p[1:-1] for p in paths if p[0] == "batch_stats")
  closed = jax.make_jaxpr(apply)(variables, x)
  walker = Walker(norm_modules, centring, shapes)
  args = [_Param(frozenset({p})) for p in paths] + [
      walker.image(x.shape[-1])]
  outs = walker.run(closed.jaxpr, [None] * len(closed.consts), args)
  return walker, outs, paths, [l for _, l in leaves]
