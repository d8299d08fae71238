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

from models import structure as structure_lib


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
    insize: DSP ``insize_l`` (input elements / (16*32*32)).
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
  insize: float


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


def connectivities(struct: structure_lib.ModelStructure,
                   params: Mapping[str, Any] | None,
                   masks: Mapping[str, Any] | None,
                   remove_dead: bool = False) -> dict[tuple[str, ...],
                                                      np.ndarray]:
  """Surviving kernels (in, out) of every conv/dense layer.

  Args:
    struct: from ``models.analyze``.
    params: the ``params`` collection (None: only the masks decide).
    masks: the ``masks`` collection (None: dense).
    remove_dead: also drop the filters of channels that
      ``models.dead_channels`` (propagated) finds dead, and the kernels
      that read a channel which is exactly zero (``_zero_inputs``: a
      removed filter whose norm is masked, as channel pruning leaves it).

  Returns:
    Layer path -> boolean (in_features, out_features).
  """
  conn = {l.path: structure_lib.connectivity(l, masks, params)
          for l in struct.producers}
  if remove_dead:
    dead = structure_lib.dead_channels(struct, masks, params)
    zero_in = _zero_inputs(struct, masks)
    conn = {p: c & ~dead[p][None, :] & ~zero_in[p][:, None]
            for p, c in conn.items()}
  return conn


def _zero_inputs(struct: structure_lib.ModelStructure,
                 masks: Mapping[str, Any] | None
                 ) -> dict[tuple[str, ...], np.ndarray]:
  """Input features of every conv/dense layer that are exactly zero.

  A producer's output channel is exactly zero when its norm's mask is zero
  there (the mask multiplies scale and bias), or, without a norm, when its
  kernel column is masked out (the layer then masks the bias too). A
  consumer's input channel is zero when it is zero in every producer of the
  space it reads (ReLU, pooling and residual sums keep a zero a zero: the
  residual width is kept while any producer adds to a channel, as the
  slimmed exports keep it); the kernels reading it compute nothing, and a
  slimmed model drops them with the filter (channel pruning removes the
  next layer's input slices). Producers whose channels something mixes
  (e.g. a LayerNorm's statistics) are left alone: what their consumers read
  need not be zero.

  Args:
    struct: from ``models.analyze``.
    masks: the ``masks`` collection (None: dense).

  Returns:
    Layer path -> boolean (in_features,), True where the input is zero.
  """
  zero = {}
  for l in struct.producers:
    if l.norm is not None:
      zero[l.path] = ~structure_lib.norm_alive(struct[l.norm], masks)
    else:
      zero[l.path] = ~structure_lib.connectivity(l, masks).any(axis=0)
  space = {p: s for s in struct.spaces for p in s}
  out = {}
  for l in struct.producers:
    z = np.zeros((l.in_features,), bool)
    members = space[l.inputs[0]] if l.inputs else ()
    if l.aligned and members and not any(p in struct.mixed for p in members):
      z = np.logical_and.reduce([zero[p] for p in members])[l.channel_map()]
    out[l.path] = z
  return out


def dsp_measure(struct: structure_lib.ModelStructure,
                params: Mapping[str, Any] | None,
                masks: Mapping[str, Any] | None,
                remove_dead: bool = False) -> tuple[float, float]:
  """DSP's (P.FLOPS, P.PARAMS) in percent (spec dsp.md section 3 step 5).

  Args:
    struct: from ``models.analyze``.
    params: the ``params`` collection (None: only the masks decide).
    masks: the ``masks`` collection (None: dense).
    remove_dead: count dead channels (``models.dead_channels``) as removed;
      the reference's own figure is without (its one-pass removal is applied
      to the masks beforehand).

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


def _leaves(tree: Mapping[str, Any], prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_leaves(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def report(model, variables: Mapping[str, Any],
           image_size: int | Sequence[int] = 32, channels: int | None = None,
           remove_dead: bool = False) -> FlopsReport:
  """DSP's measure and the whole-model counts for ``model`` under its masks.

  Args:
    model: a zoo model.
    variables: its variables; ``params`` is required, ``masks`` optional
      (abstract ``jax.eval_shape`` leaves count as dense).
    image_size: input height = width, or (height, width).
    channels: image channels (None: the model's).
    remove_dead: also count the filters of dead channels
      (``models.dead_channels``, propagated to a fixed point) as removed,
      in both measures.

  Returns:
    The ``FlopsReport``.
  """
  if "params" not in variables:
    raise ValueError("variables must hold a 'params' collection; got "
                     f"{sorted(variables)}")
  params, masks = variables["params"], variables.get("masks")
  struct = structure_lib.analyze(model, image_size, channels)
  leaves = _leaves(params)
  params_dense = sum(int(np.prod(np.shape(v))) for v in leaves.values())
  # Whole-model figures are structural: the masks decide what is removed. A
  # kernel that merely trained to zero (e.g. in an unpruned stem) still runs
  # in the packed model. (DSP's own measure keeps the reference's weight test.)
  conns = connectivities(struct, None, masks, remove_dead)
  rows, alive_out, counted = [], {}, set()
  for l in struct.layers.values():
    module = {p: v for p, v in leaves.items() if p[:-1] == l.path}
    counted.update(module)
    dense_params = sum(int(np.prod(np.shape(v))) for v in module.values())
    if l.kind == "norm":
      keep = structure_lib.norm_alive(l, masks)
      producer = l.inputs[0] if len(l.inputs) == 1 else None
      if producer in alive_out and struct[producer].norm == l.path:
        keep = keep & alive_out[producer]
      per_channel = dense_params // max(1, l.out_features)
      rows.append(LayerRow(l.name, l.kind, False, l.out_features,
                           int(keep.sum()), 0, 0, dense_params,
                           int(keep.sum()) * per_channel, 0.0))
      continue
    conn = conns[l.path]
    alive_out[l.path] = conn.any(axis=0)
    k2 = l.kernel_size[0] * l.kernel_size[1]
    surv = int(conn.sum())
    left = surv * k2 + (int(alive_out[l.path].sum())
                        if l.path + ("bias",) in module else 0)
    rows.append(LayerRow(
        l.name, l.kind, l.takes_part, conn.size, surv, l.macs,
        int(round(l.macs * surv / conn.size)), dense_params, left, l.insize))
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
