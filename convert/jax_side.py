"""The DSP CifarResNet's packed plans from Flax variables and back.

(The project's own files of variables are ``training.artifacts``.)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

import models
from models import paths
from convert import packing, tables
from training import artifacts

FAMILY = "cifar_resnet"


# ------------------------------------------------------- models and templates
def cifar_resnet_for(depth: int, widths: tuple[int, ...], num_classes: int,
                     groups: int | None = None) -> tuple[str, dict[str, Any]]:
  """Registry name and overrides that build a CifarResNet of this shape."""
  name = f"cifar_resnet{depth}"
  if name not in models.list_models() or models.model_spec(
      name).family != FAMILY:
    raise ValueError(f"no registered CIFAR ResNet of depth {depth}; valid: "
                     + ", ".join(n for n in models.list_models()
                                 if models.model_spec(n).family == FAMILY))
  overrides: dict[str, Any] = {"widths": tuple(int(w) for w in widths)}
  if groups is not None:
    overrides["groups"] = int(groups)
  return name, overrides


# --------------------------------------------------------- plan <-> variables
def conv_masks_oi(variables: Mapping[str, Any], names: list[str]
                  ) -> dict[str, np.ndarray]:
  """``{conv_name: (O, I)}`` masks (ones where the variables have none)."""
  out = {}
  for name in names:
    path = tuple(name.split("."))
    m = paths.get(variables.get(tables.MASKS, {}), path + ("kernel",))
    if m is None:
      k = paths.get(variables[tables.PARAMS], path + ("kernel",))
      m = np.ones(k.shape[2:], np.asarray(k).dtype)
    out[name] = tables.transpose2d(np.asarray(m))
  return out


def plan_from_variables(variables: Mapping[str, Any],
                        num_batches_tracked: Mapping[str, int] | None = None,
                        ) -> packing.PackedResNet:
  """Packs a masked Flax CifarResNet.

  Args:
    variables: ``params``, ``batch_stats`` and (optionally) ``masks``.
    num_batches_tracked: counters to write for the copied BatchNorms (stem,
      shortcuts); 0 where absent.

  Returns:
    The packed plan.
  """
  params = variables[tables.PARAMS]
  for need in ("conv_1_3x3", "bn_1", "stage_1", "classifier"):
    if need not in params:
      raise ValueError(
          f"expected CifarResNet variables (conv_1_3x3, bn_1, stage_1.., "
          f"classifier), found params {sorted(params)}")
  num_stages = sum(1 for k in params if k.startswith("stage_"))
  blocks = len(params["stage_1"])
  masked = packing.apply_masks(artifacts.to_numpy_tree(variables))
  sd = tables.to_torch(masked, FAMILY, num_batches_tracked)
  convs = tables.taking_part_convs(variables, FAMILY)
  return packing.pack_cifar_resnet(sd, conv_masks_oi(variables, convs),
                                   blocks, num_stages)


def variables_from_plan(plan: packing.PackedResNet
                        ) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """Dense-shaped Flax variables (with masks) equivalent to a packed model.

  Args:
    plan: the packed model.

  Returns:
    ``(model_name, overrides, variables)`` with ``params``, ``batch_stats``
    and ``masks`` (conv_a/conv_b kernel masks and bn_a/bn_b scale masks; ones
    elsewhere), numpy arrays.
  """
  name, overrides = cifar_resnet_for(plan.depth, plan.widths, plan.num_classes)
  channels = int(plan.stem["conv_1_3x3.weight"].shape[1])
  if channels != 3:
    overrides["in_channels"] = channels  # e.g. grey images
  model = models.create_model(name, plan.num_classes, **overrides)
  tmpl = artifacts.template(model)
  sd, conv_masks, bn_masks = packing.unpack_cifar_resnet(plan)
  variables = tables.from_torch(sd, tmpl, FAMILY)
  masks = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), tmpl[tables.MASKS])
  for conv, m in conv_masks.items():
    paths.assign(masks, tuple(conv.split(".")) + ("kernel",),
                tables.transpose2d(m))
  for bn, m in bn_masks.items():
    paths.assign(masks, tuple(bn.split(".")) + ("scale",), m)
  variables[tables.MASKS] = masks
  return name, overrides, variables
