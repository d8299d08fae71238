"""A physically smaller network from the description: the compact program.

``build(model, variables, description)`` traces the masked model's forward
pass (evaluation mode) and re-evaluates its jaxpr with every removed channel
sliced out (``convert.description``): variables meet activations already
sliced, shape parameters (reshapes, broadcasts, a depthwise conv's group
count) are rewritten, and everything computed from variables alone (masks,
BatchNorm folding, relative position tables) is folded into constants. The
result is a ``Program``: a list of primitive applications over the image,
the previous results and named constants, with no call primitives left.

``compact(model, variables)`` returns ``apply(params, images)`` interpreting
it with JAX (jittable) and ``params``, the sliced constants; the PyTorch
lowering (``convert.torch_program``) interprets the same program with torch.
The logits equal the masked model's: what is removed is zero (or unread)
wherever it is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

import models
from convert import description as desc_lib
from models import paths
from models.graph import walk

Path = tuple[str, ...]
# A pseudo-primitive: gather along an axis (a slice of kept channels).
TAKE = "take"


class UnsupportedOperation(ValueError):
  """An operation on pruned channels the compact program cannot rewrite."""


@dataclasses.dataclass(frozen=True)
class Step:
  """One primitive application.

  Attributes:
    primitive: the JAX primitive (or ``TAKE``).
    params: its bind parameters (shape parameters already rewritten); for
      ``TAKE``: ``{'indices': int array, 'axis': int}``.
    operands: ``('x', value index)``, ``('c', constant name)`` or
      ``('l', literal)``.
    outputs: value indices of its results.
    layer: the conv/dense module it applies, if any.
  """

  primitive: Any
  params: Mapping[str, Any]
  operands: tuple[tuple[str, Any], ...]
  outputs: tuple[int, ...]
  layer: Path | None = None

  @property
  def name(self) -> str:
    return self.primitive if self.primitive == TAKE else (
        self.primitive.name)


@dataclasses.dataclass(frozen=True)
class Program:
  """A compact network.

  Attributes:
    steps: the primitive applications, in order.
    consts: constants by name (numpy arrays).
    output: value index of the logits (value 0 is the image).
    input_shape: (H, W, C) of one image.
    widths: per conv/dense layer name, its (kept inputs, kept outputs).
    num_values: values the steps produce, the image included.
    fixed: names of the constants the model's code makes (a shifted
      window's attention mask), not computed from its variables.
  """

  steps: tuple[Step, ...]
  consts: Mapping[str, np.ndarray]
  output: int
  input_shape: tuple[int, int, int]
  widths: Mapping[str, tuple[int, int]]
  num_values: int
  fixed: frozenset[str] = frozenset()

  @property
  def num_params(self) -> int:
    """Numbers computed from the model's variables (its parameters)."""
    return int(sum(np.asarray(c).size for k, c in self.consts.items()
                   if k not in self.fixed))

  def primitives(self) -> list[str]:
    """The distinct primitives the program applies, sorted."""
    return sorted({s.name for s in self.steps})


@dataclasses.dataclass(frozen=True)
class _Val:
  """A compact activation: value index and its kept positions."""
  index: int
  sel: np.ndarray | None   # kept positions along the channel axis
  axis: int | None


@dataclasses.dataclass(frozen=True)
class _Const:
  value: Any
  srcs: frozenset[Path]


class _Builder:
  """Walks the jaxpr beside ``models.graph.walk.Walker`` (for the channel
  ids of every activation) and emits the compact steps."""

  def __init__(self, walker: walk.Walker, description: desc_lib.Description):
    self.walker = walker
    self.desc = description
    self.steps: list[Step] = []
    self.consts: dict[str, np.ndarray] = {}
    self._const_ids: dict[tuple, str] = {}
    self.widths: dict[str, tuple[int, int]] = {}
    self.fixed: set[str] = set()
    self.num_values = 1

  # ------------------------------------------------------------- helpers
  def _new_value(self) -> int:
    self.num_values += 1
    return self.num_values - 1

  def _sel(self, a: walk._Act) -> np.ndarray | None:  # pylint: disable=protected-access
    if not a.aligned:
      return None
    kept = self.desc.kept_gid(a.gid)
    return None if kept.all() else np.flatnonzero(kept)

  def _const(self, c: _Const, axis: int | None = None,
             sel: np.ndarray | None = None, tag: str = "") -> tuple:
    value = np.asarray(c.value)
    if axis is not None and sel is not None:
      value = np.take(value, sel, axis=axis)
    key = (id(c.value), axis, None if sel is None else sel.tobytes(), tag)
    if key not in self._const_ids:
      # Named after its params leaf when it has one (a BN's folded scale
      # after the module, not after its statistics or masks).
      src = sorted(c.srcs, key=lambda p: (p[0] != "params", p))
      base = ".".join(src[0][1:]) if src else "const"
      name = base + (f"_{tag}" if tag else "")
      n, k = name, 1
      while n in self.consts or any(c.startswith(n + ".") for c in
                                    self.consts):
        k += 1
        n = f"{name}_{k}"
      self.consts[n] = value
      self._const_ids[key] = n
      if not c.srcs:
        self.fixed.add(n)
    return ("c", self._const_ids[key])

  def _emit(self, primitive, params, operands, n_out: int,
            layer: Path | None = None) -> list[int]:
    outs = tuple(self._new_value() for _ in range(n_out))
    self.steps.append(Step(primitive, dict(params), tuple(operands), outs,
                           layer))
    return list(outs)

  # ----------------------------------------------------------------- run
  def run(self, jaxpr: jcore.Jaxpr, wconsts, cconsts, wargs, cargs):
    wenv, cenv = {}, {}
    for v, w, c in zip(jaxpr.constvars, wconsts, cconsts):
      wenv[v], cenv[v] = w, c
    for v, w, c in zip(jaxpr.invars, wargs, cargs):
      wenv[v], cenv[v] = w, c

    def read(env, v):
      return None if isinstance(v, jcore.Literal) else env.get(v)

    for eqn in jaxpr.eqns:
      wins = [read(wenv, v) for v in eqn.invars]
      cins = [("l", v.val) if isinstance(v, jcore.Literal) else cenv.get(v)
              for v in eqn.invars]
      acts = [c for c in cins if isinstance(c, _Val)]
      sub = walk.call_body(eqn)
      if sub is not None and acts:
        # Inlined: the compact program has no call primitives.
        inner, consts = sub
        wouts, couts = self.run(inner, [None] * len(consts),
                                [_Const(np.asarray(c), frozenset())
                                 for c in consts], wins, cins)
      elif not acts:
        wouts = self.walker._eqn(eqn, wins)  # pylint: disable=protected-access
        couts = self._fold(eqn, cins, wins)
      else:
        wouts = self.walker._eqn(eqn, wins)  # pylint: disable=protected-access
        couts = self._apply(eqn, wins, wouts, cins)
      for v, w, c in zip(eqn.outvars, wouts, couts):
        if not isinstance(v, jcore.DropVar):
          wenv[v], cenv[v] = w, c
    return ([read(wenv, v) for v in jaxpr.outvars],
            [("l", v.val) if isinstance(v, jcore.Literal) else cenv.get(v)
             for v in jaxpr.outvars])

  def _fold(self, eqn, cins, wins) -> list[Any]:
    """Variables only: evaluated now (masks, BN folding, tables)."""
    vals = []
    for c in cins:
      if isinstance(c, _Const):
        vals.append(c.value)
      elif isinstance(c, tuple) and c[0] == "l":
        vals.append(c[1])
      else:
        vals.append(c)
    if any(v is None for v in vals):
      return [None] * len(eqn.outvars)
    if (eqn.primitive.name == "gather" and isinstance(cins[0], _Const)
        and cins[0].srcs and eqn.outvars[0].aval.size > np.size(vals[0])
        and "FILL" not in str(eqn.params.get("mode"))):
      return [self._table_lookup(eqn, cins[0], vals)]
    out = _bind(eqn, vals)
    outs = out if eqn.primitive.multiple_results else [out]
    srcs = frozenset().union(*[w.srcs for w in wins
                               if isinstance(w, walk._Param)])  # pylint: disable=protected-access
    return [_Const(np.asarray(o), srcs) for o in outs]

  def _table_lookup(self, eqn, table: _Const, vals) -> _Val:
    """A variable table gathered into something larger (a Swin's relative
    position bias): looked up per call, so the table is stored as it is.
    The gather applied to the table's flat positions gives the positions
    each output element reads."""
    value = np.asarray(table.value)
    positions = np.arange(value.size, dtype=np.int32).reshape(value.shape)
    flat = np.asarray(_bind(eqn, [positions, *vals[1:]]))
    (row,) = self._emit(jax.lax.reshape_p, {"new_sizes": (value.size,),
                                            "dimensions": None,
                                            "sharding": None},
                        [self._const(table)], 1)
    (picked,) = self._emit(TAKE, {"indices": flat.reshape(-1), "axis": 0},
                           [("x", row)], 1)
    (out,) = self._emit(jax.lax.reshape_p, {"new_sizes": flat.shape,
                                            "dimensions": None,
                                            "sharding": None},
                        [("x", picked)], 1)
    return _Val(out, None, None)

  # --------------------------------------------------------- activations
  def _apply(self, eqn, wins, wouts, cins) -> list[Any]:
    name = eqn.primitive.name
    w_out = wouts[0] if isinstance(wouts[0], walk._Act) else None  # pylint: disable=protected-access
    sel_out = self._sel(w_out) if w_out is not None else None
    params = dict(eqn.params)
    operands = [("x", c.index) if isinstance(c, _Val) else
                c if c is not None else ("l", None) for c in cins]
    acts = [c for c in cins if isinstance(c, _Val)]
    if name == "slice" and self._channel_slice(eqn, wins):
      return self._take(eqn, wins, cins, sel_out)
    layer = None
    if name == "conv_general_dilated":
      layer = _kernel_module(wins[1])
      operands = self._conv(eqn, cins, operands, sel_out, params)
    elif name == "dot_general" and len(acts) == 1:
      layer = _kernel_module(wins[1 - cins.index(acts[0])])
      operands = self._dot(eqn, cins, operands, sel_out)
    elif name == "dot_general":
      if any(c.sel is not None for c in acts):
        raise UnsupportedOperation(
            "a contraction of two activations over pruned channels")
    elif any(c.sel is not None for c in acts) or sel_out is not None:
      operands = self._generic(eqn, cins, operands, w_out, sel_out, params)
    operands = [self._const(o) if isinstance(o, _Const) else o
                for o in operands]
    outs = self._emit(eqn.primitive, params, operands, len(eqn.outvars),
                      layer)
    if layer is not None:
      self.widths[paths.name(layer)] = self._widths(eqn, cins, acts[0],
                                                    sel_out)
    return [_Val(o, self._sel(w), w.axis) if isinstance(w, walk._Act)  # pylint: disable=protected-access
            else _Val(o, None, None) for o, w in zip(outs, wouts)]

  def _widths(self, eqn, cins, x: _Val, sel_out) -> tuple[int, int]:
    """(kept inputs, kept outputs) of a conv or dense layer."""
    i = cins.index(x)
    shape = eqn.invars[i].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    if eqn.primitive.name == "conv_general_dilated":
      dn = eqn.params["dimension_numbers"]
      dims, out_axis = (dn.lhs_spec[1],), dn.out_spec[1]
    else:
      (lc, rc), _ = eqn.params["dimension_numbers"]
      dims, out_axis = (lc if i == 0 else rc), len(out_shape) - 1
    n_in = 1
    for d in dims:
      n_in *= len(x.sel) if x.sel is not None and d == x.axis else shape[d]
    n_out = len(sel_out) if sel_out is not None else out_shape[out_axis]
    return int(n_in), int(n_out)

  def _conv(self, eqn, cins, operands, sel_out, params):
    lhs, rhs = cins
    if not isinstance(rhs, _Const):
      raise UnsupportedOperation("a convolution whose weights depend on the "
                                 "image cannot be compacted")
    dn = eqn.params["dimension_numbers"]
    groups = eqn.params["feature_group_count"]
    out_dim, in_dim = dn.rhs_spec[0], dn.rhs_spec[1]
    value = np.asarray(rhs.value)
    if groups == 1 and lhs.sel is not None:
      value = np.take(value, lhs.sel, axis=in_dim)
    elif groups > 1 and (lhs.sel is not None or sel_out is not None):
      depthwise = (value.shape[in_dim] == 1 and lhs.sel is not None
                   and sel_out is not None and np.array_equal(lhs.sel,
                                                              sel_out))
      if not depthwise:
        raise UnsupportedOperation(
            f"a grouped convolution (feature_group_count={groups}) with "
            "pruned channels")
      params["feature_group_count"] = len(sel_out)
    if sel_out is not None:
      value = np.take(value, sel_out, axis=out_dim)
    return [operands[0], _Const(value, rhs.srcs)]

  def _dot(self, eqn, cins, operands, sel_out):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    i = next(k for k, c in enumerate(cins) if isinstance(c, _Val))
    j = 1 - i
    x, w = cins[i], cins[j]
    if not isinstance(w, _Const):
      return operands
    value = np.asarray(w.value)
    xc, wc = (lc, rc) if i == 0 else (rc, lc)
    if x.sel is not None and x.axis in xc:
      value = np.take(value, x.sel, axis=wc[list(xc).index(x.axis)])
    if sel_out is not None:
      # The output's channel axis is the last: the weight's last free dim.
      wb = rb if j == 1 else lb
      free = [d for d in range(value.ndim) if d not in wc and d not in wb]
      value = np.take(value, sel_out, axis=free[-1])
    out = list(operands)
    out[j] = _Const(value, w.srcs)
    return out

  def _generic(self, eqn, cins, operands, w_out, sel_out, params):
    """Elementwise and structural operations: slice the constants that
    meet a compacted axis, rewrite shape parameters."""
    name = eqn.primitive.name
    out_shape = list(eqn.outvars[0].aval.shape)
    if w_out is not None and w_out.aligned and sel_out is not None:
      out_shape[w_out.axis] = len(sel_out)
    if name in ("broadcast_in_dim", "reshape"):
      if name == "reshape" and params.get("dimensions") not in (None, ()):
        raise UnsupportedOperation("a reshape with dimensions")
      params["shape" if name == "broadcast_in_dim" else "new_sizes"] = (
          tuple(out_shape))
      return operands
    if name in _SHAPE_FREE or name in walk.ELEMENTWISE:
      a = next(c for c in cins if isinstance(c, _Val) and c.axis is not None)
      full = eqn.invars[cins.index(a)].aval.shape[a.axis]
      new = []
      for o, c in zip(operands, cins):
        if isinstance(c, _Const) and a.sel is not None:
          shape = np.shape(c.value)
          if len(shape) == len(out_shape) and shape[a.axis] == full:
            o = _Const(np.take(np.asarray(c.value), a.sel, axis=a.axis),
                       c.srcs)
        new.append(o)
      return new
    raise UnsupportedOperation(
        f"the JAX primitive {name!r} on pruned channels")

  def _channel_slice(self, eqn, wins) -> bool:
    a = wins[0]
    if not isinstance(a, walk._Act) or not a.aligned:  # pylint: disable=protected-access
      return False
    start = eqn.params["start_indices"][a.axis]
    limit = eqn.params["limit_indices"][a.axis]
    return (start, limit) != (0, eqn.invars[0].aval.shape[a.axis])

  def _take(self, eqn, wins, cins, sel_out):
    """A slice of the channel axis: the slice on the other axes, then a
    gather of the kept positions it selects."""
    a, c = wins[0], cins[0]
    d = a.axis
    n = eqn.invars[0].aval.shape[d]
    strides = eqn.params.get("strides") or (1,) * len(
        eqn.invars[0].aval.shape)
    picked = np.arange(eqn.params["start_indices"][d],
                       eqn.params["limit_indices"][d], strides[d])
    kept_in = c.sel if c.sel is not None else np.arange(n)
    pos = {int(p): k for k, p in enumerate(kept_in)}
    keep = np.asarray([pos[int(p)] for p in picked if int(p) in pos],
                      np.int64)
    params = dict(eqn.params)
    params["start_indices"] = tuple(0 if k == d else s for k, s in
                                    enumerate(params["start_indices"]))
    params["limit_indices"] = tuple(len(kept_in) if k == d else s for k, s in
                                    enumerate(params["limit_indices"]))
    if eqn.params.get("strides") is not None:
      params["strides"] = tuple(1 if k == d else s
                                for k, s in enumerate(params["strides"]))
    (mid,) = self._emit(eqn.primitive, params, [("x", c.index)], 1)
    (out,) = self._emit(TAKE, {"indices": keep, "axis": d}, [("x", mid)], 1)
    return [_Val(out, sel_out, d)]


def _kernel_module(w) -> Path | None:
  """The module of the ``params`` kernel a weight operand comes from."""
  if not isinstance(w, walk._Param):  # pylint: disable=protected-access
    return None
  kernels = sorted(s for s in w.srcs if s[0] == "params")
  return kernels[0][1:-1] if kernels else None


# Structural primitives whose parameters do not hold the channel count.
_SHAPE_FREE = frozenset({
    "transpose", "squeeze", "expand_dims", "reduce_sum", "reduce_max",
    "reduce_min", "reduce_prod", "argmax", "argmin", "reduce_window_sum",
    "reduce_window_max", "reduce_window_min", "reduce_window", "pad",
    "concatenate", "rev", "slice", "select_n", "clamp", "cumsum", "cummax",
    "sort", "name", "copy_p", "copy"})


def _bind(eqn, args):
  prim = eqn.primitive
  return prim.bind(*args, **prim.get_bind_params(dict(eqn.params)))


# ----------------------------------------------------------- entry points
def build(model: Any, variables: Mapping[str, Any],
          description: desc_lib.Description | None = None) -> Program:
  """The compact program of a pruned model.

  Args:
    model: any Flax Linen model (plain or ``models.prunable``-wrapped).
    variables: its variables (``params``, ``batch_stats``, ``masks``...).
    description: from ``convert.describe`` (computed when omitted).

  Returns:
    The ``Program``.

  Raises:
    UnsupportedOperation: an operation on pruned channels the program
      cannot rewrite, naming the primitive.
  """
  if description is None:
    description = desc_lib.describe(model, variables)
  # Traced at batch 2 and 3: shape parameters that depend on the batch (a
  # LayerNorm's broadcast statistics, a flatten) are linear in it and are
  # resolved per call. (At batch 1 JAX elides some broadcasts.)
  two, three = (_build_at(model, variables, description, b)
                for b in (_BATCHES))
  steps = []
  for a, b in zip(two.steps, three.steps):
    if a.name != b.name:
      raise UnsupportedOperation("the model traces to different programs at "
                                 "batch sizes 2 and 3")
    params = {k: v if _same(v, b.params[k]) else _Batched(v, b.params[k])
              for k, v in a.params.items()}
    steps.append(dataclasses.replace(a, params=params))
  return _unbatch_consts(dataclasses.replace(two, steps=tuple(steps)),
                         three.consts)


# The two batch sizes a program is traced at.
_BATCHES = (2, 3)


def _unbatch_consts(program: Program, at3: Mapping[str, np.ndarray]
                    ) -> Program:
  """Variables broadcast over the batch (a ViT's class token) folded into
  constants of the traced batch size: stored once and broadcast per call."""
  consts, first, remap = dict(program.consts), [], {}
  num_values = program.num_values
  for name, v in program.consts.items():
    w = np.asarray(at3[name])
    if v.shape == w.shape:
      continue
    (d,) = [k for k, (p, q) in enumerate(zip(v.shape, w.shape)) if p != q]
    one = np.take(v, [0], axis=d)
    if not (np.array_equal(np.broadcast_to(one, v.shape), v)
            and np.array_equal(np.broadcast_to(one, w.shape), w)):
      raise UnsupportedOperation(f"the constant {name} varies over the batch")
    consts[name] = one
    remap[name] = num_values
    first.append(Step(jax.lax.broadcast_in_dim_p,
                      {"shape": _Batched(v.shape, w.shape),
                       "broadcast_dimensions": tuple(range(v.ndim)),
                       "sharding": None},
                      (("c", name),), (num_values,)))
    num_values += 1
  if not remap:
    return program
  steps = tuple(first) + tuple(
      dataclasses.replace(s, operands=tuple(
          ("x", remap[o]) if k == "c" and o in remap else (k, o)
          for k, o in s.operands)) for s in program.steps)
  return dataclasses.replace(program, steps=steps, consts=consts,
                             num_values=num_values)


@dataclasses.dataclass(frozen=True)
class _Batched:
  """A shape parameter linear in the batch size (its values at the two
  traced batch sizes)."""
  at_first: tuple
  at_second: tuple

  def at(self, batch: Any) -> list:
    """The shape for ``batch`` images (an int, or a symbolic size)."""
    b0, b1 = _BATCHES
    return [a + (c - a) // (b1 - b0) * (batch - b0)
            for a, c in zip(self.at_first, self.at_second)]


def _same(a, b) -> bool:
  if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
    return np.array_equal(a, b)
  try:
    return bool(a == b)
  except Exception:  # pylint: disable=broad-except
    return a is b


def _build_at(model: Any, variables: Mapping[str, Any],
              description: desc_lib.Description, batch: int) -> Program:
  shape = description.input_shape
  wrapped = models.prunable(model)
  plain = models.unwrap(model)
  keep = {k: v for k, v in variables.items() if k not in (
      models.GATES, models.DDROP, models.DDROP_STATS)}
  values = jax.tree.map(np.asarray, keep)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          values)
  x = jax.ShapeDtypeStruct((batch,) + tuple(shape), jnp.float32)
  kw = models.graph.train_kwargs(plain, False)
  closed = jax.make_jaxpr(lambda v, x: wrapped.apply(v, x, **kw))(abstract, x)
  leaves, _ = jax.tree_util.tree_flatten_with_path(abstract)
  leaf_paths = [walk.leaf_path(kp) for kp, _ in leaves]
  flat_values = jax.tree.leaves(values)
  shapes = {p: tuple(l.shape) for p, (_, l) in zip(leaf_paths, leaves)}
  norm_modules = frozenset(
      {p[1:-1] for p in leaf_paths if p[0] == "params" and p[-1] == "scale"
       and len(shapes[p]) == 1} | {p[1:-1] for p in leaf_paths
                                   if p[0] == "batch_stats"})
  walker = walk.Walker(norm_modules, frozenset(), shapes)
  builder = _Builder(walker, _Relabelled(description, walker))
  wargs = [walk._Param(frozenset({p})) for p in leaf_paths] + [  # pylint: disable=protected-access
      walker.image(shape[-1])]
  cargs = [_Const(v, frozenset({p})) for p, v in zip(leaf_paths, flat_values)]
  cargs.append(_Val(0, None, 3))
  wconsts = [None] * len(closed.consts)
  cconsts = [_Const(np.asarray(c), frozenset()) for c in closed.consts]
  _, outs = builder.run(closed.jaxpr, wconsts, cconsts, wargs, cargs)
  out = outs[0]
  if not isinstance(out, _Val):
    raise UnsupportedOperation("the model's output does not depend on the "
                               "image")
  if out.sel is not None:
    raise UnsupportedOperation("the model's output channels were pruned")
  return Program(tuple(builder.steps), builder.consts, out.index,
                 tuple(shape), builder.widths, builder.num_values,
                 frozenset(builder.fixed))


class _Relabelled:
  """The description's kept channels, for another walk's channel ids (the
  export walk numbers producers in the same call order, but its own ids)."""

  def __init__(self, description: desc_lib.Description, walker: walk.Walker):
    self.description = description
    self.walker = walker

  def kept_gid(self, gid: np.ndarray) -> np.ndarray:
    g = self.description.graph
    owners, chan = self.walker.owner(np.asarray(gid))
    out = np.ones(len(chan), bool)
    for i, (p, c) in enumerate(zip(owners, chan)):
      if p == walk.Walker.IMAGE:
        continue
      out[i] = self.description.kept[g.space_index(p)][int(c)]
    return out


def run(program: Program, params: Mapping[str, Any], images: jax.Array
        ) -> Any:
  """Evaluates the program on ``images`` with JAX (jittable).

  Args:
    program: the compact program.
    params: its constants (``program.consts`` or arrays of the same shapes).
    images: (N, H, W, C) float images, normalised as the model expects.

  Returns:
    The logits.
  """
  vals: list[Any] = [None] * program.num_values
  vals[0] = images
  batch = images.shape[0]
  for step in program.steps:
    ops = [vals[o] if kind == "x" else params[o] if kind == "c" else o
           for kind, o in step.operands]
    out = _apply_jax(step, ops, batch)
    if len(step.outputs) == 1:
      vals[step.outputs[0]] = out
    else:
      for k, o in zip(step.outputs, out):
        vals[k] = o
  return vals[program.output]


def params_at(step: Step, batch: int) -> dict[str, Any]:
  """A step's parameters for ``batch`` images."""
  return {k: tuple(int(x) for x in v.at(batch)) if isinstance(v, _Batched)
          else v for k, v in step.params.items()}


def _apply_jax(step: Step, ops: list, batch: int) -> Any:
  params = params_at(step, batch)
  if step.primitive == TAKE:
    return jnp.take(ops[0], jnp.asarray(params["indices"]),
                    axis=params["axis"])
  prim = step.primitive
  return prim.bind(*ops, **prim.get_bind_params(params))


def compact(model: Any, variables: Mapping[str, Any],
            input_shape: Sequence[int] | None = None
            ) -> tuple[Callable[[Any, jax.Array], jax.Array], dict[str, Any]]:
  """A physically smaller JAX function of a pruned model.

  Args:
    model: any Flax Linen model (plain or wrapped).
    variables: its pruned variables (``params`` and ``masks``...).
    input_shape: (H, W, C) (default: the model's image size, 3 channels).

  Returns:
    ``(apply, params)``: ``apply(params, images)`` gives the masked model's
    logits (evaluation mode) over the sliced arrays ``params``; jittable.
  """
  program = build(model, variables,
                  desc_lib.describe(model, variables, input_shape))
  return (lambda params, images: run(program, params, images),
          {k: jnp.asarray(v) for k, v in program.consts.items()})
