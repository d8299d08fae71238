"""DSP packing as data: masked dense CifarResNet <-> compact multi-branch plan.

Numpy only. ``pack_cifar_resnet`` turns a masked dense model (PyTorch-layout
state dict plus per-conv masks) into a ``PackedResNet`` plan, following the
orders that make packed files reproducible (rows scanned in filter order,
branches keyed by their kept-input pattern in order of first appearance,
sampler and index-add indices ascending); ``unpack_cifar_resnet`` is its
inverse up to the numbering of conv_a's filters, which a packed file does not
keep. ``convert.dsp_torch`` turns a plan into TorchScript and back.

The channel-slicing pieces (``group_rows``, ``slice_conv``, ``slice_bn``,
``apply_masks``) do not know about residual blocks and serve any slimmer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from models import paths
from convert import tables

Array = np.ndarray
BN_KEYS = ("weight", "bias", "running_mean", "running_var")


# ------------------------------------------------------------ slicing pieces
def apply_masks(variables: Mapping[str, Any]) -> dict[str, Any]:
  """``params`` multiplied by the ``masks`` collection, as the forward pass does.

  Conv/dense kernels by their (I, O) mask (broadcast over space), a layer's
  bias by the max of its mask over inputs, norm scale and bias by the (C,)
  mask. Other collections are returned unchanged.

  Args:
    variables: model variables, numpy or jax arrays.

  Returns:
    A new variables dict (numpy arrays) whose ``params`` need no masks.
  """
  out = {k: v for k, v in variables.items() if k != tables.MASKS}
  params = _copy_tree(variables[tables.PARAMS])
  masks = variables.get(tables.MASKS, {})
  for path, mask in paths.leaves(masks):
    mod, leaf = path[:-1], path[-1]
    p = paths.get(params, mod)
    mask = np.asarray(mask)
    if p is None:
      raise KeyError(f"masks/{'/'.join(path)} has no layer in params")
    if leaf == "kernel":
      p["kernel"] = np.asarray(p["kernel"]) * mask.astype(
          np.asarray(p["kernel"]).dtype)
      if "bias" in p:
        p["bias"] = np.asarray(p["bias"]) * np.max(mask, axis=0)
    elif leaf == "scale":
      p["scale"] = np.asarray(p["scale"]) * mask
      if "bias" in p:  # a scale-only norm (DDROP's DummyNorm) has none
        p["bias"] = np.asarray(p["bias"]) * mask
  out[tables.PARAMS] = params
  return out


def _copy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
  return {k: _copy_tree(v) if isinstance(v, Mapping) else np.asarray(v)
          for k, v in tree.items()}


def group_rows(mask: Array) -> list[tuple[Array, Array]]:
  """Groups the rows of an (O, I) mask by their kept-input pattern.

  All-zero rows are dropped; groups appear in order of first occurrence when
  rows are scanned in filter order.

  Args:
    mask: (O, I) connectivity, nonzero = kept.

  Returns:
    ``[(inputs, rows)]``: each group's kept input indices (ascending) and its
    rows (ascending), both int64.
  """
  keep = np.asarray(mask) != 0
  groups: dict[bytes, list[int]] = {}
  for o in range(keep.shape[0]):
    if keep[o].any():
      groups.setdefault(keep[o].tobytes(), []).append(o)
  return [(np.flatnonzero(keep[rows[0]]).astype(np.int64),
           np.asarray(rows, np.int64)) for rows in groups.values()]


def slice_conv(weight: Array, rows: Array, cols: Array) -> Array:
  """OIHW weight restricted to filters ``rows`` and inputs ``cols`` (in order)."""
  w = tables.slice_channels(weight, rows, 0)
  return tables.slice_channels(w, cols, 1)


def slice_bn(bn: Mapping[str, Array], index: Array) -> dict[str, Array]:
  """BatchNorm tensors (weight, bias, running stats) restricted to ``index``."""
  return {k: tables.slice_channels(bn[k], index, 0) for k in BN_KEYS}


# ------------------------------------------------------------------- plans
@dataclasses.dataclass
class Branch:
  """One branch of a packed layer.

  Attributes:
    inputs: sampler indices into the branch's source tensor (the block input
      for conv_a, the concatenated conv_a output for conv_b).
    outputs: the branch's filters in the dense layer's numbering (conv_b: the
      index-add indices).
    weight: OIHW weight of the branch conv.
    bn: its BatchNorm tensors (``BN_KEYS``).
  """

  inputs: Array
  outputs: Array
  weight: Array
  bn: dict[str, Array]


@dataclasses.dataclass
class PackedBlock:
  """A packed residual block; no branches means shortcut + ReLU only.

  Attributes:
    name: PyTorch name, ``stage_{s}.{b}``.
    stride: stride of conv_a (and of the shortcut).
    branches_a: conv_a branches (conv + BN + ReLU), concatenated in order.
    branches_b: conv_b branches (conv + BN), index-added into the shortcut.
    downsample: ``{'0.weight', '1.weight', '1.bias', '1.running_mean',
      '1.running_var', '1.num_batches_tracked'}`` or None (identity).
  """

  name: str
  stride: int
  branches_a: list[Branch]
  branches_b: list[Branch]
  downsample: dict[str, Array] | None

  @property
  def empty(self) -> bool:
    return not self.branches_a or not self.branches_b


@dataclasses.dataclass
class PackedResNet:
  """A packed CifarResNet.

  Attributes:
    stem: ``conv_1_3x3.weight`` and ``bn_1.*`` tensors.
    stages: blocks of each stage.
    classifier: ``weight`` (classes, C) and ``bias``.
  """

  stem: dict[str, Array]
  stages: list[list[PackedBlock]]
  classifier: dict[str, Array]

  @property
  def widths(self) -> tuple[int, ...]:
    out = [self.stem["conv_1_3x3.weight"].shape[0]]
    for blocks in self.stages[1:]:
      out.append(blocks[0].downsample["0.weight"].shape[0])
    return tuple(out)

  @property
  def depth(self) -> int:
    return 6 * len(self.stages[0]) + 2

  @property
  def num_classes(self) -> int:
    return int(self.classifier["weight"].shape[0])


def _bn(sd: Mapping[str, Array], name: str) -> dict[str, Array]:
  return {k: np.asarray(sd[f"{name}.{k}"]) for k in BN_KEYS}


def pack_block(name: str, stride: int, sd: Mapping[str, Array],
               masks: Mapping[str, Array],
               downsample: dict[str, Array] | None) -> PackedBlock:
  """Packs one residual block (spec: DSP packing, orders included).

  Args:
    name: ``stage_{s}.{b}``.
    stride: the block's stride.
    sd: masked dense state dict (PyTorch names and layouts).
    masks: ``{conv_name: (O, I) mask}`` for conv_a and conv_b.
    downsample: the shortcut tensors, or None.

  Returns:
    The packed block.
  """
  wa, wb = sd[f"{name}.conv_a.weight"], sd[f"{name}.conv_b.weight"]
  bn_a, bn_b = _bn(sd, f"{name}.bn_a"), _bn(sd, f"{name}.bn_b")
  branches_a = [Branch(inputs, rows, slice_conv(wa, rows, inputs),
                       slice_bn(bn_a, rows))
                for inputs, rows in group_rows(masks[f"{name}.conv_a"])]
  # Channels of the concatenated conv_a output, branch by branch.
  produced = [c for br in branches_a for c in br.outputs]
  position = {c: p for p, c in enumerate(produced)}
  branches_b = []
  for kept, rows in group_rows(masks[f"{name}.conv_b"]) if branches_a else ():
    kept_set = set(kept.tolist())
    channels = np.asarray([c for c in produced if c in kept_set], np.int64)
    if channels.size == 0:
      raise ValueError(
          f"{name}.conv_b filters {rows.tolist()} read only conv_a channels "
          f"{kept.tolist()} that conv_a does not produce; zero these rows of "
          "the conv_b mask (and their bn_b mask) before packing")
    branches_b.append(Branch(
        np.asarray([position[c] for c in channels], np.int64), rows,
        slice_conv(wb, rows, channels), slice_bn(bn_b, rows)))
  if not branches_a or not branches_b:
    branches_a, branches_b = [], []
  return PackedBlock(name, stride, branches_a, branches_b, downsample)


def pack_cifar_resnet(sd: Mapping[str, Array], masks: Mapping[str, Array],
                      blocks_per_stage: int, num_stages: int = 3
                      ) -> PackedResNet:
  """Packs a masked dense CifarResNet.

  Args:
    sd: masked dense state dict, PyTorch names and layouts (numpy).
    masks: ``{conv_name: (O, I)}`` for every conv_a/conv_b.
    blocks_per_stage: n of depth 6n+2.
    num_stages: stages (3 for CIFAR ResNets).

  Returns:
    The plan.
  """
  stages = []
  for s in range(1, num_stages + 1):
    blocks = []
    for b in range(blocks_per_stage):
      name = f"stage_{s}.{b}"
      prefix = f"{name}.downsample."
      down = {k[len(prefix):]: np.asarray(v) for k, v in sd.items()
              if k.startswith(prefix)} or None
      blocks.append(pack_block(name, 2 if s > 1 and b == 0 else 1, sd, masks,
                               down))
    stages.append(blocks)
  stem = {k: np.asarray(v) for k, v in sd.items()
          if k.startswith(("conv_1_3x3.", "bn_1."))}
  classifier = {"weight": np.asarray(sd["classifier.weight"]),
                "bias": np.asarray(sd["classifier.bias"])}
  return PackedResNet(stem, stages, classifier)


def unpack_cifar_resnet(plan: PackedResNet
                        ) -> tuple[dict[str, Array], dict[str, Array],
                                   dict[str, Array]]:
  """Dense-shaped tensors equivalent to a plan.

  conv_a filters go to the dense channels named by the conv_a branches'
  ``outputs``; conv_b inputs are mapped back through them.

  Args:
    plan: a packed model.

  Returns:
    ``(state_dict, conv_masks, bn_masks)``: the dense state dict (PyTorch
    names/layouts, zeros where pruned; unused BN channels get mean 0, var 1),
    ``{conv_name: (O, I)}`` masks of conv_a/conv_b, and ``{bn_name: (C,)}``
    masks of bn_a/bn_b.
  """
  sd: dict[str, Array] = dict(plan.stem)
  conv_masks: dict[str, Array] = {}
  bn_masks: dict[str, Array] = {}
  in_ch = plan.stem["conv_1_3x3.weight"].shape[0]
  dtype = plan.stem["conv_1_3x3.weight"].dtype
  for width, blocks in zip(plan.widths, plan.stages):
    for blk in blocks:
      ka = kb = 3
      if blk.branches_a:
        ka = blk.branches_a[0].weight.shape[-1]
        kb = blk.branches_b[0].weight.shape[-1]
      wa = np.zeros((width, in_ch, ka, ka), dtype)
      wb = np.zeros((width, width, kb, kb), dtype)
      ma = np.zeros((width, in_ch), dtype)
      mb = np.zeros((width, width), dtype)
      bns = {n: _empty_bn(width, dtype) for n in ("bn_a", "bn_b")}
      bnm = {n: np.zeros((width,), dtype) for n in ("bn_a", "bn_b")}
      produced = np.asarray([c for br in blk.branches_a for c in br.outputs],
                            np.int64)
      for br in blk.branches_a:
        wa[np.ix_(br.outputs, br.inputs)] = br.weight
        ma[np.ix_(br.outputs, br.inputs)] = 1
        _put_bn(bns["bn_a"], bnm["bn_a"], br)
      for br in blk.branches_b:
        cols = produced[br.inputs]
        wb[np.ix_(br.outputs, cols)] = br.weight
        mb[np.ix_(br.outputs, cols)] = 1
        _put_bn(bns["bn_b"], bnm["bn_b"], br)
      n = blk.name
      sd[f"{n}.conv_a.weight"], sd[f"{n}.conv_b.weight"] = wa, wb
      for bn_name, bn in bns.items():
        for k, v in bn.items():
          sd[f"{n}.{bn_name}.{k}"] = v
        bn_masks[f"{n}.{bn_name}"] = bnm[bn_name]
      conv_masks[f"{n}.conv_a"], conv_masks[f"{n}.conv_b"] = ma, mb
      if blk.downsample is not None:
        for k, v in blk.downsample.items():
          sd[f"{n}.downsample.{k}"] = v
      in_ch = width
  sd["classifier.weight"] = plan.classifier["weight"]
  sd["classifier.bias"] = plan.classifier["bias"]
  return sd, conv_masks, bn_masks


def _empty_bn(width: int, dtype: Any) -> dict[str, Array]:
  return {"weight": np.zeros((width,), dtype), "bias": np.zeros((width,), dtype),
          "running_mean": np.zeros((width,), dtype),
          "running_var": np.ones((width,), dtype),
          "num_batches_tracked": np.asarray(0, np.int64)}


def _put_bn(bn: dict[str, Array], mask: Array, br: Branch) -> None:
  for k in BN_KEYS:
    bn[k][br.outputs] = br.bn[k]
  mask[br.outputs] = 1


def plans_equal(a: PackedResNet, b: PackedResNet) -> list[str]:
  """Differences between two plans (empty when identical), for tests/inspect."""
  diffs = []

  def cmp(name, x, y):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y):
      diffs.append(name)

  for k in sorted(set(a.stem) | set(b.stem)):
    if k not in a.stem or k not in b.stem:
      diffs.append(k)
    else:
      cmp(k, a.stem[k], b.stem[k])
  for k in ("weight", "bias"):
    cmp(f"classifier.{k}", a.classifier[k], b.classifier[k])
  blocks_a = [blk for s in a.stages for blk in s]
  blocks_b = [blk for s in b.stages for blk in s]
  if len(blocks_a) != len(blocks_b):
    return diffs + ["number of blocks"]
  for x, y in zip(blocks_a, blocks_b):
    if x.name != y.name or x.stride != y.stride:
      diffs.append(f"{x.name}: name/stride")
    for side in ("a", "b"):
      bx, by = getattr(x, f"branches_{side}"), getattr(y, f"branches_{side}")
      if len(bx) != len(by):
        diffs.append(f"{x.name}.layers_{side}: {len(bx)} vs {len(by)} branches")
        continue
      for j, (p, q) in enumerate(zip(bx, by)):
        pre = f"{x.name}.layers_{side}.{j}"
        cmp(pre + ".inputs", p.inputs, q.inputs)
        cmp(pre + ".weight", p.weight, q.weight)
        if side == "b":
          cmp(pre + ".outputs", p.outputs, q.outputs)
        for k in BN_KEYS:
          cmp(f"{pre}.bn.{k}", p.bn[k], q.bn[k])
    if (x.downsample is None) != (y.downsample is None):
      diffs.append(f"{x.name}.downsample")
    elif x.downsample is not None:
      for k in sorted(set(x.downsample) | set(y.downsample)):
        cmp(f"{x.name}.downsample.{k}", x.downsample.get(k, np.nan),
            y.downsample.get(k, np.nan))
  return diffs
