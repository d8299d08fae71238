"""PyTorch side of DSP packing: the compact modules, tracing, and reading back.

The modules reproduce the released packed checkpoints: top class
``CifarResNet`` (``conv_1_3x3``, ``bn_1``, ``stage_{s}`` Sequentials of
``Compactblock``, ``avgpool``, ``classifier``); a block holds ``layers_a``
(ModuleList of Sequential(Conv2d, BatchNorm2d, ReLU)), ``sampler_a``
(``Sampler_T{n}``), ``concat_a`` (``Concat_T{n}``), ``layers_b``
(Sequential(Conv2d, BatchNorm2d)), ``sampler_b``, ``residual``
(``IAdd_T{n}``) and, where the shape changes, ``downsample``. ``Sampler_T{n}``,
``Concat_T{n}`` and ``IAdd_T{n}`` are generated for any n. Index tensors are
plain attributes, so tracing records them as int64 constants (1 x n x 1 x 1
for samplers, n for index-adds), readable from ``code_with_constants``.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from convert import packing, tables

# Python module under which the released files' classes were traced; using it
# gives our archives the same qualified class names (``__torch__.cifar_model.*``).
TORCH_MODULE = "cifar_model"
BN_EPS = 1e-5  # PyTorch's default, which the Flax BatchNorm reproduces.


def to_tensor(x: np.ndarray) -> torch.Tensor:
  """A torch tensor owning a copy of ``x`` (never aliases numpy memory)."""
  return torch.from_numpy(np.array(x, copy=True))


class Sampler(nn.Module):
  """Splits the channels of x into n index-selected tensors (one per branch)."""

  def __init__(self, indices: Sequence[np.ndarray], index_select: bool = False):
    super().__init__()
    # A plain list (not buffers): tracing turns the tensors into constants.
    self.indices = [to_tensor(np.asarray(i, np.int64)).view(1, -1, 1, 1)
                    for i in indices]
    # take_along_dim is what the TorchScript format records; torch.export
    # needs index_select (take_along_dim's broadcast pins the batch size).
    self.index_select = index_select

  def forward(self, x: torch.Tensor):
    if self.index_select:
      outs = tuple(torch.index_select(x, 1, i.view(-1)) for i in self.indices)
    else:
      outs = tuple(torch.take_along_dim(x, i, 1) for i in self.indices)
    return outs[0] if len(outs) == 1 else outs


class Concat(nn.Module):
  """Concatenates the branch outputs along channels."""

  def forward(self, *xs: torch.Tensor) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(list(xs), 1)


class IAdd(nn.Module):
  """Index-adds each branch output into the shortcut at its filters."""

  def __init__(self, indices: Sequence[np.ndarray]):
    super().__init__()
    self.indices = [to_tensor(np.asarray(i, np.int64)) for i in indices]

  def forward(self, x: torch.Tensor, *ys: torch.Tensor) -> torch.Tensor:
    for index, y in zip(self.indices, ys):
      x = x.index_add_(1, index, y)
    return x


@functools.cache
def numbered(base: type, n: int) -> type:
  """``Sampler_T{n}``, ``Concat_T{n}``, ``IAdd_T{n}``: the class for n branches."""
  if n < 1:
    raise ValueError(f"a packed layer needs >= 1 branch, got {n}")
  return type(f"{base.__name__}_T{n}", (base,), {"__module__": TORCH_MODULE})


class Compactblock(nn.Module):
  """A packed residual block; without branches, shortcut + ReLU."""

  def __init__(self, block: packing.PackedBlock, index_select: bool = False):
    super().__init__()
    self.empty = block.empty
    if not self.empty:
      self._add_branches(block, index_select)
    # Registered last, as in the released files' module tree.
    self.downsample = None
    if block.downsample is not None:
      d = block.downsample
      conv = nn.Conv2d(d["0.weight"].shape[1], d["0.weight"].shape[0],
                       d["0.weight"].shape[-1], block.stride, 0, bias=False)
      conv.weight.data = to_tensor(d["0.weight"])
      self.downsample = nn.Sequential(conv, batchnorm(d, "1."))

  def _add_branches(self, block: packing.PackedBlock,
                    index_select: bool) -> None:
    na, nb = len(block.branches_a), len(block.branches_b)
    self.layers_a = nn.ModuleList(
        nn.Sequential(_conv(br, block.stride), batchnorm(br.bn),
                      nn.ReLU(inplace=True)) for br in block.branches_a)
    self.sampler_a = numbered(Sampler, na)(
        [br.inputs for br in block.branches_a], index_select)
    self.concat_a = numbered(Concat, na)()
    self.layers_b = nn.ModuleList(
        nn.Sequential(_conv(br, 1), batchnorm(br.bn))
        for br in block.branches_b)
    self.sampler_b = numbered(Sampler, nb)(
        [br.inputs for br in block.branches_b], index_select)
    self.residual = numbered(IAdd, nb)([br.outputs for br in block.branches_b])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shortcut = x if self.downsample is None else self.downsample(x)
    if self.empty:
      return F.relu(shortcut)
    xs = self.sampler_a(x)
    xs = xs if isinstance(xs, tuple) else (xs,)
    y = self.concat_a(*[layer(xi) for layer, xi in zip(self.layers_a, xs)])
    ys = self.sampler_b(y)
    ys = ys if isinstance(ys, tuple) else (ys,)
    out = self.residual(shortcut,
                        *[layer(yi) for layer, yi in zip(self.layers_b, ys)])
    return F.relu(out, inplace=True)


class CifarResNet(nn.Module):
  """The packed CifarResNet."""

  def __init__(self, plan: packing.PackedResNet, index_select: bool = False):
    super().__init__()
    w = plan.stem["conv_1_3x3.weight"]
    self.conv_1_3x3 = nn.Conv2d(w.shape[1], w.shape[0], w.shape[-1], 1,
                                w.shape[-1] // 2, bias=False)
    self.conv_1_3x3.weight.data = to_tensor(w)
    self.bn_1 = batchnorm(plan.stem, "bn_1.")
    for s, blocks in enumerate(plan.stages):
      setattr(self, f"stage_{s + 1}",
              nn.Sequential(*[Compactblock(b, index_select) for b in blocks]))
    self.num_stages = len(plan.stages)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    cw = plan.classifier["weight"]
    self.classifier = nn.Linear(cw.shape[1], cw.shape[0])
    self.classifier.weight.data = to_tensor(cw)
    self.classifier.bias.data = to_tensor(plan.classifier["bias"])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn_1(self.conv_1_3x3(x)), inplace=True)
    for s in range(self.num_stages):
      x = getattr(self, f"stage_{s + 1}")(x)
    x = torch.flatten(self.avgpool(x), 1)
    return self.classifier(x)


for _cls in (Compactblock, CifarResNet):
  _cls.__module__ = TORCH_MODULE


def _conv(br: packing.Branch, stride: int) -> nn.Conv2d:
  o, i, k, _ = br.weight.shape
  conv = nn.Conv2d(i, o, k, stride, k // 2, bias=False)
  conv.weight.data = to_tensor(br.weight)
  return conv


def batchnorm(src: Mapping[str, np.ndarray], prefix: str = ""
              ) -> nn.BatchNorm2d:
  """An eval-mode ``BatchNorm2d`` (eps 1e-5) of PyTorch-named tensors.

  Args:
    src: ``{prefix}weight``, ``bias``, ``running_mean``, ``running_var`` and
      optionally ``num_batches_tracked``.
    prefix: key prefix of the BN's tensors in ``src`` (e.g. ``"bn_1."``).

  Returns:
    The module.
  """
  bn = nn.BatchNorm2d(src[prefix + "weight"].shape[0], eps=BN_EPS)
  for k in packing.BN_KEYS:
    getattr(bn, k).data = to_tensor(src[prefix + k])
  nbt = src.get(prefix + tables.NUM_BATCHES)
  if nbt is not None:
    bn.num_batches_tracked.data = to_tensor(np.asarray(nbt, np.int64))
  return bn.eval()


def build(plan: packing.PackedResNet, index_select: bool = False
          ) -> CifarResNet:
  """The eager packed model of a plan, in eval mode, on CPU.

  Args:
    plan: the packed model.
    index_select: gather channels with ``index_select`` instead of
      ``take_along_dim`` (same numbers; what ``torch.export`` needs).

  Returns:
    The module.
  """
  return CifarResNet(plan, index_select).eval()


def trace(plan: packing.PackedResNet, image_size: int = 32
          ) -> torch.jit.ScriptModule:
  """Traces the packed model (eval mode, CPU tensors)."""
  model = build(plan)
  example = torch.zeros(1, plan.stem["conv_1_3x3.weight"].shape[1],
                        image_size, image_size,
                        dtype=torch.from_numpy(plan.stem["conv_1_3x3.weight"]).dtype)
  # cuDNN flags as when the released files were traced (deterministic): they
  # are recorded in every traced convolution call.
  with torch.no_grad(), torch.backends.cudnn.flags(
      enabled=True, benchmark=False, deterministic=True):
    return torch.jit.trace(model, example, check_trace=False)


# ------------------------------------------------------------ reading back
def _np(x: torch.Tensor) -> np.ndarray:
  return x.detach().cpu().numpy().copy()


def _module_state(mod: Any, prefix: str = "") -> dict[str, np.ndarray]:
  return {prefix + k: _np(v) for k, v in mod.state_dict().items()}


def _children(mod: Any) -> dict[str, Any]:
  return dict(mod.named_children())


def _constants(mod: Any) -> tuple[str, dict[str, np.ndarray]]:
  code, consts = mod.code_with_constants
  return code, {k: _np(v) for k, v in consts.const_mapping.items()}


def sampler_indices(mod: Any, where: str) -> list[np.ndarray]:
  """Per-branch index constants of a traced ``Sampler_T{n}``, in output order."""
  code, consts = _constants(mod)
  assigned = dict(
      (var, c) for var, c in re.findall(
          r"(\w+) = torch\.take_along_dim\(\w+, CONSTANTS\.(c\d+), 1\)", code))
  ret = re.search(r"return \(?([\w, ]+?)\)?\s*$", code.strip())
  names = [n.strip() for n in ret.group(1).split(",") if n.strip()] if ret else []
  if not assigned or any(n not in assigned for n in names):
    raise ValueError(f"{where}: not a traced sampler (take_along_dim over "
                     f"constant indices); code was:\n{code}")
  return [consts[assigned[n]].reshape(-1).astype(np.int64) for n in names]


def iadd_indices(mod: Any, where: str) -> list[np.ndarray]:
  """Per-branch index constants of a traced ``IAdd_T{n}``, in argument order."""
  code, consts = _constants(mod)
  sig = re.search(r"def forward\(self,(.*?)\)\s*->", code, re.S)
  args = [a.split(":")[0].strip() for a in sig.group(1).split(",")] if sig else []
  adds = re.findall(
      r"torch\.index_add_\(\w+, 1, CONSTANTS\.(c\d+), (\w+)\)", code)
  if len(args) < 2 or len(adds) != len(args) - 1:
    raise ValueError(f"{where}: not a traced index-add over constant indices; "
                     f"code was:\n{code}")
  by_arg = {arg: c for c, arg in adds}
  return [consts[by_arg[a]].reshape(-1).astype(np.int64) for a in args[1:]]


def _conv_stride(conv: Any) -> int:
  m = re.search(r"_convolution\(\w+, \w+, \w+, \[(\d+), \d+\]", conv.code)
  return int(m.group(1)) if m else 1


def read_packed(module: Any) -> packing.PackedResNet:
  """The plan of a loaded packed TorchScript CifarResNet.

  Args:
    module: ``torch.jit.load(...)`` result.

  Returns:
    The plan (conv_a branch outputs numbered by concat position).

  Raises:
    ValueError: the module is not a packed CifarResNet (what was expected and
      what was found are named).
  """
  top = getattr(module, "original_name", type(module).__name__)
  kids = _children(module)
  need = {"conv_1_3x3", "bn_1", "stage_1", "classifier"}
  if top != "CifarResNet" or not need <= set(kids):
    raise ValueError(
        "expected a packed DSP CifarResNet (top class CifarResNet with "
        f"conv_1_3x3, bn_1, stage_1.., classifier), found class {top!r} with "
        f"children {sorted(kids)}")
  stem = _module_state(kids["conv_1_3x3"], "conv_1_3x3.")
  stem.update(_module_state(kids["bn_1"], "bn_1."))
  stages = []
  s = 1
  while f"stage_{s}" in kids:
    blocks = []
    for b, blk in _children(kids[f"stage_{s}"]).items():
      blocks.append(_read_block(f"stage_{s}.{b}", blk,
                                2 if s > 1 and b == "0" else 1))
    stages.append(blocks)
    s += 1
  classifier = _module_state(kids["classifier"])
  return packing.PackedResNet(stem, stages, classifier)


def _read_block(name: str, blk: Any, default_stride: int) -> packing.PackedBlock:
  if getattr(blk, "original_name", "") != "Compactblock":
    raise ValueError(f"{name}: expected a Compactblock, found "
                     f"{getattr(blk, 'original_name', type(blk).__name__)!r}")
  kids = _children(blk)
  down = _module_state(kids["downsample"]) if "downsample" in kids else None
  if "sampler_a" not in kids:
    return packing.PackedBlock(name, default_stride, [], [], down)
  in_a = sampler_indices(kids["sampler_a"], f"{name}.sampler_a")
  in_b = sampler_indices(kids["sampler_b"], f"{name}.sampler_b")
  out_b = iadd_indices(kids["residual"], f"{name}.residual")
  layers_a = list(_children(kids["layers_a"]).values())
  layers_b = list(_children(kids["layers_b"]).values())
  if not len(in_a) == len(layers_a) or not len(in_b) == len(layers_b) == len(
      out_b):
    raise ValueError(f"{name}: branch counts disagree (sampler_a {len(in_a)}, "
                     f"layers_a {len(layers_a)}, sampler_b {len(in_b)}, "
                     f"layers_b {len(layers_b)}, residual {len(out_b)})")
  stride = _conv_stride(_children(layers_a[0])["0"])
  branches_a, pos = [], 0
  for inputs, layer in zip(in_a, layers_a):
    parts = _children(layer)
    w = _np(parts["0"].weight)
    outputs = np.arange(pos, pos + w.shape[0], dtype=np.int64)
    pos += w.shape[0]
    branches_a.append(packing.Branch(inputs, outputs, w,
                                     _bn_state(parts["1"])))
  branches_b = []
  for inputs, outputs, layer in zip(in_b, out_b, layers_b):
    parts = _children(layer)
    branches_b.append(packing.Branch(inputs, outputs, _np(parts["0"].weight),
                                     _bn_state(parts["1"])))
  return packing.PackedBlock(name, stride, branches_a, branches_b, down)


def _bn_state(bn: Any) -> dict[str, np.ndarray]:
  st = _module_state(bn)
  return {k: st[k] for k in packing.BN_KEYS}


# ------------------------------------------------ dense functional forward
def dense_forward(state_dict: dict[str, Any], x: torch.Tensor,
                  masks: dict[str, Any] | None = None) -> torch.Tensor:
  """Evaluation-mode forward of a dense CifarResNet state dict (reference names).

  Used to check exported/reference state dicts without the Flax model.

  Args:
    state_dict: reference-named tensors (``.mask`` (O, I, 1, 1) entries are
      applied to their conv when present).
    x: NCHW batch.
    masks: extra ``{conv_name: (O, I, 1, 1)}`` masks.

  Returns:
    Logits.
  """
  sd = {k: torch.as_tensor(v) for k, v in state_dict.items()}
  masks = {k[:-len(".mask")]: v for k, v in sd.items() if k.endswith(".mask")
           } | dict(masks or {})

  def conv(name, x, stride, pad):
    w = sd[name + ".weight"]
    if name in masks:
      w = w * torch.as_tensor(masks[name])
    return F.conv2d(x, w, None, stride, pad)

  def bn(name, x):
    return F.batch_norm(x, sd[name + ".running_mean"], sd[name + ".running_var"],
                        sd[name + ".weight"], sd[name + ".bias"], False, 0.0,
                        1e-5)

  x = F.relu(bn("bn_1", conv("conv_1_3x3", x, 1, 1)))
  s = 1
  while f"stage_{s}.0.conv_a.weight" in sd:
    b = 0
    while f"stage_{s}.{b}.conv_a.weight" in sd:
      n = f"stage_{s}.{b}"
      stride = 2 if s > 1 and b == 0 else 1
      y = F.relu(bn(n + ".bn_a", conv(n + ".conv_a", x, stride, 1)))
      y = bn(n + ".bn_b", conv(n + ".conv_b", y, 1, 1))
      if f"{n}.downsample.0.weight" in sd:
        x = bn(n + ".downsample.1", conv(n + ".downsample.0", x, stride, 0))
      x = F.relu(x + y)
      b += 1
    s += 1
  x = x.mean((2, 3))
  return F.linear(x, sd["classifier.weight"], sd["classifier.bias"])
