"""DSP fine-tuning pieces: mask application, best-so-far, re-prune, schedule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dsp_jax import finetune
import dsp_jax
from dsp_jax import kernels
from dsp_jax import pruning as pr


def test_apply_masks_by_hand():
  params = {
      "conv": {"kernel": jnp.arange(2 * 2 * 3 * 2, dtype=jnp.float32).reshape(
          2, 2, 3, 2) + 1},
      "bn": {"scale": jnp.array([1.0, 0.0, 2.0]), "bias": jnp.array([5.0, 6.0, 7.0])},
      "bn2": {"scale": jnp.array([1.0, 2.0]), "bias": jnp.array([3.0, 4.0])},
      "fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
  }
  masks = {"conv": {"kernel": jnp.array([[1.0, 0], [0, 0], [1, 1]])},
           "bn2": {"scale": jnp.array([0.0, 1.0])},
           "fc": {"kernel": jnp.array([[1.0, 0], [1, 0], [0, 0]])}}
  out = jax.jit(dsp_jax.apply_masks)(params, masks)
  k = np.asarray(params["conv"]["kernel"])
  want = k * np.array([[1, 0], [0, 0], [1, 1]])[None, None]
  np.testing.assert_array_equal(out["conv"]["kernel"], want)
  # bn has no mask: unchanged.
  np.testing.assert_array_equal(out["bn"]["bias"], [5.0, 6.0, 7.0])
  np.testing.assert_array_equal(out["bn"]["scale"], [1.0, 0.0, 2.0])
  # bn2's mask zeroes gamma and beta of channel 0.
  np.testing.assert_array_equal(out["bn2"]["scale"], [0.0, 2.0])
  np.testing.assert_array_equal(out["bn2"]["bias"], [0.0, 4.0])
  # fc's unit 1 keeps no input: its bias goes with it.
  np.testing.assert_array_equal(out["fc"]["kernel"], [[1, 0], [1, 0], [0, 0]])
  np.testing.assert_array_equal(out["fc"]["bias"], [1.0, 0.0])


def test_update_best_keeps_the_maximum():
  p = {"w": jnp.ones(2)}
  b = finetune.update_best(None, 0.5, 1, p, {}, 40.0)
  b2 = finetune.update_best(b, 0.4, 2, {"w": jnp.zeros(2)}, {}, 41.0)
  assert b2 is b
  b3 = finetune.update_best(b, 0.6, 3, {"w": jnp.zeros(2)}, {}, 42.0)
  assert (b3.metric, b3.epoch, b3.p_flops) == (0.6, 3, 42.0)
  np.testing.assert_array_equal(b3.params["w"], 0)


class _Chain(nn.Module):
  """A stem and four taking-part 3x3 convs on a 4x4 map (no norms)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
    for j in range(4):
      x = nn.relu(nn.Conv(8, (3, 3), use_bias=False, name=f"l{j}")(x))
    return nn.Dense(2, name="fc")(jnp.mean(x, axis=(1, 2)))


# Four 8-filter layers prune in coarse steps; the search may miss by > 1 pt.
@pytest.mark.filterwarnings("ignore:DSP rate search ended")
def test_reprune_targets_best_plus_a_tenth_of_a_point():
  rs = np.random.RandomState(0)
  info = kernels.analyze(_Chain(), (4, 4, 8))
  params = {f"l{j}": {"kernel": rs.normal(size=(3, 3, 8, 8))} for j in range(4)}
  gates = {f"l{j}": {"logits": rs.normal(size=(2, 8))} for j in range(4)}
  first = pr.prune(params, gates, info, groups=2, rate=0.4)
  best = finetune.update_best(None, 0.9, 0, first.params, {}, first.p_flops)
  again = finetune.reprune(best, gates, info, groups=2)
  direct = pr.prune(first.params, gates, info, groups=2,
                    rate=first.p_flops / 100 + 0.001)
  assert again.beta == direct.beta and again.p_flops == direct.p_flops
  # Pruning never revives what the previous cycle removed.
  alive = lambda r, j: np.abs(np.asarray(r.params[f"l{j}"]["kernel"])).sum(
      (0, 1)) > 0
  for j in range(4):
    assert not np.any(alive(again, j) & ~alive(first, j))
  assert again.p_flops >= first.p_flops - 1e-9


def test_cycle_schedule_and_fresh_optimizer():
  s = finetune.cycle_schedule(0.015, epochs=4, steps_per_epoch=10)
  assert float(s(0)) == pytest.approx(0.015)
  assert float(s(9)) == pytest.approx(0.015)
  assert float(s(10)) == pytest.approx(0.015 * 0.5 * (1 + math.cos(math.pi / 4)))
  tx = finetune.cycle_optimizer(0.015, 4, 10)
  params = {"w": jnp.ones(3)}
  upd, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  # SGD with coupled decay: -(g + wd * w) * lr.
  np.testing.assert_allclose(upd["w"], -(1 + 1e-3) * 0.015, rtol=1e-6)
