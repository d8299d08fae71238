"""The compact program (``convert.program``) as a PyTorch module.

``module(program)`` lowers every step to torch operations over the program's
constants, kept as buffers named by their module paths (a conv's kernel as
``<module>.weight`` in OIHW, a dense kernel as ``<module>.weight`` (out,
in); folded constants under their source's name). Activations stay in the
model's own layout (NHWC): a convolution permutes its input to an NCHW view
with channels-last strides, which PyTorch's convolutions take as they are,
so the permutes cost nothing. Shapes that depend on the batch are computed
from the input's size, so a traced module (TorchScript, ``torch.export``,
ONNX) takes any batch.

``unsupported(program)`` names the steps a lowering cannot translate, so
that an export fails before it writes anything.
"""

from __future__ import annotations

import string
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convert import program as compact_lib

Step = compact_lib.Step

_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "neg": torch.neg, "exp": torch.exp, "log": torch.log, "tanh": torch.tanh,
    "logistic": torch.sigmoid, "erf": torch.erf, "rsqrt": torch.rsqrt,
    "sqrt": torch.sqrt, "abs": torch.abs, "sign": torch.sign,
    "floor": torch.floor, "ceil": torch.ceil, "expm1": torch.expm1,
    "log1p": torch.log1p, "square": torch.square, "sin": torch.sin,
    "cos": torch.cos, "not": torch.logical_not, "erf_inv": torch.erfinv,
    "is_finite": torch.isfinite, "round": torch.round,
    # Exact GELU's erfc: ONNX has Erf only; the difference is ~1 ulp of 1.
    "erfc": lambda x: 1.0 - torch.erf(x),
}
_BINARY: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "add": torch.add, "add_any": torch.add, "sub": torch.sub,
    "mul": torch.mul, "div": torch.div, "max": torch.maximum,
    "min": torch.minimum, "pow": torch.pow, "rem": torch.fmod,  # C fmod
    "atan2": torch.atan2, "gt": torch.gt, "lt": torch.lt, "ge": torch.ge,
    "le": torch.le, "eq": torch.eq, "ne": torch.ne, "and": torch.logical_and,
    "or": torch.logical_or,
}
_IDENTITY = frozenset({"copy", "copy_p", "stop_gradient", "name",
                       "reduce_precision", "optimization_barrier"})
_REDUCE = {"reduce_sum": torch.sum, "reduce_max": torch.amax,
           "reduce_min": torch.amin, "reduce_prod": None}
_STRUCTURAL = frozenset({
    "broadcast_in_dim", "reshape", "transpose", "squeeze", "expand_dims",
    "concatenate", "pad", "slice", "rev", "select_n", "clamp",
    "convert_element_type", "integer_pow", "conv_general_dilated",
    "dot_general", "reduce_window_max", "reduce_window_sum", "argmax",
    "argmin", "split", "cumsum", compact_lib.TAKE})
SUPPORTED = frozenset(_UNARY) | frozenset(_BINARY) | _IDENTITY | frozenset(
    k for k, v in _REDUCE.items() if v is not None) | _STRUCTURAL


def unsupported(program: compact_lib.Program) -> list[str]:
  """Primitives of the program this lowering cannot translate, with the
  layer that precedes each (for the error message)."""
  out, last = [], "the input"
  for step in program.steps:
    if step.layer is not None:
      last = ".".join(step.layer)
    if step.name not in SUPPORTED:
      out.append(f"{step.name!r} (after {last})")
  return out


class _Holder(nn.Module):
  """A node of the module tree that holds buffers at their paths."""


def _dtype(x) -> torch.dtype:
  return {np.dtype("float32"): torch.float32,
          np.dtype("float64"): torch.float64,
          np.dtype("float16"): torch.float16,
          np.dtype("int32"): torch.int32, np.dtype("int64"): torch.int64,
          np.dtype("bool"): torch.bool}[np.dtype(x)]


class ProgramModule(nn.Module):
  """A compact program run with torch (see the module docstring).

  Args:
    program: the compact program.
  """

  def __init__(self, program: compact_lib.Program):
    super().__init__()
    missing = unsupported(program)
    if missing:
      raise compact_lib.UnsupportedOperation(
          "the PyTorch export cannot translate the JAX primitive(s) "
          + ", ".join(missing))
    self.program = program
    self._names: dict[str, str] = {}
    self._empty: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    self._ops: list[Callable[[list, torch.Tensor], Any]] = []
    layouts = self._layouts(program)
    for name, value in program.consts.items():
      value = np.asarray(value)
      if name in layouts:
        name, value = layouts[name]
      self._register(name, value)
    for step in program.steps:
      self._ops.append(self._lower(step))

  # ------------------------------------------------------------ constants
  def _layouts(self, program) -> dict[str, tuple[str, np.ndarray]]:
    """Conv kernels as OIHW ``weight``, dense kernels as (out, in)."""
    out = {}
    for step in program.steps:
      if step.layer is None:
        continue
      kind, name = step.operands[1]
      if kind != "c":
        continue
      value = np.asarray(program.consts[name])
      module = ".".join(step.layer)
      if step.name == "conv_general_dilated":
        dn = step.params["dimension_numbers"]
        out[name] = (f"{module}.weight", np.ascontiguousarray(
            np.transpose(value, tuple(dn.rhs_spec))))
      elif _is_linear(step) and value.ndim == 2:
        out[name] = (f"{module}.weight", np.ascontiguousarray(value.T))
    return out

  def _register(self, name: str, value: np.ndarray) -> None:
    self._names[name] = name
    if value.size == 0:
      # A layer pruned to nothing: no tensor to hold (torch.export cannot
      # package empty ones); made at run time from its shape.
      self._empty[name] = (tuple(value.shape), _dtype(value.dtype))
      return
    parts = name.split(".")
    node = self
    for p in parts[:-1]:
      if p not in node._modules:
        node.add_module(p, _Holder())
      node = node._modules[p]
    node.register_buffer(parts[-1], torch.from_numpy(
        np.array(value, copy=True)).to(_dtype(value.dtype)))

  def _const(self, name: str) -> torch.Tensor:
    if name in self._empty:
      shape, dtype = self._empty[name]
      return torch.zeros(shape, dtype=dtype)
    node: nn.Module = self
    for p in name.split("."):
      node = getattr(node, p)
    return node  # type: ignore[return-value]

  # -------------------------------------------------------------- lowering
  def _operand(self, op, layouts_name: dict[str, str]):
    kind, value = op
    if kind == "x":
      return lambda vals, _: vals[value]
    if kind == "c":
      name = layouts_name.get(value, value)
      return lambda vals, _, name=name: self._const(name)
    # A literal: a 0-d tensor made once (zero-dimensional tensors do not
    # change the result's dtype).
    if isinstance(value, (bool, int, float, np.generic, np.ndarray)):
      tensor = torch.tensor(np.asarray(value))
      return lambda vals, _, tensor=tensor: tensor
    return lambda vals, _, value=value: value

  def _lower(self, step: Step) -> Callable[[list, torch.Tensor], Any]:
    renamed = {}
    if step.layer is not None and step.operands[1][0] == "c" and (
        step.name == "conv_general_dilated" or (_is_linear(step))):
      renamed[step.operands[1][1]] = ".".join(step.layer) + ".weight"
    ops = [self._operand(o, renamed) for o in step.operands]
    fn = _lowering(step)
    outs = step.outputs

    def run(vals: list, image: torch.Tensor) -> None:
      args = [o(vals, image) for o in ops]
      result = fn(args, image)
      if len(outs) == 1:
        vals[outs[0]] = result
      else:
        for k, r in zip(outs, result):
          vals[k] = r

    return run

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """Logits of NCHW images (the program runs on their NHWC view)."""
    images = x.permute(0, 2, 3, 1)
    vals: list[Any] = [None] * self.program.num_values
    vals[0] = images
    for op in self._ops:
      op(vals, images)
    return vals[self.program.output]


def module(program: compact_lib.Program) -> ProgramModule:
  """The torch module of a compact program."""
  return ProgramModule(program)


# ------------------------------------------------------------- primitives
def _is_linear(step: Step) -> bool:
  """A dense layer: x (..., I) . W (I, O) contracting x's last axis."""
  if step.name != "dot_general" or step.operands[0][0] != "x":
    return False
  (lc, rc), (lb, rb) = step.params["dimension_numbers"]
  return not lb and not rb and len(lc) == 1 and tuple(rc) == (0,)


def _shape(value, image: torch.Tensor) -> list:
  """A shape parameter; batch-dependent entries from the image's size."""
  if isinstance(value, compact_lib._Batched):  # pylint: disable=protected-access
    return value.at(image.size(0))
  return list(value)


def _lowering(step: Step) -> Callable[[list, torch.Tensor], Any]:
  name, p = step.name, step.params
  if name in _IDENTITY:
    return lambda a, _: a[0]
  if name in _UNARY:
    f = _UNARY[name]
    return lambda a, _: f(a[0])
  if name in _BINARY:
    f = _BINARY[name]
    return lambda a, _: f(_t(a[0], a[1]), _t(a[1], a[0]))
  if name == "integer_pow":
    y = p["y"]
    return lambda a, _: a[0] ** y
  if name == "convert_element_type":
    dt = _dtype(p["new_dtype"])
    return lambda a, _: a[0].to(dt)
  if name in _REDUCE:
    f, axes = _REDUCE[name], tuple(p["axes"])
    return lambda a, _: f(a[0], dim=axes)
  if name in ("argmax", "argmin"):
    f = torch.argmax if name == "argmax" else torch.argmin
    axis = p["axes"][0]
    return lambda a, _: f(a[0], dim=axis)
  if name == "broadcast_in_dim":
    dims = tuple(p["broadcast_dimensions"])
    return lambda a, img: _broadcast(a[0], _shape(p["shape"], img), dims)
  if name == "reshape":
    return lambda a, img: a[0].reshape(_shape(p["new_sizes"], img))
  if name == "transpose":
    perm = tuple(p["permutation"])
    return lambda a, _: a[0].permute(perm)
  if name == "squeeze":
    dims = sorted(p["dimensions"], reverse=True)
    return lambda a, _: _squeeze(a[0], dims)
  if name == "expand_dims":
    dims = sorted(p["dimensions"])
    return lambda a, _: _unsqueeze(a[0], dims)
  if name == "concatenate":
    d = p["dimension"]
    return lambda a, _: torch.cat([_t(x, a[0]) for x in a], dim=d)
  if name == "pad":
    cfg = p["padding_config"]
    if any(i for _, _, i in cfg):
      raise compact_lib.UnsupportedOperation("interior padding")
    pads = [v for lo, hi, _ in reversed(cfg) for v in (lo, hi)]
    return lambda a, _: F.pad(a[0], pads, value=float(a[1]))
  if name == "slice":
    return lambda a, img: a[0][_slices(p, img)]
  if name == "rev":
    dims = tuple(p["dimensions"])
    return lambda a, _: torch.flip(a[0], dims)
  if name == "select_n":
    return lambda a, _: _select(a)
  if name == "clamp":
    return lambda a, _: torch.clamp(a[1], min=a[0], max=a[2])
  if name == "cumsum":
    axis = p["axis"]
    return lambda a, _: torch.cumsum(a[0], dim=axis)
  if name == "split":
    sizes, axis = list(p["sizes"]), p["axis"]
    return lambda a, _: torch.split(a[0], sizes, dim=axis)
  if name == compact_lib.TAKE:
    idx, axis = torch.from_numpy(np.array(p["indices"])), p["axis"]
    return lambda a, _: torch.index_select(a[0], axis, idx)
  if name == "conv_general_dilated":
    return _conv(p)
  if name == "dot_general":
    return _dot(step)
  if name in ("reduce_window_max", "reduce_window_sum"):
    return _window(name, p)
  raise compact_lib.UnsupportedOperation(f"the JAX primitive {name!r}")


def _t(x, like):
  """A literal as a tensor of ``like``'s dtype (torch needs one tensor)."""
  if isinstance(x, torch.Tensor):
    return x
  if isinstance(like, torch.Tensor):
    return torch.tensor(x, dtype=like.dtype)
  return torch.tensor(x)


def _broadcast(x, shape, dims):
  view = [1] * len(shape)
  for i, d in enumerate(dims):
    view[d] = x.shape[i]
  return x.reshape(view).expand(shape)


def _squeeze(x, dims):
  for d in dims:
    x = x.squeeze(d)
  return x


def _unsqueeze(x, dims):
  for d in dims:
    x = x.unsqueeze(d)
  return x


def _slices(p, image):
  strides = p.get("strides") or (1,) * len(p["start_indices"])
  return tuple(slice(s, l, k) for s, l, k in zip(
      _shape(p["start_indices"], image), _shape(p["limit_indices"], image),
      strides))


def _select(a):
  pred, cases = a[0], a[1:]
  if len(cases) != 2:
    raise compact_lib.UnsupportedOperation("select_n with more than two cases")
  return torch.where(pred.bool() if pred.dtype != torch.bool else pred,
                     _t(cases[1], cases[0]), _t(cases[0], cases[1]))


def _conv(p):
  dn = p["dimension_numbers"]
  if any(d != 1 for d in p.get("lhs_dilation") or ()):
    raise compact_lib.UnsupportedOperation("a transposed convolution")
  if p.get("batch_group_count", 1) != 1:
    raise compact_lib.UnsupportedOperation("batch_group_count")
  lhs = tuple(dn.lhs_spec)           # NCHW order of the lhs axes
  out_inv = tuple(np.argsort(dn.out_spec))
  padding = p["padding"]
  symmetric = all(lo == hi for lo, hi in padding)
  pad = [v for lo, hi in reversed(padding) for v in (lo, hi)]
  stride = tuple(p["window_strides"])
  dilation = tuple(p.get("rhs_dilation") or (1,) * len(stride))
  groups = p["feature_group_count"]

  def run(a, _):
    x, w = a[0].permute(lhs), a[1]
    if 0 in w.shape[:2]:
      # A layer pruned to nothing, or reading nothing, outputs zeros; torch
      # rejects empty kernels, so only the output size is computed.
      size = [(n + lo + hi - d * (k - 1) - 1) // s + 1 for n, (lo, hi), d, k, s
              in zip(x.shape[2:], padding, dilation, w.shape[2:], stride)]
      return x.new_zeros(x.shape[0], w.shape[0], *size).permute(out_inv)
    return _conv_nchw(x, w).permute(out_inv)

  def _conv_nchw(x, w):
    if symmetric:
      return F.conv2d(x, w, None, stride, [lo for lo, _ in padding],
                      dilation, groups)
    return F.conv2d(F.pad(x, pad), w, None, stride, 0, dilation, groups)

  return run


def _dot(step: Step):
  if _is_linear(step):
    return lambda a, _: F.linear(a[0], a[1])
  (lc, rc), (lb, rb) = step.params["dimension_numbers"]
  letters = iter(string.ascii_letters)

  def spec(rank, contract, batch, shared):
    out = []
    for d in range(rank):
      if d in contract:
        out.append(shared["c"][contract.index(d)])
      elif d in batch:
        out.append(shared["b"][batch.index(d)])
      else:
        out.append(next(letters))
    return out

  shared = {"c": [next(letters) for _ in lc], "b": [next(letters) for _ in lb]}
  cache = {}

  def run(a, _):
    key = (a[0].dim(), a[1].dim())
    if key not in cache:
      ls = spec(a[0].dim(), list(lc), list(lb), shared)
      rs = spec(a[1].dim(), list(rc), list(rb), shared)
      free_l = [c for d, c in enumerate(ls) if d not in lc and d not in lb]
      free_r = [c for d, c in enumerate(rs) if d not in rc and d not in rb]
      out = shared["b"] + free_l + free_r
      cache[key] = f"{''.join(ls)},{''.join(rs)}->{''.join(out)}"
    return torch.einsum(cache[key], a[0], a[1])

  return run


def _window(name, p):
  dims, strides = p["window_dimensions"], p["window_strides"]
  padding = p["padding"]
  if any(d != 1 for d in (p.get("base_dilation") or ())) or any(
      d != 1 for d in (p.get("window_dilation") or ())):
    raise compact_lib.UnsupportedOperation("a dilated pooling window")
  spatial = [i for i, d in enumerate(dims) if d != 1 or strides[i] != 1]
  if len(dims) != 4 or spatial not in ([1, 2], [1], [2]):
    raise compact_lib.UnsupportedOperation("pooling over these axes")
  kernel = (dims[1], dims[2])
  stride = (strides[1], strides[2])
  pad = [padding[2][0], padding[2][1], padding[1][0], padding[1][1]]

  def run(a, _):
    x = a[0].permute(0, 3, 1, 2)
    if name == "reduce_window_max":
      x = F.pad(x, pad, value=float("-inf")) if any(pad) else x
      y = F.max_pool2d(x, kernel, stride)
    else:
      x = F.pad(x, pad) if any(pad) else x
      y = F.avg_pool2d(x, kernel, stride, divisor_override=1)
    return y.permute(0, 2, 3, 1)

  return run
