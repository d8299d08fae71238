"""ViT-B/16 and Swin-T: train-step throughput and slimmed-export latency.

    python bench/transformer_step.py [--models vit_b_16,swin_t] [--batch 8]
        [--steps 3] [--repeats 3] [--latency-repeats 10] [--amount 0.5]

* Train step: ``training.steps.make_train_step`` (augmentation, forward,
  backward, AdamW update in one jit over the ``data`` mesh of every device)
  at 224 x 224 on random uint8 images, with DDROP's per-unit MLP scales in
  the model; compile and warm-up excluded; median img/s of ``--repeats``
  timings of ``--steps`` steps. On a GPU/TPU host the same command measures
  the accelerator.
* Export latency: random weights, DDROP pruning of ``--amount`` of every
  MLP's hidden units, then TorchScript of the dense model (nothing removed)
  and of the slimmed one (``convert.slim``: smaller fc1/fc2), batch 1 and
  ``--batch``, median of ``--latency-repeats`` calls after 3 warm-ups, with
  the torch thread count given by ``--threads``.
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
import optax  # noqa: E402

import ddrop_jax as dd  # noqa: E402
import models  # noqa: E402
from training import mesh as mesh_lib  # noqa: E402
from training import state as state_lib  # noqa: E402
from training import steps  # noqa: E402
from training import artifacts
from training.data import DatasetInfo  # noqa: E402

SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def train_rate(name: str, batch: int, num_steps: int, repeats: int) -> float:
  """Median img/s of ``num_steps`` AdamW train steps of model ``name``."""
  info = DatasetInfo("random", 1000, SIZE, 3, {"train": batch}, MEAN, STD)
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(batch, mesh, "--batch")
  model = models.create_model(name, info.num_classes, mlp_scale=True)
  tx = optax.adamw(1e-4, weight_decay=0.05)
  state = mesh_lib.replicate(state_lib.create_train_state(
      model, tx, jax.random.key(0), (SIZE, SIZE, 3)), mesh)
  step = steps.make_train_step(model, tx, info, mesh)
  rng = np.random.default_rng(0)
  arrays = mesh_lib.global_batch(
      {"image": rng.integers(0, 256, (batch, SIZE, SIZE, 3), np.uint8),
       "label": rng.integers(0, 1000, (batch,), np.int32)}, mesh)
  for _ in range(2):  # Compile and warm up.
    state, metrics = step(state, arrays)
  jax.block_until_ready(metrics)
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(num_steps):
      state, metrics = step(state, arrays)
      metrics["loss"].block_until_ready()
    rates.append(num_steps * batch / (time.perf_counter() - t))
  return statistics.median(rates)


def export_latency(name: str, amount: float, batches: list[int],
                   repeats: int) -> dict[str, dict[int, float]]:
  """Median ms per call of dense and slimmed TorchScript, per batch size."""
  import torch  # pylint: disable=import-outside-toplevel
  from convert import slim  # pylint: disable=import-outside-toplevel
  model = models.create_model(name, 1000, mlp_scale=True)
  v = artifacts.random_variables(model, 0)
  layers = dd.ddrop_layers(model)
  out = {}
  for label, amt in (("dense", 0.0), ("slim", amount)):
    pruned = artifacts.to_numpy_tree(dd.prune(v, layers,
                                             dd.DdropConfig(amount=amt)))
    module, summary = slim.slim(model, pruned, SIZE)
    times = {}
    for b in batches:
      x = torch.randn(b, 3, SIZE, SIZE)
      with torch.no_grad():
        ts = torch.jit.trace(module, x[:1], check_trace=False)
        for _ in range(3):
          ts(x)
        ms = []
        for _ in range(repeats):
          t = time.perf_counter()
          ts(x)
          ms.append(1e3 * (time.perf_counter() - t))
      times[b] = statistics.median(ms)
    out[f"{label} ({summary.params_after:,} params)"] = times
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="vit_b_16,swin_t")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--latency-repeats", type=int, default=10)
  parser.add_argument("--amount", type=float, default=0.5)
  parser.add_argument("--threads", type=int, default=0,
                      help="torch threads for the latency runs (0: default)")
  parser.add_argument("--no-train", action="store_true")
  parser.add_argument("--no-latency", action="store_true")
  args = parser.parse_args()
  devices = jax.devices()
  print(f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}),"
        f" {SIZE}x{SIZE}, batch {args.batch}")
  for name in args.models.split(","):
    if not args.no_train:
      rate = train_rate(name, args.batch, args.steps, args.repeats)
      print(f"{name:<10} train step (AdamW, DDROP scales) {rate:8.2f} img/s",
            flush=True)
    if not args.no_latency:
      import torch  # pylint: disable=import-outside-toplevel
      if args.threads:
        torch.set_num_threads(args.threads)
      lat = export_latency(name, args.amount, [1, args.batch],
                           args.latency_repeats)
      for label, times in lat.items():
        cells = ", ".join(f"batch {b}: {ms:.1f} ms" for b, ms in times.items())
        print(f"{name:<10} TorchScript {label}: {cells}", flush=True)


if __name__ == "__main__":
  main()
