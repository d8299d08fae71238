"""``method='dsp'``: pretrain → group → prune_finetune → pack (docs/concepts.md).

    python run.py --config configs/dsp_cifar10_resnet20.py:g4 --workdir runs/r20

Stages (``config.stages`` selects a subset; each is resumable through
``training.loop.run_stage`` checkpoints):

* ``pretrain``: plain training with the engine step (§1: SGD, coupled wd,
  ``dsp_step`` schedule with warm-up). Output: the best checkpoint by
  ``config.select_on`` (the reference keeps its best pretrained model).
* ``group``: the fused group-learning step of ``dsp_jax.make_group_step``
  (§2; Adam on the logits, ramp over T = all steps of the phase). Output: the
  final state (the regulariser's ramp ends there).
* ``prune_finetune``: rate search to ``dsp.prune_rate`` (target P.FLOPS =
  100·rate), then ``dsp.cycles`` cycles of fine-tuning, each a fresh SGD and
  cosine schedule (``dsp_jax.cycle_optimizer``) with the engine step, whose
  mask hook re-applies the masks after every update (the prune's BatchNorm
  masks zero γ and β together, so β is 0 wherever γ was pruned). Between
  cycles the best weights so far are re-pruned at best P.FLOPS + 0.1 pt
  (``dsp_jax.reprune``). Output: the best weights over all cycles (by
  ``config.select_on``), as the reference saves.
* ``pack``: ``convert.dsp.export_packed`` of the ``prune_finetune`` output
  (the best pruned model) into ``workdir/export/``.

Every stage writes ``workdir/<stage>/output/`` (``variables.npz`` +
``model.json``, the ``python -m convert import`` format) which the next stage
reads, and the reference-format file of the stage (spec §6, device index
``dev`` = 0, the reference's default GPU): ``resnet{L}.pkl``,
``resnet{L}_G0g{G}.pkl``, ``resnet{L}_P0g{G}c{rate:.2f}.pkl``.
``dsp.init_from`` replaces the input of the first selected stage: a stage
directory of a run, a converted-variables directory, or a reference ``.pkl``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import dsp_jax
import models
from dsp_jax import group_step as group_lib
from models import latency as latency_lib
from training import config as config_lib
from training import loop
from training import mesh as mesh_lib
from training import optim
from training import pipeline
from training import state as state_lib
from training import steps
from training import artifacts

OUTPUT = "output"
EXPORT = "export"
# The reference names its files by CUDA device index; it runs on device 0.
DEV = 0
# Stage whose output each stage reads.
INPUT_OF = {"group": "pretrain", "prune_finetune": "group",
            "pack": "prune_finetune"}


def family_of(model_name: str) -> str:
  """The registry family of a model (``cifar_resnet``, ``resnet``, ``vgg``)."""
  return models.model_spec(model_name).family


def reference_name(stage: str, model_name: str, groups: int,
                   rate: float) -> str:
  """The reference's file name of a stage's output (spec §6).

  The DSP CIFAR ResNets keep the reference's names (``resnet{L}.pkl``,
  ``resnet{L}_G0g{G}.pkl``, ``resnet{L}_P0g{G}c{rate}.pkl``); other models
  use their registry name in place of ``resnet{L}``.
  """
  m = re.fullmatch(r"cifar_resnet(\d+)", model_name)
  base = (f"resnet{m.group(1)}" if m and family_of(model_name) ==
          "cifar_resnet" else model_name)
  if stage == "pretrain":
    return f"{base}.pkl"
  if stage == "group":
    return f"{base}_G{DEV}g{groups}.pkl"
  return f"{base}_P{DEV}g{groups}c{rate:.2f}.pkl"


def target_options(config: Mapping[str, Any], graph: Any,
                   workdir: pathlib.Path) -> dict[str, Any]:
  """The search's target, rounding and latency model from the config:
  ``dsp.target_latency`` > 0 replaces ``dsp.prune_rate``."""
  d = config["dsp"]
  targeted = d["target_latency"] > 0
  model = latency_lib.from_config(config["latency"], workdir, graph, targeted)
  target = ({"target_latency": d["target_latency"]} if targeted
            else {"rate": d["prune_rate"]})
  return {**target, "round_to": d["round_to"], "latency": model}


def fp_options(config: Mapping[str, Any]) -> dict[str, Any]:
  """``fp_every`` / ``fp_layers`` of ``dsp_jax.prune`` from the config.

  ``dsp.fp_layers`` (explicit indices) wins, then ``dsp.fp_every`` > 0; with
  neither the fp layers are derived from the model's structure.
  """
  d = config["dsp"]
  if d["fp_layers"].strip():
    return {"fp_layers": [int(v) for v in d["fp_layers"].split(",")]}
  return {"fp_every": d["fp_every"] or None}


# ------------------------------------------------------------------ inputs
def _groups_in(variables: Mapping[str, Any]) -> int | None:
  gates = variables.get("gates")
  if not gates:
    return None
  return int(jax.tree.leaves(gates)[0].shape[0])


def load_input(path: str | pathlib.Path, config: Mapping[str, Any],
               image_size: int, channels: int) -> dict[str, Any]:
  """Variables (numpy) of a stage output, converted directory or ``.pkl``.

  Args:
    path: a run's stage directory (``workdir/<stage>``, read from its
      ``output/``, else its best checkpoint), a ``variables.npz`` +
      ``model.json`` directory, or a reference ``[state_dict, acc]`` file.
    config: the run config (model, ``dsp.groups``).
    image_size: input size (for the ``.pkl`` template).
    channels: input channels.

  Returns:
    ``{'params', 'batch_stats', 'gates'?, 'masks'?}``.

  Raises:
    FileNotFoundError: nothing readable at ``path``.
    ValueError: another model, or a group count other than ``dsp.groups``.
  """
  path = pathlib.Path(path).expanduser()
  groups = config["dsp"]["groups"]
  name = config["model"]
  if path.is_dir() and (path / OUTPUT / "variables.npz").is_file():
    path = path / OUTPUT
  if path.is_dir() and (path / "variables.npz").is_file():
    _, variables, info = artifacts.load_variables(path)
    found = info["model"]
  elif path.is_dir() and (path / "meta.json").is_file():
    _, info, variables = artifacts.load_stage_checkpoint(path, "best")
    found = info["model"]
  elif path.is_file():
    from convert import reference as ref_lib  # Imports torch: only here.
    sd, _ = ref_lib.read_state_dict(path)
    found = name
    g = ref_lib.groups_of(sd)
    if g is not None and g != groups:
      raise ValueError(f"{path} is group-learned with {g} groups but "
                       f"dsp.groups={groups}; set --config.dsp.groups={g}")
    family = family_of(name)
    model = models.create_model(name, _classes_of(sd),
                                **({"groups": g} if g else {}))
    variables = ref_lib.from_reference(
        sd, artifacts.template(model, image_size, channels), family)
  else:
    raise FileNotFoundError(
        f"{path}: expected a stage directory of a run, a directory with "
        "variables.npz + model.json, or a reference .pkl file")
  if found != name:
    raise ValueError(f"{path} holds a {found!r} model but config.model is "
                     f"{name!r}")
  g = _groups_in(variables)
  if g is not None and g != groups:
    raise ValueError(f"{path} is group-learned with {g} groups but "
                     f"dsp.groups={groups}; set --config.dsp.groups={g}")
  return dict(variables)


def _classes_of(state_dict: Mapping[str, Any]) -> int:
  """Classifier outputs of a state dict: its last 1-D ``bias`` (10 if none)."""
  biases = [k for k, t in state_dict.items()
            if k.endswith(".bias") and len(t.shape) == 1]
  return int(state_dict[biases[-1]].shape[0]) if biases else 10


def _stage_input(stage: str, config: Mapping[str, Any], env: pipeline.Env,
                 first: bool) -> dict[str, Any] | None:
  """The input variables of ``stage``: ``dsp.init_from`` for the first
  selected stage, else the previous stage's output (None: start fresh)."""
  # ``init_from`` is every pipeline's pretrained start; ``dsp.init_from`` the
  # same for DSP (kept for existing configs).
  init_from = config["init_from"] or config["dsp"]["init_from"]
  info = env.info
  if first and init_from:
    return load_input(init_from, config, info.image_size, info.channels)
  if stage == "pretrain":
    return None
  src = env.workdir / INPUT_OF[stage]
  if not (src / OUTPUT / "variables.npz").is_file():
    if stage == "group" and config["dsp"]["pretrain_epochs"] == 0:
      return None
    raise FileNotFoundError(
        f"stage {stage!r} needs the output of stage {INPUT_OF[stage]!r} in "
        f"{src / OUTPUT}; run that stage first or set dsp.init_from")
  return load_input(src, config, info.image_size, info.channels)


def _save_output(env: pipeline.Env, stage: str, config: Mapping[str, Any],
                 num_classes: int, variables: Mapping[str, Any],
                 accuracy: float | None, meta: Mapping[str, Any] | None = None
                 ) -> pathlib.Path:
  """Writes ``<stage>/output/`` and the reference-format file of the stage."""
  variables = jax.tree.map(np.asarray, jax.device_get(dict(variables)))
  groups = _groups_in(variables)
  directory = env.workdir / stage
  if jax.process_index() == 0:
    overrides = pipeline.model_overrides(config)
    if groups:
      overrides["groups"] = groups
    artifacts.save_variables(directory / OUTPUT, config["model"], num_classes,
                             overrides, variables, meta)
    # The original code's file of the stage (imports torch: only here).
    from convert import reference as ref_lib  # pylint: disable=import-outside-toplevel
    ref_stage = {"pretrain": "pretrained", "group": "group"}.get(
        stage, "finetuned")
    sd = ref_lib.to_reference(variables, ref_stage,
                              family_of(config["model"]))
    ref_lib.save(directory / reference_name(
        stage, config["model"], config["dsp"]["groups"],
        config["dsp"]["prune_rate"]), sd,
                 100.0 * (accuracy if accuracy is not None else 0.0))
  return directory / OUTPUT


# ------------------------------------------------------------------ states
def _state(model: Any, tx: Any, config: Mapping[str, Any], env: pipeline.Env,
           variables: Mapping[str, Any] | None, *, masks: bool = False,
           gates: bool = False, extra: Any = None) -> state_lib.TrainState:
  """A replicated TrainState, with ``variables`` loaded when given."""
  info = env.info
  state = state_lib.create_train_state(
      model, tx, jax.random.key(config["seed"]),
      (info.image_size, info.image_size, info.channels), with_masks=masks,
      with_gates=gates, extra=extra)
  if variables is not None:
    def take(name, like):
      if not like:
        return like
      if name not in variables and name == "gates":
        return like  # Fresh logits: zeros, the reference's initialisation.
      if name not in variables:
        raise ValueError(f"the input checkpoint has no {name!r} collection, "
                         "which this stage needs")
      got = jax.tree.map(jnp.asarray, variables[name])
      if jax.tree.structure(got) != jax.tree.structure(like):
        raise ValueError(f"the input checkpoint's {name!r} do not fit model "
                         f"{config['model']!r}")
      return jax.tree.map(lambda g, l: g.astype(l.dtype), got, like)
    state = state.replace(params=take("params", state.params),
                          batch_stats=take("batch_stats", state.batch_stats),
                          masks=take("masks", state.masks),
                          gates=take("gates", state.gates))
    state = state.replace(opt_state=tx.init(state.params))
  return mesh_lib.replicate(state, env.mesh)


def _run(name, state, step_fn, num_steps, config, env, model, seed_offset,
         meta=None, eval_fn=None) -> loop.StageResult:
  """``loop.run_stage`` with the stage's own data order (``seed_offset``)."""
  return loop.run_stage(
      name, state, step_fn, num_steps=num_steps,
      train_data=pipeline.train_data(config, env, seed_offset),
      steps_per_epoch=env.steps_per_epoch, mesh=env.mesh,
      workdir=env.workdir, config=config,
      eval_fn=eval_fn or pipeline.make_evaluator(config, env, model),
      meta=meta)


def _test_acc(evals: Mapping[str, Any] | None) -> float | None:
  return None if evals is None else float(evals["test"]["accuracy"])


# ------------------------------------------------------------------ stages
def pretrain(config, env, variables) -> dict[str, Any]:
  """§1: plain training; returns the best variables (by ``select_on``)."""
  d = config["dsp"]
  spe = env.steps_per_epoch
  model = pipeline.build_model(config, env.info.num_classes)
  lr_fn = optim.dsp_step(d["pretrain_lr"], d["pretrain_epochs"], spe,
                         config["optim"]["warmup_epochs"],
                         config["optim"]["warmup_factor"])
  tx = optim.sgd_torch(lr_fn, d["momentum"], d["pretrain_wd"])
  state = _state(model, tx, config, env, variables)
  step_fn = steps.make_train_step(model, tx, env.info, env.mesh,
                                  lr_schedule=lr_fn, dtype=env.dtype)
  result = _run("pretrain", state, step_fn, d["pretrain_epochs"] * spe,
                config, env, model, 0)
  env.report.add_stage("pretrain", result.summary(config["select_on"]))
  _, _, best = artifacts.load_stage_checkpoint(env.workdir / "pretrain")
  _save_output(env, "pretrain", config, env.info.num_classes, best,
               _test_acc(result.best))
  return best


def group(config, env, variables) -> dict[str, Any]:
  """§2: differentiable group learning; returns the final variables."""
  d = config["dsp"]
  spe = env.steps_per_epoch
  model = pipeline.build_model(config, env.info.num_classes,
                               groups=d["groups"])
  info = env.info
  layer_info = dsp_jax.analyze(model, (info.image_size, info.image_size,
                                       info.channels))
  total = d["group_epochs"] * spe
  lr_fn = optim.cosine_epoch(d["group_lr"], d["group_epochs"], spe)
  direction = group_lib.sgd_direction(d["momentum"], d["group_wd"])
  gate_tx = group_lib.gate_optimizer(d["gate_lr"])
  if variables is not None:
    variables = {k: v for k, v in variables.items() if k != "masks"}
  state = _state(model, direction, config, env, variables, gates=True,
                 extra={})
  state = state.replace(extra={
      group_lib.GATE_OPT_KEY: gate_tx.init(state.gates)})
  state = mesh_lib.replicate(state, env.mesh)
  augment = lambda key, x: steps.preprocess(key, x, info, env.dtype)
  step_fn = dsp_jax.make_group_step(
      model, groups=d["groups"], lam=d["regularize"], lr_schedule=lr_fn,
      total_steps=total, temperature=d["temperature"], q=d["order"],
      momentum=d["momentum"], weight_decay=d["group_wd"],
      gate_lr=d["gate_lr"], layer_info=layer_info, augment_fn=augment,
      exact=d["second_order"] == "exact", direction=direction)
  result = _run("group", state, step_fn, total, config, env, model, 1)
  env.report.add_stage("group", result.summary(config["select_on"]))
  out = jax.device_get(result.state.variables())
  _save_output(env, "group", config, info.num_classes, out,
               _test_acc(result.final))
  env.report.merge({"dense_accuracy": _test_acc(result.final)})
  return out


def _prune_figures(res: dsp_jax.PruneResult) -> dict[str, Any]:
  """The report entries of one prune."""
  whole = res.whole_model or {}
  return {
      "beta": res.beta, "pflops_reference": res.p_flops,
      "pparams_reference": res.p_params,
      "pflops_propagated": res.propagated_p_flops,
      "pparams_propagated": res.propagated_p_params,
      "pflops_whole_model": whole.get("pflops_whole_model"),
      "pparams_whole_model": whole.get("pparams_whole_model"),
      "latency": res.latency,
      "empty_groups": [list(e) for e in res.empty_groups],
      "structure": [{"layer": name, "groups": [list(g) for g in per_group]}
                    for name, per_group in res.table],
  }


def _check_prune_agrees(res: dsp_jax.PruneResult) -> None:
  """Every process must have found the same masks and β: each computes them
  on the host from the replicated state before they go back on the mesh."""
  mesh_lib.check_same_on_processes(
      {"masks": res.masks, "beta": np.float64(res.beta)}, "DSP prune masks")


def prune_finetune(config, env, variables) -> dict[str, Any]:
  """§3: rate search, cyclic fine-tuning; returns the best variables."""
  d = config["dsp"]
  spe = env.steps_per_epoch
  info = env.info
  if not variables.get("gates"):
    raise ValueError("stage 'prune_finetune' needs a group-learned checkpoint "
                     "(with group logits); run stage 'group' first")
  model = pipeline.build_model(config, info.num_classes, groups=d["groups"])
  layer_info = dsp_jax.analyze(model, (info.image_size, info.image_size,
                                       info.channels))
  gates = variables["gates"]
  epochs = -(-d["finetune_epochs"] // d["cycles"])
  options = target_options(config, layer_info, env.workdir)
  res = dsp_jax.prune(variables["params"], gates, layer_info,
                      groups=d["groups"], **options, **fp_options(config))
  _check_prune_agrees(res)
  best, best_res, cycles, last = None, None, [], None
  # Every cycle has the same optimizer and schedule, started afresh from
  # ``tx.init``: one jitted step and evaluator serve all cycles.
  tx = dsp_jax.cycle_optimizer(d["finetune_lr"], epochs, spe, d["momentum"],
                               d["finetune_wd"])
  step_fn = steps.make_train_step(
      model, tx, info, env.mesh, dtype=env.dtype,
      lr_schedule=dsp_jax.cycle_schedule(d["finetune_lr"], epochs, spe))
  eval_fn = pipeline.make_evaluator(config, env, model)
  for cycle in range(d["cycles"]):
    # A model without BatchNorm (a ViT) has no statistics.
    start = {"params": res.params,
             "batch_stats": variables.get("batch_stats", {}),
             "masks": res.masks, "gates": gates}
    state = _state(model, tx, config, env, start, masks=True, gates=True)
    name = f"prune_finetune/cycle_{cycle + 1}"
    result = _run(name, state, step_fn, epochs * spe, config, env, model,
                  2 + cycle, meta={"cycle": cycle + 1, "beta": res.beta},
                  eval_fn=eval_fn)
    env.report.add_stage(name, result.summary(config["select_on"]))
    _, _, cand = artifacts.load_stage_checkpoint(env.workdir / name)
    acc = float(result.best[config["select_on"]]["accuracy"])
    new_best = dsp_jax.update_best(best, acc, cycle + 1, cand["params"],
                                   cand.get("batch_stats", {}), res.p_flops)
    if new_best is not best:
      best, best_res, best_vars = new_best, res, cand
      best_test = _test_acc(result.best)
    cycles.append({"cycle": cycle + 1, "beta": res.beta,
                   "pflops_reference": res.p_flops,
                   "final": _test_acc(result.final),
                   "best": acc, "best_step": result.best_step})
    last = result
    if cycle + 1 < d["cycles"]:
      try:
        res = dsp_jax.reprune(best, gates, layer_info, groups=d["groups"],
                              round_to=d["round_to"],
                              latency=options["latency"],
                              **fp_options(config))
      except ValueError as e:  # Best P.FLOPS + 0.1 pt is unreachable.
        warnings.warn(f"re-prune after cycle {cycle + 1} skipped ({e}); the "
                      "next cycle keeps the best model's masks")
        res = dataclasses.replace(best_res, params=best.params)
      _check_prune_agrees(res)
      variables = {**variables, "batch_stats": best.batch_stats}
  figures = {**_prune_figures(best_res), "groups": d["groups"],
             "pruned_accuracy": _test_acc(last.final),
             "best_accuracy": best.metric, "best_cycle": best.epoch,
             "selected_on": config["select_on"], "cycles": cycles}
  figures["exported"] = exported_entry(figures)
  env.report.merge(figures)
  _save_output(env, "prune_finetune", config, info.num_classes, best_vars,
               best_test, meta=figures)
  return best_vars


def pack(config, env, variables) -> dict[str, Any]:
  """§4: packs the pruned model into ``workdir/export/``: every format
  that applies (``convert.formats``; the released DSP format for the CIFAR
  ResNets, branches for other models, the compact network and ONNX)."""
  from convert import formats  # Imports torch: only when packing.
  if not variables.get("masks"):
    raise ValueError("stage 'pack' needs a pruned checkpoint (with masks); "
                     "run stage 'prune_finetune' first")
  d = config["dsp"]
  model = pipeline.build_model(
      config, env.info.num_classes,
      groups=d["groups"] if variables.get("gates") else None)
  if not mesh_lib.is_primary():  # Process 0 writes the export.
    return variables

  def export():
    info = env.info
    result = formats.export(model, variables, env.workdir / EXPORT,
                            (info.image_size, info.image_size, info.channels))
    branches = {k: list(v) if isinstance(v, tuple) else v
                for k, v in result.details.get("branches", {}).items()}
    return {"files": {k: str(p) for k, p in result.files.items()},
            "max_abs_diff": result.max_abs_diff, "branches": branches}

  entry = pipeline.export_stage(config, env, variables, export)
  env.report.merge({"export": entry, "preprocess": entry["preprocess"]})
  return variables


STAGE_FNS = {"pretrain": pretrain, "group": group,
             "prune_finetune": prune_finetune, "pack": pack}


def exported_entry(figures: Mapping[str, Any]) -> dict[str, str]:
  """Which checkpoint ``prune_finetune`` outputs (and ``pack`` exports), and
  why: the report's ``exported``."""
  n, best = len(figures["cycles"]), figures["best_cycle"]
  row = figures["cycles"][best - 1]
  what = (f"cycle {best}'s best checkpoint (prune_finetune/cycle_{best}, "
          f"step {row['best_step']}; P.FLOPS {row['pflops_reference']:.2f} %)")
  why = (f"the highest {figures['selected_on']} accuracy "
         f"({100 * figures['best_accuracy']:.2f} %) of the {n} cycle"
         + ("s" if n > 1 else "") + "; the pruning figures and structure "
         "above are this checkpoint's")
  return {"what": what, "why": why}


# Report entries ``summary`` shows.
SUMMARY_KEYS = ("structure", "groups", "beta", "pflops_reference",
                "pparams_reference", "pflops_propagated",
                "pparams_propagated", "dense_accuracy", "pruned_accuracy",
                "best_accuracy", "best_cycle", "selected_on", "cycles",
                "empty_groups")


def summary(report: Mapping[str, Any]) -> list[str]:
  """The DSP lines of the run summary: cycles, measures, structure.

  Args:
    report: the report dict.

  Returns:
    Lines (``training.report.Report.summary`` wraps them).
  """
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"
  lines = [f"accuracy: dense {pct(report.get('dense_accuracy'))} (after "
           f"group learning); last cycle's final "
           f"{pct(report.get('pruned_accuracy'))}; best "
           f"{pct(report.get('best_accuracy'))} on "
           f"{report.get('selected_on', '-')} (cycle "
           f"{report.get('best_cycle', '-')})"]
  for c in report.get("cycles", []):
    lines.append(f"  cycle {c['cycle']}: beta {fmt(c.get('beta'), '.6f')}, "
                 f"P.FLOPS {fmt(c.get('pflops_reference'), '.2f')} %, final "
                 f"{pct(c.get('final'))}, best {pct(c.get('best'))}")
  lines.append(
      f"DSP G={report.get('groups')} beta={fmt(report.get('beta'), '.6f')}: "
      f"P.FLOPS {fmt(report.get('pflops_reference'), '.2f')} % / P.PARAMS "
      f"{fmt(report.get('pparams_reference'), '.2f')} % (reference measure)")
  rows = report.get("structure", [])
  if rows:
    width = max(len(r["layer"]) for r in rows) + 2
    lines.append(f"{'layer':<{width}}per group: filters x kept inputs")
    lines += [f"{r['layer']:<{width}}" + " ".join(
        f"{f}x{i}" for f, i in r["groups"]) for r in rows]
  return lines


@pipeline.holds_workdir
def run(config: Mapping[str, Any], workdir: str | pathlib.Path
        ) -> dict[str, Any]:
  """Runs the selected DSP stages.

  Args:
    config: the run config (``method='dsp'``).
    workdir: the run directory.

  Returns:
    The report dict (also in ``workdir/report.json``).
  """
  env = pipeline.setup(config, workdir)
  selected = config_lib.selected_stages(config)
  variables = None
  for i, stage in enumerate(selected):
    if i == 0 or variables is None:
      variables = _stage_input(stage, config, env, first=i == 0)
    if stage == "pretrain" and config["dsp"]["pretrain_epochs"] == 0:
      continue
    if stage in ("prune_finetune", "pack") and variables is None:
      raise FileNotFoundError(f"stage {stage!r} has no input checkpoint")
    variables = STAGE_FNS[stage](config, env, variables)
    env.report.save()
  ft_out = env.workdir / "prune_finetune" / OUTPUT
  if ("prune_finetune" not in selected and "pack" in selected
      and (ft_out / "model.json").is_file()):
    meta = artifacts.load_variables(ft_out)[2]
    env.report.merge({k: v for k, v in meta.get("meta", {}).items()
                      if k not in env.report.data})
  groups = config["dsp"]["groups"]
  if variables is not None:
    model = pipeline.build_model(
        config, env.info.num_classes,
        groups=groups if variables.get("gates") else None)
    pipeline.merge_model_figures(env, model, variables)
  env.report.merge({"groups": groups})
  pipeline.add_plots(env)
  env.report.save()
  if jax.process_index() == 0:
    print(env.report.summary(summary(env.report.data), SUMMARY_KEYS),
          flush=True)
  pipeline.finish_together()
  return env.report.data
