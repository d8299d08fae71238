"""Group channel pruning and the rate search (spec §3), deterministic numpy.

Every prune starts from the same unpruned weights. All per-β work is done at
the level of ``(I, O)`` kernel-connectivity matrices: the sorted importances
and their cumulative sums are computed once, so a prune costs a few small
array operations per layer and the 11-prune search runs in milliseconds.

Masks follow the ``masks`` collection of ``models.prunable``: a conv kernel
mask is ``(I, O)`` (the spec's ``mask[o, i]`` transposed), a norm mask
``(C,)`` multiplies both scale and bias.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np

from dsp_jax import gates as gates_lib
from dsp_jax import kernels as kernels_lib
from models import flops as flops_lib
from models import graph as graph_lib
from models import paths
from models import pruning as pruning_lib

PyTree = Any

IMP_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class PruneResult:
  """The outcome of one prune (or of a rate search).

  Attributes:
    params: params with the masks applied (pruned kernels, dead norms and
      their biases zeroed).
    masks: a full ``masks`` collection (ones where nothing is pruned).
    beta: the threshold of the returned prune.
    p_flops: pruned FLOPs in %, the reference's measure (taking-part convs).
    p_params: pruned parameters in %, same measure.
    propagated_p_flops: P.FLOPS with dead structure removed to a fixed point.
    propagated_p_params: P.PARAMS, same.
    empty_groups: ``(layer, group)`` pairs emptied by the cnt_g = 0 rule
      (``(layer, -1)`` for an fp layer whose filters all went).
    table: per layer, per group ``(filters, kept input channels)``.
    trajectory: ``(beta, p_flops)`` of every prune of the search.
    whole_model: whole-model figures from ``models.flops`` (pruned
      whole-model MACs/params in %, counts).
    latency: with a latency model, the predicted latency
      (``models.latency.LatencyModel.figures``: seconds, dense seconds,
      fraction, batch, source).
  """

  params: PyTree
  masks: PyTree
  beta: float
  p_flops: float
  p_params: float
  propagated_p_flops: float
  propagated_p_params: float
  empty_groups: tuple[tuple[str, int], ...]
  table: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
  trajectory: tuple[tuple[float, float], ...] = ()
  whole_model: dict | None = None
  latency: dict | None = None


def fp_layer_indices(num_layers: int, every: int = 2,
                     explicit: Sequence[int] | None = None) -> tuple[int, ...]:
  """Indices l of the filter-pruned layers: ``(l + 1) % every == 0``."""
  if explicit is not None:
    bad = [l for l in explicit if not 0 <= l < num_layers]
    if bad:
      raise ValueError(f"fp layer indices {bad} out of range [0, {num_layers})")
    return tuple(sorted(set(explicit)))
  if every < 1:
    raise ValueError(f"fp every-n must be >= 1, got {every}")
  return tuple(l for l in range(num_layers) if (l + 1) % every == 0)


def _cum_threshold(sorted_vals: np.ndarray, cums: np.ndarray, beta: float,
                   parity: bool) -> tuple[np.ndarray, np.ndarray]:
  """Per row: the cnt-th smallest value, cnt = #(cumsum < β); and cnt == 0."""
  cnt = np.sum(cums < beta, axis=-1)
  rows = np.arange(sorted_vals.shape[0])
  # cnt == 0 indexes -1, the largest value (the reference's defect).
  thr = sorted_vals[rows, cnt - 1]
  empty = cnt == 0
  if not parity:
    thr = np.where(empty, -np.inf, thr)
  return thr, empty


def check_round_to(round_to: int) -> int:
  """``round_to`` as an int >= 0 (0 and 1 mean no rounding)."""
  if isinstance(round_to, bool) or int(round_to) != round_to or round_to < 0:
    raise ValueError(f"round_to must be an integer >= 0, got {round_to!r}")
  return int(round_to)


def round_up(kept, round_to: int, width):
  """Kept counts rounded up to a multiple of ``round_to``, capped at
  ``width``; 0 stays 0 (an emptied group or layer is not revived)."""
  if round_to <= 1:
    return kept
  return np.minimum(-(-np.asarray(kept) // round_to) * round_to, width)


def _descending_ranks(x: np.ndarray) -> np.ndarray:
  """Per row, each entry's rank by decreasing value (ties: lower index
  first)."""
  order = np.argsort(-x, axis=-1, kind="stable")
  ranks = np.empty_like(order)
  np.put_along_axis(ranks, order, np.arange(x.shape[-1])[None], axis=-1)
  return ranks


def _normalised_sorted(x: np.ndarray):
  x = x / (np.sum(x, axis=-1, keepdims=True) + IMP_EPS)
  s = np.sort(x, axis=-1)
  return x, s, np.cumsum(s, axis=-1)


class _DeadStructure:
  """Dead-structure removal (spec §3 step 4): the reference's criterion.

  The reference sums weight gradients of random train-mode batches on the
  masked network and zeroes every conv filter, conv input channel and norm
  (γ, β) whose gradient is exactly zero. The graph's channel program gives
  the same pattern without passes (``models.graph.liveness``): per channel,
  whether it is identically constant (and which constant) and whether a
  gradient reaches it. Per pass:

  * a taking-part kernel (i, o) dies when input i is identically zero or no
    gradient reaches output o;
  * a norm channel dies (γ, β) when its input is constant (a centring norm:
    ``x - mean`` is 0 and γ's gradient with it) or zero (a scale), or no
    gradient reaches its output;
  * a depthwise conv channel dies when its input is zero or its output
    gets no gradient.

  Stem, shortcut convs and dense layers outside the taking-part set are
  never changed. For the two-conv residual block this is the reference's
  one-pass rule (``a_o``, ``c_o``, ``r_o = a_o or β_a[o] > 0``: a fully
  masked conv_a filter still emits ReLU(β_a[o])); ``propagate`` iterates it
  to the fixed point.
  """

  def __init__(self, graph: Any, params: PyTree, tp: Sequence[Any]):
    self.graph, self.params = graph, params
    self.tp = list(tp)
    tp_paths = {l.path for l in self.tp}
    self.fixed = {l.path: graph_lib.connectivity(l, None, params)
                  for l in graph.weighted
                  if l.path not in tp_paths and not l.depthwise}
    self.dw = [l for l in graph.weighted if l.depthwise]
    # The norms of the stem, the shortcut convs and other layers that do not
    # take part are never changed (spec §3 step 4).
    self.norms = [l for l in graph.norms if l.follows is None
                  or l.follows in tp_paths or graph[l.follows].depthwise]
    self.dw_w = {l.path: graph_lib.connectivity(l, None, params)
                 for l in self.dw}
    self.base = pruning_lib.full_masks(graph, params)

  def _masks(self, kernel_masks, nm, dwm) -> PyTree:
    flat = paths.flatten(self.base)
    for l, m in zip(self.tp, kernel_masks):
      flat[l.kernel_path[1:]] = m
    for p, m in nm.items():
      flat[p + ("scale",)] = m
    for p, m in dwm.items():
      flat[self.graph[p].kernel_path[1:]] = m
    return paths.unflatten(flat)

  def _pass(self, kernel_masks, abs_w, nm, dwm):
    live = dict(self.fixed)
    for l, m, a in zip(self.tp, kernel_masks, abs_w):
      live[l.path] = a * m > 0
    for l in self.dw:
      live[l.path] = self.dw_w[l.path] & (dwm.get(l.path, 1.0) != 0)
    masks = self._masks(kernel_masks, nm, dwm)
    ev = graph_lib.evaluate(self.graph, self.params, masks, live)
    prog = self.graph.program
    new_masks = []
    for l, m in zip(self.tp, kernel_masks):
      zero_in = ev.input_values(self.graph, l.path) == 0
      _, used_out = ev.output(self.graph, l.path)
      new_masks.append(m * (~zero_in)[:, None] * used_out[None, :])
    new_nm = {}
    for l in self.norms:
      node = prog.norm_of.get(l.path)
      if node is None:
        continue
      x = prog.node_input(ev.values, node)
      flat = ~np.isnan(x) if l.centres else x == 0
      alive = ~flat & ev.used[node]
      new_nm[l.path] = nm.get(l.path, np.ones(alive.shape)) * alive
    new_dwm = {}
    for l in self.dw:
      x = ev.input_values(self.graph, l.path)
      _, used = ev.output(self.graph, l.path)
      keep = ~(x == 0) & used
      old = dwm.get(l.path, np.ones((1, l.out_features)))
      new_dwm[l.path] = old * keep[None, :]
    return new_masks, new_nm, new_dwm

  def remove(self, kernel_masks, abs_w, propagate):
    """One pass (or the fixed point); (kernel masks, norm masks, depthwise
    masks), the last two by module path."""
    masks, nm, dwm = list(kernel_masks), {}, {}
    while True:
      new_masks, new_nm, new_dwm = self._pass(masks, abs_w, nm, dwm)
      done = (all(np.array_equal(a, b) for a, b in zip(new_masks, masks))
              and all(np.array_equal(v, nm.get(k, np.ones_like(v)))
                      for k, v in new_nm.items())
              and all(np.array_equal(v, dwm.get(k, np.ones_like(v)))
                      for k, v in new_dwm.items()))
      masks, nm, dwm = new_masks, new_nm, new_dwm
      if not propagate or done:
        return masks, nm, dwm


class Pruner:
  """Precomputed, β-independent data of one set of weights and logits.

  Args:
    params: group-learned (unpruned) params.
    gates: group logits (``gates`` collection layout).
    info: the model's graph (``dsp_jax.analyze``).
    groups: G (must match the logits).
    fp_every: n of the every-n-th filter-pruning rule; None: the fp layers
      derived from the graph (``kernels.derived_fp``).
    fp_layers: explicit fp layer indices (override ``fp_every``).
    parity: keep the reference's cnt_g = 0 rule (whole group pruned).
    round_to: r > 1 rounds each group's kept inputs and each fp layer's kept
      filters UP to a multiple of r (capped at the layer's width; an emptied
      group stays empty), keeping the most important extra channels; 0 or 1:
      off (the reference's counts).
    latency: a ``models.latency.LatencyModel`` of ``info``, for latency
      targets and the predicted latency of a result (None: neither).
  """

  def __init__(self, params: PyTree, gates: PyTree, info: graph_lib.Graph,
               groups: int, *, fp_every: int | None = None,
               fp_layers: Sequence[int] | None = None, parity: bool = True,
               round_to: int = 0, latency: Any = None):
    gates_lib.check_groups(gates, groups)
    self.params, self.info, self.groups, self.parity = (params, info, groups,
                                                        parity)
    self.round_to = check_round_to(round_to)
    self.latency = latency
    tp = info.taking_part
    if fp_layers is None and fp_every is None:
      fp_layers = kernels_lib.derived_fp(info)
    self.fp = set(fp_layer_indices(len(tp), fp_every or 2, fp_layers))
    self.layers = []
    for l, c in enumerate(tp):
      if groups > c.out_features:
        raise ValueError(f"{c.name}: groups={groups} exceeds its "
                         f"{c.out_features} filters")
      if self.round_to > c.in_features or (
          l in self.fp and self.round_to > c.out_features):
        raise ValueError(f"{c.name}: round_to={self.round_to} exceeds its "
                         f"{c.in_features} inputs / {c.out_features} filters")
      w = np.asarray(kernels_lib.kernel(params, c), np.float64)  # HWIO view
      logits = np.asarray(kernels_lib.logits(gates, c))
      # H = one_hot(argmax_g A), ties to the lowest group (as gates.py).
      hard = np.eye(groups)[:, np.argmax(logits, axis=0)]
      w2 = np.sum(np.square(w), axis=(0, 1))           # (I, O)
      imp = (hard ** 2) @ w2.T                          # (G, I)
      imp, imp_s, imp_c = _normalised_sorted(imp)
      entry = {"conv": c, "H": hard, "abs": np.sum(np.abs(w), axis=(0, 1)),
               "imp": imp, "imp_s": imp_s, "imp_c": imp_c,
               "imp_r": _descending_ranks(imp)}
      if l in self.fp:
        f, f_s, f_c = _normalised_sorted(np.sum(w2, axis=0)[None])
        entry.update(f=f[0], f_s=f_s, f_c=f_c,
                     f_r=_descending_ranks(f)[0])
      self.layers.append(entry)
    self.flops = np.array([c.flops for c in tp], np.float64)
    self.nparams = np.array([np.prod(c.kernel_shape) for c in tp], np.float64)
    self.dead = _DeadStructure(info, params, tp)

  def channel_masks(self, beta: float):
    """Steps 1-3: kernel masks ``(I, O)`` per layer, and emptied groups."""
    masks, empty = [], []
    for l, e in enumerate(self.layers):
      thr, emp = _cum_threshold(e["imp_s"], e["imp_c"], beta, self.parity)
      keep = self._rounded(e["imp"] > thr[:, None], e["imp_r"])
      mask = keep.astype(np.float64).T @ e["H"]                # (I, O)
      name = e["conv"].name
      empty += [(name, int(g)) for g in np.flatnonzero(emp)]
      if l in self.fp:
        thr_f, emp_f = _cum_threshold(e["f_s"], e["f_c"], beta, self.parity)
        keep_f = self._rounded((e["f"] > thr_f[0])[None], e["f_r"][None])[0]
        mask = mask * keep_f[None, :]
        if emp_f[0]:
          empty.append((name, -1))
      masks.append(mask)
    return masks, empty

  def _rounded(self, keep: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Per row, the kept count rounded up to ``round_to`` (most important
    first): more channels than the threshold keeps, never fewer, so rounding
    never prunes beyond what β asks; the search then finds the β whose
    rounded prune meets the target."""
    if self.round_to <= 1:
      return keep
    k = round_up(np.sum(keep, axis=-1), self.round_to, keep.shape[-1])
    return ranks < k[:, None]

  def dead_structure(self, masks: list[np.ndarray], propagate: bool = False):
    """Step 4 over the graph; new kernel, norm and depthwise masks.

    Args:
      masks: kernel masks from ``channel_masks``.
      propagate: iterate the rule to a fixed point instead of one pass.

    Returns:
      ``(kernel_masks, norm_masks, depthwise_masks)``; the last two map a
      module path to its ``(C,)`` / ``(1, C)`` mask.
    """
    return self.dead.remove(masks, [e["abs"] for e in self.layers],
                            propagate)

  def pruned_fraction(self, masks: list[np.ndarray]) -> tuple[float, float]:
    """Reference P.FLOPS / P.PARAMS in % (step 5)."""
    surv = np.array([np.mean(e["abs"] * m > 0)
                     for e, m in zip(self.layers, masks)])
    pf = 100.0 * (1.0 - np.sum(self.flops * surv) / np.sum(self.flops))
    pp = 100.0 * (1.0 - np.sum(self.nparams * surv) / np.sum(self.nparams))
    return float(pf), float(pp)

  def unpruned_fraction(self) -> float:
    """P.FLOPS of the weights as they are (kernels that are already zero)."""
    return self.pruned_fraction([np.ones_like(e["abs"]) for e in self.layers])[0]

  def flops_at(self, beta: float) -> float:
    masks, _ = self.channel_masks(beta)
    masks, _, _ = self.dead_structure(masks)
    return self.pruned_fraction(masks)[0]

  def structure(self, masks: list[np.ndarray]):
    """Per taking-part layer: (union of kept inputs, kept filters, per group
    (kept inputs, kept filters))."""
    out = []
    for e, m in zip(self.layers, masks):
      live = e["abs"] * m > 0
      filt = e["H"] > 0                                   # (G, O)
      used = live.any(axis=0)
      per_group = [(int(np.sum(live[:, f].any(axis=1))),
                    int(np.sum(used & f))) for f in filt]
      out.append((int(np.sum(live.any(axis=1))), int(np.sum(used)),
                  per_group))
    return out

  def latency_seconds(self, masks: list[np.ndarray]) -> float:
    """Predicted seconds of the network pruned as ``masks`` say."""
    structure = self.structure(masks)
    kept = {e["conv"].path: o for e, (_, o, _) in zip(self.layers, structure)}
    return self.latency.seconds({
        e["conv"].path: self.latency.layer_seconds(
            e["conv"], i, o, g, self._available(e["conv"], kept))
        for e, (i, o, g) in zip(self.layers, structure)})

  def _available(self, conv: Any, kept: dict) -> int | None:
    """Channels the input tensor of ``conv`` keeps: a conv reading only a
    taking-part conv of its chain (conv_b after conv_a) gets that conv's
    kept filters; one reading a residual stream, all of it (None)."""
    if len(conv.inputs) == 1 and conv.inputs[0] in kept and (
        self.info[conv.inputs[0]].out_features == conv.in_features):
      return kept[conv.inputs[0]]
    return None

  def latency_pruned_at(self, beta: float) -> float:
    """Predicted latency removed at β, in % of the dense prediction."""
    masks, _ = self.channel_masks(beta)
    masks, _, _ = self.dead_structure(masks)
    return 100.0 * (1.0 - self.latency_seconds(masks)
                    / self.latency.dense_seconds())

  def unpruned_latency(self) -> float:
    """Predicted latency removed by the weights as they are, in %."""
    masks = [np.ones_like(e["abs"]) for e in self.layers]
    return 100.0 * (1.0 - self.latency_seconds(masks)
                    / self.latency.dense_seconds())

  def result(self, beta: float, trajectory=()) -> PruneResult:
    """The full prune at β: params, masks collection, figures, table."""
    masks0, empty = self.channel_masks(beta)
    masks, norm, dw = self.dead_structure(masks0)
    pf, pp = self.pruned_fraction(masks)
    pmasks, _, _ = self.dead_structure(masks0, propagate=True)
    ppf, ppp = self.pruned_fraction(pmasks)
    if empty and self.parity:
      warnings.warn(
          f"DSP prune at beta={beta:.6g}: {len(empty)} group(s) emptied by the "
          "reference's cnt_g = 0 rule (kept for parity): "
          + ", ".join(f"{n}[{'filters' if g < 0 else g}]" for n, g in empty[:8])
          + ("..." if len(empty) > 8 else "")
          + f"; fully propagated P.FLOPS {ppf:.2f}% vs {pf:.2f}%",
          stacklevel=2)
    flat = paths.flatten(pruning_lib.full_masks(self.info, self.params))
    for e, m in zip(self.layers, masks):
      key = e["conv"].kernel_path[1:]
      flat[key] = m.astype(flat[key].dtype)
    for p, m in norm.items():
      flat[p + ("scale",)] = m.astype(flat[p + ("scale",)].dtype)
    for p, m in dw.items():
      key = self.info[p].kernel_path[1:]
      flat[key] = m.astype(flat[key].dtype)
    mask_tree = paths.unflatten(flat)
    params = jax.tree.map(np.asarray, pruning_lib.apply_masks(
        jax.tree.map(np.asarray, self.params), mask_tree))
    table = tuple((e["conv"].name, tuple((f, i) for i, f in groups))
                  for e, (_, _, groups) in zip(self.layers,
                                               self.structure(masks)))
    latency = (None if self.latency is None else
               self.latency.figures(self.latency_seconds(masks)))
    return PruneResult(params, mask_tree, float(beta), pf, pp, ppf, ppp,
                       tuple(empty), table, tuple(trajectory),
                       _whole_model(self.info, params, mask_tree), latency)


def _whole_model(info: graph_lib.Graph, params: PyTree,
                 masks: PyTree) -> dict:
  """Whole-model figures from ``models.flops``."""
  rep = flops_lib.report_graph(info, {"params": params, "masks": masks})
  return {"pflops_whole_model": rep.pflops_whole_model,
          "pparams_whole_model": rep.pparams_whole_model,
          "macs": rep.macs, "macs_dense": rep.macs_dense,
          "params": rep.params, "params_dense": rep.params_dense,
          "dsp_pflops": float(rep.dsp_pflops),
          "dsp_pparams": float(rep.dsp_pparams)}


def prune_at(params: PyTree, gates: PyTree, info: graph_lib.Graph, *,
             groups: int, beta: float, fp_every: int | None = None,
             fp_layers: Sequence[int] | None = None,
             parity: bool = True, round_to: int = 0,
             latency: Any = None) -> PruneResult:
  """One prune at threshold β (spec §3 steps 1-5).

  Args:
    params: group-learned params.
    gates: group logits.
    info: the taking-part layers.
    groups: G.
    beta: threshold in (0, 1).
    fp_every: n of the filter-pruning rule (None: derived, see ``prune``).
    fp_layers: explicit fp layer indices.
    parity: keep the cnt_g = 0 defect.
    round_to: round kept counts up to a multiple of this (``Pruner``).
    latency: a ``models.latency.LatencyModel`` for the predicted latency.

  Returns:
    The prune result.
  """
  return Pruner(params, gates, info, groups, fp_every=fp_every,
                fp_layers=fp_layers, parity=parity, round_to=round_to,
                latency=latency).result(beta)


# The largest β the search can reach: ten steps up from 0.15 towards 1.
BETA_MAX = 1.0 - 0.85 / 2**10


def rate_search_betas(pruner: Pruner, rate: float,
                      measure: Callable[[float], float] | None = None
                      ) -> tuple[float, list]:
  """The reference's bisection; returns the final β and the 10 trials.

  ``measure`` maps β to the pruned share in % that ``rate`` targets
  (default: ``pruner.flops_at``, P.FLOPS; a latency target passes
  ``pruner.latency_pruned_at``): any measure that grows with β.
  """
  measure = measure or pruner.flops_at
  beta, lo, hi = 0.15, 0.0, 1.0
  trials = []
  for _ in range(10):
    pf = measure(beta)
    trials.append((beta, pf))
    if pf > 100.0 * rate:
      hi = beta
      beta = (beta + lo) / 2
    else:
      lo = beta
      beta = (beta + hi) / 2
  return beta, trials


def prune(params: PyTree, gates: PyTree, info: graph_lib.Graph, *, groups: int,
          rate: float | None = None, fp_every: int | None = None,
          fp_layers: Sequence[int] | None = None,
          parity: bool = True, round_to: int = 0,
          target_latency: float | None = None,
          latency: Any = None) -> PruneResult:
  """Prunes to a target by the spec's β search.

  Ten bisection trials from β = 0.15 in [0, 1], then one prune at the final,
  untested β (11 prunes, each from the same unpruned weights). The target is
  either ``rate`` (pruned P.FLOPS, the reference's) or ``target_latency``
  (the predicted latency as a fraction of the dense network's, under
  ``latency``): the same bisection on the predicted latency removed, a
  table lookup per layer and candidate.

  Args:
    params: group-learned params (unpruned).
    gates: group logits.
    info: the taking-part layers.
    groups: G (must match the logits).
    rate: target pruned FLOPs fraction in (0, 1), e.g. 0.5.
    fp_every: n of the every-n-th filter-pruning rule; None: the fp layers
      derived from the structure (``info.fp``: every 2nd conv of basic
      blocks, every 3rd of bottlenecks, every conv of a VGG).
    fp_layers: explicit fp layer indices (override ``fp_every``).
    parity: keep the reference's cnt_g = 0 rule (a warning names the groups).
    round_to: round kept inputs per group and kept fp filters up to a
      multiple of this (``Pruner``). The search prices the rounded prunes
      and, when its final β falls short of the target, returns the smallest
      tried β that meets it, so rounding never leaves the target unmet.
    target_latency: target predicted latency / dense latency in (0, 1)
      (instead of ``rate``; needs ``latency``).
    latency: a ``models.latency.LatencyModel`` of ``info`` (the result then
      carries its predicted latency, whatever the target).

  Returns:
    The prune result, with the β trajectory.

  Raises:
    ValueError: for an unreachable target, mismatched groups, groups or
      ``round_to`` larger than a layer's channels.
  """
  if (rate is None) == (target_latency is None):
    raise ValueError("give exactly one of rate (pruned FLOPs) and "
                     "target_latency (latency fraction)")
  if target_latency is not None and latency is None:
    raise ValueError("target_latency needs a latency model (latency=)")
  pruner = Pruner(params, gates, info, groups, fp_every=fp_every,
                  fp_layers=fp_layers, parity=parity, round_to=round_to,
                  latency=latency)
  if rate is not None:
    what, measure, goal = "P.FLOPS", pruner.flops_at, rate
    floor = pruner.unpruned_fraction()
    if not floor < 100.0 * rate < 100.0:
      raise ValueError(
          f"rate={rate!r} is unreachable: the pruned-FLOPs rate must lie in "
          f"({floor / 100:.4f}, 1) — above what the weights already have "
          f"({floor:.2f}% zero kernels) and below 100%")
    top = measure(BETA_MAX)
    if 100.0 * rate > top:
      raise ValueError(
          f"rate={rate!r} is unreachable: the pruned-FLOPs rate must lie in "
          f"({floor / 100:.4f}, {top / 100:.4f}) — pruning at the search's "
          f"largest threshold (beta={BETA_MAX:.6f}) removes {top:.2f}% of "
          "the FLOPs")
  else:
    what, measure = "latency removed", pruner.latency_pruned_at
    goal = 1.0 - target_latency
    hi = 1.0 - pruner.unpruned_latency() / 100.0
    lo = 1.0 - measure(BETA_MAX) / 100.0
    if not lo <= target_latency < hi:
      raise ValueError(
          f"target_latency={target_latency!r} is unreachable: the predicted "
          f"latency fraction at batch {latency.batch} must lie in "
          f"[{lo:.4f}, {hi:.4f}) (the search's largest threshold, "
          f"beta={BETA_MAX:.6f}, leaves {lo:.4f} of the dense latency)")
  beta, trials = rate_search_betas(pruner, goal, measure)
  if pruner.round_to > 1 or rate is None:
    # Rounded prunes and latency are coarse steps in β, and the reference's
    # final β is untested: when it falls short, take the smallest tried β
    # that meets the target (the reference's search stays as it is).
    met = [b for b, m in trials if m >= 100.0 * goal]
    if met and measure(beta) < 100.0 * goal:
      beta = min(met)
  res = pruner.result(beta)
  got = res.p_flops if rate is not None else 100.0 * (
      1.0 - res.latency["fraction"])
  if abs(got - 100.0 * goal) > 1.0:
    warnings.warn(
        f"DSP rate search ended at {what} {got:.2f}% for a target of "
        f"{100 * goal:.2f}% (beta={beta:.6g}); the measure is not monotone "
        "in beta once whole groups are emptied, so bisection can bracket "
        "wrongly for low targets", stacklevel=2)
  return dataclasses.replace(res, trajectory=tuple(trials) + (
      (beta, got),))


def format_table(result: PruneResult) -> str:
  """The per-layer summary: per group, filters x kept input channels."""
  lines = [f"beta={result.beta:.6f}  P.FLOPS={result.p_flops:.2f}%  "
           f"P.PARAMS={result.p_params:.2f}%  (fully propagated: "
           f"{result.propagated_p_flops:.2f}% / "
           f"{result.propagated_p_params:.2f}%)"]
  for name, groups in result.table:
    lines.append(f"{name:24s} " + "  ".join(f"{f}x{c}" for f, c in groups))
  if result.whole_model:
    w = result.whole_model
    lines.append(f"whole model: {w['pflops_whole_model']:.2f}% of MACs and "
                 f"{w['pparams_whole_model']:.2f}% of params pruned")
  return "\n".join(lines)
