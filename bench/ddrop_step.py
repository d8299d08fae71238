"""Cost of DDROP: DDROP train step time / plain train step time.

    python bench/ddrop_step.py [--model cifar_resnet18] [--batch 128]
        [--steps 5] [--repeats 7]

Both steps are the engine's jitted ``training.steps.make_train_step`` on the
same model, optimizer (SGD one-cycle, momentum cycling, weight decay on
weights) and random uint8 batch; the DDROP step adds the keep probabilities
(ranks of |gamma| per DDROP layer, recomputed every step), the per-sample
Bernoulli masks and the L1 term. After compilation and warm-up the two steps
are timed in alternating rounds of ``--steps`` steps (so that load from other
processes hits both alike); prints the median time per step of each and
their ratio (target <= 1.1).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ddrop_jax  # noqa: E402
import models  # noqa: E402
from training import mesh as mesh_lib  # noqa: E402
from training import optim  # noqa: E402
from training import state as state_lib  # noqa: E402
from training import steps  # noqa: E402
from training.data import CIFAR_MEAN, CIFAR_STD, DatasetInfo  # noqa: E402


def make_steps(name: str, batch: int, dtype: Any = jnp.float32):
  """``{'plain': (step, state), 'ddrop': (step, state)}`` and a batch.

  ``dtype`` is the steps' compute dtype (``make_train_step``'s).
  """
  info = DatasetInfo("random", 10, 32, 3, {"train": batch}, CIFAR_MEAN,
                     CIFAR_STD)
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(batch, mesh, "--batch")
  model = models.create_model(name, info.num_classes)
  lr_fn, mom_fn = optim.onecycle(0.1, 10_000)
  tx = optim.sgd_torch(lr_fn, mom_fn, 1e-4, wd_mask=optim.weights_mask)
  # Two separate states: each step donates its own.
  new_state = lambda: state_lib.create_train_state(
      model, tx, jax.random.key(0), (32, 32, 3))
  state = new_state()
  layers = ddrop_jax.ddrop_layers(model, (32, 32, 3))
  cfg = ddrop_jax.DdropConfig(prob=(0.0, 0.95), schedule="cosine",
                              total_steps=1000)
  dtx = ddrop_jax.ddrop_optimizer(tx, layers, cfg)
  dstate = new_state()
  out = {
      "plain": (steps.make_train_step(model, tx, info, mesh, dtype=dtype),
                mesh_lib.replicate(state, mesh)),
      "ddrop": (ddrop_jax.make_ddrop_train_step(model, dtx, info, mesh,
                                                layers, cfg, dtype=dtype),
                mesh_lib.replicate(dstate.replace(
                    opt_state=dtx.init(dstate.params),
                    extra=ddrop_jax.init_extra(layers, cfg)), mesh)),
  }
  rng = np.random.default_rng(0)
  batch_arrays = mesh_lib.global_batch(
      {"image": rng.integers(0, 256, (batch, 32, 32, 3), np.uint8),
       "label": rng.integers(0, 10, (batch,), np.int32)}, mesh)
  return out, batch_arrays


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="cifar_resnet18")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  fns, batch = make_steps(args.model, args.batch)
  states = {k: s for k, (_, s) in fns.items()}
  for k, (fn, _) in fns.items():  # Compile and warm up.
    for _ in range(3):
      states[k], metrics = fn(states[k], batch)
    jax.block_until_ready(metrics)
  times = {k: [] for k in fns}
  for _ in range(args.repeats):
    for k, (fn, _) in fns.items():
      t = time.perf_counter()
      for _ in range(args.steps):
        states[k], metrics = fn(states[k], batch)
        metrics["loss"].block_until_ready()
      times[k].append((time.perf_counter() - t) / args.steps)
  med = {k: statistics.median(v) for k, v in times.items()}
  dev = jax.devices()[0]
  print(f"{args.model}, batch {args.batch}, {len(jax.devices())} x "
        f"{dev.device_kind} ({dev.platform}); median of {args.repeats} x "
        f"{args.steps} steps")
  for k, v in med.items():
    print(f"{k:<6} {1e3 * v:9.1f} ms/step")
  print(f"ratio ddrop/plain: {med['ddrop'] / med['plain']:.3f}")


if __name__ == "__main__":
  main()
