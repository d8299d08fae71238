"""Models written in plain Flax (tests/plain_models.py), pruned unchanged.

The traced graph finds their roles and couplings (depthwise convs, layer
scales, LayerNorms, concatenations), FLOPs count by hand, DSP learns groups,
prunes to a rate and removes exactly the structure that gets no gradient,
DDROP finds its units, drops them and prunes them; the wrapper adds nothing
to a jitted step.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import ddrop_jax as dd
import dsp_jax
import models
from dsp_jax import kernels
from dsp_jax import pruning as pr
from dsp_jax import regularizer as reg
from models import flops, paths
from tests import plain_models as pm

SHAPE = (16, 16, 3)
MODELS = {
    "resnet": pm.ResNetTiny,
    "bottleneck": pm.BottleneckTiny,
    "mobilenet": pm.MobileNetV2,
    "convnext": pm.ConvNeXt,
    "densenet": pm.DenseNet,
}


def _names(layers):
  return [l.name for l in layers]


@functools.lru_cache(maxsize=None)
def _variables(name: str, seed: int = 0):
  """Random numpy variables (no init compile): He kernels, random norms."""
  model = models.prunable(MODELS[name]())
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1,) + SHAPE), train=False))

  def fill(kp, s):
    col, leaf = kp[0].key, kp[-1].key
    if col == "masks":
      return np.ones(s.shape, s.dtype)
    if leaf == "kernel":
      v = rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))
    elif leaf in ("scale", "gamma"):
      v = rng.uniform(0.5, 1.5, s.shape)
    elif leaf == "var":
      v = rng.uniform(0.5, 1.5, s.shape)
    else:
      v = 0.2 * rng.normal(size=s.shape)
    return v.astype(s.dtype)

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


# ------------------------------------------------------------ the graph
def test_flax_examples_resnet_roles_with_list_attributes_and_train_default():
  model = pm.ResNetTiny()           # stage_sizes=[1, 1]: a list
  assert isinstance(model.stage_sizes, list)
  g = models.analyze(model, SHAPE[:2])
  assert [l.name for l in g.convs if l.stem] == ["conv_init"]
  assert [l.name for l in g.convs if l.shortcut] == [
      "ResNetBlock_1.conv_proj"]
  assert _names(g.taking_part) == [
      "ResNetBlock_0.Conv_0", "ResNetBlock_0.Conv_1", "ResNetBlock_1.Conv_0",
      "ResNetBlock_1.Conv_1"]
  assert _names(g.block_last) == ["ResNetBlock_0.Conv_1",
                                  "ResNetBlock_1.Conv_1"]
  assert g.space_of(("conv_init",)) == frozenset(
      {("conv_init",), ("ResNetBlock_0", "Conv_1")})
  assert kernels.derived_fp(g) == (1, 3)
  b = pm.BottleneckTiny()
  gb = models.analyze(b, SHAPE[:2])
  assert len(gb.blocks) == 2 and all(len(x.main) == 3 for x in gb.blocks)


def test_mobilenet_depthwise_convs_follow_their_producer():
  g = models.analyze(pm.MobileNetV2(), SHAPE[:2])
  dw = [l for l in g.convs if l.depthwise]
  assert _names(dw) == ["block1.depthwise", "block2.depthwise",
                        "block3.depthwise"]
  for l in dw:
    expand = l.path[:-1] + ("expand",)
    # Its channels are the expand conv's: no space, no DSP role of its own.
    assert l.inputs == (expand,) and not l.takes_part and not l.producer
    assert l.feature_groups == l.in_features == l.out_features
    assert l.path not in {p for s in g.spaces for p in s}
    # MACs = k * k * C * H * W.
    assert l.macs == 9 * l.out_features * math.prod(l.out_hw)
    bn = g[l.path[:-1] + ("depthwise_bn",)]
    assert bn.inputs == (expand,) and bn.follows == l.path
  assert _names(g.taking_part) == [
      f"block{i}.{c}" for i in (1, 2, 3) for c in ("expand", "project")]
  # block1 and block3 are residual; block2 (stride 2) is not.
  assert g.space_of(("block1", "project")) == frozenset(
      {("stem",), ("block1", "project")})
  assert g.space_of(("block3", "project")) == frozenset(
      {("block2", "project"), ("block3", "project")})
  assert len(g.space_of(("block2", "expand"))) == 1


def test_convnext_layer_scale_layernorm_and_dense_mlp():
  model = pm.ConvNeXt()             # __call__ without a train argument
  assert not models.graph.accepts_train(model)
  g = models.analyze(model, SHAPE[:2])
  for i in (0, 1):
    blk = (f"stage{i}",)
    assert g[blk + ("dwconv",)].depthwise
    assert g[blk + ("norm",)].stats == models.graph.CHANNELS
    # The MLP's Dense layers are 1x1 convs over the positions: they take part.
    fc1, fc2 = g[blk + ("pwconv1",)], g[blk + ("pwconv2",)]
    assert fc1.takes_part and fc2.takes_part and fc2.block_last
    assert fc1.positions == (8 // 2**i) ** 2 and fc1.in_rank == 4
    assert ("params",) + blk + ("gamma",) in g.affine
  # The layer scale follows the residual channels: fc2 is coupled to them.
  assert g.space_of(("stage0", "pwconv2")) == frozenset(
      {("stem",), ("stage0", "pwconv2")})
  assert g[("down1",)].takes_part and not g[("head",)].takes_part
  # LayerNorm reads every residual channel: they are read in full.
  assert g.category(("stem",)) == models.graph.READS_ALL


def test_densenet_concat_maps_channels_to_their_producers():
  g = models.analyze(pm.DenseNet(), (8, 8))
  d1 = g[("dense1",)]
  assert d1.inputs == (("dense0",), ("stem",)) and d1.takes_part
  spaces = [g.spaces[i] for i in d1.in_spaces]
  assert spaces == [frozenset({("stem",)})] * 8 + [
      frozenset({("dense0",)})] * 4
  np.testing.assert_array_equal(d1.channel_map(), list(range(8)) + [0, 1, 2,
                                                                     3])
  assert not g.mixed and not g.blocks
  assert g[("transition",)].in_features == 16


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flops_report_equals_a_hand_count(name):
  model, v = _variables(name)
  g = models.analyze(model, SHAPE[:2])
  rep = flops.report(model, v, SHAPE[:2])
  want = 0
  for l in g.weighted:
    k = l.kernel_size[0] * l.kernel_size[1]
    if l.kind == "conv":
      # Every output element: one MAC per kernel entry of its filter.
      per = k * l.in_features // l.feature_groups
      want += per * l.out_features * math.prod(l.out_hw)
    else:
      want += l.in_features * l.out_features * l.positions
  assert rep.macs_dense == want == rep.macs
  assert rep.params_dense == sum(
      int(np.prod(np.shape(x))) for x in jax.tree.leaves(v["params"]))


# ------------------------------------------------------------------ DSP
def _regulariser(params, gates, info):
  return sum(float(reg.regulariser_value(
      kernels.kernel(params, c),
      dsp_jax.hard_assignment(kernels.logits(gates, c))))
             for c in info.taking_part)


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "convnext"])
def test_dsp_group_step_reduces_the_regulariser(name):
  model, v = _variables(name)
  info = dsp_jax.analyze(model, SHAPE)
  gates = dsp_jax.init_gates(info, 2, key=jax.random.key(1))
  state = dsp_jax.init_group_state(
      {"params": jax.tree.map(jnp.asarray, v["params"]),
       "batch_stats": jax.tree.map(jnp.asarray, v.get("batch_stats", {}))},
      gates, rng=jax.random.key(0))
  rs = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rs.normal(size=(8,) + SHAPE), jnp.float32),
           "label": jnp.asarray(rs.randint(0, 10, size=8))}
  step = dsp_jax.make_group_step(model.model, groups=2, lam=5.0,
                                 lr_schedule=lambda t: 0.05, total_steps=3,
                                 layer_info=info)
  before = _regulariser(state.params, state.gates, info)
  for _ in range(3):
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert _regulariser(state.params, state.gates, info) < 0.9 * before


# Wider variants: with 4-8 filters per layer P.FLOPS moves in steps of
# several points, and the reference's bisection cannot resolve 1 pt.
WIDE = {
    "resnet": functools.partial(pm.ResNetTiny, num_filters=16),
    "bottleneck": pm.BottleneckTiny,
    "mobilenet": pm.MobileNetV2,
    "convnext": pm.ConvNeXt,
    "densenet": functools.partial(pm.DenseNet, growth=8, layers=3),
}


@pytest.mark.parametrize("name", sorted(WIDE))
def test_dsp_prune_reaches_the_rate(name, monkeypatch):
  monkeypatch.setitem(MODELS, name, WIDE[name])
  _variables.cache_clear()
  model, v = _variables(name, seed=1)
  _variables.cache_clear()
  info = dsp_jax.analyze(model, SHAPE)
  gates = dsp_jax.init_gates(info, 2, key=jax.random.key(2))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # cnt_g = 0 warnings of tiny layers
    res = pr.prune(v["params"], gates, info, groups=2, rate=0.5)
  assert len(res.trajectory) == 11
  # The search brackets the target: it lands between the closest trials on
  # either side, a few points apart at most.
  trials = [p for _, p in res.trajectory[:10]]
  below = max(p for p in trials if p <= 50.0)
  above = min(p for p in trials if p > 50.0)
  assert below <= res.p_flops <= above and above - below < 5.0
  assert abs(res.p_flops - 50.0) < 3.0
  assert 0 < res.whole_model["pflops_whole_model"] < 100
  # The masks reproduce the pruned params' forward pass.
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2,) + SHAPE),
                  jnp.float32)
  base = {k: x_ for k, x_ in v.items() if k != "masks"}
  masked = model.apply({**base, "masks": res.masks}, x, train=False)
  direct = model.apply({**base, "params": res.params}, x, train=False)
  np.testing.assert_allclose(masked, direct, rtol=1e-5, atol=1e-5)


def _grad_pattern(model, params, rest, seed):
  """Summed |d loss / d params| over random train-mode batches."""

  @jax.jit
  def grad(params, x, r):
    def loss(p):
      out = model.apply({**rest, "params": p}, x, train=True,
                        mutable=["batch_stats"])[0]
      return jnp.sum(out * r)
    return jax.grad(loss)(params)

  rs = np.random.RandomState(seed)
  total = None
  for _ in range(2):
    x = jnp.asarray(rs.normal(size=(4,) + SHAPE), jnp.float32)
    r = jnp.asarray(rs.normal(size=(4, 10)), jnp.float32)
    g = jax.tree.map(np.abs, grad(params, x, r))
    total = g if total is None else jax.tree.map(np.add, total, g)
  return total


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "densenet",
                                  "convnext"])
def test_dsp_dead_structure_equals_the_zero_gradient_pattern(name):
  model, v = _variables(name, seed=2)
  info = dsp_jax.analyze(model, SHAPE)
  gates = dsp_jax.init_gates(info, 2, key=jax.random.key(3))
  params = jax.tree.map(np.asarray, v["params"])
  rest = {k: x for k, x in v.items() if k not in ("params", "masks")}
  pruner = pr.Pruner(params, gates, info, 2)
  checked = 0
  for beta in (0.1, 0.4):
    masks0, _ = pruner.channel_masks(beta)
    masked = params
    for c, m in zip(info.taking_part, masks0):
      masked = kernels.with_kernel(masked, c,
                                   kernels.kernel(masked, c) * m[None, None])
      # The masks collection masks a unit's bias with its kernel.
      bias = paths.get(masked, c.path + ("bias",))
      if bias is not None:
        masked = paths.replace(masked, c.path + ("bias",), bias * m.max(0))
    grads = _grad_pattern(model, jax.tree.map(jnp.asarray, masked),
                          rest, int(beta * 10))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      res = pruner.result(beta)
    for c, m0 in zip(info.taking_part, masks0):
      g = np.sum(np.abs(kernels.kernel(grads, c)), axis=(0, 1))   # (I, O)
      got = np.asarray(paths.get(res.masks, c.kernel_path[1:])) != 0
      np.testing.assert_array_equal(got, (m0 != 0) & (g != 0),
                                    err_msg=f"{c.name} at beta={beta}")
      checked += int(np.sum((m0 != 0) & (g == 0)))
    for l in info.norms:
      if l.follows is not None and not (info[l.follows].takes_part
                                        or info[l.follows].depthwise):
        continue  # stem and shortcut norms are never changed
      gs = paths.get(grads, l.path + ("scale",))
      got = paths.get(res.masks, l.path + ("scale",))
      np.testing.assert_array_equal(got == 0, gs == 0,
                                    err_msg=f"{l.name} at beta={beta}")
    for l in info.convs:
      if l.depthwise:
        gk = np.sum(np.abs(paths.get(grads, l.kernel_path[1:])), (0, 1, 2))
        got = np.asarray(paths.get(res.masks, l.kernel_path[1:]))[0]
        np.testing.assert_array_equal(got == 0, gk == 0,
                                      err_msg=f"{l.name} at beta={beta}")
  assert checked > 0  # some kept kernels really were removed as dead


# ---------------------------------------------------------------- DDROP
def test_ddrop_units_come_from_the_graph():
  names = lambda m, s=SHAPE: _names(dd.ddrop_layers(m, s))
  # The examples' ResNet: the first norm of each block; not its stem.
  assert names(pm.ResNetTiny()) == ["ResNetBlock_0.BatchNorm_0",
                                    "ResNetBlock_1.BatchNorm_0"]
  mobile = dd.ddrop_layers(pm.MobileNetV2(), SHAPE)
  assert _names(mobile) == ["block1.expand_bn", "block2.expand_bn",
                            "block3.expand_bn"]
  # The depthwise conv and its norm go with each unit.
  assert [[p for p, _ in l.chain] for l in mobile] == [
      [(b, "depthwise"), (b, "depthwise_bn")] for b in
      ("block1", "block2", "block3")]
  # ConvNeXt's MLP hidden units have no norm: DDROP adds a unit scale.
  conv = dd.ddrop_layers(pm.ConvNeXt(), SHAPE)
  assert _names(conv) == ["stage0.pwconv1", "stage1.pwconv1"]
  assert all(l.added_scale and l.scale == l.producer + ("ddrop_scale",)
             for l in conv)
  # DenseNet: a unit is zeroed in every norm that reads it.
  dense = {l.name: l for l in dd.ddrop_layers(pm.DenseNet(), (8, 8, 3))}
  stem = dense["dense0_bn"]
  assert [p for p, _ in stem.chain] == [("dense1_bn",), ("transition_bn",)]


def _ddrop_setup(name):
  model, v = _variables(name)
  layers = dd.ddrop_layers(model, SHAPE)
  params = dd.init_scales(layers, v["params"])
  v = {**{k: x for k, x in v.items() if k != "masks"}, "params": params}
  return model, v, layers


@pytest.mark.parametrize("name", ["mobilenet", "convnext"])
def test_ddrop_keep_zero_drops_the_units_as_pruning_removes_them(name):
  model, v, layers = _ddrop_setup(name)
  x = jnp.asarray(np.random.RandomState(0).normal(size=(4,) + SHAPE),
                  jnp.float32)
  layer = layers[0]
  cfg = dd.DdropConfig(prob=(1.0, 1.0), total_steps=1)
  keep = dd.keep_probabilities(v["params"], None, 0, cfg, layers)
  keep = paths.replace(keep, layer.path + ("keep",),
                       jnp.zeros((layer.units,)))

  def run(v, **kw):
    return model.apply(v, x, train=True, mutable=["batch_stats"],
                       rngs={"ddrop": jax.random.key(1)}, **kw)[0]

  dropped = run({**v, "ddrop": keep})
  assert not np.allclose(dropped, run(v))
  # keep 0 on a layer's units = the layer's units all pruned.
  pruned = dd.prune(v, (layer,), dd.DdropConfig(amount=1.0))
  np.testing.assert_allclose(dropped, run(pruned), rtol=1e-4, atol=1e-5)


def test_ddrop_l1_acts_on_the_scales_and_prune_removes_floor_amount():
  model, v, layers = _ddrop_setup("convnext")
  cfg = dd.DdropConfig(l1=0.5)
  tx = dd.ddrop_l1(layers, cfg)
  zeros = jax.tree.map(jnp.zeros_like, v["params"])
  upd, _ = tx.update(zeros, tx.init(v["params"]), v["params"])
  for p, u in paths.flatten(upd).items():
    on = p in {l.scale for l in layers}
    assert np.any(np.asarray(u) != 0) == on, p
  for name in ("convnext", "mobilenet", "resnet"):
    model, v, layers = _ddrop_setup(name)
    pruned = dd.prune(v, layers, dd.DdropConfig(amount=0.3))
    for l in layers:
      m = np.asarray(paths.get(pruned["masks"], l.producer + ("kernel",)))
      assert int((m.max(axis=0) == 0).sum()) == math.floor(0.3 * l.units)


def test_a_ddrop_unit_behind_an_unknown_operation_is_a_clear_error():

  class Sorted(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
      x = nn.Conv(4, (3, 3), name="conv")(x)
      x = jnp.sort(x, axis=-1)
      return nn.Dense(10, name="head")(jnp.mean(x, (1, 2)))

  with pytest.raises(ValueError, match=r"conv reach the JAX primitive "
                                       r"'sort'"):
    dd.ddrop_layers(Sorted(), SHAPE)


# ---------------------------------------------------------- the wrapper
def test_prunable_adds_nothing_to_a_jitted_step_without_pruning_state():
  model = pm.ResNetTiny()
  x = jnp.zeros((2,) + SHAPE)
  v = model.init(jax.random.key(0), x, train=False)

  def jaxpr(m):
    def loss(p):
      y, _ = m.apply({**v, "params": p}, x, train=True,
                     mutable=["batch_stats"])
      return y.sum()
    return str(jax.make_jaxpr(jax.grad(loss))(v["params"]))

  assert jaxpr(models.prunable(model)) == jaxpr(model)


def test_no_prunable_layer_and_too_many_groups_are_clear_errors():

  class Depthwise(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), name="stem")(x)
      x = nn.Conv(8, (3, 3), feature_group_count=8, name="dw")(x)
      return nn.Dense(10, name="head")(jnp.mean(x, (1, 2)))

  with pytest.raises(ValueError, match="every conv is depthwise"):
    dsp_jax.analyze(Depthwise(), SHAPE)
  with pytest.raises(ValueError, match=r"block1.expand: groups must be in "
                                       r"\[1, 16\]"):
    models.prunable(pm.MobileNetV2(), groups=17).init(
        jax.random.key(0), jnp.zeros((1,) + SHAPE))


def test_plain_models_train_with_the_engine_step():
  from training import mesh as mesh_lib
  from training import state as state_lib
  from training import steps
  info = type("Info", (), dict(mean=(0.5,) * 3, std=(0.25,) * 3,
                               hflip=True, num_classes=10))()
  mesh = mesh_lib.make_mesh(1)
  for name in ("convnext", "resnet"):
    model = MODELS[name]()
    tx = optax.sgd(0.05)
    state = state_lib.create_train_state(model, tx, jax.random.key(0), SHAPE)
    step = steps.make_train_step(model, tx, info, mesh, augment=False)
    batch = {"image": jnp.zeros((4,) + SHAPE, jnp.uint8) + 100,
             "label": jnp.arange(4) % 10}
    state, m = step(state, batch)
    assert np.isfinite(float(m["loss"])) and int(state.step) == 1
