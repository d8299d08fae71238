"""The units DDROP acts on, read off the model's traced graph.

A *unit* is one output channel of a producer (a full conv or dense layer)
whose channels are its own: not coupled to other producers by a residual
sum, not the logits, not mixed by design (attention's q/k/v, a grouped
conv's input), and not the stem of a network with residual blocks (its
first stage reads it; the reference leaves it). For every such producer P
(spec ddrop.md section 2):

* a norm right after P that normalises per channel (BatchNorm) or only
  scales (a ``DummyNorm``): DDROP drops that norm's output and ranks units by
  its |scale| (ResNet ``bn1``/``bn2`` of a block but not the last, every
  BatchNorm of a VGG's features, a transformer MLP's ``dummy_norm``);
* a norm right after P that normalises with statistics over the channels
  (LayerNorm: VGG-bn's CIFAR classifier), or no norm after a Linear on
  pooled features (VGG-bn's ImageNet classifier): the unit is P's, ranked by
  P's squared weight rows, as the reference ranks its Linear units; it is
  dropped on P's output (``dense_drop='linear'``, the reference) or on the
  norm's (``'norm'``), and pruning zeroes the norm with it;
* no norm otherwise (a dense MLP over positions, a conv): DDROP adds a
  per-unit scale, ``params/<P>/ddrop_scale`` (``init_scales``), applied and
  dropped on P's output, as the transformers' ``dummy_norm``.

Norms and depthwise convs further along the same channels (a MobileNet's
depthwise conv and its BatchNorm, a DenseNet's BatchNorm over a
concatenation) are the unit's *chain*: pruning zeroes them with it, at the
positions where they read the unit. The stem of a residual network, block-last and shortcut convs
feed residual sums; ``prune_residual`` adds the norms right after those
convs as extra layers pruned on their own, as the reference code does.

Layers come out in natural path order (numeric components compared as
numbers), which orders the per-layer random streams of the keep
probabilities.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

import models
from models import graph as graph_lib
from models import paths
from models import pruning
from models.layers import input_channels

Path = tuple[str, ...]

# kinds of DDROP layers
NORM = "norm"
DENSE = "dense"
DENSE_DROPS = ("linear", "norm")


@dataclasses.dataclass(frozen=True)
class DdropLayer:
  """One layer whose units DDROP drops (and pruning removes).

  Attributes:
    path: module whose output is multiplied by the Bernoulli draws.
    kind: ``norm`` (ranked by a per-unit scale) or ``dense`` (ranked by the
      producer's squared weight rows).
    units: number of units C.
    producer: the conv/dense layer whose output unit c is unit c; its
      filter/row and bias are zeroed by pruning.
    norm: the norm whose scale/bias entry c is zeroed by pruning, or None.
    scale: params path of the per-unit scale (``norm``/``scale``, its
      default for a ``norm`` unit, or the ``ddrop_scale`` DDROP adds); None
      for a ``dense`` unit.
    chain: further norms and depthwise convs reading the unit's channels,
      zeroed with it: ``(module, ((position, unit), ...))``.
  """

  path: Path
  kind: str
  units: int
  producer: Path
  norm: Path | None
  scale: Path | None = None
  chain: tuple[tuple[Path, tuple[tuple[int, int], ...]], ...] = ()

  def __post_init__(self):
    if self.kind == NORM and self.scale is None and self.norm is not None:
      object.__setattr__(self, "scale", self.norm + ("scale",))

  @property
  def name(self) -> str:
    """PyTorch-style dotted name."""
    return ".".join(self.path)

  @property
  def added_scale(self) -> bool:
    """The unit scale is DDROP's own ``ddrop_scale``."""
    return self.scale is not None and self.scale[-1] == pruning.DDROP_SCALE


def _input_shape(model: Any, input_shape: Sequence[int] | None
                 ) -> tuple[int, int, int]:
  if input_shape is None:
    plain = models.unwrap(model)
    size = getattr(plain, "image_size", None) or 32
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (*size, input_channels(plain))
  shape = tuple(int(s) for s in input_shape)
  if len(shape) == 4:
    shape = shape[1:]
  if len(shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C) or (N, H, W, C), got "
                     f"{tuple(input_shape)}")
  return shape


def _chain(graph: graph_lib.Graph, producer: Path, skip: Path | None):
  """Norms and depthwise convs reading ``producer``'s channels, with the
  (position, channel) pairs where they read them."""
  space = graph.space_index(producer)
  out = []
  for l in graph.layers.values():
    if l.path == skip or not (l.kind == "norm" or l.depthwise):
      continue
    if producer not in l.inputs or not l.aligned:
      continue
    spaces = (np.asarray(l.in_spaces) if l.in_spaces is not None else
              np.full((l.in_features,), graph.space_index(l.inputs[0])))
    pos = np.flatnonzero(spaces == space)
    chan = l.channel_map()[pos]
    out.append((l.path, tuple((int(p), int(c)) for p, c in zip(pos, chan))))
  return tuple(out)


def _unit(graph: graph_lib.Graph, p: graph_lib.LayerInfo, dense_drop: str
          ) -> DdropLayer:
  norm = graph[p.norm] if p.norm is not None else None
  if norm is not None and norm.stats != graph_lib.CHANNELS:
    # BatchNorm (per-channel statistics) or a scale only: the unit is it.
    return DdropLayer(norm.path, NORM, p.out_features, p.path, norm.path,
                      norm.path + ("scale",), _chain(graph, p.path,
                                                     norm.path))
  if norm is not None or (p.kind == "dense" and p.in_rank == 2):
    # A LayerNorm after P, or a classifier's hidden Linear: P's unit.
    path = norm.path if dense_drop == "norm" and norm is not None else p.path
    return DdropLayer(path, DENSE, p.out_features, p.path,
                      norm and norm.path, None, _chain(graph, p.path,
                                                       norm and norm.path))
  return DdropLayer(p.path, NORM, p.out_features, p.path, None,
                    p.path + (pruning.DDROP_SCALE,),
                    _chain(graph, p.path, None))


def _check_drop_point(graph: graph_lib.Graph, layer: DdropLayer,
                      producer: graph_lib.LayerInfo) -> None:
  """The module DDROP drops on must output exactly the unit's channels."""
  out = graph.module_outputs.get(layer.path)
  ok = out is not None
  if ok:
    gid, _ = out
    spaces, chan = graph.gid_space(gid)
    ok = (len(chan) == layer.units and np.array_equal(
        chan, np.arange(layer.units)) and len(set(spaces.tolist())) == 1
          and graph.spaces[int(spaces[0])] == frozenset({producer.path}))
  if not ok:
    raise ValueError(
        f"DDROP: the units of {producer.name} would be dropped on the output "
        f"of module {layer.name}, but that module's output is not exactly "
        f"those {layer.units} channels; make the layer (or its norm) a "
        "module of its own")


def ddrop_layers(model: Any, input_shape: Sequence[int] | None = None,
                 dense_drop: str = "linear") -> tuple[DdropLayer, ...]:
  """The DDROP layers of a model, in call order (module docstring).

  Args:
    model: any Flax Linen model (plain or ``models.prunable``-wrapped).
    input_shape: (H, W, C) or (N, H, W, C) of the input; default
      ``(image_size, image_size, 3)`` with the model's ``image_size`` (or 32).
    dense_drop: ``linear`` or ``norm``: where a unit followed by a LayerNorm
      is dropped (``DdropConfig.dense_drop``).

  Returns:
    The layers (hashable, usable as static jit arguments), in natural path
    order.

  Raises:
    ValueError: no layer has units of its own (saying why), a unit's
      channels reach an operation the graph cannot follow, or the module to
      drop on does not output exactly the unit's channels.
  """
  if dense_drop not in DENSE_DROPS:
    raise ValueError(f"dense_drop must be one of linear, norm; got "
                     f"{dense_drop!r}")
  shape = _input_shape(model, input_shape)
  graph = models.analyze(model, shape[:2], shape[2])
  found = []
  for p in graph.producers:
    if (p.path in graph.outputs or len(graph.space_of(p.path)) > 1
        or graph.category(p.path) == graph_lib.MIXES
        or (p.stem and graph.blocks)):
      continue
    found.append(p)
  if not found:
    raise ValueError(
        "no DDROP layers found: every conv/dense layer's channels are tied "
        "by residual sums, reach the logits directly or are mixed by design "
        "(attention)")
  graph_lib.check_followed(graph, found, "DDROP")
  layers = []
  for p in found:
    layer = _unit(graph, p, dense_drop)
    _check_drop_point(graph, layer, p)
    layers.append(layer)
  return tuple(sorted(layers, key=lambda l: _natural_key(l.path)))


def _natural_key(path: Path) -> tuple:
  return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path)


def prune_layers(model: Any, layers: Iterable[DdropLayer],
                 prune_residual: bool = False,
                 input_shape: Sequence[int] | None = None
                 ) -> tuple[DdropLayer, ...]:
  """The layers pruning acts on.

  Args:
    model: the model (its graph finds the extra layers).
    layers: the DDROP layers.
    prune_residual: also every norm right after a conv whose channels are
      tied by residual sums (stem, block-last and shortcut convs), each
      pruned on its own by |γ|, as the reference code does.
    input_shape: as ``ddrop_layers``.

  Returns:
    The DDROP layers followed by the extra ones (natural path order).
  """
  layers = tuple(layers)
  if not prune_residual:
    return layers
  shape = _input_shape(model, input_shape)
  graph = models.analyze(model, shape[:2], shape[2])
  covered = {l.producer for l in layers}
  extra = []
  for p in graph.producers:
    if p.kind != "conv" or p.path in covered or p.norm is None:
      continue
    extra.append(DdropLayer(p.norm, NORM, p.out_features, p.path, p.norm,
                            p.norm + ("scale",)))
  return layers + tuple(sorted(extra, key=lambda l: _natural_key(l.path)))


def init_scales(layers: Sequence[DdropLayer], params: Mapping[str, Any]
                ) -> dict[str, Any]:
  """``params`` with a ``ddrop_scale`` of ones for every unit that needs one.

  Args:
    layers: the DDROP layers.
    params: the model's params.

  Returns:
    The params (unchanged when no unit needs a scale or they exist).
  """
  out = params
  for l in layers:
    if l.added_scale and paths.get(params, l.scale) is None:
      module = paths.require(params, l.producer, "params")
      dtype = next(iter(module.values())).dtype
      out = paths.replace(out, l.scale, jnp.ones((l.units,), dtype))
  return out
