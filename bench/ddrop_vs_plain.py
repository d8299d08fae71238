"""DDROP vs plain training, both pruned and fine-tuned the same way.

    python bench/ddrop_vs_plain.py [--seeds 0 1 2] [--workdir runs/ddrop_vs_plain]
        [--model cifar_resnet10_tiny] [--before 3] [--epochs 6] [--ft 3]
        [--arms ddrop plain] [--batch 64]

Arms, on the built-in digits data, same epochs and recipe:

* ``ddrop``: the ``configs/ddrop_quickstart.py`` settings (keep range
  (0.0, 0.95) on a cosine schedule, L1 on the DDROP scales);
* ``ddrop_norm``: the same with ``dense_drop='norm'`` (VGG's hidden Linear
  units dropped after their LayerNorm instead of before it);
* ``plain``: ``prob (1.0, 1.0)`` (nothing dropped) and ``l1 = 0``;

then both prune ``amount`` (0.5) of the units of every DDROP layer by |gamma|
and fine-tune. Prints test accuracy (mean +- std over seeds) right after
pruning and after fine-tuning. Runs are resumable (one workdir per arm and
seed).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

ARMS = ("ddrop", "ddrop_norm", "plain")


def arm_config(arm: str, seed: int, args: argparse.Namespace):
  """The quickstart config of one arm and seed."""
  from configs import ddrop_quickstart
  config = ddrop_quickstart.get_config()
  config.model = args.model
  config.seed = seed
  config.batch_size = args.batch
  config.progress_bar = False
  config.stages = "before,ddrop,prune,finetune"
  d = config.ddrop
  d.before_epochs, d.epochs, d.ft_epochs = args.before, args.epochs, args.ft
  d.amount = args.amount
  d.dense_drop = "norm" if arm == "ddrop_norm" else "linear"
  if arm == "plain":
    d.prob = (1.0, 1.0)
    d.schedule = "constant"
    d.l1 = 0.0
  return config


def _fmt(xs: list[float]) -> str:
  sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
  return f"{100 * statistics.mean(xs):.2f} ± {100 * sd:.2f}"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--workdir", default="runs/ddrop_vs_plain")
  p.add_argument("--model", default="cifar_resnet10_tiny")
  p.add_argument("--before", type=int, default=3)
  p.add_argument("--epochs", type=int, default=6)
  p.add_argument("--ft", type=int, default=3)
  p.add_argument("--amount", type=float, default=0.5)
  p.add_argument("--batch", type=int, default=64, help="training batch size")
  p.add_argument("--arms", nargs="+", choices=ARMS, default=["ddrop", "plain"])
  args = p.parse_args(argv)
  import jax
  # The seeds of an arm compile the same programs: reuse them.
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(args.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from ddrop_jax import pipeline
  results = {arm: {"pruned": [], "finetune": [], "ddrop": []}
             for arm in args.arms}
  for seed in args.seeds:
    for arm in args.arms:
      workdir = pathlib.Path(args.workdir) / f"{arm}_seed{seed}"
      report = pipeline.run(arm_config(arm, seed, args), workdir)
      for k in results[arm]:
        results[arm][k].append(report["accuracy"][k])
      print(f"{arm} seed {seed}: {report['accuracy']}", flush=True)
  print(f"\n{args.model} on digits, before {args.before} + train "
        f"{args.epochs} + fine-tune {args.ft} epochs, amount {args.amount}, "
        f"seeds {args.seeds}; test accuracy % (mean ± std)")
  print(f"| arm | end of training | right after pruning | after fine-tuning |")
  print("|---|---|---|---|")
  for arm in args.arms:
    r = results[arm]
    print(f"| {arm} | {_fmt(r['ddrop'])} | {_fmt(r['pruned'])} | "
          f"{_fmt(r['finetune'])} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
