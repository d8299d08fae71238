"""DDROP pruning, the DDROP train step and masked fine-tuning on a tiny ResNet
(through the engine's train step)."""

import functools
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ddrop_jax as dd
from ddrop_jax import probs
import models
from training.mesh import make_mesh
from training.state import TrainState
from training.steps import make_train_step


@functools.lru_cache(maxsize=None)
def setup():
  """cifar_resnet8 on 8x8 inputs with random values (distinct ranks).

  Shapes come from ``eval_shape``; the values are drawn directly, which is
  much cheaper than compiling the model's init.
  """
  model = models.create_model("cifar_resnet8", image_size=None)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))

  def fill(path, leaf):
    # numpy draws: compiling dozens of small jax.random calls costs seconds
    names = [str(getattr(k, "key", "")) for k in path]
    rng = np.random.default_rng(zlib.crc32("/".join(names).encode()))
    if names[0] == "masks":
      return jnp.ones(leaf.shape, leaf.dtype)
    if names[-1] == "kernel":
      return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)
    r = rng.uniform(0.5, 1.5, leaf.shape)
    if names[-1] == "scale":  # signed, to test |gamma| ranking
      r = r * rng.choice([-1.0, 1.0], leaf.shape)
    return jnp.asarray(r, leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  rng = np.random.default_rng(2)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 8, 8, 3)), jnp.uint8),
           "label": jnp.arange(8, dtype=jnp.int32) % 10}
  return model, variables, dd.ddrop_layers(model, (8, 8, 3)), batch


def get(tree, name):
  for k in name.split("."):
    tree = tree[k]
  return tree


def check_pruned(variables, pruned, layer, amount):
  """Exactly floor(amount*C) lowest-|gamma| units removed, the rest intact."""
  c = layer.units
  k = int(np.floor(amount * c))
  norm, conv = ".".join(layer.norm), ".".join(layer.producer)
  gamma = np.asarray(get(variables["params"], norm)["scale"])
  dead = np.zeros(c, bool)
  dead[np.argsort(np.abs(gamma), kind="stable")[:k]] = True
  p, m, b = pruned["params"], pruned["masks"], pruned["batch_stats"]
  np.testing.assert_array_equal(get(m, norm)["scale"], ~dead)
  np.testing.assert_array_equal(get(m, conv)["kernel"],
                                np.broadcast_to(~dead, get(m, conv)["kernel"].shape))
  kernel = np.asarray(get(p, conv)["kernel"])
  assert np.all(kernel[..., dead] == 0)
  np.testing.assert_array_equal(
      kernel[..., ~dead],
      np.asarray(get(variables["params"], conv)["kernel"])[..., ~dead])
  for leaf in ("scale", "bias"):
    got = np.asarray(get(p, norm)[leaf])
    assert np.all(got[dead] == 0)
    np.testing.assert_array_equal(
        got[~dead], np.asarray(get(variables["params"], norm)[leaf])[~dead])
  assert np.all(np.asarray(get(b, norm)["mean"])[dead] == 0)
  assert np.all(np.asarray(get(b, norm)["var"])[dead] == 1)
  return dead


@pytest.mark.parametrize("amount", [0.3, 0.5])
def test_prune_removes_floor_amount_units_of_each_ddrop_layer(amount):
  _, variables, layers, _ = setup()
  pruned = dd.prune(variables, layers, dd.DdropConfig(amount=amount))
  for layer in layers:
    assert check_pruned(variables, pruned, layer, amount).sum() == int(
        np.floor(amount * layer.units))
  # non-DDROP layers (stem, block-last, shortcut) are untouched by default
  for name in ("bn_1", "stage_1.0.bn_b", "stage_2.0.downsample.1"):
    assert np.all(np.asarray(get(pruned["masks"], name)["scale"]) == 1)
    np.testing.assert_array_equal(get(pruned["params"], name)["scale"],
                                  get(variables["params"], name)["scale"])


def test_prune_residual_also_prunes_convs_feeding_residual_sums():
  model, variables, layers, _ = setup()
  cfg = dd.DdropConfig(amount=0.5, prune_residual=True)
  scope = dd.prune_layers(model, layers, True, (8, 8, 3))
  pruned = dd.prune(variables, scope, cfg)
  assert {l.name for l in scope} - {l.name for l in layers} == {
      "bn_1", "stage_1.0.bn_b", "stage_2.0.bn_b", "stage_2.0.downsample.1",
      "stage_3.0.bn_b", "stage_3.0.downsample.1"}
  for layer in scope:
    check_pruned(variables, pruned, layer, 0.5)


INFO = types.SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def engine_state(variables, tx, extra=None):
  """The engine's TrainState around ``variables`` (no model init compile).

  The arrays are copied: the engine's step donates its input state, and
  ``setup()``'s variables are shared between tests.
  """
  variables = jax.tree.map(jnp.array, variables)
  return TrainState(
      step=jnp.zeros([], jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], masks=variables.get("masks", {}),
      gates={}, opt_state=tx.init(variables["params"]),
      rng=jax.random.key(0), extra=extra or {})


def host(tree):
  """Host copies: the engine's step donates its input state."""
  return jax.tree.map(np.array, tree)


def test_ddrop_step_drops_units_and_tracks_statistics():
  model, variables, layers, batch = setup()
  # keep = 0 on every bn_a: the block's first half is cut off, so conv_a and
  # bn_a get no gradient while bn_b (its bias) still trains
  cfg = dd.DdropConfig(prob=(0.0, 0.0), importance="activation", l1=0.0,
                       total_steps=1)
  variables = {k: v for k, v in variables.items() if k != "masks"}
  tx = dd.ddrop_optimizer(optax.sgd(0.1), layers, cfg)
  state = engine_state(variables, tx, dd.init_extra(layers, cfg))
  before = host(state.params)
  step = dd.make_ddrop_train_step(model, tx, INFO, make_mesh(1), layers, cfg,
                                  augment=False)
  new, metrics = step(state, batch)
  assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
  p0, p1 = before["stage_2"]["0"], new.params["stage_2"]["0"]
  np.testing.assert_array_equal(p1["conv_a"]["kernel"], p0["conv_a"]["kernel"])
  np.testing.assert_array_equal(p1["bn_a"]["scale"], p0["bn_a"]["scale"])
  assert not np.array_equal(p1["bn_b"]["bias"], p0["bn_b"]["bias"])
  for layer in layers:  # abs_mean moved off zero (pre-drop |activation|)
    got = get(new.extra["ddrop_stats"], layer.name)["abs_mean"]
    assert np.all(np.asarray(got) > 0)


def test_pruned_units_stay_zero_through_masked_fine_tuning():
  model, variables, layers, batch = setup()
  cfg = dd.DdropConfig(amount=0.5)
  pruned = dd.prune(variables, layers, cfg)
  assert "ddrop" not in pruned
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, 0.9))
  state = engine_state(pruned, tx)
  step = make_train_step(model, tx, INFO, make_mesh(1), augment=False)
  for _ in range(3):
    state, _ = step(state, batch)
  tuned = host({"params": state.params, "masks": state.masks})
  for layer in layers:
    dead = check_pruned(variables, pruned, layer, 0.5)
    norm, conv = ".".join(layer.norm), ".".join(layer.producer)
    assert np.all(get(tuned["params"], conv)["kernel"][..., dead] == 0)
    for leaf in ("scale", "bias"):
      got = get(tuned["params"], norm)[leaf]
      assert np.all(got[dead] == 0)
      assert not np.array_equal(  # the kept units do train
          got[~dead], np.asarray(get(pruned["params"], norm)[leaf])[~dead])


def test_apply_masks_convention():
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 3)), "bias": jnp.ones(3)},
            "bn": {"scale": jnp.full(3, 2.0), "bias": jnp.full(3, 3.0)}}
  masks = {"conv": {"kernel": jnp.array([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])},
           "bn": {"scale": jnp.array([1.0, 0.0, 1.0])}}
  out = jax.jit(dd.apply_masks)(params, masks)
  np.testing.assert_array_equal(out["conv"]["kernel"][1, 2],
                                [[1, 0, 0], [1, 0, 1]])
  np.testing.assert_array_equal(out["conv"]["bias"], [1, 0, 1])
  np.testing.assert_array_equal(out["bn"]["scale"], [2, 0, 2])
  np.testing.assert_array_equal(out["bn"]["bias"], [3, 0, 3])


def test_step_hooks_build_the_ddrop_collection_from_params_and_step():
  _, variables, layers, _ = setup()
  cfg = dd.DdropConfig(prob=(0.2, 0.6), schedule="linear", total_steps=4,
                       importance="activation")
  stats = dd.init_stats(layers)
  extra, rngs = dd.ddrop_collections(variables["params"], stats, 2,
                                     jax.random.key(5), layers, cfg)
  # Every activation statistic is still zero: the step's key orders the ties.
  want = dd.keep_probabilities(variables["params"], stats, 2, cfg, layers,
                               probs.tie_key(jax.random.key(5), 2))
  for a, b in zip(jax.tree.leaves(extra["ddrop"]), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert extra["ddrop_stats"] is stats
  assert np.array_equal(jax.random.key_data(rngs["ddrop"]), jax.random.key_data(
      jax.random.fold_in(jax.random.key(5), 2)))
  state = types.SimpleNamespace(step=jnp.asarray(2), rng=jax.random.key(5),
                                extra={"ddrop_stats": stats})
  hook_vars, mutable = dd.ddrop_variables_fn(layers, cfg)(
      state, variables["params"])
  assert mutable == ["ddrop_stats"] and set(hook_vars) == {"ddrop",
                                                           "ddrop_stats"}
  with pytest.raises(ValueError, match="with_phase_steps"):
    dd.ddrop_variables_fn(layers, dd.DdropConfig())
