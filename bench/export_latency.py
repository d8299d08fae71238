"""CPU inference latency of dense vs DSP-packed ResNet-56, in JAX and TorchScript.

Run from the repository root (one thread each for XLA and PyTorch)::

  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    python bench/export_latency.py --threads 1 --warmup 5 --repeats 10

Three comparisons, each at batch 1 and 128 (``--batches``), the median of
``--repeats`` timed calls after ``--warmup`` untimed ones (the TorchScript
profiling executor optimises a graph during its first calls, which take up
to a second):

* JAX: the jitted eval-mode apply of ResNet-56 with random weights (dense)
  vs the same model under the masks of a DSP prune (g=4, random group logits,
  the rate search aimed at ``--rate`` P.FLOPS): dense-shaped, so the masks
  only multiply the kernels and save no time;
* TorchScript: the dense ResNet-56 (``convert.dsp_torch.dense_forward``
  traced) vs our packed export of the pruned model (``convert.dsp``);
* the released ``resnet56_g3.pt`` (``--released``) vs our export of the same
  structure (imported with ``convert.dsp.import_packed``, exported again).

Threads: ``--threads`` calls ``torch.set_num_threads`` (default 1). On a
machine whose cores other processes share, more PyTorch threads than free
cores make latencies erratic (seconds instead of milliseconds: the pool's
threads wait on each other), so one thread gives comparable rows. XLA sizes
its CPU pool when JAX starts, from ``XLA_FLAGS`` (as in the command above) or
else from the core count; the script cannot change it later. Timings on a
shared, loaded machine vary from run to run: compare rows of one run.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import dsp_jax  # noqa: E402
import models  # noqa: E402
from convert import dsp, dsp_torch, jax_side  # noqa: E402
from models import flops  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
RELEASED = SHARED / "reference" / "dsp_checkpoints" / "resnet56_g3.pt"
MODEL = "cifar_resnet56"


def median_seconds(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
  """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup``."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def pruned_resnet56(groups: int, rate: float, seed: int = 0
                    ) -> tuple[Any, dict[str, Any], dict[str, Any], float]:
  """ResNet-56 with random weights, and its DSP prune on random group logits.

  Returns:
    ``(model, dense_variables, masked_variables, p_flops)``: the model built
    without gates, its random variables, the pruned ones (``masks`` from
    ``dsp_jax.prune``) and their P.FLOPS in percent.
  """
  grouped = models.create_model(MODEL, 10, groups=groups)
  v = jax_side.random_variables(grouped, seed)
  info = dsp_jax.analyze(grouped, (32, 32, 3))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the search's non-monotone-β warning.
    res = dsp_jax.prune(v["params"], v["gates"], info, groups=groups,
                        rate=rate)
  dense = {"params": v["params"], "batch_stats": v["batch_stats"]}
  masked = jax_side.to_numpy_tree({"params": res.params,
                                   "batch_stats": v["batch_stats"],
                                   "masks": res.masks})
  return models.create_model(MODEL, 10), dense, masked, res.p_flops


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


def dense_torchscript(variables: dict[str, Any]) -> torch.jit.ScriptModule:
  """The dense CifarResNet as TorchScript (``dense_forward`` traced)."""
  sd = dsp.dense_state_dict(variables)

  class Dense(torch.nn.Module):

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return dsp_torch.dense_forward(sd, x)

  # The state dict's tensors become constants of the trace, as wanted.
  with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    return torch.jit.trace(Dense().eval(), torch.zeros(1, 3, 32, 32),
                           check_trace=False)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--groups", type=int, default=4)
  ap.add_argument("--rate", type=float, default=0.6,
                  help="target P.FLOPS of the prune (fraction)")
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 128])
  ap.add_argument("--warmup", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--threads", type=int, default=1,
                  help="torch.set_num_threads")
  ap.add_argument("--released", type=pathlib.Path, default=RELEASED)
  args = ap.parse_args(argv)
  torch.set_num_threads(args.threads)
  print(f"torch threads {torch.get_num_threads()}, JAX {jax.devices()[0]}, "
        f"warm-up {args.warmup}, median of {args.repeats}")

  model, dense_v, masked_v, p_flops = pruned_resnet56(args.groups, args.rate)
  report = flops.report(model, masked_v)
  print(f"ResNet-56 g={args.groups}: P.FLOPS {p_flops:.1f}% (DSP's measure); "
        f"whole model {report.macs / 1e6:.1f} of {report.macs_dense / 1e6:.1f}"
        f" MMACs ({report.pflops_whole_model:.1f}% removed)")
  rows: list[tuple[str, str, dict[int, float]]] = []
  pairs: list[tuple[str, list[tuple[str, Callable]]]] = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    r = dsp.export_packed(model, masked_v, tmp / "ours56", program=False)
    most = max(max(a, b) for a, b in r.branches.values())
    print(f"packed export: max |logits diff| {max(r.max_abs_diff.values()):.2g}"
          f", up to {most} branches per layer")
    pairs.append(("JAX jit", [
        ("ResNet-56 dense", jax_forward(model, dense_v)),
        (f"ResNet-56 g={args.groups} masked (dense-shaped)",
         jax_forward(model, masked_v))]))
    pairs.append(("TorchScript", [
        ("ResNet-56 dense", torch_forward(dense_torchscript(dense_v))),
        (f"ResNet-56 g={args.groups} packed (ours)",
         torch_forward(torch.jit.load(str(r.files[dsp.PACKED]))))]))
    if args.released.is_file():
      imp = dsp.import_packed(args.released)
      ours = dsp.export_packed(imp.model(), imp.variables, tmp / "g3",
                               num_batches_tracked=imp.num_batches_tracked,
                               program=False)
      print(f"{args.released.name}: imported (max |logits diff| "
            f"{imp.max_abs_diff:.2g}), re-exported (max |logits diff| "
            f"{max(ours.max_abs_diff.values()):.2g})")
      pairs.append(("TorchScript", [
          (f"{args.released.stem} released",
           torch_forward(dsp.load_torchscript(args.released))),
          (f"{args.released.stem} our export",
           torch_forward(torch.jit.load(str(ours.files[dsp.PACKED]))))]))
    else:
      print(f"no released file at {args.released}: its rows are left out")
    for runtime, entries in pairs:
      for name, bind in entries:
        times = {}
        for b in args.batches:
          x = dsp.random_images(b, 32, seed=b)
          times[b] = median_seconds(bind(x), args.warmup, args.repeats)
        rows.append((runtime, name, times))
  head = " | ".join(f"batch {b} ms" for b in args.batches)
  print(f"\n| runtime | model | {head} |")
  print("|" + "---|" * (2 + len(args.batches)))
  for runtime, name, times in rows:
    cells = " | ".join(f"{times[b] * 1e3:.1f}" for b in args.batches)
    print(f"| {runtime} | {name} | {cells} |")


if __name__ == "__main__":
  main()
