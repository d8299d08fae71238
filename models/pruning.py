"""Pruning state for any Flax model, without changing the model (``prunable``).

``prunable(model)`` wraps a Linen module so that the pruning collections,
kept at the modules' own paths, are honoured:

* ``masks``   0/1 masks of kernels and norms. A conv or dense kernel mask
  has shape ``(in_features / groups, out_features)`` and is broadcast over
  the spatial kernel; a norm mask ``(features,)`` multiplies scale and bias.
  A bias entry is masked with its output unit. ``apply`` multiplies the
  params by them before the model runs (``apply_masks``), so gradients of
  masked entries are zero, exactly as if the layers masked their kernels.
* ``gates``   DSP group logits ``(groups, out_features)`` of the taking-part
  layers; created by ``init`` when ``groups`` is given; they feed DSP's
  regulariser only, never the forward pass.
* ``ddrop``   DDROP keep probabilities ``{'keep': (C,)}`` at a module's path:
  in training, that module's output is multiplied by one Bernoulli draw per
  sample and unit from the ``'ddrop'`` rng (no 1/keep rescaling); identity
  at evaluation. A module whose params hold a ``ddrop_scale`` (a unit scale
  DDROP adds where no norm follows a layer) has its output multiplied by it.
* ``ddrop_stats``  running mean of |output| per unit of those modules, kept
  when the collection is passed as mutable (DDROP's activation criterion).

The dropping acts through ``flax.linen.intercept_methods`` on each module's
``__call__`` output at trace time; the jitted computation is the model's own
plus these multiplies. Registry models (``models.create_model``) come
wrapped. A plain model's own ``apply`` ignores these collections: pass it
through ``prunable`` (every library function that takes a model does so).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models import paths
from models.graph import core as graph_lib

Array = jax.Array

MASKS = "masks"
GATES = "gates"
DDROP = "ddrop"
DDROP_STATS = "ddrop_stats"
DDROP_SCALE = "ddrop_scale"
COLLECTIONS = (MASKS, GATES, DDROP, DDROP_STATS)


class Prunable(nn.Module):
  """``model`` with the pruning collections honoured (module docstring).

  Attributes:
    model: the wrapped Linen module (list attributes made tuples).
    groups: DSP group count: ``init`` creates ``gates`` (zeros, as the
      reference) for the taking-part layers; None creates none.

  ``init`` and ``apply`` take the model's arguments; ``train`` (default
  False) is passed on only when the model's ``__call__`` takes it.
  """

  model: nn.Module
  groups: int | None = None

  @property
  def plain_model(self) -> nn.Module:
    """The wrapped model (what the graph traces)."""
    return self.model

  def __getattr__(self, name: str) -> Any:
    # The wrapped model's attributes (``image_size``, ``num_classes``) read
    # through the wrapper, so that it stands in for the model.
    try:
      return super().__getattr__(name)
    except AttributeError:
      model = self.__dict__.get("model")
      if model is None or name.startswith("_"):
        raise
      return getattr(model, name)

  @nn.nowrap
  def clone(self, *, parent: Any = None, _deep_clone: bool = False,
            _reset_names: bool = False, **updates: Any) -> Prunable:
    """A copy; updates of the wrapped model's attributes go to the model."""
    own = {k: updates.pop(k) for k in ("model", "groups") if k in updates}
    if updates:
      own["model"] = graph_lib.hashable(
          own.get("model", self.model).clone(**updates))
    return super().clone(parent=parent, _deep_clone=_deep_clone,
                         _reset_names=_reset_names, **own)

  @nn.nowrap
  def graph(self, x_shape: Sequence[int]) -> graph_lib.Graph:
    """The traced graph at one NHWC input shape ``(N, H, W, C)``."""
    return graph_lib.analyze(self.model, tuple(x_shape[1:3]),
                             int(x_shape[3]))

  @nn.nowrap
  def init(self, rngs: Any, x: Array, *args: Any, train: bool = False,
           **kwargs: Any) -> dict[str, Any]:
    """The model's variables plus all-ones ``masks`` (and ``gates``)."""
    variables = dict(self.model.init(
        rngs, x, *args, **graph_lib.train_kwargs(self.model, train),
        **kwargs))
    g = self.graph(x.shape)
    params = variables["params"]
    variables[MASKS] = full_masks(g, params)
    if self.groups is not None:
      variables[GATES] = zero_gates(g, self.groups, params)
    return variables

  @nn.nowrap
  def apply(self, variables: Mapping[str, Any], x: Array, *args: Any,
            train: bool = False, rngs: Any = None, mutable: Any = False,
            **kwargs: Any) -> Any:
    """Runs the model with masks applied and DDROP's dropping in training."""
    own = {k: v for k, v in variables.items() if k not in (MASKS, GATES)}
    masks = variables.get(MASKS)
    if masks:
      own["params"] = apply_masks(own["params"], masks)
    call = lambda: self.model.apply(  # pylint: disable=g-long-lambda
        own, x, *args, **graph_lib.train_kwargs(self.model, train),
        rngs=rngs, mutable=mutable, **kwargs)
    if not (variables.get(DDROP) or _has_scales(own["params"])):
      return call()
    with nn.intercept_methods(_unit_hook(train)):
      return call()


def prunable(model: nn.Module, groups: int | None = None) -> Prunable:
  """``model`` wrapped so that it honours the pruning collections.

  Idempotent: a wrapped model is returned as it is (or re-wrapped with the
  new ``groups``).

  Args:
    model: any Flax Linen module (called on NHWC images).
    groups: DSP group count (``init`` creates the gates).

  Returns:
    The ``Prunable`` module.
  """
  if isinstance(model, Prunable):
    if groups is None or groups == model.groups:
      return model
    model = model.model
  if groups is not None and (not isinstance(groups, int) or groups < 1):
    raise ValueError(f"groups must be an integer >= 1 (or None), got "
                     f"{groups!r}")
  return Prunable(graph_lib.hashable(model), groups)


def unwrap(model: nn.Module) -> nn.Module:
  """The plain model of a ``Prunable`` (the model itself otherwise)."""
  return model.model if isinstance(model, Prunable) else model


def _has_scales(params: Mapping[str, Any]) -> bool:
  return any(p[-1] == DDROP_SCALE for p, _ in paths.leaves(params))


def _unit_hook(train: bool):
  """Interceptor: DDROP's unit scale, statistics and dropping on module
  outputs that carry them."""

  def hook(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not isinstance(y, jax.Array):
      return y
    module = context.module
    if module.has_variable("params", DDROP_SCALE):
      y = y * module.get_variable("params", DDROP_SCALE).astype(y.dtype)
    if module.has_variable(DDROP, "keep"):
      y = unit_dropout(module, y, train)
    return y

  return hook


def unit_dropout(module: nn.Module, y: Array, train: bool) -> Array:
  """DDROP: multiply units (last axis) by Bernoulli(keep).

  One draw per sample and unit from the module's ``'ddrop'`` rng, broadcast
  over every axis between the batch and the unit axis (spatial positions,
  tokens). Identity at evaluation. With ``ddrop_stats`` mutable, the running
  mean of |y| per unit (momentum 0.1) is kept first.
  """
  if module.is_mutable_collection(DDROP_STATS) and train:
    stat = module.variable(DDROP_STATS, "abs_mean", jnp.zeros, (y.shape[-1],),
                           y.dtype)
    batch_mean = jnp.mean(jnp.abs(y), axis=tuple(range(y.ndim - 1)))
    stat.value = 0.9 * stat.value + 0.1 * jax.lax.stop_gradient(batch_mean)
  if not train:
    return y
  keep = jax.lax.stop_gradient(module.get_variable(DDROP, "keep"))
  shape = (y.shape[0],) + (1,) * (y.ndim - 2) + (y.shape[-1],)
  draw = jax.random.bernoulli(module.make_rng(DDROP), keep, shape)
  return y * draw.astype(y.dtype)


# ------------------------------------------------------------------ masks
def apply_masks(params: Any, masks: Any) -> Any:
  """``params ⊙ masks``, the masks' forward semantics (module docstring).

  A 2-D mask ``(in / groups, out)`` multiplies its kernel (broadcast over the
  spatial axes) and the module's ``bias`` by whether its output unit keeps
  any input; a 1-D mask ``(C,)`` multiplies its leaf (a norm's ``scale``)
  and the module's ``bias``. Parameters without a mask pass through.

  Args:
    params: the ``params`` collection.
    masks: the ``masks`` collection (same module paths), possibly ``{}``.

  Returns:
    The masked params (a new pytree).

  Raises:
    KeyError: a mask with no parameter to mask.
  """
  if not masks:
    return params
  flat = paths.flatten(params)
  for path, mask in paths.flatten(masks).items():
    module = path[:-1]
    if path not in flat:
      raise KeyError(f"mask {'/'.join(path)} has no parameter to mask")
    p = flat[path]
    bias = module + ("bias",)
    if np.ndim(mask) == 2:
      m = jnp.reshape(mask, (1,) * (p.ndim - 2) + tuple(np.shape(mask)))
      flat[path] = p * m.astype(p.dtype)
      if bias in flat and bias != path:
        flat[bias] = flat[bias] * jnp.max(mask, axis=0).astype(
            flat[bias].dtype)
    elif np.ndim(mask) == 1:
      flat[path] = p * jnp.asarray(mask).astype(p.dtype)
      if bias in flat and bias != path:
        flat[bias] = flat[bias] * jnp.asarray(mask).astype(flat[bias].dtype)
    else:
      raise KeyError(f"mask {'/'.join(path)} has shape {np.shape(mask)}; "
                     "masks are (in, out) for kernels or (C,) for norms")
  return paths.unflatten(flat)


def mask_shape(layer: graph_lib.LayerInfo) -> tuple[int, ...]:
  """Shape of a layer's mask: ``(in / groups, out)`` or ``(C,)``."""
  if layer.kind == "norm":
    return (layer.out_features,)
  return (layer.in_features // layer.feature_groups, layer.out_features)


def full_masks(graph: graph_lib.Graph, params: Mapping[str, Any]
               ) -> dict[str, Any]:
  """All-ones ``masks`` for every conv/dense kernel and every norm scale.

  Args:
    graph: the model's graph.
    params: the ``params`` collection (dtypes; abstract leaves are fine).

  Returns:
    The ``masks`` collection (numpy arrays of the parameters' dtypes).
  """
  flat = {}
  for l in graph.layers.values():
    leaf = paths.get(params, l.kernel_path[1:])
    if leaf is None:
      continue
    flat[l.kernel_path[1:]] = np.ones(mask_shape(l), np.dtype(leaf.dtype))
  return paths.unflatten(flat)


def check_groups(graph: graph_lib.Graph, groups: int) -> None:
  """Raises a one-line error when ``groups`` exceeds a taking-part layer's
  filters (naming the layer) or nothing takes part."""
  if not graph.taking_part:
    raise ValueError(no_taking_part(graph))
  for l in graph.taking_part:
    if not 1 <= groups <= l.out_features:
      raise ValueError(
          f"{l.name}: groups must be in [1, {l.out_features}] (the layer has "
          f"{l.out_features} filters), got {groups}")


def no_taking_part(graph: graph_lib.Graph) -> str:
  """Why a model has no DSP taking-part layer."""
  convs = [l for l in graph.convs]
  if convs and all(l.stem or l.depthwise or l.feature_groups > 1
                   or l.shortcut for l in convs) and not any(
                       l.kind == "dense" and l.in_rank >= 3
                       for l in graph.producers):
    why = ("every conv is depthwise, grouped, a stem or a shortcut conv and "
           "no dense layer is applied per position")
  elif not convs:
    why = ("it has no conv and no dense layer applied per position (a "
           "classifier never takes part)")
  else:
    why = ("no conv or per-position dense layer outside the stem and the "
           "shortcuts has channels the graph can follow")
  return f"the model has no layer that takes part in DSP: {why}"


def zero_gates(graph: graph_lib.Graph, groups: int,
               params: Mapping[str, Any]) -> dict[str, Any]:
  """DSP group logits ``(groups, out)`` (zeros) for the taking-part layers."""
  check_groups(graph, groups)
  flat = {}
  for l in graph.taking_part:
    dtype = paths.get(params, l.kernel_path[1:]).dtype
    flat[l.path + ("logits",)] = jnp.zeros((groups, l.out_features), dtype)
  return paths.unflatten(flat)


def count(x: Any) -> int:
  """Elements of a pytree."""
  return int(sum(math.prod(np.shape(v)) for v in jax.tree.leaves(x)))
