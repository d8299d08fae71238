"""One DSP group-learning step (spec §2.3, steps 1-13) as one jittable function.

The state is a pytree; nothing lives in Python attributes. The step costs two
forward/backward passes of the network (the main step and the look-ahead
step on the same batch); everything else is elementwise work on the
taking-part kernels.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

import models
from dsp_jax import gates as gates_lib
from dsp_jax import kernels as kernels_lib
from dsp_jax import regularizer as reg
from training import finite

Array = jax.Array
PyTree = Any
Schedule = Callable[[Array], Array]


@flax.struct.dataclass
class GroupState:
  """Everything that changes during group learning.

  Attributes:
    step: 0-based step t.
    params: model parameters θ.
    batch_stats: BatchNorm running statistics.
    gates: group logits, layout of the ``gates`` collection.
    opt_state: SGD state (momentum buffer) of ``sgd_direction``.
    gate_opt_state: Adam state of the logits.
    rng: base key; step t draws Gumbel noise from ``fold_in(rng, t)``.
  """

  step: Array
  params: PyTree
  batch_stats: PyTree
  gates: PyTree
  opt_state: optax.OptState
  gate_opt_state: optax.OptState
  rng: Array


def sgd_direction(momentum: float = 0.9,
                  weight_decay: float = 1e-3) -> optax.GradientTransformation:
  """``torch.optim.SGD``'s direction: coupled weight decay, then momentum.

  The learning rate is applied by the caller, so that the look-ahead step
  can reuse the same rate with a copy of the momentum.
  """
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.trace(decay=momentum))


def gate_optimizer(gate_lr: float = 1e-3) -> optax.GradientTransformation:
  """The logits' own Adam (betas 0.9, 0.999, eps 1e-12)."""
  return optax.adam(gate_lr, b1=0.9, b2=0.999, eps=1e-12)


def init_group_state(variables: PyTree, gates: PyTree | None = None, *,
                     rng: Array, momentum: float = 0.9,
                     weight_decay: float = 1e-3,
                     gate_lr: float = 1e-3) -> GroupState:
  """The initial state.

  Args:
    variables: model variables with ``params`` and ``batch_stats`` (and
      ``gates`` unless given).
    gates: group logits; defaults to ``variables['gates']``.
    rng: base key of the Gumbel noise.
    momentum: SGD momentum.
    weight_decay: coupled weight decay.
    gate_lr: Adam learning rate of the logits.

  Returns:
    The state at step 0.
  """
  gates = variables["gates"] if gates is None else gates
  params = variables["params"]
  return GroupState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}), gates=gates,
      opt_state=sgd_direction(momentum, weight_decay).init(params),
      gate_opt_state=gate_optimizer(gate_lr).init(gates), rng=rng)


GATE_OPT_KEY = "gate_opt_state"


def _gate_opt_state(state: Any) -> optax.OptState:
  """The logits' Adam state of a ``GroupState`` or of a state with ``extra``."""
  if hasattr(state, "gate_opt_state"):
    return state.gate_opt_state
  return state.extra[GATE_OPT_KEY]


def _with_gate_opt_state(state: Any, gate_opt_state: optax.OptState) -> Any:
  if hasattr(state, "gate_opt_state"):
    return state.replace(gate_opt_state=gate_opt_state)
  return state.replace(extra={**state.extra, GATE_OPT_KEY: gate_opt_state})


def _flat_logits(gates: PyTree, info: kernels_lib.Graph) -> dict:
  return {c.path: kernels_lib.logits(gates, c) for c in info.taking_part}


def make_group_step(
    model: nn.Module, *, groups: int, lam: float,
    lr_schedule: Schedule, total_steps: int, temperature: float = 0.5,
    q: float = 0.5, momentum: float = 0.9, weight_decay: float = 1e-3,
    gate_lr: float = 1e-3, layer_info: kernels_lib.Graph | None = None,
    augment_fn: Callable[[Array, Array], Array] | None = None,
    exact: bool = False, jit: bool = True, donate: bool = False,
    direction: optax.GradientTransformation | None = None,
) -> Callable[..., tuple[GroupState, dict]]:
  """Builds ``step(state, batch, noise=None) -> (state, metrics)``.

  Args:
    model: any Flax model (plain or ``models.prunable``-wrapped; its gates
      live in the state).
    groups: G.
    lam: λ (``-r`` of the reference).
    lr_schedule: SGD learning rate as a function of the step.
    total_steps: T, total steps of the phase.
    temperature: τ.
    q: quasi-norm order.
    momentum: SGD momentum.
    weight_decay: coupled weight decay.
    gate_lr: Adam learning rate of the logits.
    layer_info: the model's graph (``dsp_jax.analyze``); derived from the
      batch's image shape at trace time when omitted.
    augment_fn: optional ``augment_fn(key, images) -> images``; the same
      augmented batch feeds both passes.
    exact: compute the step-7/9 group gradient by autodiff instead of the
      reference's hand-derived formula.
    jit: return the step jitted.
    donate: when jitted, donate the input state's buffers.
    direction: the SGD direction without the learning rate (the state's
      ``opt_state`` must come from it); default ``sgd_direction(momentum,
      weight_decay)``. The step scales it by ``-lr_schedule(t)`` itself so
      that the look-ahead step reuses the same rate.

  Returns:
    The step function. ``batch`` is ``{'image': (B, H, W, C), 'label': (B,)}``;
    ``noise`` is an optional Gumbel tree shaped like ``state.gates``. The
    state is a ``GroupState``, or any state pytree with the fields ``step,
    params, batch_stats, gates, opt_state, rng`` (``opt_state`` from
    ``sgd_direction``), an ``extra`` dict holding the logits' Adam state under
    ``'gate_opt_state'`` and optionally ``masks`` (``training.state``'s
    ``TrainState``).
  """
  tx = direction or sgd_direction(momentum, weight_decay)
  gate_tx = gate_optimizer(gate_lr)
  model = models.prunable(model)

  def loss_and_grads(params, batch_stats, others, images, labels, rng):
    def loss_fn(p):
      # ``rng`` feeds nn.Dropout (VGG's classifier); each pass samples its
      # own mask, as the reference's two forward passes do.
      logits, new_vars = model.apply(
          {"params": p, "batch_stats": batch_stats, **others}, images,
          train=True, mutable=["batch_stats"], rngs={"dropout": rng})
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
      # A model without BatchNorm (a ViT) has no statistics to update.
      return loss, (logits, new_vars.get("batch_stats", batch_stats))
    (loss, (logits, new_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    return loss, logits, new_stats, grads

  def sgd(params, grads, opt_state, lr):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p - lr.astype(p.dtype) * u, params,
                          updates)
    return params, opt_state

  def step(state: GroupState, batch: dict, noise: PyTree | None = None):
    images, labels = batch["image"], batch["label"]
    gates_lib.check_groups(state.gates, groups)
    t = state.step
    key = jax.random.fold_in(state.rng, t)
    if noise is None:
      noise = gates_lib.gumbel_noise(jax.random.fold_in(key, 0), state.gates)
    if augment_fn is not None:
      images = augment_fn(jax.random.fold_in(key, 1), images)
    info = layer_info or kernels_lib.analyze(model, images.shape[1:])
    others = {"gates": state.gates}
    if getattr(state, "masks", None):
      others["masks"] = state.masks
    dtype = jax.tree.leaves(state.params)[0].dtype
    lr = jnp.asarray(lr_schedule(t), dtype)
    rho = lam * lr * (t + 1).astype(dtype) / total_steps
    scales = {c.path: reg.layer_scale(c, groups) for c in info.taking_part}

    # 1. Soft assignments.
    logits_in = _flat_logits(state.gates, info)
    noise_in = _flat_logits(noise, info)
    P = {k: gates_lib.soft_assignment(a, noise_in[k], temperature)
         for k, a in logits_in.items()}

    # 2. Main step.
    loss, out, stats1, grads = loss_and_grads(
        state.params, state.batch_stats, others, images, labels,
        jax.random.fold_in(key, 2))
    params1, opt_state = sgd(state.params, grads, state.opt_state, lr)

    # 3-5. Terms at θ, then the penalised θ (W_ck).
    kernel = kernels_lib.kernel  # HWIO view (a dense kernel as a 1x1 conv)
    terms = {c.path: reg.group_terms(kernel(params1, c), P[c.path], q)
             for c in info.taking_part}
    params_ck = params1
    for c in info.taking_part:
      w = kernel(params1, c) - rho * reg.penalty(terms[c.path], scales[c.path])
      params_ck = kernels_lib.with_kernel(params_ck, c, w)

    # 6. Look-ahead step on the same batch with a copy of the momentum.
    _, _, _, grads2 = loss_and_grads(params_ck, stats1, others, images,
                                     labels, jax.random.fold_in(key, 3))
    params2, _ = sgd(params_ck, grads2, opt_state, lr)

    # 7-9. Group gradient at the look-ahead weights.
    gamma = {}
    for c in info.taking_part:
      w2 = kernel(params2, c)
      terms2 = reg.group_terms(w2, P[c.path], q)
      w3 = w2 - rho * reg.penalty(terms2, scales[c.path])
      delta = w3 - kernel(params_ck, c)
      if exact:
        gamma[c.path] = reg.exact_group_gradient(
            kernel(params1, c), w2, delta, P[c.path], q)
      else:
        gamma[c.path] = (reg.group_gradient(terms2)
                         + reg.second_order(terms[c.path], delta))

    # 10. θ and BN statistics stay at params1 / stats1.
    # 11. Adam on the logits through the softmax with the same noise.
    def gate_objective(gates):
      a = _flat_logits(gates, info)
      return sum(jnp.sum(gates_lib.soft_assignment(a[k], noise_in[k],
                                                   temperature)
                         * jax.lax.stop_gradient(gamma[k]))
                 for k in a)
    gate_grads = jax.grad(gate_objective)(state.gates)
    gate_updates, gate_opt_state = gate_tx.update(
        gate_grads, _gate_opt_state(state), state.gates)
    new_gates = optax.apply_updates(state.gates, gate_updates)

    # 12. Hard penalty with H from the updated logits.
    H = {k: gates_lib.hard_assignment(a)
         for k, a in _flat_logits(new_gates, info).items()}
    params_out = reg.penalise(params1, H, rho, info, groups, q)

    new_state = _with_gate_opt_state(state.replace(
        step=t + 1, params=params_out, batch_stats=stats1, gates=new_gates,
        opt_state=opt_state), gate_opt_state)
    metrics = {"loss": loss,
               "accuracy": jnp.mean(jnp.argmax(out, -1) == labels),
               "lr": lr, "rho": rho, finite.KEY: finite.all_finite(new_state)}
    return new_state, metrics

  if not jit:
    return step
  return jax.jit(step, donate_argnums=(0,) if donate else ())
