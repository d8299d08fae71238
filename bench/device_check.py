"""One accelerator check: train-step throughput and pruned inference latency.

Run from the repository root on a machine with one GPU (no network; every
input is generated here)::

  bash bench/device_check.sh            # the GPU check, under 8 minutes
  bash bench/device_check.sh --cpu-smoke  # tiny sizes on CPU, to test it

Train steps (img/s; median of ``--steps`` timed steps after two warm-up
steps, one of which compiles), for ResNet-20 and ResNet-56 at ``--batch``
512 in float32 and bfloat16 (the compute dtype: master weights, optimizer
state and BatchNorm statistics stay float32, as in training):

* ``plain``: the engine's step (``training.steps.make_train_step``:
  augmentation, forward, backward, SGD);
* ``DSP group``: the group-learning step (``dsp_jax.make_group_step``, G = 4,
  two forward/backward passes), on the same augmented batch;
* ``DDROP``: the engine's step with DDROP's keep probabilities, masks and
  L1 term (``ddrop_jax.make_ddrop_train_step``).

Inference (ms per batch, median of ``--repeats`` calls interleaved between
pruned and dense after warm-up; batches 1 and 256) of a ResNet-20 with
random weights pruned by DSP (G = 4, half the FLOPs), against the same dense
network built the same way:

* ``fast.pt CUDA fp32`` / ``fp16``: the fast module of ``fast.pt``'s plan
  (``convert.fast``; dense: the BN-folded dense network, NCHW or
  channels_last, the faster) traced and frozen on the GPU in that dtype;
* ``ONNX CUDA``: ``model.onnx`` of ``convert.generic`` (pruned vs dense)
  under onnxruntime's CUDA execution provider (onnxruntime-gpu), NumPy in
  and out;
* ``JAX compact``: ``convert.compact``'s function jitted, vs the dense
  model's jitted apply, on JAX's default device.

Every row is printed in one table at the end, measured, or skipped with the
reason (no CUDA device, no onnxruntime-gpu, the time budget spent), or
failed with the error's last line, so one missing piece never hides the
rest. ``--budget-s`` (420) bounds the whole run: rows not started in time
are skipped. ``--cpu-smoke``: ResNet-8 at batch 8, G = 2, batches 1 and 4, one
timed step or two calls: seconds of work, to test that the script runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import convert  # noqa: E402
import ddrop_step  # noqa: E402
import dsp_jax  # noqa: E402
import export_latency as el  # noqa: E402
import models  # noqa: E402
from convert import dsp, fast, fast_specs, jax_side  # noqa: E402
from training import steps  # noqa: E402
from training.data import CIFAR_MEAN, CIFAR_STD, DatasetInfo  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TRAIN_STEPS = ("plain", "DSP group", "DDROP")
INFER = ("fast.pt CUDA fp32", "fast.pt CUDA fp16", "ONNX CUDA",
         "JAX compact")


class Skip(Exception):
  """A row that cannot run here; the message says why."""


@dataclasses.dataclass
class Row:
  check: str
  model: str
  dtype: str
  batch: int
  result: str = ""
  status: str = "ok"


def median_s(call: Callable[[], Any], warmup: int, repeats: int) -> float:
  for _ in range(warmup):
    call()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# ------------------------------------------------------------------ train
def group_step(name: str, groups: int, batch: int, dtype: Any, info: Any):
  """The DSP group-learning step, its state and batch (as the pipeline's)."""
  model = models.create_model(name, 10, groups=groups)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False)
  layer_info = dsp_jax.analyze(model, (32, 32, 3))
  gates = dsp_jax.init_gates(layer_info, groups, key=jax.random.key(1))
  state = dsp_jax.init_group_state(variables, gates, rng=jax.random.key(2))
  step = dsp_jax.make_group_step(
      model, groups=groups, lam=2e-3, lr_schedule=lambda t: 0.05,
      total_steps=1000, layer_info=layer_info,
      augment_fn=lambda key, x: steps.preprocess(key, x, info, dtype))
  rng = np.random.default_rng(0)
  data = {"image": jnp.asarray(rng.integers(0, 256, (batch, 32, 32, 3),
                                            np.uint8)),
          "label": jnp.asarray(rng.integers(0, 10, (batch,), np.int32))}
  return step, state, data


def train_img_s(kind: str, name: str, batch: int, dtype: Any, groups: int,
                n: int) -> float:
  """Images per second of one train step kind."""
  if kind == "DSP group":
    info = DatasetInfo("random", 10, 32, 3, {"train": batch}, CIFAR_MEAN,
                       CIFAR_STD)
    fn, state, data = group_step(name, groups, batch, dtype, info)
  else:
    fns, data = ddrop_step.make_steps(name, batch, dtype)
    fn, state = fns["plain" if kind == "plain" else "ddrop"]
  holder = [state]

  def call():
    holder[0], metrics = fn(holder[0], data)
    metrics["loss"].block_until_ready()
  return batch / median_s(call, 2, n)


def train_result(*args: Any) -> str:
  """``train_img_s(*args)`` as a table cell."""
  return f"{train_img_s(*args):.1f} img/s"


# -------------------------------------------------------------- inference
def cuda_reason() -> str | None:
  if not torch.cuda.is_available():
    return f"no CUDA device for torch {torch.__version__}"
  return None


def onnx_cuda_reason() -> str | None:
  try:
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return f"onnxruntime not importable ({e})"
  if "CUDAExecutionProvider" not in ort.get_available_providers():
    return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
            "(onnxruntime-gpu is not installed)")
  return None


def torch_on_gpu(spec: fast.NetSpec, regime: Any, batch: int,
                 dtype: torch.dtype) -> Callable[[], Any]:
  """A fast module's regime traced and frozen on the GPU; a timed call."""
  net = fast.build_torch(spec, regime).to("cuda", dtype).eval()
  x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size,
                  device="cuda", dtype=dtype)
  with torch.no_grad():
    module = torch.jit.freeze(torch.jit.trace(net, x, check_trace=False))

  def call():
    with torch.no_grad():
      module(x)
    torch.cuda.synchronize()
  return call


@dataclasses.dataclass
class Pruned:
  """The inference check's model: specs and plan, ONNX files, JAX side."""

  spec: fast.NetSpec
  plan: fast.Plan
  dense: fast.NetSpec
  onnx: dict[str, pathlib.Path]
  model: Any
  dense_variables: dict[str, Any]
  masked: dict[str, Any]

  @property
  def macs_ratio(self) -> float:
    return fast.spec_macs(self.spec) / fast.spec_macs(self.dense)


def build_pruned(name: str, groups: int, out: pathlib.Path) -> Pruned:
  model, dense_v, masked = el.dsp_quickstart_like(groups, 0.5, name=name,
                                                  parity=False)
  r = dsp.export_packed(model, masked, out, program=False,
                        fast_options=fast.Options(False))
  spec = fast_specs.from_packed(jax_side.plan_from_variables(masked), name)
  dense = fast_specs.from_packed(jax_side.plan_from_variables(dense_v), name)
  plan = fast.make_plan(spec, cache=r.files[fast.FAST_PLAN])
  return Pruned(spec, plan, dense, el.onnx_files(model, dense_v, masked, out),
                model, dense_v, masked)


def infer_calls(kind: str, p: Pruned, batch: int
                ) -> tuple[Callable[[], Any], Callable[[], Any]]:
  """``(pruned call, dense call)`` of one inference row."""
  x = np.random.default_rng(batch).normal(
      size=(batch, p.spec.image_size, p.spec.image_size, p.spec.in_channels)
  ).astype(np.float32)
  if kind.startswith("fast.pt"):
    if cuda_reason():
      raise Skip(cuda_reason())
    dtype = torch.float16 if kind.endswith("fp16") else torch.float32
    regime = (p.plan.regimes["small"] if batch <= p.plan.threshold
              else p.plan.large)
    dense = [torch_on_gpu(p.dense, fast.make_plan(
        p.dense, memory_format=fmt).large, batch, dtype)
             for fmt in fast.MEMORY_FORMATS]
    best = min(dense, key=lambda c: median_s(c, 2, 5))
    return torch_on_gpu(p.spec, regime, batch, dtype), best
  if kind == "ONNX CUDA":
    if onnx_cuda_reason():
      raise Skip(onnx_cuda_reason())
    gpu = ("CUDAExecutionProvider",)
    return (el.onnx_forward(p.onnx["ONNX"], providers=gpu)(x),
            el.onnx_forward(p.onnx["ONNX dense"], providers=gpu)(x))
  apply, params = convert.compact(p.model, p.masked)
  return (el.jax_apply(jax.jit(apply), params)(x),
          el.jax_forward(p.model, p.dense_variables)(x))


def infer_result(calls: tuple[Callable, Callable], warmup: int, repeats: int
                 ) -> str:
  times: list[list[float]] = [[], []]
  for c in calls:
    for _ in range(warmup):
      c()
  for _ in range(repeats):
    for t, c in zip(times, calls):
      t0 = time.perf_counter()
      c()
      t.append(time.perf_counter() - t0)
  pruned, dense = (statistics.median(t) * 1e3 for t in times)
  return (f"pruned {pruned:.3f} ms, dense {dense:.3f} ms "
          f"(pruned/dense {pruned / dense:.2f})")


def infer_row(kind: str, pruned: Callable[[], Pruned], batch: int,
              warmup: int, repeats: int) -> str:
  """One inference row's cell (the model is built by the first row)."""
  return infer_result(infer_calls(kind, pruned(), batch), warmup, repeats)


# ------------------------------------------------------------------- main
def run_row(row: Row, fn: Callable[[], str], deadline: float) -> None:
  if time.monotonic() > deadline:
    row.status = "skipped: time budget spent"
    return
  try:
    row.result = fn()
  except Skip as e:
    row.status = f"skipped: {e}"
  except Exception as e:  # pylint: disable=broad-except
    # One failing row must not hide the others; its error stays visible.
    last = str(e).strip().splitlines()[-1:] or [""]
    row.status = f"failed: {type(e).__name__}: {last[0][:200]}"
    traceback.print_exc()


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cpu-smoke", action="store_true",
                  help="tiny sizes, a few steps: seconds on a CPU")
  ap.add_argument("--budget-s", type=float,
                  help="rows not started after this many seconds are skipped "
                  "(default 420; none with --cpu-smoke, whose point is to "
                  "run every row)")
  args = ap.parse_args(argv)
  smoke = args.cpu_smoke
  train_models = ["cifar_resnet8"] if smoke else ["cifar_resnet20",
                                                   "cifar_resnet56"]
  batch, n_steps = (8, 1) if smoke else (512, 10)
  infer_model, groups = ("cifar_resnet8", 2) if smoke else ("cifar_resnet20",
                                                            4)
  batches, warmup, repeats = ([1, 4], 1, 2) if smoke else ([1, 256], 5, 30)
  budget = args.budget_s or (float("inf") if smoke else 420.0)
  deadline = time.monotonic() + budget
  dev = jax.devices()[0]
  gpu = (torch.cuda.get_device_name() if torch.cuda.is_available()
         else "none")
  print(f"JAX {jax.__version__} on {len(jax.devices())} x {dev.device_kind} "
        f"({dev.platform}); torch {torch.__version__}, CUDA device: {gpu}",
        flush=True)
  rows = []
  for name in train_models:
    for dname, dtype in DTYPES.items():
      for kind in TRAIN_STEPS:
        row = Row(f"train {kind}", name, dname, batch)
        run_row(row, functools.partial(train_result, kind, name, batch, dtype,
                                       groups, n_steps), deadline)
        rows.append(row)
        print(row, flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    holder: list[Pruned] = []

    def pruned() -> Pruned:
      if not holder:
        holder.append(build_pruned(infer_model, groups, pathlib.Path(tmp)))
      return holder[0]
    for kind in INFER:
      dname = ("float16" if kind.endswith("fp16") else "float32")
      for b in batches:
        row = Row(f"infer {kind}", infer_model, dname, b)
        run_row(row, functools.partial(infer_row, kind, pruned, b, warmup,
                                       repeats), deadline)
        rows.append(row)
        print(row, flush=True)
  if holder:
    print(f"inference model: {infer_model} DSP G={groups}, MACs ratio "
          f"pruned/dense {holder[0].macs_ratio:.2f}")
  print("\n| check | model | dtype | batch | result | status |\n"
        "|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r.check} | {r.model} | {r.dtype} | {r.batch} | "
          f"{r.result or '-'} | {r.status} |")


if __name__ == "__main__":
  main()
