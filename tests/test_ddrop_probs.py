"""DDROP keep probabilities, ranks and schedules against the spec formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddrop_jax as dd
from ddrop_jax.selection import NORM, DdropLayer


def spec_keep(v, step, p_min, p_max, schedule, total):
  """Spec section 3, written out independently in float64 numpy."""
  v = np.asarray(v, np.float64)
  c = len(v)
  order = sorted(range(c), key=lambda i: (v[i], i))  # ties: lower index first
  r = np.empty(c)
  r[order] = np.arange(c)
  a = r / (c - 1) if c > 1 else np.zeros(c)
  u = min(step, total) / total
  scale = {"cosine": math.cos(math.pi * u / 2), "linear": 1 - u,
           "constant": 0.0}[schedule]
  lo = p_min + (1 - p_min) * scale
  hi = p_max + (1 - p_max) * scale
  return lo + a * (hi - lo)


def norm_layer(name, c):
  return DdropLayer((name,), NORM, c, None, (name,))


@pytest.mark.parametrize("schedule", dd.SCHEDULES)
@pytest.mark.parametrize("step", [0, 3, 7, 10, 25])
def test_keep_probabilities_match_spec_formula(schedule, step):
  gammas = {
      "ties": np.array([0.5, -0.5, 0.2, 0.5, 0.0, -0.2]),  # |.| ties
      "one": np.array([-3.0]),
      "two": np.array([0.7, -0.1]),
      "two_tied": np.array([0.3, -0.3]),
  }
  params = {k: {"scale": jnp.asarray(v, jnp.float32), "bias": jnp.zeros(len(v))}
            for k, v in gammas.items()}
  layers = [norm_layer(k, len(v)) for k, v in gammas.items()]
  cfg = dd.DdropConfig(prob=(0.1, 0.8), schedule=schedule, total_steps=10)
  keep = jax.jit(lambda p, s: dd.keep_probabilities(p, None, s, cfg, layers))(
      params, step)
  for k, v in gammas.items():
    want = spec_keep(np.abs(v), step, 0.1, 0.8, schedule, 10)
    np.testing.assert_allclose(keep[k]["keep"], want, rtol=0, atol=1e-6,
                               err_msg=f"{k} {schedule} step {step}")


def test_ranks_break_ties_by_index_and_single_unit_is_zero():
  np.testing.assert_array_equal(dd.ranks(jnp.array([2.0, 1.0, 2.0, 1.0])),
                                [2, 0, 3, 1])
  np.testing.assert_array_equal(dd.relative_ranks(jnp.array([5.0])), [0.0])
  np.testing.assert_allclose(dd.relative_ranks(jnp.array([3.0, 1.0, 2.0])),
                             [1.0, 0.0, 0.5])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ramped_schedules_start_at_keep_one_and_reach_target(schedule):
  cfg = dd.DdropConfig(prob=(0.2, 0.9), schedule=schedule, total_steps=100)
  v = jnp.array([0.3, 0.1, 0.2])
  np.testing.assert_allclose(dd.layer_keep(v, 0, cfg), [1.0, 1.0, 1.0])
  target = [0.9, 0.2, 0.55]
  for step in (100, 101, 5000):
    np.testing.assert_allclose(dd.layer_keep(v, step, cfg), target, atol=1e-6)
  mid = dd.layer_keep(v, 50, cfg)
  assert np.all(mid < 1.0) and np.all(mid > np.array(target))
  # monotone: never drops less later in the schedule
  ks = [float(dd.layer_keep(v, s, cfg)[1]) for s in range(0, 120, 10)]
  assert all(a >= b for a, b in zip(ks, ks[1:]))


def test_constant_schedule_is_target_range_from_step_zero():
  cfg = dd.DdropConfig(prob=(0.2, 0.9), schedule="constant", total_steps=100)
  for step in (0, 1, 50, 1000):
    lo, hi = dd.keep_range(step, cfg)
    assert float(lo) == pytest.approx(0.2) and float(hi) == pytest.approx(0.9)


def test_default_total_steps_is_a_third_of_the_phase():
  cfg = dd.DdropConfig()
  assert cfg.total_steps is None
  assert cfg.with_phase_steps(3000).total_steps == 1000
  assert cfg.with_phase_steps(2).total_steps == 1
  assert dd.DdropConfig(total_steps=7).with_phase_steps(3000).total_steps == 7
  with pytest.raises(ValueError, match="total_steps"):
    dd.schedule_scale(0, cfg.total_steps, "cosine")


@pytest.mark.parametrize("bad, match", [
    (dict(prob=(0.9, 0.1)), "p_min <= p_max"),
    (dict(prob=(0.1, 1.5)), "prob"),
    (dict(schedule="step"), "constant, cosine, linear"),
    (dict(importance="l2"), "norm, weight_norm, activation"),
    (dict(amount=1.2), "amount"),
    (dict(total_steps=0), "total_steps"),
])
def test_config_rejects_bad_values(bad, match):
  with pytest.raises(ValueError, match=match):
    dd.DdropConfig(**bad)


def test_config_from_mapping_rejects_unknown_fields():
  cfg = dd.DdropConfig.from_mapping({"prob": [0.1, 0.9], "schedule": "linear"})
  assert cfg.prob == (0.1, 0.9) and cfg.schedule == "linear"
  with pytest.raises(ValueError, match="probs"):
    dd.DdropConfig.from_mapping({"probs": (0.1, 0.9)})


def test_prune_count_is_floor():
  assert [dd.prune_count(c, 0.5) for c in (1, 2, 3, 7)] == [0, 1, 1, 3]
  assert dd.prune_count(10, 0.3) == 3
  assert dd.prune_count(16, 1.0) == 16


def test_criteria_read_the_right_quantities():
  kernel = jnp.arange(2 * 2 * 3 * 4, dtype=jnp.float32).reshape(2, 2, 3, 4)
  params = {"conv": {"kernel": kernel},
            "bn": {"scale": jnp.array([1.0, -4.0, 2.0, 0.5]),
                   "bias": jnp.zeros(4)},
            "fc": {"kernel": jnp.array([[1.0, 2.0], [3.0, 0.0]]),
                   "bias": jnp.zeros(2)}}
  bn = DdropLayer(("bn",), NORM, 4, ("conv",), ("bn",))
  fc = DdropLayer(("fc",), "dense", 2, ("fc",), None)
  np.testing.assert_allclose(dd.importance(bn, params), [1.0, 4.0, 2.0, 0.5])
  np.testing.assert_allclose(dd.importance(bn, params, criterion="weight_norm"),
                             np.sum(np.square(kernel), axis=(0, 1, 2)))
  np.testing.assert_allclose(dd.importance(fc, params), [10.0, 4.0])
  stats = {"bn": {"abs_mean": jnp.array([0.1, 0.3, 0.2, 0.0])}}
  np.testing.assert_allclose(
      dd.importance(bn, params, stats, criterion="activation"),
      [0.1, 0.3, 0.2, 0.0])
  with pytest.raises(ValueError, match="ddrop_stats"):
    dd.importance(bn, params, None, criterion="activation")


def test_config_from_the_engine_section():
  from training import config as config_lib
  section = config_lib.default_config().ddrop
  cfg = dd.DdropConfig.from_engine(section)
  # One name per setting: the schema's fields are the algorithm's.
  assert (cfg.prob, cfg.schedule, cfg.total_steps, cfg.importance, cfg.l1,
          cfg.l1_rank_weighted, cfg.amount, cfg.prune_residual) == (
              tuple(section.prob), section.schedule, None, "norm",
              section.l1, False, section.amount, False)
  section = dict(section, importance="activation", l1_rank_weighted=True,
                 prune_residual=True, total_steps=12)
  cfg = dd.DdropConfig.from_engine(section)
  assert (cfg.importance, cfg.l1_rank_weighted, cfg.prune_residual,
          cfg.total_steps) == ("activation", True, True, 12)
