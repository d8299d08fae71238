"""``method='ddrop'``: the DDROP pipeline (spec ddrop.md section 1).

Stages, in order (``config.stages`` selects some of them):

* ``before``: ``ddrop.before_epochs`` of plain training (skipped when 0);
* ``ddrop``: ``ddrop.epochs`` with DDROP dropping units and the L1 penalty
  on the DDROP layers' scales;
* ``prune``: DDROP off; ``floor(amount * C)`` units of every pruned layer are
  zeroed and masked, then the model is evaluated ("Pruned");
* ``finetune``: ``ddrop.ft_epochs`` at ``ddrop.ft_lr`` with the masks held
  fixed and nothing dropped (skipped when 0);
* ``pack``: the physically slimmed PyTorch export (``convert.slim``) in
  ``workdir/export/``.

Every phase gets a fresh optimizer and schedule from step 0 (CNNs: SGD with
momentum ``ddrop.momentum`` and a one-cycle cosine schedule stepped per batch,
peak ``lr``/``ft_lr``; transformers: AdamW with a warm-up cosine schedule),
weight decay on the parameters PyTorch names ``weight`` only (kernels and
norm scales). The training stages checkpoint through ``training.loop``:
re-running the same command resumes, finished stages restore instantly, and
``prune`` is recomputed from the ``ddrop`` stage's final state (it is
deterministic). A stage left out of ``config.stages`` passes its input state
on unchanged.

``workdir/report.json`` holds, besides the engine's per-stage results:
``accuracy`` (test accuracy before DDROP, after the DDROP phase, right after
pruning and after fine-tuning), ``amount``, ``pruned_units`` (layer ->
``[pruned, units]``), ``dense`` and ``pruned`` whole-model figures (params,
MACs; ``models.flops.report``) and ``export`` (the files of ``pack``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import models
from models import latency as latency_lib
from models import paths
from ddrop_jax import latency as ddrop_latency
from ddrop_jax.config import DdropConfig
from ddrop_jax.pruning import prune
from ddrop_jax.selection import (DdropLayer, ddrop_layers, init_scales,
                                 prune_layers)
from ddrop_jax.train import (STATS, ddrop_optimizer, init_extra,
                             make_ddrop_train_step)
from training import config as config_lib
from training import loop
from training import mesh as mesh_lib
from training import optim
from training import pipeline
from training import state as state_lib
from training import steps
from training.state import TrainState

# Model families trained with AdamW + warm-up cosine (spec section 1).
TRANSFORMER_FAMILIES = pipeline.TRANSFORMER_FAMILIES
EXPORT_DIR = "export"
PRUNE_FILE = "prune.json"
# Offsets of each phase's data order and rng stream (phases restart at step 0).
_PHASE_INDEX = {"before": 0, "ddrop": 1, "finetune": 2}


def phase_optim(config: Mapping[str, Any], model_name: str
                ) -> dict[str, Any]:
  """The ``optim`` section of every DDROP phase (lr set per phase).

  Args:
    config: the run config.
    model_name: registry name (chooses the CNN or transformer recipe).

  Returns:
    ``config.optim`` with optimizer, schedule, momentum, weight decay and its
    mask set from ``config.ddrop``.
  """
  d = config["ddrop"]
  family = models.model_spec(model_name).family
  name = d["optimizer"]
  if name == "auto":
    name = "adamw" if family in TRANSFORMER_FAMILIES else "sgd"
  section = dict(config["optim"].items())
  section.update(
      optimizer=name,
      schedule="warmup_cosine" if name == "adamw" else "onecycle",
      momentum=d["momentum"], weight_decay=d["weight_decay"],
      wd_mask="weights", nesterov=False)
  return section


def _phase_state(state: TrainState, tx: Any, phase: str, mesh: Any,
                 extra: Any = None) -> TrainState:
  """``state`` with a fresh optimizer, step 0 and the phase's rng stream."""
  state = state.replace(
      step=jnp.zeros([], jnp.int32),
      opt_state=tx.init(state.params),
      rng=jax.random.fold_in(state.rng, _PHASE_INDEX[phase]),
      extra={} if extra is None else extra)
  return mesh_lib.replicate(state, mesh)


def _test_accuracy(evals: Mapping[str, Any] | None) -> float | None:
  if not evals:
    return None
  return float(evals["test"]["accuracy"])


def pruned_units(masks: Mapping[str, Any],
                 layers: Sequence[DdropLayer]) -> dict[str, list[int]]:
  """``layer name -> [pruned units, units]`` read off the ``masks``.

  Args:
    masks: the ``masks`` collection after ``prune``.
    layers: the pruned layers.

  Returns:
    The per-layer counts (a unit is pruned when its norm scale mask, or for a
    norm-less Linear its kernel mask column, is 0).
  """
  out = {}
  for layer in layers:
    if layer.norm is not None:
      m = paths.require(masks, layer.norm + ("scale",), "masks")
    else:
      m = np.max(np.asarray(paths.require(
          masks, layer.producer + ("kernel",), "masks")), axis=0)
    m = np.asarray(m)
    out[layer.name] = [int((m == 0).sum()), int(m.size)]
  return out


def run(config: Mapping[str, Any], workdir: str | pathlib.Path
        ) -> dict[str, Any]:
  """Runs the DDROP stages (``method='ddrop'``).

  Args:
    config: the run config (``config.ddrop`` holds the method's fields).
    workdir: the run directory.

  Returns:
    The report dict (also in ``workdir/report.json``).
  """
  return execute(config, workdir)[0]


@pipeline.holds_workdir
def execute(config: Mapping[str, Any], workdir: str | pathlib.Path
            ) -> tuple[dict[str, Any], TrainState]:
  """:func:`run`, also returning the final state.

  Args:
    config: the run config.
    workdir: the run directory.

  Returns:
    ``(report, state)``: the report dict and the last stage's state (after
    ``finetune``: pruned params with their ``masks``).
  """
  env = pipeline.setup(config, workdir)
  info, mesh, spe = env.info, env.mesh, env.steps_per_epoch
  d = config["ddrop"]
  selected = config_lib.selected_stages(config)
  model = pipeline.build_model(config, info.num_classes)
  section = phase_optim(config, config["model"])

  def make_tx(epochs: int, lr: float):
    return optim.make_optimizer(section, epochs=epochs, steps_per_epoch=spe,
                                lr=lr)

  evaluator = pipeline.make_evaluator(config, env, model)
  targets = pipeline.step_options(config)  # CutMix/MixUp, smoothing.
  accuracy: dict[str, float | None] = {}

  def train_stage(name, state, step_fn, epochs):
    result = loop.run_stage(
        name, state, step_fn, num_steps=epochs * spe,
        train_data=pipeline.train_data(config, env, _PHASE_INDEX[name]),
        steps_per_epoch=spe, mesh=mesh, workdir=env.workdir, config=config,
        eval_fn=evaluator)
    env.report.add_stage(name, result.summary(config["select_on"]))
    accuracy[name] = _test_accuracy(result.final)
    return result.state

  tx, lr_fn = make_tx(max(d["before_epochs"], 1), d["lr"])
  state = state_lib.create_train_state(
      model, tx, jax.random.key(config["seed"]),
      (info.image_size, info.image_size, info.channels))
  state = pipeline.pretrained_start(config, model, state)
  state = mesh_lib.replicate(state, mesh)

  # 1. Plain training.
  if d["before_epochs"] > 0 and "before" in selected:
    state = _phase_state(state, tx, "before", mesh)
    step_fn = steps.make_train_step(model, tx, info, mesh, lr_schedule=lr_fn,
                                    dtype=env.dtype, **targets)
    state = train_stage("before", state, step_fn, d["before_epochs"])

  # 2. DDROP training.
  cfg = DdropConfig.from_engine(d).with_phase_steps(d["epochs"] * spe)
  shape = (info.image_size, info.image_size, info.channels)
  layers = ddrop_layers(model, shape, dense_drop=cfg.dense_drop)
  to_prune = prune_layers(model, layers, cfg.prune_residual, shape)
  env.report.merge({"ddrop": {
      "layers": [l.name for l in layers], "total_steps": cfg.total_steps,
      "amount": cfg.amount}})
  if "ddrop" in selected:
    base_tx, lr_fn = make_tx(d["epochs"], d["lr"])
    tx = ddrop_optimizer(base_tx, layers, cfg)
    state = state.replace(params=init_scales(layers, state.params))
    state = _phase_state(state, tx, "ddrop", mesh,
                         extra=init_extra(layers, cfg))
    step_fn = make_ddrop_train_step(model, tx, info, mesh, layers, cfg,
                                    lr_schedule=lr_fn, dtype=env.dtype,
                                    **targets)
    state = train_stage("ddrop", state, step_fn, d["epochs"])

  dense = pipeline.model_figures(model, state.variables(), info.image_size)
  env.report.merge({"dense": dense})

  # 3. Pruning (DDROP off from here on).
  if "prune" in selected:
    stats = (state.extra or {}).get(STATS)
    cfg, latency = _latency_target(config, env, model, shape, state, to_prune,
                                   cfg, stats)
    v = prune(state.variables(), to_prune, cfg, stats=stats)
    # Computed on each host from the replicated state: must agree.
    mesh_lib.check_same_on_processes(v["masks"], "DDROP prune masks")
    state = state.replace(params=v["params"], batch_stats=v["batch_stats"],
                          masks=v["masks"], extra={})
    state = mesh_lib.replicate(state, mesh)
    evals = evaluator(state)
    accuracy["pruned"] = _test_accuracy(evals)
    counts = pruned_units(v["masks"], to_prune)
    pruned = pipeline.model_figures(model, state.variables(), info.image_size)
    record = {"amount": cfg.amount, "prune_residual": cfg.prune_residual,
              "evaluation": evals, "pruned_units": counts, "pruned": pruned,
              "latency": latency}
    if mesh_lib.is_primary():
      env.workdir.mkdir(parents=True, exist_ok=True)
      (env.workdir / PRUNE_FILE).write_text(json.dumps(record, indent=1,
                                                       default=float))
    pick = evals.get(config["select_on"])
    env.report.add_stage("prune", {"steps": 0, "seconds": 0.0, "final": pick,
                                   "best": pick, "best_step": 0,
                                   "evaluations": evals})
    env.report.merge({"amount": cfg.amount, "pruned_units": counts,
                      "pruned": pruned, "latency": latency})

  # 4. Fine-tuning with the masks held fixed.
  if d["ft_epochs"] > 0 and "finetune" in selected:
    tx, lr_fn = make_tx(d["ft_epochs"], d["ft_lr"])
    state = _phase_state(state, tx, "finetune", mesh)
    step_fn = steps.make_train_step(model, tx, info, mesh, lr_schedule=lr_fn,
                                    dtype=env.dtype, **targets)
    state = train_stage("finetune", state, step_fn, d["ft_epochs"])
  env.report.merge({"accuracy": accuracy})

  # 5. Slimmed PyTorch export (written by process 0).
  if "pack" in selected and mesh_lib.is_primary():
    entry = pipeline.export_stage(
        config, env, state.variables(),
        lambda: pack(model, state.variables(), env.workdir / EXPORT_DIR,
                     info.image_size, info.channels))
    env.report.merge({"export": entry, "preprocess": entry["preprocess"],
                      "exported": exported_entry(env.report.data)})
  return pipeline.finish(env, model, state, summary, SUMMARY_KEYS), state


# Report entries ``summary`` shows (the whole-model figures are the engine's).
SUMMARY_KEYS = ("accuracy", "pruned_units", "dense", "pruned", "ddrop",
                "amount")


def summary(report: Mapping[str, Any]) -> list[str]:
  """The DDROP lines of the run summary: accuracy per phase, pruned units.

  Args:
    report: the report dict.

  Returns:
    Lines (``training.report.Report.summary`` wraps them).
  """
  pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"
  acc = report.get("accuracy", {})
  lines = [f"accuracy: before DDROP {pct(acc.get('before'))}, after the DDROP "
           f"phase {pct(acc.get('ddrop'))}, right after pruning "
           f"{pct(acc.get('pruned'))}, after fine-tuning "
           f"{pct(acc.get('finetune'))}"]
  units = report.get("pruned_units") or {}
  if units:
    pruned = sum(p for p, _ in units.values())
    total = sum(n for _, n in units.values())
    lines.append(f"pruned units: {pruned} of {total} in {len(units)} layers "
                 f"(amount {report.get('amount')}); per layer in report.json")
  return lines


def exported_entry(report: Mapping[str, Any]) -> dict[str, str]:
  """Which state the export holds and why (the report's ``exported``)."""
  stages = report.get("stages", {})
  last = next((n for n in ("finetune", "prune", "ddrop", "before")
               if n in stages), None)
  if last is None:
    return {"what": "the initial model", "why": "no stage ran"}
  st = stages[last]
  # The prune stage's final/best hold only the selection split's metrics;
  # its per-split evaluations are under "evaluations".
  acc = _test_accuracy(st.get("evaluations") or st.get("final"))
  what = ("the pruned model, not fine-tuned" if last == "prune" else
          f"{last}'s final state (step {st.get('steps', 0)})")
  if acc is not None:
    what += f", test {100 * acc:.2f} %"
  why = "the pipeline exports the state its last stage ends with"
  best = _test_accuracy(st.get("best"))
  if last != "prune" and best is not None and best != acc:
    why += (f"; the stage's best checkpoint (test {100 * best:.2f} % at step "
            f"{st.get('best_step')}) stays in {last}/")
  return {"what": what, "why": why}


def pack(model: Any, variables: Mapping[str, Any], out_dir: pathlib.Path,
         image_size: int, channels: int = 3) -> dict[str, Any]:
  """Writes the exports: every format that applies (``convert.formats``:
  slimmed torchvision-named modules for the registry families, the compact
  network and ONNX for any model).

  Args:
    model: the Flax model.
    variables: its pruned (masked) variables.
    out_dir: the export directory.
    image_size: input height/width.

  Returns:
    ``{'dir', 'files', 'max_abs_diff', 'params_slim'}`` for the report.
  """
  try:
    from convert import formats  # Imports torch: only when packing.
  except ImportError as e:
    raise RuntimeError(f"stage 'pack' needs convert and torch ({e}); "
                       "leave 'pack' out of config.stages to skip it") from e
  out = formats.export(model, variables, out_dir,
                       (image_size, image_size, channels))
  summary = out.details.get("summary")
  return {"dir": str(out_dir),
          "files": {k: str(p) for k, p in out.files.items()},
          "max_abs_diff": {k: float(v) for k, v in out.max_abs_diff.items()},
          "params_slim": int(summary.params_after if summary is not None
                             else out.details["params_after"])}


def _latency_target(config, env, model, shape, state, layers, cfg, stats):
  """``cfg`` with the amount of ``ddrop.target_latency`` (when set), and the
  predicted latency of the prune (the report's ``latency``)."""
  graph = models.analyze(model, shape[:2], shape[2])
  targeted = cfg.target_latency > 0
  lat = latency_lib.from_config(config["latency"], env.workdir, graph,
                                targeted)
  variables = jax.device_get(state.variables())
  if targeted:
    choice = ddrop_latency.choose_amount(graph, lat, variables, layers, cfg,
                                         cfg.target_latency, stats)
    cfg = dataclasses.replace(cfg, amount=choice.amount)
    return cfg, {**choice.figures, "target": cfg.target_latency,
                 "trials": [list(t) for t in choice.trials]}
  seconds = ddrop_latency.predicted_seconds(graph, lat, variables, layers,
                                            cfg, cfg.amount, stats)
  return cfg, lat.figures(seconds)
