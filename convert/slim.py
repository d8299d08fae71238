"""DDROP export: a pruned Flax ResNet / VGG-bn, physically slimmed, to PyTorch.

DDROP pruning (spec ddrop.md section 5) zeroes units: a conv filter or Linear
row, its bias and its norm's scale and bias (norm mask 0). ``slim`` removes
them from the tensors, which is exact, in eval mode, under these rules:

* a unit is removed when its output is identically zero: its norm's masked
  scale and bias are both 0 (whatever the conv computes), or, for a layer
  without a norm (the ImageNet VGG's hidden Linears), when
  ``models.dead_channels`` finds it unread or its masked filter and bias are
  all zero. Its consumers lose the matching input channels/rows.
* units feeding a residual sum: the stem and shortcut convs keep the whole
  residual width (a channel of a residual space could only go when dead in
  every member of the space); a block's last conv keeps only its live filters
  and its output is index-added into the shortcut at their channels, as DSP's
  packing does (spec dsp.md section 4). A block whose main branch keeps no
  filter in some conv adds the constant its last BN makes of zeros.
* LayerNorm (the CIFAR VGG classifier): its statistics run over all its
  units, so a unit is removed only when its pre-norm value is a constant (its
  Linear row is all zero: the value is its bias) and its normalised output is
  zero; ``torch_zoo.SlimLayerNorm`` keeps those constants in its mean and
  variance, which makes the slimmed norm exact. A unit whose Linear row is
  not zero stays.
* ImageNet VGG: Flax flattens the pooled map (H, W, C), PyTorch (C, H, W);
  ``classifier.0``'s rows are sliced in Flax order and permuted to PyTorch's.

``export_ddrop`` writes TorchScript, a ``torch.export`` program, a state dict
and ``reference_io.npz``, each atomically, and checks every file's logits
against the Flax model's before it returns. Command line (the converter's
``export``, which picks this format for these families)::

  python -m convert export VARIABLES_OR_STAGE_DIR --out DIR [--which latest]
  python -m convert.slim VARIABLES_OR_STAGE_DIR --out DIR   # same, --format slim
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np
from torch import nn

import models
from models import paths
from models.layers import input_channels
from convert import description as desc_lib
from convert import (dsp_torch, fast, fast_specs, packing, tables,
                     writer)
from convert.dsp_torch import to_tensor
from convert.torch_zoo import SlimBlock, SlimLayerNorm, SlimResNet, SlimVGG
from models import cifar_resnet, resnet, swin, vgg, vit
from models.graph import Graph as ModelStructure
from models.graph import LayerInfo
from models.paths import Path
from training import artifacts

FAMILIES = ("resnet", "vgg", "vit", "swin")
TORCHSCRIPT, PROGRAM, STATE_DICT = "slim.pt", "slim.pt2", "slim_state_dict.pt"
REFERENCE_IO = writer.REFERENCE_IO
LN_EPS = 1e-5


@dataclasses.dataclass
class SlimSummary:
  """What slimming removed.

  Attributes:
    family: ``resnet`` or ``vgg``.
    params_before: parameters of the dense Flax model (``params``).
    params_after: parameters of the slimmed torch module.
    widths: conv/dense layer name -> (output units before, after).
  """

  family: str
  params_before: int
  params_after: int
  widths: dict[str, tuple[int, int]]


def family_of(model: Any) -> str:
  """``resnet`` or ``vgg`` for the supported Flax models; a clear error else."""
  if isinstance(models.unwrap(model), resnet.ResNet):
    return "resnet"
  if isinstance(models.unwrap(model), vgg.VGG):
    return "vgg"
  hint = (" (the DSP CifarResNet is exported by convert.dsp.export_packed)"
          if isinstance(models.unwrap(model), cifar_resnet.CifarResNet) else "")
  raise ValueError(
      f"DDROP slimming supports the model families {', '.join(FAMILIES)} "
      f"(models.resnet.ResNet, models.vgg.VGG: cifar_resnet18/34/50, "
      f"resnet18/34/50, cifar_vgg*_bn, vgg*_bn); got "
      f"{type(models.unwrap(model)).__name__}{hint}")


# ------------------------------------------------------------- which units go
def _masked_norm(folded: Mapping[str, Any], norm: Path
                 ) -> dict[str, np.ndarray]:
  p = paths.get(folded, norm)
  return {"scale": np.asarray(p["scale"]), "bias": np.asarray(p["bias"])}


def _zero_output(folded: Mapping[str, Any], layer: LayerInfo) -> np.ndarray:
  """(out,): units whose masked filter and bias are all zero (output 0)."""
  p = paths.get(folded, layer.path)
  k = np.asarray(p["kernel"])
  zero = ~np.any(k.reshape(-1, k.shape[-1]) != 0, axis=0)
  if "bias" in p:
    zero &= np.asarray(p["bias"]) == 0
  return zero


def kept_units(structure: ModelStructure, variables: Mapping[str, Any]
               ) -> dict[Path, np.ndarray]:
  """Output units each conv/dense layer keeps (the module docstring's rules).

  Args:
    structure: ``models.analyze`` of the model.
    variables: numpy variables (``params``, ``batch_stats``, ``masks``).

  Returns:
    Layer path -> kept output units, ascending int64.
  """
  masks = variables.get(tables.MASKS)
  params = variables[tables.PARAMS]
  folded = packing.apply_masks(variables)[tables.PARAMS]
  dead = models.dead_channels(structure, masks, params)
  keep = {}
  for l in structure.producers:
    removable = np.zeros((l.out_features,), bool)
    shared = len(structure.space_of(l.path)) > 1 and not l.block_last
    if l.path in structure.outputs or shared:
      pass
    elif l.norm is not None:
      n = _masked_norm(folded, l.norm)
      removable = (n["scale"] == 0) & (n["bias"] == 0)
      if l.path in structure.mixed:
        # A LayerNorm: only units with a constant pre-norm value.
        removable &= ~np.any(
            models.graph.connectivity(l, masks, params), axis=0)
    elif l.path not in structure.mixed:
      removable = dead[l.path] | _zero_output(folded, l)
    keep[l.path] = np.flatnonzero(~removable).astype(np.int64)
  return keep


# ------------------------------------------------------------ torch modules
def _padding(l: LayerInfo) -> int:
  """Symmetric padding of a zoo conv (k // 2), checked against its shapes."""
  k, s, p = l.kernel_size[0], l.strides[0], l.kernel_size[0] // 2
  if (l.in_hw[0] + 2 * p - k) // s + 1 != l.out_hw[0]:
    raise ValueError(f"{l.name}: cannot infer the padding of a {k}x{k} "
                     f"stride-{s} conv from {l.in_hw} -> {l.out_hw}")
  return p


def _check_not_empty(l: LayerInfo, rows: np.ndarray) -> None:
  # A layer left without units makes everything after it constant, which
  # only the residual blocks represent (``SlimBlock.const``).
  if not len(rows):
    raise ValueError(f"{l.name} keeps none of its {l.out_features} units; "
                     "the slimmed model cannot represent that (export the "
                     "masked model dense)")


def _conv(l: LayerInfo, folded: Mapping[str, Any], rows: np.ndarray,
          cols: np.ndarray) -> nn.Conv2d:
  _check_not_empty(l, rows)
  p = paths.get(folded, l.path)
  w = packing.slice_conv(tables.hwio_to_oihw(np.asarray(p["kernel"])), rows,
                         cols)
  conv = nn.Conv2d(len(cols), len(rows), l.kernel_size, l.strides,
                   _padding(l), bias="bias" in p)
  conv.weight = nn.Parameter(to_tensor(w))
  if "bias" in p:
    conv.bias = nn.Parameter(
        to_tensor(tables.slice_channels(p["bias"], rows, 0)))
  return conv


def _bn_tensors(folded: Mapping[str, Any], stats: Mapping[str, Any],
                norm: Path) -> dict[str, np.ndarray]:
  """A BN's masked tensors under their PyTorch names (the name table's)."""
  trees = {tables.PARAMS: folded, tables.BATCH_STATS: stats}
  return {r.torch: np.asarray(paths.get(trees[r.collection],
                                              norm + (r.leaf,)))
          for r in tables.KINDS["batchnorm"]}


def _batchnorm(folded: Mapping[str, Any], stats: Mapping[str, Any],
               norm: Path, index: np.ndarray) -> nn.BatchNorm2d:
  """The BN at ``norm`` restricted to the channels ``index``."""
  return dsp_torch.batchnorm(
      packing.slice_bn(_bn_tensors(folded, stats, norm), index))


def _bn_shift(bn: Mapping[str, np.ndarray]) -> np.ndarray:
  """What a BN outputs for a zero input (eval mode)."""
  return bn["bias"] - bn["running_mean"] * bn["weight"] / np.sqrt(
      bn["running_var"] + dsp_torch.BN_EPS)


def _linear(l: LayerInfo, folded: Mapping[str, Any], rows: np.ndarray,
            cols: np.ndarray, nchw_channels: int | None = None) -> nn.Linear:
  """Linear of ``rows`` outputs reading input features ``cols`` (Flax order).

  With ``nchw_channels`` the kept input rows (Flax's (H, W, C) flatten of
  that many channels) are permuted into PyTorch's (C, H, W) order.
  """
  _check_not_empty(l, rows)
  p = paths.get(folded, l.path)
  k = tables.slice_channels(tables.slice_channels(p["kernel"], cols, 0), rows,
                            1)
  w = (tables.transpose2d(k) if nchw_channels is None else
       tables.nhwc_rows_to_nchw(k, nchw_channels))
  lin = nn.Linear(len(cols), len(rows))
  lin.weight = nn.Parameter(to_tensor(w))
  lin.bias = nn.Parameter(to_tensor(tables.slice_channels(p["bias"], rows, 0)))
  return lin


def _input_cols(l: LayerInfo, structure: ModelStructure,
                keep: Mapping[Path, np.ndarray]) -> np.ndarray:
  """Input features of ``l`` that remain: its producer's kept channels."""
  if not l.inputs:
    return np.arange(l.in_features)
  if len(structure.space_of(l.inputs[0])) > 1:
    return np.arange(l.in_features)  # a residual space keeps its width
  kept = np.zeros((structure[l.inputs[0]].out_features,), bool)
  kept[keep[l.inputs[0]]] = True
  return np.flatnonzero(kept[l.channel_map()]).astype(np.int64)


def _empty(l: LayerInfo, keep: Mapping[Path, np.ndarray]) -> bool:
  return len(keep[l.path]) == 0


def _build_resnet(model: resnet.ResNet, structure: ModelStructure,
                  folded: Mapping[str, Any], stats: Mapping[str, Any],
                  keep: Mapping[Path, np.ndarray]) -> SlimResNet:
  def conv_bn(l: LayerInfo, norm: Path) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return (_conv(l, folded, keep[l.path], _input_cols(l, structure, keep)),
            _batchnorm(folded, stats, norm, keep[l.path]))

  # Members of a residual space keep its width (``kept_units``); a stem
  # that feeds no sum (ImageNet bottlenecks) is slimmed like any conv.
  stem = structure[("conv1",)]
  conv1, bn1 = conv_bn(stem, stem.norm)
  stages: dict[str, list[SlimBlock]] = {}
  for block in structure.blocks:
    convs = [structure[c] for c in block.convs]
    last = convs[-1]
    last_bn = _bn_tensors(folded, stats, last.norm)
    main, const = [], None
    if any(_empty(c, keep) for c in convs):
      # The chain outputs zeros: the block adds its last BN's shift.
      const = to_tensor(_bn_shift(last_bn))
    else:
      for c in convs:
        conv, bn = conv_bn(c, c.norm)
        main.append((c.path[-1], conv, c.norm[-1], bn))
    downsample = None
    if block.shortcut is not None:
      downsample = nn.Sequential(
          *conv_bn(structure[block.shortcut[0]], block.shortcut[1]))
    stage, index = last.path[0], keep[last.path]
    stages.setdefault(stage, []).append(
        SlimBlock(main, to_tensor(index), downsample, const))
  fc = structure[("fc",)]
  linear = _linear(fc, folded, keep[fc.path], _input_cols(fc, structure, keep))
  return SlimResNet(conv1, bn1, list(stages.values()), linear,
                    max_pool=model.stem == "imagenet")


def _build_vgg(model: vgg.VGG, structure: ModelStructure,
               folded: Mapping[str, Any], stats: Mapping[str, Any],
               keep: Mapping[Path, np.ndarray]) -> SlimVGG:
  features: list[nn.Module] = []
  for v in model.config:
    if v == "M":
      features.append(nn.MaxPool2d(2, 2))
      continue
    l = structure[("features", str(len(features)))]
    features += [_conv(l, folded, keep[l.path],
                       _input_cols(l, structure, keep)),
                 _batchnorm(folded, stats, l.norm, keep[l.path]),
                 nn.ReLU()]
  dense = [l for l in structure.producers if l.path[0] == "classifier"]
  classifier: list[nn.Module] = []
  for i, l in enumerate(dense):
    cols = _input_cols(l, structure, keep)
    nchw = None
    if l.in_channel_map is not None and l.repeat > 1:
      nchw = len(cols) // l.repeat
    classifier.append(_linear(l, folded, keep[l.path], cols, nchw))
    if i + 1 == len(dense):
      break
    if l.norm is not None:
      p = paths.get(folded, l.norm)
      removed = np.setdiff1d(np.arange(l.out_features), keep[l.path])
      classifier.append(SlimLayerNorm(
          to_tensor(tables.slice_channels(p["scale"], keep[l.path], 0)),
          to_tensor(tables.slice_channels(p["bias"], keep[l.path], 0)),
          l.out_features,
          to_tensor(tables.slice_channels(
              paths.get(folded, l.path)["bias"], removed, 0)),
          LN_EPS))
    classifier += [nn.ReLU(), nn.Dropout(model.dropout_rate)]
  return SlimVGG(nn.Sequential(*features), nn.Sequential(*classifier),
                 None if model.head == "cifar" else model.pool_size)


def _image_size(model: Any, image_size: int | None) -> int:
  size = image_size or getattr(model, "image_size", None) or 32
  if not isinstance(size, int) or size < 1:
    raise ValueError(f"image_size must be a positive int, got {size!r}")
  return size


def slim(model: Any, variables: Mapping[str, Any],
         image_size: int | None = None) -> tuple[nn.Module, SlimSummary]:
  """The masked Flax model with its removable units physically removed.

  Args:
    model: a Flax ``models.resnet.ResNet`` or ``models.vgg.VGG``.
    variables: its variables: ``params``, ``batch_stats`` and the ``masks``
      DDROP pruning left (optional: zeroed params count as well).
    image_size: input height/width (default: the model's ``image_size``).

  Returns:
    The torch module (eval mode, CPU) and a summary.

  Raises:
    ValueError: unsupported model family, or a layer that keeps no unit where
      the slimmed model cannot represent it.
  """
  if isinstance(models.unwrap(model), (vit.VisionTransformer, swin.SwinTransformer)):
    return _slim_transformer(model, variables, _image_size(model, image_size))
  family = family_of(model)
  image_size = _image_size(model, image_size)
  v = artifacts.to_numpy_tree(dict(variables))
  if tables.BATCH_STATS not in v:
    raise ValueError("variables need 'batch_stats' (the BN running statistics)"
                     f"; got collections {sorted(v)}")
  structure = models.analyze(model, image_size)
  keep = kept_units(structure, v)
  folded = packing.apply_masks(v)[tables.PARAMS]
  build = _build_resnet if family == "resnet" else _build_vgg
  module = build(model, structure, folded, v[tables.BATCH_STATS], keep).eval()
  before = sum(int(np.size(x)) for _, x in paths.leaves(v[tables.PARAMS]))
  after = sum(p.numel() for p in module.parameters())
  widths = {l.name: (l.out_features, len(keep[l.path]))
            for l in structure.producers}
  return module, SlimSummary(family, before, after, widths)


def _slim_transformer(model: Any, variables: Mapping[str, Any],
                      image_size: int) -> tuple[nn.Module, SlimSummary]:
  """ViT / Swin: MLP hidden units removed (``convert.transformer_torch``)."""
  from convert import transformer_torch  # pylint: disable=import-outside-toplevel
  module, widths = transformer_torch.slim(model, variables, image_size)
  family = "vit" if isinstance(models.unwrap(model), vit.VisionTransformer) else "swin"
  before = sum(int(np.size(x)) for _, x in paths.leaves(
      artifacts.to_numpy_tree(dict(variables))[tables.PARAMS]))
  after = sum(p.numel() for p in module.parameters())
  return module, SlimSummary(family, before, after, widths)


# ------------------------------------------------------------------ export
def export_ddrop(model: Any, variables: Mapping[str, Any],
                 out_dir: str | os.PathLike, image_size: int | None = None, *,
                 images: np.ndarray | None = None, num_images: int = 4,
                 seed: int = 0, atol: float = 1e-4,
                 program: bool = True,
                 fast_options: fast.Options | None = fast.Options(),
                 description: desc_lib.Description | None = None
                 ) -> writer.ExportResult:
  """Slims a DDROP-pruned Flax model and writes the PyTorch files.

  Files in ``out_dir``: ``slim.pt`` (TorchScript, ``torch.jit.load``),
  ``slim.pt2`` (``torch.export.load(path).module()``), ``slim_state_dict.pt``
  (``torch.load(path, weights_only=True)``, keys as the slimmed module's) and
  ``reference_io.npz`` (``images`` NHWC, ``images_nchw``, Flax ``logits``).

  Args:
    model: a Flax ``ResNet`` or ``VGG`` (see ``slim``).
    variables: its pruned variables.
    out_dir: directory to write into (created).
    image_size: input height/width (default: the model's).
    images: NHWC check images; ``num_images`` random ones when None.
    num_images: number of random check images.
    seed: seed of the random images.
    atol: largest accepted |logit| difference.
    program: also write the ``torch.export`` program.
    fast_options: also write ``fast.pt``/``fast.pt2``/``fast_plan.json``
      for ResNets and VGGs (``convert.fast``: BN folded, memory format and
      residual adds chosen); None skips them.
    description: the pruned network's description (computed when None);
      the slimmed module's layers are checked against it.

  Returns:
    Paths, measured differences and, in ``details["summary"]``, the
    slimming summary.

  Raises:
    convert.writer.ConversionMismatch: a file's logits differ by more than
      atol.
    convert.description.WidthMismatch: a slimmed layer disagrees with the
      description.
  """
  image_size = _image_size(model, image_size)
  module, summary = slim(model, variables, image_size)
  if description is None:
    description = desc_lib.describe(model, variables,
                                    (image_size, image_size,
                                     input_channels(model)))
  desc_lib.check_module_widths(description, writer.module_widths(module),
                               required=False)
  images, want = writer.check_images(
      model, variables, (image_size, image_size, input_channels(model)),
      images, num_images, seed)
  names = {writer.TORCHSCRIPT: TORCHSCRIPT, writer.STATE_DICT: STATE_DICT}
  if program:
    names[writer.PROGRAM] = PROGRAM
  r = writer.write(module, out_dir, names, images, want, atol=atol,
                   fresh=False)
  result = writer.ExportResult(r.files, r.max_abs_diff,
                               details={"summary": summary})
  if fast_options is not None and isinstance(module, (SlimResNet, SlimVGG)):
    pruned = summary.params_after < summary.params_before
    fast.attach(result, fast_specs.from_slim(
        module, type(models.unwrap(model)).__name__, image_size, pruned),
                out_dir, fast_options, program=program, atol=atol)
  return result

