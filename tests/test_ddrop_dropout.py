"""The Bernoulli unit dropout DDROP drives through the ``ddrop`` collection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import ddrop_jax as dd
import models
from models import layers as L

KEEP = jnp.array([0.0, 0.1, 0.5, 0.9, 1.0])


def _check_frequencies(draws, keep):
  """Per-unit keep frequency within 3 sigma of keep (exact at 0 and 1)."""
  n = draws.shape[0]
  freq = draws.mean(axis=0)
  sigma = np.sqrt(keep * (1 - keep) / n)
  assert np.all(np.abs(freq - keep) <= 3 * sigma + 1e-12), (freq, keep)


def test_dense_unit_keep_frequencies_match_keep_probabilities():
  layer = models.prunable(L.Dense(5))
  params = {"kernel": jnp.zeros((3, 5)), "bias": jnp.ones(5)}  # output 1
  n = 4000
  apply = jax.jit(lambda v, key: layer.apply(
      v, jnp.ones((n, 3)), train=True, rngs={"ddrop": key}))
  draws = np.asarray(apply({"params": params, "ddrop": {"keep": KEEP}},
                           jax.random.key(0)))
  assert set(np.unique(draws)) <= {0.0, 1.0}  # no 1/keep rescaling
  _check_frequencies(draws, np.asarray(KEEP))
  other = np.asarray(apply({"params": params, "ddrop": {"keep": KEEP}},
                           jax.random.key(1)))
  assert not np.array_equal(draws, other)  # the rng drives the draws


def test_norm_draw_is_per_sample_and_unit_broadcast_over_space():
  layer = models.prunable(L.BatchNorm())
  params = {"scale": jnp.zeros(5), "bias": jnp.ones(5)}  # output 1
  stats = {"mean": jnp.zeros(5), "var": jnp.ones(5)}
  n = 2000
  x = jax.random.normal(jax.random.key(3), (n, 3, 2, 5))
  out, _ = jax.jit(lambda v: layer.apply(
      v, x, train=True, mutable=["batch_stats"],
      rngs={"ddrop": jax.random.key(4)}))(
          {"params": params, "batch_stats": stats, "ddrop": {"keep": KEEP}})
  out = np.asarray(out)
  # one draw per (sample, unit), the same at every spatial position
  assert np.all(out == out[:, :1, :1, :])
  _check_frequencies(out[:, 0, 0, :], np.asarray(KEEP))


def test_evaluation_is_identity_and_keep_one_changes_nothing():
  model = models.create_model("cifar_resnet8", image_size=None)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(1), x,
                                               train=False), x)
  # deterministic non-trivial values without compiling the random init
  variables = jax.tree.map(
      lambda s: jnp.asarray(0.5 + 0.4 * np.sin(np.arange(np.prod(s.shape))))
      .reshape(s.shape).astype(s.dtype),
      {k: v for k, v in shapes.items() if k != "masks"})
  layers = dd.ddrop_layers(model, (8, 8, 3))
  drop_all = dd.DdropConfig(prob=(0.0, 0.0), total_steps=1)
  keep0 = dd.keep_probabilities(variables["params"], None, 0, drop_all, layers)
  keep1 = jax.tree.map(jnp.ones_like, keep0)

  @functools.partial(jax.jit, static_argnums=1)
  def run(v, train):
    if train:
      return model.apply(v, x, train=True, mutable=["batch_stats"],
                         rngs={"ddrop": jax.random.key(2)})[0]
    return model.apply(v, x, train=False)

  base_eval = run(variables, False)
  np.testing.assert_array_equal(run({**variables, "ddrop": keep0}, False),
                                base_eval)
  base_train = model.apply(variables, x, train=True,
                           mutable=["batch_stats"])[0]
  # keep = 1: same output (up to jit-vs-eager rounding), no 1/keep rescaling
  np.testing.assert_allclose(run({**variables, "ddrop": keep1}, True),
                             base_train, rtol=1e-5, atol=1e-5)
  assert not np.allclose(run({**variables, "ddrop": keep0}, True), base_train)


def test_activation_statistics_are_tracked_when_mutable():
  layer = models.prunable(L.BatchNorm())
  params = {"scale": jnp.array([1.0, 2.0]), "bias": jnp.array([0.5, -3.0])}
  stats = {"mean": jnp.zeros(2), "var": jnp.ones(2)}
  x = jax.random.normal(jax.random.key(0), (64, 2))
  _, new = layer.apply(
      {"params": params, "batch_stats": stats, "ddrop": {"keep": jnp.ones(2)},
       "ddrop_stats": {"abs_mean": jnp.zeros(2)}},
      x, train=True, mutable=["batch_stats", "ddrop_stats"],
      rngs={"ddrop": jax.random.key(1)})
  mean = x.mean(0)
  var = ((x - mean) ** 2).mean(0)
  y = (x - mean) / jnp.sqrt(var + 1e-5) * params["scale"] + params["bias"]
  np.testing.assert_allclose(new["ddrop_stats"]["abs_mean"],
                             0.1 * jnp.abs(y).mean(0), rtol=1e-5)
