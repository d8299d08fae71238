"""Per-layer latency model of the fast PyTorch lowering, for latency targets.

Pruning to a latency target needs, for every candidate prune, the predicted
latency of the exported network. Timing candidates during a search would take
minutes and be as noisy as the machine; instead each conv/dense layer's time
is looked up in a ``Table`` measured once per machine:

* every distinct layer shape of the model (kernel, stride, input size, full
  widths) is timed with torch, on ``threads`` threads, at one ``batch``, in
  the memory format the fast lowering uses at that batch (channels_last above
  ``SMALL_BATCH_MAX``, NCHW at small batches, as ``convert.fast``'s plans),
  on a 5 x 5 grid of kept (inputs, outputs): 1 and a quarter, half, three
  quarters and all of each width. A lookup interpolates bilinearly between
  grid points (a conv's time is close to bilinear in its widths: MACs are, and
  the per-call overhead is a constant), so a lookup is a few array
  operations and a 10-prune search stays in milliseconds;
* per-element costs of the ops around the convs: ``gather`` and
  ``gather_base`` (``index_select`` of kept inputs: per gathered element and
  per element of the whole input), ``copy`` (concatenating branch outputs),
  ``eltwise`` (a ReLU or residual add over a layer's output) and, for the
  residual sum of a block whose last conv keeps fewer filters than the
  stream, ``residual_copy`` + ``scatter`` (an out-of-place ``index_add``).

Timings are the least of ``repeats`` runs taken round-robin over all points
of a shape (load on a shared machine only adds time), and each grid is made
monotone (a narrower conv never costs more than a wider one, ``monotone``).

A layer is predicted as the cheapest of the fast lowering's formulations
(``convert.fast``): ``union`` (one conv over the union of kept inputs,
gathered unless the union is every input), ``dense_in`` (one conv over every
input channel) and ``branches`` (one conv per group over its own inputs,
outputs concatenated), plus an elementwise op over its kept outputs (the
residual sum and ReLU over the whole stream for a block's last conv, with
the index-add when it keeps fewer filters). Layers that pruning leaves whole
add their full-size time. The prediction leaves out pooling and the head,
the same for dense and pruned networks, so fractions (pruned / dense
prediction) are the figures to use, not absolute seconds.

The table is cached in a JSON file keyed by the machine (platform and CPU
model), the torch version, the thread count, the batch and the memory
format: a table made elsewhere is ignored with a warning and re-measured.
Without a table (``Table=None``) the analytic fallback prices a conv as the
fast lowering's cost model does (``convert.fast.COSTS``: seconds per MAC,
scaled up for narrow convs, plus a per-call overhead), and elementwise ops
by its per-element costs.

torch is imported only to measure or for the analytic constants.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

TABLE_VERSION = 3
# The fast lowering runs NCHW up to this batch and channels_last above it
# (``convert.fast.SMALL_BATCH_MAX``).
SMALL_BATCH_MAX = 8
# Per-element ops measured beside the convs (see the module docstring).
OPS = ("gather", "gather_base", "copy", "eltwise", "index_add")


def memory_format_for(batch: int) -> str:
  """The memory format the fast lowering uses at ``batch``."""
  return "nchw" if batch <= SMALL_BATCH_MAX else "channels_last"


def machine_id() -> str:
  """Platform and CPU model: what a measured table is only valid on."""
  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{platform.system()}-{platform.machine()}-{cpu}"


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """The shape class of a conv/dense layer (full widths).

  Attributes:
    kind: ``conv`` or ``dense``.
    kernel: kernel size (square).
    stride: stride (square).
    in_hw: input height (= width); for a dense layer, its positions.
    out_hw: output height (= width); 1 for a dense layer.
    in_features: full input channels.
    out_features: full output channels.
  """

  kind: str
  kernel: int
  stride: int
  in_hw: int
  out_hw: int
  in_features: int
  out_features: int

  @property
  def key(self) -> str:
    return (f"{self.kind}_k{self.kernel}s{self.stride}_{self.in_hw}to"
            f"{self.out_hw}_{self.in_features}x{self.out_features}")

  def macs(self, cin: int, cout: int) -> int:
    """Multiply-accumulates of one image at widths (cin, cout)."""
    return cin * cout * self.kernel ** 2 * self.out_hw ** 2 * (
        self.in_hw if self.kind == "dense" else 1)


def shape_of(layer: Any) -> LayerShape:
  """The ``LayerShape`` of a ``models.graph.LayerInfo`` conv/dense layer."""
  if layer.kind == "dense":
    return LayerShape("dense", 1, 1, layer.positions, 1, layer.in_features,
                      layer.out_features)
  return LayerShape("conv", layer.kernel_size[0], layer.strides[0],
                    layer.in_hw[0], layer.out_hw[0], layer.in_features,
                    layer.out_features)


def grid(n: int) -> tuple[int, ...]:
  """Measured widths of a layer of ``n`` channels: 1 and n/4 .. n."""
  return tuple(sorted({1} | {-(-n * j // 4) for j in range(1, 5)}))


@dataclasses.dataclass
class Table:
  """Measured seconds per layer shape on a grid of widths, and op costs.

  Attributes:
    env: what the measurements are valid for (``environment``).
    entries: shape key -> ``{"in": grid, "out": grid, "seconds": [[...]],
      "ops": {op: seconds per element}}`` (seconds of one call at
      ``env['batch']``, rows by input width; ``OPS`` timed on the layer's
      own input and output tensors: a per-element cost depends on the
      tensor's size, in cache or not).
  """

  env: dict[str, Any]
  entries: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def batch(self) -> int:
    return int(self.env["batch"])

  def has(self, shape: LayerShape) -> bool:
    return shape.key in self.entries

  def seconds(self, shape: LayerShape, cin: int, cout: int) -> float:
    """Interpolated seconds of the layer at kept widths (cin, cout)."""
    if cin <= 0 or cout <= 0:
      return 0.0
    e = self.entries[shape.key]
    gi, go = e["_arrays"] if "_arrays" in e else _arrays(e)
    t = e["_t"] if "_t" in e else np.asarray(e["seconds"])
    return float(_bilinear(gi, go, t, cin, cout))

  def to_json(self) -> dict[str, Any]:
    return {"version": TABLE_VERSION, "env": self.env,
            "entries": {k: {f: v[f] for f in ("in", "out", "seconds", "ops")}
                        for k, v in self.entries.items()}}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> Table:
    if d.get("version") != TABLE_VERSION:
      raise ValueError(f"table version {d.get('version')!r}, expected "
                       f"{TABLE_VERSION}")
    t = cls(dict(d["env"]), {k: dict(v) for k, v in d["entries"].items()})
    for e in t.entries.values():
      e["_arrays"], e["_t"] = _arrays(e), np.asarray(e["seconds"])
    return t

  def save(self, path: str | os.PathLike) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(self.to_json(), indent=1))


def _arrays(e):
  return np.asarray(e["in"], float), np.asarray(e["out"], float)


def _bilinear(gx: np.ndarray, gy: np.ndarray, t: np.ndarray, x: float,
              y: float) -> float:
  i = int(np.clip(np.searchsorted(gx, x) - 1, 0, len(gx) - 2)) if len(
      gx) > 1 else 0
  j = int(np.clip(np.searchsorted(gy, y) - 1, 0, len(gy) - 2)) if len(
      gy) > 1 else 0
  if len(gx) == 1 and len(gy) == 1:
    return t[0, 0]
  if len(gx) == 1:
    u = (y - gy[j]) / (gy[j + 1] - gy[j])
    return t[0, j] * (1 - u) + t[0, j + 1] * u
  if len(gy) == 1:
    w = (x - gx[i]) / (gx[i + 1] - gx[i])
    return t[i, 0] * (1 - w) + t[i + 1, 0] * w
  w = (x - gx[i]) / (gx[i + 1] - gx[i])
  u = (y - gy[j]) / (gy[j + 1] - gy[j])
  return ((1 - w) * (1 - u) * t[i, j] + w * (1 - u) * t[i + 1, j]
          + (1 - w) * u * t[i, j + 1] + w * u * t[i + 1, j + 1])


def environment(batch: int, threads: int = 1) -> dict[str, Any]:
  """The key a table is valid for: machine, torch, threads, batch, format."""
  import torch  # Only to read its version; measuring needs it anyway.
  return {"machine": machine_id(), "torch": torch.__version__,
          "threads": int(threads), "batch": int(batch),
          "memory_format": memory_format_for(batch)}


def _min_seconds(calls: Sequence, warmup: int, repeats: int) -> list[float]:
  """Per call, the least of ``repeats`` timings taken round-robin over all
  calls (A, B, A, B, ...) after ``warmup`` untimed calls each.

  On a shared machine load only ever adds time, so the least timing is the
  layer's own cost; round-robin spreads a burst of load over every point
  instead of one.
  """
  for fn in calls:
    for _ in range(warmup):
      fn()
  best = [float("inf")] * len(calls)
  for _ in range(repeats):
    for k, fn in enumerate(calls):
      t0 = time.perf_counter()
      fn()
      best[k] = min(best[k], time.perf_counter() - t0)
  return best


def monotone(t: np.ndarray) -> np.ndarray:
  """``t[i, j]`` lowered to the least time of any wider point (i' >= i,
  j' >= j): a narrower conv never costs more than a wider one (the fast
  lowering could run it as the wider conv with zero weights), so a larger
  value is noise."""
  t = np.minimum.accumulate(t[::-1], axis=0)[::-1]
  return np.minimum.accumulate(t[:, ::-1], axis=1)[:, ::-1]


def measure(shapes: Iterable[LayerShape], batch: int, threads: int = 1,
            repeats: int = 5, table: Table | None = None) -> Table:
  """Times every shape on its width grid with torch (module docstring).

  Args:
    shapes: layer shapes to measure (those already in ``table`` are skipped).
    batch: the batch every call runs at.
    threads: ``torch.set_num_threads`` while measuring.
    repeats: timed calls per point (the least counts, ``_min_seconds``),
      after one warm-up call.
    table: a table of the same environment to add to (None: a new one).

  Returns:
    The table.
  """
  import torch
  import torch.nn.functional as F
  env = environment(batch, threads)
  table = table or Table(env)
  cl = env["memory_format"] == "channels_last"
  old = torch.get_num_threads()
  torch.set_num_threads(threads)

  def image(c, hw):
    x = torch.randn(batch, c, hw, hw)
    return x.contiguous(memory_format=torch.channels_last) if cl else x

  def call(s, cin, cout):
    if s.kind == "dense":
      x = torch.randn(batch * s.in_hw, cin)
      w, bias = torch.randn(cout, cin), torch.randn(cout)
      return lambda: F.linear(x, w, bias)
    x = image(cin, s.in_hw)
    w = torch.randn(cout, cin, s.kernel, s.kernel)
    if cl:
      w = w.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(cout)
    return lambda: F.conv2d(x, w, bias, s.stride, s.kernel // 2)

  try:
    with torch.no_grad():
      for s in {s.key: s for s in shapes}.values():
        if table.has(s):
          continue
        gi, go = grid(s.in_features), grid(s.out_features)
        secs = _min_seconds([call(s, i, o) for i in gi for o in go], 1,
                            repeats)
        t = monotone(np.reshape(secs, (len(gi), len(go))))
        table.entries[s.key] = {"in": list(gi), "out": list(go),
                                "seconds": t.tolist(),
                                "ops": _op_costs(s, image, repeats),
                                "_arrays": (np.asarray(gi, float),
                                            np.asarray(go, float)), "_t": t}
  finally:
    torch.set_num_threads(old)
  return table


def _op_costs(s: LayerShape, image, repeats: int) -> dict[str, float]:
  """Seconds per element of ``OPS`` on the tensors of a layer of shape ``s``.

  ``gather`` + ``gather_base``: ``index_select`` of a quarter and of three
  quarters of the input channels, fitted as a cost per gathered element plus
  one per element of the whole input (a channels_last gather reads every
  pixel's channels whatever it keeps); ``copy``: two halves of the output
  concatenated; ``eltwise``: a ReLU of the output; ``index_add``: half the
  output's channels index-added out of place into it, per element of the
  whole output (the residual sum of a block keeping fewer filters).
  """
  if s.kind == "dense":
    return dict.fromkeys(OPS, 0.0)
  import torch
  x, y = image(s.in_features, s.in_hw), image(s.out_features, s.out_hw)
  few = torch.arange(max(1, s.in_features // 4))
  many = torch.arange(max(len(few) + 1, 3 * s.in_features // 4))
  yi = torch.arange(0, s.out_features, 2)
  half = y[:, ::2].contiguous()
  t_few, t_many, cat, relu, add = _min_seconds(
      [lambda: x.index_select(1, few), lambda: x.index_select(1, many),
       lambda: torch.cat([half, half], 1), lambda: torch.relu(y),
       lambda: torch.index_add(y, 1, yi, half)], 1, repeats)
  plane = x.numel() // s.in_features
  gather = max(t_many - t_few, 0.0) / (plane * (len(many) - len(few)))
  base = max(t_few - gather * plane * len(few), 0.0) / x.numel()
  return {"gather": gather, "gather_base": base,
          "copy": cat / y.numel(), "eltwise": relu / y.numel(),
          "index_add": add / y.numel()}


def load_or_measure(path: str | os.PathLike | None,
                    shapes: Iterable[LayerShape], batch: int,
                    threads: int = 1, repeats: int = 5) -> Table:
  """The cached table at ``path``, completed with the missing shapes.

  A table made on another machine, torch version, thread count, batch or
  memory format is ignored with a warning and re-measured; the result is
  written back to ``path`` (when given).
  """
  env = environment(batch, threads)
  table = None
  if path is not None and pathlib.Path(path).is_file():
    try:
      table = Table.from_json(json.loads(pathlib.Path(path).read_text()))
    except (ValueError, KeyError, json.JSONDecodeError) as e:
      warnings.warn(f"{path}: unreadable latency table ({e}); re-measuring")
    else:
      if table.env != env:
        diff = {k: (table.env.get(k), v) for k, v in env.items()
                if table.env.get(k) != v}
        warnings.warn(f"{path}: latency table made for another setting "
                      f"(cached, here: {diff}); ignored, re-measuring")
        table = None
  shapes = list(shapes)
  missing = table is None or not all(table.has(s) for s in shapes)
  table = measure(shapes, batch, threads, repeats, table)
  if path is not None and missing:
    table.save(path)
  return table


def _analytic_constants(batch: int) -> Mapping[str, float]:
  from convert import fast  # The exporter's cost model; torch is there.
  return fast.cost_constants(memory_format_for(batch), batch)


class LatencyModel:
  """Predicted seconds of a network's layers under the fast lowering.

  Args:
    graph: the model's traced graph (``models.analyze``).
    batch: the batch the prediction is for.
    table: a measured ``Table`` for that batch (None: analytic fallback).
  """

  def __init__(self, graph: Any, batch: int, table: Table | None = None):
    if table is not None and table.batch != batch:
      raise ValueError(f"latency table measured at batch {table.batch}, "
                       f"the model asks for batch {batch}")
    self.graph, self.batch, self.table = graph, int(batch), table
    self.source = "measured" if table is not None else "analytic"
    if table is None:
      c = _analytic_constants(batch)
      # index_add over the stream: a copy, and a scatter of half of it.
      self._ops = {"gather": c["gather"], "gather_base": 0.0,
                   "copy": c["copy"], "eltwise": c["add"],
                   "index_add": c["copy"] + c["scatter"] / 2}
      self._c = c
    else:
      missing = [shape_of(l).key for l in self.layers()
                 if not table.has(shape_of(l))]
      if missing:
        raise ValueError(f"latency table lacks layer shape(s) {missing}; "
                         "measure them (models.latency.load_or_measure)")
    self._dense = {l.path: self.layer_seconds(l, l.in_features,
                                              l.out_features)
                   for l in self.layers()}

  def layers(self) -> list[Any]:
    """The conv/dense layers priced (depthwise convs are left out: a
    channel-wise op, priced with the elementwise ops of their producer)."""
    return [l for l in self.graph.producers if l.feature_groups == 1]

  def ops(self, layer: Any) -> Mapping[str, float]:
    """Seconds per element of ``OPS`` around ``layer``."""
    if self.table is None:
      return self._ops
    return self.table.entries[shape_of(layer).key]["ops"]

  def conv_seconds(self, layer: Any, cin: int, cout: int) -> float:
    """Seconds of one conv call at kept widths (cin, cout)."""
    s = shape_of(layer)
    if self.table is not None:
      return self.table.seconds(s, cin, cout)
    if cin <= 0 or cout <= 0:
      return 0.0
    c = self._c
    return c["call"] + self.batch * s.macs(cin, cout) * c["mac"] * (
        1 + c["narrow"] / min(cin, cout))

  def layer_seconds(self, layer: Any, union_in: int, out: int,
                    branches: Sequence[tuple[int, int]] = (),
                    available: int | None = None) -> float:
    """The cheapest lowering of a layer plus an elementwise op on its output.

    Args:
      layer: a graph layer.
      union_in: inputs read by any kept filter.
      out: kept filters.
      branches: ``(inputs, filters)`` per branch/group (empty: one branch).
      available: channels the input tensor keeps (None: all): after a
        pruned conv of the same chain the lowering passes only its kept
        filters on, so a layer reading all of them gathers nothing.
    """
    avail = layer.in_features if available is None else available
    if out <= 0 or union_in <= 0:
      return 0.0
    s, ops = shape_of(layer), self.ops(layer)
    in_el = self.batch * s.in_hw ** 2
    out_el = self.batch * s.out_hw ** 2
    def gather(i):
      return in_el * (ops["gather"] * i + ops["gather_base"] * avail)

    union = self.conv_seconds(layer, union_in, out) + (
        gather(union_in) if union_in < avail else 0.0)
    best = min(union, self.conv_seconds(layer, avail, out))
    live = [(i, o) for i, o in branches if i > 0 and o > 0]
    if len(live) > 1:
      best = min(best, sum(self.conv_seconds(layer, i, o) + gather(i)
                           for i, o in live)
                 + ops["copy"] * out_el * out)
    if not layer.block_last:
      return best + ops["eltwise"] * out_el * out
    # The residual sum and the ReLU after it run over the whole stream; kept
    # filters fewer than the stream's are index-added into it (out of
    # place), as the fast lowering does.
    full = layer.out_features
    best += 2 * ops["eltwise"] * out_el * full
    if out < full:
      best += (ops["index_add"] - ops["eltwise"]) * out_el * full
    return best

  def dense_seconds(self) -> float:
    """Predicted seconds of the unpruned network."""
    return float(sum(self._dense.values()))

  def seconds(self, pruned: Mapping[Any, float]) -> float:
    """Whole network: ``pruned`` (path -> seconds) replaces those layers'
    dense seconds."""
    return float(sum(pruned.get(p, t) for p, t in self._dense.items()))

  def predict_cut(self, layers: Mapping[Any, Any]) -> float:
    """Seconds of a pruned network from its per-layer cuts (``LayerCut`` by
    path: ``models.graph.cut(...).layers`` or a ``Description``'s)."""
    pruned = {}
    for p, lc in layers.items():
      if p not in self._dense:
        continue
      # ``inputs`` are the channels the layer's input tensor keeps; the
      # union lowering reads only those some kept filter reads.
      union = (len(np.unique(np.concatenate([b.inputs for b in lc.branches])))
               if lc.branches else len(lc.inputs))
      pruned[p] = self.layer_seconds(
          self.graph[p], union, len(lc.filters),
          [(len(b.inputs), len(b.filters)) for b in lc.branches],
          len(lc.inputs))
    return self.seconds(pruned)

  def figures(self, seconds: float) -> dict[str, Any]:
    """The report entry of a prediction."""
    dense = self.dense_seconds()
    return {"predicted_seconds": seconds, "dense_seconds": dense,
            "fraction": seconds / dense, "batch": self.batch,
            "source": self.source}


def model_for(graph: Any, batch: int, table_path: str | os.PathLike | None,
              threads: int = 1, measured: bool = True) -> LatencyModel:
  """A ``LatencyModel`` of ``graph``: measured (cached at ``table_path``)
  or, with ``measured=False``, the analytic fallback."""
  if not measured:
    return LatencyModel(graph, batch)
  shapes = [shape_of(l) for l in graph.producers if l.feature_groups == 1]
  return LatencyModel(graph, batch,
                      load_or_measure(table_path, shapes, batch, threads))


TABLE_FILE = "latency_table.json"


def from_config(section: Mapping[str, Any], workdir: str | os.PathLike,
                graph: Any, targeted: bool) -> LatencyModel:
  """The latency model a run's ``latency`` config section asks for.

  A measured table is made (or read from its cache: ``latency.table``, else
  ``TABLE_FILE`` in the workdir) only when a latency target is set
  (``targeted``) and ``latency.measured``; otherwise the analytic fallback
  prices the report's prediction without timing anything.
  """
  path = section["table"] or pathlib.Path(workdir) / TABLE_FILE
  return model_for(graph, section["batch"], path, section["threads"],
                   measured=bool(section["measured"] and targeted))
