"""Optimizers and learning-rate schedules of the reference recipes, in optax.

Every schedule is a function of the traced optimizer step (0-based: the lr
used by the ``t``-th update), so it runs inside ``jit``. Per-epoch schedules of
the references (stepped once per epoch in PyTorch) are expressed per step as
``epoch = step // steps_per_epoch``.

* ``dsp_step``: DSP pretraining. ``lr · f · 0.1^[e ≥ E/2] · 0.1^[e ≥ 3E/4]``
  with ``f = warmup_factor`` (1/4) for ``e < warmup_epochs`` (2), else 1.
* ``cosine_epoch``: ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=E)``
  stepped per epoch: ``lr · (1 + cos(π e / E)) / 2`` (DSP group learning and
  each fine-tuning cycle).
* ``onecycle``: ``torch.optim.lr_scheduler.OneCycleLR(max_lr, total_steps,
  anneal_strategy='cos')`` stepped per batch, with its momentum cycling
  (``max_momentum`` → ``base_momentum`` → ``max_momentum``). DDROP CNNs.
* ``warmup_cosine``: linear warm-up from 0 over the first ``warmup_fraction``
  of the steps (``lr · t / W``) then cosine to 0 (``lr · (1 + cos(π (t − W) /
  (T − W))) / 2``). DDROP transformers with AdamW.
* ``constant``.

Optimizers:

* ``sgd_torch``: ``torch.optim.SGD`` with momentum and *coupled* weight decay
  (``g ← g + wd·θ`` before the momentum buffer ``b ← μ b + g``; ``θ ← θ − η
  b``; Nesterov: ``θ ← θ − η (g + μ b)``). The momentum may be a schedule
  (one-cycle momentum cycling).
* ``adamw``: ``torch.optim.AdamW`` (decoupled decay ``θ ← θ − η wd θ``).

Weight decay can be limited to "weights" (``weights_mask``): conv/dense
kernels and norm scales, i.e. the parameters PyTorch names ``weight`` — what
DDROP decays.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]
ScalarOrSchedule = float | Schedule

WEIGHT_LEAVES = ("kernel", "scale")


def constant(value: float) -> Schedule:
  """A constant schedule."""
  return lambda step: jnp.asarray(value, jnp.float32)


def _epoch(step: jax.Array, steps_per_epoch: int) -> jax.Array:
  return jnp.floor_divide(jnp.asarray(step, jnp.int32), steps_per_epoch)


def dsp_step(lr: float, epochs: int, steps_per_epoch: int,
             warmup_epochs: int = 2, warmup_factor: float = 0.25) -> Schedule:
  """DSP pretraining: ×0.1 at epochs E/2 and 3E/4, lr·factor while warming up.

  Args:
    lr: base learning rate.
    epochs: E, the number of epochs of the phase.
    steps_per_epoch: optimizer steps per epoch.
    warmup_epochs: epochs at ``lr * warmup_factor``.
    warmup_factor: factor of the warm-up epochs.

  Returns:
    ``schedule(step) -> lr``.
  """

  def schedule(step):
    e = _epoch(step, steps_per_epoch).astype(jnp.float32)
    f = jnp.where(e < warmup_epochs, warmup_factor, 1.0)
    f = f * jnp.where(e >= epochs * 0.5, 0.1, 1.0)
    f = f * jnp.where(e >= epochs * 0.75, 0.1, 1.0)
    return jnp.asarray(lr, jnp.float32) * f

  return schedule


def cosine_epoch(lr: float, epochs: int, steps_per_epoch: int,
                 eta_min: float = 0.0) -> Schedule:
  """``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch.

  Args:
    lr: initial learning rate.
    epochs: T_max.
    steps_per_epoch: optimizer steps per epoch.
    eta_min: final learning rate.

  Returns:
    ``schedule(step) -> lr``.
  """

  def schedule(step):
    e = _epoch(step, steps_per_epoch).astype(jnp.float32)
    return eta_min + (lr - eta_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * e / epochs))

  return schedule


def _cos_anneal(start, end, pct):
  return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1.0)


def onecycle(max_lr: float, total_steps: int, pct_start: float = 0.3,
             div_factor: float = 25.0, final_div_factor: float = 1e4,
             base_momentum: float = 0.85, max_momentum: float = 0.95
             ) -> tuple[Schedule, Schedule]:
  """``OneCycleLR(anneal_strategy='cos', three_phase=False)`` per batch.

  Phase 1 (steps 0 .. pct_start·T − 1): lr ``max_lr/div`` → ``max_lr``,
  momentum ``max_momentum`` → ``base_momentum``; phase 2 (to step T − 1): lr →
  ``max_lr/div/final_div``, momentum → ``max_momentum``; cosine annealing in
  both. Steps past T − 1 stay at the final values (PyTorch raises there).

  Args:
    max_lr: peak learning rate.
    total_steps: T, optimizer steps of the phase.
    pct_start: fraction of the cycle spent increasing the lr.
    div_factor: initial lr = max_lr / div_factor.
    final_div_factor: final lr = initial lr / final_div_factor.
    base_momentum: momentum at the lr peak.
    max_momentum: momentum at the start and the end.

  Returns:
    ``(lr_schedule, momentum_schedule)``.
  """
  initial = max_lr / div_factor
  final = initial / final_div_factor
  end1 = float(pct_start * total_steps) - 1.0
  end2 = float(total_steps - 1)

  def phase(step):
    t = jnp.minimum(jnp.asarray(step, jnp.float32), end2)
    first = t <= end1
    # PyTorch divides by (end − start) as given; guard only the degenerate
    # phase lengths it would divide by zero for.
    pct1 = t / max(end1, 1e-12)
    pct2 = (t - end1) / max(end2 - end1, 1e-12)
    return first, pct1, pct2

  def lr(step):
    first, p1, p2 = phase(step)
    return jnp.where(first, _cos_anneal(initial, max_lr, p1),
                     _cos_anneal(max_lr, final, p2))

  def momentum(step):
    first, p1, p2 = phase(step)
    return jnp.where(first, _cos_anneal(max_momentum, base_momentum, p1),
                     _cos_anneal(base_momentum, max_momentum, p2))

  return lr, momentum


def warmup_cosine(lr: float, total_steps: int,
                  warmup_fraction: float = 0.1) -> Schedule:
  """Linear warm-up from 0 over ``warmup_fraction`` of the steps, then cosine.

  Args:
    lr: peak learning rate.
    total_steps: T, optimizer steps of the phase.
    warmup_fraction: W = int(warmup_fraction · T) warm-up steps.

  Returns:
    ``schedule(step) -> lr``: ``lr·t/W`` for t < W, then ``lr·(1 + cos(π (t −
    W)/(T − W)))/2``.
  """
  w = int(warmup_fraction * total_steps)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = lr * t / max(w, 1)
    pct = jnp.clip((t - w) / max(total_steps - w, 1), 0.0, 1.0)
    return jnp.where(t < w, warm, lr * 0.5 * (1.0 + jnp.cos(jnp.pi * pct)))

  return schedule


def weights_mask(params: Any) -> Any:
  """True for conv/dense kernels and norm scales (PyTorch ``weight``s)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in WEIGHT_LEAVES, params)


class TraceState(NamedTuple):
  """Momentum buffer and update count of ``trace``."""
  count: jax.Array
  trace: Any


def trace(momentum: ScalarOrSchedule, nesterov: bool = False
          ) -> optax.GradientTransformation:
  """``optax.trace`` whose momentum may be a schedule of the step.

  ``b ← μ_t b + g``; the update is ``b`` (or ``g + μ_t b`` with Nesterov),
  as ``torch.optim.SGD`` with dampening 0 (its first step sets ``b = g``,
  which is the same as starting from ``b = 0``).

  Args:
    momentum: μ, a float or ``schedule(step)``.
    nesterov: Nesterov momentum.

  Returns:
    The gradient transformation.
  """

  def init_fn(params):
    return TraceState(jnp.zeros([], jnp.int32),
                      jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    mu = momentum(state.count) if callable(momentum) else momentum
    new_trace = jax.tree.map(lambda g, b: (mu * b + g).astype(b.dtype),
                             updates, state.trace)
    if nesterov:
      updates = jax.tree.map(lambda g, b: (g + mu * b).astype(g.dtype),
                             updates, new_trace)
    else:
      updates = new_trace
    return updates, TraceState(optax.safe_increment(state.count), new_trace)

  return optax.GradientTransformation(init_fn, update_fn)


def sgd_torch(learning_rate: ScalarOrSchedule,
              momentum: ScalarOrSchedule = 0.9,
              weight_decay: float = 0.0, nesterov: bool = False,
              wd_mask: Any = None) -> optax.GradientTransformation:
  """``torch.optim.SGD(lr, momentum, weight_decay, nesterov)``.

  Args:
    learning_rate: float or ``schedule(step)``.
    momentum: float or ``schedule(step)`` (one-cycle momentum cycling).
    weight_decay: coupled decay, added to the gradient before momentum.
    nesterov: Nesterov momentum.
    wd_mask: None (decay everything), or a pytree / ``params -> pytree`` of
      bools choosing the decayed leaves (e.g. ``weights_mask``).

  Returns:
    The optax transformation.
  """
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=wd_mask))
  parts.append(trace(momentum, nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.01,
          wd_mask: Any = None) -> optax.GradientTransformation:
  """``torch.optim.AdamW`` (eps outside the square root, decoupled decay).

  Args:
    learning_rate: float or ``schedule(step)``.
    b1: beta1.
    b2: beta2.
    eps: epsilon.
    weight_decay: decoupled decay coefficient (scaled by the lr).
    wd_mask: as in ``sgd_torch``.

  Returns:
    The optax transformation.
  """
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                     weight_decay=weight_decay, mask=wd_mask)


def make_schedules(optim: Mapping[str, Any], *, epochs: int,
                   steps_per_epoch: int, lr: float | None = None
                   ) -> tuple[Schedule, ScalarOrSchedule]:
  """The lr and momentum schedules an ``optim`` config section asks for.

  Args:
    optim: the ``config.optim`` section (or a dict with the same fields).
    epochs: epochs of the phase.
    steps_per_epoch: optimizer steps per epoch.
    lr: overrides ``optim['lr']`` (e.g. a method's per-stage lr).

  Returns:
    ``(lr_schedule, momentum)``; momentum is a schedule only for a one-cycle
    schedule with ``cycle_momentum``.
  """
  lr = optim["lr"] if lr is None else lr
  total = epochs * steps_per_epoch
  momentum = optim["momentum"]
  name = optim["schedule"]
  if name == "constant":
    return constant(lr), momentum
  if name == "dsp_step":
    return dsp_step(lr, epochs, steps_per_epoch, optim["warmup_epochs"],
                    optim["warmup_factor"]), momentum
  if name == "cosine_epoch":
    return cosine_epoch(lr, epochs, steps_per_epoch), momentum
  if name == "onecycle":
    lr_fn, mom_fn = onecycle(lr, total, optim["pct_start"],
                             optim["div_factor"], optim["final_div_factor"],
                             optim["base_momentum"], momentum)
    return lr_fn, (mom_fn if optim["cycle_momentum"] else momentum)
  if name == "warmup_cosine":
    return warmup_cosine(lr, total, optim["warmup_fraction"]), momentum
  raise ValueError(f"optim.schedule: unknown schedule {name!r}; valid: "
                   "constant, dsp_step, cosine_epoch, onecycle, warmup_cosine")


def make_optimizer(optim: Mapping[str, Any], *, epochs: int,
                   steps_per_epoch: int, lr: float | None = None,
                   weight_decay: float | None = None
                   ) -> tuple[optax.GradientTransformation, Schedule]:
  """The optimizer of an ``optim`` config section.

  Args:
    optim: the ``config.optim`` section.
    epochs: epochs of the phase.
    steps_per_epoch: optimizer steps per epoch.
    lr: overrides ``optim['lr']``.
    weight_decay: overrides ``optim['weight_decay']``.

  Returns:
    ``(tx, lr_schedule)``; ``lr_schedule(step)`` is for logging.
  """
  lr_fn, momentum = make_schedules(optim, epochs=epochs,
                                   steps_per_epoch=steps_per_epoch, lr=lr)
  wd = optim["weight_decay"] if weight_decay is None else weight_decay
  mask = weights_mask if optim["wd_mask"] == "weights" else None
  if optim["optimizer"] == "sgd":
    tx = sgd_torch(lr_fn, momentum, wd, optim["nesterov"], mask)
  elif optim["optimizer"] == "adamw":
    tx = adamw(lr_fn, optim["b1"], optim["b2"], optim["eps"], wd, mask)
  else:
    raise ValueError(f"optim.optimizer: unknown optimizer "
                     f"{optim['optimizer']!r}; valid: sgd, adamw")
  return tx, lr_fn

