"""Static description of the layers taking part in DSP (spec §0).

The description is plain Python data read once from the model's channel-flow
structure (``models.structure``), so it can be closed over by jitted
functions.

A taking-part convolution is one that owns a ``gates/logits`` variable: the
models create gates exactly for the convolutions that take part (every conv
but the stem and the shortcut convs) when built with ``groups=G``.

Dense layers take part when the model gives them gates (the vision
transformers' MLP ``fc1`` / ``fc2``; never a classifier; the structure marks
them, ``models.structure.LayerInfo.takes_part``). DSP treats a Dense
kernel ``(I, O)`` applied to T tokens as a 1x1 convolution over a T x 1 map:
``kernel_shape (1, 1, I, O)``, ``in_shape (T, 1, I)``, ``flops I*O*T``, so
every algorithm reads it through ``kernel`` (the HWIO view) unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from models import layers

Path = tuple[str, ...]

# The reference normalises each layer's input size by one 16x32x32 feature map.
INSIZE_NORMALISER = 16 * 32 * 32


@dataclasses.dataclass(frozen=True)
class ConvInfo:
  """One taking-part convolution.

  Attributes:
    path: module path in the variable trees (e.g. ``('stage_1', '0',
      'conv_a')``).
    kernel_shape: HWIO kernel shape ``(k, k, I, O)``; ``(1, 1, I, O)`` for a
      dense layer.
    in_shape: input shape of one image (H, W, I); ``(tokens, 1, I)`` for a
      dense layer.
    out_shape: output shape of one image (H', W', O).
    norm: path of the BatchNorm that consumes this conv's output, if any.
  """

  path: Path
  kernel_shape: tuple[int, int, int, int]
  in_shape: tuple[int, int, int]
  out_shape: tuple[int, int, int]
  norm: Path | None

  @property
  def name(self) -> str:
    return ".".join(self.path)

  @property
  def k(self) -> int:
    return self.kernel_shape[0]

  @property
  def in_features(self) -> int:
    return self.kernel_shape[2]

  @property
  def out_features(self) -> int:
    return self.kernel_shape[3]

  @property
  def insize(self) -> float:
    """Input elements of one image over 16*32*32 (spec §0)."""
    return math.prod(self.in_shape) / INSIZE_NORMALISER

  @property
  def flops(self) -> int:
    """Multiply-accumulates for one image: O*I*k*k*H'*W'."""
    return math.prod(self.kernel_shape) * self.out_shape[0] * self.out_shape[1]

  @property
  def params(self) -> int:
    return math.prod(self.kernel_shape)


@dataclasses.dataclass(frozen=True)
class Block:
  """A residual block conv_a -> bn_a -> ReLU -> conv_b -> bn_b (+ shortcut)."""

  conv_a: Path
  norm_a: Path
  conv_b: Path
  norm_b: Path


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """Taking-part convs in model (call) order and the residual blocks.

  Attributes:
    convs: the taking-part convs.
    blocks: the two-conv residual blocks (conv_a, conv_b with their norms).
    image_shape: (H, W, C) of the probe image.
    model: the Flax model (whole-model figures), when known.
    fp: indices into ``convs`` of the filter-pruned (fp) layers derived from
      the structure (spec §3): the last conv of every residual block's main
      branch; every taking-part conv of a network without residual sums.
      None when unknown (a hand-built description): the every-n rule applies.
    structure: the model's ``models.structure.ModelStructure``; the generic
      dead-structure removal reads it.
  """

  convs: tuple[ConvInfo, ...]
  blocks: tuple[Block, ...]
  image_shape: tuple[int, int, int]
  model: Any = dataclasses.field(default=None, compare=False)
  fp: tuple[int, ...] | None = None
  structure: Any = dataclasses.field(default=None, compare=False)

  def conv(self, path: Path) -> ConvInfo:
    for c in self.convs:
      if c.path == path:
        return c
    raise KeyError(f"no taking-part conv at {'.'.join(path)}")

  @property
  def paths(self) -> tuple[Path, ...]:
    return tuple(c.path for c in self.convs)


def analyze(model: nn.Module, image_shape: Sequence[int],
            dtype: Any = jnp.float32) -> LayerInfo:
  """Finds the taking-part convolutions, their shapes and residual blocks.

  Reads the channel-flow structure of ``models.structure`` (the one place
  where layer roles are derived) and checks it against the model's gates,
  which the models create exactly for the taking-part convs.

  Args:
    model: a Flax model built with ``groups=G`` (so that it creates gates).
    image_shape: (H, W, C) of one input image (the probe of spec §0).
    dtype: input dtype of the probe.

  Returns:
    The layer description.

  Raises:
    ValueError: if the model creates no gates, its gates are not on the
      taking-part convs, or a taking-part conv's output reaches an operation
      the structure walk cannot follow channel by channel (naming both).
  """
  from models import structure  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((1, *image_shape), dtype)
  variables = jax.eval_shape(
      lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x)
  gate_paths = {p[:-1] for p in _flat_paths(variables.get(layers.GATES, {}))}
  if not gate_paths:
    raise ValueError(
        f"{type(model).__name__} has no DSP gates: build it with groups=G")
  st = structure.analyze(model, tuple(image_shape[:2]), image_shape[2])
  taking = st.taking_part
  convs = []
  for l in taking:
    k = l.kernel_size
    in_hw, out_hw = tuple(l.in_hw), tuple(l.out_hw)
    if l.kind == "dense":  # tokens x 1 map (structure: macs = I*O*tokens)
      in_hw = out_hw = (l.macs // (l.in_features * l.out_features), 1)
    convs.append(ConvInfo(
        tuple(l.path), (k[0], k[1], l.in_features, l.out_features),
        in_hw + (l.in_features,), out_hw + (l.out_features,),
        None if l.norm is None else tuple(l.norm)))
  if {c.path for c in convs} != gate_paths:
    raise ValueError(
        "the model's gates are not on the taking-part convs (spec §0): gates "
        f"on {sorted('.'.join(p) for p in gate_paths)}, taking part "
        f"{['.'.join(c.path) for c in convs]}")
  mixed_by = getattr(st, "mixed_by", {})
  for l in taking:
    if l.path in st.outputs:
      raise ValueError(f"{l.name}: its output reaches the logits directly; "
                       "the classifier never takes part in DSP (spec §0): "
                       "build it without groups")
    if l.path in st.mixed and mixed_by.get(l.path) not in READS_ALL_CHANNELS:
      raise ValueError(
          f"{l.name}: its output channels reach the operation "
          f"{mixed_by.get(l.path, 'unknown')!r}, which mixes channels in a way "
          "the channel-flow walk does not follow; DSP needs to know where "
          "every taking-part conv's channels go")
  blocks = []
  for b in st.blocks:
    if len(b.main) == 2 and all(n is not None for _, n in b.main):
      (ca, na), (cb, nb) = b.main
      blocks.append(Block(tuple(ca), tuple(na), tuple(cb), tuple(nb)))
  return LayerInfo(tuple(convs), tuple(blocks), tuple(image_shape), model,
                   derived_fp(st), st)


# Channel-mixing operations that read every channel reaching them (a norm's
# statistics over the channel axis, a channel concatenation): the structure
# keeps all those channels alive, which is what their gradients say.
READS_ALL_CHANNELS = frozenset({"reduce_sum", "concatenate"})


def derived_fp(st: Any) -> tuple[int, ...]:
  """fp layer indices of a structure (spec §3, derived rather than set).

  The last conv of every residual block's main branch (every 2nd taking-part
  conv of basic blocks, every 3rd of bottlenecks; a transformer MLP's fc2,
  whose output feeds the residual sum); for a network without residual sums,
  every taking-part conv.

  Args:
    st: a ``models.structure.ModelStructure``.

  Returns:
    Indices into ``st.taking_part``.
  """
  tp = st.taking_part
  if not st.blocks:
    return tuple(range(len(tp)))
  return tuple(i for i, l in enumerate(tp) if l.block_last)


def _flat_paths(tree) -> list[Path]:
  out = []
  for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out.append(tuple(k.key for k in kp))
  return out


def _lookup(tree, path: Path):
  for k in path:
    tree = tree[k]
  return tree


def kernel(tree, conv: ConvInfo):
  """The layer's kernel in ``tree`` (params or grads) viewed as HWIO.

  A conv kernel is returned as it is; a dense ``(I, O)`` kernel as the
  ``(1, 1, I, O)`` kernel of the equivalent 1x1 convolution.
  """
  return _lookup(tree, conv.path)["kernel"].reshape(conv.kernel_shape)


def with_kernel(tree, conv: ConvInfo, value):
  """A copy of ``tree`` with the layer's kernel set from an HWIO ``value``
  (reshaped back to the stored layout: ``(I, O)`` for a dense layer)."""
  node = _lookup(tree, conv.path)
  shape = node["kernel"].shape
  return replace(tree, conv.path, {**node, "kernel": value.reshape(shape)})


def get(tree, path: Path):
  """``tree[path[0]][path[1]]...``."""
  return _lookup(tree, path)


def replace(tree, path: Path, value):
  """A copy of a nested dict with ``tree[path...]`` set to ``value``."""
  if not path:
    return value
  new = dict(tree)
  new[path[0]] = replace(tree.get(path[0], {}), path[1:], value)
  return new
