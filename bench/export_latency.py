"""Latency of pruned exports vs the best dense build, beside MACs ratios.

Run from the repository root, once with one thread (XLA's pool is sized when
JAX starts, so its flags come from the environment) and once with all::

  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    python bench/export_latency.py --threads 1
  python bench/export_latency.py --threads 0

``--quick`` is a smoke run of seconds on a tiny model.

Models (random weights; the pruning is what each method leaves):

* ``resnet56_g3``: the authors' released file's structure, imported
  (``--released``); its original-format file is the released one;
* ``dsp_r20_g4``: a DSP quickstart-like model: ResNet-20, G = ``--groups``,
  pruned by ``dsp_jax.prune`` on random group logits to ``--rate`` P.FLOPS;
  original format: our ``packed.pt``;
* ``dsp_r8``: the same on ResNet-8, ``--quick``'s model (with G = 2,
  batches 1 and 2, one warm-up call and two runs);
* ``ddrop_r18``, ``ddrop_r50``, ``ddrop_vgg16``: CIFAR ResNet-18/50 and
  VGG-16-bn pruned by DDROP at ``--amount``; original format: ``slim.pt``.

Rows per model, each at batch 1 and 128 (``--batches``): the dense network
BN-folded in NCHW and in channels_last ("best dense" = the faster), the
original-format file, ``fast.pt`` (``convert.fast``: a plan per batch
regime, dispatched on the batch at run time; cost model, or timed with
``--tune``); in JAX the dense jitted apply and the jitted compact functions
(``convert.fast_jax``, and ``convert.compact``, any model's); and the ONNX
files (``convert.generic``'s ``model.onnx``, opset 17) of the pruned and of
the dense network, exported the same way, under onnxruntime's CPU execution
provider with one intra-op thread and with all (its default). Each cell is
the median of ``--repeats`` runs interleaved across a model's rows
(round-robin, so load changes hit all rows alike) after ``--warmup`` calls.
The summary gives each pruned row's ratio to the best dense (JAX compact
functions: to dense JAX; ONNX: to the dense ONNX file at the same thread
count) beside the model's MACs ratio, the physical limit. ``--threads`` sets
``torch.set_num_threads`` (0 = all cores). Timings on a shared, loaded
machine vary from run to run: compare rows of one run. ``--out DIR`` writes
``export_latency.json`` and ``.md`` (command, machine, date, load average,
the tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import convert  # noqa: E402
import ddrop_jax  # noqa: E402
import dsp_jax  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402
from convert import dsp, dsp_torch, fast, fast_jax, fast_specs  # noqa: E402
from convert import generic, jax_side, slim  # noqa: E402
from convert import writer  # noqa: E402
from training import artifacts  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
RELEASED = SHARED / "reference" / "dsp_checkpoints" / "resnet56_g3.pt"


def dsp_quickstart_like(groups: int, rate: float, seed: int = 0,
                        name: str = "cifar_resnet20", parity: bool = True
                        ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """A CIFAR ResNet with random weights, its DSP prune on random logits.

  Returns:
    ``(model, dense_variables, masked_variables)``: the model without gates,
    its random variables and the pruned ones (``masks`` of ``dsp_jax.prune``).
  """
  grouped = models.create_model(name, 10, groups=groups)
  v = artifacts.random_variables(grouped, seed)
  info = dsp_jax.analyze(grouped, (32, 32, 3))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the search's non-monotone-β warning.
    res = dsp_jax.prune(v["params"], v["gates"], info, groups=groups,
                        rate=rate, parity=parity)
  dense = {"params": v["params"], "batch_stats": v["batch_stats"]}
  masked = artifacts.to_numpy_tree({"params": res.params,
                                   "batch_stats": v["batch_stats"],
                                   "masks": res.masks})
  return models.create_model(name, 10), dense, masked


def jax_forward(model: Any, variables: dict[str, Any]
                ) -> Callable[[np.ndarray], Callable[[], Any]]:
  """``x -> (() -> logits)``: a timed call of the jitted eval-mode apply."""
  v = jax.tree.map(jnp.asarray, variables)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))

  def bind(x_nhwc: np.ndarray) -> Callable[[], Any]:
    x = jnp.asarray(x_nhwc)
    return lambda: apply(v, x).block_until_ready()
  return bind


def torch_forward(module: Any) -> Callable[[np.ndarray], Callable[[], Any]]:
  """``x -> (() -> logits)``: a timed no-grad call of a torch module."""
  def bind(x_nhwc: np.ndarray) -> Callable[[], Any]:
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))

    def call():
      with torch.no_grad():
        return module(x)
    return call
  return bind


def dense_builds(spec: fast.NetSpec) -> dict[str, Any]:
  """The dense network BN-folded, traced and frozen, in both memory formats."""
  return {f"dense {fmt}": fast.script(spec, fast.make_plan(
      spec, memory_format=fmt)) for fmt in fast.MEMORY_FORMATS}


@dataclasses.dataclass
class Case:
  """One model's builds: torch modules and JAX rows, and what made them."""

  modules: dict[str, Any]
  jax: dict[str, Callable]
  macs_ratio: float
  model: Any
  dense: dict[str, Any]
  masked: dict[str, Any]


def released_case(path: pathlib.Path, out: pathlib.Path, tune: bool) -> Case:
  """A released packed file's structure: its rows."""
  plan = dsp_torch.read_packed(dsp.load_torchscript(path))
  name, overrides, masked = jax_side.variables_from_plan(plan)
  model = models.create_model(name, plan.num_classes, **overrides)
  spec = fast_specs.from_packed(plan, name)
  dense_v = {k: masked[k] for k in ("params", "batch_stats")}
  dense = fast_specs.from_packed(jax_side.plan_from_variables(dense_v), name)
  x = writer.random_images(4)
  r = fast.export_fast(spec, out, x, artifacts.logits(model, masked, x),
                       tune=tune, program=False)
  print(f"{path.stem}: {r.notes[-1]}; max |logits diff| "
        f"{max(r.max_abs_diff.values()):.2g}")
  torch_rows = {**dense_builds(dense),
                "original format": dsp.load_torchscript(path),
                "fast.pt": torch.jit.load(str(r.files[fast.FAST]))}
  return Case(torch_rows, jax_rows(model, dense_v, spec),
              fast.spec_macs(spec) / fast.spec_macs(dense), model, dense_v,
              masked)


def jax_rows(model: Any, dense_v: dict[str, Any], spec: fast.NetSpec
             ) -> dict[str, Callable]:
  params, apply = fast_jax.compact(spec)
  return {"JAX dense jit": jax_forward(model, dense_v),
          "JAX compact jit": jax_apply(jax.jit(apply), params)}


def jax_apply(fn: Callable, params: Any) -> Callable:
  """``x -> (() -> logits)`` of a jitted ``fn(params, x)``."""
  def bind(x_nhwc: np.ndarray) -> Callable[[], Any]:
    x = jnp.asarray(x_nhwc)
    return lambda: fn(params, x).block_until_ready()
  return bind


def dsp_case(name: str, groups: int, rate: float, out: pathlib.Path,
             tune: bool) -> Case:
  # ResNet-8's layers are small enough for the reference's cnt_g = 0 defect
  # (kept by ``parity``) to empty one, which no file can hold.
  model, dense_v, masked = dsp_quickstart_like(
      groups, rate, name=name, parity=name != "cifar_resnet8")
  r = dsp.export_packed(model, masked, out, program=False,
                        fast_options=fast.Options(tune))
  print(f"{name} g{groups}: {r.notes[-1]}")
  spec = fast_specs.from_packed(jax_side.plan_from_variables(masked), name)
  dense = fast_specs.from_packed(jax_side.plan_from_variables(dense_v), name)
  torch_rows = {**dense_builds(dense),
                "original format": torch.jit.load(str(r.files[dsp.PACKED])),
                "fast.pt": torch.jit.load(str(r.files[fast.FAST]))}
  return Case(torch_rows, jax_rows(model, dense_v, spec),
              fast.spec_macs(spec) / fast.spec_macs(dense), model, dense_v,
              masked)


def ddrop_case(name: str, amount: float, out: pathlib.Path, tune: bool
               ) -> Case:
  model = models.create_model(name, 10)
  dense_v = artifacts.random_variables(model, 0)
  masked = artifacts.to_numpy_tree(ddrop_jax.prune(
      dense_v, ddrop_jax.ddrop_layers(model),
      ddrop_jax.DdropConfig(amount=amount)))
  r = slim.export_ddrop(model, masked, out, program=False,
                        fast_options=fast.Options(tune))
  print(f"{name} amount {amount}: {r.notes[-1]}")
  module, _ = slim.slim(model, masked)
  spec = fast_specs.from_slim(module, name, 32)
  dense_module, _ = slim.slim(model, dense_v)
  dense = fast_specs.from_slim(dense_module, name, 32, pruned=False)
  torch_rows = {**dense_builds(dense),
                "original format": torch.jit.load(str(r.files[
                    slim.TORCHSCRIPT])),
                "fast.pt": torch.jit.load(str(r.files[fast.FAST]))}
  return Case(torch_rows, jax_rows(model, dense_v, spec),
              fast.spec_macs(spec) / fast.spec_macs(dense), model, dense_v,
              masked)


# ONNX rows: (label, intra-op threads; 0 = onnxruntime's default, all cores).
ONNX_THREADS = ((" 1 thread", 1), (" all threads", 0))


def onnx_forward(path: pathlib.Path, threads: int = 0,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)
                 ) -> Callable[[np.ndarray], Callable[[], Any]]:
  """``x -> (() -> logits)``: an onnxruntime session's timed call."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  opts = ort.SessionOptions()
  opts.intra_op_num_threads = threads
  session = ort.InferenceSession(str(path), opts, providers=list(providers))
  name = session.get_inputs()[0].name

  def bind(x_nhwc: np.ndarray) -> Callable[[], Any]:
    feed = {name: np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))}
    return lambda: session.run(None, feed)
  return bind


def onnx_files(model: Any, dense: dict[str, Any], masked: dict[str, Any],
               out: pathlib.Path) -> dict[str, pathlib.Path]:
  """``{"ONNX dense": path, "ONNX": path}``: both networks' ONNX files.

  Both come from ``convert.generic.export`` (the one path of ``python -m
  convert export``), so their ratio compares like with like.
  """
  files = {}
  for tag, variables in (("ONNX dense", dense), ("ONNX", masked)):
    r = generic.export(model, variables, out / tag.replace(" ", "_"),
                       kinds=(writer.ONNX,), fresh=False)
    files[tag] = r.files[generic.FILES[writer.ONNX]]
  return files


def generic_rows(case: Case, out: pathlib.Path) -> dict[str, Callable]:
  """``convert.compact`` jitted, and the ONNX files of pruned and dense."""
  apply, params = convert.compact(case.model, case.masked)
  rows = {"JAX convert.compact jit": jax_apply(jax.jit(apply), params)}
  files = onnx_files(case.model, case.dense, case.masked, out)
  for label, threads in ONNX_THREADS:
    for tag, path in files.items():
      rows[tag + label] = onnx_forward(path, threads)
  return rows


def interleaved(binds: dict[str, Callable], x: np.ndarray, warmup: int,
                repeats: int) -> dict[str, float]:
  """Median seconds per row, the rows' runs interleaved round-robin."""
  calls = {k: b(x) for k, b in binds.items()}
  for call in calls.values():
    for _ in range(warmup):
      call()
  times: dict[str, list[float]] = {k: [] for k in calls}
  for _ in range(repeats):
    for k, call in calls.items():
      t0 = time.perf_counter()
      call()
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(t) for k, t in times.items()}


def build_case(name: str, args: argparse.Namespace, out: pathlib.Path
               ) -> Case | None:
  if name == "resnet56_g3":
    if not args.released.is_file():
      print(f"no released file at {args.released}: {name} left out")
      return None
    return released_case(args.released, out, args.tune)
  if name in DSP_CASES:
    return dsp_case(DSP_CASES[name], args.groups, args.rate, out, args.tune)
  return ddrop_case(CASES[name], args.amount, out, args.tune)


def summary_row(t: dict[str, float]) -> list[float]:
  """A pruned model's ratios (``SUMMARY`` order) from its rows' times."""
  best = min(t["dense nchw"], t["dense channels_last"])
  return [t["original format"] / best, t["fast.pt"] / best,
          t["JAX compact jit"] / t["JAX dense jit"],
          t["JAX convert.compact jit"] / t["JAX dense jit"],
          *(t["ONNX" + label] / t["ONNX dense" + label]
            for label, _ in ONNX_THREADS)]


SUMMARY = ("original / best dense", "fast.pt / best dense",
           "JAX compact / dense JAX", "JAX convert.compact / dense JAX",
           *(f"ONNX / dense ONNX,{label}" for label, _ in ONNX_THREADS))

QUICK = {"models": ["dsp_r8"], "groups": 2, "batches": [1, 2], "warmup": 1,
         "repeats": 2}


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=list(DEFAULT_CASES),
                  choices=list(CASES))
  ap.add_argument("--groups", type=int, default=4)
  ap.add_argument("--rate", type=float, default=0.55,
                  help="target P.FLOPS of the DSP prune (fraction)")
  ap.add_argument("--amount", type=float, default=0.5,
                  help="DDROP pruning amount")
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 128])
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--threads", type=int, default=1,
                  help="torch.set_num_threads (0: all cores)")
  ap.add_argument("--tune", action="store_true",
                  help="fast.pt from timed plans instead of the cost model")
  ap.add_argument("--released", type=pathlib.Path, default=RELEASED)
  ap.add_argument("--quick", action="store_true",
                  help="smoke run of seconds: the defaults become "
                  f"{QUICK} (flags given explicitly win)")
  ap.add_argument("--out", type=pathlib.Path,
                  help="directory for export_latency.json and .md")
  if "--quick" in (sys.argv[1:] if argv is None else argv):
    ap.set_defaults(**QUICK)  # before parsing, so explicit flags still win.
  args = ap.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  started, loads = report.now(), [report.load_average()]
  print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; JAX "
        f"{jax.devices()[0]}; warm-up {args.warmup}, median of "
        f"{args.repeats} interleaved runs")
  table, summary = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models:
      out = pathlib.Path(tmp) / name
      case = build_case(name, args, out)
      if case is None:
        continue
      binds = ({k: torch_forward(m) for k, m in case.modules.items()}
               | case.jax | generic_rows(case, out))
      times = {b: interleaved(binds, writer.random_images(b, 32, seed=b),
                              args.warmup, args.repeats)
               for b in args.batches}
      loads.append(report.load_average())
      for k in binds:
        table.append((name, k, {b: times[b][k] for b in args.batches}))
        print(f"{name} | {k} | " + " | ".join(
            f"{times[b][k] * 1e3:.1f}" for b in args.batches), flush=True)
      summary += [(name, b, case.macs_ratio, summary_row(times[b]))
                  for b in args.batches]
  head = " | ".join(f"batch {b} ms" for b in args.batches)
  lines = [f"| model | build | {head} |",
           "|" + "---|" * (2 + len(args.batches))]
  lines += [f"| {name} | {k} | "
            + " | ".join(f"{t[b] * 1e3:.2f}" for b in args.batches) + " |"
            for name, k, t in table]
  lines += ["", "| model | batch | MACs ratio | " + " | ".join(SUMMARY)
            + " |", "|---|---|---|" + "---|" * len(SUMMARY)]
  lines += [f"| {name} | {b} | {macs:.2f} | "
            + " | ".join(f"{r:.2f}" for r in ratios) + " |"
            for name, b, macs, ratios in summary]
  print("\n" + "\n".join(lines))
  if args.out:
    report.write(
        args.out, "export_latency",
        "Latency of pruned exports vs dense (CPU)",
        report.command("bench/export_latency.py", argv), started, loads,
        {"torch_threads": torch.get_num_threads(), "batches": args.batches,
         "warmup": args.warmup, "repeats": args.repeats,
         "ms": [{"model": n, "build": k,
                 **{f"batch {b}": t[b] * 1e3 for b in args.batches}}
                for n, k, t in table],
         "ratios": [{"model": n, "batch": b, "macs_ratio": m,
                     **dict(zip(SUMMARY, r))} for n, b, m, r in summary]},
        lines)


DSP_CASES = {"dsp_r20_g4": "cifar_resnet20", "dsp_r8": "cifar_resnet8"}
DEFAULT_CASES = {"resnet56_g3": None, "dsp_r20_g4": None,
                 "ddrop_r18": "cifar_resnet18", "ddrop_r50": "cifar_resnet50",
                 "ddrop_vgg16": "cifar_vgg16_bn"}
CASES = {**DEFAULT_CASES, "dsp_r8": None}


if __name__ == "__main__":
  main()
