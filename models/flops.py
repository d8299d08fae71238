"""FLOPs and parameter accounting from shapes and masks (no hooks).

Two measures, both for one image:

* DSP's reference measure (spec dsp.md section 0 and section 3 step 5), over
  the taking-part convs only: a kernel (o, i) survives iff
  ``sum_hw |W[o, i] * mask[o, i]| > 0``;
  ``P.FLOPS = 100 * (1 - sum_l flops_l * surv_l / (O_l I_l) / sum_l flops_l)``
  and ``P.PARAMS`` the same with ``O_l I_l k_l k_l`` for ``flops_l``.
* Whole-model multiply-accumulates (every conv and dense layer) and
  parameters (every leaf of ``params``), dense and masked. A masked conv or
  dense layer counts its surviving kernels only (MACs ``macs * surv / (O I)``,
  weights ``surv * kh * kw``). A bias entry counts while its output channel
  keeps at least one surviving kernel; a norm channel's scale and bias count
  while the norm's mask keeps it and, for a norm right after a conv/dense
  layer, while that layer's channel keeps a surviving kernel. Parameters of
  other modules are counted dense.

Pruned percentages are ``100 * (1 - masked / dense)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from models import graph as graph_lib
from models import paths


@dataclasses.dataclass(frozen=True)
class LayerRow:
  """Accounting of one conv, dense or norm layer.

  Attributes:
    name: '.'-joined module path.
    kind: 'conv', 'dense' or 'norm'.
    takes_part: counted by DSP's measure.
    kernels: O*I kernels (conv/dense); channels for a norm.
    kernels_alive: surviving kernels (channels for a norm).
    macs_dense: multiply-accumulates of the dense layer (``flops_l``).
    macs: multiply-accumulates of the surviving kernels.
    params_dense: parameters of the dense layer (kernel, bias; scale, bias).
    params: parameters left.
  """

  name: str
  kind: str
  takes_part: bool
  kernels: int
  kernels_alive: int
  macs_dense: int
  macs: int
  params_dense: int
  params: int


@dataclasses.dataclass(frozen=True)
class FlopsReport:
  """Both measures for one model and one set of masks.

  Attributes:
    dsp_pflops: DSP's P.FLOPS (% of taking-part conv FLOPs removed).
    dsp_pparams: DSP's P.PARAMS (% of taking-part conv weights removed).
    macs: whole-model multiply-accumulates left, one image.
    params: whole-model parameters left.
    macs_dense: whole-model multiply-accumulates of the dense model.
    params_dense: parameter count of ``params``.
    pflops_whole_model: % of whole-model MACs removed.
    pparams_whole_model: % of whole-model parameters removed.
    per_layer: one row per conv, dense and norm layer, in call order.
  """

  dsp_pflops: float
  dsp_pparams: float
  macs: int
  params: int
  macs_dense: int
  params_dense: int
  pflops_whole_model: float
  pparams_whole_model: float
  per_layer: tuple[LayerRow, ...]


def _pruned(left: float, total: float) -> float:
  return 100.0 * (1.0 - left / total) if total else 0.0


def connectivities(struct: graph_lib.Graph,
                   params: Mapping[str, Any] | None,
                   masks: Mapping[str, Any] | None,
                   remove_dead: bool = False) -> dict[tuple[str, ...],
                                                      np.ndarray]:
  """Surviving kernels (in, out) of every conv/dense layer.

  Args:
    struct: from ``models.analyze``.
    params: the ``params`` collection (None: only the masks decide).
    masks: the ``masks`` collection (None: dense).
    remove_dead: keep only the kernels the physically smaller network keeps
      (``models.graph.cut``: dead channels and the inputs that read zeros
      removed), as the exports count them.

  Returns:
    Layer path -> boolean (in_features, out_features).
  """
  if remove_dead:
    cut = graph_lib.cut(struct, params, masks)
    return {l.path: cut.layers[l.path].kernels for l in struct.weighted}
  return {l.path: graph_lib.connectivity(l, masks, params)
          for l in struct.weighted}


def dsp_measure(struct: graph_lib.Graph,
                params: Mapping[str, Any] | None,
                masks: Mapping[str, Any] | None,
                remove_dead: bool = False) -> tuple[float, float]:
  """DSP's (P.FLOPS, P.PARAMS) in percent (spec dsp.md section 3 step 5).

  Args:
    struct: from ``models.analyze``.
    params: the ``params`` collection (None: only the masks decide).
    masks: the ``masks`` collection (None: dense).
    remove_dead: count what the physically smaller network removes
      (``connectivities``); the reference's own figure is without (its
      one-pass removal is applied to the masks beforehand).

  Returns:
    (pruned FLOPs %, pruned params %) over the taking-part convs.
  """
  conns = connectivities(struct, params, masks, remove_dead)
  flops = flops_left = weights = weights_left = 0.0
  for l in struct.taking_part:
    conn = conns[l.path]
    frac = conn.sum() / conn.size
    k2 = l.kernel_size[0] * l.kernel_size[1]
    flops += l.flops
    flops_left += l.flops * frac
    weights += conn.size * k2
    weights_left += conn.size * k2 * frac
  return _pruned(flops_left, flops), _pruned(weights_left, weights)


def report(model, variables: Mapping[str, Any],
           image_size: int | Sequence[int] = 32, channels: int | None = None,
           remove_dead: bool = False) -> FlopsReport:
  """DSP's measure and the whole-model counts for ``model`` under its masks.

  Args:
    model: any Flax model (plain or ``models.prunable``-wrapped).
    variables: its variables; ``params`` is required, ``masks`` optional
      (abstract ``jax.eval_shape`` leaves count as dense).
    image_size: input height = width, or (height, width).
    channels: image channels (None: the model's).
    remove_dead: count only what the physically smaller network keeps
      (``models.graph.cut``; the MACs of ``convert.describe``), in both
      measures.

  Returns:
    The ``FlopsReport``.
  """
  return report_graph(graph_lib.analyze(model, image_size, channels),
                      variables, remove_dead)


def report_graph(struct: graph_lib.Graph, variables: Mapping[str, Any],
                 remove_dead: bool = False) -> FlopsReport:
  """``report`` for a model's graph (``models.analyze``)."""
  if "params" not in variables:
    raise ValueError("variables must hold a 'params' collection; got "
                     f"{sorted(variables)}")
  params, masks = variables["params"], variables.get("masks")
  leaves = dict(paths.leaves(params))
  params_dense = sum(int(np.prod(np.shape(v))) for v in leaves.values())
  # Whole-model figures are structural: the masks decide what is removed. A
  # kernel that merely trained to zero (e.g. in an unpruned stem) still runs
  # in the packed model. (DSP's own measure keeps the reference's weight test.)
  # With dead structure removed they count what the compact export keeps,
  # which also drops what reads exact zeros (DDROP zeroes pruned norms).
  conns = connectivities(struct, params if remove_dead else None, masks,
                         remove_dead)
  rows, alive_out, counted = [], {}, set()
  for l in struct.layers.values():
    module = {p: v for p, v in leaves.items() if p[:-1] == l.path}
    counted.update(module)
    dense_params = sum(int(np.prod(np.shape(v))) for v in module.values())
    if l.kind == "norm":
      keep = graph_lib.norm_alive(l, masks)
      if l.follows in alive_out:
        keep = keep & alive_out[l.follows]
      per_channel = dense_params // max(1, l.out_features)
      rows.append(LayerRow(l.name, l.kind, False, l.out_features,
                           int(keep.sum()), 0, 0, dense_params,
                           int(keep.sum()) * per_channel))
      continue
    conn = conns[l.path]
    alive_out[l.path] = conn.any(axis=0)
    k2 = l.kernel_size[0] * l.kernel_size[1]
    surv = int(conn.sum())
    left = surv * k2 + (int(alive_out[l.path].sum())
                        if l.path + ("bias",) in module else 0)
    rows.append(LayerRow(
        l.name, l.kind, l.takes_part, conn.size, surv, l.macs,
        int(round(l.macs * surv / conn.size)), dense_params, left))
  other = sum(int(np.prod(np.shape(v))) for p, v in leaves.items()
              if p not in counted)
  # Attention's activation-by-activation products run whatever is pruned.
  macs_dense = sum(r.macs_dense for r in rows) + struct.activation_macs
  macs = sum(r.macs for r in rows) + struct.activation_macs
  params_left = sum(r.params for r in rows) + other
  pflops, pparams = dsp_measure(struct, params, masks, remove_dead)
  return FlopsReport(
      dsp_pflops=pflops, dsp_pparams=pparams, macs=macs, params=params_left,
      macs_dense=macs_dense, params_dense=params_dense,
      pflops_whole_model=_pruned(macs, macs_dense),
      pparams_whole_model=_pruned(params_left, params_dense),
      per_layer=tuple(rows))


def format_table(rep: FlopsReport) -> str:
  """Plain-text table of ``rep``: a line per conv/dense layer, then totals."""
  head = (f"{'layer':<32} {'kind':<5} {'dsp':<3} {'kernels':>13} "
          f"{'MACs':>27} {'params':>21}")
  lines = [head, "-" * len(head)]
  for r in rep.per_layer:
    if r.kind == "norm":
      continue
    lines.append(
        f"{r.name:<32} {r.kind:<5} {'*' if r.takes_part else '':<3} "
        f"{r.kernels_alive:>6}/{r.kernels:<6} {r.macs:>13,}/{r.macs_dense:<13,}"
        f" {r.params:>10,}/{r.params_dense:<10,}")
  lines.append("-" * len(head))
  lines.append("DSP measure (taking-part layers): P.FLOPS "
               f"{rep.dsp_pflops:.2f} %"
               f", P.PARAMS {rep.dsp_pparams:.2f} %")
  lines.append(f"whole model: MACs {rep.macs:,} / {rep.macs_dense:,} "
               f"({rep.pflops_whole_model:.2f} % pruned), params "
               f"{rep.params:,} / {rep.params_dense:,} "
               f"({rep.pparams_whole_model:.2f} % pruned)")
  return "\n".join(lines)
