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


class Pruner:
  """Precomputed, β-independent data of one set of weights and logits.

  Args:
    params: group-learned (unpruned) params.
    gates: group logits (``gates`` collection layout).
    info: the taking-part layers.
    groups: G (must match the logits).
    fp_every: n of the every-n-th filter-pruning rule.
    fp_layers: explicit fp layer indices (override ``fp_every``).
    parity: keep the reference's cnt_g = 0 rule (whole group pruned).
  """

  def __init__(self, params: PyTree, gates: PyTree, info: li.LayerInfo,
               groups: int, *, fp_every: int = 2,
               fp_layers: Sequence[int] | None = None, parity: bool = True):
    gates_lib.check_groups(gates, groups)
    self.params, self.info, self.groups, self.parity = (params, info, groups,
                                                        parity)
    self.fp = set(fp_layer_indices(len(info.convs), fp_every, fp_layers))
    self.layers = []
    for l, c in enumerate(info.convs):
      if groups > c.out_features:
        raise ValueError(f"{c.name}: groups={groups} exceeds its "
                         f"{c.out_features} filters")
      w = np.asarray(li.get(params, c.path)["kernel"], np.float64)
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
    index = {c.path: l for l, c in enumerate(info.convs)}
    self.blocks = []
    for b in info.blocks:
      bias = np.asarray(li.get(params, b.norm_a)["bias"], np.float64)
      self.blocks.append((index[b.conv_a], index[b.conv_b], bias))

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
    """Step 4 per residual block; returns new kernel masks and BN masks.

    Args:
      masks: kernel masks from ``channel_masks``.
      propagate: iterate the rule to a fixed point instead of one pass.

    Returns:
      ``(kernel_masks, norm_masks)``; ``norm_masks[l]`` is the ``(O,)`` mask
      of the BatchNorm after layer l (blocks only).
    """
    masks = list(masks)
    norm = {}
    for la, lb, bias_a in self.blocks:
      ma, mb = masks[la], masks[lb]
      nb_a = np.ones(ma.shape[1])
      while True:
        live_a = self.layers[la]["abs"] * ma > 0                # (I, O_a)
        live_b = self.layers[lb]["abs"] * mb > 0                # (O_a, O_b)
        a = live_a.any(axis=0)
        c = live_b.any(axis=1)
        r = a | (bias_a * nb_a > 0)
        new_ma = ma * (c & r)[None, :]
        new_nb_a = nb_a * (a & c & r)
        new_mb = mb * r[:, None]
        nb_b = (live_b & r[:, None]).any(axis=0).astype(np.float64)
        done = (np.array_equal(new_ma, ma) and np.array_equal(new_mb, mb)
                and np.array_equal(new_nb_a, nb_a))
        ma, mb, nb_a = new_ma, new_mb, new_nb_a
        if not propagate or done:
          break
      masks[la], masks[lb] = ma, mb
      norm[la], norm[lb] = nb_a, nb_b
    return masks, norm

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
      node = li.get(params, c.path)
      w = np.asarray(node["kernel"]) * m[None, None].astype(
          np.asarray(node["kernel"]).dtype)
      params = li.replace(params, c.path, {**node, "kernel": w})
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
             groups: int, beta: float, fp_every: int = 2,
             fp_layers: Sequence[int] | None = None,
             parity: bool = True) -> PruneResult:
  """One prune at threshold β (spec §3 steps 1-5).

  Args:
    params: group-learned params.
    gates: group logits.
    info: the taking-part layers.
    groups: G.
    beta: threshold in (0, 1).
    fp_every: n of the filter-pruning rule.
    fp_layers: explicit fp layer indices.
    parity: keep the cnt_g = 0 defect.

  Returns:
    The prune result.
  """
  return Pruner(params, gates, info, groups, fp_every=fp_every,
                fp_layers=fp_layers, parity=parity).result(beta)


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
          rate: float, fp_every: int = 2,
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
    fp_every: n of the every-n-th filter-pruning rule (2 for CIFAR ResNets).
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
