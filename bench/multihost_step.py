"""Train-step throughput vs simulated CPU devices and processes.

    python bench/multihost_step.py [--model cifar_resnet20] [--batch 64]
        [--steps 10] [--repeats 3] [--layouts 1x1,1x2,1x4,2x1,2x2]

Each layout ``PxD`` runs P local processes of one JAX job (``P > 1``:
through ``training.launch``) with D simulated CPU devices each, and times
the plain train step of ``training.steps.make_train_step`` the way
``training.loop`` runs it: every step builds its global batch from this
process's slice (``mesh.global_batch``), dispatches the step and blocks on
its loss. Prints per layout the median img/s over ``--repeats`` timings of
``--steps`` steps and the milliseconds per step spent assembling the global
batch from the process's slice, the host work that sharding over more
devices or processes adds. Simulated devices share the machine's cores, so
img/s measures overhead, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(model_name: str, batch: int, num_steps: int, repeats: int
           ) -> dict[str, float] | None:
  """Times the step in this process (one process of the job)."""
  import jax
  import numpy as np

  import models
  from configs import base
  from training import mesh as mesh_lib
  from training import optim
  from training import state as state_lib
  from training import steps
  from training.data import CIFAR_MEAN, CIFAR_STD, DatasetInfo

  mesh_lib.initialize_distributed(base.get_config())  # From JAX_* variables.
  info = DatasetInfo("random", 10, 32, 3, {"train": batch}, CIFAR_MEAN,
                     CIFAR_STD)
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(batch, mesh, "--batch")
  model = models.create_model(model_name, info.num_classes)
  tx = optim.sgd_torch(optim.dsp_step(0.1, 164, 391), 0.9, 1e-4)
  state = mesh_lib.replicate(state_lib.create_train_state(
      model, tx, jax.random.key(0), (32, 32, 3)), mesh)
  step = steps.make_train_step(model, tx, info, mesh)
  local = batch // jax.process_count()
  rng = np.random.default_rng(jax.process_index())
  data = {"image": rng.integers(0, 256, (local, 32, 32, 3), np.uint8),
          "label": rng.integers(0, 10, (local,), np.int32)}

  def one_step(state):
    t = time.perf_counter()
    batch = mesh_lib.global_batch(data, mesh)
    host = time.perf_counter() - t
    state, metrics = step(state, batch)
    float(metrics["loss"])  # One step in flight, as the loop runs it.
    return state, host

  for _ in range(3):  # Compile and warm up.
    state, _ = one_step(state)
  rates, hosts = [], []
  for _ in range(repeats):
    t, host = time.perf_counter(), 0.0
    for _ in range(num_steps):
      state, h = one_step(state)
      host += h
    rates.append(num_steps * batch / (time.perf_counter() - t))
    hosts.append(1e3 * host / num_steps)
  if not mesh_lib.is_primary():
    return None
  return {"img_per_s": statistics.median(rates),
          "batch_ms": statistics.median(hosts)}


def run_layout(layout: str, args: argparse.Namespace) -> dict[str, float]:
  """Runs one ``PxD`` layout in fresh processes; process 0's result."""
  procs, devices = (int(v) for v in layout.split("x"))
  cmd = [str(pathlib.Path(__file__).resolve()), "--worker",
         "--model", args.model, "--batch", str(args.batch),
         "--steps", str(args.steps), "--repeats", str(args.repeats)]
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  if procs > 1:
    cmd = ["-m", "training.launch", "-n", str(procs), "--devices-per-process",
           str(devices), "--timeout", str(args.timeout), "--", *cmd]
  else:
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=(
        f"--xla_force_host_platform_device_count={devices}"))
  out = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env,
                       capture_output=True, text=True,
                       timeout=args.timeout + 60)
  if out.returncode:
    raise SystemExit(f"layout {layout} failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="cifar_resnet20")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--layouts", default="1x1,1x2,1x4,2x1,2x2")
  parser.add_argument("--timeout", type=int, default=600)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    result = worker(args.model, args.batch, args.steps, args.repeats)
    if result is not None:
      print(json.dumps(result), flush=True)
    return
  print(f"{args.model}, global batch {args.batch}, median of {args.repeats} x "
        f"{args.steps} steps")
  print("| processes x devices | img/s | global batch assembly, ms/step |")
  print("|---|---|---|")
  for layout in args.layouts.split(","):
    r = run_layout(layout, args)
    print(f"| {layout.replace('x', ' x ')} | {r['img_per_s']:.1f} | "
          f"{r['batch_ms']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
