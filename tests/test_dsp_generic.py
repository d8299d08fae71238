"""DSP on networks other than the CIFAR ResNets: fp layers from the
structure, group learning, pruning to a rate, dead-structure removal against
exactly-zero gradients, the generic packed export, and bad inputs."""

from __future__ import annotations

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import dsp_jax
import models
from dsp_jax import kernels
from models import paths
from dsp_jax import pipeline as dsp_pipeline
from dsp_jax import pruning as pr
from dsp_jax import regularizer as reg
from models import layers, resnet, vgg
from training import finite
from training import artifacts

SIZE = 16
FAMILIES = ("bottleneck", "basic", "vgg")


@functools.lru_cache(maxsize=None)
def _model(family: str, groups: int = 2, w: int = 1):
  if family == "bottleneck":
    model = resnet.ResNet(block="bottleneck", stage_sizes=(1, 1),
                          widths=(4 * w, 8 * w), stem="cifar", num_classes=10,
                          image_size=SIZE)
  elif family == "basic":  # the ImageNet stem (7x7 stride 2, max-pool)
    model = resnet.ResNet(block="basic", stage_sizes=(1, 1),
                          widths=(8 * w, 16 * w), stem="imagenet",
                          num_classes=10, image_size=2 * SIZE)
  else:
    model = vgg.VGG(config=(8 * w, "M", 16 * w, 16 * w, "M", 16 * w, "M"),
                    head="cifar", hidden=16, num_classes=10,
                    dropout_rate=0.0, image_size=SIZE)
  return models.prunable(model, groups)


def _setup(family: str, seed: int = 0, w: int = 1):
  model = _model(family, w=w)
  size = model.image_size
  info = dsp_jax.analyze(model, (size, size, 3))
  v = artifacts.random_variables(model, seed, size)
  return model, info, v


def test_fp_layers_are_derived_from_the_structure():
  r8 = dsp_jax.analyze(models.create_model("cifar_resnet8", groups=2),
                       (32, 32, 3))
  fp = kernels.derived_fp
  assert fp(r8) == (1, 3, 5)                     # every 2nd (basic blocks)
  info = _setup("bottleneck")[1]
  assert fp(info) == (2, 5)                      # every 3rd (bottlenecks)
  assert [info.taking_part[i].name for i in fp(info)] == [
      "layer1.0.conv3", "layer2.0.conv3"]
  info = _setup("vgg")[1]                        # no residual sums: all
  assert fp(info) == (0, 1, 2) and info.taking_part[0].name == "features.4"
  # The probe runs at the configured image size.
  big = dsp_jax.analyze(_model("vgg").clone(image_size=None), (32, 32, 3))
  assert big.taking_part[0].in_shape == (16, 16, 8)
  assert info.taking_part[0].in_shape == (8, 8, 8)
  # An explicit choice overrides the derived one.
  _, info, v = _setup("bottleneck")
  assert pr.Pruner(v["params"], v["gates"], info, 2).fp == {2, 5}
  assert pr.Pruner(v["params"], v["gates"], info, 2, fp_every=2).fp == {
      1, 3, 5}
  assert pr.Pruner(v["params"], v["gates"], info, 2, fp_layers=[0]).fp == {0}
  config = {"dsp": {"fp_every": 0, "fp_layers": "0, 4"}}
  assert dsp_pipeline.fp_options(config) == {"fp_layers": [0, 4]}
  config["dsp"]["fp_layers"] = ""
  assert dsp_pipeline.fp_options(config) == {"fp_every": None}


def _regulariser(params, gates, info):
  return sum(float(reg.regulariser_value(
      kernels.kernel(params, c),
      dsp_jax.hard_assignment(kernels.logits(gates, c)))) for c in
             info.taking_part)


def _group_state_and_batch(v):
  """A group-learning state from random variables, and a random batch."""
  state = dsp_jax.init_group_state(
      {"params": jax.tree.map(jnp.asarray, v["params"]),
       "batch_stats": jax.tree.map(jnp.asarray, v["batch_stats"])},
      jax.tree.map(jnp.asarray, v["gates"]), rng=jax.random.key(0))
  rs = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rs.normal(size=(8, SIZE, SIZE, 3)),
                                jnp.float32),
           "label": jnp.asarray(rs.randint(0, 10, size=8))}
  return state, batch


@pytest.mark.parametrize("family", ["bottleneck", "vgg"])
def test_group_step_runs_and_reduces_the_group_regulariser(family):
  model, info, v = _setup(family)
  state, batch = _group_state_and_batch(v)
  step = dsp_jax.make_group_step(
      model, groups=2, lam=5.0, lr_schedule=lambda t: 0.05, total_steps=3,
      layer_info=info)
  before = _regulariser(state.params, state.gates, info)
  for _ in range(3):
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics[finite.KEY]) == 1.0  # The state is checked finite.
  after = _regulariser(state.params, state.gates, info)
  assert after < 0.9 * before
  # Only the logits move in the gates collection; every layer has them.
  assert set(map(tuple, (c.path for c in info.taking_part))) == {
      tuple(k.key for k in kp[:-1]) for kp, _ in
      jax.tree_util.tree_flatten_with_path(state.gates)[0]}


def test_group_step_feeds_dropout_of_a_vgg_classifier():
  # VGG's classifier has nn.Dropout: the step must hand it an rng.
  model, info, v = _setup("vgg")
  model = model.clone(dropout_rate=0.5)
  state, batch = _group_state_and_batch(v)
  step = dsp_jax.make_group_step(
      model, groups=2, lam=1.0, lr_schedule=lambda t: 0.05, total_steps=2,
      layer_info=info)
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert int(new.step) == 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rate", [0.4, 0.6])
def test_rate_search_lands_within_the_tolerance(family, rate):
  _, info, v = _setup(family, seed=1, w=4)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # cnt_g = 0 warnings of tiny layers
    res = pr.prune(v["params"], v["gates"], info, groups=2, rate=rate)
  assert len(res.trajectory) == 11
  assert abs(res.p_flops - 100 * rate) < 1.0
  assert res.whole_model is not None and 0 < res.whole_model[
      "pflops_whole_model"] < res.p_flops


def _gradient_pattern(model, params, batch_stats, seed):
  """Summed |d loss / d params| over random train-mode batches."""
  size = model.image_size

  @jax.jit
  def grad(params, x, r):
    def loss(p):
      out, _ = model.apply({"params": p, "batch_stats": batch_stats}, x,
                           train=True, mutable=["batch_stats"])
      return jnp.sum(out * r)
    return jax.grad(loss)(params)

  rs = np.random.RandomState(seed)
  total = None
  for _ in range(2):
    x = jnp.asarray(rs.normal(size=(4, size, size, 3)), jnp.float32)
    r = jnp.asarray(rs.normal(size=(4, 10)), jnp.float32)
    g = jax.tree.map(np.abs, grad(params, x, r))
    total = g if total is None else jax.tree.map(np.add, total, g)
  return total


@pytest.mark.parametrize("family", FAMILIES)
def test_dead_structure_equals_the_zero_gradient_pattern(family):
  model, info, v = _setup(family, seed=2)
  params = jax.tree.map(np.asarray, v["params"])
  st = models.analyze(model, model.image_size)
  for l in st.convs:
    # Conv biases at zero: the batch variance of a constant non-zero channel
    # rounds to a tiny non-zero value, so its gradients would not be exact 0.
    node = paths.get(params, l.path)
    if "bias" in node:
      params = paths.replace(params, l.path, {**node, "bias": 0 * node["bias"]})
    # Small norm shifts: a residual channel made of a constant negative
    # shift plus a weak shortcut could be negative on every pixel of the few
    # test batches, a data-dependent zero that no structural rule predicts.
    if l.norm is not None:
      bn = paths.get(params, l.norm)
      params = paths.replace(params, l.norm, {**bn, "bias": 0.2 * bn["bias"]})
  pruner = pr.Pruner(params, v["gates"], info, 2)
  checked = 0
  for beta in (0.05, 0.3):
    masks0, _ = pruner.channel_masks(beta)
    masked = params
    for c, m in zip(info.taking_part, masks0):
      k = kernels.kernel(masked, c)
      masked = kernels.with_kernel(masked, c, k * m[None, None])
    grads = _gradient_pattern(model, jax.tree.map(jnp.asarray, masked),
                              v["batch_stats"], beta > 0.1)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      res = pruner.result(beta)
    for c, m0 in zip(info.taking_part, masks0):
      g = np.sum(kernels.kernel(grads, c), axis=(0, 1))   # (I, O)
      got = np.asarray(paths.get(res.masks, c.kernel_path[1:])) != 0
      np.testing.assert_array_equal(got, (m0 != 0) & (g != 0),
                                    err_msg=f"{c.name} at beta={beta}")
      checked += int(np.sum((m0 != 0) & (g == 0)))
      if c.norm is not None:
        dead = paths.get(grads, c.norm + ("scale",)) == 0
        np.testing.assert_array_equal(
            paths.get(res.masks, c.norm + ("scale",)) == 0, dead,
            err_msg=f"{'.'.join(c.norm)} at beta={beta}")
  assert checked > 0  # some kept kernels really were removed as dead


@pytest.mark.parametrize("family", FAMILIES)
def test_generic_export_matches_the_masked_model(tmp_path, family):
  import torch  # pylint: disable=import-outside-toplevel
  from convert import branched  # pylint: disable=import-outside-toplevel
  model, info, v = _setup(family, seed=3, w=2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = pr.prune(v["params"], v["gates"], info, groups=2, rate=0.5)
  pruned = {**v, "params": res.params, "masks": res.masks}
  r = branched.export_branched(model, pruned, tmp_path,
                               program=family != "basic")
  assert max(r.max_abs_diff.values()) <= 1e-4
  assert max(r.details["branches"].values()) >= 2           # groups became branches
  io = np.load(tmp_path / "reference_io.npz")
  loaded = torch.jit.load(str(tmp_path / branched.TORCHSCRIPT))
  with torch.no_grad():
    got = loaded(torch.from_numpy(io["images_nchw"])).numpy()
  np.testing.assert_allclose(got, io["logits"], atol=1e-4)
  sd = torch.load(tmp_path / branched.STATE_DICT, weights_only=True)
  assert all(isinstance(t, torch.Tensor) for t in sd.values())
  desc = json.loads((tmp_path / branched.BRANCHES).read_text())
  by_name = {l["layer"]: l for l in desc["layers"]}
  for c in info.taking_part:
    if c.name not in by_name:
      continue
    layer = by_name[c.name]
    mask = np.asarray(paths.get(res.masks, c.kernel_path[1:])) != 0  # (I, O)
    for b in layer["branches"]:
      # A branch reads exactly the kept inputs of its filters.
      for o in b["filters"]:
        kept = set(np.flatnonzero(mask[:, o])) & set(layer["inputs"])
        assert kept <= set(b["inputs"])
    assert sorted(f for b in layer["branches"] for f in b["filters"]) == (
        layer["filters"])


def test_convert_export_of_a_dsp_pruned_vgg_writes_branches(tmp_path):
  # A model with DSP group logits exports as branches (the files of the pack
  # stage); without the logits it is slimmed as DDROP's.
  from convert import branched, formats  # pylint: disable=g-import-not-at-top
  model, info, v = _setup("vgg", seed=3, w=2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = pr.prune(v["params"], v["gates"], info, groups=2, rate=0.5)
  pruned = {**v, "params": res.params, "masks": res.masks}
  assert formats.applicable(model, pruned) == ["branched", "torch", "onnx"]
  shape = (model.image_size, model.image_size, 3)
  r = formats.export(model, pruned, tmp_path / "out", shape,
                     formats="branched")
  assert (tmp_path / "out" / branched.BRANCHES).is_file()
  assert max(r.details["branches"].values()) >= 2
  assert max(r.max_abs_diff.values()) <= 1e-4
  with pytest.raises(ValueError, match="slim export does not apply"):
    formats.export(model, pruned, tmp_path / "out2", shape, formats="slim")
  dense = {k: x for k, x in pruned.items() if k != "gates"}
  assert formats.applicable(model, dense) == ["slim", "fast", "torch", "onnx"]


class _Mixing(nn.Module):
  """A conv whose output channels go through an op the walk does not know."""

  @nn.compact
  def __call__(self, x, train=False):
    x = layers.Conv(4, name="stem")(x)
    x = layers.Conv(4, name="conv")(x)
    x = jnp.cumsum(x, axis=-1)
    x = layers.Conv(4, name="after")(x)
    return layers.Dense(10, name="fc")(jnp.mean(x, axis=(1, 2)))


def test_bad_inputs_are_clear_errors():
  with pytest.raises(ValueError, match=r"conv reach the JAX primitive "
                                       r"'cumsum'"):
    dsp_jax.analyze(_Mixing(), (8, 8, 3))
  with pytest.raises(ValueError, match=r"layer1.0.conv1: groups must be in "
                                       r"\[1, 4\]"):
    _model("bottleneck", groups=5).init(
        jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
  with pytest.raises(ValueError, match=r"layer1.0.conv1: groups must be in "
                                       r"\[1, 4\]"):
    dsp_jax.init_gates(_setup("bottleneck")[1], 5)
  _, info, v = _setup("bottleneck")
  top = pr.Pruner(v["params"], v["gates"], info, 2).flops_at(pr.BETA_MAX)
  assert top < 99.0
  with pytest.raises(ValueError, match=r"unreachable.*\(0\.0000, "
                     rf"{top / 100:.4f}\)"):
    pr.prune(v["params"], v["gates"], info, groups=2, rate=0.99)
  # Half the kernels already zero: rates at or below that are unreachable.
  params = jax.tree.map(np.asarray, v["params"])
  for c in info.taking_part:
    k = np.array(kernels.kernel(params, c))
    k[..., : k.shape[-1] // 2] = 0
    params = kernels.with_kernel(params, c, k)
  with pytest.raises(ValueError, match=r"unreachable.*\(0\.50.*zero kernels"):
    pr.prune(params, v["gates"], info, groups=2, rate=0.3)


def test_reference_file_names_per_family():
  assert dsp_pipeline.reference_name("pretrain", "cifar_resnet20", 4,
                                     0.5) == "resnet20.pkl"
  assert dsp_pipeline.reference_name("group", "cifar_resnet56", 3,
                                     0.5) == "resnet56_G0g3.pkl"
  assert dsp_pipeline.reference_name("prune_finetune", "cifar_resnet50", 2,
                                     0.7) == "cifar_resnet50_P0g2c0.70.pkl"
  assert dsp_pipeline.reference_name("group", "vgg16_bn", 2,
                                     0.7) == "vgg16_bn_G0g2.pkl"
