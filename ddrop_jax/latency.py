"""DDROP to a latency target: the ``amount`` whose prune meets it.

``choose_amount`` bisects the one per-layer ``amount`` (the same for every
pruned layer, as the reference's ``--amount``) so that the predicted latency
of the pruned network (``models.latency.LatencyModel``) is at most the target
fraction of the dense network's. A candidate's structure comes from the
graph's cut of masks that remove each layer's least important units (ranked
as ``prune`` ranks them, rounded as ``round_to`` says): the same widths the
slimmed export has, without building it. Each candidate costs one cut (tens
of ms on a ResNet-56), no timing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from ddrop_jax.config import DdropConfig
from ddrop_jax.pruning import check_round_to, importance_of, pruned_units
from ddrop_jax.selection import DdropLayer
from models import graph as graph_lib
from models import paths

# The largest amount tried: every layer keeps at least one unit.
AMOUNT_MAX = 1.0 - 1e-6
STEPS = 14


@dataclasses.dataclass(frozen=True)
class AmountChoice:
  """The chosen amount, its predicted latency and the search's trials."""

  amount: float
  figures: dict
  trials: tuple[tuple[float, float], ...]


def _masks(variables, layers, cfg, stats, amount):
  params = variables["params"]
  flat_m = paths.flatten(variables.get("masks") or {})
  for layer in layers:
    criterion = importance_of(layer, cfg, stats)
    keep = ~np.asarray(pruned_units(layer, params, stats, criterion, amount,
                                    cfg.round_to))
    # The producer's filters and the norm after it: enough for the cut to
    # see the unit's channel as constant zero and drop it downstream.
    for key in ([layer.producer + ("kernel",)]
                + ([layer.norm + ("scale",)] if layer.norm else [])):
      leaf = np.asarray(paths.get(params, key))
      old = flat_m.get(key, np.ones(leaf.shape[-2:] if leaf.ndim >= 2
                                    else leaf.shape, leaf.dtype))
      flat_m[key] = np.asarray(old) * keep.reshape(
          (1,) * (np.ndim(old) - 1) + (-1,)).astype(leaf.dtype)
  return paths.unflatten(flat_m)


def predicted_seconds(graph: graph_lib.Graph, latency: Any,
                      variables: Mapping[str, Any],
                      layers: Sequence[DdropLayer], cfg: DdropConfig,
                      amount: float,
                      stats: Mapping[str, Any] | None = None) -> float:
  """Predicted seconds of the network pruned at ``amount``."""
  params = paths.unflatten({k: np.asarray(v) for k, v in
                            paths.flatten(variables["params"]).items()})
  masks = _masks({**variables, "params": params}, layers, cfg, stats, amount)
  return latency.predict_cut(graph_lib.cut(graph, params, masks).layers)


def choose_amount(graph: graph_lib.Graph, latency: Any,
                  variables: Mapping[str, Any],
                  layers: Sequence[DdropLayer], cfg: DdropConfig,
                  target: float,
                  stats: Mapping[str, Any] | None = None) -> AmountChoice:
  """The smallest amount whose predicted latency fraction is <= ``target``.

  Args:
    graph: the model's traced graph (``models.analyze``).
    latency: a ``models.latency.LatencyModel`` of ``graph``.
    variables: the variables to prune (``params``, maybe ``masks``).
    layers: the layers ``prune`` prunes.
    cfg: the DDROP config (importance, round_to).
    target: predicted latency / dense latency, in (0, 1).
    stats: the ``ddrop_stats`` collection (``activation`` importance).

  Returns:
    The amount (within 2**-14 of the boundary), its latency figures and the
    trials ``(amount, fraction)``.

  Raises:
    ValueError: when pruning all but one unit (rounded) of every layer still
      leaves more than ``target``.
  """
  check_round_to(layers, cfg.round_to)
  dense = latency.dense_seconds()

  def fraction(a):
    return predicted_seconds(graph, latency, variables, layers, cfg, a,
                             stats) / dense

  lowest = fraction(AMOUNT_MAX)
  trials = [(AMOUNT_MAX, lowest)]
  if not lowest <= target < 1.0:
    raise ValueError(
        f"ddrop.target_latency={target!r} is unreachable: the predicted "
        f"latency fraction at batch {latency.batch} must lie in "
        f"[{lowest:.4f}, 1) (pruning all but "
        f"{max(cfg.round_to, 1)} unit(s) of every layer leaves {lowest:.4f})")
  lo, hi = 0.0, AMOUNT_MAX
  for _ in range(STEPS):
    mid = (lo + hi) / 2
    f = fraction(mid)
    trials.append((mid, f))
    if f <= target:
      hi = mid
    else:
      lo = mid
  return AmountChoice(hi, latency.figures(fraction(hi) * dense),
                      tuple(trials))
