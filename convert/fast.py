"""Fast inference export of pruned models: a formulation chosen per layer.

A packed or slimmed file keeps the structure pruning left (DSP's branches
with their channel gathers and index-adds, DDROP's index-added residuals),
which is exact but often slower than the dense network. This module rewrites
such a model into exact equivalents that run faster:

* every BatchNorm is folded into the conv before it (weight and bias);
* every conv layer is described by what pruning kept (``ConvSpec``: per
  branch, its kept inputs and kept filters, in the dense layer's numbering),
  so any packed model can be described, whatever produced it;
* each layer is lowered in one of ``FORMULATIONS``, all exact:

  - ``branches``: the packed branches, each gathering its inputs with
    ``index_select``, outputs concatenated;
  - ``clusters``: branches merged into clusters, one conv per cluster over the
    union of the cluster's inputs;
  - ``union``: one conv over the union of the layer's kept inputs, producing
    only its kept filters (no gather when the union is the whole input);
  - ``dense_in``: one conv over every channel of its input tensor (zero
    columns where not kept; no gather), producing only the kept filters;
  - ``padded``: one conv over every input channel producing every filter of
    the dense layer (zero rows where pruned): no gather, and the residual sum
    is a plain add instead of an index-add;

* the memory format (``nchw`` / ``channels_last``) is chosen for the whole
  network, per batch regime (below).

Small and large batches want different plans: on one thread of a CPU with
torch 2.13, channels_last convs are cheaper per multiply-accumulate at large
batches (2-4x for NCHW convs of few channels over 32x32 images), while its
gathers and index-adds cost about ten times their NCHW cost and its calls
about twice, which dominates at small batches. A plan (``Plan``) therefore
holds one ``Regime`` per batch regime (``REGIMES``: batch 1 and batch 128),
each with its own memory format and formulations, chosen by a cost model
(``COSTS``, per regime and memory format: a conv's multiply-accumulates and
call overhead, gathers, concatenations and index-adds per element, from
single ops and whole networks timed at batch 1 and 128) or, with
``tune=True``, by timing the candidates at that batch on the exporting
machine. The plan is written as JSON beside the files; a cached plan is
reused when it was made for the same model structure, torch version and plan
version, and ignored with a warning otherwise.

``export_fast`` writes ``fast.pt`` (TorchScript, traced and frozen: opens with
``torch.jit.load`` and needs no project code; when the regimes' plans differ,
a scripted ``BatchDispatch`` runs the small plan on batches up to
``Plan.threshold`` and the large one above), ``fast.pt2`` (``torch.export``,
batch dynamic, the same dispatch through ``torch.cond``) and
``fast_plan.json``, and checks their logits against the masked model's at a
batch of each regime. ``convert.fast_jax`` applies the same lowering in JAX
(the large regime's formulations).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import statistics
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from convert import writer

FORMULATIONS = ("branches", "clusters", "union", "dense_in", "padded")
MEMORY_FORMATS = ("nchw", "channels_last")
FAST, FAST_PROGRAM, FAST_PLAN = "fast.pt", "fast.pt2", "fast_plan.json"
PLAN_VERSION = 2
BN_EPS = 1e-5

# Batch regimes: each gets its own plan (memory format and formulations),
# chosen at that regime's batch; at run time ``fast.pt`` runs the small plan
# for batches up to ``SMALL_BATCH_MAX`` and the large one above it (on one
# thread, the pruned resnet56_g3 ran as fast in NCHW as in channels_last at
# batch 8: 27.5 vs 27.1 ms).
REGIMES = {"small": 1, "large": 128}
SMALL_BATCH_MAX = 8

# Cost model, seconds per unit, per batch regime and memory format (one
# thread, CPU, torch 2.13). ``mac``: one conv multiply-accumulate; ``narrow``:
# a conv with n inputs or filters costs (1 + narrow / n) times its MACs
# (small convs use the vector units badly; large-batch NCHW convs of few
# channels over 32x32 images are about 4x slower per MAC than wide ones);
# ``call``: overhead of one op; ``gather``/``scatter``/``copy``/``add``: per
# element moved by index_select / index_add / cat / an elementwise add.
# ``narrow`` and the per-element costs are from single ops timed at batch 1
# and 128 (``median_seconds``); ``mac``, ``call`` and the channels_last
# gathers at batch 1 are fitted to whole traced resnet56_g3 networks (dense,
# and pruned under each regime's plan, in both formats) timed interleaved
# at batch 1 and 128: in a whole network a MAC costs about 0.6x its
# isolated cost at batch 1 (no per-module overhead) and about 2x at batch
# 128 (activations out of cache), and at batch 1 channels_last ops cost
# about twice NCHW's per call and its gathers and index-adds 8-17x.
# So at batch 1 NCHW wins for pruned networks (1.3x on resnet56_g3) and at
# batch 128 channels_last does (its convs 2-4x cheaper per MAC over 32x32
# images).
COSTS = {
    "small": {
        "nchw": {"mac": 29e-12, "narrow": 10.0, "call": 8e-6,
                 "gather": 0.3e-9, "scatter": 0.9e-9, "copy": 0.2e-9,
                 "add": 0.3e-9},
        "channels_last": {"mac": 20e-12, "narrow": 16.0, "call": 16e-6,
                          "gather": 5e-9, "scatter": 7e-9, "copy": 0.4e-9,
                          "add": 0.3e-9},
    },
    "large": {
        "nchw": {"mac": 16e-12, "narrow": 64.0, "call": 8e-6,
                 "gather": 0.3e-9, "scatter": 0.8e-9, "copy": 0.15e-9,
                 "add": 0.2e-9},
        "channels_last": {"mac": 31e-12, "narrow": 8.0, "call": 8e-6,
                          "gather": 2.2e-9, "scatter": 3e-9, "copy": 0.2e-9,
                          "add": 0.2e-9},
    },
}


def regime_of(batch: int) -> str:
  """The batch regime (``REGIMES`` key) a batch runs in."""
  return "small" if batch <= SMALL_BATCH_MAX else "large"


def cost_constants(memory_format: str, batch: int) -> Mapping[str, float]:
  """The cost model's constants for a memory format at a batch."""
  return COSTS[regime_of(batch)][memory_format]


# ---------------------------------------------------------------- structure
@dataclasses.dataclass
class BranchSpec:
  """One branch of a conv layer, BatchNorm folded.

  Attributes:
    inputs: kept input channels (the layer's input numbering).
    outputs: kept filters (the layer's output numbering).
    weight: (len(outputs), len(inputs), k, k).
    bias: (len(outputs),).
  """

  inputs: np.ndarray
  outputs: np.ndarray
  weight: np.ndarray
  bias: np.ndarray


@dataclasses.dataclass
class ConvSpec:
  """A conv layer as pruning left it: branches over a dense layer's channels.

  A dense (unpruned) layer is one branch with every input and filter.

  Attributes:
    name: layer name (unique in the network).
    in_width: channels of the dense layer's input.
    out_width: filters of the dense layer.
    kernel: kernel size (square).
    stride: stride.
    padding: symmetric zero padding.
    in_hw: input height (= width) in pixels.
    branches: kept structure; filters of different branches are disjoint.
    relu: apply ReLU after the (folded) BatchNorm.
  """

  name: str
  in_width: int
  out_width: int
  kernel: int
  stride: int
  padding: int
  in_hw: int
  branches: list[BranchSpec]
  relu: bool

  @property
  def out_hw(self) -> int:
    return (self.in_hw + 2 * self.padding - self.kernel) // self.stride + 1

  def dense(self) -> tuple[np.ndarray, np.ndarray]:
    """Dense-shaped (out, in, k, k) weight and (out,) bias, zero where pruned."""
    dtype = self.branches[0].weight.dtype if self.branches else np.float32
    w = np.zeros((self.out_width, self.in_width, self.kernel, self.kernel),
                 dtype)
    b = np.zeros((self.out_width,), dtype)
    for br in self.branches:
      w[np.ix_(br.outputs, br.inputs)] = br.weight
      b[br.outputs] = br.bias
    return w, b

  def kept_outputs(self) -> np.ndarray:
    if not self.branches:
      return np.zeros((0,), np.int64)
    return np.sort(np.concatenate([br.outputs for br in self.branches]))

  def structure(self) -> list[Any]:
    """What the plan depends on (no weights), for fingerprints."""
    return [self.name, self.in_width, self.out_width, self.kernel, self.stride,
            self.padding, self.in_hw, self.relu,
            [[br.inputs.tolist(), br.outputs.tolist()] for br in self.branches]]


@dataclasses.dataclass
class BlockSpec:
  """A residual block: ``relu(shortcut(x) + chain(x))``.

  The chain's last conv writes into the residual space (``width``
  channels); its kept filters are added at their channels. An empty chain adds
  ``const`` (or nothing when None).

  Attributes:
    name: block name.
    main: the convs of the main branch in call order.
    shortcut: the shortcut conv (identity when None).
    width: channels of the residual space.
    const: (width,) constant added when ``main`` is empty.
  """

  name: str
  main: list[ConvSpec]
  shortcut: ConvSpec | None
  width: int
  const: np.ndarray | None = None


@dataclasses.dataclass
class PoolSpec:
  """Max pooling (kernel, stride, padding)."""

  kernel: int
  stride: int
  padding: int


@dataclasses.dataclass
class NetSpec:
  """A network as a sequence of convs, blocks and pools, then a head.

  Attributes:
    model: registry name (or any name identifying the architecture).
    image_size: input height/width.
    in_channels: input channels.
    body: ``ConvSpec`` / ``BlockSpec`` / ``PoolSpec`` in order.
    pool: ``None``: global average pool; an int: adaptive average pool to
      that size, then an NCHW flatten.
    head: ops after pooling: ``("linear", weight (out, in), bias)``,
      ``("relu",)``, ``("slim_layernorm", weight, bias, width, removed, eps)``.
    pruned: False when nothing was removed (the fast model is then the
      BN-folded dense model).
    macs_dense: multiply-accumulates of the dense network (per image).
  """

  model: str
  image_size: int
  in_channels: int
  body: list[Any]
  pool: int | None
  head: list[tuple]
  pruned: bool = True
  macs_dense: int = 0

  def convs(self) -> list[ConvSpec]:
    out = []
    for item in self.body:
      if isinstance(item, ConvSpec):
        out.append(item)
      elif isinstance(item, BlockSpec):
        out += item.main + ([item.shortcut] if item.shortcut else [])
    return out

  def fingerprint(self) -> str:
    """Hash of the structure a plan depends on (shapes and kept indices)."""
    body = []
    for item in self.body:
      if isinstance(item, ConvSpec):
        body.append(item.structure())
      elif isinstance(item, BlockSpec):
        body.append([item.name, item.width, [c.structure() for c in item.main],
                     item.shortcut.structure() if item.shortcut else None])
      else:
        body.append(["pool", item.kernel, item.stride, item.padding])
    blob = json.dumps([self.model, self.image_size, self.in_channels, body,
                       self.pool, [h[0] for h in self.head]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fold_bn(weight: np.ndarray, bias: np.ndarray | None,
            bn: Mapping[str, np.ndarray], eps: float = BN_EPS
            ) -> tuple[np.ndarray, np.ndarray]:
  """Conv (O, I, k, k) weight and bias with an eval-mode BatchNorm folded in.

  Args:
    weight: conv weight.
    bias: conv bias or None.
    bn: ``weight``, ``bias``, ``running_mean``, ``running_var`` (O,).
    eps: the BatchNorm's epsilon.

  Returns:
    ``(weight, bias)`` computing ``bn(conv(x))``.
  """
  scale = np.asarray(bn["weight"], np.float64) / np.sqrt(
      np.asarray(bn["running_var"], np.float64) + eps)
  b = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias,
                                                                 np.float64)
  w = np.asarray(weight, np.float64) * scale[:, None, None, None]
  b = (b - np.asarray(bn["running_mean"], np.float64)) * scale + np.asarray(
      bn["bias"], np.float64)
  return w.astype(weight.dtype), b.astype(weight.dtype)


def dense_conv_spec(name: str, weight: np.ndarray, bias: np.ndarray,
                    stride: int, padding: int, in_hw: int, relu: bool,
                    outputs: np.ndarray | None = None,
                    out_width: int | None = None) -> ConvSpec:
  """A one-branch layer reading every input channel.

  Args:
    name: layer name.
    weight: folded (O, I, k, k) weight.
    bias: folded (O,) bias.
    stride: stride.
    padding: padding.
    in_hw: input size.
    relu: ReLU after it.
    outputs: the filters' channels in an ``out_width`` space (default: all).
    out_width: width of that space (default O).

  Returns:
    The layer.
  """
  o, i, k, _ = weight.shape
  outputs = np.arange(o) if outputs is None else np.asarray(outputs, np.int64)
  return ConvSpec(name, i, o if out_width is None else out_width, k, stride,
                  padding, in_hw, [BranchSpec(np.arange(i), outputs.astype(
                      np.int64), weight, bias)] if o else [], relu)


def spec_macs(spec: NetSpec) -> int:
  """Multiply-accumulates per image of the kept convs and linears."""
  total = 0
  for c in spec.convs():
    total += sum(br.weight.size for br in c.branches) * c.out_hw ** 2
  return total + sum(int(np.size(h[1])) for h in spec.head if h[0] == "linear")


# ------------------------------------------------------------------ plans
@dataclasses.dataclass
class LayerChoice:
  """A layer's formulation; ``clusters`` lists branch indices per cluster."""

  formulation: str
  clusters: list[list[int]] | None = None

  def to_json(self) -> dict[str, Any]:
    out: dict[str, Any] = {"formulation": self.formulation}
    if self.clusters is not None:
      out["clusters"] = self.clusters
    return out

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "LayerChoice":
    if d["formulation"] not in FORMULATIONS:
      raise ValueError(f"unknown formulation {d['formulation']!r}; valid: "
                       f"{', '.join(FORMULATIONS)}")
    cl = d.get("clusters")
    return cls(d["formulation"],
               None if cl is None else [list(map(int, c)) for c in cl])


@dataclasses.dataclass
class Regime:
  """One batch regime's plan: a memory format and per-layer formulations.

  Attributes:
    batch: the batch it was chosen at.
    memory_format: ``nchw`` or ``channels_last``.
    layers: layer name -> choice.
    info: estimates or timings, formulation counts (free-form, JSON).
  """

  batch: int
  memory_format: str
  layers: dict[str, LayerChoice]
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  def same_lowering(self, other: "Regime") -> bool:
    """Whether both lower every layer alike (the same module)."""
    return (self.memory_format, self.layers) == (other.memory_format,
                                                  other.layers)

  def to_json(self) -> dict[str, Any]:
    return {"batch": self.batch, "memory_format": self.memory_format,
            "layers": {k: v.to_json() for k, v in self.layers.items()},
            "info": self.info}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Regime":
    if d["memory_format"] not in MEMORY_FORMATS:
      raise ValueError(f"unknown memory format {d['memory_format']!r}")
    return cls(int(d["batch"]), d["memory_format"],
               {k: LayerChoice.from_json(v) for k, v in d["layers"].items()},
               dict(d.get("info", {})))


@dataclasses.dataclass
class Plan:
  """The chosen plan of a network, one per batch regime.

  ``fast.pt`` runs ``regimes["small"]`` for batches up to ``threshold`` and
  ``regimes["large"]`` above; ``fast.pt2`` does the same through
  ``torch.cond``, and ``convert.fast_jax`` uses the large regime's
  formulations.

  Attributes:
    model: the network's name.
    fingerprint: ``NetSpec.fingerprint`` of the network it was made for.
    torch_version: ``torch.__version__`` it was made with.
    method: ``cost_model`` or ``tuned``.
    regimes: ``small`` and ``large`` (``REGIMES``) -> their plans.
    threshold: the largest batch that runs the small regime's plan.
    pruned: whether anything was pruned.
    info: MACs, threads (free-form, JSON).
  """

  model: str
  fingerprint: str
  torch_version: str
  method: str
  regimes: dict[str, Regime]
  threshold: int = SMALL_BATCH_MAX
  pruned: bool = True
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def large(self) -> Regime:
    """The large-batch regime (``fast.pt2`` without dispatch, JAX)."""
    return self.regimes["large"]

  @property
  def memory_format(self) -> str:
    """The large regime's memory format."""
    return self.large.memory_format

  @property
  def layers(self) -> dict[str, LayerChoice]:
    """The large regime's formulations."""
    return self.large.layers

  def dispatches(self) -> bool:
    """Whether the regimes lower differently (``fast.pt`` holds both)."""
    return not self.regimes["small"].same_lowering(self.large)

  def to_json(self) -> dict[str, Any]:
    return {"version": PLAN_VERSION, "model": self.model,
            "fingerprint": self.fingerprint, "torch": self.torch_version,
            "method": self.method, "threshold": self.threshold,
            "pruned": self.pruned,
            "regimes": {k: v.to_json() for k, v in self.regimes.items()},
            "info": self.info}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Plan":
    if d.get("version") != PLAN_VERSION:
      raise ValueError(f"plan version {d.get('version')!r}, expected "
                       f"{PLAN_VERSION}")
    if set(d["regimes"]) != set(REGIMES):
      raise ValueError(f"plan regimes {sorted(d['regimes'])}, expected "
                       f"{sorted(REGIMES)}")
    return cls(d["model"], d["fingerprint"], d["torch"], d["method"],
               {k: Regime.from_json(v) for k, v in d["regimes"].items()},
               int(d["threshold"]), bool(d.get("pruned", True)),
               dict(d.get("info", {})))

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    text = json.dumps(self.to_json(), indent=1)
    return writer.save(path, lambda f: f.write(text.encode()))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Plan":
    return cls.from_json(json.loads(pathlib.Path(path).read_text()))


def cached_plan(path: str | os.PathLike | None, spec: NetSpec) -> Plan | None:
  """The plan at ``path`` when it was made for ``spec`` and this torch.

  Args:
    path: a plan JSON (None or a missing file: no cache).
    spec: the network to plan.

  Returns:
    The plan, or None (with a warning naming why when the file exists but was
    made for another model or torch version, or cannot be read).
  """
  if path is None or not pathlib.Path(path).is_file():
    return None
  try:
    plan = Plan.load(path)
  except (ValueError, KeyError, TypeError) as e:
    warnings.warn(f"{path}: unreadable plan ({e}); re-planning")
    return None
  if plan.fingerprint != spec.fingerprint():
    warnings.warn(f"{path}: plan made for another model ({plan.model}, "
                  f"structure {plan.fingerprint}; this one is {spec.model}, "
                  f"{spec.fingerprint()}); ignored, re-planning")
    return None
  if plan.torch_version != torch.__version__:
    warnings.warn(f"{path}: plan made with torch {plan.torch_version}, this is "
                  f"{torch.__version__}; ignored, re-planning")
    return None
  return plan


# ---------------------------------------------------------------- lowering
@dataclasses.dataclass
class Part:
  """One conv of a lowered layer.

  Attributes:
    gather: positions in the input tensor's channels to read (None: all, in
      order).
    outputs: output channels produced (the layer's numbering), in order.
    weight: (len(outputs), inputs read, k, k).
    bias: (len(outputs),).
  """

  gather: np.ndarray | None
  outputs: np.ndarray
  weight: np.ndarray
  bias: np.ndarray


def lower(conv: ConvSpec, layout: np.ndarray, choice: LayerChoice
          ) -> tuple[list[Part], np.ndarray]:
  """A layer's convs under a formulation, for an input holding ``layout``.

  Args:
    conv: the layer.
    layout: the input-space channels present in the input tensor, in order
      (every kept input must be present).
    choice: the formulation.

  Returns:
    ``(parts, out_layout)``: the convs (outputs concatenated in part order)
    and the output-space channels of the result, in order.
  """
  f = choice.formulation
  nb = len(conv.branches)
  if f == "branches":
    clusters = [[j] for j in range(nb)]
  elif f == "clusters":
    clusters = choice.clusters or [[j] for j in range(nb)]
    if sorted(j for c in clusters for j in c) != list(range(nb)):
      raise ValueError(f"{conv.name}: clusters {clusters} do not partition "
                       f"its {nb} branches")
  elif f in FORMULATIONS:
    clusters = [list(range(nb))]
  else:
    raise ValueError(f"unknown formulation {f!r}; valid: "
                     f"{', '.join(FORMULATIONS)}")
  w, b = conv.dense()
  position = np.full((conv.in_width,), -1, np.int64)
  position[layout] = np.arange(len(layout))
  parts = []
  for cluster in clusters:
    brs = [conv.branches[j] for j in cluster]
    if f == "padded":
      outputs = np.arange(conv.out_width)
    else:
      outputs = np.concatenate([br.outputs for br in brs])
    if f in ("dense_in", "padded"):
      pos = np.arange(len(layout))
    else:
      pos = np.unique(position[np.concatenate([br.inputs for br in brs])])
      if pos.size and pos[0] < 0:
        raise ValueError(f"{conv.name}: kept inputs missing from the input")
    cols = layout[pos]
    gather = None if np.array_equal(pos, np.arange(len(layout))) else pos
    parts.append(Part(gather, outputs.astype(np.int64),
                      np.ascontiguousarray(w[np.ix_(outputs, cols)]),
                      b[outputs]))
  out = (np.concatenate([p.outputs for p in parts]) if parts else
         np.zeros((0,), np.int64))
  return parts, out


def candidates(conv: ConvSpec) -> list[LayerChoice]:
  """The formulations worth considering for a layer (duplicates left out)."""
  nb = len(conv.branches)
  if nb == 0:
    return [LayerChoice("union")]
  out = [LayerChoice("union"), LayerChoice("dense_in")]
  if nb > 1:
    out.insert(0, LayerChoice("branches"))
  if nb > 2:
    clusters = merge_clusters(conv)
    if 1 < len(clusters) < nb:
      out.insert(1, LayerChoice("clusters", clusters))
  if len(conv.kept_outputs()) < conv.out_width:
    out.append(LayerChoice("padded"))
  return out


def _conv_cost(o: int, i: int, conv: ConvSpec, batch: int,
               c: Mapping[str, float]) -> float:
  if not o or not i:
    return 0.0
  macs = batch * o * i * conv.kernel ** 2 * conv.out_hw ** 2
  return c["call"] + macs * c["mac"] * (1 + c["narrow"] / min(o, i))


def _cluster_cost(conv: ConvSpec, cluster: Sequence[int], batch: int,
                  c: Mapping[str, float]) -> float:
  brs = [conv.branches[j] for j in cluster]
  i = len(np.unique(np.concatenate([br.inputs for br in brs])))
  o = sum(len(br.outputs) for br in brs)
  return _conv_cost(o, i, conv, batch, c) + c["call"] + (
      batch * i * conv.in_hw ** 2 * c["gather"])


def merge_clusters(conv: ConvSpec, memory_format: str = "nchw",
                   batch: int = 32) -> list[list[int]]:
  """Branches merged greedily (cheapest merge first) while merging pays.

  Args:
    conv: a layer with several branches.
    memory_format: the cost model's format.
    batch: the batch the cost is estimated for.

  Returns:
    Branch indices per cluster; between 1 and all branches' clusters.
  """
  c = cost_constants(memory_format, batch)
  clusters = [[j] for j in range(len(conv.branches))]
  best, best_cost = [list(x) for x in clusters], None
  while len(clusters) > 1:
    costs = {(a, b): _cluster_cost(conv, clusters[a] + clusters[b], batch, c)
             - _cluster_cost(conv, clusters[a], batch, c)
             - _cluster_cost(conv, clusters[b], batch, c)
             for a, b in itertools.combinations(range(len(clusters)), 2)}
    (a, b), delta = min(costs.items(), key=lambda kv: kv[1])
    clusters[a] = sorted(clusters[a] + clusters[b])
    del clusters[b]
    total = sum(_cluster_cost(conv, x, batch, c) for x in clusters)
    if best_cost is None or total < best_cost:
      best, best_cost = [list(x) for x in clusters], total
  return best


def layer_cost(conv: ConvSpec, parts: Sequence[Part], layout_in: np.ndarray,
               batch: int, memory_format: str) -> float:
  """Estimated seconds of a lowered layer (cost model ``COSTS``)."""
  c = cost_constants(memory_format, batch)
  t = 0.0
  for p in parts:
    t += _conv_cost(len(p.outputs), p.weight.shape[1], conv, batch, c)
    if p.gather is not None:
      t += c["call"] + batch * len(p.gather) * conv.in_hw ** 2 * c["gather"]
  if len(parts) > 1:
    t += c["call"] + batch * sum(len(p.outputs) for p in parts) * (
        conv.out_hw ** 2) * c["copy"]
  return t


def residual_cost(width: int, layout: np.ndarray, hw: int, batch: int,
                  memory_format: str) -> float:
  """Estimated seconds of adding a chain's output into the shortcut."""
  c = cost_constants(memory_format, batch)
  if np.array_equal(layout, np.arange(width)):
    return c["call"] + batch * width * hw * hw * c["add"]
  # index_add out of place: a copy of the shortcut, then the scatter.
  return 2 * c["call"] + batch * hw * hw * (width * c["copy"]
                                            + len(layout) * c["scatter"])


def _per_image(cost: Callable[[int], float], batches: Sequence[int]) -> float:
  return sum(cost(b) / b for b in batches) / len(batches)


def chain_options(convs: Sequence[ConvSpec], layout: np.ndarray
                  ) -> list[tuple[list[LayerChoice], list[list[Part]],
                                  np.ndarray]]:
  """Every combination of candidate formulations along a chain of convs.

  Returns:
    ``[(choices, parts per conv, final layout)]``, distinct lowerings only.
  """
  options = [([], [], layout)]
  for conv in convs:
    nxt, seen = [], set()
    for choices, parts, lay in options:
      for ch in candidates(conv):
        p, out = lower(conv, lay, ch)
        key = (id(lay), tuple((None if q.gather is None else q.gather.tobytes(),
                               q.outputs.tobytes()) for q in p))
        if key in seen:
          continue
        seen.add(key)
        nxt.append((choices + [ch], parts + [p], out))
    options = nxt
  return options


def estimate_chain(convs: Sequence[ConvSpec], layouts: Sequence[np.ndarray],
                   parts: Sequence[Sequence[Part]], width: int | None,
                   memory_format: str, batches: Sequence[int]) -> float:
  """Cost-model seconds per image of a lowered chain (and its residual add)."""
  def cost(b):
    t = sum(layer_cost(c, p, lay, b, memory_format)
            for c, p, lay in zip(convs, parts, layouts))
    if width is not None and convs:
      t += residual_cost(width, np.concatenate([q.outputs for q in parts[-1]]),
                         convs[-1].out_hw, b, memory_format)
    return t
  return _per_image(cost, batches)


def _chain_layouts(layout: np.ndarray, parts: Sequence[Sequence[Part]]
                   ) -> list[np.ndarray]:
  out = [layout]
  for p in parts[:-1]:
    out.append(np.concatenate([q.outputs for q in p]))
  return out


def plan_chain(convs: Sequence[ConvSpec], layout: np.ndarray,
               width: int | None, memory_format: str,
               batches: Sequence[int] = (REGIMES["large"],),
               timer: Callable[[list[LayerChoice]], float] | None = None,
               top: int = 3) -> tuple[list[LayerChoice], float]:
  """The cheapest formulations for a chain of convs.

  Args:
    convs: the chain (a block's main branch, or one conv).
    layout: channels present in the chain's input.
    width: residual width its last conv adds into (None: no residual).
    memory_format: the format the costs are for.
    batches: batches the per-image cost is averaged over.
    timer: measures a combination's seconds per image (tuning); None uses the
      cost model alone.
    top: combinations the timer measures (the cost model's best).

  Returns:
    ``(choices, seconds per image)``.
  """
  scored = []
  for choices, parts, _ in chain_options(convs, layout):
    est = estimate_chain(convs, _chain_layouts(layout, parts), parts, width,
                         memory_format, batches)
    scored.append((est, choices))
  scored.sort(key=lambda s: s[0])
  if timer is None or len(scored) == 1:
    return scored[0][1], scored[0][0]
  timed = [(timer(ch), ch) for _, ch in scored[:top]]
  t, ch = min(timed, key=lambda s: s[0])
  return ch, t


# ------------------------------------------------------------ torch modules
class FastConv(nn.Module):
  """A lowered layer: per part, an optional channel gather and a conv."""

  def __init__(self, conv: ConvSpec, parts: Sequence[Part]):
    super().__init__()
    self.convs = nn.ModuleList()
    # Plain list: tracing records the index tensors as constants.
    self.gathers = []
    for p in parts:
      m = nn.Conv2d(p.weight.shape[1], p.weight.shape[0], conv.kernel,
                    conv.stride, conv.padding)
      m.weight = nn.Parameter(torch.from_numpy(p.weight.copy()))
      m.bias = nn.Parameter(torch.from_numpy(np.array(p.bias, copy=True)))
      self.convs.append(m)
      self.gathers.append(None if p.gather is None else
                          torch.from_numpy(p.gather.astype(np.int64)))
    self.relu = conv.relu

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    outs = []
    for conv, g in zip(self.convs, self.gathers):
      outs.append(conv(x if g is None else torch.index_select(x, 1, g)))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return torch.relu(y) if self.relu else y


class FastBlock(nn.Module):
  """``relu(shortcut + chain)``, the chain's output added (or index-added)."""

  def __init__(self, main: Sequence[FastConv], shortcut: FastConv | None,
               index: np.ndarray | None, const: np.ndarray | None):
    super().__init__()
    self.main = nn.Sequential(*main)
    self.has_main = bool(main)
    self.shortcut = shortcut
    self.index = None if index is None else torch.from_numpy(
        index.astype(np.int64))
    self.const = None if const is None else torch.from_numpy(
        np.array(const, copy=True)).view(1, -1, 1, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    s = x if self.shortcut is None else self.shortcut(x)
    if not self.has_main:
      return torch.relu(s if self.const is None else s + self.const)
    y = self.main(x)
    if self.index is None:
      return torch.relu(s + y)
    return torch.relu(s.index_add(1, self.index, y))


class SlimLayerNorm(nn.Module):
  """LayerNorm of which only some units are computed (``torch_zoo``'s)."""

  def __init__(self, weight, bias, width, removed, eps):
    super().__init__()
    from convert import torch_zoo  # pylint: disable=import-outside-toplevel
    self.norm = torch_zoo.SlimLayerNorm(
        torch.from_numpy(np.array(weight, copy=True)),
        torch.from_numpy(np.array(bias, copy=True)), width,
        torch.from_numpy(np.array(removed, copy=True)), eps)

  def forward(self, x):
    return self.norm(x)


def head_module(op: tuple) -> nn.Module:
  """The torch module of a head op (``NetSpec.head``)."""
  if op[0] == "linear":
    m = nn.Linear(op[1].shape[1], op[1].shape[0])
    m.weight = nn.Parameter(torch.from_numpy(np.array(op[1], copy=True)))
    m.bias = nn.Parameter(torch.from_numpy(np.array(op[2], copy=True)))
    return m
  if op[0] == "relu":
    return nn.ReLU()
  if op[0] == "slim_layernorm":
    return SlimLayerNorm(*op[1:])
  raise ValueError(f"unknown head op {op[0]!r}")


class FastNet(nn.Module):
  """The lowered network (eval mode)."""

  def __init__(self, body: Sequence[nn.Module], pool: int | None,
               head: Sequence[nn.Module], channels_last: bool):
    super().__init__()
    self.body = nn.Sequential(*body)
    self.pool = pool
    self.head = nn.Sequential(*head)
    self.channels_last = channels_last

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.channels_last:
      x = x.contiguous(memory_format=torch.channels_last)
    x = self.body(x)
    if self.pool is None:
      x = x.mean((2, 3))
    else:
      x = torch.flatten(nn.functional.adaptive_avg_pool2d(
          x, (self.pool, self.pool)), 1)
    return self.head(x)


def walk(spec: NetSpec, plan: Plan | Regime, visit: Callable[..., Any]
         ) -> list[Any]:
  """Lowers every item of ``spec.body`` under ``plan`` and calls ``visit``.

  A ``Plan`` stands for its large regime (``Plan.layers``).

  ``visit(kind, item, lowered)`` with kind ``conv`` (lowered: parts),
  ``block`` (lowered: ``(main parts per conv, shortcut parts, index)``,
  index None for a plain add) or ``pool``. Shared by the torch and JAX
  builders so both lower identically.

  Returns:
    The ``visit`` results in order.
  """
  out = []
  layout = np.arange(spec.in_channels)
  for item in spec.body:
    if isinstance(item, PoolSpec):
      out.append(visit("pool", item, None))
    elif isinstance(item, ConvSpec):
      parts, lay = lower(item, layout, plan.layers.get(item.name,
                                                       LayerChoice("union")))
      if not np.array_equal(lay, np.arange(item.out_width)):
        raise ValueError(f"{item.name}: a layer outside a block must produce "
                         "all its channels in order")
      out.append(visit("conv", item, parts))
      layout = lay
    else:
      lay, main = layout, []
      for conv in item.main:
        parts, lay = lower(conv, lay, plan.layers.get(conv.name,
                                                      LayerChoice("union")))
        main.append(parts)
      short = None
      if item.shortcut is not None:
        short, _ = lower(item.shortcut, layout, LayerChoice("union"))
      index = None
      if main and not np.array_equal(lay, np.arange(item.width)):
        index = lay
      out.append(visit("block", item, (main, short, index)))
      layout = np.arange(item.width)
  return out


def build_torch(spec: NetSpec, plan: Plan | Regime) -> FastNet:
  """The eager fast module of a spec under a regime's plan (eval, CPU).

  A ``Plan`` stands for its large regime.
  """
  cl = plan.memory_format == "channels_last"

  def visit(kind, item, lowered):
    if kind == "pool":
      return nn.MaxPool2d(item.kernel, item.stride, item.padding)
    if kind == "conv":
      return FastConv(item, lowered)
    main, short, index = lowered
    return FastBlock([FastConv(c, p) for c, p in zip(item.main, main)],
                     None if short is None else FastConv(item.shortcut, short),
                     index, item.const)

  net = FastNet(walk(spec, plan, visit), spec.pool,
                [head_module(op) for op in spec.head], cl).eval()
  if cl:
    net = net.to(memory_format=torch.channels_last)
  return net


# ---------------------------------------------------------------- planning
def median_seconds(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5
                   ) -> float:
  """Median wall time of ``fn()`` after ``warmup`` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _time_module(module: nn.Module, shape: tuple[int, ...], batches, cl: bool,
                 repeats: int) -> float:
  """Per-image seconds of a module, averaged over ``batches``."""
  def per_batch(b):
    x = torch.randn((b,) + shape)
    if cl:
      x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
      return median_seconds(lambda: module(x), 1, repeats)
  return _per_image(per_batch, batches)


def _chain_timer(item: BlockSpec, layout: np.ndarray, fmt: str,
                 batches: Sequence[int], repeats: int
                 ) -> Callable[[list[LayerChoice]], float]:
  cl = fmt == "channels_last"
  first = item.main[0]

  def timer(choices):
    regime = Regime(batches[0], fmt, {c.name: ch for c, ch in
                                      zip(item.main, choices)})
    sub = NetSpec("", first.in_hw, first.in_width, [item], None, [])
    block = build_torch(sub, regime).body[0]
    if cl:
      block = block.to(memory_format=torch.channels_last)
    return _time_module(block, (first.in_width, first.in_hw, first.in_hw),
                        batches, cl, repeats)
  return timer


def plan_regime(spec: NetSpec, batch: int, formats: Sequence[str],
                tune: bool = False, repeats: int = 5) -> Regime:
  """The memory format and formulations that run fastest at one batch.

  Args:
    spec: the network.
    batch: the batch to plan for.
    formats: the memory formats to choose from.
    tune: time candidates (the cost model's best few per block, then the
      whole network in each format); else the cost model decides.
    repeats: timed calls per measurement (tuning).

  Returns:
    The regime's plan; ``info`` holds the per-format estimates (or timings)
    and the chosen formulations' counts.
  """
  per_format = {}
  for fmt in formats:
    layers, total = {}, 0.0
    layout = np.arange(spec.in_channels)
    for item in spec.body:
      if isinstance(item, BlockSpec) and item.main:
        timer = (_chain_timer(item, layout, fmt, (batch,), repeats) if tune
                 else None)
        choices, t = plan_chain(item.main, layout, item.width, fmt, (batch,),
                                timer)
        layers.update({c.name: ch for c, ch in zip(item.main, choices)})
        total += t
        layout = np.arange(item.width)
      elif isinstance(item, ConvSpec):
        total += plan_chain([item], layout, None, fmt, (batch,))[1]
        layout = np.arange(item.out_width)
      elif isinstance(item, BlockSpec):
        layout = np.arange(item.width)
    per_format[fmt] = (layers, total)
  info: dict[str, Any] = {}
  if tune and len(formats) > 1:
    whole = {}
    for fmt, (layers, _) in per_format.items():
      net = build_torch(spec, Regime(batch, fmt, layers))
      whole[fmt] = _time_module(net, (spec.in_channels, spec.image_size,
                                      spec.image_size), (batch,),
                                fmt == "channels_last", repeats)
    fmt = min(whole, key=whole.get)
    info["seconds_per_image"] = whole
  else:
    fmt = min(per_format, key=lambda f: per_format[f][1])
    info["estimated_seconds_per_image" if not tune else
         "block_seconds_per_image"] = {f: v[1] for f, v in per_format.items()}
  layers = per_format[fmt][0]
  counts = {f: sum(1 for c in layers.values() if c.formulation == f)
            for f in FORMULATIONS}
  info["formulations"] = {k: v for k, v in counts.items() if v}
  return Regime(batch, fmt, layers, info)


def make_plan(spec: NetSpec, *, tune: bool = False,
              memory_format: str | None = None,
              batches: Mapping[str, int] = REGIMES,
              threshold: int = SMALL_BATCH_MAX, repeats: int = 5,
              cache: str | os.PathLike | None = None) -> Plan:
  """Chooses every layer's formulation and the memory format, per regime.

  Args:
    spec: the network.
    tune: time candidates on this machine (``plan_regime``); else the cost
      model decides.
    memory_format: force ``nchw`` or ``channels_last`` in both regimes
      (None: choose per regime).
    batches: ``small`` and ``large`` -> the batch each regime is planned at.
    threshold: the largest batch that runs the small regime's plan.
    repeats: timed calls per measurement (tuning).
    cache: a plan JSON to reuse when it was made for this network and torch
      (``cached_plan``; a forced ``memory_format`` must match it too; it
      keeps its own batches and threshold).

  Returns:
    The plan.
  """
  if set(batches) != set(REGIMES) or not (
      batches["small"] <= threshold < batches["large"]):
    raise ValueError(f"batches must map {sorted(REGIMES)} to a small batch "
                     f"<= threshold {threshold} < a large one, got "
                     f"{dict(batches)}")
  cached = cached_plan(cache, spec)
  if cached is not None and all(
      memory_format in (None, r.memory_format)
      for r in cached.regimes.values()) and (
          cached.method == "tuned" or not tune):
    return cached
  formats = MEMORY_FORMATS if memory_format is None else (memory_format,)
  for f in formats:
    if f not in MEMORY_FORMATS:
      raise ValueError(f"memory format must be one of "
                       f"{', '.join(MEMORY_FORMATS)}, got {f!r}")
  regimes = {k: plan_regime(spec, b, formats, tune, repeats)
             for k, b in batches.items()}
  info: dict[str, Any] = {"threads": torch.get_num_threads(),
                          "macs": spec_macs(spec)}
  if spec.macs_dense:
    info["macs_dense"] = spec.macs_dense
  return Plan(spec.model, spec.fingerprint(), torch.__version__,
              "tuned" if tune else "cost_model", regimes, threshold,
              spec.pruned, info)


# ------------------------------------------------------------------ export
@dataclasses.dataclass
class FastExport:
  """Files written by ``export_fast``, measured differences, plan, notes."""

  files: dict[str, pathlib.Path]
  max_abs_diff: dict[str, float]
  plan: Plan
  notes: list[str]


class BatchDispatch(nn.Module):
  """Runs ``small`` on batches up to ``threshold`` and ``large`` above."""

  def __init__(self, small: nn.Module, large: nn.Module, threshold: int):
    super().__init__()
    self.small = small
    self.large = large
    self.threshold = threshold

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.size(0) <= self.threshold:
      return self.small(x)
    return self.large(x)


class CondDispatch(BatchDispatch):
  """``BatchDispatch`` through ``torch.cond``, for ``torch.export``."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.cond(x.size(0) <= self.threshold,
                      lambda y: self.small(y), lambda y: self.large(y), (x,))


def _trace(spec: NetSpec, regime: Regime) -> torch.jit.ScriptModule:
  net = build_torch(spec, regime)
  example = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
  with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    return torch.jit.trace(net, example, check_trace=False)


def script(spec: NetSpec, plan: Plan | Regime) -> torch.jit.ScriptModule:
  """The fast module traced and frozen (``torch.jit.load`` opens it alone).

  A plan whose regimes differ gives a scripted ``BatchDispatch`` over both
  traced regimes (freezing keeps both branches: the test is on the input).
  """
  if isinstance(plan, Regime) or not plan.dispatches():
    return torch.jit.freeze(_trace(spec, plan if isinstance(plan, Regime)
                                   else plan.large).eval())
  module = torch.jit.script(BatchDispatch(
      _trace(spec, plan.regimes["small"]), _trace(spec, plan.large),
      plan.threshold))
  return torch.jit.freeze(module.eval())


def export_program(spec: NetSpec, plan: Plan) -> Any:
  """The ``torch.export`` program of the fast module, batch dynamic.

  A plan whose regimes differ gives a ``CondDispatch`` over both.
  """
  net: nn.Module = build_torch(spec, plan.large)
  if plan.dispatches():
    net = CondDispatch(build_torch(spec, plan.regimes["small"]), net,
                       plan.threshold).eval()
  size = spec.image_size
  return torch.export.export(
      net, (torch.zeros(plan.threshold + 1, spec.in_channels, size, size),),
      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})


def _regime_checks(images: np.ndarray, want: np.ndarray, plan: Plan
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Check batches: one per regime when the plan dispatches, else the images.

  The small regime gets the first image, the large one the images repeated
  to ``threshold + 1``.
  """
  if not plan.dispatches():
    return [(images, want)]
  n = plan.threshold + 1
  reps = -(-n // len(images))
  return [(images[:1], want[:1]),
          (np.concatenate([images] * reps)[:n],
           np.concatenate([want] * reps)[:n])]


def _save_program(ep: Any, f: Any) -> None:
  # Its warning about tensor groups concerns non-CPU weights; ours are CPU.
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "No complete tensor found")
    torch.export.save(ep, f)


def export_fast(spec: NetSpec, out_dir: str | os.PathLike,
                images: np.ndarray, want: np.ndarray, *, tune: bool = False,
                plan: str | os.PathLike | None = None, program: bool = True,
                atol: float = 1e-4) -> FastExport:
  """Plans, lowers and writes ``fast.pt``, ``fast.pt2`` and ``fast_plan.json``.

  Args:
    spec: the network (``convert.fast_specs``).
    out_dir: directory to write into.
    images: NHWC check images.
    want: the masked model's logits on them.
    tune: time the candidates (else the cost model).
    plan: a cached plan JSON to reuse (default: ``out_dir/fast_plan.json``
      when tuning).
    program: also write the ``torch.export`` program.
    atol: largest accepted |logit| difference.

  Returns:
    Files, differences, the plan, and notes for the user.

  Raises:
    convert.writer.ConversionMismatch: a file's logits differ beyond atol.
  """
  out_dir = pathlib.Path(out_dir)
  if plan is None and tune:
    plan = out_dir / FAST_PLAN
  chosen = make_plan(spec, tune=tune, cache=plan)
  notes = []
  if not spec.pruned:
    notes.append("nothing pruned: fast.pt is the BN-folded dense model")
  files = {FAST_PLAN: chosen.save(out_dir / FAST_PLAN)}
  ts = script(spec, chosen)
  files[FAST] = writer.save(out_dir / FAST,
                                      lambda f: torch.jit.save(ts, f))
  checks = _regime_checks(images, want, chosen)
  diffs = {FAST: max(writer.check_logits(FAST, writer.torch_logits(
      torch.jit.load(str(files[FAST])), x), w, atol) for x, w in checks)}
  if program:
    ep = export_program(spec, chosen)
    files[FAST_PROGRAM] = writer.save(
        out_dir / FAST_PROGRAM, lambda f: _save_program(ep, f))
    loaded = torch.export.load(str(files[FAST_PROGRAM])).module()
    diffs[FAST_PROGRAM] = max(writer.check_logits(
        FAST_PROGRAM, writer.torch_logits(loaded, x), w, atol) for x, w in checks)

  def describe(r):
    counts = ", ".join(f"{k} x{v}" for k, v in r.info["formulations"].items())
    return f"{r.memory_format}, {counts or 'no layer with a choice'}"
  if chosen.dispatches():
    notes.append(f"fast plan: batch <= {chosen.threshold}: "
                 f"{describe(chosen.regimes['small'])}; larger: "
                 f"{describe(chosen.large)} ({chosen.method})")
  else:
    notes.append(f"fast plan: {describe(chosen.large)}, every batch "
                 f"({chosen.method})")
  return FastExport(files, diffs, chosen, notes)


@dataclasses.dataclass(frozen=True)
class Options:
  """How the export paths write the fast files.

  Attributes:
    tune: time the candidates on this machine (else the cost model).
    plan: a cached plan JSON to reuse (default with ``tune``: the output
      directory's ``fast_plan.json``).
  """

  tune: bool = False
  plan: str | None = None


def attach(result: Any, spec: NetSpec, out_dir: str | os.PathLike,
           options: Options, *, program: bool = True, atol: float = 1e-4
           ) -> FastExport:
  """Writes the fast files beside an export and records them in ``result``.

  The check images and the masked model's logits are the export's own
  (``reference_io.npz`` in ``out_dir``).

  Args:
    result: the ``convert.writer.ExportResult`` of the export.
    spec: the exported network's spec.
    out_dir: the export directory.
    options: tuning and plan cache.
    program: also write ``fast.pt2``.
    atol: largest accepted |logit| difference.

  Returns:
    What ``export_fast`` returned (``result`` is updated in place).
  """
  with np.load(pathlib.Path(out_dir) / "reference_io.npz") as io:
    images, want = io["images"], io["logits"]
  fr = export_fast(spec, out_dir, images, want, tune=options.tune,
                   plan=options.plan, program=program, atol=atol)
  result.files.update(fr.files)
  result.max_abs_diff.update(fr.max_abs_diff)
  result.notes.extend(fr.notes)
  return fr
