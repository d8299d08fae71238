"""Accuracy vs FLOPs: DSP and DDROP against L1-norm, random and dense.

    python bench/study.py --out runs/study [--quick] [--seeds 0 1 2]
        [--targets 50 70 80] [--models cifar_resnet8 [cifar_vgg_small ...]]
        [--dataset digits] [--data-dir DIR] [--train-images 500] [--batch 32]
        [--pretrain 16] [--phase 3] [--finetune 3]

Several invocations with different ``--models`` may share one ``--out`` at
the same time (``results.json`` is appended to under a lock).

Per model and seed, every arm gets ``pretrain + phase + finetune`` epochs:

* shared: ``pretrain`` epochs of plain training (DSP's recipe: SGD, coupled
  weight decay, step schedule with warm-up), once per seed;
* ``phase`` epochs, once per seed and arm family: DSP's group learning
  (``dsp_jax.pipeline.group``); DDROP training (dropping + L1, the DDROP
  phase's one-cycle SGD); for L1, random and dense the same one-cycle SGD
  without dropping or L1;
* per target of whole-model MACs removed: DDROP (|γ|), L1-norm filters and
  random units prune ``floor(amount * C)`` units of the same layers with the
  one amount whose MACs are closest to the target (``training.baselines``);
  DSP prunes at the group-pruning threshold β whose MACs are closest to what
  that amount reaches (equal MACs for every arm);
* ``finetune`` epochs of the same schedule for every arm (one cosine cycle of
  DSP's fine-tuning optimizer, masks held fixed); dense fine-tunes unpruned.

Accuracies are final test accuracies (no checkpoint selection). FLOPs are
``models.flops.report`` with dead structure removed, both measures (DSP's
P.FLOPS/P.PARAMS and whole-model MACs/params). The pruned models of the first
seed are exported through ``convert.cli.export_dir`` (logits checked).

Writes ``OUT/results.json`` after every finished run (a restarted study skips
those and resumes unfinished ones from their checkpoints in
``OUT/runs/<model>/seed<s>/<run>/``), ``OUT/accuracy_vs_flops.png`` and
``OUT/table.md`` (also printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Mapping

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

METHODS = ("dsp", "ddrop", "l1", "random")
ARMS = METHODS + ("dense",)
LABELS = {"dsp": "DSP", "ddrop": "DDROP", "l1": "L1-norm", "random": "random",
          "dense": "dense"}
COLORS = {"dsp": "C0", "ddrop": "C1", "l1": "C2", "random": "C3"}
# Phases of the data order / rng stream of each training run.
OFFSETS = {"pretrain": 0, "group": 1, "plain": 2, "ddrop": 3, "finetune": 4,
           "random": 5}
FULL = dict(seeds=[0, 1, 2], targets=[50.0, 70.0, 80.0], train_images=500,
            batch=32, pretrain=16, phase=3, finetune=3)
QUICK = dict(seeds=[0], targets=[50.0, 80.0], train_images=192, batch=32,
             pretrain=2, phase=1, finetune=1)
GROUPS = 4


# ------------------------------------------------------------------ config
def make_config(args: argparse.Namespace, model_name: str, seed: int):
  """The run config of one model and seed (DSP and DDROP quickstart fields).

  Args:
    args: the parsed command line.
    model_name: registry name.
    seed: the seed.

  Returns:
    A validated ``ml_collections.ConfigDict`` (``method='dsp'``).
  """
  from configs import ddrop_quickstart, quickstart
  from training import data
  config = quickstart.get_config()
  ddrop = ddrop_quickstart.get_config().ddrop
  config.model, config.seed = model_name, seed
  config.dataset, config.data_dir = args.dataset, args.data_dir
  config.batch_size, config.test_batch_size = args.batch, 200
  data.prepare(args.dataset, args.data_dir or None)
  total = data.get_info(args.dataset, args.data_dir or None).splits["train"]
  if 0 < args.train_images < total:
    # The rest is held out (and never read): fewer images separate methods.
    config.validation_from_train = total - args.train_images
  config.dsp.groups = GROUPS
  config.dsp.pretrain_epochs = args.pretrain
  config.dsp.group_epochs = args.phase
  config.dsp.finetune_epochs = args.finetune
  config.dsp.cycles = 1
  for field in ("prob", "schedule", "lr", "l1", "ft_lr"):
    config.ddrop[field] = ddrop[field]
  config.ddrop.epochs = args.phase
  config.ddrop.before_epochs = 0
  config.ddrop.ft_epochs = args.finetune
  # Evaluate at the end of each run only; accuracies are final ones.
  config.eval_every_epochs = 10_000
  config.checkpoint_every_steps = 100
  config.log_every_steps = 100
  config.progress_bar = False
  return config


# ------------------------------------------------------------------ engine
class Runner:
  """Training runs of one model and seed, sharing jitted steps per model."""

  _cache: dict[Any, Any] = {}

  def __init__(self, config, root: pathlib.Path):
    from training import pipeline
    self.config = config
    self.root = root
    self.env = pipeline.setup(config, root)
    self.spe = self.env.steps_per_epoch
    self.name = config.model

  def model(self, gated: bool = False):
    from training import pipeline
    return pipeline.build_model(self.config, self.env.info.num_classes,
                                **({"groups": GROUPS} if gated else {}))

  def layers(self, scope: str = "ddrop_layers"):
    """The DDROP layers (scope ``all``: plus the norms after residual convs,
    ``prune_residual``)."""
    import ddrop_jax
    info = self.env.info
    shape = (info.image_size, info.image_size, info.channels)
    layers = ddrop_jax.ddrop_layers(self.model(), shape)
    return ddrop_jax.prune_layers(self.model(), layers, scope == "all", shape)

  def cached(self, key, build):
    key = (self.name, self.spe) + key
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  def evaluator(self, gated: bool):
    """Test accuracy of a state (the selection split is 'test')."""
    from training import data, steps
    env, config = self.env, self.config

    def build():
      step = steps.make_eval_step(self.model(gated), env.info, env.mesh,
                                  dtype=env.dtype)
      return lambda state: {"test": steps.evaluate(
          step, state, data.eval_batches(
              config.dataset, "test", env.data_dir,
              batch_size=config.test_batch_size,
              validation_from_train=config.validation_from_train), env.mesh)}
    return self.cached(("eval", gated), build)

  def state(self, variables: Mapping[str, Any], tx, phase: str, extra=None):
    """A replicated step-0 state holding ``variables``."""
    import jax
    import jax.numpy as jnp
    from training import mesh as mesh_lib
    from training.state import TrainState
    v = jax.tree.map(jnp.asarray, dict(variables))
    state = TrainState(
        step=jnp.zeros([], jnp.int32), params=v["params"],
        batch_stats=v.get("batch_stats", {}), masks=v.get("masks", {}),
        gates=v.get("gates", {}), opt_state=tx.init(v["params"]),
        rng=jax.random.fold_in(jax.random.key(self.config.seed),
                               OFFSETS[phase]),
        extra={} if extra is None else extra)
    return mesh_lib.replicate(state, self.env.mesh)

  def fit(self, run: str, phase: str, state, step_fn, epochs: int,
          gated: bool = False):
    """``loop.run_stage`` of one run (resumes, or restores when finished)."""
    from training import loop, pipeline
    return loop.run_stage(
        phase, state, step_fn, num_steps=epochs * self.spe,
        train_data=pipeline.train_data(self.config, self.env,
                                       OFFSETS[phase]),
        steps_per_epoch=self.spe, mesh=self.env.mesh,
        workdir=self.root / run, config=self.config,
        eval_fn=self.evaluator(gated))

  # -- the shared phases
  def pretrain(self):
    """Plain training with DSP's pretraining recipe."""
    import jax
    from training import optim, state as state_lib, steps
    d, o = self.config.dsp, self.config.optim
    model = self.model()

    def build():
      lr_fn = optim.dsp_step(d.pretrain_lr, d.pretrain_epochs, self.spe,
                             o.warmup_epochs, o.warmup_factor)
      tx = optim.sgd_torch(lr_fn, d.momentum, d.pretrain_wd)
      return tx, steps.make_train_step(model, tx, self.env.info,
                                       self.env.mesh, lr_schedule=lr_fn,
                                       dtype=self.env.dtype)
    tx, step_fn = self.cached(("pretrain",), build)
    info = self.env.info
    init = state_lib.create_train_state(
        model, tx, jax.random.key(self.config.seed),
        (info.image_size, info.image_size, info.channels))
    state = self.state(init.variables(), tx, "pretrain")
    return self.fit("pretrain", "pretrain", state, step_fn,
                    d.pretrain_epochs)

  def phase(self, kind: str, variables):
    """``phase`` epochs of DDROP training or the same without DDROP."""
    import ddrop_jax
    from ddrop_jax import pipeline as ddrop_pipeline
    from ddrop_jax.config import DdropConfig
    from training import optim, steps
    d = self.config.ddrop
    model = self.model()
    layers = self.layers()
    cfg = DdropConfig.from_engine(d).with_phase_steps(d.epochs * self.spe)

    def build():
      section = ddrop_pipeline.phase_optim(self.config, self.name)
      tx, lr_fn = optim.make_optimizer(section, epochs=d.epochs,
                                       steps_per_epoch=self.spe, lr=d.lr)
      if kind == "plain":
        return tx, steps.make_train_step(model, tx, self.env.info,
                                         self.env.mesh, lr_schedule=lr_fn,
                                         dtype=self.env.dtype)
      tx = ddrop_jax.ddrop_optimizer(tx, layers, cfg)
      return tx, ddrop_jax.make_ddrop_train_step(
          model, tx, self.env.info, self.env.mesh, layers, cfg,
          lr_schedule=lr_fn, dtype=self.env.dtype)
    tx, step_fn = self.cached(("phase", kind), build)
    extra = None
    if kind == "ddrop":
      from ddrop_jax.train import init_extra
      extra = init_extra(layers, cfg)
    return self.fit(kind, kind, self.state(variables, tx, kind, extra),
                    step_fn, d.epochs)

  def group(self, variables):
    """DSP's group-learning stage (``dsp_jax.pipeline.group``)."""
    import dataclasses as dc
    from dsp_jax import pipeline as dsp_pipeline
    env = dc.replace(self.env, workdir=self.root / "group")
    t = time.time()
    out = dsp_pipeline.group(self.config, env, dict(variables))
    return out, time.time() - t

  def finetune(self, run: str, variables, gated: bool):
    """The fine-tuning every arm gets: one cosine cycle, masks held fixed."""
    import dsp_jax
    from training import steps
    d = self.config.dsp
    model = self.model(gated)

    def build():
      tx = dsp_jax.cycle_optimizer(d.finetune_lr, d.finetune_epochs,
                                   self.spe, d.momentum, d.finetune_wd)
      lr_fn = dsp_jax.cycle_schedule(d.finetune_lr, d.finetune_epochs,
                                     self.spe)
      return tx, steps.make_train_step(model, tx, self.env.info,
                                       self.env.mesh, lr_schedule=lr_fn,
                                       dtype=self.env.dtype)
    tx, step_fn = self.cached(("finetune", gated), build)
    state = self.state(variables, tx, "finetune")
    before = self.evaluator(gated)(state)["test"]["accuracy"]
    result = self.fit(run, "finetune", state, step_fn, d.finetune_epochs,
                      gated)
    return float(before), float(result.final["test"]["accuracy"])


# ------------------------------------------------------------------ pruning
def figures(model, variables, image_size: int) -> dict[str, float]:
  """Both FLOPs/params measures, dead structure removed."""
  from models import flops
  rep = flops.report(model, {"params": variables["params"],
                             "masks": variables.get("masks")}, image_size,
                     remove_dead=True)
  return {"macs": int(rep.macs), "macs_dense": int(rep.macs_dense),
          "params": int(rep.params), "params_dense": int(rep.params_dense),
          "pflops_whole_model": float(rep.pflops_whole_model),
          "pparams_whole_model": float(rep.pparams_whole_model),
          "dsp_pflops": float(rep.dsp_pflops),
          "dsp_pparams": float(rep.dsp_pparams)}


def amount_table(runner: Runner, variables, scope: str) -> list[list[float]]:
  """``[amount, whole-model MACs removed %]`` of every distinct amount.

  The MACs of uniform per-layer pruning depend on the per-layer counts
  ``floor(amount * C)`` only, so the candidates are the amounts k / C.
  """
  import ddrop_jax
  from ddrop_jax.config import DdropConfig
  layers = runner.layers(scope)
  sizes = {l.units for l in layers}
  model, size = runner.model(), runner.env.info.image_size
  rows = []
  for a in sorted({k / c for c in sizes for k in range(c)}):
    v = ddrop_jax.prune(variables, layers, DdropConfig(amount=a))
    rows.append([a, figures(model, v, size)["pflops_whole_model"]])
  return rows


def closest(rows, target: float):
  """The row whose MACs reduction is closest to ``target``."""
  return min(rows, key=lambda r: (abs(r[1] - target), r[0]))


def dsp_prune(runner: Runner, group_vars, target: float):
  """DSP's group channel pruning at the β closest to ``target`` % MACs."""
  import dsp_jax
  from dsp_jax import pipeline as dsp_pipeline
  from dsp_jax import pruning as dsp_pruning
  model, size = runner.model(gated=True), runner.env.info.image_size
  info = runner.env.info
  layer_info = dsp_jax.analyze(model, (size, size, info.channels))
  pruner = dsp_pruning.Pruner(group_vars["params"], group_vars["gates"],
                              layer_info, GROUPS,
                              **dsp_pipeline.fp_options(runner.config))

  # A larger β prunes more (spec dsp.md §3); an unreachable β (everything
  # pruned) counts as too large.
  lo, hi, best = 0.0, 1.0, None
  for _ in range(20):
    beta = (lo + hi) / 2
    try:
      res = pruner.result(beta)
    except ValueError:
      hi = beta
      continue
    got = figures(model, {"params": res.params, "masks": res.masks},
                  size)["pflops_whole_model"]
    if best is None or abs(got - target) < abs(best[2] - target):
      best = (beta, res, got)
    if got < target:
      lo = beta
    else:
      hi = beta
  if best is None:
    raise ValueError(f"DSP: no threshold prunes toward {target} % MACs")
  beta, res, _ = best
  return beta, {**group_vars, "params": res.params, "masks": res.masks}


def dsp_available(runner: Runner) -> str | None:
  """None when DSP's pieces accept the model, else why not."""
  try:
    import dsp_jax
    info = runner.env.info
    dsp_jax.analyze(runner.model(gated=True),
                    (info.image_size, info.image_size, info.channels))
  except (ValueError, TypeError, KeyError, NotImplementedError) as e:
    return f"{type(e).__name__}: {e}"
  return None


# ------------------------------------------------------------------ results
class Results:
  """``results.json``: the setting, shared phases and one record per run.

  Invocations for different ``--models`` may share one ``--out`` at the same
  time: every write re-reads the file under a lock and appends to it.
  """

  def __init__(self, path: pathlib.Path, setting: Mapping[str, Any]):
    self.path = path
    self.setting = {k: v for k, v in setting.items() if k != "models"}
    self.models = list(setting["models"])
    with self._locked():
      self._load()
      # Notes say what an invocation could not run; they are found afresh.
      self.data["notes"] = [n for n in self.data["notes"]
                            if not any(m in n for m in self.models)]
      self._write()

  def _locked(self):
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def lock():
      with open(self.path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
          yield
        finally:
          fcntl.flock(f, fcntl.LOCK_UN)
    return lock()

  def _load(self) -> None:
    self.data = {"setting": {**self.setting, "models": []}, "shared": [],
                 "runs": [], "notes": [], "invocations": []}
    if self.path.is_file():
      old = json.loads(self.path.read_text())
      if {k: v for k, v in old["setting"].items()
          if k != "models"} != self.setting:
        raise SystemExit(f"{self.path} holds a study with another setting; "
                         "use another --out or the same options")
      self.data.update(old)
    models = self.data["setting"]["models"]
    models += [m for m in self.models if m not in models]

  def done(self, kind: str, **key) -> dict[str, Any] | None:
    for r in self.data[kind]:
      if all(r.get(k) == v for k, v in key.items()):
        return r
    return None

  def add(self, kind: str, record: Mapping[str, Any]) -> None:
    with self._locked():
      self._load()
      self.data[kind].append(dict(record))
      self._write()

  def note(self, text: str) -> None:
    with self._locked():
      self._load()
      if text not in self.data["notes"]:
        self.data["notes"].append(text)
      self._write()

  def _write(self) -> None:
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(self.data, indent=1))
    os.replace(tmp, self.path)


def export_check(stage_dir: pathlib.Path, out: pathlib.Path) -> float:
  """Exports a fine-tuned run; the largest |logit| difference measured."""
  from convert import cli
  result = cli.export_dir(stage_dir, out, program=False, which="latest",
                          fast_options=None)
  return max(float(v) for v in result.max_abs_diff.values())


# ------------------------------------------------------------------ study
def study_model(args, name: str, seed: int, results: Results) -> None:
  """Every target and arm of one model and seed."""
  import jax
  import ddrop_jax
  from ddrop_jax.config import DdropConfig
  from training import baselines
  config = make_config(args, name, seed)
  root = pathlib.Path(args.out) / "runs" / name / f"seed{seed}"
  runner = Runner(config, root)
  size = runner.env.info.image_size
  missing = dsp_available(runner)
  if missing:
    results.note(f"DSP is not available for {name}: {missing}")

  def shared(phase, fn):
    t = time.time()
    result = fn()
    if not results.done("shared", model=name, seed=seed, phase=phase):
      results.add("shared", {
          "model": name, "seed": seed, "phase": phase,
          "test_accuracy": float(result.final["test"]["accuracy"]),
          "seconds": time.time() - t})
    return jax.device_get(result.state.variables())

  pre = shared("pretrain", runner.pretrain)
  plain = shared("plain", lambda: runner.phase("plain", pre))
  ddropped = shared("ddrop", lambda: runner.phase("ddrop", pre))
  group_vars = None
  if not missing:
    try:
      group_vars, sec = runner.group(pre)
    except Exception as e:  # pylint: disable=broad-except
      # The study reports the other arms of a model DSP cannot train yet.
      results.note(f"DSP group learning failed on {name}: "
                   f"{type(e).__name__}: {str(e).splitlines()[0]}")
    else:
      if not results.done("shared", model=name, seed=seed, phase="group"):
        results.add("shared", {"model": name, "seed": seed,
                               "phase": "group", "seconds": sec})
  scope, rows = channel_scope(args, runner, pre)
  layers = runner.layers(scope)

  def record(method, target, run, variables, gated, extra):
    if results.done("runs", model=name, seed=seed, method=method,
                    target=target):
      return
    t = time.time()
    figs = figures(runner.model(gated), variables, size)
    before, after = runner.finetune(run, variables, gated)
    rec = {"model": name, "seed": seed, "method": method, "target": target,
           **extra, **figs, "acc_before_ft": before, "acc_after_ft": after}
    if seed == args.seeds[0] and method != "dense":
      try:
        rec["export_max_abs_diff"] = export_check(
            root / run / "finetune", root / run / "export")
      except Exception as e:  # pylint: disable=broad-except
        rec["export_error"] = f"{type(e).__name__}: {e}"
    rec["seconds"] = time.time() - t
    results.add("runs", rec)
    print(f"{name} seed {seed} {method:>6} target {target:>4.0f}%: MACs "
          f"-{figs['pflops_whole_model']:.1f}% acc {100 * before:.2f} -> "
          f"{100 * after:.2f} ({rec['seconds']:.0f}s)", flush=True)

  record("dense", 0.0, "dense", plain, False, {})
  for target in args.targets:
    amount, reached = closest(rows, target)
    tag = f"t{target:g}"
    extra = {"scope": scope, "amount": amount}
    if group_vars is not None and not results.done(
        "runs", model=name, seed=seed, method="dsp", target=target):
      # DSP's threshold is continuous: it aims at the MACs the per-layer
      # counts of the channel arms reach, so that all arms are compared at
      # equal MACs.
      beta, v = dsp_prune(runner, group_vars, reached)
      record("dsp", target, f"dsp_{tag}", v, True, {"beta": beta})
    cfg = dataclasses.replace(DdropConfig.from_engine(config.ddrop),
                              amount=amount, prune_residual=scope == "all")
    record("ddrop", target, f"ddrop_{tag}",
           ddrop_jax.prune(ddropped, layers, cfg), False, extra)
    record("l1", target, f"l1_{tag}", baselines.prune(
        plain, layers, criterion="l1", amount=amount), False, extra)
    key = jax.random.fold_in(jax.random.key(seed), OFFSETS["random"])
    record("random", target, f"random_{tag}", baselines.prune(
        plain, layers, criterion="random", amount=amount, rng=key), False,
           extra)


def channel_scope(args, runner: Runner, variables):
  """The prune scope of the channel arms and its amount table (cached).

  ``ddrop_layers`` (block-internal units of a ResNet) when it reaches the
  highest target within 2 points, else ``all``.
  """
  path = pathlib.Path(args.out) / f"amounts_{runner.name}.json"
  if path.is_file():
    cached = json.loads(path.read_text())
    return cached["scope"], cached["rows"]
  rows = amount_table(runner, variables, "ddrop_layers")
  scope = "ddrop_layers"
  if max(r[1] for r in rows) < max(args.targets) - 2:
    scope, rows = "all", amount_table(runner, variables, "all")
  path.write_text(json.dumps({"scope": scope, "rows": rows}))
  return scope, rows


# ------------------------------------------------------------------ output
def _stats(xs):
  xs = list(xs)
  return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(data: Mapping[str, Any]):
  """``{model: {(method, target): {...means and stds...}}}``."""
  out: dict[str, dict] = {}
  groups: dict[tuple, list] = {}
  for r in data["runs"]:
    groups.setdefault((r["model"], r["method"], r["target"]), []).append(r)
  for (model, method, target), rs in sorted(groups.items()):
    out.setdefault(model, {})[(method, target)] = {
        "n": len(rs),
        "macs": _stats(r["pflops_whole_model"] for r in rs),
        "params": _stats(r["pparams_whole_model"] for r in rs),
        "dsp_pflops": _stats(r["dsp_pflops"] for r in rs),
        "before": _stats(100 * r["acc_before_ft"] for r in rs),
        "after": _stats(100 * r["acc_after_ft"] for r in rs)}
  return out


def verdict(a, b) -> str:
  """Whether mean ``a`` beats ``b`` beyond one combined std."""
  diff = a[0] - b[0]
  spread = math.hypot(a[1], b[1])
  word = ("beats" if diff > spread else "loses to" if diff < -spread
          else "ties")
  return f"{word} ({diff:+.2f} pt, spread {spread:.2f})"


def table(data: Mapping[str, Any]) -> str:
  """The Markdown tables and per-setting verdicts."""
  s = data["setting"]
  lines = [f"Test accuracy % (mean ± std over seeds {s['seeds']}); budget "
           f"per arm: {s['pretrain']} + {s['phase']} + {s['finetune']} "
           f"epochs on {s['dataset']} ({s['train_images'] or 'all'} "
           "training images)."]
  pm = lambda v, f=".2f": f"{v[0]:{f}} ± {v[1]:{f}}"
  for model, rows in summarize(data).items():
    lines += ["", f"**{model}**", "",
              "| method | target | MACs removed % | params removed % | "
              "P.FLOPS % | before FT | after FT | n |",
              "|---|---|---|---|---|---|---|---|"]
    for (method, target), v in sorted(rows.items(),
                                      key=lambda kv: (kv[0][1],
                                                      ARMS.index(kv[0][0]))):
      lines.append(
          f"| {LABELS[method]} | {target:g} | {pm(v['macs'], '.1f')} | "
          f"{pm(v['params'], '.1f')} | {pm(v['dsp_pflops'], '.1f')} | "
          f"{pm(v['before'])} | {pm(v['after'])} | {v['n']} |")
    lines.append("")
    for target in sorted({t for _, t in rows if t > 0}):
      for m in ("dsp", "ddrop"):
        if (m, target) not in rows:
          continue
        mine = rows[(m, target)]["after"]
        parts = [f"{verdict(mine, rows[(b, target)]['after'])} {LABELS[b]}"
                 for b in ("l1", "random") if (b, target) in rows]
        lines.append(f"* {model}, {target:g} %: {LABELS[m]} "
                     + "; ".join(parts))
  for n in data.get("notes", []):
    lines.append(f"* note: {n}")
  return "\n".join(lines)


def plot(data: Mapping[str, Any], path: pathlib.Path) -> None:
  """Accuracy after fine-tuning vs MACs removed, mean ± std per method."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  summary = summarize(data)
  fig, axes = plt.subplots(1, max(1, len(summary)), squeeze=False,
                           figsize=(5.5 * max(1, len(summary)), 4.2))
  for ax, (model, rows) in zip(axes[0], summary.items()):
    for method in METHODS:
      pts = sorted((t, v) for (m, t), v in rows.items() if m == method)
      if not pts:
        continue
      ax.errorbar([v["macs"][0] for _, v in pts],
                  [v["after"][0] for _, v in pts],
                  xerr=[v["macs"][1] for _, v in pts],
                  yerr=[v["after"][1] for _, v in pts], marker="o",
                  capsize=3, color=COLORS[method], label=LABELS[method])
    if ("dense", 0.0) in rows:
      mean, sd = rows[("dense", 0.0)]["after"]
      ax.axhline(mean, color="k", ls="--", lw=1, label="dense")
      ax.axhspan(mean - sd, mean + sd, color="k", alpha=0.1)
    ax.set_title(model)
    ax.set_xlabel("whole-model MACs removed (%)")
    ax.set_ylabel("test accuracy after fine-tuning (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--quick", action="store_true",
                 help="one seed, two targets, 2 + 1 + 1 epochs")
  p.add_argument("--models", nargs="+",
                 default=["cifar_resnet8"])
  p.add_argument("--seeds", type=int, nargs="+")
  p.add_argument("--targets", type=float, nargs="+",
                 help="whole-model MACs removed, %%")
  p.add_argument("--dataset", default="digits")
  p.add_argument("--data-dir", default="")
  p.add_argument("--train-images", type=int,
                 help="training images used (0: all)")
  p.add_argument("--batch", type=int, help="training batch size")
  p.add_argument("--pretrain", type=int, help="pretraining epochs")
  p.add_argument("--phase", type=int,
                 help="epochs of group learning / DDROP / plain training")
  p.add_argument("--finetune", type=int, help="fine-tuning epochs")
  args = p.parse_args(argv)
  for k, v in (QUICK if args.quick else FULL).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  return args


def main(argv=None) -> int:
  args = parse(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  import jax
  # Seeds and restarts compile the same programs: keep them.
  jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  setting = {k: getattr(args, k) for k in (
      "models", "seeds", "targets", "dataset", "train_images", "batch",
      "pretrain", "phase", "finetune")}
  results = Results(out / "results.json", setting)
  t = time.time()
  # Seed-major: an interrupted study has whole seeds of every model.
  for seed in args.seeds:
    for name in args.models:
      study_model(args, name, seed, results)
  results.add("invocations", {
      "models": args.models,
      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "seconds": time.time() - t})
  plot(results.data, out / "accuracy_vs_flops.png")
  text = table(results.data)
  (out / "table.md").write_text(text + "\n")
  print(text)
  total = sum(i["seconds"] for i in results.data["invocations"])
  print(f"\nwall time: {time.time() - t:.0f} s this invocation, {total:.0f} s"
        " over all invocations")
  return 0


if __name__ == "__main__":
  sys.exit(main())
