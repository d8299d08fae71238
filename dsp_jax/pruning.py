"""Group channel pruning and the rate search (spec §3), deterministic numpy.

Every prune starts from the same unpruned weights. All per-β work is done at
the level of ``(I, O)`` kernel-connectivity matrices: the sorted importances
and their cumulative sums are computed once, so a prune costs a few small
array operations per layer and the 11-prune search runs in milliseconds.

Masks follow the ``masks`` collection of ``models.layers``: a conv kernel mask
is ``(I, O)`` (the spec's ``mask[o, i]`` transposed), a norm mask ``(C,)``
multiplies both scale and bias.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import jax
import numpy as np

from dsp_jax import gates as gates_lib
from dsp_jax import layer_info as li

PyTree = Any

IMP_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class PruneResult:
  """The outcome of one prune (or of a rate search).

  Attributes:
    params: params with pruned kernels and dead BatchNorm γ/β zeroed.
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
      whole-model MACs/params in %, counts), when ``info`` knows its model.
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


def _normalised_sorted(x: np.ndarray):
  x = x / (np.sum(x, axis=-1, keepdims=True) + IMP_EPS)
  s = np.sort(x, axis=-1)
  return x, s, np.cumsum(s, axis=-1)


class _Flow:
  """Dead-structure removal (spec §3 step 4) over a channel-flow structure.

  The rule is the reference's criterion, exactly-zero weight gradients over
  random train-mode batches on the masked network, derived without passes:

  * forward, in call order: an input channel of a layer is identically zero
    when the channel it reads is zero in every producer of its residual
    space; a layer's output channel is constant when no kept kernel reads a
    non-zero input; after a norm a constant channel is its masked β
    (train-mode statistics), and a norm followed by ReLU (a producer alone in
    its space) makes it zero when that β ≤ 0; without a norm it is its bias
    (masked, as the layer masks it: zero once no kernel of the unit is kept).
  * backward, in reverse call order: a channel of a space is used when a
    kept kernel of a reader whose output is used reads it (spaces that reach
    the logits or a channel-mixing operation are always used); a layer's
    output is used when its space's channel is, its norm mask is not zero,
    and ReLU does not block a constant β ≤ 0.
  * a kernel (i, o) of a taking-part conv dies when input i is zero or output
    o unused; its norm dies (γ and β) when its input is constant or its
    output unused. Stem, shortcut convs, their norms and dense layers outside
    the taking-part set are never changed.

  For the two-conv residual block this is the reference's one-pass rule:
  ``a_o`` (conv_a row o kept) and ``r_o = a_o or β_a[o] > 0`` decide conv_b's
  input channels, ``c_o`` (conv_b column o kept) conv_a's filters, and so on.
  """

  def __init__(self, st: Any, params: PyTree, paths: Sequence[li.Path]):
    from models import structure  # pylint: disable=g-import-not-at-top
    self.prods = st.producers
    self.tp = {p: l for l, p in enumerate(paths)}
    self.fixed = {l.path: structure.connectivity(l, None, params)
                  for l in self.prods if l.path not in self.tp}
    self.space = {p: i for i, sp in enumerate(st.spaces) for p in sp}
    self.alone = {l.path: len(st.spaces[self.space[l.path]]) == 1
                  for l in self.prods}
    self.members = [sorted(sp, key=lambda p: st[p].order) for sp in st.spaces]
    self.pinned = {i for i, sp in enumerate(st.spaces)
                   if sp & (st.outputs | st.mixed)}
    self.readers: dict[int, list] = {}
    for l in self.prods:
      if l.inputs and l.aligned:
        self.readers.setdefault(self.space[l.inputs[0]], []).append(l)
    self.beta, self.bias = {}, {}
    for l in self.prods:
      node = li.get(params, l.path)
      self.bias[l.path] = (np.asarray(node["bias"], np.float64)
                           if "bias" in node else None)
      if l.norm is not None:
        self.beta[l.path] = np.asarray(li.get(params, l.norm)["bias"],
                                       np.float64)

  def _pass(self, masks, abs_w, nm):
    live = {p: (abs_w[l] * masks[l] > 0) for p, l in self.tp.items()}
    live.update(self.fixed)
    zero_out, blocked, zero_in, const = {}, {}, {}, {}
    for l in self.prods:
      p = l.path
      if l.inputs and l.aligned:
        mem = self.members[self.space[l.inputs[0]]]
        if all(q in zero_out for q in mem):
          z = np.logical_and.reduce([zero_out[q] for q in mem])
        else:  # a later producer of the space still adds to it
          z = np.zeros(zero_out[mem[0]].shape, bool)
        zero_in[p] = z[l.channel_map()]
      else:
        zero_in[p] = np.zeros((l.in_features,), bool)
      const[p] = ~np.any(live[p] & ~zero_in[p][:, None], axis=0)
      if l.norm is not None:
        m = nm.get(self.tp.get(p), np.ones((l.out_features,)))
        value = self.beta[p] * m
        off = m == 0
        zero, block = off | (const[p] & (value == 0)), off
        if self.alone[p]:  # norm -> ReLU
          zero = block = off | (const[p] & (value <= 0))
      else:
        b = self.bias[p]
        if b is not None and p in self.tp:
          # A layer masks its bias with its kernel (models.layers): a unit
          # with no kept kernel left outputs 0, not its bias.
          b = b * np.max(masks[self.tp[p]], axis=0)
        zero = const[p] & (True if b is None else b == 0)
        block = np.zeros((l.out_features,), bool)
      zero_out[p], blocked[p] = zero, block
    used_out, used_space = {}, {}
    for l in reversed(self.prods):
      i = self.space[l.path]
      if i not in used_space:
        if i in self.pinned:
          u = np.ones((l.out_features,), bool)
        else:
          u = np.zeros((l.out_features,), bool)
          for q in self.readers.get(i, []):
            if q.path not in used_out:
              u[:] = True  # read before this producer: count it as used
              break
            col = (live[q.path] & used_out[q.path][None, :]).any(axis=1)
            np.logical_or.at(u, q.channel_map(), col)
        used_space[i] = u
      used_out[l.path] = used_space[i] & ~blocked[l.path]
    new_masks, new_nm = [], {}
    for p, l in self.tp.items():
      new_masks.append(masks[l] * (~zero_in[p])[:, None]
                       * used_out[p][None, :])
    for layer in self.prods:
      l = self.tp.get(layer.path)
      if l is not None and layer.norm is not None:
        m = nm.get(l, np.ones((layer.out_features,)))
        new_nm[l] = m * (~const[layer.path]
                         & used_space[self.space[layer.path]])
    return new_masks, new_nm

  def remove(self, masks, abs_w, propagate):
    """One pass (or the fixed point) of the rule; (kernel masks, BN masks)."""
    masks, nm = list(masks), {}
    while True:
      new_masks, new_nm = self._pass(masks, abs_w, nm)
      done = (all(np.array_equal(a, b) for a, b in zip(new_masks, masks))
              and all(np.array_equal(new_nm[k], nm.get(k, 1.0 + 0 * v))
                      for k, v in new_nm.items()))
      masks, nm = new_masks, new_nm
      if not propagate or done:
        return masks, nm


class Pruner:
  """Precomputed, β-independent data of one set of weights and logits.

  Args:
    params: group-learned (unpruned) params.
    gates: group logits (``gates`` collection layout).
    info: the taking-part layers.
    groups: G (must match the logits).
    fp_every: n of the every-n-th filter-pruning rule; None: the fp layers
      ``info`` derived from the structure (every 2nd layer when it has none).
    fp_layers: explicit fp layer indices (override ``fp_every``).
    parity: keep the reference's cnt_g = 0 rule (whole group pruned).
  """

  def __init__(self, params: PyTree, gates: PyTree, info: li.LayerInfo,
               groups: int, *, fp_every: int | None = None,
               fp_layers: Sequence[int] | None = None, parity: bool = True):
    gates_lib.check_groups(gates, groups)
    self.params, self.info, self.groups, self.parity = (params, info, groups,
                                                        parity)
    if fp_layers is None and fp_every is None and info.fp is not None:
      fp_layers = info.fp
    self.fp = set(fp_layer_indices(len(info.convs), fp_every or 2, fp_layers))
    self.layers = []
    for l, c in enumerate(info.convs):
      if groups > c.out_features:
        raise ValueError(f"{c.name}: groups={groups} exceeds its "
                         f"{c.out_features} filters")
      w = np.asarray(li.kernel(params, c), np.float64)  # HWIO view
      logits = np.asarray(li.get(gates, c.path)["logits"])
      # H = one_hot(argmax_g A), ties to the lowest group (as gates.py).
      hard = np.eye(groups)[:, np.argmax(logits, axis=0)]
      w2 = np.sum(np.square(w), axis=(0, 1))           # (I, O)
      imp = (hard ** 2) @ w2.T                          # (G, I)
      imp, imp_s, imp_c = _normalised_sorted(imp)
      entry = {"conv": c, "H": hard, "abs": np.sum(np.abs(w), axis=(0, 1)),
               "imp": imp, "imp_s": imp_s, "imp_c": imp_c}
      if l in self.fp:
        f, f_s, f_c = _normalised_sorted(np.sum(w2, axis=0)[None])
        entry.update(f=f[0], f_s=f_s, f_c=f_c)
      self.layers.append(entry)
    self.flops = np.array([c.flops for c in info.convs], np.float64)
    self.nparams = np.array([c.params for c in info.convs], np.float64)
    self.flow = (None if info.structure is None else
                 _Flow(info.structure, params, info.paths))

  def channel_masks(self, beta: float):
    """Steps 1-3: kernel masks ``(I, O)`` per layer, and emptied groups."""
    masks, empty = [], []
    for l, e in enumerate(self.layers):
      thr, emp = _cum_threshold(e["imp_s"], e["imp_c"], beta, self.parity)
      keep = (e["imp"] > thr[:, None]).astype(np.float64)      # (G, I)
      mask = keep.T @ e["H"]                                   # (I, O)
      name = e["conv"].name
      empty += [(name, int(g)) for g in np.flatnonzero(emp)]
      if l in self.fp:
        thr_f, emp_f = _cum_threshold(e["f_s"], e["f_c"], beta, self.parity)
        mask = mask * (e["f"] > thr_f[0])[None, :]
        if emp_f[0]:
          empty.append((name, -1))
      masks.append(mask)
    return masks, empty

  def dead_structure(self, masks: list[np.ndarray], propagate: bool = False):
    """Step 4 over the channel-flow structure; new kernel and BN masks.

    Args:
      masks: kernel masks from ``channel_masks``.
      propagate: iterate the rule to a fixed point instead of one pass.

    Returns:
      ``(kernel_masks, norm_masks)``; ``norm_masks[l]`` is the ``(O,)`` mask
      of the BatchNorm after taking-part layer l (when it has one).
    """
    if self.flow is None:
      return list(masks), {}
    return self.flow.remove(masks, [e["abs"] for e in self.layers], propagate)

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
    masks, _ = self.dead_structure(masks)
    return self.pruned_fraction(masks)[0]

  def result(self, beta: float, trajectory=()) -> PruneResult:
    """The full prune at β: params, masks collection, figures, table."""
    masks0, empty = self.channel_masks(beta)
    masks, norm = self.dead_structure(masks0)
    pf, pp = self.pruned_fraction(masks)
    pmasks, _ = self.dead_structure(masks0, propagate=True)
    ppf, ppp = self.pruned_fraction(pmasks)
    if empty and self.parity:
      warnings.warn(
          f"DSP prune at beta={beta:.6g}: {len(empty)} group(s) emptied by the "
          "reference's cnt_g = 0 rule (kept for parity): "
          + ", ".join(f"{n}[{'filters' if g < 0 else g}]" for n, g in empty[:8])
          + ("..." if len(empty) > 8 else "")
          + f"; fully propagated P.FLOPS {ppf:.2f}% vs {pf:.2f}%",
          stacklevel=2)
    params, mask_tree = self.params, full_masks(self.params)
    table = []
    for l, (e, m) in enumerate(zip(self.layers, masks)):
      c = e["conv"]
      k = np.asarray(li.kernel(params, c))
      params = li.with_kernel(params, c, k * m[None, None].astype(k.dtype))
      mnode = li.get(mask_tree, c.path)
      mask_tree = li.replace(mask_tree, c.path,
                             {**mnode, "kernel": m.astype(mnode["kernel"].dtype)})
      if l in norm and c.norm is not None:
        bn = li.get(params, c.norm)
        nm = norm[l]
        params = li.replace(params, c.norm, {
            **bn, "scale": np.asarray(bn["scale"]) * nm.astype(
                np.asarray(bn["scale"]).dtype),
            "bias": np.asarray(bn["bias"]) * nm.astype(
                np.asarray(bn["bias"]).dtype)})
        bm = li.get(mask_tree, c.norm)
        mask_tree = li.replace(mask_tree, c.norm,
                               {**bm, "scale": nm.astype(bm["scale"].dtype)})
      live = e["abs"] * m > 0
      per_group = []
      for g in range(self.groups):
        filt = e["H"][g] > 0
        per_group.append((int(np.sum(live.any(axis=0) & filt)),
                          int(np.sum(live[:, filt].any(axis=1)))))
      table.append((c.name, tuple(per_group)))
    params = jax.tree.map(np.asarray, params)
    return PruneResult(params, mask_tree, float(beta), pf, pp, ppf, ppp,
                       tuple(empty), tuple(table), tuple(trajectory),
                       _whole_model(self.info, params, mask_tree))


def full_masks(params: PyTree) -> PyTree:
  """A ``masks`` collection of ones for every Conv/Dense kernel and norm."""

  def walk(node):
    out = {}
    for k, v in node.items():
      if isinstance(v, dict) or hasattr(v, "items") and not hasattr(v, "shape"):
        sub = walk(v)
        if sub:
          out[k] = sub
      elif k == "kernel" and np.ndim(v) == 4:
        out[k] = np.ones(np.shape(v)[2:], np.asarray(v).dtype)
      elif k == "kernel" and np.ndim(v) == 2:
        out[k] = np.ones(np.shape(v), np.asarray(v).dtype)
      elif k == "scale":
        out[k] = np.ones(np.shape(v), np.asarray(v).dtype)
    return out

  return walk(params)


def _whole_model(info: li.LayerInfo, params: PyTree,
                 masks: PyTree) -> dict | None:
  """Whole-model figures from ``models.flops`` (needs ``info.model``)."""
  if info.model is None:
    return None
  from models import flops as flops_lib  # pylint: disable=g-import-not-at-top
  rep = flops_lib.report(info.model, {"params": params, "masks": masks},
                         info.image_shape[:2], info.image_shape[2])
  return {"pflops_whole_model": rep.pflops_whole_model,
          "pparams_whole_model": rep.pparams_whole_model,
          "macs": rep.macs, "macs_dense": rep.macs_dense,
          "params": rep.params, "params_dense": rep.params_dense,
          "dsp_pflops": float(rep.dsp_pflops),
          "dsp_pparams": float(rep.dsp_pparams)}


def prune_at(params: PyTree, gates: PyTree, info: li.LayerInfo, *,
             groups: int, beta: float, fp_every: int | None = None,
             fp_layers: Sequence[int] | None = None,
             parity: bool = True) -> PruneResult:
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

  Returns:
    The prune result.
  """
  return Pruner(params, gates, info, groups, fp_every=fp_every,
                fp_layers=fp_layers, parity=parity).result(beta)


# The largest β the search can reach: ten steps up from 0.15 towards 1.
BETA_MAX = 1.0 - 0.85 / 2**10


def rate_search_betas(pruner: Pruner, rate: float) -> tuple[float, list]:
  """The reference's bisection; returns the final β and the 10 trials."""
  beta, lo, hi = 0.15, 0.0, 1.0
  trials = []
  for _ in range(10):
    pf = pruner.flops_at(beta)
    trials.append((beta, pf))
    if pf > 100.0 * rate:
      hi = beta
      beta = (beta + lo) / 2
    else:
      lo = beta
      beta = (beta + hi) / 2
  return beta, trials


def prune(params: PyTree, gates: PyTree, info: li.LayerInfo, *, groups: int,
          rate: float, fp_every: int | None = None,
          fp_layers: Sequence[int] | None = None,
          parity: bool = True) -> PruneResult:
  """Prunes to a target rate of reference P.FLOPS by the spec's β search.

  Ten bisection trials from β = 0.15 in [0, 1], then one prune at the final,
  untested β (11 prunes, each from the same unpruned weights).

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

  Returns:
    The prune result, with the β trajectory.

  Raises:
    ValueError: for an unreachable rate, mismatched groups, or groups larger
      than a layer's filters.
  """
  pruner = Pruner(params, gates, info, groups, fp_every=fp_every,
                  fp_layers=fp_layers, parity=parity)
  floor = pruner.unpruned_fraction()
  if not floor < 100.0 * rate < 100.0:
    raise ValueError(
        f"rate={rate!r} is unreachable: the pruned-FLOPs rate must lie in "
        f"({floor / 100:.4f}, 1) — above what the weights already have "
        f"({floor:.2f}% zero kernels) and below 100%")
  top = pruner.flops_at(BETA_MAX)
  if 100.0 * rate > top:
    raise ValueError(
        f"rate={rate!r} is unreachable: the pruned-FLOPs rate must lie in "
        f"({floor / 100:.4f}, {top / 100:.4f}) — pruning at the search's "
        f"largest threshold (beta={BETA_MAX:.6f}) removes {top:.2f}% of the "
        "FLOPs")
  beta, trials = rate_search_betas(pruner, rate)
  res = pruner.result(beta)
  if abs(res.p_flops - 100.0 * rate) > 1.0:
    warnings.warn(
        f"DSP rate search ended at P.FLOPS {res.p_flops:.2f}% for a target of "
        f"{100 * rate:.2f}% (beta={beta:.6g}); P.FLOPS is not monotone in beta "
        "once whole groups are emptied, so bisection can bracket wrongly for "
        "low targets", stacklevel=2)
  return dataclasses.replace(res, trajectory=tuple(trials) + (
      (beta, res.p_flops),))


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
