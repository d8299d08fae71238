"""DDROP pruning, the DDROP train step and masked fine-tuning on a tiny ResNet."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ddrop_jax as dd
import models


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
    names = [str(getattr(k, "key", "")) for k in path]
    key = jax.random.key(zlib.crc32("/".join(names).encode()))
    if names[0] == "masks":
      return jnp.ones(leaf.shape, leaf.dtype)
    if names[-1] == "kernel":
      return 0.3 * jax.random.normal(key, leaf.shape, leaf.dtype)
    r = jax.random.uniform(key, leaf.shape, leaf.dtype, 0.5, 1.5)
    if names[-1] == "scale":  # signed, to test |gamma| ranking
      return r * jnp.sign(jax.random.normal(jax.random.fold_in(key, 1),
                                            leaf.shape))
    return r

  variables = jax.jit(lambda: jax.tree_util.tree_map_with_path(fill, shapes))()
  batch = {"image": jax.random.normal(jax.random.key(2), (8, 8, 8, 3)),
           "label": jnp.arange(8) % 10}
  return model, variables, dd.ddrop_layers(variables), batch


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


def test_prune_scope_all_also_prunes_convs_feeding_residual_sums():
  _, variables, layers, _ = setup()
  cfg = dd.DdropConfig(amount=0.5, prune_scope="all")
  pruned = dd.prune(variables, layers, cfg)
  scope = dd.prune_layers(variables["params"], layers, "all")
  assert {l.name for l in scope} - {l.name for l in layers} == {
      "bn_1", "stage_1.0.bn_b", "stage_2.0.bn_b", "stage_2.0.downsample.1",
      "stage_3.0.bn_b", "stage_3.0.downsample.1"}
  for layer in scope:
    check_pruned(variables, pruned, layer, 0.5)


def test_ddrop_step_drops_units_and_tracks_statistics():
  model, variables, layers, batch = setup()
  # keep = 0 on every bn_a: the block's first half is cut off, so conv_a and
  # bn_a get no gradient while bn_b (its bias) still trains
  cfg = dd.DdropConfig(prob=(0.0, 0.0), criterion="activation", l1=0.0,
                       total_steps=1)
  tx = optax.sgd(0.1)
  state = dd.DdropState.create(variables, tx, layers, cfg)
  step = jax.jit(dd.make_ddrop_train_step(model, tx, layers, cfg))
  new, metrics = step(state, batch, jax.random.key(0))
  assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
  p0, p1 = state.params["stage_2"]["0"], new.params["stage_2"]["0"]
  np.testing.assert_array_equal(p1["conv_a"]["kernel"], p0["conv_a"]["kernel"])
  np.testing.assert_array_equal(p1["bn_a"]["scale"], p0["bn_a"]["scale"])
  assert not np.array_equal(p1["bn_b"]["bias"], p0["bn_b"]["bias"])
  for layer in layers:  # abs_mean moved off zero (pre-drop |activation|)
    assert np.all(np.asarray(get(new.ddrop_stats, layer.name)["abs_mean"]) > 0)


def test_pruned_units_stay_zero_through_masked_fine_tuning():
  model, variables, layers, batch = setup()
  cfg = dd.DdropConfig(amount=0.5)
  pruned = dd.prune(variables, layers, cfg)
  assert "ddrop" not in pruned
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, 0.9))
  state = dd.DdropState.create(pruned, tx)
  step = jax.jit(dd.make_ddrop_train_step(model, tx, None, None))
  for i in range(3):
    state, _ = step(state, batch, jax.random.key(i))
  tuned = {"params": state.params, "batch_stats": state.batch_stats,
           "masks": state.masks}
  for layer in layers:
    dead = check_pruned(variables, pruned, layer, 0.5)
    norm, conv = ".".join(layer.norm), ".".join(layer.producer)
    assert np.all(np.asarray(get(tuned["params"], conv)["kernel"])[..., dead]
                  == 0)
    for leaf in ("scale", "bias"):
      got = np.asarray(get(tuned["params"], norm)[leaf])
      assert np.all(got[dead] == 0)
      assert not np.array_equal(  # the kept units do train
          got[~dead], np.asarray(get(pruned["params"], norm)[leaf])[~dead])
  for a, b in zip(jax.tree.leaves(dd.apply_masks(state.params, state.masks)),
                  jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)


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
