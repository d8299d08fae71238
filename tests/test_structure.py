"""The traced graph of the zoo models: roles, spaces, shapes, dead channels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import models
from dsp_jax import kernels
from models import layers


def _p(name: str) -> tuple[str, ...]:
  return tuple(name.split("."))


def _names(layers) -> list[str]:
  return [l.name for l in layers]


def test_cifar_resnet20_layers_roles_and_blocks():
  s = models.analyze(models.create_model("cifar_resnet20"), 32)
  convs = s.convs
  assert len(convs) == 1 + 18 + 2
  assert convs[0].name == "conv_1_3x3" and convs[0].stem
  assert convs[0].inputs == ()
  # Call order: the main branch is called before the shortcut.
  assert _names(convs[1:8]) == [
      "stage_1.0.conv_a", "stage_1.0.conv_b", "stage_1.1.conv_a",
      "stage_1.1.conv_b", "stage_1.2.conv_a", "stage_1.2.conv_b",
      "stage_2.0.conv_a"]
  assert _names(convs[8:10]) == ["stage_2.0.conv_b", "stage_2.0.downsample.0"]
  taking = s.taking_part
  assert len(taking) == 18
  assert all(not l.shortcut and not l.stem for l in taking)
  assert _names(l for l in convs if l.shortcut) == [
      "stage_2.0.downsample.0", "stage_3.0.downsample.0"]
  # DSP fp layers: (l + 1) mod 2 == 0 among taking-part layers.
  assert _names(s.block_last) == _names(taking[1::2])
  assert [l.name.endswith("conv_b") for l in s.block_last] == [True] * 9
  # Norms follow their convs; the classifier has none.
  assert s[_p("stage_2.0.conv_a")].norm == _p("stage_2.0.bn_a")
  assert s[_p("stage_2.0.downsample.0")].norm == _p("stage_2.0.downsample.1")
  assert s[_p("stage_2.0.downsample.1")].shortcut
  classifier = s[_p("classifier")]
  assert classifier.kind == "dense" and classifier.norm is None
  # Blocks: 9, identity shortcut except the first block of stages 2 and 3.
  assert len(s.blocks) == 9
  b = s.blocks[3]
  assert b.main == ((_p("stage_2.0.conv_a"), _p("stage_2.0.bn_a")),
                    (_p("stage_2.0.conv_b"), _p("stage_2.0.bn_b")))
  assert b.shortcut == (_p("stage_2.0.downsample.0"),
                        _p("stage_2.0.downsample.1"))
  assert s.blocks[0].shortcut is None and s.blocks[4].shortcut is None
  # Residual spaces: stem + stage-1 conv_b; shortcut + stage conv_b.
  assert s.space_of(_p("conv_1_3x3")) == frozenset(
      [_p("conv_1_3x3")] + [_p(f"stage_1.{i}.conv_b") for i in range(3)])
  assert s.spaces[s.blocks[3].space] == frozenset(
      [_p("stage_2.0.downsample.0")] +
      [_p(f"stage_2.{i}.conv_b") for i in range(3)])
  assert s.space_of(_p("stage_1.0.conv_a")) == frozenset(
      [_p("stage_1.0.conv_a")])
  # Inputs: a stage-2 conv_a reads the whole stage-1 space; consumers agree.
  assert set(s[_p("stage_2.0.conv_a")].inputs) == s.space_of(_p("conv_1_3x3"))
  assert _names(s.consumers(_p("stage_1.2.conv_b"))) == [
      "stage_2.0.conv_a", "stage_2.0.downsample.0"]
  assert s.outputs == frozenset([_p("classifier")])
  assert not s.mixed


def test_cifar_resnet20_shapes_and_insize():
  s = models.analyze(models.create_model("cifar_resnet20"), 32)
  l = s[_p("stage_2.0.conv_a")]
  assert (l.in_features, l.out_features, l.kernel_size, l.strides) == (
      16, 32, (3, 3), (2, 2))
  assert (l.in_hw, l.out_hw) == ((32, 32), (16, 16))
  assert l.macs == l.flops == 32 * 16 * 9 * 16 * 16
  assert l.params == 32 * 16 * 9
  assert kernels.insize(l) == 16 * 32 * 32 / (16 * 32 * 32)
  assert kernels.insize(s[_p("stage_3.0.conv_b")]) == 64 * 8 * 8 / (
      16 * 32 * 32)
  assert s[_p("classifier")].params == 64 * 10 + 10
  assert s[_p("bn_1")].params == 32


def test_analyze_is_cached_and_checks_image_size():
  m = models.create_model("cifar_resnet8")
  assert models.analyze(m, 32) is models.analyze(m, (32, 32))
  with pytest.raises(ValueError, match="image_size"):
    models.analyze(m, (32, 32, 3))
  with pytest.raises(KeyError, match="valid layers"):
    models.analyze(m, 32)[("nope",)]


# ---------------------------------------------------------------------------
# Every zoo model: structural invariants (traced on abstract shapes only).


# The CNNs (the transformers' structure: tests/test_transformers.py).
CNNS = [n for n in models.list_models()
        if models.model_spec(n).family in ("cifar_resnet", "resnet", "vgg")]


@pytest.mark.parametrize("name", CNNS)
def test_zoo_structure_invariants(name):
  spec = models.model_spec(name)
  model = models.create_model(name, num_classes=10)
  s = models.analyze(model, spec.image_size)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(
          (1, spec.image_size, spec.image_size, 3)), train=False))
  kernels = {p[:-1] for p in _param_paths(variables["params"])
             if p[-1] == "kernel"}
  scales = {p[:-1] for p in _param_paths(variables["params"])
            if p[-1] == "scale"}
  # Every conv/dense kernel and every norm is found, once.
  assert {l.path for l in s.producers} == kernels
  assert {l.path for l in s.layers.values() if l.kind == "norm"} == scales
  assert [l.order for l in s.layers.values()] == list(range(len(s.layers)))
  # Exactly one stem, which reads the image; it never takes part.
  stems = [l for l in s.convs if l.stem]
  assert len(stems) == 1 and stems[0] is s.convs[0] and not stems[0].inputs
  assert all(l.inputs for l in s.producers if not l.stem)
  # Taking part = every conv but the stem and the shortcut convs.
  assert [l.path for l in s.taking_part] == [
      l.path for l in s.convs if not l.stem and not l.shortcut]
  # Spaces partition the producers; inputs of a layer lie in one space.
  assert sorted(p for sp in s.spaces for p in sp) == sorted(kernels)
  for l in s.producers:
    if l.inputs:
      assert set(l.inputs) <= s.space_of(l.inputs[0])
      assert l.aligned
      width = s[l.inputs[0]].out_features
      assert all(s[p].out_features == width for p in l.inputs)
      assert l.in_features == width * l.repeat
      assert sorted(set(l.channel_map())) == list(range(width))
  # Blocks: main branch ends with a block_last conv feeding its space.
  for b in s.blocks:
    assert s[b.convs[-1]].block_last
    assert b.convs[-1] in s.spaces[b.space]
    if b.shortcut is not None:
      assert s[b.shortcut[0]].shortcut and b.shortcut[0] in s.spaces[b.space]
  # Channel widths and MACs agree with the kernel shapes.
  leaves = dict(zip(_param_paths(variables["params"]),
                    jax.tree.leaves(variables["params"])))
  for l in s.producers:
    shape = leaves[l.path + ("kernel",)].shape
    assert shape[-2:] == (l.in_features, l.out_features)
    assert l.macs == int(np.prod(shape)) * int(np.prod(l.out_hw))
  assert sum(l.params for l in s.layers.values()) == sum(
      int(np.prod(x.shape)) for x in leaves.values())


def _param_paths(tree) -> list[tuple[str, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [tuple(k.key for k in kp) for kp, _ in flat]


def test_family_specific_structure():
  r50 = models.analyze(models.create_model("resnet50"), 224)
  # Bottleneck: three main-branch convs per block (DSP fp layers n = 3).
  assert len(r50.blocks) == 16 and all(len(b.main) == 3 for b in r50.blocks)
  assert [l.path for l in r50.block_last] == [
      l.path for l in r50.taking_part[2::3]]
  assert r50[_p("layer1.0.downsample.0")].shortcut
  assert r50[_p("conv1")].kernel_size == (7, 7)
  assert r50[_p("layer1.0.conv1")].in_hw == (56, 56)  # after the max-pool
  vgg = models.analyze(models.create_model("vgg11_bn"), 224)
  assert not vgg.blocks and not vgg.block_last
  fc0 = vgg[_p("classifier.0")]
  # NHWC flatten of the 7x7x512 pool: feature f carries channel f % 512.
  assert fc0.repeat == 49 and fc0.in_features == 49 * 512
  np.testing.assert_array_equal(fc0.channel_map(),
                                np.arange(49 * 512) % 512)
  assert fc0.inputs == (_p("features.25"),)
  # The CIFAR head's LayerNorm mixes channels: its producer is never dead.
  cvgg = models.analyze(models.create_model("cifar_vgg11_bn"), 32)
  assert _p("classifier.0") in cvgg.mixed
  assert cvgg[_p("classifier.0")].norm == _p("classifier.1")


# ---------------------------------------------------------------------------
# Dead channels, checked numerically on tiny models of every family.


def _tiny_models():
  from models import resnet, vgg
  zoo = [(n, models.create_model(n, num_classes=10))
         for n in models.list_models() if models.model_spec(n).tiny]
  # Families whose registered tiny variant does not cover every layout.
  zoo.append(("tiny_bottleneck_imagenet_stem", models.prunable(resnet.ResNet(
      block="bottleneck", stage_sizes=(1, 2), widths=(4, 8), stem="imagenet",
      num_classes=10, image_size=32))))
  zoo.append(("tiny_vgg_imagenet_head", models.prunable(vgg.VGG(
      config=(4, "M", 8, "M"), head="imagenet", hidden=16, pool_size=3,
      num_classes=10, image_size=32))))
  return zoo


def _random_masks(s, masks, rng: np.random.Generator):
  """Kills a random channel set per space (every reader's columns), plus
  random extra columns, filter rows and norm entries."""
  masks = jax.tree.map(np.array, masks)
  killed = {}
  for i, space in enumerate(s.spaces):
    if space & (s.outputs | s.mixed):
      continue
    width = s[next(iter(space))].out_features
    killed[i] = rng.random(width) < 0.3
  for l in s.producers:
    m = _get(masks, l.path)["kernel"]
    if l.inputs and s.spaces.index(s.space_of(l.inputs[0])) in killed:
      kill = killed[s.spaces.index(s.space_of(l.inputs[0]))]
      m[kill[l.channel_map()], :] = 0
    m[rng.random(m.shape[0]) < 0.1, :] = 0
    if l.path not in s.outputs:
      m[:, rng.random(m.shape[1]) < 0.15] = 0
  for l in s.layers.values():
    if l.kind == "norm":
      m = _get(masks, l.path)["scale"]
      m[rng.random(m.shape[0]) < 0.1] = 0
  return masks, killed


def random_variables(model, image_size: int, rng: np.random.Generator):
  """Random variables in numpy (no JAX compilation): He-scaled kernels,
  non-trivial norm parameters and statistics (so that biases matter), masks
  of ones."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
      train=False))
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)

  def fill(path, shape):
    col, leaf = path[0].key, path[-1].key
    n = rng.normal(size=shape.shape)
    if col == "params" and leaf == "kernel":
      n = n * np.sqrt(2.0 / np.prod(shape.shape[:-1]))
    elif col == "params" and leaf == "scale":
      n = 1.0 + 0.2 * n
    elif col == "batch_stats" and leaf == "var":
      n = rng.uniform(0.5, 1.5, shape.shape)
    elif col in ("params", "batch_stats"):
      n = 0.2 * n
    else:
      n = np.ones(shape.shape)
    return n.astype(shape.dtype)

  return jax.tree_util.tree_unflatten(
      treedef, [fill(kp, leaf) for kp, leaf in flat])


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


@pytest.mark.parametrize("name,model", _tiny_models(),
                         ids=[n for n, _ in _tiny_models()])
def test_dead_channels_do_not_affect_logits(name, model):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = random_variables(model, 32, rng)
  s = models.analyze(model, 32)
  masks, killed = _random_masks(s, variables["masks"], rng)
  dead = models.dead_channels(s, masks)
  assert set(dead) == {l.path for l in s.producers}
  for i, kill in killed.items():
    for p in s.spaces[i]:
      assert np.all(dead[p][kill]), (p, kill, dead[p])
  assert any(np.any(d) for d in dead.values())
  apply = jax.jit(lambda v: model.apply(v, x, train=False))
  base = apply({**variables, "masks": masks})
  zeroed = models.zero_dead(s, variables["params"], dead)
  out = apply({**variables, "masks": masks, "params": zeroed})
  np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-5)
  # Zeroing one live channel of the last conv does change the logits.
  last = s.convs[-1]
  live = np.flatnonzero(~dead[last.path])
  assert live.size
  alive_one = {last.path: np.isin(np.arange(last.out_features), live)}
  out = apply({**variables, "masks": masks,
               "params": models.zero_dead(s, variables["params"], alive_one)})
  assert np.max(np.abs(np.asarray(out) - np.asarray(base))) > 1e-4


def test_dead_channels_rules_on_cifar_resnet8():
  s = models.analyze(models.create_model("cifar_resnet8"), 32)
  masks = jax.tree.map(lambda m: np.ones(m.shape, np.float32), jax.eval_shape(
      lambda: models.create_model("cifar_resnet8").init(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["masks"])
  # Dense model: nothing is dead.
  assert not any(np.any(d) for d in models.dead_channels(s, masks).values())
  # Column 2 of stage_1.0.conv_a only: the stage-1 space is still read
  # by stage_2.0.conv_a and the shortcut, so nothing dies.
  masks["stage_1"]["0"]["conv_a"]["kernel"][2, :] = 0
  assert not np.any(models.dead_channels(s, masks)[_p("conv_1_3x3")])
  # Also unread by stage 2 (conv_a and shortcut): the whole space dies at 2.
  masks["stage_2"]["0"]["conv_a"]["kernel"][2, :] = 0
  masks["stage_2"]["0"]["downsample"]["0"]["kernel"][2, :] = 0
  dead = models.dead_channels(s, masks)
  for p in ("conv_1_3x3", "stage_1.0.conv_b"):
    assert np.flatnonzero(dead[_p(p)]).tolist() == [2]
  # A zero norm mask kills its conv's channel only (the norm emits its bias).
  masks["stage_1"]["0"]["bn_a"]["scale"][1] = 0
  dead = models.dead_channels(s, masks)
  assert np.flatnonzero(dead[_p("stage_1.0.conv_a")]).tolist() == [1]
  # Transitive: conv_b's filter 3 is unread (stage 2 ignores channel 3 too);
  # with every conv_b row but 3 masked at input 0, no gradient reaches
  # conv_a's channel 0 either: one evaluation finds it.
  masks["stage_2"]["0"]["conv_a"]["kernel"][3, :] = 0
  masks["stage_2"]["0"]["downsample"]["0"]["kernel"][3, :] = 0
  masks["stage_1"]["0"]["conv_a"]["kernel"][3, :] = 0
  masks["stage_1"]["0"]["conv_b"]["kernel"][0, [0, 1, 2]] = 0
  one = models.dead_channels(s, masks, propagate=False)
  assert one[_p("stage_1.0.conv_a")][0]
  assert one[_p("stage_1.0.conv_b")][3]


class _NchwFlattenNet(nn.Module):
  """conv -> BN -> ReLU -> NCHW flatten (PyTorch order) -> dense -> dense."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = layers.Conv(4, 3, 2, 1, name="conv")(x)
    x = nn.relu(layers.BatchNorm(name="bn")(x, train))
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = nn.relu(layers.Dense(6, name="fc1")(x))
    return layers.Dense(3, name="fc2")(x)


class _ConcatNet(nn.Module):
  """Two convs concatenated on the channel axis."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    a = layers.Conv(2, 3, 1, 1, name="a")(x)
    b = layers.Conv(2, 3, 1, 1, name="b")(x)
    x = jnp.concatenate([a, b], axis=-1).mean(axis=(1, 2))
    return layers.Dense(3, name="fc")(x)


def test_nchw_flatten_maps_features_to_channels_and_dead_channels():
  model = models.prunable(_NchwFlattenNet())
  s = models.analyze(model, 8)
  fc1 = s[("fc1",)]
  # (B, C, H, W) flatten: feature f carries channel f // (H * W).
  assert fc1.in_features == 4 * 16 and fc1.repeat == 16
  np.testing.assert_array_equal(fc1.channel_map(), np.arange(64) // 16)
  assert fc1.inputs == (("conv",),) and s[("conv",)].norm == ("bn",)
  assert not s.blocks and s.outputs == frozenset([("fc2",)])
  rng = np.random.default_rng(0)
  variables = random_variables(model, 8, rng)
  masks = jax.tree.map(np.array, variables["masks"])
  masks["fc1"]["kernel"][16:32, :] = 0  # channel 1: every feature masked
  masks["fc1"]["kernel"][32:40, :] = 0  # channel 2: half of its features
  dead = models.dead_channels(s, masks)
  assert np.flatnonzero(dead[("conv",)]).tolist() == [1]
  x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  v = {**variables, "masks": masks}
  base = model.apply(v, x, train=False)
  zeroed = models.zero_dead(s, variables["params"], dead)
  np.testing.assert_allclose(model.apply({**v, "params": zeroed}, x,
                                         train=False), base, atol=1e-6)


def test_channel_concat_maps_each_producer_to_its_slice():
  s = models.analyze(_ConcatNet(), 8)
  assert not s.mixed
  fc = s[("fc",)]
  assert fc.aligned and fc.inputs == (("a",), ("b",))
  # Features 0-1 carry a's channels 0-1, features 2-3 b's.
  assert [s.spaces[i] for i in fc.in_spaces] == [
      frozenset({("a",)})] * 2 + [frozenset({("b",)})] * 2
  np.testing.assert_array_equal(fc.channel_map(), [0, 1, 0, 1])
  masks = {"fc": {"kernel": np.ones((4, 3))},
           "a": {"kernel": np.ones((3, 2))}, "b": {"kernel": np.ones((3, 2))}}
  masks["fc"]["kernel"][[1, 2]] = 0  # a's channel 1 and b's channel 0
  dead = models.dead_channels(s, masks)
  assert dead[("a",)].tolist() == [False, True]
  assert dead[("b",)].tolist() == [True, False]


def test_gated_model_has_the_same_structure():
  plain = models.analyze(models.create_model("cifar_resnet8"), 32)
  gated = models.analyze(models.create_model("cifar_resnet8", groups=2), 32)
  assert list(plain.layers) == list(gated.layers)
  assert [l.path for l in gated.taking_part] == [
      l.path for l in plain.taking_part]
