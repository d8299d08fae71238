"""Latency targets and round_to: predicted vs measured latency of fast.pt.

Run from the repository root (one torch thread; results into
``bench/results/latency/``)::

  python bench/latency_target.py                 # batch 128, 3 models
  python bench/latency_target.py --quick         # seconds: a smoke run

Models (random weights; the pruning is what each method leaves):

* ``dsp_r56_g3 target t``: CIFAR ResNet-56, G = 3, random group logits,
  pruned by ``dsp_jax.prune(target_latency=t, parity=False)`` for each t of
  ``--targets`` under the latency model measured here (``models.latency``);
* ``dsp_r20_g4``: ResNet-20, G = 4, random logits, pruned to ``--rate``
  P.FLOPS (the FLOPs target, parity mode, as ``bench/export_latency.py``);
* ``ddrop_r18w2``: CIFAR ResNet-18 of width factor 2 (stages 16..128, so
  that every layer is at least 16 wide) pruned by DDROP at ``--amount``.

Each model is pruned with ``round_to`` 0 and ``--round-to`` (16); a target
that rounding cannot reach is reported as such. Rows at
``--batch``: the dense network BN-folded in NCHW and channels_last (best
dense = the faster), and ``fast.pt``'s lowering (``convert.fast``, the cost
model's plan, as the exports write it) of each prune; each the median of
``--repeats`` runs interleaved round-robin after ``--warmup`` calls. Beside
each pruned row: the latency model's predicted fraction (predicted pruned /
predicted dense, from the table) and the measured one (fast.pt / best
dense), and their relative error.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import ddrop_jax  # noqa: E402
import dsp_jax  # noqa: E402
import export_latency as el  # noqa: E402
import models  # noqa: E402
from convert import fast, fast_specs, jax_side, slim, writer  # noqa: E402
from models import graph as graph_lib  # noqa: E402
from models import latency as lat  # noqa: E402
from training import artifacts  # noqa: E402

OUT = ROOT / "bench" / "results" / "latency"


def _quiet(fn, *a, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fn(*a, **kw)


def dsp_case(name: str, groups: int, table_path, batch: int, round_to: int,
             parity: bool, **target):
  """(dense spec, pruned spec, predicted fraction, prune figures)."""
  grouped = models.create_model(name, 10, groups=groups)
  v = artifacts.random_variables(grouped, 0)
  info = dsp_jax.analyze(grouped, (32, 32, 3))
  model = lat.model_for(info, batch, table_path)
  res = _quiet(dsp_jax.prune, v["params"], v["gates"], info, groups=groups,
               parity=parity, round_to=round_to, latency=model, **target)
  dense = {"params": v["params"], "batch_stats": v["batch_stats"]}
  masked = artifacts.to_numpy_tree({**dense, "params": res.params,
                                    "masks": res.masks})
  spec = fast_specs.from_packed(jax_side.plan_from_variables(masked), name)
  dspec = fast_specs.from_packed(jax_side.plan_from_variables(dense), name)
  cut = graph_lib.cut(info, masked["params"], masked["masks"])
  return dspec, spec, model.predict_cut(cut.layers) / model.dense_seconds(), {
      "p_flops": res.p_flops, "search_fraction": res.latency["fraction"],
      "macs_ratio": fast.spec_macs(spec) / fast.spec_macs(dspec)}


def ddrop_case(name: str, amount: float, table_path, batch: int,
               round_to: int, **overrides):
  model = models.create_model(name, 10, **overrides)
  v = artifacts.random_variables(model, 0)
  masked = artifacts.to_numpy_tree(ddrop_jax.prune(
      v, ddrop_jax.ddrop_layers(model),
      ddrop_jax.DdropConfig(amount=amount, round_to=round_to)))
  graph = models.analyze(model, 32, 3)
  lm = lat.model_for(graph, batch, table_path)
  cut = graph_lib.cut(graph, masked["params"], masked["masks"])
  module, _ = slim.slim(model, masked)
  spec = fast_specs.from_slim(module, name, 32)
  dense_module, _ = slim.slim(model, v)
  dspec = fast_specs.from_slim(dense_module, name, 32, pruned=False)
  return dspec, spec, lm.predict_cut(cut.layers) / lm.dense_seconds(), {
      "amount": amount,
      "macs_ratio": fast.spec_macs(spec) / fast.spec_macs(dspec)}


def interleaved(calls: dict, warmup: int, repeats: int) -> dict:
  """Every timing of every call, the calls run round-robin (A, B, A, B...)
  so that load changes hit them alike."""
  for call in calls.values():
    for _ in range(warmup):
      call()
  times = {k: [] for k in calls}
  for _ in range(repeats):
    for k, call in calls.items():
      t0 = time.perf_counter()
      call()
      times[k].append(time.perf_counter() - t0)
  return times


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.8],
                  help="DSP ResNet-56's latency targets (fraction of dense)")
  ap.add_argument("--rate", type=float, default=0.4)
  ap.add_argument("--amount", type=float, default=0.5)
  ap.add_argument("--round-to", type=int, default=16)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--table", type=pathlib.Path, default=None,
                  help="latency table cache (default: in --out)")
  ap.add_argument("--out", type=pathlib.Path, default=OUT)
  ap.add_argument("--quick", action="store_true",
                  help="ResNet-20 only, batch 2, 1 repeat: a smoke run")
  args = ap.parse_args(argv)
  torch.set_num_threads(1)
  if args.quick:
    args.batch, args.repeats, args.warmup = 2, 1, 1
  args.out.mkdir(parents=True, exist_ok=True)
  table = args.table or args.out / f"table_b{args.batch}.json"
  cases = {"dsp_r20_g4": lambda r: dsp_case(
      "cifar_resnet20", 4, table, args.batch, r, True, rate=args.rate)}
  if not args.quick:
    r56 = {f"dsp_r56_g3 target {t}": functools.partial(
        lambda t, r: dsp_case("cifar_resnet56", 3, table, args.batch, r,
                              False, target_latency=t), t)
           for t in args.targets}
    cases = {**r56, **cases, "ddrop_r18w2": lambda r: ddrop_case(
        "cifar_resnet18", args.amount, table, args.batch, r, factor=2)}
  x = writer.random_images(args.batch, 32, seed=args.batch)
  rows = []
  for case, build in cases.items():
    builds, pred, info, done = {}, {}, {}, []
    for r in (0, args.round_to):
      try:
        dspec, spec, pred[r], info[r] = build(r)
      except ValueError as e:  # A target that rounding cannot reach.
        rows.append({"model": case, "round_to": r, "batch": args.batch,
                     "unreachable": str(e)})
        print(json.dumps(rows[-1]), flush=True)
        continue
      done.append(r)
      builds[f"fast.pt round_to={r}"] = fast.script(spec, fast.make_plan(spec))
    builds.update(el.dense_builds(dspec))
    times = interleaved({k: el.torch_forward(m)(x)
                         for k, m in builds.items()},
                        args.warmup, args.repeats)
    stats = {"median": statistics.median, "min": min}
    for r in done:
      row = {"model": case, "round_to": r, "batch": args.batch,
             "predicted_fraction": pred[r], **info[r]}
      for name, f in stats.items():
        best = min(f(times["dense nchw"]), f(times["dense channels_last"]))
        fast_s = f(times[f"fast.pt round_to={r}"])
        row.update({f"best_dense_ms_{name}": best * 1e3,
                    f"fast_ms_{name}": fast_s * 1e3,
                    f"measured_fraction_{name}": fast_s / best,
                    f"error_{name}": pred[r] / (fast_s / best) - 1})
      rows.append(row)
      print(json.dumps(rows[-1]), flush=True)
  load = os.getloadavg()
  result = {
      "command": "python bench/latency_target.py " + " ".join(
          argv if argv is not None else sys.argv[1:]),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "machine": lat.machine_id(), "python": platform.python_version(),
      "torch": torch.__version__, "threads": 1,
      "loadavg_at_end": [round(x, 2) for x in load],
      "warmup": args.warmup, "repeats": args.repeats, "rows": rows}
  stem = "quick" if args.quick else f"b{args.batch}"
  (args.out / f"latency_{stem}.json").write_text(json.dumps(result, indent=1))
  md = [f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; machine: {result['machine']}; torch "
        f"{result['torch']}, 1 thread; load average at the end "
        f"{result['loadavg_at_end']}; {args.repeats} runs interleaved "
        "round-robin per model: fractions from the least run (the table's "
        "statistic: load only adds time) and, in brackets, from medians.",
        "",
        "| model | round_to | best dense ms | fast.pt ms | measured fraction "
        "| predicted fraction | error | MACs ratio |",
        "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "unreachable" in r:
      md.append(f"| {r['model']} | {r['round_to']} | unreachable: "
                f"{r['unreachable']} | | | | | |")
      continue
    md.append(
        f"| {r['model']} | {r['round_to']} | {r['best_dense_ms_min']:.1f} "
        f"({r['best_dense_ms_median']:.1f}) | {r['fast_ms_min']:.1f} "
        f"({r['fast_ms_median']:.1f}) | {r['measured_fraction_min']:.3f} "
        f"({r['measured_fraction_median']:.3f}) | "
        f"{r['predicted_fraction']:.3f} | {100 * r['error_min']:+.1f} % "
        f"({100 * r['error_median']:+.1f} %) | {r['macs_ratio']:.3f} |")
  (args.out / f"latency_{stem}.md").write_text("\n".join(md) + "\n")
  print("\n".join(md))
  return result


if __name__ == "__main__":
  main()
