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
import functools
import json
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

import models
from training import artifacts
from training import config as config_lib
from training import data
from training import loop
from training import mesh as mesh_lib
from training import optim
from training import state as state_lib
from training import steps
from training import workdir as workdir_lib
from training.report import Report


def holds_workdir(run_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Makes a pipeline's ``run(config, workdir, ...)`` hold its workdir.

  One run per workdir: process 0 locks it (``training.workdir.hold``) for
  the whole run, so a second run stops at once with one line naming the
  first one's pid, and the libraries' messages go to ``WORKDIR/log.txt``.

  Args:
    run_fn: the pipeline's entry point.

  Returns:
    The wrapped entry point.
  """

  @functools.wraps(run_fn)
  def run_holding(config: Mapping[str, Any], workdir: str | pathlib.Path,
                  *args: Any, **kwargs: Any) -> Any:
    config_lib.validate(config)
    # Joined first: only process 0 of a job takes the lock.
    mesh_lib.initialize_distributed(config)
    with workdir_lib.hold(workdir, jax.process_index()):
      return run_fn(config, workdir, *args, **kwargs)

  return run_holding


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
    config: the run config.
  """

  mesh: jax.sharding.Mesh
  info: data.DatasetInfo
  data_dir: str | None
  steps_per_epoch: int
  workdir: pathlib.Path
  report: Report
  dtype: Any
  config: Mapping[str, Any] | None = None


def setup(config: Mapping[str, Any], workdir: str | pathlib.Path) -> Env:
  """Validates the config, builds the mesh and describes the data.

  Args:
    config: the run config.
    workdir: the run directory.

  Returns:
    The ``Env``.
  """
  config_lib.validate(config)
  mesh_lib.initialize_distributed(config)
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(config["batch_size"], mesh)
  data_dir = config["data_dir"] or None
  data.prepare(config["dataset"], data_dir, strict=config["strict_images"])
  info = data.get_info(config["dataset"], data_dir,
                       validation_from_train=config["validation_from_train"],
                       image_size=config["image_size"])
  spe = data.steps_per_epoch(info.splits["train"], config["batch_size"],
                             jax.process_count())
  if spe < 1:
    raise ValueError(f"batch_size={config['batch_size']} is larger than the "
                     f"training split ({info.splits['train']} examples)")
  workdir = pathlib.Path(workdir)
  report = Report(workdir, method=config["method"], model=config["model"],
                  dataset=config["dataset"],
                  config=config_lib.to_dict(config))
  dtype = jnp.dtype(config["dtype"])
  if jax.process_index() == 0:
    # What a stage directory's checkpoints are rebuilt into.
    artifacts.save_architecture(workdir, config["model"], info.num_classes,
                                model_overrides(config))
  return Env(mesh, info, data_dir, spe, workdir, report, dtype, config)


def validation_split(config: Mapping[str, Any]) -> str | None:
  """The data split behind the 'validation' selection split, or None."""
  if config["validation_from_train"]:
    return data.HOLDOUT_SPLIT
  return "validation" if config["dataset"] == "digits" else None


def train_data(config: Mapping[str, Any], env: Env, seed_offset: int = 0):
  """The endless, checkpointable training loader of a stage.

  Its global batches are the same for any number of processes (each process
  reads its slice of them), so a run's results do not depend on it.

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
      validation_from_train=config["validation_from_train"],
      global_order=True, transforms=host_transforms(config, env.info))


def host_transforms(config: Mapping[str, Any], info: data.DatasetInfo
                    ) -> tuple[Any, ...]:
  """The training loader's per-record ops (encoded datasets only)."""
  if not info.encoded:
    return ()
  from training import transforms  # Lazily: Pillow work, encoded data only.
  return (transforms.TrainTransform(
      config["image_size"], flip=info.hflip,
      randaugment_ops=config["randaugment_ops"],
      randaugment_magnitude=config["randaugment_magnitude"]),)


def eval_transform(config: Mapping[str, Any], info: data.DatasetInfo
                   ) -> Any:
  """The evaluation batches' per-record function (encoded datasets)."""
  if not info.encoded:
    return None
  from training import transforms  # Lazily, as host_transforms.
  return transforms.EvalTransform(config["image_size"], config["eval_resize"])


def step_options(config: Mapping[str, Any]) -> dict[str, Any]:
  """``make_train_step`` keyword arguments of the training targets."""
  from training import mix  # Lazily: only steps need it.
  return {"mix": mix.MixConfig.from_config(config["mix"]),
          "label_smoothing": config["label_smoothing"]}


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
  splits = {"test": env.info.eval_split}
  transform = eval_transform(config, env.info)
  if validation_split(config):
    splits["validation"] = validation_split(config)

  holdout = config["validation_from_train"]

  def eval_fn(state):
    return {name: steps.evaluate(
        eval_step, state,
        data.eval_batches(config["dataset"], split, env.data_dir,
                          batch_size=batch, validation_from_train=holdout,
                          transform=transform),
        env.mesh) for name, split in splits.items()}

  return eval_fn


def model_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
  """The model attributes a run sets beside the registry's defaults.

  ``model_args``; ``width_factor`` for the CIFAR torchvision-layout ResNets
  (0: 2 for CIFAR-100 and 1 otherwise, as the DDROP reference does);
  ``widths`` for the ResNets (e.g. the half-width ResNet-20 ``8,16,32``);
  the dataset's image size and channels where they differ from the
  registry's defaults (Fashion-MNIST: 28x28x1); DDROP's per-unit MLP scale
  in transformers.

  Args:
    config: the run config.

  Returns:
    The overrides of ``models.create_model``.
  """
  name, factor = config["model"], config["width_factor"]
  spec = models.model_spec(name)
  overrides = dict(json.loads(config["model_args"])
                   if config["model_args"].strip() else {})
  if spec.family == "resnet" and spec.image_size == 32 and not spec.tiny:
    overrides.setdefault(
        "factor", factor or (2 if config["dataset"] == "cifar100" else 1))
  elif factor:
    raise config_lib.ConfigError(
        f"width_factor: only the CIFAR ResNets cifar_resnet18/34/50 take a "
        f"width factor, not {name!r}; leave it at 0")
  widths = config_lib.parse_widths(config["widths"])
  if widths:
    if spec.family not in ("cifar_resnet", "resnet"):
      raise config_lib.ConfigError(
          f"widths: only the ResNets take widths, not {name!r}; leave it ''")
    overrides.setdefault("widths", widths)
  if spec.family != models.GENERIC:
    # The model takes the dataset's images (encoded ones: the host
    # transforms crop every one to image_size).
    size, _, channels = data.image_shape(config["dataset"],
                                         config["data_dir"] or None,
                                         config["image_size"])
    if size != spec.image_size:
      overrides.setdefault("image_size", size)
    if channels != 3:
      overrides.setdefault("in_channels", channels)
  if config["method"] == "ddrop" and spec.family in TRANSFORMER_FAMILIES:
    # DDROP acts on a per-unit scale after every MLP's first Linear.
    overrides.setdefault("mlp_scale", True)
  return overrides


def build_model(config: Mapping[str, Any], num_classes: int,
                **overrides: Any) -> Any:
  """The config's model, for every pipeline.

  Args:
    config: the run config (``model`` and ``model_overrides``' fields).
    num_classes: classifier outputs.
    **overrides: further model attributes, and ``groups`` (DSP gates).

  Returns:
    The Flax module, wrapped by ``models.prunable``.
  """
  return models.create_model(config["model"], num_classes,
                             **{**model_overrides(config), **overrides})


# Registry families of the vision transformers (models.vit, models.swin).
TRANSFORMER_FAMILIES = ("vit", "swin")


def pretrained_start(config: Mapping[str, Any], model: Any, state: Any,
                     mesh: Any = None) -> Any:
  """``state`` with ``config.init_from`` loaded (unchanged when '').

  Args:
    config: the run config.
    model: the run's Flax module.
    state: its fresh ``TrainState`` (params, batch_stats).
    mesh: replicate the result on this mesh (None: leave it as it is).

  Returns:
    The state with the pretrained params and batch statistics.
  """
  source = config["init_from"]
  if not source:
    return state
  from convert import pretrained  # pylint: disable=import-outside-toplevel
  fresh = {"params": state.params}
  if state.batch_stats:
    fresh["batch_stats"] = state.batch_stats
  v = pretrained.load(source, model, config["model"], fresh,
                      log=lambda line: print(line, flush=True))
  state = state.replace(params=jax.tree.map(jnp.asarray, v["params"]),
                        **({"batch_stats": jax.tree.map(
                            jnp.asarray, v["batch_stats"])}
                           if state.batch_stats else {}))
  print(f"init_from: {config['model']} weights from {source}", flush=True)
  return mesh_lib.replicate(state, mesh) if mesh is not None else state


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


def merge_model_figures(env: Env, model: Any,
                        variables: Mapping[str, Any]) -> None:
  """Adds the whole-model figures of the run's final ``variables``.

  Left out when stages after the last selected one already hold results in
  the workdir (an earlier stage re-run alone): the report keeps describing
  the model those stages produced, not a mix of both.

  Args:
    env: the run environment.
    model: the Flax module.
    variables: the variables the selected stages ended with.
  """
  if env.config is not None:
    selected = config_lib.selected_stages(env.config)
    order = config_lib.STAGES.get(env.config["method"], ())
    if selected and workdir_lib.later_results(env.workdir, order,
                                              selected[-1]):
      return
  env.report.merge(model_figures(model, variables, env.info.image_size))


def finish(env: Env, model: Any, state: Any, summarize: Any = None,
           shown: Sequence[str] = ()) -> dict[str, Any]:
  """Adds model figures and plots, saves report.json, prints the summary.

  Args:
    env: the run environment.
    model: the Flax module.
    state: the final state.
    summarize: ``report dict -> lines`` of the method's figures, or None.
    shown: report entries those lines cover.

  Returns:
    The report dict.
  """
  merge_model_figures(env, model, state.variables())
  add_plots(env)
  env.report.save()
  if jax.process_index() == 0:
    lines = summarize(env.report.data) if summarize else ()
    print(env.report.summary(lines, shown), flush=True)
  finish_together()
  return env.report.data


def finish_together() -> None:
  """The end of a run: in a multi-process job every process waits here for
  process 0's last files (plots, exports), so that none reaches JAX's
  bounded shutdown barrier long before the others."""
  mesh_lib.sync("run-finished")


def add_plots(env: Env) -> None:
  """Draws the run's plots (``training.plot``) and names them in the report."""
  if jax.process_index() != 0:
    return
  from training import plot  # Imported here: matplotlib is slow to load.
  env.report.save()  # The plots read report.json.
  env.report.merge({"plots": plot.plot_run(env.workdir)})


@holds_workdir
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
  state = pretrained_start(config, model, state)
  state = mesh_lib.replicate(state, env.mesh)
  if "train" in config_lib.selected_stages(config):
    step_fn = steps.make_train_step(model, tx, info, env.mesh,
                                    lr_schedule=lr_fn, dtype=env.dtype,
                                    **step_options(config))
    result = loop.run_stage(
        "train", state, step_fn,
        num_steps=config["epochs"] * env.steps_per_epoch,
        train_data=train_data(config, env),
        steps_per_epoch=env.steps_per_epoch, mesh=env.mesh, workdir=workdir,
        config=config, eval_fn=make_evaluator(config, env, model))
    env.report.add_stage("train", result.summary(config["select_on"]))
    state = result.state
  return finish(env, model, state)


def export_stage(config: Mapping[str, Any], env: Env,
                 variables: Mapping[str, Any], export_fn: Any
                 ) -> dict[str, Any]:
  """The ``pack`` stage's export into ``workdir/export/``, done once.

  A finished run re-run skips the export when ``export/`` already holds one
  of the same variables; ``config.stages`` naming ``pack`` explicitly
  re-exports. ``preprocess.json`` is written beside the files.

  Args:
    config: the run config.
    env: the run environment.
    variables: the variables to export.
    export_fn: ``() -> report entry`` doing the export.

  Returns:
    The report entry (``files``, ``preprocess``, ...).
  """
  from convert import stamp  # Imported here: exports need torch.
  force = config["stages"] != "all" and "pack" in config_lib.selected_stages(
      config)
  out = env.workdir / workdir_lib.EXPORT_DIR
  entry, skipped = stamp.export_once(
      out, variables, env.info, export_fn, force=force,
      model=config["model"], image_size=env.info.image_size)
  if skipped and jax.process_index() == 0:
    print(f"pack: already done ({out} is up to date with its input); "
          "skipped. --config.stages=pack re-exports", flush=True)
  return entry
