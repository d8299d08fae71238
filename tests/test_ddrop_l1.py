"""The DDROP L1 transformations against hand-computed subgradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ddrop_jax as dd
from ddrop_jax.selection import NORM, DdropLayer

PARAMS = {
    "conv": {"kernel": jnp.array([[[[1.0, -2.0]]]])},
    "bn": {"scale": jnp.array([0.5, 0.0, -2.0, 1.5]),
           "bias": jnp.array([1.0, -1.0, 0.0, 2.0])},
    "bn_other": {"scale": jnp.array([3.0, -3.0]), "bias": jnp.zeros(2)},
}
GRADS = jax.tree.map(lambda p: 0.25 * jnp.ones_like(p), PARAMS)
LAYERS = (DdropLayer(("bn",), NORM, 4, ("conv",), ("bn",)),)


def test_add_l1_is_lambda_sign_on_ddrop_scales_only():
  tx = dd.ddrop_l1(LAYERS, dd.DdropConfig(l1=0.1))
  state = tx.init(PARAMS)
  updates, state = jax.jit(tx.update)(GRADS, state, PARAMS)
  # sign(0) = 0: a scale at exactly zero gets no push
  np.testing.assert_allclose(updates["bn"]["scale"],
                             [0.25 + 0.1, 0.25, 0.25 - 0.1, 0.25 + 0.1])
  for path in (("bn", "bias"), ("bn_other", "scale"), ("conv", "kernel")):
    np.testing.assert_array_equal(updates[path[0]][path[1]],
                                  GRADS[path[0]][path[1]])
  assert int(state.count) == 1


def test_add_l1_with_explicit_mask_and_no_mask():
  tx = dd.add_l1(0.5)
  u, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(u["conv"]["kernel"], [[[[0.75, -0.25]]]])
  np.testing.assert_allclose(u["bn"]["bias"], [0.75, -0.25, 0.25, 0.75])
  mask = jax.tree.map(lambda _: False, PARAMS)
  mask["bn_other"]["scale"] = True
  tx = dd.add_l1(0.5, mask=mask)
  u, _ = jax.jit(tx.update)(GRADS, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(u["bn_other"]["scale"], [0.75, -0.25])
  np.testing.assert_array_equal(u["bn"]["scale"], GRADS["bn"]["scale"])


def test_rank_weighted_l1_follows_drop_probability():
  cfg = dd.DdropConfig(prob=(0.2, 0.8), schedule="linear", total_steps=4,
                       l1=0.1, l1_rank_weighted=True)
  tx = dd.ddrop_l1(LAYERS, cfg)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  gamma = np.abs(np.asarray(PARAMS["bn"]["scale"]))  # [0.5, 0, 2, 1.5]
  a = np.array([1, 0, 3, 2]) / 3  # ranks of |gamma|
  sign = np.sign(np.asarray(PARAMS["bn"]["scale"]))
  for step in range(6):
    u, state = update(GRADS, state, PARAMS)
    scale = 1 - min(step, 4) / 4
    lo, hi = 0.2 + 0.8 * scale, 0.8 + 0.2 * scale
    keep = lo + a * (hi - lo)
    want = 0.25 + 0.1 * (1 - keep) / (1 - 0.2) * sign
    np.testing.assert_allclose(u["bn"]["scale"], want, atol=1e-6,
                               err_msg=f"step {step}")
  # at the end of the schedule the least important unit (|gamma| = 0)
  # gets lambda * (1 - keep) / (1 - p_min), the most important the least
  w = (1 - (0.2 + a * 0.6)) / 0.8
  assert w[2] == pytest.approx(0.25) and w[1] == pytest.approx(1.0)


def test_l1_off_is_identity_and_chains_before_the_optimizer():
  assert dd.ddrop_l1(LAYERS, dd.DdropConfig(l1=0.0)).update(
      GRADS, optax.EmptyState(), PARAMS)[0] is GRADS
  tx = optax.chain(dd.ddrop_l1(LAYERS, dd.DdropConfig(l1=0.1)),
                   optax.sgd(0.5))
  u, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(u["bn"]["scale"],
                             [-0.5 * 0.35, -0.5 * 0.25, -0.5 * 0.15,
                              -0.5 * 0.35])
  with pytest.raises(ValueError, match=">= 0"):
    dd.add_l1(-1.0)
