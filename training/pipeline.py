"""``method='train'``: plain supervised training, and the pieces every method
pipeline shares (data setup, evaluation over the selection splits, report).

A method pipeline (``dsp_jax.pipeline``, ``ddrop_jax.pipeline``) typically::

  env = pipeline.setup(config, workdir)
  state = ...                                   # its own state / step_fn
  result = loop.run_stage("group", state, step_fn, num_steps=...,
                          train_data=pipeline.train_data(config, env),
                          steps_per_epoch=env.steps_per_epoch, mesh=env.mesh,
                          workdir=workdir, config=config,
                          eval_fn=pipeline.make_evaluator(config, env, model))
  env.report.add_stage("group", result.summary(config.select_on))
  env.report.merge({"pruning": {...}})
  pipeline.finish(env, model, result.state)
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp

import models
from training import config as config_lib
from training import data
from training import loop
from training import mesh as mesh_lib
from training import optim
from training import state as state_lib
from training import steps
from training.report import Report


@dataclasses.dataclass
class Env:
  """What every stage of a run shares.

  Attributes:
    mesh: the ``data`` mesh.
    info: the dataset's ``DatasetInfo`` (``splits['train']`` excludes a
      hold-out).
    data_dir: the dataset directory (None: the data module's default).
    steps_per_epoch: training steps per epoch at ``config.batch_size``.
    workdir: the run directory.
    report: the run report (saved by ``finish``).
    dtype: compute dtype.
  """

  mesh: jax.sharding.Mesh
  info: data.DatasetInfo
  data_dir: str | None
  steps_per_epoch: int
  workdir: pathlib.Path
  report: Report
  dtype: Any


def setup(config: Mapping[str, Any], workdir: str | pathlib.Path) -> Env:
  """Validates the config, builds the mesh and describes the data.

  Args:
    config: the run config.
    workdir: the run directory.

  Returns:
    The ``Env``.
  """
  config_lib.validate(config)
  mesh_lib.maybe_initialize_distributed(config["multihost"])
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(config["batch_size"], mesh)
  data_dir = config["data_dir"] or None
  data.prepare(config["dataset"], data_dir)
  info = data.get_info(config["dataset"], data_dir,
                       validation_from_train=config["validation_from_train"])
  spe = data.steps_per_epoch(info.splits["train"], config["batch_size"],
                             jax.process_count())
  if spe < 1:
    raise ValueError(f"batch_size={config['batch_size']} is larger than the "
                     f"training split ({info.splits['train']} examples)")
  workdir = pathlib.Path(workdir)
  report = Report(workdir, method=config["method"], model=config["model"],
                  dataset=config["dataset"], workdir=str(workdir),
                  config=config_lib.to_dict(config))
  dtype = jnp.dtype(config["dtype"])
  return Env(mesh, info, data_dir, spe, workdir, report, dtype)


def validation_split(config: Mapping[str, Any]) -> str | None:
  """The data split behind the 'validation' selection split, or None."""
  if config["validation_from_train"]:
    return data.HOLDOUT_SPLIT
  return "validation" if config["dataset"] == "digits" else None


def train_data(config: Mapping[str, Any], env: Env, seed_offset: int = 0):
  """The endless, checkpointable training loader of a stage.

  Args:
    config: the run config.
    env: the run environment.
    seed_offset: added to ``config.seed`` (a different order per stage).

  Returns:
    A grain DataLoader of local batches.
  """
  return data.train_loader(
      config["dataset"], "train", env.data_dir,
      global_batch_size=config["batch_size"], seed=config["seed"] + seed_offset,
      num_epochs=None, worker_count=config["worker_count"],
      validation_from_train=config["validation_from_train"])


def make_evaluator(config: Mapping[str, Any], env: Env, model: Any,
                   eval_step: Any = None) -> loop.EvalFn:
  """``eval_fn(state) -> {'test': metrics, 'validation': metrics?}``.

  Args:
    config: the run config.
    env: the run environment.
    model: the Flax module.
    eval_step: an eval step with ``steps.make_eval_step``'s contract (default:
      that one).

  Returns:
    The evaluation function of ``loop.run_stage``.
  """
  eval_step = eval_step or steps.make_eval_step(model, env.info, env.mesh,
                                                dtype=env.dtype)
  batch = config["test_batch_size"]
  batch += -batch % jax.process_count()
  splits = {"test": "test"}
  if validation_split(config):
    splits["validation"] = validation_split(config)

  holdout = config["validation_from_train"]

  def eval_fn(state):
    return {name: steps.evaluate(
        eval_step, state,
        data.eval_batches(config["dataset"], split, env.data_dir,
                          batch_size=batch, validation_from_train=holdout),
        env.mesh) for name, split in splits.items()}

  return eval_fn


def build_model(config: Mapping[str, Any], num_classes: int,
                **overrides: Any) -> Any:
  """The config's model, for every pipeline.

  The CIFAR torchvision-layout ResNets take ``width_factor`` (0: 2 for
  CIFAR-100 and 1 otherwise, as the DDROP reference does).

  Args:
    config: the run config.
    num_classes: classifier outputs.
    **overrides: further model attributes (e.g. ``groups``).

  Returns:
    The Flax module.
  """
  name, factor = config["model"], config["width_factor"]
  spec = models.model_spec(name)
  if spec.family == "resnet" and spec.image_size == 32 and not spec.tiny:
    overrides.setdefault(
        "factor", factor or (2 if config["dataset"] == "cifar100" else 1))
  elif factor:
    raise config_lib.ConfigError(
        f"width_factor: only the CIFAR ResNets cifar_resnet18/34/50 take a "
        f"width factor, not {name!r}; leave it at 0")
  return models.create_model(name, num_classes, **overrides)


def model_figures(model: Any, variables: Mapping[str, Any],
                  image_size: int) -> dict[str, Any]:
  """Params (and MACs when ``models.flops`` exists) of the whole model."""
  out: dict[str, Any] = {"params": state_lib.count_params(variables["params"])}
  try:
    from models import flops  # Optional module.
  except ImportError:
    return out
  figures = flops.report(model, variables, image_size)
  if dataclasses.is_dataclass(figures):
    # The per-layer table is for the pruning pipelines; the run report keeps
    # the whole-model figures.
    figures = {f.name: getattr(figures, f.name)
               for f in dataclasses.fields(figures) if f.name != "per_layer"}
  out.update(figures)
  return out


def finish(env: Env, model: Any, state: Any) -> dict[str, Any]:
  """Adds model figures, saves report.json and prints the summary table."""
  env.report.merge(model_figures(model, state.variables(),
                                 env.info.image_size))
  env.report.save()
  if jax.process_index() == 0:
    print(env.report.summary(), flush=True)
  return env.report.data


def run(config: Mapping[str, Any], workdir: str | pathlib.Path
        ) -> dict[str, Any]:
  """Plain supervised training (``method='train'``, stage 'train').

  Args:
    config: the run config.
    workdir: the run directory.

  Returns:
    The report dict (also in ``workdir/report.json``).
  """
  env = setup(config, workdir)
  info = env.info
  model = build_model(config, info.num_classes)
  tx, lr_fn = optim.make_optimizer(config["optim"], epochs=config["epochs"],
                                   steps_per_epoch=env.steps_per_epoch)
  state = state_lib.create_train_state(
      model, tx, jax.random.key(config["seed"]),
      (info.image_size, info.image_size, info.channels))
  state = mesh_lib.replicate(state, env.mesh)
  if "train" in config_lib.selected_stages(config):
    step_fn = steps.make_train_step(model, tx, info, env.mesh,
                                    lr_schedule=lr_fn, dtype=env.dtype)
    result = loop.run_stage(
        "train", state, step_fn,
        num_steps=config["epochs"] * env.steps_per_epoch,
        train_data=train_data(config, env),
        steps_per_epoch=env.steps_per_epoch, mesh=env.mesh, workdir=workdir,
        config=config, eval_fn=make_evaluator(config, env, model))
    env.report.add_stage("train", result.summary(config["select_on"]))
    state = result.state
  return finish(env, model, state)
