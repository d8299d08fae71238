"""The traced graph of a model: layers, roles, channel couplings.

``analyze(model, image_size, channels)`` traces ``model.apply`` (eval mode,
one image, abstract variables) and walks the jaxpr (``models.graph.walk``).
Nothing is read from module classes or names except the variable paths:

* layers: every conv (full, grouped or depthwise), dense layer and norm, in
  call order, with shapes and multiply-accumulates;
* spaces: producers (full convs and dense layers) whose output channels are
  coupled, by residual sums or products; a depthwise conv, a norm and any
  per-channel variable follow the channels they read;
* per layer, the channel (of its space) each input feature carries, across
  concatenations and flattens;
* roles: the stem (a conv reading the image), residual blocks (main branch
  and shortcut, from the sums), shortcut convs, DSP's taking-part layers,
  the last conv of each block;
* the channel program (``models.graph.program``) that liveness and DSP's
  dead-structure removal evaluate.

DSP's choice of taking-part layers is a property of the method, not of the
model; it is derived here because every method and exporter reads it: every
full conv but the stem and the shortcut convs, and every position-wise dense
layer (a 1x1 convolution over tokens: the transformers' MLPs) whose input
channels are followed one to one; never a layer whose output is the logits,
nor one whose output channels are mixed by design (attention's q/k/v).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from models.graph import program as prog
from models.layers import input_channels
from models.graph import walk

Path = tuple[str, ...]
READS_ALL, MIXES, UNKNOWN = walk.READS_ALL, walk.MIXES, walk.UNKNOWN
# How a norm normalises (``LayerInfo.stats``).
BATCH = "batch"        # per channel, over the batch (BatchNorm)
CHANNELS = "channels"  # with statistics over channels (LayerNorm, GroupNorm)
NONE = "none"          # no statistics: a per-channel scale (and shift)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One conv, dense or norm layer, as called in the traced forward pass.

  Attributes:
    path: module path (tuple of names; '.'-joined it is the PyTorch name).
    kind: 'conv', 'dense' or 'norm'.
    in_features: input channels (dense: input features).
    out_features: output channels.
    kernel_size: (kh, kw) for a conv, (1, 1) otherwise.
    strides: (sh, sw) for a conv, (1, 1) otherwise.
    in_hw: input height and width ((1, 1) for a dense layer).
    out_hw: output height and width.
    macs: multiply-accumulates for one image (0 for a norm).
    params: parameter count of the module.
    feature_groups: a conv's ``feature_group_count`` (1 otherwise).
    depthwise: a conv with groups == input == output channels; its channels
      are those of its input (it produces none of its own).
    positions: positions a dense layer is applied to (tokens; 1 for a
      classifier).
    in_rank: rank of a dense layer's input (3 or more: position-wise).
    stem: a conv reading the image.
    shortcut: a conv inside a residual shortcut branch (or its norm).
    takes_part: a DSP taking-part layer (see the module docstring).
    block_last: last producer of a residual block's main branch.
    inputs: producers whose output channels reach this layer's input.
    aligned: the input is channel-aligned (``in_channel_map`` is known).
    in_channel_map: for each input feature, the channel of its space it
      carries (``f % C`` after an NHWC flatten); None means the identity.
    in_spaces: for each input feature, the index of its space in
      ``Graph.spaces`` (None: all features in ``space_of(inputs[0])``).
    norm: the norm that directly follows this conv/dense layer, if any.
    follows: for a norm, the conv/dense layer it directly follows
      (possibly through statistics over channels, as a LayerNorm), else
      None.
    centres: a norm with batch statistics (BatchNorm).
    stats: for a norm, how it normalises: ``batch``, ``channels`` or
      ``none`` (see the constants).
    kernel_path: variable path of the kernel (scale for a norm).
    order: position in call order among all layers.
  """

  path: Path
  kind: str
  in_features: int
  out_features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  in_hw: tuple[int, int]
  out_hw: tuple[int, int]
  macs: int
  params: int
  feature_groups: int = 1
  depthwise: bool = False
  positions: int = 1
  in_rank: int = 4
  stem: bool = False
  shortcut: bool = False
  takes_part: bool = False
  block_last: bool = False
  inputs: tuple[Path, ...] = ()
  aligned: bool = True
  in_channel_map: tuple[int, ...] | None = None
  in_spaces: tuple[int, ...] | None = None
  norm: Path | None = None
  follows: Path | None = None
  centres: bool = False
  stats: str | None = None
  kernel_path: Path = ()
  order: int = 0

  @property
  def name(self) -> str:
    """The '.'-joined path (the PyTorch module name)."""
    return ".".join(self.path)

  @property
  def flops(self) -> int:
    """DSP ``flops_l`` = O*I*k*k*H_out*W_out (same as ``macs``)."""
    return self.macs

  @property
  def producer(self) -> bool:
    """A full conv or dense layer: it produces channels of its own."""
    return self.kind in ("conv", "dense") and not self.depthwise

  @property
  def kernel_shape(self) -> tuple[int, int, int, int]:
    """HWIO kernel shape; a dense layer as the equivalent 1x1 conv."""
    kh, kw = self.kernel_size
    return (kh, kw, self.in_features // self.feature_groups,
            self.out_features)

  @property
  def in_shape(self) -> tuple[int, int, int]:
    """One image's input (H, W, I); ``(positions, 1, I)`` for a dense."""
    if self.kind == "dense":
      return (self.positions, 1, self.in_features)
    return tuple(self.in_hw) + (self.in_features,)

  @property
  def repeat(self) -> int:
    """Input features per producer channel (H*W after a flatten)."""
    if self.in_channel_map is None or not self.inputs:
      return 1
    return self.in_features // max(1, len(set(self.in_channel_map)))

  def channel_map(self) -> np.ndarray:
    """Input feature -> channel of its space, as an int array."""
    if self.in_channel_map is None:
      return np.arange(self.in_features)
    return np.asarray(self.in_channel_map)


@dataclasses.dataclass(frozen=True)
class Block:
  """A residual block: ``out = join(main(x), shortcut(x))``.

  Attributes:
    main: main-branch (producer, norm or None) pairs in call order.
    shortcut: the shortcut's (conv, norm or None), or None for an identity.
    space: index into ``Graph.spaces`` of the sum it adds into.
  """

  main: tuple[tuple[Path, Path | None], ...]
  shortcut: tuple[Path, Path | None] | None
  space: int

  @property
  def convs(self) -> tuple[Path, ...]:
    return tuple(c for c, _ in self.main)


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
  """The traced graph of one model at one input shape.

  Attributes:
    layers: path -> LayerInfo in call order (convs, dense layers, norms).
    blocks: residual blocks in call order.
    spaces: groups of producers whose output channels are coupled (every
      producer is in exactly one space; most are alone).
    outputs: producers whose channels reach the model output (the logits).
    mixed: producers whose channels reach something that reads them in
      full; their channels are never dead.
    mixing: for every producer in ``mixed``, ``(category, primitive)``:
      ``reads_all`` (statistics over channels: LayerNorm), ``mixes`` (mixed
      by design: attention, grouped convs, a reshape splitting channels) or
      ``unknown`` (an operation the walk does not follow).
    input_shape: (H, W, C) of the traced image.
    activation_macs: multiply-accumulates of contractions between two
      activations (attention) for one image; never pruned.
    program: the channel program.
    module_outputs: per module (every module called), the channels its
      output carries: ``(gids, refs)`` or None when not channel-aligned.
    affine: per-channel variables that are not part of a layer (a layer
      scale), by variable path: the gids of the channels they follow.
  """

  layers: Mapping[Path, LayerInfo]
  blocks: tuple[Block, ...]
  spaces: tuple[frozenset[Path], ...]
  outputs: frozenset[Path]
  mixed: frozenset[Path]
  input_shape: tuple[int, int, int]
  mixing: Mapping[Path, tuple[str, str]] = dataclasses.field(
      default_factory=dict)
  activation_macs: int = 0
  program: prog.Program | None = None
  module_outputs: Mapping[Path, Any] = dataclasses.field(default_factory=dict)
  affine: Mapping[Path, np.ndarray] = dataclasses.field(default_factory=dict)
  gid_space: Any = None

  @property
  def mixed_by(self) -> dict[Path, str]:
    """Producer -> the primitive that first read its channels in full."""
    return {p: prim for p, (_, prim) in self.mixing.items()}

  def _select(self, pred) -> list[LayerInfo]:
    return [l for l in self.layers.values() if pred(l)]

  @property
  def convs(self) -> list[LayerInfo]:
    """Every conv (full, grouped or depthwise), in call order."""
    return self._select(lambda l: l.kind == "conv")

  @property
  def producers(self) -> list[LayerInfo]:
    """Every full conv and dense layer, in call order."""
    return self._select(lambda l: l.producer)

  @property
  def weighted(self) -> list[LayerInfo]:
    """Every conv (depthwise included) and dense layer, in call order."""
    return self._select(lambda l: l.kind in ("conv", "dense"))

  @property
  def norms(self) -> list[LayerInfo]:
    return self._select(lambda l: l.kind == "norm")

  @property
  def taking_part(self) -> list[LayerInfo]:
    """DSP's taking-part layers (see the module docstring), in call order."""
    return self._select(lambda l: l.takes_part)

  @property
  def block_last(self) -> list[LayerInfo]:
    """The last producer of every residual block's main branch."""
    return self._select(lambda l: l.block_last)

  def consumers(self, path: Path) -> list[LayerInfo]:
    """Convs and dense layers whose input carries ``path``'s channels."""
    path = tuple(path)
    self[path]  # a clear error for an unknown path
    return self._select(lambda l: l.kind != "norm" and path in l.inputs)

  def space_of(self, path: Path) -> frozenset[Path]:
    """The coupled space (set of producers) ``path`` belongs to."""
    path = tuple(path)
    for s in self.spaces:
      if path in s:
        return s
    raise ValueError(f"{'.'.join(path)} is not a conv or dense layer "
                     "producing channels; producers: "
                     f"{[l.name for l in self.producers]}")

  def space_index(self, path: Path) -> int:
    return self.spaces.index(self.space_of(path))

  def category(self, path: Path) -> str | None:
    """How ``path``'s channels are read in full, or None (followed)."""
    got = self.mixing.get(tuple(path))
    return None if got is None else got[0]

  def __getitem__(self, path: Path) -> LayerInfo:
    path = tuple(path)
    if path not in self.layers:
      raise KeyError(f"no layer {'.'.join(path)!r}; valid layers: "
                     f"{', '.join(l.name for l in self.layers.values())}")
    return self.layers[path]

  def __contains__(self, path: Path) -> bool:
    return tuple(path) in self.layers


# ------------------------------------------------------------ calling
def accepts_train(model: Any) -> bool:
  """Whether ``model.__call__`` takes a ``train`` argument."""
  call = getattr(type(model), "__call__", None)
  if call is None:
    return False
  try:
    sig = inspect.signature(call)
  except (TypeError, ValueError):
    return False
  return "train" in sig.parameters or any(
      p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def train_kwargs(model: Any, train: bool) -> dict[str, bool]:
  """``{'train': train}`` when the model takes it, else ``{}`` (no mode)."""
  return {"train": train} if accepts_train(model) else {}


def hashable(model: nn.Module) -> nn.Module:
  """``model`` with list-valued attributes made tuples (Flax hashes it)."""
  if not isinstance(model, nn.Module) or not dataclasses.is_dataclass(model):
    return model
  changes = {}
  for f in dataclasses.fields(model):
    if f.name in ("parent", "name") or not f.init:
      continue
    v = getattr(model, f.name, None)
    if isinstance(v, list):
      changes[f.name] = _tuples(v)
    elif isinstance(v, dict):
      changes[f.name] = tuple(sorted((k, _tuples(x)) for k, x in v.items()))
  return model.clone(**changes) if changes else model


def _tuples(v: Any) -> Any:
  return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _tag_outputs(next_fun, args, kwargs, context):
  """Marks each module call's output in the jaxpr (``checkpoint_name``)."""
  out = next_fun(*args, **kwargs)
  if context.method_name == "__call__" and isinstance(out, jax.Array):
    path = "/".join(str(p) for p in context.module.path)
    out = checkpoint_name(out, walk.OUTPUT_TAG + path)
  return out


# ------------------------------------------------------------- analyze
@functools.lru_cache(maxsize=64)
def _analyze(model, hw: tuple[int, int], channels: int) -> Graph:
  x = jax.ShapeDtypeStruct((1,) + hw + (channels,), jnp.float32)
  kw = train_kwargs(model, False)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, **kw), x)

  def apply(v, x):
    with nn.intercept_methods(_tag_outputs):
      return model.apply(v, x, **kw)

  walker, outs, paths, leaves = walk.trace(apply, variables, x)
  out_acts = [o for o in jax.tree.leaves(
      outs, is_leaf=lambda o: isinstance(o, walk._Act))  # pylint: disable=protected-access
              if isinstance(o, walk._Act)]  # pylint: disable=protected-access
  # The layers whose channels are the output (the classifier); what reaches
  # it through a statistic or a mixing operation was pinned on the way.
  out_flow = frozenset().union(*[
      frozenset(walker.owner(o.gid)[0]) if o.aligned else o.flow
      for o in out_acts]) - {walker.IMAGE}
  for o in out_acts:
    if o.aligned:
      walker._node("sink", len(o.ref), (o.ref,), gid=o.gid)  # pylint: disable=protected-access
  return _build(walker, hw + (channels,), out_flow, paths, leaves)


def _build(walker: walk.Walker, input_shape, out_flow, paths, leaves
           ) -> Graph:
  recs = walker.records
  producers = [p for p, r in recs.items()
               if r["kind"] != "norm" and not r.get("depthwise")]
  # Spaces, in order of their first producer.
  groups: dict[Path, list[Path]] = {}
  for p in producers:
    groups.setdefault(walker.find(p), []).append(p)
  spaces = tuple(frozenset(g) for g in sorted(
      groups.values(), key=lambda g: min(recs[p]["order"] for p in g)))
  space_index = {p: i for i, s in enumerate(spaces) for p in s}

  def channels_of(gid):
    """(space index, channel) per position; -1 for the image."""
    owners, chan = walker.owner(gid)
    sp = np.array([space_index.get(o, -1) for o in owners], np.int64)
    return sp, chan

  param_count = {}
  for p, leaf in zip(paths, leaves):
    if p[0] == "params":
      param_count[p[1:-1]] = param_count.get(p[1:-1], 0) + int(
          np.prod(leaf.shape))
  # Norm following each producer: the first norm fed by exactly it.
  nodes = walker.nodes
  for p, r in recs.items():
    r["params"] = param_count.get(p, 0)
    if r["kind"] != "norm":
      continue
    r["centres"] = p in walker.centring
    first = nodes[int(np.asarray(r["in_ref"])[0] >> prog.SHIFT)]
    r["stats"] = (BATCH if r["centres"] else
                  CHANNELS if first.kind == "stat" else NONE)
    src = _source_through_stats(nodes, r["in_ref"])
    if src is not None:
      r["follows"] = src
      prod = recs[src]
      if prod.get("norm") is None:
        prod["norm"] = p
      r["in_hw"] = r["out_hw"] = prod["out_hw"]
  # Blocks.
  blocks = []
  for b in walker.blocks:
    main = tuple((c, recs[c].get("norm")) for c in b["main"])
    short = (b["shortcut"][-1], recs[b["shortcut"][-1]].get("norm")) if (
        b["shortcut"]) else None
    for c in b["shortcut"]:
      recs[c]["shortcut"] = True
      if recs[c].get("norm"):
        recs[recs[c]["norm"]]["shortcut"] = True
    recs[b["main"][-1]]["block_last"] = True
    some = next((p for p in b["flow"] if p in space_index), None)
    blocks.append(Block(main, short, space_index.get(some, -1)))
  for p in producers:
    recs[p]["stem"] = recs[p]["kind"] == "conv" and recs[p]["reads_image"]
  # Input maps.
  for p, r in recs.items():
    gid = r.pop("gid", None)
    r.pop("in_ref", None)
    r.pop("node", None)
    r.pop("has_bias", None)
    r.pop("padded", None)
    r.pop("reads_image", None)
    r["aligned"] = gid is not None
    if gid is None:
      r["in_channel_map"] = None
      continue
    sp, chan = channels_of(gid)
    r["in_channel_map"] = (None if np.array_equal(chan, np.arange(len(chan)))
                           else tuple(int(c) for c in chan))
    if len(set(sp.tolist())) > 1:
      r["in_spaces"] = tuple(int(s) for s in sp)
  mixing = dict(walker.mixed)
  for p in producers:
    recs[p]["takes_part"] = _takes_part(recs[p], p, out_flow, mixing)
  layers = {p: LayerInfo(**{k: v for k, v in r.items()
                            if k in _FIELDS}) for p, r in recs.items()}
  module_outputs = {}
  for path, a in walker.module_out.items():
    module_outputs[path] = (a.gid, a.ref) if a.aligned else None
  affine = {leaf: d["gid"] for leaf, d in walker.affine.items()}
  program = prog.Program(walker.nodes, walker.layer_inputs)
  return Graph(layers=layers, blocks=tuple(blocks), spaces=spaces,
               outputs=frozenset(out_flow), mixed=frozenset(mixing),
               input_shape=tuple(input_shape), mixing=mixing,
               activation_macs=walker.activation_macs, program=program,
               module_outputs=module_outputs, affine=affine,
               gid_space=channels_of)


_FIELDS = frozenset(f.name for f in dataclasses.fields(LayerInfo))


def _source_through_stats(nodes: Sequence[prog.Node], ref: np.ndarray
                          ) -> Path | None:
  """The conv/dense layer whose whole output ``ref`` is, through statistics
  (LayerNorm's centring and scaling) at most; None otherwise."""
  ref = np.asarray(ref)
  while True:
    ids = set((ref >> prog.SHIFT).tolist())
    if len(ids) != 1:
      return None
    node = nodes[ids.pop()]
    if not np.array_equal(ref & prog.ELEMENT, np.arange(node.size)):
      return None
    if node.kind in ("source", "depthwise"):
      return node.layer
    if node.kind != "stat":
      return None
    ref = node.inputs[0]


def _takes_part(r: dict, path: Path, outputs, mixing) -> bool:
  """DSP's taking-part rule (module docstring)."""
  if path in outputs or not r["aligned"]:
    return False
  if mixing.get(path, (None,))[0] == MIXES:
    return False
  if r["kind"] == "conv":
    return (r["feature_groups"] == 1 and not r.get("stem")
            and not r.get("shortcut"))
  cmap = r.get("in_channel_map")
  one_to_one = cmap is None or len(set(cmap)) == len(cmap)
  return r.get("in_rank", 2) >= 3 and one_to_one and not r.get("in_spaces")


def analyze(model, image_size: int | Sequence[int] = 32,
            channels: int | None = None) -> Graph:
  """The traced graph of ``model`` for one ``image_size`` image.

  The result is cached per (model, shape); Flax modules are hashable
  dataclasses (list-valued attributes are made tuples first), so equal
  models share one graph. A model wrapped by ``models.prunable`` is analysed
  as the model it wraps.

  Args:
    model: a Flax Linen module called as ``model.apply(variables, x)`` (with
      ``train=False`` when its ``__call__`` takes ``train``) on NHWC images.
    image_size: height = width, or (height, width).
    channels: image channels (None: the model's, ``layers.input_channels``).

  Returns:
    The ``Graph``.

  Raises:
    ValueError: a bad image size, or a model the walk cannot trace (a layer
      called twice, weights computed from the image), naming the layer.
  """
  hw = (image_size, image_size) if isinstance(image_size, int) else tuple(
      int(s) for s in image_size)
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f"image_size must be an int or (height, width), got "
                     f"{image_size!r}")
  model = hashable(getattr(model, "plain_model", model))
  if channels is None:
    channels = input_channels(model)
  return _analyze(model, hw, int(channels))


def check_followed(graph: Graph, layers: Sequence[LayerInfo], method: str
                   ) -> None:
  """Raises a one-line error for a layer whose channels a method needs but
  the walk could not follow (an operation it does not know).

  Args:
    graph: the graph.
    layers: the layers the method prunes.
    method: the method's name, for the message.
  """
  for l in layers:
    got = graph.mixing.get(l.path)
    if got is not None and got[0] == UNKNOWN:
      raise ValueError(
          f"{method}: the output channels of {l.name} reach the JAX "
          f"primitive {got[1]!r}, which the channel graph cannot follow; "
          f"{method} cannot prune them")


def apply_fn(model: Any) -> Callable[..., Any]:
  """``fn(variables, x, train, **kw)`` calling ``model.apply`` with the
  model's own convention (``train`` passed only when accepted)."""
  takes = accepts_train(model)

  def fn(variables, x, train: bool = False, **kw):
    if takes:
      kw["train"] = train
    return model.apply(variables, x, **kw)

  return fn
