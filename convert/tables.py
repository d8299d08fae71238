"""Name tables and per-tensor functions between Flax variables and PyTorch.

Every model of the zoo names its modules so that the Flax module path joined
with ``'.'`` is the PyTorch module name (``stage_1.0.conv_a``,
``layer1.0.bn1``, ``features.3``, ``classifier.0``). What differs is the leaf
names and layouts, decided by the kind of layer:

===========  ==========================  ==============================
kind         Flax (collection/leaf)      PyTorch leaf
===========  ==========================  ==============================
conv         params/kernel  HWIO         weight OIHW
             params/bias                 bias
dense        params/kernel  (in, out)    weight (out, in)
             params/bias                 bias
batchnorm    params/scale, params/bias   weight, bias
             batch_stats/mean, var       running_mean, running_var
                                         (num_batches_tracked: int64)
layernorm    params/scale, params/bias   weight, bias
===========  ==========================  ==============================

A family table adds what the generic rules cannot know: which convolutions
take part in DSP (they carry ``.group``/``.mask`` in the reference format) and
layout hooks such as the first Linear of torchvision's ImageNet VGG, whose
input rows are flattened (C, H, W) in PyTorch and (H, W, C) in Flax.

This module is numpy-only; the files that import torch build on it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping

import numpy as np

from models import paths

Array = np.ndarray
Variables = Mapping[str, Any]
TensorFn = Callable[[Array], Array]

PARAMS, BATCH_STATS, MASKS, GATES = "params", "batch_stats", "masks", "gates"


# ----------------------------------------------------------------- per tensor
def hwio_to_oihw(x: Array) -> Array:
  """Flax conv kernel (H, W, I, O) -> PyTorch weight (O, I, H, W)."""
  return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))


def oihw_to_hwio(x: Array) -> Array:
  """PyTorch conv weight (O, I, H, W) -> Flax kernel (H, W, I, O)."""
  return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))


def transpose2d(x: Array) -> Array:
  """Dense kernel (in, out) <-> Linear weight (out, in); kernel mask (I, O) <-> (O, I)."""
  return np.ascontiguousarray(np.transpose(x))


def identity(x: Array) -> Array:
  return np.asarray(x)


def io_mask_to_oi11(x: Array) -> Array:
  """Our conv kernel mask (I, O) -> the reference's ``.mask`` (O, I, 1, 1)."""
  return np.ascontiguousarray(np.transpose(x))[:, :, None, None]


def oi11_to_io_mask(x: Array) -> Array:
  """The reference's ``.mask`` (O, I, 1, 1) -> our conv kernel mask (I, O)."""
  x = np.asarray(x)
  if x.ndim != 4 or x.shape[2:] != (1, 1):
    raise ValueError(f"a conv mask must have shape (O, I, 1, 1), got {x.shape}")
  return np.ascontiguousarray(np.transpose(x[:, :, 0, 0]))


def _square_side(n: int, channels: int, layer: str) -> int:
  """S of a flattened S x S x ``channels`` map of ``n`` features."""
  s = math.isqrt(n // channels)
  if s * s * channels != n:
    raise ValueError(f"{layer} input {n} is not {channels} channels x S x S")
  return s


def nchw_rows_to_nhwc(weight: Array, channels: int) -> Array:
  """Linear weight (out, C*S*S) flattened (C, H, W) -> Dense kernel (S*S*C, out).

  Args:
    weight: PyTorch Linear weight whose input is a flattened NCHW map.
    channels: C.

  Returns:
    The Flax kernel for an input flattened in NHWC order.
  """
  out, n = weight.shape
  s = _square_side(n, channels, "Linear")
  w = weight.reshape(out, channels, s, s).transpose(2, 3, 1, 0)
  return np.ascontiguousarray(w.reshape(n, out))


def nhwc_rows_to_nchw(kernel: Array, channels: int) -> Array:
  """Inverse of ``nchw_rows_to_nhwc``: Dense kernel (S*S*C, out) -> (out, C*S*S)."""
  n, out = kernel.shape
  s = _square_side(n, channels, "Dense")
  w = kernel.reshape(s, s, channels, out).transpose(3, 2, 0, 1)
  return np.ascontiguousarray(w.reshape(out, n))


def slice_channels(x: Array, index: Array, axis: int) -> Array:
  """Keeps the entries ``index`` (in that order) along ``axis``."""
  return np.ascontiguousarray(np.take(np.asarray(x), np.asarray(index), axis))


# -------------------------------------------------------------- layer kinds
@dataclasses.dataclass(frozen=True)
class Rule:
  """One tensor of one layer kind.

  Attributes:
    collection: Flax collection (``params``, ``batch_stats``).
    leaf: Flax leaf name.
    torch: PyTorch leaf name (after ``module_name.``).
    to_torch: Flax array -> PyTorch layout.
    from_torch: PyTorch layout -> Flax array.
  """

  collection: str
  leaf: str
  torch: str
  to_torch: TensorFn = identity
  from_torch: TensorFn = identity


KINDS: dict[str, tuple[Rule, ...]] = {
    "conv": (Rule(PARAMS, "kernel", "weight", hwio_to_oihw, oihw_to_hwio),
             Rule(PARAMS, "bias", "bias")),
    "dense": (Rule(PARAMS, "kernel", "weight", transpose2d, transpose2d),
              Rule(PARAMS, "bias", "bias")),
    "batchnorm": (Rule(PARAMS, "scale", "weight"), Rule(PARAMS, "bias", "bias"),
                  Rule(BATCH_STATS, "mean", "running_mean"),
                  Rule(BATCH_STATS, "var", "running_var")),
    "layernorm": (Rule(PARAMS, "scale", "weight"), Rule(PARAMS, "bias", "bias")),
}
NUM_BATCHES = "num_batches_tracked"


@dataclasses.dataclass(frozen=True)
class Layer:
  """A layer found in the variables: module path, kind, PyTorch name."""

  path: tuple[str, ...]
  kind: str

  @property
  def name(self) -> str:
    return ".".join(self.path)


def find_layers(variables: Variables, family: str) -> list[Layer]:
  """Layers of a model, in model order (the family table's ``order``).

  The kind comes from the leaves: a 4-D ``kernel`` is a conv, a 2-D one a
  dense layer, a ``scale`` with running statistics a BatchNorm, without them
  a LayerNorm. The order cannot come from the dicts: pytree operations sort
  their keys.

  Args:
    variables: the model variables (``params`` at least; shapes suffice).
    family: model family (its table orders the layers).

  Returns:
    The layers.
  """
  found: dict[tuple[str, ...], str] = {}
  stats = variables.get(BATCH_STATS, {})
  for path, leaf in paths.leaves(variables[PARAMS]):
    mod, name = path[:-1], path[-1]
    if name == "kernel":
      found[mod] = "conv" if len(leaf.shape) == 4 else "dense"
    elif name == "scale":
      found[mod] = "batchnorm" if paths.get(stats, mod) is not None else "layernorm"
  key = family_table(family).sort_key
  return sorted((Layer(p, k) for p, k in found.items()),
                key=lambda l: key(l.path))


# -------------------------------------------------------------- family tables
@dataclasses.dataclass(frozen=True)
class FamilyTable:
  """What one model family adds to the generic per-kind rules.

  Attributes:
    name: registry family (``cifar_resnet``, ``resnet``, ``vgg``).
    taking_part: regex over PyTorch module names of the convs that take part
      in DSP (the stem and shortcut convs never do).
    order: regexes over module-path components, in the order sibling
      modules are created (= PyTorch state-dict order); a component's rank is
      its first full match, then its number (the regex's group), then its name.
    nchw_flatten_dense: regex over dense-layer names whose input is a
      flattened feature map (VGG's ``classifier.0``); their input rows are
      permuted between PyTorch's (C, H, W) and Flax's (H, W, C) order when the
      layer's input is wider than the last conv's channels.
  """

  name: str
  taking_part: str
  order: tuple[str, ...]
  nchw_flatten_dense: str | None = None

  def sort_key(self, path: tuple[str, ...]) -> tuple[Any, ...]:
    key = []
    for part in path:
      for rank, pattern in enumerate(self.order):
        m = re.fullmatch(pattern, part)
        if m:
          key.append((rank, int(m.group(1)) if m.groups() else 0, part))
          break
      else:
        key.append((len(self.order), 0, part))
    return tuple(key)

  def is_taking_part(self, layer: Layer, first_conv: str) -> bool:
    return (layer.kind == "conv" and layer.name != first_conv
            and re.fullmatch(self.taking_part, layer.name) is not None)


FAMILIES: dict[str, FamilyTable] = {
    "cifar_resnet": FamilyTable(
        "cifar_resnet", r"stage_\d+\.\d+\.conv_[ab]",
        (r"conv_1_3x3", r"bn_1", r"stage_(\d+)", r"(\d+)", r"conv_a", r"bn_a",
         r"conv_b", r"bn_b", r"downsample", r"classifier")),
    "resnet": FamilyTable(
        "resnet", r"layer\d+\.\d+\.conv\d+",
        (r"conv1", r"bn1", r"layer(\d+)", r"(\d+)", r"conv2", r"bn2", r"conv3",
         r"bn3", r"downsample", r"fc")),
    "vgg": FamilyTable("vgg", r"features\.\d+",
                       (r"features", r"classifier", r"(\d+)"),
                       nchw_flatten_dense=r"classifier\.0"),
    # Vision transformers: the order only (no DSP convs); their PyTorch names
    # come from convert.transformers.
    "vit": FamilyTable(
        "vit", r"(?!)",
        (r"conv_proj", r"encoder", r"layers", r"encoder_layer_(\d+)", r"ln_1",
         r"self_attention", r"query", r"key", r"value", r"out_proj", r"ln_2",
         r"mlp", r"fc1", r"dummy_norm", r"fc2", r"ln", r"heads", r"head")),
    "swin": FamilyTable(
        "swin", r"(?!)",
        (r"features", r"(\d+)", r"norm1", r"attn", r"norm2", r"mlp", r"query",
         r"key", r"value", r"proj", r"fc1", r"dummy_norm", r"fc2", r"norm",
         r"reduction", r"head")),
}


def family_table(family: str) -> FamilyTable:
  """The table of a registry family; a clear error for unknown ones."""
  if family not in FAMILIES:
    raise ValueError(f"no conversion table for model family {family!r}; "
                     f"supported: {', '.join(sorted(FAMILIES))}")
  return FAMILIES[family]


def taking_part_convs(variables: Variables, family: str) -> list[str]:
  """PyTorch names of the convs that take part in DSP, in model order."""
  table = family_table(family)
  layers = find_layers(variables, family)
  convs = [l for l in layers if l.kind == "conv"]
  first = convs[0].name if convs else ""
  return [l.name for l in convs if table.is_taking_part(l, first)]


def _layer_fns(layer: Layer, rule: Rule, table: FamilyTable,
               variables: Variables) -> tuple[TensorFn, TensorFn]:
  """Per-tensor functions, with the family's flatten hook where it applies."""
  if (layer.kind == "dense" and rule.leaf == "kernel"
      and table.nchw_flatten_dense
      and re.fullmatch(table.nchw_flatten_dense, layer.name)):
    convs = [l for l in find_layers(variables, table.name) if l.kind == "conv"]
    channels = paths.get(variables[PARAMS], convs[-1].path + ("kernel",)).shape[-1]
    n_in = paths.get(variables[PARAMS], layer.path + ("kernel",)).shape[0]
    if n_in != channels:
      return (lambda k: nhwc_rows_to_nchw(k, channels),
              lambda w: nchw_rows_to_nhwc(w, channels))
  return rule.to_torch, rule.from_torch


def to_torch(variables: Variables, family: str,
             num_batches_tracked: Mapping[str, int] | None = None,
             ) -> dict[str, Array]:
  """Flax ``params``/``batch_stats`` -> PyTorch state dict (numpy arrays).

  Args:
    variables: model variables.
    family: registry family of the model (selects the table).
    num_batches_tracked: per BatchNorm name; 0 where absent (Flax keeps no
      such counter).

  Returns:
    ``{torch_name: array}`` in model order, PyTorch layouts.
  """
  table = family_table(family)
  nbt = dict(num_batches_tracked or {})
  out: dict[str, Array] = {}
  for layer in find_layers(variables, family):
    for rule in KINDS[layer.kind]:
      value = paths.get(variables.get(rule.collection, {}), layer.path + (rule.leaf,))
      if value is None:
        continue
      fn, _ = _layer_fns(layer, rule, table, variables)
      out[f"{layer.name}.{rule.torch}"] = fn(np.asarray(value))
    if layer.kind == "batchnorm":
      out[f"{layer.name}.{NUM_BATCHES}"] = np.asarray(
          nbt.get(layer.name, 0), np.int64)
  return out


def from_torch(state_dict: Mapping[str, Array], template: Variables,
               family: str, strict: bool = True) -> dict[str, Any]:
  """PyTorch state dict -> Flax ``params``/``batch_stats`` shaped as ``template``.

  Args:
    state_dict: ``{torch_name: array}`` (numpy or torch tensors).
    template: the model's variables or their shapes
      (``jax.eval_shape(model.init, ...)``); decides names and shapes.
    family: registry family of the model.
    strict: raise on state-dict keys that the model does not have.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` as numpy arrays (dtype of the
    template).

  Raises:
    KeyError: a key the model needs is missing (the key is named), or, when
      strict, the state dict has keys the model lacks.
    ValueError: a tensor's shape does not match (key and both shapes named).
  """
  table = family_table(family)
  out: dict[str, Any] = {}
  used: set[str] = set()
  for layer in find_layers(template, family):
    for rule in KINDS[layer.kind]:
      want = paths.get(template.get(rule.collection, {}), layer.path + (rule.leaf,))
      if want is None:
        continue
      key = f"{layer.name}.{rule.torch}"
      if key not in state_dict:
        raise KeyError(f"state dict has no {key!r} (needed for "
                       f"{rule.collection}/{'/'.join(layer.path)}/{rule.leaf})")
      _, fn = _layer_fns(layer, rule, table, template)
      value = fn(to_numpy(state_dict[key]))
      if tuple(value.shape) != tuple(want.shape):
        raise ValueError(
            f"{key}: shape {tuple(to_numpy(state_dict[key]).shape)} converts "
            f"to {tuple(value.shape)}, the model needs {tuple(want.shape)}")
      paths.assign(out, (rule.collection,) + layer.path + (rule.leaf,),
           value.astype(want.dtype))
      used.add(key)
    if layer.kind == "batchnorm":
      used.add(f"{layer.name}.{NUM_BATCHES}")
  extra = sorted(k for k in state_dict if k not in used)
  if strict and extra:
    raise KeyError(f"state dict keys the {family} model does not have: "
                   f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
  return out


def to_numpy(x: Any) -> Array:
  """numpy view of a numpy array or a (CPU, detached) torch tensor."""
  if hasattr(x, "detach"):
    return x.detach().cpu().numpy()
  return np.asarray(x)


def num_batches_tracked(state_dict: Mapping[str, Any]) -> dict[str, int]:
  """``{bn_name: num_batches_tracked}`` of a PyTorch state dict."""
  suffix = "." + NUM_BATCHES
  return {k[:-len(suffix)]: int(to_numpy(v)) for k, v in state_dict.items()
          if k.endswith(suffix)}
