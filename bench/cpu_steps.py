"""CPU train-step time under XLA's CPU options, beside a PyTorch ResNet-20.

Run from the repository root::

  python bench/cpu_steps.py --rounds 3 --steps 5

Each configuration runs in its own process (``XLA_FLAGS`` and JAX's
configuration are read once, when the backend starts): the plain train step
(``bench/train_step.py``: augmentation, forward, backward, SGD) and the DSP
group-learning step (``bench/dsp_step.py``) of ResNet-20 at ``--batch``, and
one 3x3 convolution's forward and backward in NHWC and in NCHW. The
configurations' processes run in interleaved rounds (A, B, ..., A, B, ...),
so that load from other processes hits all alike; each cell is the median
over rounds of a process's median step. ``torch`` is the standard CIFAR
ResNet-20 (3 stages of 3 basic blocks, 16/32/64 channels, option-B
shortcuts as ``models/cifar_resnet.py``) trained by ``torch.optim.SGD`` in
the same way, without augmentation.

``--out`` writes ``cpu_steps.json`` and ``cpu_steps.md`` (command, machine,
load average, date, the table).
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
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402

# name -> (XLA_FLAGS added to the user's, extra environment). Flags this
# jaxlib accepts (an unknown flag aborts the process).
CONFIGS = {
    "default": ("", {}),
    "xnnpack conv+dot": (
        "--xla_cpu_experimental_xnn_fusion_type="
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", {}),
    "ynnpack conv": (
        "--xla_cpu_experimental_ynn_fusion_type="
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION", {}),
    "onednn conv": (
        "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type="
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION", {}),
    "matmul precision bfloat16": (
        "", {"JAX_DEFAULT_MATMUL_PRECISION": "bfloat16"}),
}
TORCH = "torch"


def _median_ms(call, steps: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    call()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def jax_worker(batch: int, steps: int, numerics: bool = False
               ) -> dict[str, Any]:
  """Milliseconds of the plain and DSP steps and of one conv layer.

  ``conv_digest`` is a hash of the conv's forward and backward results in
  both layouts: equal digests, bit-identical numerics. ``numerics``: that
  alone, no timing.
  """
  import hashlib  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  import dsp_step  # pylint: disable=import-outside-toplevel
  import train_step  # pylint: disable=import-outside-toplevel

  out: dict[str, Any] = {}
  if not numerics:
    out["plain_ms"] = 1e3 * batch / train_step.bench(
        "cifar_resnet20", batch, 1, steps)
    out["dsp_group_ms"] = 1e3 * dsp_step.bench_step(
        "cifar_resnet20", 4, batch, steps, plain=False)["group_s"]
  digest = hashlib.sha256()
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.normal(size=(batch, 32, 32, 16)), jnp.float32)
  w = jnp.asarray(rs.normal(size=(3, 3, 16, 16)), jnp.float32)
  for layout, xt in (("NHWC", x), ("NCHW", x.transpose(0, 3, 1, 2))):
    def loss(w, x, layout=layout):
      y = jax.lax.conv_general_dilated(
          x, w, (1, 1), "SAME", dimension_numbers=(layout, "HWIO", layout))
      return (y * y).sum()
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    for a in jax.tree.leaves(grad(w, xt)):
      digest.update(np.asarray(a).tobytes())
    if not numerics:
      out[f"conv_{layout}_ms"] = _median_ms(
          lambda grad=grad, xt=xt: jax.block_until_ready(grad(w, xt)), steps)
  out["conv_digest"] = digest.hexdigest()[:16]
  return out


def torch_resnet20():
  """The standard CIFAR ResNet-20 (option-B shortcuts) in PyTorch."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.conv_a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn_a = nn.BatchNorm2d(cout)
      self.conv_b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn_b = nn.BatchNorm2d(cout)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn_a(self.conv_a(x)))
      y = self.bn_b(self.conv_b(y))
      return torch.relu(y + (x if self.downsample is None
                             else self.downsample(x)))

  layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
            nn.ReLU()]
  cin = 16
  for width, stride in ((16, 1), (32, 2), (64, 2)):
    for b in range(3):
      layers.append(Block(cin, width, stride if b == 0 else 1))
      cin = width
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
  return nn.Sequential(*layers)


def torch_worker(batch: int, steps: int) -> dict[str, float]:
  """Milliseconds of a PyTorch ResNet-20 SGD train step."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = torch_resnet20().train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                        weight_decay=1e-4)
  x = torch.randn(batch, 3, 32, 32)
  y = torch.randint(0, 10, (batch,))

  def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
  return {"plain_ms": _median_ms(step, steps),
          "threads": torch.get_num_threads()}


def run_worker(name: str, batch: int, steps: int, numerics: bool = False
               ) -> dict[str, Any]:
  """One configuration's process: its JSON line, or ``{"failed": why}``."""
  env = dict(os.environ)
  if name != TORCH:
    flags, extra = CONFIGS[name]
    # The user's own flags come last, so theirs win where both set one.
    env["XLA_FLAGS"] = " ".join(
        f for f in (flags, os.environ.get("XLA_FLAGS", "")) if f)
    env.update(extra)
  proc = subprocess.run(
      [sys.executable, __file__, "--worker", name, "--batch", str(batch),
       "--steps", str(steps), *(["--numerics"] if numerics else [])],
      capture_output=True, text=True, env=env,
      cwd=ROOT, check=False)
  if proc.returncode:
    return {"failed": (proc.stderr.strip().splitlines()
                       or ["(no output)"])[-1][-300:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--configs", nargs="+", default=[*CONFIGS, TORCH],
                  choices=[*CONFIGS, TORCH])
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--steps", type=int, default=5,
                  help="timed steps per process (median)")
  ap.add_argument("--rounds", type=int, default=3,
                  help="interleaved rounds of every configuration")
  ap.add_argument("--out", type=pathlib.Path,
                  help="directory for cpu_steps.json and cpu_steps.md")
  ap.add_argument("--numerics", action="store_true",
                  help="only whether each configuration's conv forward and "
                  "backward are bit-identical to the default's (seconds)")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    print(json.dumps(torch_worker(args.batch, args.steps)
                     if args.worker == TORCH else
                     jax_worker(args.batch, args.steps, args.numerics)))
    return
  if args.numerics:
    digests = {c: run_worker(c, args.batch, 0, True) for c in CONFIGS}
    for c, d in digests.items():
      same = d.get("conv_digest") == digests["default"].get("conv_digest")
      print(f"{c}: " + (f"failed: {d['failed']}" if "failed" in d else
                        "bit-identical to default" if same else
                        "differs from default"))
    return
  runs: dict[str, list[dict[str, float]]] = {c: [] for c in args.configs}
  loads = [report.load_average()]
  started = report.now()
  failed: dict[str, str] = {}
  for r in range(args.rounds):
    for c in args.configs:
      if c in failed:
        continue  # a configuration this XLA cannot compile stays failed.
      result = run_worker(c, args.batch, args.steps)
      print(f"round {r + 1} {c}: {result} (load {report.load_average()})",
            flush=True)
      if "failed" in result:
        failed[c] = result["failed"]
      else:
        runs[c].append(result)
    loads.append(report.load_average())
  keys = ("plain_ms", "dsp_group_ms", "conv_NHWC_ms", "conv_NCHW_ms")
  table = {c: {k: statistics.median(x[k] for x in rs) for k in keys
               if k in rs[0]} for c, rs in runs.items() if rs}
  base = table.get("default", {})
  ref = table.get(TORCH, {}).get("plain_ms")
  lines = ["| configuration | XLA_FLAGS / environment | plain step ms | "
           "DSP group step ms | plain / default | DSP / default | "
           "plain / torch | conv NHWC ms | conv NCHW ms |",
           "|---|---|---|---|---|---|---|---|---|"]

  def cell(row, k, fmt="{:.1f}"):
    return fmt.format(row[k]) if k in row else "-"
  for c, row in table.items():
    flags, extra = CONFIGS.get(c, ("", {}))
    setting = " ".join([flags] + [f"{k}={v}" for k, v in extra.items()])
    if c == TORCH:
      setting = f"PyTorch, {runs[c][0]['threads']} threads"
    rel = {k: row[k] / base[k] for k in ("plain_ms", "dsp_group_ms")
           if k in row and k in base}
    if ref:
      rel["torch"] = row["plain_ms"] / ref
    lines.append(
        f"| {c} | {setting.strip() or '(none)'} | {cell(row, 'plain_ms')} | "
        f"{cell(row, 'dsp_group_ms')} | {cell(rel, 'plain_ms', '{:.2f}')} | "
        f"{cell(rel, 'dsp_group_ms', '{:.2f}')} | "
        f"{cell(rel, 'torch', '{:.2f}')} | {cell(row, 'conv_NHWC_ms')} | "
        f"{cell(row, 'conv_NCHW_ms')} |")
  lines += [f"| {c} | {' '.join(CONFIGS[c][0].split())} | failed: {why} "
            f"|" + " - |" * 6 for c, why in failed.items()]
  print("\n".join(lines))
  if args.out:
    report.write(args.out, "cpu_steps",
                 f"CPU train steps, ResNet-20, batch {args.batch}",
                 report.command("bench/cpu_steps.py", argv), started, loads,
                 {"batch": args.batch, "steps": args.steps,
                  "rounds": args.rounds,
                  "configs": {c: CONFIGS.get(c) for c in args.configs},
                  "median": table, "runs": runs, "failed": failed}, lines)


if __name__ == "__main__":
  main()
