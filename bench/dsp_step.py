"""DSP benchmarks: group-learning step vs. a plain step, and the rate search.

Run from the repository root::

  python bench/dsp_step.py --model cifar_resnet20 --batch 128 --steps 20

Prints the median time of one jitted group-learning step (spec §2.3), of one
plain jitted SGD step (same loss, train-mode BN), their ratio (target
<= 2.2x: the group step needs two forward/backward passes), and the time of
the 11-prune rate search for ResNet-20 and ResNet-56 (target < 2 s).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dsp_jax  # noqa: E402
import models  # noqa: E402


def _median_time(fn, state, batch, steps: int) -> float:
  state, _ = fn(state, batch)  # compile
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, _ = fn(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_step(name: str, groups: int, batch_size: int, steps: int,
               plain: bool = True) -> dict:
  """Median seconds of the group step and (``plain``) of a plain step."""
  model = models.create_model(name, groups=groups)
  size = models.model_spec(name).image_size
  variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                         train=False)
  info = dsp_jax.analyze(model, (size, size, 3))
  gates = dsp_jax.init_gates(info, groups, key=jax.random.key(1))
  rs = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rs.normal(size=(batch_size, size, size, 3)),
                                jnp.float32),
           "label": jnp.asarray(rs.randint(0, 10, size=batch_size))}
  state = dsp_jax.init_group_state(variables, gates, rng=jax.random.key(2))
  step = dsp_jax.make_group_step(model, groups=groups, lam=2e-3,
                                 lr_schedule=lambda t: 0.05,
                                 total_steps=1000, layer_info=info)
  t_group = _median_time(step, state, batch, steps)
  if not plain:
    return {"group_s": t_group}

  tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, 0.9))

  @jax.jit
  def plain(st, batch):
    params, stats, opt = st

    def loss_fn(p):
      out, new = model.apply({"params": p, "batch_stats": stats,
                              "gates": gates}, batch["image"], train=True,
                             mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(
          out, batch["label"]).mean(), new["batch_stats"]

    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return (optax.apply_updates(params, upd), stats, opt), loss

  plain_state = (variables["params"], variables["batch_stats"],
                 tx.init(variables["params"]))
  t_plain = _median_time(plain, plain_state, batch, steps)
  return {"group_s": t_group, "plain_s": t_plain, "ratio": t_group / t_plain}


def bench_search(name: str, groups: int, rate: float) -> float:
  """Seconds of one rate search on random weights and logits."""
  model = models.create_model(name, groups=groups)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False))
  rs = np.random.RandomState(0)
  params = jax.tree.map(
      lambda s: rs.normal(size=s.shape).astype(np.float32),
      variables["params"])
  info = dsp_jax.analyze(model, (32, 32, 3))
  gates = dsp_jax.init_gates(info, groups, key=jax.random.key(1))
  t0 = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    dsp_jax.prune(params, gates, info, groups=groups, rate=rate)
  return time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="cifar_resnet20")
  ap.add_argument("--groups", type=int, default=4)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--skip-step", action="store_true")
  args = ap.parse_args()
  print(f"device: {jax.devices()[0].device_kind}")
  if not args.skip_step:
    r = bench_step(args.model, args.groups, args.batch, args.steps)
    print(f"{args.model} batch {args.batch}: group step {r['group_s']*1e3:.1f}"
          f" ms, plain step {r['plain_s']*1e3:.1f} ms, ratio {r['ratio']:.2f}x")
  for name, g in (("cifar_resnet20", 4), ("cifar_resnet56", 3)):
    for rate in (0.5, 0.7):
      print(f"rate search {name} g={g} to {rate:.0%}: "
            f"{bench_search(name, g, rate):.3f} s")


if __name__ == "__main__":
  main()
