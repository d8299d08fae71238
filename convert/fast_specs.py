"""``convert.fast.NetSpec`` of packed DSP plans and of DDROP slimmed modules.

Both describe every conv by what pruning kept, BatchNorm folded:

* ``from_packed``: a ``convert.packing.PackedResNet`` (ours or a released
  file's, read back): conv_a's branches over the block input, conv_b's
  branches over conv_a's filters (their dense numbering) writing into the
  residual space at their index-add channels;
* ``from_slim``: a ``convert.torch_zoo.SlimResNet`` / ``SlimVGG`` module: one
  branch per conv; a block's last conv writes its kept filters into the
  residual space at the block's ``index``.

Another packer describes its model the same way (``ConvSpec`` per layer:
per branch, kept inputs and kept filters) and gets the same formulations.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from torch import nn

from convert import packing
from convert.fast import (BlockSpec, BranchSpec, ConvSpec, NetSpec, PoolSpec,
                          dense_conv_spec, fold_bn)


def _np(t: Any) -> np.ndarray:
  return t.detach().cpu().numpy().copy()


def _bn_arrays(bn: Mapping[str, Any], prefix: str = ""
               ) -> dict[str, np.ndarray]:
  return {k: np.asarray(bn[prefix + k]) for k in packing.BN_KEYS}


def _is_dense(conv: ConvSpec) -> bool:
  return len(conv.branches) == 1 and (
      len(conv.branches[0].inputs) == conv.in_width) and (
          len(conv.branches[0].outputs) == conv.out_width)


def from_packed(plan: packing.PackedResNet, model: str, image_size: int = 32
                ) -> NetSpec:
  """The spec of a packed CifarResNet.

  Args:
    plan: the packed model.
    model: its registry name (for the plan's record).
    image_size: input height/width.

  Returns:
    The spec (``pruned`` False when every layer is dense).
  """
  w = plan.stem["conv_1_3x3.weight"]
  k = w.shape[-1]
  sw, sb = fold_bn(w, None, _bn_arrays(plan.stem, "bn_1."))
  body: list[Any] = [dense_conv_spec("conv_1_3x3", sw, sb, 1, k // 2,
                                     image_size, True)]
  hw, cur = image_size, w.shape[0]
  pruned = False
  for width, blocks in zip(plan.widths, plan.stages):
    for blk in blocks:
      short = None
      if blk.downsample is not None:
        d = blk.downsample
        dw, db = fold_bn(d["0.weight"], None, _bn_arrays(d, "1."))
        short = dense_conv_spec(f"{blk.name}.downsample", dw, db, blk.stride,
                                0, hw, False)
      main = []
      if not blk.empty:
        ka = blk.branches_a[0].weight.shape[-1]
        kb = blk.branches_b[0].weight.shape[-1]
        conv_a = ConvSpec(f"{blk.name}.conv_a", cur, width, ka, blk.stride,
                          ka // 2, hw, [BranchSpec(br.inputs, br.outputs,
                                                   *fold_bn(br.weight, None,
                                                            br.bn))
                                        for br in blk.branches_a], True)
        produced = np.concatenate([br.outputs for br in blk.branches_a])
        conv_b = ConvSpec(f"{blk.name}.conv_b", width, width, kb, 1, kb // 2,
                          conv_a.out_hw,
                          [BranchSpec(produced[br.inputs], br.outputs,
                                      *fold_bn(br.weight, None, br.bn))
                           for br in blk.branches_b], False)
        main = [conv_a, conv_b]
        pruned |= not (_is_dense(conv_a) and _is_dense(conv_b))
      else:
        pruned = True
      body.append(BlockSpec(blk.name, main, short, width))
      hw = (hw - 1) // blk.stride + 1
      cur = width
  head = [("linear", plan.classifier["weight"], plan.classifier["bias"])]
  return NetSpec(model, image_size, w.shape[1], body, None, head, pruned)


def _conv_bn(name: str, conv: nn.Conv2d, bn: nn.Module, hw: int, relu: bool,
             outputs: np.ndarray | None = None,
             out_width: int | None = None) -> ConvSpec:
  bias = None if conv.bias is None else _np(conv.bias)
  w, b = fold_bn(_np(conv.weight), bias,
                 {k: _np(getattr(bn, k)) for k in packing.BN_KEYS},
                 float(bn.eps))
  return dense_conv_spec(name, w, b, conv.stride[0], conv.padding[0], hw, relu,
                         outputs, out_width)


def _head(classifier: nn.Module) -> list[tuple]:
  from convert import torch_zoo  # pylint: disable=import-outside-toplevel
  out = []
  for m in (classifier if isinstance(classifier, nn.Sequential)
            else [classifier]):
    if isinstance(m, nn.Linear):
      out.append(("linear", _np(m.weight), _np(m.bias)))
    elif isinstance(m, nn.ReLU):
      out.append(("relu",))
    elif isinstance(m, torch_zoo.SlimLayerNorm):
      # A norm that lost no unit has no ``removed`` buffer.
      removed = getattr(m, "removed", None)
      out.append(("slim_layernorm", _np(m.weight), _np(m.bias), m.width,
                  np.zeros((0,), np.float32) if removed is None
                  else _np(removed), m.eps))
    elif not isinstance(m, nn.Dropout):  # eval mode: dropout is the identity
      raise ValueError(f"unsupported head module {type(m).__name__}")
  return out


def from_slim(module: nn.Module, model: str, image_size: int,
              pruned: bool = True) -> NetSpec:
  """The spec of a slimmed ``SlimResNet`` / ``SlimVGG``.

  Args:
    module: the slimmed module (``convert.slim.slim``).
    model: its registry name.
    image_size: input height/width.
    pruned: whether slimming removed anything.

  Returns:
    The spec.
  """
  from convert import torch_zoo  # pylint: disable=import-outside-toplevel
  body: list[Any] = []
  hw = image_size
  if isinstance(module, torch_zoo.SlimVGG):
    feats = list(module.features)
    in_ch = feats[0].in_channels
    i = 0
    while i < len(feats):
      m = feats[i]
      if isinstance(m, nn.MaxPool2d):
        body.append(PoolSpec(int(m.kernel_size), int(m.stride),
                             int(m.padding)))
        hw = (hw + 2 * int(m.padding) - int(m.kernel_size)) // int(
            m.stride) + 1
        i += 1
        continue
      relu = i + 2 < len(feats) and isinstance(feats[i + 2], nn.ReLU)
      spec = _conv_bn(f"features.{i}", m, feats[i + 1], hw, relu)
      body.append(spec)
      hw = spec.out_hw
      i += 3 if relu else 2
    pool = None
    if module.avgpool is not None:
      size = module.avgpool.output_size
      pool = int(size[0] if isinstance(size, (tuple, list)) else size)
    return NetSpec(model, image_size, in_ch, body, pool,
                   _head(module.classifier), pruned)
  if not isinstance(module, torch_zoo.SlimResNet):
    raise ValueError(f"expected a SlimResNet or SlimVGG, got "
                     f"{type(module).__name__}")
  stem = _conv_bn("conv1", module.conv1, module.bn1, hw, True)
  body.append(stem)
  hw, cur = stem.out_hw, stem.out_width
  if module.maxpool is not None:
    body.append(PoolSpec(3, 2, 1))
    hw = (hw + 2 - 3) // 2 + 1
  for s in range(module.num_layers):
    for b, blk in enumerate(getattr(module, f"layer{s + 1}")):
      name = f"layer{s + 1}.{b}"
      short, width = None, cur
      if blk.downsample is not None:
        conv, bn = blk.downsample[0], blk.downsample[1]
        short = _conv_bn(f"{name}.downsample", conv, bn, hw, False)
        width = short.out_width
      main, h = [], hw
      for j, (c, n) in enumerate(blk.pairs):
        last = j + 1 == len(blk.pairs)
        spec = _conv_bn(f"{name}.{c}", getattr(blk, c), getattr(blk, n), h,
                        not last, _np(blk.index) if last else None,
                        width if last else None)
        main.append(spec)
        h = spec.out_hw
      const = None if blk.pairs else _np(blk.const)
      body.append(BlockSpec(name, main, short, width, const))
      if short is not None:
        hw = short.out_hw
      elif main:
        hw = main[-1].out_hw
      cur = width
  return NetSpec(model, image_size, module.conv1.in_channels, body, None,
                 _head(module.fc), pruned)
