"""DSP export of any pruned CNN or ViT / Swin: a compact PyTorch network.

The DSP CIFAR ResNets keep the released files' format (``convert.dsp``).
Every other model the channel-flow structure describes (torchvision-layout
ResNets with basic or bottleneck blocks, VGG-bn) is packed here, in two
steps:

1. ``convert.slim.slim`` removes what the masks leave without effect: filters
   whose norm is masked to zero, the input channels their consumers lose, and
   blocks whose main branch keeps no filter (they add a constant). The result
   has torchvision's module names.
2. Every taking-part conv of that network becomes a ``BranchConv``: its kept
   filters are grouped by identical kept-input pattern (spec dsp.md §4:
   rows scanned in filter order, branches in order of first appearance), each
   branch a dense conv over its own input channels; the branch outputs are
   concatenated and put back in filter order. The convs of the same group
   read the same input channels, so G groups give (at most) G small convs.

A ViT / Swin pruned on its MLPs is slimmed by ``convert.transformer_torch``:
per MLP, fc1 is one Linear over the union of its groups' kept input features
producing only its kept hidden units, fc2 one Linear over those producing its
kept outputs, index-added into the residual stream (``SlimMlp``);
``branches.json`` still lists each Linear's groups.

``export_branched`` writes ``packed.pt`` (TorchScript, ``torch.jit.load``),
``packed.pt2`` (``torch.export``), ``packed_state_dict.pt`` (the compact
module's state dict, ``torch.load(path, weights_only=True)``), ``branches.json``
(per taking-part conv: its kept input channels and filters and its branches,
in the model's channel numbering) and ``reference_io.npz``, and checks every
file's logits against the masked Flax model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

import models
from models.layers import input_channels
from convert import description as desc_lib
from convert import packing, slim, writer
from convert.dsp_torch import to_tensor
from training import artifacts

TORCHSCRIPT, PROGRAM, STATE_DICT, BRANCHES = (
    "packed.pt", "packed.pt2", "packed_state_dict.pt", "branches.json")


class BranchConv(nn.Module):
  """A conv split into branches, each over its own subset of input channels.

  Args:
    convs: one ``nn.Conv2d`` per branch.
    inputs: per branch, the input channels it reads (int64).
    order: output channel j of the layer is channel ``order[j]`` of the
      concatenated branch outputs (None: already in order).
  """

  def __init__(self, convs: list[nn.Conv2d], inputs: list[torch.Tensor],
               order: torch.Tensor | None):
    super().__init__()
    self.branches = nn.ModuleList(convs)
    self.num_branches = len(convs)
    for j, index in enumerate(inputs):
      self.register_buffer(f"inputs_{j}", index)
    self.reorder = order is not None
    if order is not None:
      self.register_buffer("order", order)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    ys = [conv(x.index_select(1, getattr(self, f"inputs_{j}")))
          for j, conv in enumerate(self.branches)]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, 1)
    return y.index_select(1, self.order) if self.reorder else y


def branch_conv(conv: nn.Conv2d) -> tuple[BranchConv, list[tuple[np.ndarray,
                                                                 np.ndarray]]]:
  """Splits a dense conv into branches by the kept-input pattern of its rows.

  Filters whose kernel is all zero (their output is their bias) form one
  more branch reading input channel 0 with zero weights.

  Args:
    conv: the (slimmed) conv; zero kernels (o, i) are the pruned ones.

  Returns:
    The module and, per branch, ``(inputs, filters)`` as positions in the
    conv's input and output channels.
  """
  w = conv.weight.detach().cpu().numpy()
  conn = np.any(w != 0, axis=(2, 3))                     # (O, I)
  groups = packing.group_rows(conn.astype(np.float32))
  empty = np.flatnonzero(~conn.any(axis=1)).astype(np.int64)
  if len(empty):
    groups.append((np.zeros((1,), np.int64), empty))
  bias = None if conv.bias is None else conv.bias.detach().cpu().numpy()
  convs, inputs = [], []
  for cols, rows in groups:
    c = nn.Conv2d(len(cols), len(rows), conv.kernel_size, conv.stride,
                  conv.padding, bias=bias is not None)
    c.weight = nn.Parameter(to_tensor(packing.slice_conv(w, rows, cols)))
    if bias is not None:
      c.bias = nn.Parameter(to_tensor(bias[rows]))
    convs.append(c)
    inputs.append(to_tensor(cols))
  rows = np.concatenate([r for _, r in groups])
  order = np.argsort(rows).astype(np.int64)
  same = np.array_equal(order, np.arange(len(rows)))
  return (BranchConv(convs, inputs, None if same else to_tensor(order)),
          groups)


def _parent(module: nn.Module, name: str) -> tuple[nn.Module, str] | None:
  """The parent module and attribute of the submodule ``name`` (or None)."""
  *path, leaf = name.split(".")
  node = module
  for part in path:
    if not hasattr(node, part):
      return None
    node = getattr(node, part)
  return (node, leaf) if isinstance(getattr(node, leaf, None),
                                    nn.Conv2d) else None


def _linear_entry(layer: Any, folded: Mapping[str, Any]) -> dict[str, Any]:
  """``branches.json`` entry of a taking-part Linear (a transformer MLP's).

  Its groups of units with the same kept inputs are listed as branches, as
  for a conv; the export computes them with one Linear over the union of
  their inputs (``convert.transformer_torch.SlimMlp``), zeros where a group
  does not read an input.
  """
  node = folded
  for k in layer.path:
    node = node[k]
  conn = np.asarray(node["kernel"]) != 0                  # (I, O)
  groups = packing.group_rows(conn.T.astype(np.float32))
  return {"layer": layer.name,
          "inputs": np.flatnonzero(conn.any(axis=1)).tolist(),
          "filters": np.flatnonzero(conn.any(axis=0)).tolist(),
          "branches": [{"inputs": c.tolist(), "filters": r.tolist()}
                       for c, r in groups]}


@dataclasses.dataclass
class Packed:
  """A packed model and its description.

  Attributes:
    module: the compact torch module (eval mode, CPU).
    layers: per taking-part conv, ``{'layer', 'inputs', 'filters',
      'branches': [{'inputs', 'filters'}]}`` in the model's channel numbers
      (a conv removed with its whole block has no entry).
    summary: what slimming removed.
  """

  module: nn.Module
  layers: list[dict[str, Any]]
  summary: slim.SlimSummary


def pack(model: Any, variables: Mapping[str, Any],
         image_size: int | None = None) -> Packed:
  """The pruned Flax model as a compact multi-branch torch module.

  Args:
    model: a Flax ``models.resnet.ResNet``, ``models.vgg.VGG`` or a ViT / Swin.
    variables: its pruned variables (``params``, ``batch_stats``, ``masks``).
    image_size: input height/width (default: the model's).

  Returns:
    The packed module and its description.
  """
  size = slim._image_size(model, image_size)  # pylint: disable=protected-access
  module, summary = slim.slim(model, variables, size)
  structure = models.analyze(model, size)
  keep = slim.kept_units(structure, artifacts.to_numpy_tree(dict(variables)))
  layers = []
  folded = packing.apply_masks(artifacts.to_numpy_tree(dict(variables)))
  for l in structure.taking_part:
    if l.kind == "dense":  # a transformer MLP Linear: one compact Linear
      layers.append(_linear_entry(l, folded["params"]))
      continue
    found = _parent(module, l.name)
    if found is None:
      # Only a block whose main branch keeps nothing (it adds a constant)
      # may be gone; anything else is a module the names do not reach.
      if len(keep[l.path]):
        raise desc_lib.WidthMismatch(
            f"{l.name}: the slimmed module has no such conv, but the pruned "
            f"network keeps {len(keep[l.path])} of its filters")
      continue
    parent, attr = found
    cols = slim._input_cols(l, structure, keep)  # pylint: disable=protected-access
    rows = keep[l.path]
    bc, groups = branch_conv(getattr(parent, attr))
    setattr(parent, attr, bc)
    layers.append({
        "layer": l.name, "inputs": cols.tolist(), "filters": rows.tolist(),
        "branches": [{"inputs": cols[c].tolist(), "filters": rows[r].tolist()}
                     for c, r in groups]})
  return Packed(module.eval(), layers, summary)


def export_branched(model: Any, variables: Mapping[str, Any],
                    out_dir: str | os.PathLike, image_size: int | None = None,
                    *, images: np.ndarray | None = None, num_images: int = 4,
                    seed: int = 0, atol: float = 1e-4, program: bool = True,
                    description: desc_lib.Description | None = None
                    ) -> writer.ExportResult:
  """Packs a DSP-pruned Flax model and writes the PyTorch files.

  Args:
    model: a Flax ``ResNet``, ``VGG``, ViT or Swin.
    variables: its pruned variables.
    out_dir: directory to write into (created).
    image_size: input height/width (default: the model's).
    images: NHWC check images; ``num_images`` random ones when None.
    num_images: number of random check images.
    seed: seed of the random images.
    atol: largest accepted |logit| difference.
    program: also write the ``torch.export`` program.
    description: the pruned network's description (computed when None):
      every taking-part layer's branches are checked against it.

  Returns:
    Paths, measured differences, branches per layer and the slimming summary.

  Raises:
    convert.writer.ConversionMismatch: a file's logits differ by more than
      atol.
    convert.description.WidthMismatch: a layer missing from the module, or
      whose kept filters differ from the description's.
  """
  size = slim._image_size(model, image_size)  # pylint: disable=protected-access
  if description is None:
    description = desc_lib.describe(model, variables,
                                    (size, size, input_channels(model)))
  packed = pack(model, variables, size)
  widths = {l["layer"]: (len(l["inputs"]), len(l["filters"]))
            for l in packed.layers}
  desc_lib.check_module_widths(
      description, widths,
      only=[l.path for l in description.graph.taking_part])
  images, want = writer.check_images(
      model, variables, (size, size, input_channels(model)), images,
      num_images, seed)
  names = {writer.TORCHSCRIPT: TORCHSCRIPT, writer.STATE_DICT: STATE_DICT}
  if program:
    names[writer.PROGRAM] = PROGRAM
  r = writer.write(packed.module, out_dir, names, images, want, atol=atol,
                   fresh=False)
  text = json.dumps({"model": type(models.unwrap(model)).__name__,
                     "image_size": size, "layers": packed.layers}, indent=1)
  r.files[BRANCHES] = writer.save(pathlib.Path(out_dir) / BRANCHES,
                                  lambda f: f.write(text.encode()))
  branches = {l["layer"]: len(l["branches"]) for l in packed.layers}
  r.details.update(branches=branches, summary=packed.summary)
  return r


def family_supported(model: Any) -> bool:
  """Whether ``export_branched`` packs this model (ResNet, VGG, ViT, Swin)."""
  from models import swin, vit  # pylint: disable=import-outside-toplevel
  if isinstance(models.unwrap(model), (vit.VisionTransformer, swin.SwinTransformer)):
    return True
  try:
    slim.family_of(model)
  except ValueError:
    return False
  return True


