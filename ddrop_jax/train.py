"""DDROP train steps: the DDROP phase and the masked fine-tuning phase.

:func:`ddrop_collections` is the hook a generic train step calls to switch
DDROP on: from the current params (and statistics) and the traced optimizer
step it builds the ``ddrop`` collection (keep probabilities) and the
``'ddrop'`` rng (``fold_in(rng, step)``). :func:`make_ddrop_train_step` is a
complete jit-able step around it for users with their own loop; chain the L1
into ``tx`` with ``optax.chain(ddrop_l1(layers, cfg), optimizer)``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from ddrop_jax.config import DdropConfig
from ddrop_jax.probs import init_stats, keep_probabilities
from ddrop_jax.pruning import apply_masks
from ddrop_jax.selection import DdropLayer

Array = jax.Array
LossFn = Callable[[Array, Array], Array]


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def needs_stats(cfg: DdropConfig) -> bool:
  """Whether the step must keep the ``ddrop_stats`` collection."""
  return cfg.criterion == "activation"


def ddrop_collections(params: Mapping[str, Any],
                      stats: Mapping[str, Any] | None, step: Array | int,
                      rng: Array, layers: Sequence[DdropLayer],
                      cfg: DdropConfig) -> tuple[dict[str, Any], dict[str, Array]]:
  """Extra variables and rngs that turn DDROP on for one training apply.

  Args:
    params: current params.
    stats: ``ddrop_stats`` (None unless the criterion is ``activation``).
    step: optimizer step of the DDROP phase (traced).
    rng: base key; the step's ``'ddrop'`` key is ``fold_in(rng, step)``.
    layers: the DDROP layers.
    cfg: DDROP config with ``total_steps`` resolved.

  Returns:
    ``(variables, rngs)``: merge ``variables`` into the apply variables
    (``ddrop``, plus ``ddrop_stats`` when given; make ``ddrop_stats`` mutable
    then) and ``rngs`` into the apply rngs.
  """
  extra = {"ddrop": keep_probabilities(params, stats, step, cfg, layers)}
  if stats is not None:
    extra["ddrop_stats"] = stats
  return extra, {"ddrop": jax.random.fold_in(rng, step)}


@flax.struct.dataclass
class DdropState:
  """Train state of a DDROP or fine-tuning phase.

  Attributes:
    step: optimizer step within the phase.
    params: params.
    batch_stats: BatchNorm statistics (empty dict for models without).
    opt_state: optimizer state.
    ddrop_stats: running |activation| per DDROP unit, or None.
    masks: pruning masks held fixed during fine-tuning, or None.
  """

  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ddrop_stats: Any = None
  masks: Any = None

  @classmethod
  def create(cls, variables: Mapping[str, Any],
             tx: optax.GradientTransformation,
             layers: Sequence[DdropLayer] | None = None,
             cfg: DdropConfig | None = None) -> DdropState:
    """A fresh phase state (step 0, new optimizer state).

    ``ddrop_stats`` starts at zeros when ``cfg`` uses the ``activation``
    criterion (and ``variables`` has none); ``masks`` are taken from
    ``variables`` when present (fine-tuning after :func:`prune`).
    """
    stats = variables.get("ddrop_stats")
    if stats is None and cfg is not None and needs_stats(cfg):
      stats = init_stats(layers)
    return cls(step=jnp.zeros([], jnp.int32), params=variables["params"],
               batch_stats=variables.get("batch_stats", {}),
               opt_state=tx.init(variables["params"]), ddrop_stats=stats,
               masks=variables.get("masks"))


def make_ddrop_train_step(model: flax.linen.Module,
                          tx: optax.GradientTransformation,
                          layers: Sequence[DdropLayer] | None,
                          cfg: DdropConfig | None, *,
                          loss_fn: LossFn = cross_entropy,
                          ) -> Callable[[DdropState, Mapping[str, Array], Array],
                                        tuple[DdropState, dict[str, Array]]]:
  """A jit-able ``step(state, batch, rng) -> (state, metrics)``.

  Args:
    model: the Flax model, called as ``model.apply(vars, x, train=True)``.
    tx: optimizer (with the L1 chained in for the DDROP phase).
    layers: the DDROP layers; None (with ``cfg`` None) for fine-tuning:
      no ``ddrop`` collection, so nothing is dropped.
    cfg: DDROP config with ``total_steps`` resolved, or None.
    loss_fn: ``loss_fn(logits, labels) -> scalar``.

  Returns:
    The step. ``batch`` has ``image`` (NHWC) and ``label`` (int). When
    ``state.masks`` is set the masks are applied in the forward pass and
    re-applied to the params after the update.
  """
  if (layers is None) != (cfg is None):
    raise ValueError("pass both layers and cfg (DDROP phase) or neither "
                     "(fine-tuning)")
  if cfg is not None and cfg.total_steps is None:
    raise ValueError("cfg.total_steps is None: resolve it with "
                     "cfg.with_phase_steps(phase_steps)")

  def step(state: DdropState, batch: Mapping[str, Array], rng: Array):
    def loss(params):
      variables = {"params": params}
      mutable = []
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
        mutable.append("batch_stats")
      if state.masks is not None:
        variables["masks"] = state.masks
      rngs = {}
      if cfg is not None:
        extra, rngs = ddrop_collections(params, state.ddrop_stats, state.step,
                                        rng, layers, cfg)
        variables.update(extra)
        if state.ddrop_stats is not None:
          mutable.append("ddrop_stats")
      logits, updates = model.apply(variables, batch["image"], train=True,
                                    mutable=mutable, rngs=rngs)
      return loss_fn(logits, batch["label"]), (logits, updates)

    (value, (logits, new)), grads = jax.value_and_grad(loss, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if state.masks is not None:
      params = apply_masks(params, state.masks)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        batch_stats=new.get("batch_stats", state.batch_stats),
        ddrop_stats=new.get("ddrop_stats", state.ddrop_stats))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return new_state, {"loss": value, "accuracy": accuracy}

  return step
