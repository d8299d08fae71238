"""Jitted data-parallel train and eval steps.

``make_train_step`` returns ``step_fn(state, batch) -> (state, metrics)``,
one ``jax.jit`` over the ``data`` mesh: the state is replicated and donated,
the batch (global arrays from ``mesh.global_batch``) is sharded on ``data``.
BatchNorm therefore normalises with statistics of the whole global batch,
as on one device. Augmentation and normalisation run inside the step, with
``fold_in(state.rng, state.step)`` as the step's key, so a run's randomness
depends on nothing but the seed and the step.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import models
from training import finite
from training import mesh as mesh_lib
from training.state import TrainState

StepFn = Callable[[TrainState, Mapping[str, jax.Array]],
                  tuple[TrainState, dict[str, jax.Array]]]
# ``variables_fn(state, params) -> (variables, mutable)``: extra model
# variables for the forward pass (e.g. DDROP keep probabilities) and the
# names of collections among them the model updates (written back to
# ``state.extra[name]``).
VariablesFn = Callable[[TrainState, Any], tuple[dict[str, Any], list[str]]]
# Named rngs a model may ask for ('ddrop' for DDROP unit dropout, 'gumbel'
# for DSP, 'dropout' for nn.Dropout); each gets its own stream.
RNG_NAMES = ("dropout", "ddrop", "gumbel")


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  weights: jax.Array | None = None) -> jax.Array:
  """Per-example softmax cross-entropy (``torch.nn.CrossEntropyLoss``)."""
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  return loss if weights is None else loss * weights


def preprocess(rng: jax.Array | None, images: jax.Array, info: Any,
               dtype: Any = jnp.float32) -> jax.Array:
  """uint8 NHWC images -> normalised float images (augmented when rng).

  Args:
    rng: augmentation key (random crop with ``info.crop_pad`` pixels of
      zero padding, 4 when it has none, + horizontal flip where
      ``info.hflip``), or None for evaluation.
    images: uint8 [B, H, W, C].
    info: the dataset's ``DatasetInfo`` (``mean``, ``std``).
    dtype: output dtype.

  Returns:
    Float images of ``dtype``.
  """
  from training import augment  # Lazily: only steps need it.
  # Encoded datasets were cropped and augmented by the host transforms.
  if rng is not None and not getattr(info, "encoded", False):
    images = augment.cifar_augment(rng, images,
                                   getattr(info, "crop_pad", 4),
                                   flip=info.hflip)
  return augment.normalize(images, info.mean, info.std, dtype=dtype)


def model_rngs(rng: jax.Array) -> dict[str, jax.Array]:
  """One independent key per named rng stream of the model."""
  return {name: jax.random.fold_in(rng, i) for i, name in enumerate(RNG_NAMES)}


def _cast(tree: Any, dtype: Any) -> Any:
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    info: Any, mesh: jax.sharding.Mesh, *,
                    lr_schedule: Callable[[jax.Array], jax.Array] | None = None,
                    augment: bool = True, dtype: Any = jnp.float32,
                    variables_fn: VariablesFn | None = None,
                    mix: Any = None, label_smoothing: float = 0.0) -> StepFn:
  """The plain supervised training step, jitted over ``mesh``.

  Args:
    model: the Flax module.
    tx: params optimizer.
    info: the dataset's ``DatasetInfo`` (normalisation statistics).
    mesh: the ``data`` mesh.
    lr_schedule: reported as ``metrics['lr']`` when given.
    augment: random crop + flip.
    dtype: compute dtype (params and inputs are cast; master params, optimizer
      state and BN statistics stay float32).
    variables_fn: method hook ``(state, params) -> (variables, mutable)``:
      extra collections merged into the apply variables (DDROP's ``ddrop``
      keep probabilities) and names of extra mutable collections, whose
      updated values are stored in ``state.extra`` under their names.
    mix: a ``training.mix.MixConfig``: CutMix/MixUp of the batch from the
      step's key (None or ``prob`` 0: off).
    label_smoothing: smoothing of the one-hot targets. With ``mix`` or
      smoothing the loss is the soft-target cross-entropy.

  Returns:
    ``step_fn(state, batch) -> (state, metrics)`` with ``batch`` =
    ``{'image': uint8 [B,H,W,C], 'label': int32 [B]}`` global arrays and
    metrics ``loss``, ``accuracy`` (batch means), ``lr`` and
    ``training.finite.KEY`` (whether the new state is finite). The state
    argument is donated.
  """

  soft = label_smoothing > 0 or (mix is not None and mix.prob > 0)
  model = models.prunable(model)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    aug_rng, model_rng = jax.random.split(rng)
    x = preprocess(aug_rng if augment else None, batch["image"], info, dtype)
    targets = None
    if soft:
      from training import mix as mix_lib  # Lazily: only steps need it.
      targets = mix_lib.soft_targets(batch["label"], info.num_classes,
                                     label_smoothing)
      if mix is not None and augment:
        x, targets = mix_lib.mix_batch(jax.random.fold_in(aug_rng, 1), x,
                                       targets, mix)

    def loss_fn(params):
      variables = state.variables()
      variables["params"] = _cast(params, dtype)
      extra_vars, extra_mutable = ({}, []) if variables_fn is None else (
          variables_fn(state, params))
      variables.update(extra_vars)
      logits, updates = model.apply(variables, x, train=True,
                                    mutable=["batch_stats", *extra_mutable],
                                    rngs=model_rngs(model_rng))
      loss = jnp.mean(cross_entropy(logits, batch["label"]) if targets is None
                      else optax.softmax_cross_entropy(
                          logits.astype(jnp.float32), targets))
      extra = {k: updates[k] for k in extra_mutable}
      # A model without BatchNorm (a transformer) has no statistics.
      return loss, (logits, updates.get("batch_stats", state.batch_stats),
                    extra)

    (loss, (logits, batch_stats, extra)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = models.apply_masks(optax.apply_updates(state.params, updates),
                                state.masks)
    batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype),
                               batch_stats, state.batch_stats)
    metrics = {"loss": loss,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state,
                              extra={**state.extra, **extra} if extra
                              else state.extra)
    metrics[finite.KEY] = finite.all_finite(new_state)
    return new_state, metrics

  rep = mesh_lib.replicated(mesh)
  return jax.jit(step, in_shardings=(rep, mesh_lib.data_sharding(mesh)),
                 out_shardings=(rep, rep), donate_argnums=0)


def make_eval_step(model: nn.Module, info: Any, mesh: jax.sharding.Mesh, *,
                   dtype: Any = jnp.float32
                   ) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                 dict[str, jax.Array]]:
  """Eval step: sums of loss and correct predictions over unmasked examples.

  Args:
    model: the Flax module.
    info: the dataset's ``DatasetInfo``.
    mesh: the ``data`` mesh.
    dtype: compute dtype.

  Returns:
    ``eval_fn(state, batch) -> {'loss_sum', 'correct', 'count'}`` with
    ``batch`` = ``{'image', 'label', 'mask'}`` global arrays.
  """

  model = models.prunable(model)

  def step(state: TrainState, batch):
    x = preprocess(None, batch["image"], info, dtype)
    variables = state.variables()
    variables["params"] = _cast(state.params, dtype)
    logits = model.apply(variables, x, train=False)
    w = batch["mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(cross_entropy(logits, batch["label"], w)),
            "correct": jnp.sum(correct * w), "count": jnp.sum(w)}

  rep = mesh_lib.replicated(mesh)
  return jax.jit(step, in_shardings=(rep, mesh_lib.data_sharding(mesh)),
                 out_shardings=rep)


def pad_batch(batch: Mapping[str, np.ndarray], multiple: int
              ) -> dict[str, np.ndarray]:
  """Pads a local batch to a multiple of ``multiple`` rows (mask False)."""
  n = len(batch["label"])
  pad = -n % multiple
  out = {k: np.asarray(v) for k, v in batch.items()}
  if "mask" not in out:
    out["mask"] = np.ones((n,), bool)
  if pad:
    out = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
           for k, v in out.items()}
  return out


def evaluate(eval_fn: Callable[..., dict[str, jax.Array]], state: TrainState,
             batches: Iterable[Mapping[str, np.ndarray]],
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Accuracy and mean loss over every unmasked example of ``batches``.

  Args:
    eval_fn: from ``make_eval_step`` (or any function with its contract).
    state: the train state.
    batches: local batches ``{'image', 'label', 'mask'}``; each is padded to
      a multiple of the local device count.
    mesh: the ``data`` mesh.

  Returns:
    ``{'accuracy', 'loss', 'count'}``.
  """
  local = mesh.local_mesh.devices.size
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for batch in batches:
    out = eval_fn(state, mesh_lib.global_batch(pad_batch(batch, local), mesh))
    # Summed on the host in float64 so that the count stays exact.
    for k, v in jax.device_get(out).items():
      totals[k] += float(v)
  count = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / count,
          "loss": totals["loss_sum"] / count, "count": int(totals["count"])}
