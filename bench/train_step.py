"""Throughput of the plain train step: img/s of ResNet-20/56 at batch 128.

    python bench/train_step.py [--models cifar_resnet20,cifar_resnet56]
        [--batch 128] [--steps 20] [--repeats 5]

Runs ``training.steps.make_train_step`` (augmentation, forward, backward,
SGD update, all in one jit over the ``data`` mesh of every available device)
on random uint8 images; compile and warm-up steps are excluded. Prints, per
model, the median over ``--repeats`` timings of ``--steps`` steps each.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import models  # noqa: E402
from training import mesh as mesh_lib  # noqa: E402
from training import optim  # noqa: E402
from training import state as state_lib  # noqa: E402
from training import steps  # noqa: E402
from training.data import CIFAR_MEAN, CIFAR_STD, DatasetInfo  # noqa: E402


def bench(name: str, batch: int, num_steps: int, repeats: int) -> float:
  """Median img/s of ``num_steps`` train steps of model ``name``."""
  info = DatasetInfo("random", 10, 32, 3, {"train": batch}, CIFAR_MEAN,
                     CIFAR_STD)
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(batch, mesh, "--batch")
  model = models.create_model(name, info.num_classes)
  tx = optim.sgd_torch(optim.dsp_step(0.1, 164, 391), 0.9, 1e-4)
  state = mesh_lib.replicate(state_lib.create_train_state(
      model, tx, jax.random.key(0), (32, 32, 3)), mesh)
  step = steps.make_train_step(model, tx, info, mesh)
  rng = np.random.default_rng(0)
  batch_arrays = mesh_lib.global_batch(
      {"image": rng.integers(0, 256, (batch, 32, 32, 3), np.uint8),
       "label": rng.integers(0, 10, (batch,), np.int32)}, mesh)
  for _ in range(3):  # Compile and warm up.
    state, metrics = step(state, batch_arrays)
  jax.block_until_ready(metrics)
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(num_steps):
      state, metrics = step(state, batch_arrays)
      # One step in flight at a time, as the training loop runs it.
      metrics["loss"].block_until_ready()
    rates.append(num_steps * batch / (time.perf_counter() - t))
  return statistics.median(rates)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="cifar_resnet20,cifar_resnet56")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  devices = jax.devices()
  print(f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}),"
        f" batch {args.batch}, median of {args.repeats} x {args.steps} steps")
  for name in args.models.split(","):
    rate = bench(name, args.batch, args.steps, args.repeats)
    print(f"{name:<16} {rate:10.1f} img/s", flush=True)


if __name__ == "__main__":
  main()
