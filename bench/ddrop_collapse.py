"""Why a DDROP-trained network does not recover from pruning: one change at a
time, in the accuracy-vs-FLOPs study's setting (``bench/study.py``).

    python bench/ddrop_collapse.py --out runs/ddrop_collapse \\
        --models cifar_vgg_small --pretrain 80 [--seeds 0 1 2]
        [--variants study keep_min_0.5 ...] [--target 50]
        [any other bench/study.py option]

Per seed the study's shared pretraining runs once (same runs as the study's
when ``--out`` is the study's). Then every variant trains the DDROP phase
with one change to the study's DDROP (``VARIANTS``), prunes the units the
study prunes at ``--target`` % MACs removed and fine-tunes as every study
arm does. Per variant it measures, on the validation split (the held-out
training images) and the test split:

* ``start``: training accuracy of the pretrained network under the
  variant's target keep range (train mode, nothing trained yet): what the
  dropping alone costs;
* ``train``: training accuracy of the phase's last epoch (with dropping);
* ``phase``: accuracy at the end of the phase (evaluation mode);
* ``recal``: the same after re-estimating the BatchNorm statistics with
  nothing dropped (``Runner.recalibrate``): the part of ``phase``'s loss
  that is an evaluation-mode statistics mismatch, not the weights;
* ``pruned``: right after pruning; ``ft``: after fine-tuning;
* ``gamma``: per DDROP layer, mean |γ| of the pruned and of the kept units,
  and mean β of the pruned ones (what pruning removes).

Writes ``OUT/collapse.json`` after every variant and seed (a restarted
invocation skips finished ones) and ``OUT/collapse.md``: per variant mean ±
std over the seeds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any, Mapping

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import study  # noqa: E402  (bench/study.py)

# name -> (phase kind, config.ddrop changes). "phase_steps" as total_steps
# means the schedule spans the whole phase.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "study": ("ddrop", {}),
    "keep_min_0.25": ("ddrop", {"prob": (0.25, 0.95)}),
    "keep_min_0.5": ("ddrop", {"prob": (0.5, 0.95)}),
    "schedule_whole_phase": ("ddrop", {"total_steps": "phase_steps"}),
    "l1_0": ("ddrop", {"l1": 0.0}),
    "l1_1e-3": ("ddrop", {"l1": 1e-3}),
    "activation": ("ddrop", {"importance": "activation"}),
    "dense_drop_norm": ("ddrop", {"dense_drop": "norm"}),
    "nothing_dropped": ("ddrop", {"prob": (1.0, 1.0)}),
    "plain_gamma": ("plain", {}),
}
POINTS = ("start", "train", "phase", "recal", "pruned", "ft")
# Training batches of the ``start`` measurement.
START_BATCHES = 10


def resolve(changes: Mapping[str, Any], phase_steps: int) -> dict[str, Any]:
  """``changes`` with ``phase_steps`` filled in."""
  return {k: (phase_steps if v == "phase_steps" else v)
          for k, v in changes.items()}


def last_train_accuracy(run_dir: pathlib.Path, stage: str) -> float:
  """Training accuracy logged last in a run's ``metrics.jsonl``."""
  acc = float("nan")
  for line in (run_dir / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if rec.get("stage") == stage and rec.get("split") == "train":
      acc = float(rec["accuracy"])
  return acc


def gamma_report(variables, pruned, layers) -> dict[str, dict[str, float]]:
  """Per DDROP norm layer: mean |γ| pruned / kept, mean β of the pruned."""
  import numpy as np
  out = {}
  for layer in layers:
    if layer.norm is None:
      continue
    p = variables["params"]
    m = pruned["masks"]
    for key in layer.norm:
      p, m = p[key], m[key]
    gamma, beta = np.abs(np.asarray(p["scale"])), np.asarray(p["bias"])
    cut = np.asarray(m["scale"]) == 0
    out[layer.name] = {"gamma_pruned": float(gamma[cut].mean()),
                       "gamma_kept": float(gamma[~cut].mean()),
                       "beta_pruned": float(beta[cut].mean())}
  return out


def run_variant(args, runner: study.Runner, pre, name: str, target: float,
                rows) -> dict[str, Any]:
  """One variant of one seed: the measurements of the module docstring."""
  import dataclasses
  import jax
  import ddrop_jax
  from ddrop_jax.config import DdropConfig
  kind, changes = VARIANTS[name]
  phase_steps = runner.config.ddrop.epochs * runner.spe
  changes = resolve(changes, phase_steps)
  run = f"collapse_{name}"
  result = runner.phase(kind, pre, run=run, changes=changes)
  variables = jax.device_get(result.state.variables())
  stats = (result.state.extra or {}).get("ddrop_stats")
  d = runner.ddrop_section(changes)
  amount, _ = study.closest(rows, target)
  cfg = dataclasses.replace(DdropConfig.from_engine(d), amount=amount,
                            prune_residual=runner.prune_scope == "all")
  layers = runner.layers(runner.prune_scope, cfg.dense_drop)
  evaluate = runner.evaluator(False)
  recal = runner.recalibrate(variables)
  # On the host: fine-tuning donates the device buffers it starts from.
  pruned = jax.device_get(ddrop_jax.prune(
      variables, layers, cfg, stats=jax.device_get(stats) if stats else None))
  before, after = runner.finetune(f"{run}_ft", pruned, False)
  out = {"train": {"train": last_train_accuracy(runner.root / run, kind)},
         "phase": study.accuracies(result.final),
         "recal": study.accuracies(evaluate(runner.state(recal, _tx(),
                                                         "finetune"))),
         "pruned": before, "ft": after,
         "gamma": gamma_report(variables, pruned, layers),
         "amount": amount, "changes": {k: list(v) if isinstance(v, tuple)
                                       else v for k, v in changes.items()}}
  return out


def start_accuracy(runner: study.Runner, pre, name: str) -> float:
  """Training accuracy of ``pre`` with the variant's target keep range.

  Train mode (batch statistics, running ones untouched) on
  ``START_BATCHES`` augmented training batches, dropping as at the end of
  the variant's schedule; nothing is trained.
  """
  import jax
  import jax.numpy as jnp
  import ddrop_jax
  from ddrop_jax.config import DdropConfig
  from training import mesh as mesh_lib, pipeline, steps
  kind, changes = VARIANTS[name]
  phase_steps = runner.config.ddrop.epochs * runner.spe
  d = runner.ddrop_section(resolve(changes, phase_steps))
  cfg = DdropConfig.from_engine(d).with_phase_steps(phase_steps)
  layers = runner.layers(dense_drop=cfg.dense_drop)
  extra = {}
  if kind == "ddrop":
    stats = ddrop_jax.init_stats(layers) if cfg.importance == "activation" \
        else None
    extra = {"ddrop": ddrop_jax.keep_probabilities(
        pre["params"], stats, cfg.total_steps, cfg, layers,
        jax.random.key(1))}
  model, info = runner.model(), runner.env.info

  @jax.jit
  def correct(images, labels, key):
    x = steps.preprocess(key, images, info, runner.env.dtype)
    logits, _ = model.apply({**pre, **extra}, x, train=True,
                            rngs=steps.model_rngs(key),
                            mutable=["batch_stats"])
    return jnp.sum(jnp.argmax(logits, -1) == labels)

  it = iter(pipeline.train_data(runner.config, runner.env,
                                study.OFFSETS["recal"]))
  hits = total = 0
  for i in range(START_BATCHES):
    batch = mesh_lib.global_batch(next(it), runner.env.mesh)
    hits += int(correct(batch["image"], batch["label"], jax.random.key(i)))
    total += int(batch["label"].shape[0])
  return hits / total


def _tx():
  import optax
  return optax.identity()


def _stats(xs):
  xs = [x for x in xs if x == x]
  if not xs:
    return float("nan"), 0.0
  return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(data: Mapping[str, Any], split: str) -> str:
  """Per variant, mean ± std over seeds of every measurement on ``split``."""
  lines = [f"{split} accuracy % (mean ± std over seeds "
           f"{sorted({r['seed'] for r in data['runs']})}):", "",
           "| variant | changes | " + " | ".join(
               {"start": "start (dropping, before training)",
                "train": "train (dropping)"}.get(p, p)
               for p in POINTS) + " |",
           "|---|---|" + "---|" * len(POINTS)]
  for name in VARIANTS:
    rs = [r for r in data["runs"] if r["variant"] == name]
    if not rs:
      continue
    cells = []
    for point in POINTS:
      key = "train" if point in ("start", "train") else split
      m, s = _stats([100 * r[point].get(key, float("nan")) for r in rs])
      cells.append(f"{m:.2f} ± {s:.2f}")
    changes = ", ".join(f"{k}={v}" for k, v in rs[0]["changes"].items()) or (
        "(the study's DDROP)" if name == "study" else "")
    if name == "plain_gamma":
      changes = "plain phase (no dropping, no L1), pruned by |γ|"
    lines.append(f"| {name} | {changes} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                 choices=list(VARIANTS))
  p.add_argument("--target", type=float, default=50.0,
                 help="whole-model MACs removed, %% (the study's amount)")
  args, rest = p.parse_known_args(argv)
  sargs = study.parse(rest)
  out = pathlib.Path(sargs.out)
  out.mkdir(parents=True, exist_ok=True)
  import jax
  jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  path = out / "collapse.json"
  data = json.loads(path.read_text()) if path.is_file() else {"runs": []}
  t0 = time.time()
  for seed in sargs.seeds:
    for name in sargs.models:
      config = study.make_config(sargs, name, seed)
      root = out / "runs" / name / f"seed{seed}"
      runner = study.Runner(config, root, slim_l1=sargs.slim_l1)
      # The last epoch's training accuracy is logged on its own.
      config.log_every_steps = runner.spe
      pre = jax.device_get(runner.pretrain().state.variables())
      scope, rows = study.channel_scope(sargs, runner, pre)
      runner.prune_scope = scope
      for variant in args.variants:
        done = [r for r in data["runs"] if r["seed"] == seed
                and r["model"] == name and r["variant"] == variant]
        if done:
          if "start" not in done[0]:  # a record of an earlier invocation
            done[0]["start"] = {"train": start_accuracy(runner, pre,
                                                         variant)}
            path.write_text(json.dumps(data, indent=1))
          continue
        t = time.time()
        rec = run_variant(sargs, runner, pre, variant, args.target, rows)
        rec.update(model=name, seed=seed, variant=variant,
                   seconds=time.time() - t,
                   start={"train": start_accuracy(runner, pre, variant)})
        data["runs"].append(rec)
        path.write_text(json.dumps(data, indent=1))
        print(f"{name} seed {seed} {variant}: " + ", ".join(
            f"{k} {100 * rec[k].get('test', rec[k].get('train')):.1f}"
            for k in POINTS) + f" ({rec['seconds']:.0f} s)", flush=True)
  text = "\n\n".join(table(data, s) for s in ("validation", "test"))
  (out / "collapse.md").write_text(text + "\n")
  print(text)
  print(f"\nwall time: {time.time() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
