"""Flax side of the converter: models from packed plans, plans from variables.

Also the import/export directory format that ``python -m convert`` and
``run.py`` share: ``variables.npz`` (one array per variable, keyed by its
'/'-joined path, e.g. ``params/stage_1/0/conv_a/kernel``) beside
``model.json`` (``{"model": registry name, "num_classes": int, "overrides":
{...}, "meta": {...}}``). Build the model with
``models.create_model(model, num_classes, **overrides)``.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import models
from models.layers import input_channels
from convert import packing, tables
from training import integrity

FAMILY = "cifar_resnet"


# ------------------------------------------------------------------ pytrees
def flatten(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{'a/b/c': array}`` of a nested dict of arrays."""
  return {"/".join(p): np.asarray(v) for p, v in tables.leaves(tree)}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of ``flatten``."""
  out: dict[str, Any] = {}
  for k, v in flat.items():
    tables.set_path(out, tuple(k.split("/")), np.asarray(v))
  return out


def to_numpy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
  return unflatten(flatten(tree))


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


def shape_overrides(variables: Mapping[str, Any], family: str
                    ) -> dict[str, Any]:
  """Model overrides read off the variables' shapes.

  ``in_channels`` when the images are not RGB (the first conv reads them:
  its HWIO kernel holds their channels); for DSP's CIFAR ResNets their
  ``widths`` (a run may set them, e.g. a half-width ResNet-20).

  Args:
    variables: the model variables (``params`` at least).
    family: the registry family.

  Returns:
    The overrides that rebuild the model of these variables.
  """
  params = variables[tables.PARAMS]
  out: dict[str, Any] = {}
  convs = [l for l in tables.find_layers(variables, family) if l.kind == "conv"]
  if convs:
    channels = int(np.shape(tables.get_path(params,
                                            convs[0].path + ("kernel",)))[2])
    if channels != 3:
      out["in_channels"] = channels
  if family == FAMILY and "stage_1" in params:
    out["widths"] = tuple(
        int(np.shape(params[f"stage_{s}"]["0"]["conv_b"]["kernel"])[3])
        for s in range(1, 1 + sum(k.startswith("stage_") for k in params)))
  return out


def template(model: Any, image_size: int = 32, channels: int | None = None
             ) -> dict[str, Any]:
  """Shapes/dtypes of a model's variables (no computation; ``channels``
  None: the model's input channels)."""
  channels = input_channels(model) if channels is None else channels
  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  model = models.prunable(model)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def logits(model: Any, variables: Mapping[str, Any], images_nhwc: np.ndarray
           ) -> np.ndarray:
  """Evaluation-mode logits of a Flax model."""
  v = jax.tree.map(jnp.asarray, dict(variables))
  return np.asarray(models.prunable(model).apply(
      v, jnp.asarray(images_nhwc), train=False))


# --------------------------------------------------------- plan <-> variables
def conv_masks_oi(variables: Mapping[str, Any], names: list[str]
                  ) -> dict[str, np.ndarray]:
  """``{conv_name: (O, I)}`` masks (ones where the variables have none)."""
  out = {}
  for name in names:
    path = tuple(name.split("."))
    m = tables.get_path(variables.get(tables.MASKS, {}), path + ("kernel",))
    if m is None:
      k = tables.get_path(variables[tables.PARAMS], path + ("kernel",))
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
  masked = packing.apply_masks(to_numpy_tree(variables))
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
  tmpl = template(model)
  sd, conv_masks, bn_masks = packing.unpack_cifar_resnet(plan)
  variables = tables.from_torch(sd, tmpl, FAMILY)
  masks = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), tmpl[tables.MASKS])
  for conv, m in conv_masks.items():
    tables.set_path(masks, tuple(conv.split(".")) + ("kernel",),
                tables.transpose2d(m))
  for bn, m in bn_masks.items():
    tables.set_path(masks, tuple(bn.split(".")) + ("scale",), m)
  variables[tables.MASKS] = masks
  return name, overrides, variables


# ------------------------------------------------------------------ files
def atomic_write(path: str | os.PathLike, write: Any) -> pathlib.Path:
  """Calls ``write(buffer)`` on an in-memory binary file, then writes its
  bytes to ``path`` atomically (``training.integrity.atomic_write``).

  A reader never sees a half-written file. The serialisers write to memory
  and Python writes the file: torch's own file writers abort the process on
  a full disk instead of raising.

  Args:
    path: final path.
    write: function writing into the binary file object it is given.

  Returns:
    The final path.

  Raises:
    OSError: the file could not be written (e.g. no space left).
  """
  buffer = io.BytesIO()
  write(buffer)
  return integrity.atomic_write(path, buffer.getvalue())


def save_variables(directory: str | os.PathLike, model_name: str,
                   num_classes: int, overrides: Mapping[str, Any],
                   variables: Mapping[str, Any],
                   meta: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes ``variables.npz`` and ``model.json`` (see the module docstring)."""
  directory = pathlib.Path(directory)
  flat = flatten(variables)
  atomic_write(directory / "variables.npz",
               lambda f: np.savez(f, **flat))
  info = {"model": model_name, "num_classes": int(num_classes),
          "overrides": {k: list(v) if isinstance(v, tuple) else v
                        for k, v in overrides.items()},
          "meta": dict(meta or {})}
  atomic_write(directory / "model.json",
               lambda f: f.write(json.dumps(info, indent=2).encode()))
  return directory


def load_variables(directory: str | os.PathLike
                   ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """Reads a directory written by ``save_variables``.

  Returns:
    ``(model, variables, info)``: the Flax module, the variables (numpy) and
    the ``model.json`` contents.
  """
  directory = pathlib.Path(directory)
  for f in ("variables.npz", "model.json"):
    if not (directory / f).is_file():
      raise FileNotFoundError(
          f"{directory} is not a converted-variables directory: no {f} "
          "(expected variables.npz and model.json)")
  info = json.loads((directory / "model.json").read_text())
  overrides = {k: tuple(v) if isinstance(v, list) else v
               for k, v in info.get("overrides", {}).items()}
  with np.load(directory / "variables.npz") as z:
    variables = unflatten({k: z[k] for k in z.files})
  family = models.model_spec(info["model"]).family
  overrides = {**shape_overrides(variables, family), **overrides}
  model = models.create_model(info["model"], info["num_classes"], **overrides)
  return model, variables, info


def load_source(source: str | os.PathLike, which: str = "best"
                ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """Model, variables and info of a variables or training stage directory.

  Args:
    source: a ``save_variables`` directory (``model.json``), a run's stage
      directory (``meta.json`` and orbax checkpoints), or a run's workdir
      (``report.json``: its last written ``<stage>/output``).
    which: ``best`` or ``latest`` checkpoint of a stage directory.

  Returns:
    ``(model, variables, info)``; ``info`` is the ``model.json`` contents, or
    ``{"model": name, "num_classes": n, "overrides": {...}}`` for a stage
    directory.
  """
  source = pathlib.Path(source)
  if (source / "report.json").is_file() and not (source / "model.json").is_file():
    # A run's workdir: the stage output written last is the run's result.
    outputs = sorted(source.glob("*/output/model.json"),
                     key=lambda p: p.stat().st_mtime)
    if not outputs:
      raise ValueError(f"{source} is a run directory without any stage output "
                       "(expected <stage>/output/model.json); pass one of its "
                       "stage directories instead")
    source = outputs[-1].parent
  if (source / "meta.json").is_file() and not (source / "model.json").is_file():
    name, classes, overrides, variables = load_stage_checkpoint(source, which)
    model = models.create_model(name, classes, **overrides)
    return model, variables, {"model": name, "num_classes": classes,
                              "overrides": overrides}
  return load_variables(source)


def random_variables(model: Any, rng: int | np.random.Generator,
                     image_size: int | None = None, *,
                     mask_density: float | None = None) -> dict[str, Any]:
  """Random numpy variables in the shapes of ``model``'s (no init run).

  For conversion checks and benchmarks: every tensor is drawn so that no
  layer is an identity or a zero (kernels He-normal, norm scales U(0.5, 1.5),
  biases and running means normal, running variances U(0.5, 2), group logits
  N(0, 0.5)).

  Args:
    model: a zoo model.
    rng: a seed or a numpy generator (drawn from, in tree order).
    image_size: input height/width (default: the model's ``image_size`` or 32).
    mask_density: None leaves the ``masks`` collection all ones; else each
      mask entry is 1 with this probability.

  Returns:
    The variables, nested dicts of float32 numpy arrays.
  """
  rng = np.random.default_rng(rng)
  size = image_size or getattr(model, "image_size", None) or 32

  def fill(path, s):
    collection, leaf = path[0].key, path[-1].key
    if collection == tables.MASKS:
      if mask_density is None:
        return np.ones(s.shape, s.dtype)
      return (rng.random(s.shape) < mask_density).astype(s.dtype)
    if leaf == "kernel":
      value = rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape)
    elif leaf == "scale":
      value = rng.uniform(0.5, 1.5, s.shape)
    elif leaf == "var":
      value = rng.uniform(0.5, 2.0, s.shape)
    else:
      value = rng.normal(0, 0.5, s.shape)
    return value.astype(s.dtype)

  filled = jax.tree_util.tree_map_with_path(fill, template(model, size))
  return to_numpy_tree(filled)


def load_stage_checkpoint(stage_dir: str | os.PathLike, which: str = "best"
                          ) -> tuple[str, int, dict[str, Any], dict[str, Any]]:
  """Variables of a training stage directory (``training.checkpoint`` layout).

  Reads ``meta.json`` for the model name and restores the ``state`` item of
  the best (or latest periodic) checkpoint without a target structure.

  Args:
    stage_dir: ``workdir/<stage>`` holding ``meta.json`` and ``best/`` /
      ``steps/``.
    which: ``'best'`` or ``'latest'``.

  Returns:
    ``(model_name, num_classes, overrides, variables)``; overrides hold
    ``groups`` when the state has gates.

  Raises:
    FileNotFoundError: not a stage directory, or no such checkpoint.
    ValueError: the checkpoint's files differ from its manifest.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from training import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  if which not in ("best", "latest"):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  stage_dir = pathlib.Path(stage_dir).absolute()
  meta_path = stage_dir / "meta.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"{stage_dir} is not a training stage directory: "
                            "no meta.json (expected meta.json, best/, steps/)")
  meta = json.loads(meta_path.read_text())
  if "model" not in meta:
    raise ValueError(f"{meta_path} names no model; found keys {sorted(meta)}")
  mgr = ocp.CheckpointManager(stage_dir / ("best" if which == "best"
                                           else "steps"))
  step = mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no {which} checkpoint under {stage_dir}")
  # Its files against its manifest: a damaged checkpoint is never used.
  problem = ckpt_lib.damage(pathlib.Path(mgr.directory) / str(step))
  if problem is not None:
    raise ValueError(f"checkpoint {mgr.directory}/{step} is damaged "
                     f"({problem}); it cannot be used")
  out = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  state = out.state
  variables = {k: to_numpy_tree(state[k]) for k in
               (tables.PARAMS, tables.BATCH_STATS, tables.MASKS, tables.GATES)
               if state.get(k)}
  family = models.model_spec(meta["model"]).family
  found = tables.find_layers(variables, family)
  dense = [l for l in found if l.kind == "dense"]
  num_classes = int(tables.get_path(variables[tables.PARAMS],
                                dense[-1].path + ("kernel",)).shape[1])
  overrides: dict[str, Any] = shape_overrides(variables, family)
  if tables.GATES in variables:
    overrides["groups"] = int(next(iter(flatten(
        variables[tables.GATES]).values())).shape[0])
  if any("/dummy_norm/" in k for k in flatten(variables[tables.PARAMS])):
    overrides["mlp_scale"] = True  # a ViT / Swin trained with DDROP
  return meta["model"], num_classes, overrides, variables
