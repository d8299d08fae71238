"""The project's own files of variables, and the variable helpers exports share.

* A **variables directory**: ``variables.npz`` (one array per variable, keyed
  by its '/'-joined path, e.g. ``params/stage_1/0/conv_a/kernel``) beside
  ``model.json`` (``{"model": registry name or import path, "num_classes":
  int, "overrides": {...}, "meta": {...}}``); ``save_variables`` /
  ``load_variables``. ``run.py`` writes one per finished stage
  (``<stage>/output``), ``python -m convert import`` writes one.
* A **run's architecture**: ``workdir/architecture.json`` (the same keys
  without ``meta``), written when a run starts, so that a stage directory's
  checkpoints (``training.checkpoint``) can be rebuilt into a model:
  ``load_stage_checkpoint``. Group learning is read from the state itself (a
  state with ``gates`` has DSP group logits).
* ``load_source``: any of the above, or a run's workdir (its last output).

Nothing here imports torch: the training pipelines read and write these
files, and only ``convert`` (exporting) loads torch.
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
from models import paths
from models.layers import input_channels
from training import integrity

MODEL_FILE = "model.json"
VARIABLES_FILE = "variables.npz"
ARCHITECTURE_FILE = "architecture.json"
STATE_COLLECTIONS = ("params", "batch_stats", models.MASKS, models.GATES)


# ------------------------------------------------------------------ pytrees
def flatten(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{'a/b/c': array}`` of a nested dict of arrays."""
  return {"/".join(p): np.asarray(v) for p, v in paths.leaves(tree)}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of ``flatten``."""
  return paths.unflatten({tuple(k.split("/")): np.asarray(v)
                          for k, v in flat.items()})


def to_numpy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
  """A nested dict of numpy arrays (from numpy or jax arrays)."""
  return unflatten(flatten(tree))


def template(model: Any, image_size: int | tuple[int, int] = 32,
             channels: int | None = None) -> dict[str, Any]:
  """Shapes/dtypes of a model's variables, ``masks`` included (no compute;
  ``channels`` None: the model's input channels)."""
  if channels is None:
    channels = input_channels(models.unwrap(model))
  hw = (image_size, image_size) if isinstance(image_size, int) else image_size
  x = jnp.zeros((1, *hw, channels), jnp.float32)
  model = models.prunable(model)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def logits(model: Any, variables: Mapping[str, Any], images_nhwc: np.ndarray
           ) -> np.ndarray:
  """Evaluation-mode logits of the masked model: what every export of it
  must reproduce."""
  v = {k: x for k, x in variables.items() if k != models.GATES}
  return np.asarray(models.prunable(model).apply(
      jax.tree.map(jnp.asarray, v), jnp.asarray(images_nhwc), train=False))


def random_variables(model: Any, rng: int | np.random.Generator,
                     image_size: int | None = None, *,
                     mask_density: float | None = None) -> dict[str, Any]:
  """Random numpy variables in the shapes of ``model``'s (no init run).

  For conversion checks and benchmarks: every tensor is drawn so that no
  layer is an identity or a zero (kernels He-normal, norm scales U(0.5, 1.5),
  biases and running means normal, running variances U(0.5, 2), group logits
  N(0, 0.5)).

  Args:
    model: a Flax model.
    rng: a seed or a numpy generator (drawn from, in tree order).
    image_size: input height/width (default: the model's ``image_size`` or 32).
    mask_density: None leaves the ``masks`` collection all ones; else each
      mask entry is 1 with this probability.

  Returns:
    The variables, nested dicts of float32 numpy arrays.
  """
  rng = np.random.default_rng(rng)
  size = image_size or getattr(models.unwrap(model), "image_size", None) or 32

  def fill(path, s):
    collection, leaf = path[0].key, path[-1].key
    if collection == models.MASKS:
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


# ------------------------------------------------------------------ files
def write_with(path: str | os.PathLike, write: Any) -> pathlib.Path:
  """Calls ``write(buffer)`` on an in-memory binary file, then writes its
  bytes to ``path`` atomically (``training.integrity.atomic_write``).

  Serialisers write to memory and Python writes the file: some native file
  writers abort the process on a full disk instead of raising.

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


def _json_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
  return {k: list(v) if isinstance(v, tuple) else v
          for k, v in overrides.items()}


def _read_overrides(record: Mapping[str, Any]) -> dict[str, Any]:
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in record.get("overrides", {}).items()}


def save_variables(directory: str | os.PathLike, model_name: str,
                   num_classes: int, overrides: Mapping[str, Any],
                   variables: Mapping[str, Any],
                   meta: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes ``variables.npz`` and ``model.json`` (see the module docstring)."""
  directory = pathlib.Path(directory)
  flat = flatten(variables)
  write_with(directory / VARIABLES_FILE, lambda f: np.savez(f, **flat))
  info = {"model": model_name, "num_classes": int(num_classes),
          "overrides": _json_overrides(overrides), "meta": dict(meta or {})}
  integrity.atomic_write(directory / MODEL_FILE, json.dumps(info, indent=2))
  return directory


def load_variables(directory: str | os.PathLike
                   ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """Reads a directory written by ``save_variables``.

  Returns:
    ``(model, variables, info)``: the Flax module, the variables (numpy) and
    the ``model.json`` contents.
  """
  directory = pathlib.Path(directory)
  for f in (VARIABLES_FILE, MODEL_FILE):
    if not (directory / f).is_file():
      raise FileNotFoundError(
          f"{directory} is not a converted-variables directory: no {f} "
          f"(expected {VARIABLES_FILE} and {MODEL_FILE})")
  info = json.loads((directory / MODEL_FILE).read_text())
  model = models.create_model(info["model"], info["num_classes"],
                              **_read_overrides(info))
  with np.load(directory / VARIABLES_FILE) as z:
    variables = unflatten({k: z[k] for k in z.files})
  return model, variables, info


def save_architecture(workdir: str | os.PathLike, model_name: str,
                      num_classes: int, overrides: Mapping[str, Any]
                      ) -> pathlib.Path:
  """Writes ``workdir/architecture.json`` (see the module docstring)."""
  record = {"model": model_name, "num_classes": int(num_classes),
            "overrides": _json_overrides(overrides)}
  return integrity.atomic_write(pathlib.Path(workdir) / ARCHITECTURE_FILE,
                                json.dumps(record, indent=2))


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
  if (source / "report.json").is_file() and not (
      source / MODEL_FILE).is_file():
    # A run's workdir: the stage output written last is the run's result.
    outputs = sorted(source.glob(f"*/output/{MODEL_FILE}"),
                     key=lambda p: p.stat().st_mtime)
    if not outputs:
      raise ValueError(f"{source} is a run directory without any stage output "
                       f"(expected <stage>/output/{MODEL_FILE}); pass one of "
                       "its stage directories instead")
    source = outputs[-1].parent
  if (source / "meta.json").is_file() and not (source / MODEL_FILE).is_file():
    model, info, variables = load_stage_checkpoint(source, which)
    return model, variables, info
  return load_variables(source)


def load_stage_checkpoint(stage_dir: str | os.PathLike, which: str = "best"
                          ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """Model and variables of a training stage directory.

  The model is the run's (``architecture.json`` in the workdir above the
  stage directory, with ``groups`` when the state has gates); the variables
  are the ``state`` item of the best (or latest periodic) checkpoint,
  restored without a target structure.

  Args:
    stage_dir: ``workdir/<stage>`` (or ``workdir/<stage>/cycle_k``) holding
      ``meta.json`` and ``best/`` / ``steps/``.
    which: ``'best'`` or ``'latest'``.

  Returns:
    ``(model, info, variables)``; ``info`` is ``{"model", "num_classes",
    "overrides"}``, numpy variables.

  Raises:
    FileNotFoundError: not a stage directory, no architecture record, or no
      such checkpoint.
    ValueError: the checkpoint's files differ from its manifest.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from training import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  if which not in ("best", "latest"):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  stage_dir = pathlib.Path(stage_dir).absolute()
  if not (stage_dir / ckpt_lib.META_FILE).is_file():
    raise FileNotFoundError(f"{stage_dir} is not a training stage directory: "
                            "no meta.json (expected meta.json, best/, steps/)")
  record = next((p / ARCHITECTURE_FILE for p in stage_dir.parents
                 if (p / ARCHITECTURE_FILE).is_file()), None)
  if record is None:
    raise FileNotFoundError(
        f"no {ARCHITECTURE_FILE} in the run directory above {stage_dir} (runs "
        "record their model when they start); export its output/ directory "
        "or resume the run once to record it")
  info = json.loads(record.read_text())
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
  variables = {k: to_numpy_tree(state[k]) for k in STATE_COLLECTIONS
               if state.get(k)}
  overrides = _read_overrides(info)
  if models.GATES in variables:
    overrides["groups"] = int(next(iter(flatten(
        variables[models.GATES]).values())).shape[0])
  info = {"model": info["model"], "num_classes": info["num_classes"],
          "overrides": overrides}
  model = models.create_model(info["model"], info["num_classes"], **overrides)
  return model, info, variables
