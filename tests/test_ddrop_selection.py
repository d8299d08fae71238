"""Which layers DDROP selects (from the traced graph), per model family, and
VGG's Linear units."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ddrop_jax as dd
import models
from models import layers as L


class Features(nn.Module):
  """torchvision VGG ``features``: conv, BN, ReLU triples numbered in order."""

  widths: tuple[int, ...] = (3, 5)

  @nn.compact
  def __call__(self, x, train):
    for i, w in enumerate(self.widths):
      x = L.Conv(w, 3, 1, 1, use_bias=True, name=str(3 * i))(x)
      x = nn.relu(L.BatchNorm(name=str(3 * i + 1))(x, train))
    return x


class Classifier(nn.Module):
  """Linear-LayerNorm-ReLU-Dropout x2, then the output Linear (0,1,4,5,8)."""

  hidden: int = 6
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train):
    for i in (0, 4):
      x = L.Dense(self.hidden, name=str(i))(x)
      x = nn.relu(L.LayerNorm(name=str(i + 1))(x))
    return L.Dense(self.num_classes, name="8")(x)


class TinyVgg(nn.Module):

  @nn.compact
  def __call__(self, x, *, train):
    x = Features(name="features")(x, train)
    return Classifier(name="classifier")(jnp.mean(x, axis=(1, 2)), train)


class Downsample(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train):
    x = L.Conv(self.features, 1, 1, 0, name="0")(x)
    return L.BatchNorm(name="1")(x, train)


class TvBlock(nn.Module):
  widths: tuple[int, ...]

  @nn.compact
  def __call__(self, x, train):
    y = x
    for i, w in enumerate(self.widths, 1):
      y = L.Conv(w, 3, 1, 1, name=f"conv{i}")(y)
      y = L.BatchNorm(name=f"bn{i}")(y, train)
    if x.shape[-1] != y.shape[-1]:
      x = Downsample(y.shape[-1], name="downsample")(x, train)
    return nn.relu(x + y)


class TvLayer(nn.Module):
  blocks: tuple[tuple[int, ...], ...]

  @nn.compact
  def __call__(self, x, train):
    for b, widths in enumerate(self.blocks):
      x = TvBlock(widths, name=str(b))(x, train)
    return x


class TinyTvResNet(nn.Module):
  """torchvision layout: stem conv1/bn1, layer1 (BasicBlock), layer2
  (Bottleneck with a downsample shortcut), fc."""

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.relu(L.BatchNorm(name="bn1")(L.Conv(4, 3, 1, 1, name="conv1")(x),
                                        train))
    x = TvLayer(((4, 4), (4, 4)), name="layer1")(x, train)
    x = TvLayer(((2, 3, 8),), name="layer2")(x, train)
    return L.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


def shapes(model, size=8):
  """Variable shapes only: selection needs nothing else."""
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x,
                                             train=False),
                        jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))


def init(model, size=8):
  """Deterministic distinct values (no compile of the random init)."""
  return jax.tree.map(
      lambda s: jnp.asarray(0.5 + 0.4 * np.sin(np.arange(np.prod(s.shape))))
      .reshape(s.shape).astype(s.dtype),
      {k: v for k, v in shapes(model, size).items() if k != "masks"})


def names(layers):
  return [l.name for l in layers]


def test_dsp_cifar_resnet_selects_bn_a_of_every_block():
  model = models.create_model("cifar_resnet8")
  layers = dd.ddrop_layers(model)
  assert names(layers) == ["stage_1.0.bn_a", "stage_2.0.bn_a",
                           "stage_3.0.bn_a"]
  assert [l.producer[-1] for l in layers] == ["conv_a"] * 3
  assert [l.units for l in layers] == [4, 8, 16]
  assert all(l.kind == "norm" and l.norm == l.path for l in layers)


SHAPE = (8, 8, 3)


def test_torchvision_resnet_basic_and_bottleneck_rules():
  model = TinyTvResNet()
  layers = dd.ddrop_layers(model, SHAPE)
  assert names(layers) == ["layer1.0.bn1", "layer1.1.bn1", "layer2.0.bn1",
                           "layer2.0.bn2"]
  assert [".".join(l.producer) for l in layers] == [
      "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.conv2"]
  assert [l.units for l in layers] == [4, 4, 2, 3]
  everything = names(dd.prune_layers(model, layers, True, SHAPE))
  assert everything[:4] == names(layers)
  assert set(everything[4:]) == {"bn1", "layer1.0.bn2", "layer1.1.bn2",
                                 "layer2.0.bn3", "layer2.0.downsample.1"}


def test_vgg_rule_features_norms_and_hidden_linears_only():
  model = TinyVgg()
  layers = dd.ddrop_layers(model, SHAPE)
  # natural path order: 'classifier' sorts before 'features'
  assert names(layers) == ["classifier.0", "classifier.4", "features.1",
                           "features.4"]
  fcs, feats = layers[:2], layers[2:]
  assert [l.producer[-1] for l in feats] == ["0", "3"]
  assert all(l.kind == "dense" and l.producer == l.path for l in fcs)
  assert [l.norm[-1] for l in fcs] == ["1", "5"]  # follower LayerNorms
  # prune_residual adds nothing for VGG: every unit layer is a DDROP layer
  assert dd.prune_layers(model, layers, True, SHAPE) == layers


def test_layers_of_the_plain_and_the_wrapped_model_agree():
  model = models.create_model("cifar_resnet8")
  assert dd.ddrop_layers(model) == dd.ddrop_layers(model.model, (32, 32, 3))


class _OnlyClassifier(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_a_model_without_units_is_a_clear_error():
  with pytest.raises(ValueError, match="no DDROP layers found"):
    dd.ddrop_layers(_OnlyClassifier(), SHAPE)


def _family_rules_hold(spec, layers, params):
  sel = set(names(layers))
  modules = models.paths.modules(params)
  norms = {".".join(p) for p, leaves in modules.items()
           if "scale" in leaves and "kernel" not in leaves}
  assert sel, spec.name
  for n in sel:
    assert "." in n and "downsample" not in n, (spec.name, n)
  if spec.family in ("resnet", "cifar_resnet"):
    blocks = {}
    for n in norms:
      parent, leaf = n.rsplit(".", 1) if "." in n else ("", n)
      if leaf.startswith("bn") and parent:
        blocks.setdefault(parent, []).append(n)
    for bns in blocks.values():
      bns.sort()
      assert not set(bns[-1:]) & sel, (spec.name, bns)  # block-last never
      assert set(bns[:-1]) <= sel, (spec.name, bns)     # the others always
  else:  # vgg
    feats = {n for n in norms if n.rsplit(".", 1)[0].endswith("features")}
    assert feats <= sel, spec.name
    dense = sorted((p for p, leaves in modules.items()
                    if np.ndim(leaves.get("kernel")) == 2
                    and p[-2] == "classifier"), key=lambda p: int(p[-1]))
    assert ".".join(dense[-1]) not in sel, spec.name   # output layer never
    assert {".".join(p) for p in dense[:-1]} <= sel, spec.name


TINY_CNNS = [n for n in models.list_models()
             if models.model_spec(n).tiny
             and models.model_spec(n).family in ("resnet", "cifar_resnet",
                                                 "vgg")]


@pytest.mark.parametrize("name", TINY_CNNS)
def test_registered_tiny_models_follow_their_family_rule(name):
  spec = models.model_spec(name)
  model = models.create_model(name)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, spec.image_size, spec.image_size, 3)),
      train=False))["params"]
  _family_rules_hold(spec, dd.ddrop_layers(model), params)


def test_vgg_linear_units_are_dropped_and_pruned_with_their_layernorm():
  model = models.prunable(TinyVgg())
  variables = init(model)
  layers = dd.ddrop_layers(model, SHAPE)
  cfg = dd.DdropConfig(prob=(0.0, 0.0), amount=0.5, total_steps=1)
  keep = dd.keep_probabilities(variables["params"], None, 0, cfg, layers)
  # keep = 0 everywhere: both hidden Linear outputs are dropped, so the
  # LayerNorm after the second one sees zeros and returns its bias; the
  # logits only depend on that bias.
  out = jax.jit(lambda v: model.apply(
      v, jnp.ones((2, 8, 8, 3)), train=True, mutable=["batch_stats"],
      rngs={"ddrop": jax.random.key(1)})[0])({**variables, "ddrop": keep})
  cls = variables["params"]["classifier"]
  want = (jax.nn.relu(cls["5"]["bias"]) @ cls["8"]["kernel"]
          + cls["8"]["bias"])
  np.testing.assert_allclose(out, jnp.broadcast_to(want, out.shape),
                             rtol=1e-5, atol=1e-6)
  pruned = dd.prune(variables, layers, cfg)
  p, m = pruned["params"]["classifier"], pruned["masks"]["classifier"]
  for i in ("0", "4"):
    kernel = np.asarray(variables["params"]["classifier"][i]["kernel"])
    dead = np.zeros(6, bool)  # floor(0.5 * 6) smallest squared row norms
    dead[np.argsort(np.sum(kernel ** 2, 0), kind="stable")[:3]] = True
    assert np.all(np.asarray(p[i]["kernel"])[:, dead] == 0)
    assert np.all(np.asarray(p[i]["bias"])[dead] == 0)
    assert np.all(np.asarray(m[i]["kernel"])[:, dead] == 0)
    assert np.all(np.asarray(m[i]["kernel"])[:, ~dead] == 1)
    ln = str(int(i) + 1)
    assert np.all(np.asarray(m[ln]["scale"]) == ~dead)
    assert np.all(np.asarray(p[ln]["scale"])[dead] == 0)
  assert "8" not in m  # the output layer is untouched (no mask needed)


def test_vgg_dense_drop_at_norm_zeroes_dropped_units_like_pruning():
  model = models.prunable(TinyVgg())
  variables = init(model)
  linear = dd.ddrop_layers(model, SHAPE)
  at_norm = dd.ddrop_layers(model, SHAPE, dense_drop="norm")
  # the hidden Linears' units move to their LayerNorms; ranks and pruning
  # still follow the Linear rows
  assert names(at_norm) == ["classifier.1", "classifier.5", "features.1",
                            "features.4"]
  for a, b in zip(linear[:2], at_norm[:2]):
    assert b.kind == "dense" and b.producer == a.path and b.norm == b.path
  cfg = dd.DdropConfig(prob=(0.0, 0.0), amount=0.5, total_steps=1,
                       dense_drop="norm")
  keep = dd.keep_probabilities(variables["params"], None, 0, cfg, at_norm)
  # keep = 0: the second norm's output is 0, so only the output bias is left
  # (dropped on the Linear instead, relu(LayerNorm bias) would pass).
  out = model.apply({**variables, "ddrop": keep}, jnp.ones((2, 8, 8, 3)),
                    train=True, mutable=["batch_stats"],
                    rngs={"ddrop": jax.random.key(1)})[0]
  cls = variables["params"]["classifier"]
  np.testing.assert_allclose(out, jnp.broadcast_to(cls["8"]["bias"],
                                                   out.shape), atol=1e-6)
  # pruning zeros the same units whichever module drops them
  pruned_a = dd.prune(variables, linear, dd.DdropConfig(amount=0.5))
  pruned_b = dd.prune(variables, at_norm, cfg)
  jax.tree.map(np.testing.assert_array_equal, pruned_a["masks"],
               pruned_b["masks"])
  with pytest.raises(ValueError, match="dense_drop"):
    dd.ddrop_layers(model, SHAPE, dense_drop="after")
