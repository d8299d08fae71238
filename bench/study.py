"""Accuracy vs FLOPs: DSP, DDROP, slimming, L1-norm, random and dense.

    python bench/study.py --out runs/study [--dataset digits|fashion_mnist]
        [--quick] [--seeds 0 1 2] [--targets 50 70 80]
        [--models cifar_resnet8 [cifar_vgg_small ...]] [--widths 8,16,32]
        [--arms dsp ddrop slim l1 random] [--data-dir DIR]
        [--train-images 500] [--batch 32] [--pretrain 16] [--phase 3]
        [--finetune 3] [--slim-l1 1e-4]

Defaults per dataset (``PRESETS``): digits, the published ResNet-8 study;
``fashion_mnist``, the half-width ResNet-20 on 55,000 training images with
the recipes' DSP and DDROP settings (``configs/dsp_fashion_mnist.py``,
``configs/ddrop_fashion_mnist.py``). Several invocations with different
``--models`` may share one ``--out`` at the same time (``results.json`` is
appended to under a lock).

Per model and seed, every arm gets ``pretrain + phase + finetune`` epochs:

* shared: ``pretrain`` epochs of plain training (DSP's recipe: SGD, coupled
  weight decay, step schedule with warm-up), once per seed;
* ``phase`` epochs, once per seed and arm family: DSP's group learning
  (``dsp_jax.pipeline.group``); DDROP training (dropping + L1, the DDROP
  phase's one-cycle SGD); network slimming's sparsity training (the same
  one-cycle SGD with L1 ``--slim-l1`` on the scales of every norm the
  channel arms prune, nothing dropped); for L1-norm, random and dense the
  same one-cycle SGD without dropping or L1;
* per target of whole-model MACs removed: DDROP and slimming (|γ|), L1-norm
  filters and random units prune ``floor(amount * C)`` units of the same
  layers with the one amount whose MACs are closest to the target
  (``training.baselines``); DSP prunes at the group-pruning threshold β
  whose MACs are closest to what that amount reaches (equal MACs for every
  arm);
* ``finetune`` epochs of the same schedule for every arm (one cosine cycle of
  DSP's fine-tuning optimizer, masks held fixed); dense fine-tunes unpruned.

Accuracies are final (no checkpoint selection), on the test split and on
the validation split (the held-out training images) that any choice made
for the study looks at. FLOPs are ``models.flops.report`` with dead
structure removed, both measures (DSP's P.FLOPS/P.PARAMS and whole-model
MACs/params). The pruned models of the first seed are exported through
``convert.cli.export_dir`` (logits checked).

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

METHODS = ("dsp", "ddrop", "slim", "l1", "random")
ARMS = METHODS + ("dense",)
LABELS = {"dsp": "DSP", "ddrop": "DDROP", "slim": "slimming",
          "l1": "L1-norm", "random": "random", "dense": "dense"}
COLORS = {"dsp": "C0", "ddrop": "C1", "slim": "C4", "l1": "C2",
          "random": "C3"}
# Phases of the data order / rng stream of each training run.
OFFSETS = {"pretrain": 0, "group": 1, "plain": 2, "ddrop": 3, "finetune": 4,
           "random": 5, "slim": 6, "recal": 7}
# The study's setting per dataset (any other dataset: digits'); command-line
# options override single entries. Digits: the published ResNet-8 study.
# Fashion-MNIST: the half-width ResNet-20 (68,642 parameters, 7.78 M MACs) on
# 55,000 training images (5,000 held out as the validation split), sized to
# fit 3 seeds into 4 hours on 2 CPU cores (docs/benchmarks.md, Fashion-MNIST).
PRESETS = {
    "digits": dict(models=["cifar_resnet8"], widths="", seeds=[0, 1, 2],
                   targets=[50.0, 70.0, 80.0], train_images=500, batch=32,
                   pretrain=16, phase=3, finetune=3,
                   arms=["dsp", "ddrop", "l1", "random"], slim_l1=1e-4),
    "fashion_mnist": dict(models=["cifar_resnet20"], widths="8,16,32",
                          seeds=[0, 1, 2], targets=[50.0, 70.0],
                          train_images=55_000, batch=128, pretrain=8,
                          phase=1, finetune=2, arms=list(METHODS),
                          slim_l1=1e-4),
}
QUICK = dict(seeds=[0], targets=[50.0, 80.0], train_images=192, batch=32,
             pretrain=2, phase=1, finetune=1)
# Recipes whose DSP and DDROP fields the study takes, per dataset.
RECIPES = {"fashion_mnist": ("dsp_fashion_mnist", "ddrop_fashion_mnist")}
DEFAULT_RECIPES = ("quickstart", "ddrop_quickstart")
# DDROP fields of the recipe (the algorithm and its phase's lr); epochs and
# the fine-tuning are the study's.
DDROP_FIELDS = ("prob", "schedule", "lr", "l1", "l1_rank_weighted",
                "importance", "dense_drop", "ft_lr")
GROUPS = 4


# ------------------------------------------------------------------ config
def make_config(args: argparse.Namespace, model_name: str, seed: int):
  """The run config of one model and seed.

  The DSP and DDROP fields come from the dataset's recipes (``RECIPES``:
  ``configs/dsp_fashion_mnist.py`` and ``configs/ddrop_fashion_mnist.py``;
  the digits quickstarts otherwise), epochs and data from ``args``.

  Args:
    args: the parsed command line.
    model_name: registry name.
    seed: the seed.

  Returns:
    A validated ``ml_collections.ConfigDict`` (``method='dsp'``).
  """
  import importlib
  from training import data
  dsp_recipe, ddrop_recipe = RECIPES.get(args.dataset, DEFAULT_RECIPES)
  config = importlib.import_module(f"configs.{dsp_recipe}").get_config()
  ddrop = importlib.import_module(f"configs.{ddrop_recipe}").get_config().ddrop
  config.method, config.widths = "dsp", args.widths
  config.model, config.seed = model_name, seed
  config.dataset, config.data_dir = args.dataset, args.data_dir
  config.batch_size = args.batch
  config.test_batch_size = max(200, config.test_batch_size)
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
  for field in DDROP_FIELDS:
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

  def __init__(self, config, root: pathlib.Path, slim_l1: float = 0.0):
    """The runs of one model and seed.

    Args:
      config: the run config (``make_config``).
      root: the directory of the seed's runs.
      slim_l1: L1 strength of network slimming's phase.
    """
    from training import pipeline
    self.config = config
    self.root = root
    self.env = pipeline.setup(config, root)
    self.spe = self.env.steps_per_epoch
    self.name = config.model
    self.slim_l1 = slim_l1
    # Which layers the channel arms prune (``channel_scope``).
    self.prune_scope = "ddrop_layers"

  def model(self, gated: bool = False):
    from training import pipeline
    return pipeline.build_model(self.config, self.env.info.num_classes,
                                **({"groups": GROUPS} if gated else {}))

  def layers(self, scope: str | None = None, dense_drop: str = "linear"):
    """The DDROP layers; with a prune ``scope``, the layers pruning acts on
    (``all``: plus the norms after residual convs, ``prune_residual``)."""
    import ddrop_jax
    info = self.env.info
    shape = (info.image_size, info.image_size, info.channels)
    layers = ddrop_jax.ddrop_layers(self.model(), shape, dense_drop)
    if scope is None:
      return layers
    return ddrop_jax.prune_layers(self.model(), layers, scope == "all", shape)

  def cached(self, key, build):
    key = (self.name, self.spe) + key
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  def evaluator(self, gated: bool):
    """Test and validation accuracy of a state.

    ``validation`` is the held-out part of the training split (with
    ``validation_from_train``), the only split any choice may look at.
    """
    from training import data, steps
    env, config = self.env, self.config
    splits = {"test": "test"}
    if config.validation_from_train:
      splits["validation"] = data.HOLDOUT_SPLIT

    def build():
      step = steps.make_eval_step(self.model(gated), env.info, env.mesh,
                                  dtype=env.dtype)
      return lambda state: {name: steps.evaluate(
          step, state, data.eval_batches(
              config.dataset, split, env.data_dir,
              batch_size=config.test_batch_size,
              validation_from_train=config.validation_from_train), env.mesh)
                            for name, split in splits.items()}
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

  def ddrop_section(self, changes: Mapping[str, Any] | None = None):
    """``config.ddrop`` with ``changes`` applied (a copy)."""
    d = self.config.ddrop.copy_and_resolve_references()
    for k, v in (changes or {}).items():
      d[k] = v
    return d

  def phase(self, kind: str, variables, run: str | None = None,
            changes: Mapping[str, Any] | None = None):
    """``phase`` epochs of DDROP, network slimming or plain training.

    All three use DDROP's phase optimizer (one-cycle SGD).

    Args:
      kind: ``ddrop`` (dropping + L1 on the DDROP layers' scales), ``slim``
        (L1 of strength ``slim_l1`` on the scales of every norm the channel
        arms prune, nothing dropped: network slimming's sparsity training)
        or ``plain`` (neither).
      variables: the starting variables.
      run: the run's directory (default ``kind``).
      changes: ``config.ddrop`` fields changed for this run (DDROP
        experiments).

    Returns:
      The ``loop.StageResult`` (its state's ``extra`` holds DDROP's
      activation statistics when the criterion needs them).
    """
    import optax
    import ddrop_jax
    from ddrop_jax import l1 as l1_lib
    from ddrop_jax import pipeline as ddrop_pipeline
    from ddrop_jax.config import DdropConfig
    from training import optim, steps
    run = run or kind
    d = self.ddrop_section(changes)
    model = self.model()
    cfg = DdropConfig.from_engine(d).with_phase_steps(d.epochs * self.spe)
    layers = self.layers(dense_drop=cfg.dense_drop)

    def build():
      section = ddrop_pipeline.phase_optim(self.config, self.name)
      tx, lr_fn = optim.make_optimizer(section, epochs=d.epochs,
                                       steps_per_epoch=self.spe, lr=d.lr)
      if kind in ("plain", "slim"):
        if kind == "slim":
          tx = optax.chain(l1_lib.add_l1(self.slim_l1, mask=l1_lib.l1_mask(
              self.layers(self.prune_scope))),
                           tx)
        return tx, steps.make_train_step(model, tx, self.env.info,
                                         self.env.mesh, lr_schedule=lr_fn,
                                         dtype=self.env.dtype)
      tx = ddrop_jax.ddrop_optimizer(tx, layers, cfg)
      return tx, ddrop_jax.make_ddrop_train_step(
          model, tx, self.env.info, self.env.mesh, layers, cfg,
          lr_schedule=lr_fn, dtype=self.env.dtype)
    key = ("phase", kind, tuple(sorted((changes or {}).items())),
           self.prune_scope if kind == "slim" else None, self.slim_l1)
    tx, step_fn = self.cached(key, build)
    extra = None
    if kind == "ddrop":
      from ddrop_jax.train import init_extra
      extra = init_extra(layers, cfg)
    return self.fit(run, kind, self.state(variables, tx, kind, extra),
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
    before = accuracies(self.evaluator(gated)(state))
    result = self.fit(run, "finetune", state, step_fn, d.finetune_epochs,
                      gated)
    return before, accuracies(result.final)

  def recalibrate(self, variables, batches: int = 50):
    """``variables`` with BatchNorm statistics re-estimated without DDROP.

    ``batches`` train-mode forward passes over augmented training batches,
    nothing dropped and no weight changed; the running statistics move
    with the layers' momentum (0.1: after 50 batches the old ones weigh
    0.9^50 = 0.5 %).
    """
    import jax
    from training import mesh as mesh_lib, steps
    from training import pipeline
    model, info = self.model(), self.env.info

    def build():
      @jax.jit
      def update(v, images, key):
        x = steps.preprocess(key, images, info, self.env.dtype)
        _, new = model.apply(v, x, train=True, mutable=["batch_stats"])
        return {**v, "batch_stats": new["batch_stats"]}
      return update
    update = self.cached(("recalibrate",), build)
    v = jax.tree.map(jax.numpy.asarray, dict(variables))
    it = iter(pipeline.train_data(self.config, self.env, OFFSETS["recal"]))
    for i in range(batches):
      images = mesh_lib.global_batch(next(it), self.env.mesh)["image"]
      v = update(v, images, jax.random.key(i))
    return jax.device_get(v)


def accuracies(evals: Mapping[str, Any]) -> dict[str, float]:
  """``{split: accuracy}`` of an evaluation."""
  return {split: float(m["accuracy"]) for split, m in evals.items()}


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


def export_check(stage_dir: pathlib.Path, out: pathlib.Path,
                 image_size: int) -> float:
  """Exports a fine-tuned run; the largest |logit| difference measured."""
  from convert import cli
  result = cli.export_dir(stage_dir, out, program=False, which="latest",
                          image_size=image_size, fast_options=None)
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
  runner = Runner(config, root, slim_l1=args.slim_l1)
  size = runner.env.info.image_size
  missing = dsp_available(runner) if "dsp" in args.arms else None
  if missing:
    results.note(f"DSP is not available for {name}: {missing}")

  def shared(phase, fn):
    t = time.time()
    result = fn()
    if not results.done("shared", model=name, seed=seed, phase=phase):
      acc = accuracies(result.final)
      results.add("shared", {
          "model": name, "seed": seed, "phase": phase,
          "test_accuracy": acc["test"],
          **({"validation_accuracy": acc["validation"]}
             if "validation" in acc else {}),
          "seconds": time.time() - t})
    return jax.device_get(result.state.variables())

  pre = shared("pretrain", runner.pretrain)
  scope, rows = channel_scope(args, runner, pre)
  runner.prune_scope = scope
  plain = shared("plain", lambda: runner.phase("plain", pre))
  ddropped = (shared("ddrop", lambda: runner.phase("ddrop", pre))
              if "ddrop" in args.arms else None)
  slimmed = (shared("slim", lambda: runner.phase("slim", pre))
             if "slim" in args.arms else None)
  group_vars = None
  if "dsp" in args.arms and not missing:
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
  layers = runner.layers(scope)

  def record(method, target, run, variables, gated, extra):
    if results.done("runs", model=name, seed=seed, method=method,
                    target=target):
      return
    t = time.time()
    figs = figures(runner.model(gated), variables, size)
    before, after = runner.finetune(run, variables, gated)
    rec = {"model": name, "seed": seed, "method": method, "target": target,
           **extra, **figs, "acc_before_ft": before["test"],
           "acc_after_ft": after["test"]}
    if "validation" in after:
      rec["val_before_ft"] = before["validation"]
      rec["val_after_ft"] = after["validation"]
    if seed == args.seeds[0] and method != "dense":
      try:
        rec["export_max_abs_diff"] = export_check(
            root / run / "finetune", root / run / "export", size)
      except Exception as e:  # pylint: disable=broad-except
        rec["export_error"] = f"{type(e).__name__}: {e}"
    rec["seconds"] = time.time() - t
    results.add("runs", rec)
    print(f"{name} seed {seed} {method:>6} target {target:>4.0f}%: MACs "
          f"-{figs['pflops_whole_model']:.1f}% acc {100 * before['test']:.2f}"
          f" -> {100 * after['test']:.2f} ({rec['seconds']:.0f}s)",
          flush=True)

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
    if ddropped is not None:
      record("ddrop", target, f"ddrop_{tag}",
             ddrop_jax.prune(ddropped, layers, cfg), False, extra)
    if slimmed is not None:
      # Network slimming: the smallest |gamma| after the L1 phase.
      record("slim", target, f"slim_{tag}", ddrop_jax.prune(
          slimmed, layers, dataclasses.replace(cfg, importance="norm")),
             False, extra)
    if "l1" in args.arms:
      record("l1", target, f"l1_{tag}", baselines.prune(
          plain, layers, criterion="l1", amount=amount), False,
             extra)
    if "random" in args.arms:
      key = jax.random.fold_in(jax.random.key(seed), OFFSETS["random"])
      record("random", target, f"random_{tag}", baselines.prune(
          plain, layers, criterion="random", amount=amount,
          rng=key), False, extra)


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
    v = {"n": len(rs),
         "macs": _stats(r["pflops_whole_model"] for r in rs),
         "params": _stats(r["pparams_whole_model"] for r in rs),
         "dsp_pflops": _stats(r["dsp_pflops"] for r in rs),
         "before": _stats(100 * r["acc_before_ft"] for r in rs),
         "after": _stats(100 * r["acc_after_ft"] for r in rs)}
    if all("val_after_ft" in r for r in rs):
      v["val_after"] = _stats(100 * r["val_after_ft"] for r in rs)
    out.setdefault(model, {})[(method, target)] = v
  return out


def verdict(a, b) -> str:
  """Whether mean ``a`` beats ``b`` beyond one combined std."""
  diff = a[0] - b[0]
  spread = math.hypot(a[1], b[1])
  word = ("beats" if diff > spread else "loses to" if diff < -spread
          else "ties")
  return f"{word} ({diff:+.2f} pt, spread {spread:.2f})"


def model_label(setting: Mapping[str, Any], model: str) -> str:
  """The model's name with the study's widths (e.g. ``cifar_resnet20
  (widths 8,16,32)``)."""
  widths = setting.get("widths")
  return f"{model} (widths {widths})" if widths else model


def table(data: Mapping[str, Any]) -> str:
  """The Markdown tables and per-setting verdicts."""
  s = data["setting"]
  lines = [f"Accuracy % (mean ± std over seeds {s['seeds']}); budget "
           f"per arm: {s['pretrain']} + {s['phase']} + {s['finetune']} "
           f"epochs on {s['dataset']} ({s['train_images'] or 'all'} "
           "training images); final accuracies, no checkpoint selection."]
  pm = lambda v, f=".2f": f"{v[0]:{f}} ± {v[1]:{f}}"
  for model, rows in summarize(data).items():
    val = all("val_after" in v for v in rows.values())
    lines += ["", f"**{model_label(s, model)}**", "",
              "| method | target | MACs removed % | params removed % | "
              "P.FLOPS % | test, before FT | test, after FT |"
              + (" validation, after FT |" if val else "") + " n |",
              "|---|---|---|---|---|---|---|" + ("---|" if val else "")
              + "---|"]
    for (method, target), v in sorted(rows.items(),
                                      key=lambda kv: (kv[0][1],
                                                      ARMS.index(kv[0][0]))):
      lines.append(
          f"| {LABELS[method]} | {target:g} | {pm(v['macs'], '.1f')} | "
          f"{pm(v['params'], '.1f')} | {pm(v['dsp_pflops'], '.1f')} | "
          f"{pm(v['before'])} | {pm(v['after'])} |"
          + (f" {pm(v['val_after'])} |" if val else "") + f" {v['n']} |")
    lines.append("")
    dense = rows.get(("dense", 0.0))
    for target in sorted({t for _, t in rows if t > 0}):
      for m in ("dsp", "ddrop", "slim"):
        if (m, target) not in rows:
          continue
        mine = rows[(m, target)]["after"]
        parts = [f"{verdict(mine, rows[(b, target)]['after'])} {LABELS[b]}"
                 for b in ("l1", "random") if (b, target) in rows]
        if dense is not None:
          gap = dense["after"][0] - mine[0]
          parts.append(f"{gap:.2f} pt below dense ("
                       f"{'within' if gap <= 1.0 else 'not within'} 1.0 pt)")
        lines.append(f"* {model}, {target:g} %: {LABELS[m]} "
                     + "; ".join(parts))
  for n in data.get("notes", []):
    lines.append(f"* note: {n}")
  return "\n".join(lines)


# Classes per dataset (chance accuracy = 100 / classes); 10 unless listed.
CLASSES = {"cifar100": 100, "imagenet2012": 1000}
# Draw the chance line when some mean minus its std comes this close (pt).
CHANCE_MARGIN = 20.0


def plot(data: Mapping[str, Any], path: pathlib.Path) -> None:
  """Accuracy after fine-tuning vs MACs removed, mean ± std per method."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  s = data["setting"]
  summary = summarize(data)
  fig, axes = plt.subplots(1, max(1, len(summary)), squeeze=False,
                           figsize=(6.0 * max(1, len(summary)), 4.6))
  for ax, (model, rows) in zip(axes[0], summary.items()):
    n = max(v["n"] for v in rows.values())
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
      ax.axhline(mean, color="k", ls="--", lw=1, label="dense (± std band)")
      ax.axhspan(mean - sd, mean + sd, color="k", alpha=0.1)
    # Near chance an accuracy says "collapsed": show where chance is.
    chance = 100.0 / CLASSES.get(s["dataset"], 10)
    if min(v["after"][0] - v["after"][1] for v in rows.values()) < (
        chance + CHANCE_MARGIN):
      ax.axhline(chance, color="r", ls=":", lw=1,
                 label=f"chance ({chance:g} %)")
    ax.set_title(f"{s['dataset']}: {model_label(s, model)}\n"
                 f"seeds {', '.join(map(str, s['seeds']))}; error bars: "
                 f"mean ± std over {n} seeds", fontsize=10)
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
                 help="registry names (default: the dataset's preset)")
  p.add_argument("--widths", help="channel widths of the ResNets, "
                 "comma-separated (config field widths; '' = the model's)")
  p.add_argument("--arms", nargs="+", choices=METHODS,
                 help="pruning methods run (dense always runs)")
  p.add_argument("--slim-l1", type=float,
                 help="L1 strength on the norm scales of network slimming")
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
  p.add_argument("--plot-only", action="store_true",
                 help="redraw OUT/accuracy_vs_flops.png and OUT/table.md "
                 "from OUT/results.json, running nothing")
  args = p.parse_args(argv)
  preset = dict(PRESETS.get(args.dataset, PRESETS["digits"]))
  if args.quick:
    preset.update(QUICK)
  for k, v in preset.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  return args


def main(argv=None) -> int:
  args = parse(argv)
  out = pathlib.Path(args.out)
  if args.plot_only:
    data = json.loads((out / "results.json").read_text())
    plot(data, out / "accuracy_vs_flops.png")
    (out / "table.md").write_text(table(data) + "\n")
    print(f"wrote {out / 'accuracy_vs_flops.png'}, {out / 'table.md'}")
    return 0
  out.mkdir(parents=True, exist_ok=True)
  import jax
  # Seeds and restarts compile the same programs: keep them.
  jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  setting = {k: getattr(args, k) for k in (
      "models", "widths", "seeds", "targets", "dataset", "train_images",
      "batch", "pretrain", "phase", "finetune", "arms", "slim_l1")}
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
