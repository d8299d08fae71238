"""Static description of the layers taking part in DSP (spec §0).

The description is plain Python data computed once from shapes (a traced
``model.init`` under ``jax.eval_shape``, recording each ``Conv`` and
``BatchNorm`` call through Flax's method interceptor), so it can be closed
over by jitted functions.

A taking-part convolution is one that owns a ``gates/logits`` variable: the
models create gates exactly for the convolutions that take part (every conv
but the stem and the shortcut convs) when built with ``groups=G``.
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
    kernel_shape: HWIO kernel shape ``(k, k, I, O)``.
    in_shape: input shape of one image (H, W, I).
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
  """Taking-part convs in model (call) order and the residual blocks."""

  convs: tuple[ConvInfo, ...]
  blocks: tuple[Block, ...]
  image_shape: tuple[int, int, int]
  model: Any = dataclasses.field(default=None, compare=False)

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

  Uses the channel-flow structure of ``models.structure`` and checks it
  against the model's gates (which exist exactly for the taking-part convs);
  falls back to the gate paths and the recorded layer calls otherwise.

  Args:
    model: a Flax model built with ``groups=G`` (so that it creates gates).
    image_shape: (H, W, C) of one input image (the probe of spec §0).
    dtype: input dtype of the probe.

  Returns:
    The layer description.

  Raises:
    ValueError: if the model creates no gates.
  """
  from_gates = analyze_from_gates(model, image_shape, dtype)
  try:
    from_structure = analyze_from_structure(model, image_shape)
  except Exception:  # pylint: disable=broad-except
    return from_gates
  return from_structure if from_structure == from_gates else from_gates


def analyze_from_structure(model: nn.Module,
                           image_shape: Sequence[int]) -> LayerInfo:
  """The layer description from ``models.structure.analyze``."""
  from models import structure  # pylint: disable=g-import-not-at-top
  st = structure.analyze(model, tuple(image_shape[:2]), image_shape[2])
  convs = []
  for l in st.taking_part:
    k = l.kernel_size
    convs.append(ConvInfo(
        tuple(l.path), (k[0], k[1], l.in_features, l.out_features),
        tuple(l.in_hw) + (l.in_features,), tuple(l.out_hw) + (l.out_features,),
        None if l.norm is None else tuple(l.norm)))
  blocks = []
  for b in st.blocks:
    if len(b.main) == 2 and all(n is not None for _, n in b.main):
      (ca, na), (cb, nb) = b.main
      blocks.append(Block(tuple(ca), tuple(na), tuple(cb), tuple(nb)))
  return LayerInfo(tuple(convs), tuple(blocks), tuple(image_shape), model)


def analyze_from_gates(model: nn.Module, image_shape: Sequence[int],
                       dtype: Any = jnp.float32) -> LayerInfo:
  """The layer description from the gate paths and recorded layer calls."""
  calls: list[tuple[str, Path, tuple, tuple, bool]] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == "__call__" and isinstance(
        mod, (layers.Conv, layers.BatchNorm)):
      kind = "conv" if isinstance(mod, layers.Conv) else "norm"
      gated = kind == "conv" and mod.groups is not None
      calls.append((kind, tuple(mod.scope.path), tuple(args[0].shape[1:]),
                    tuple(out.shape[1:]), gated))
    return out

  x = jax.ShapeDtypeStruct((1, *image_shape), dtype)

  def init(x):
    with nn.intercept_methods(interceptor):
      return model.init({"params": jax.random.key(0)}, x, train=False)

  variables = jax.eval_shape(init, x)
  gates = variables.get(layers.GATES, {})
  gate_paths = {p[:-1] for p in _flat_paths(gates)}
  if not gate_paths:
    raise ValueError(
        f"{type(model).__name__} has no DSP gates: build it with groups=G")
  convs = []
  seen = set()
  for j, (kind, path, ins, outs, gated) in enumerate(calls):
    if kind != "conv" or path not in gate_paths or path in seen:
      continue
    seen.add(path)
    norm = None
    # The BatchNorm fed by this conv: the next norm call with the same parent.
    for kind2, path2, _, _, _ in calls[j + 1:]:
      if kind2 == "conv":
        break
      if kind2 == "norm" and path2[:-1] == path[:-1]:
        norm = path2
        break
    kshape = (ins[-1],) + outs[-1:]
    k = _lookup(variables["params"], path)["kernel"].shape
    assert k[2:] == kshape, (k, kshape)
    convs.append(ConvInfo(path, tuple(k), ins, outs, norm))
  # Residual blocks: the two taking-part convs of one module (conv_a, conv_b).
  blocks = []
  by_parent: dict[Path, list[ConvInfo]] = {}
  for c in convs:
    by_parent.setdefault(c.path[:-1], []).append(c)
  for group in by_parent.values():
    if len(group) == 2 and all(c.norm is not None for c in group):
      a, b = group
      blocks.append(Block(a.path, a.norm, b.path, b.norm))
  return LayerInfo(tuple(convs), tuple(blocks), tuple(image_shape), model)


def _flat_paths(tree) -> list[Path]:
  out = []
  for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out.append(tuple(k.key for k in kp))
  return out


def _lookup(tree, path: Path):
  for k in path:
    tree = tree[k]
  return tree


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
