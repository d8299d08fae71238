"""DSP group channel pruning (spec §3): hand-computed masks and figures,
dead-structure removal against a gradient check, and the rate search."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import linen as nn

import models
from models import paths
from dsp_jax import gates as gates_lib
from dsp_jax import kernels
from dsp_jax import pruning as pr


# ------------------------------------------------------------ hand-made case
class _Hand(nn.Module):
  """stem -> l0 (1x1, 2x2 map) -> mean -> l1 (1x1, 1x1 map) -> fc.

  A mean over l0's channels also reaches the logits, so l0's channels are
  always read (no dead structure: the masks are those of steps 1-3).
  """

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (1, 1), use_bias=False, name="stem")(x)
    y = nn.Conv(4, (1, 1), use_bias=False, name="l0")(x)
    z = nn.Conv(4, (1, 1), use_bias=False, name="l1")(
        jnp.mean(y, axis=(1, 2), keepdims=True))
    return (nn.Dense(2, name="fc")(z.reshape(z.shape[0], -1))
            + jnp.mean(y, axis=(1, 2, 3))[:, None])


def _hand_case():
  """Two taking-part 1x1 convs, G = 2, I = O = 4; layer 1 is the fp layer.

  Layer 0: filters 0, 1 in group 0, filters 2, 3 in group 1. Group 0's
  channel importances are (1, 2, 3, 4) / 10, group 1's (4, 3, 2, 1) / 10.
  Layer 1: all filters in group 0; W1[o, i] = a_o * b_i with a² = b² =
  (1, 2, 3, 4) / 10, so channel and filter importances are (.1, .2, .3, .4).
  """
  e = np.sqrt(np.array([1.0, 2, 3, 4]) / 20)          # g0: two filters each
  w0 = np.stack([e, e, e[::-1], e[::-1]])             # (O, I) PyTorch order
  a = np.sqrt(np.array([1.0, 2, 3, 4]) / 10)
  w1 = np.outer(a, a)
  info = kernels.analyze(_Hand(), (2, 2, 4))
  assert [l.name for l in info.taking_part] == ["l0", "l1"]
  params = {"l0": {"kernel": w0.T[None, None]}, "l1": {"kernel": w1.T[None, None]}}
  gates = {"l0": {"logits": np.array([[1.0, 1, 0, 0], [0, 0, 1, 1]])},
           "l1": {"logits": np.array([[1.0, 1, 1, 1], [0, 0, 0, 0]])}}
  return params, gates, info


# Layer 1 alone is filter-pruned: the every-2nd rule (the graph would make
# every layer of a network without residual sums an fp layer).
FP = dict(fp_every=2)


def _oi(res, name):
  return np.asarray(res.masks[name]["kernel"]).T      # (O, I)


def test_hand_masks_and_reference_figures():
  params, gates, info = _hand_case()
  res = pr.prune_at(params, gates, info, groups=2, beta=0.35, **FP)
  # Layer 0: sorted cumsums .1, .3, .6, 1 -> cnt = 2, threshold .2: group 0
  # keeps channels 2, 3 and group 1 (reversed) keeps channels 0, 1.
  np.testing.assert_array_equal(_oi(res, "l0"), [[0, 0, 1, 1], [0, 0, 1, 1],
                                                 [1, 1, 0, 0], [1, 1, 0, 0]])
  # Layer 1: channels 2, 3 kept; fp rule keeps filters with f > .2: 2, 3.
  np.testing.assert_array_equal(_oi(res, "l1"), [[0, 0, 0, 0], [0, 0, 0, 0],
                                                 [0, 0, 1, 1], [0, 0, 1, 1]])
  # flops: l0 = 16 * 2 * 2 = 64 with 8/16 kernels left, l1 = 16 with 4/16.
  assert res.p_flops == pytest.approx(100 * (1 - (64 * 8 / 16 + 16 * 4 / 16) / 80))
  assert res.p_flops == pytest.approx(55.0)
  assert res.p_params == pytest.approx(100 * (1 - (8 + 4) / 32))
  assert res.empty_groups == ()
  # Weights are zeroed exactly where the mask is 0, kept elsewhere.
  w = np.asarray(res.params["l0"]["kernel"])[0, 0]
  np.testing.assert_array_equal(w, params["l0"]["kernel"][0, 0] * _oi(res, "l0").T)
  assert res.table[0] == ("l0", ((2, 2), (2, 2)))
  assert res.table[1] == ("l1", ((2, 2), (0, 0)))


def test_ties_at_the_threshold_are_pruned():
  params, gates, info = _hand_case()
  # Uniform importances .25 in layer 0's group 1: cnt = 1 at beta = .4 and
  # the threshold .25 equals every entry, so nothing is kept (imp > thr).
  params["l0"]["kernel"] = params["l0"]["kernel"].copy()
  params["l0"]["kernel"][0, 0, :, 2:] = 0.5
  res = pr.prune_at(params, gates, info, groups=2, beta=0.4, **FP)
  np.testing.assert_array_equal(_oi(res, "l0")[2:], 0)
  # Group 0 (cumsums .1, .3, .6): cnt = 2, threshold .2, channels 2, 3 kept.
  np.testing.assert_array_equal(_oi(res, "l0")[:2], [[0, 0, 1, 1]] * 2)


def test_cnt_zero_defect_in_parity_mode_and_fixed_mode():
  params, gates, info = _hand_case()
  with pytest.warns(UserWarning, match="cnt_g = 0"):
    res = pr.prune_at(params, gates, info, groups=2, beta=0.05, **FP)
  # Every group's first cumsum (.1) is >= .05: cnt = 0, threshold = largest,
  # the whole group goes; the fp layer loses every filter too.
  assert res.p_flops == pytest.approx(100.0)
  assert ("l0", 0) in res.empty_groups and ("l0", 1) in res.empty_groups
  assert ("l1", -1) in res.empty_groups
  fixed = pr.prune_at(params, gates, info, groups=2, beta=0.05, parity=False,
                      **FP)
  assert fixed.p_flops == pytest.approx(0.0)
  np.testing.assert_array_equal(_oi(fixed, "l0"), 1)


def test_fp_layer_choice():
  assert pr.fp_layer_indices(6, 2) == (1, 3, 5)
  assert pr.fp_layer_indices(6, 3) == (2, 5)
  assert pr.fp_layer_indices(6, 2, explicit=[0]) == (0,)
  params, gates, info = _hand_case()
  # No fp layer: layer 1 keeps all four filters on channels 2, 3.
  res = pr.prune_at(params, gates, info, groups=2, beta=0.35, fp_layers=[])
  np.testing.assert_array_equal(_oi(res, "l1"), [[0, 0, 1, 1]] * 4)


def test_bad_inputs_raise_clear_errors():
  params, gates, info = _hand_case()
  with pytest.raises(ValueError, match="3 groups|groups=3"):
    pr.prune(params, gates, info, groups=3, rate=0.5, **FP)
  with pytest.raises(ValueError, match=r"unreachable.*\(0\.0000, 1\)"):
    pr.prune(params, gates, info, groups=2, rate=1.0, **FP)
  with pytest.raises(ValueError, match="unreachable"):
    pr.prune(params, gates, info, groups=2, rate=0.0, **FP)
  big = {"l0": {"logits": np.zeros((5, 4))}, "l1": {"logits": np.zeros((5, 4))}}
  with pytest.raises(ValueError, match="l0: groups=5 exceeds its 4 filters"):
    pr.prune(params, big, info, groups=5, rate=0.5)


def test_taking_part_layers_come_from_the_graph():
  # A plain model (no gates, no groups) is analysed as it is.
  model = models.create_model("cifar_resnet8").model
  info = kernels.analyze(model, (32, 32, 3))
  tp = info.taking_part
  assert [c.name for c in tp[:2]] == ["stage_1.0.conv_a", "stage_1.0.conv_b"]
  c = tp[2]   # stage_2.0.conv_a: 4 -> 8 channels, stride 2
  assert (c.kernel_shape, c.in_shape, c.out_hw) == (
      (3, 3, 4, 8), (32, 32, 4), (16, 16))
  assert kernels.insize(c) == 32 * 32 * 4 / (16 * 32 * 32)
  assert c.flops == 8 * 4 * 9 * 16 * 16
  assert len(info.blocks) == 3 and info.blocks[0].main[1][1] == (
      "stage_1", "0", "bn_b")
  assert kernels.derived_fp(info) == (1, 3, 5)


# ----------------------------------------------------- ResNets, random gates
@functools.lru_cache(maxsize=None)
def _model(name, groups):
  model = models.create_model(name, groups=groups, image_size=None)
  info = kernels.analyze(model, (8, 8, 3))
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                         train=False))

  def loss(params, stats, gates, x, r):
    out, _ = model.apply({"params": params, "batch_stats": stats,
                          "gates": gates}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.sum(out * r)

  return model, info, shapes, jax.jit(jax.grad(loss))


def _resnet(name, groups, seed):
  """Random weights (numpy, no init pass), random gates, random BN shifts."""
  model, info, shapes, _ = _model(name, groups)
  rs = np.random.RandomState(seed)

  def draw(kp, s):
    key = kp[-1].key
    if key == "kernel":
      fan_out = s.shape[-1] * (s.shape[0] * s.shape[1] if len(s.shape) == 4
                               else 1)
      return (rs.normal(size=s.shape) * np.sqrt(2 / fan_out)).astype(np.float32)
    if key == "scale":
      return (1 + 0.1 * rs.normal(size=s.shape)).astype(np.float32)
    # Random BN shifts of both signs, so that emptied conv_a filters with
    # beta_a > 0 (which keep feeding conv_b) occur.
    return (0.5 * rs.normal(size=s.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
  stats = jax.tree_util.tree_map_with_path(
      lambda kp, s: np.full(s.shape, kp[-1].key == "var", np.float32),
      shapes["batch_stats"])
  gates = gates_lib.init_gates(info, groups, key=jax.random.key(seed + 1))
  return model, {"batch_stats": stats}, info, gates, params


def _grad_zero_pattern(name, groups, variables, gates, params, seed):
  """Summed |gradient| of a random loss over random batches (train mode)."""
  grad = _model(name, groups)[3]
  rs = np.random.RandomState(seed)
  total = None
  for _ in range(2):
    x = jnp.asarray(rs.normal(size=(4, 8, 8, 3)), jnp.float32)
    r = jnp.asarray(rs.normal(size=(4, 10)), jnp.float32)
    gi = jax.tree.map(np.abs, grad(params, variables["batch_stats"], gates, x,
                                   r))
    total = gi if total is None else jax.tree.map(np.add, total, gi)
  return total


@pytest.mark.parametrize("name,groups,beta", [("cifar_resnet20", 4, 0.03),
                                              ("cifar_resnet20", 4, 0.45),
                                              ("cifar_resnet56", 3, 0.04)])
def test_dead_structure_matches_gradient_check(name, groups, beta):
  model, variables, info, gates, params = _resnet(name, groups, 3)
  pruner = pr.Pruner(params, gates, info, groups)
  masks0, _ = pruner.channel_masks(beta)
  masked = params
  for c, m in zip(info.taking_part, masks0):
    w = paths.get(masked, c.kernel_path[1:])
    masked = paths.replace(masked, c.kernel_path[1:], w * m[None, None])
  grads = _grad_zero_pattern(name, groups, variables, gates, masked, 0)
  with pytest.warns(UserWarning) if beta < 0.1 else _nothing():
    res = pruner.result(beta)
  leaked = 0
  tp = [l.path for l in info.taking_part]
  get = lambda tree, path, leaf: paths.get(tree, path + (leaf,))
  for b in info.blocks:
    (conv_a, norm_a), (conv_b, norm_b) = b.main
    la, lb = tp.index(conv_a), tp.index(conv_b)
    ga, gb = get(grads, conv_a, "kernel"), get(grads, conv_b, "kernel")
    ma, mb = get(res.masks, conv_a, "kernel"), get(res.masks, conv_b, "kernel")
    # conv_a filter o is zeroed iff its gradient is zero or it was masked.
    filt_dead = np.all(ga == 0, axis=(0, 1, 2)) | np.all(masks0[la] == 0, axis=0)
    np.testing.assert_array_equal(np.all(ma == 0, axis=0), filt_dead)
    # conv_b input channel o is zeroed iff its gradient is zero or masked.
    chan_dead = np.all(gb == 0, axis=(0, 1, 3)) | np.all(masks0[lb] == 0, axis=1)
    np.testing.assert_array_equal(np.all(mb == 0, axis=1), chan_dead)
    # A BN dies iff its gamma gradient is zero.
    for norm in (norm_a, norm_b):
      dead = get(grads, norm, "scale") == 0
      np.testing.assert_array_equal(get(res.masks, norm, "scale") == 0, dead)
      bn = paths.get(res.params, norm)
      assert np.all(bn["scale"][dead] == 0) and np.all(bn["bias"][dead] == 0)
    # Emptied conv_a filters whose beta_a > 0 keep their conv_b column.
    leaked += int(np.sum(np.all(masks0[la] == 0, axis=0)
                         & ~np.all(mb == 0, axis=1)))
  if beta < 0.1:
    assert leaked > 0  # the case the one-pass rule exists for is exercised
    assert res.propagated_p_flops > res.p_flops
  # Stem, shortcuts and classifier are untouched; kernels equal W * mask.
  for key in ("conv_1_3x3", "bn_1", "classifier"):
    jax.tree.map(np.testing.assert_array_equal, res.params[key], params[key])
  jax.tree.map(np.testing.assert_array_equal,
               res.params["stage_2"]["0"]["downsample"],
               params["stage_2"]["0"]["downsample"])
  for c in info.taking_part:
    np.testing.assert_array_equal(
        get(res.params, c.path, "kernel"),
        get(params, c.path, "kernel") * get(res.masks, c.path, "kernel"))


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def test_masks_collection_reproduces_pruned_forward():
  model, variables, info, gates, params = _resnet("cifar_resnet20", 2, 5)
  with pytest.warns(UserWarning):
    res = pr.prune_at(params, gates, info, groups=2, beta=0.05)
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 8, 8, 3)),
                  jnp.float32)
  v = {"batch_stats": variables["batch_stats"], "gates": gates}
  dense = model.apply({**v, "params": params, "masks": res.masks}, x,
                      train=False)
  pruned = model.apply({**v, "params": res.params}, x, train=False)
  np.testing.assert_allclose(dense, pruned, rtol=1e-5, atol=1e-5)
  # The fine-tune mask application maps the dense weights to the pruned ones.
  again = models.apply_masks(jax.tree.map(jnp.asarray, params),
                             jax.tree.map(jnp.asarray, res.masks))
  for c in info.taking_part:
    np.testing.assert_array_equal(paths.get(again, c.kernel_path[1:]),
                                  paths.get(res.params, c.kernel_path[1:]))
  for b in info.blocks:
    bn = paths.get(again, b.main[0][1])
    assert np.all(np.asarray(bn["bias"])[np.asarray(bn["scale"]) == 0] == 0)


@pytest.mark.parametrize("name,groups", [("cifar_resnet20", 4),
                                         ("cifar_resnet56", 3)])
@pytest.mark.parametrize("rate", [0.5, 0.7])
def test_rate_search_follows_the_spec(name, groups, rate):
  _, _, info, gates, params = _resnet(name, groups, 7)
  params = jax.tree.map(np.asarray, params)
  t0 = time.perf_counter()
  res = pr.prune(params, gates, info, groups=groups, rate=rate)
  elapsed = time.perf_counter() - t0
  traj = res.trajectory
  assert len(traj) == 11 and traj[0][0] == 0.15
  beta, lo, hi = 0.15, 0.0, 1.0
  for b, pf in traj[:10]:
    assert b == beta
    # Every trial prunes the same unpruned weights.
    assert pf == pytest.approx(
        pr.prune_at(params, gates, info, groups=groups, beta=b).p_flops)
    if pf > 100 * rate:
      hi, beta = b, (b + lo) / 2
    else:
      lo, beta = b, (b + hi) / 2
  assert traj[10] == (beta, res.p_flops) and res.beta == beta
  assert abs(res.p_flops - 100 * rate) < 1.0
  assert elapsed < 2.0
  # The project's FLOPs accounting (models.flops) agrees on the reference
  # measure and reports the whole-model figure beside it.
  assert res.whole_model["dsp_pflops"] == pytest.approx(res.p_flops)
  assert res.whole_model["dsp_pparams"] == pytest.approx(res.p_params)
  assert 0 < res.whole_model["pflops_whole_model"] < res.p_flops
  assert "whole model" in pr.format_table(res)
