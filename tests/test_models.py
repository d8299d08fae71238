"""Model zoo: parameter counts, masks, gates, input checks, PyTorch parity.

Parameter counts are checked against PyTorch modules written here (built on
the ``meta`` device, so nothing big is allocated) and against published
figures. Big models are only traced with ``jax.eval_shape``; numerical checks
use the tiny variants.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch import nn as tnn
from torch.nn import functional as F

import models
from models import resnet, vgg

# ---------------------------------------------------------------------------
# PyTorch reference modules (independent of the Flax code).
# ---------------------------------------------------------------------------


def _tconv(cin: int, cout: int, k: int, stride: int = 1, bias: bool = False):
  return tnn.Conv2d(cin, cout, k, stride, k // 2, bias=bias)


def _tshortcut(cin: int, cout: int, stride: int) -> tnn.Module | None:
  if stride == 1 and cin == cout:
    return None
  return tnn.Sequential(_tconv(cin, cout, 1, stride), tnn.BatchNorm2d(cout))


class TorchDspBlock(tnn.Module):
  """The DSP reference's CIFAR basic block (option-B shortcut)."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv_a = _tconv(cin, cout, 3, stride)
    self.bn_a = tnn.BatchNorm2d(cout)
    self.conv_b = _tconv(cout, cout, 3)
    self.bn_b = tnn.BatchNorm2d(cout)
    self.downsample = _tshortcut(cin, cout, stride)

  def forward(self, x):
    y = self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))
    return F.relu((self.downsample(x) if self.downsample else x) + y)


class TorchDspResNet(tnn.Module):
  """The DSP reference's CifarResNet of depth 6n+2."""

  def __init__(self, depth: int, num_classes: int = 10,
               widths=(16, 32, 64)):
    super().__init__()
    n = (depth - 2) // 6
    self.conv_1_3x3 = _tconv(3, widths[0], 3)
    self.bn_1 = tnn.BatchNorm2d(widths[0])
    cin = widths[0]
    for s, w in enumerate(widths):
      blocks = []
      for b in range(n):
        blocks.append(TorchDspBlock(cin, w, 2 if s and b == 0 else 1))
        cin = w
      setattr(self, f"stage_{s + 1}", tnn.Sequential(*blocks))
    self.classifier = tnn.Linear(cin, num_classes)
    self.num_stages = len(widths)

  def forward(self, x):
    x = F.relu(self.bn_1(self.conv_1_3x3(x)))
    for s in range(self.num_stages):
      x = getattr(self, f"stage_{s + 1}")(x)
    return self.classifier(x.mean((2, 3)))


class TorchBasicBlock(tnn.Module):
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = _tconv(cin, planes, 3, stride)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = _tconv(planes, planes, 3)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.downsample = _tshortcut(cin, planes, stride)

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu((self.downsample(x) if self.downsample else x) + y)


class TorchBottleneck(tnn.Module):
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = _tconv(cin, planes, 1)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = _tconv(planes, planes, 3, stride)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.conv3 = _tconv(planes, planes * 4, 1)
    self.bn3 = tnn.BatchNorm2d(planes * 4)
    self.downsample = _tshortcut(cin, planes * 4, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu((self.downsample(x) if self.downsample else x) + y)


class TorchResNet(tnn.Module):
  """torchvision's ResNet (v1.5) with an ImageNet or a CIFAR stem."""

  def __init__(self, block, stage_sizes, widths, stem: str,
               num_classes: int):
    super().__init__()
    if stem == "imagenet":
      self.conv1 = tnn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
      self.maxpool = tnn.MaxPool2d(3, 2, 1)
    else:
      self.conv1 = tnn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
      self.maxpool = tnn.Identity()
    self.bn1 = tnn.BatchNorm2d(widths[0])
    cin = widths[0]
    for s, (planes, n) in enumerate(zip(widths, stage_sizes)):
      blocks = []
      for b in range(n):
        blocks.append(block(cin, planes, 2 if s and b == 0 else 1))
        cin = planes * block.expansion
      setattr(self, f"layer{s + 1}", tnn.Sequential(*blocks))
    self.fc = tnn.Linear(cin, num_classes)
    self.num_stages = len(widths)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    for s in range(self.num_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    return self.fc(x.mean((2, 3)))


class TorchVGG(tnn.Module):
  """torchvision's ``vgg*_bn`` (imagenet head) or the DDROP CIFAR VGG."""

  def __init__(self, config, head: str, num_classes: int, hidden: int,
               dropout: float = 0.5, pool: int = 7):
    super().__init__()
    feats, cin = [], 3
    for v in config:
      if v == "M":
        feats.append(tnn.MaxPool2d(2, 2))
      else:
        feats += [tnn.Conv2d(cin, v, 3, padding=1), tnn.BatchNorm2d(v),
                  tnn.ReLU()]
        cin = v
    self.features = tnn.Sequential(*feats)
    if head == "imagenet":
      self.avgpool = tnn.AdaptiveAvgPool2d(pool)
      self.classifier = tnn.Sequential(
          tnn.Linear(cin * pool * pool, hidden), tnn.ReLU(),
          tnn.Dropout(dropout), tnn.Linear(hidden, hidden), tnn.ReLU(),
          tnn.Dropout(dropout), tnn.Linear(hidden, num_classes))
    else:
      self.avgpool = tnn.AdaptiveAvgPool2d(1)
      self.classifier = tnn.Sequential(
          tnn.Linear(cin, hidden), tnn.LayerNorm(hidden), tnn.ReLU(),
          tnn.Dropout(dropout), tnn.Linear(hidden, hidden),
          tnn.LayerNorm(hidden), tnn.ReLU(), tnn.Dropout(dropout),
          tnn.Linear(hidden, num_classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _torch_count(build) -> int:
  with torch.device("meta"):
    module = build()
  return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _abstract_variables(model, size: int, batch: int = 1):
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep=".")


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# The CNNs (the transformers: tests/test_transformers.py).
CNN_FAMILIES = ("cifar_resnet", "resnet", "vgg")
TINY = [n for n in models.list_models() if models.model_spec(n).tiny
        and models.model_spec(n).family in CNN_FAMILIES]


def _random_variables(model, x, seed: int = 0) -> dict:
  """Variables of ``model`` filled with numpy draws.

  Kernels are He-scaled normals, norm scales/biases and running statistics
  non-trivial, masks ones. numpy instead of ``model.init`` keeps the tests
  free of XLA compilations of the initialisers (seconds each on CPU).
  """
  rng = np.random.default_rng(seed)
  abstract = _abstract_variables(model, x.shape[1], x.shape[0])
  out = {}
  for col, tree in abstract.items():
    flat = _flat(tree)
    for path, leaf in sorted(flat.items()):
      shape, last = leaf.shape, path.rsplit(".", 1)[1]
      if col == "params" and last == "kernel":
        value = rng.standard_normal(shape) * math.sqrt(
            2.0 / math.prod(shape[:-1]))
      elif last in ("bias", "mean"):
        value = 0.1 * rng.standard_normal(shape)
      elif (col == "params" and last == "scale") or last == "var":
        value = 0.5 + rng.uniform(size=shape)
      else:  # masks
        value = np.ones(shape)
      flat[path] = jnp.asarray(value, leaf.dtype)
    out[col] = traverse_util.unflatten_dict(flat, sep=".")
  return out


def _images(batch: int, size: int, seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(
      (batch, size, size, 3)), jnp.float32)


def _tiny_setup(name: str, batch: int = 2):
  """A tiny registered model, random variables and an input batch."""
  # Dropout off: train-mode outputs then depend on the masks only.
  overrides = {"dropout_rate": 0.0} if models.model_spec(
      name).family == "vgg" else {}
  model = models.create_model(name, 10, **overrides)
  x = _images(batch, models.model_spec(name).image_size)
  return model, _random_variables(model, x), x


def _apply(model, variables, x, train: bool):
  if train:
    y, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(3)})
    return np.asarray(y)
  return np.asarray(model.apply(variables, x, train=False))


def _without(variables: dict, *cols: str) -> dict:
  return {k: v for k, v in variables.items() if k not in cols}


# ---------------------------------------------------------------------------
# Parameter counts.
# ---------------------------------------------------------------------------

# (registry name, num_classes, torch builder, published figure or None).
# Published figures: ResNet-20/56 with option-B shortcuts as in the DSP
# reference; torchvision's model cards (num_params) for the ImageNet models.
COUNT_CASES = [
    ("cifar_resnet20", 10, lambda: TorchDspResNet(20, 10), 272_474),
    ("cifar_resnet56", 10, lambda: TorchDspResNet(56, 10), 855_770),
    ("resnet18", 1000, lambda: TorchResNet(
        TorchBasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), "imagenet", 1000),
     11_689_512),
    ("resnet34", 1000, lambda: TorchResNet(
        TorchBasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet", 1000),
     21_797_672),
    ("resnet50", 1000, lambda: TorchResNet(
        TorchBottleneck, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet", 1000),
     25_557_032),
    ("vgg11_bn", 1000, lambda: TorchVGG(vgg.CONFIGS[11], "imagenet", 1000,
                                        4096), 132_868_840),
    ("vgg16_bn", 1000, lambda: TorchVGG(vgg.CONFIGS[16], "imagenet", 1000,
                                        4096), 138_365_992),
    ("vgg19_bn", 1000, lambda: TorchVGG(vgg.CONFIGS[19], "imagenet", 1000,
                                        4096), 143_678_248),
    ("cifar_resnet18", 10, lambda: TorchResNet(
        TorchBasicBlock, (2, 2, 2, 2), (8, 16, 32, 64), "cifar", 10), None),
    ("cifar_resnet50", 100, lambda: TorchResNet(
        TorchBottleneck, (3, 4, 6, 3), (8, 16, 32, 64), "cifar", 100), None),
    ("cifar_vgg16_bn", 100, lambda: TorchVGG(vgg.CONFIGS[16], "cifar", 100,
                                             512), None),
]


@pytest.mark.parametrize("name,num_classes,build,published", COUNT_CASES,
                         ids=[c[0] for c in COUNT_CASES])
def test_param_count_matches_pytorch(name, num_classes, build, published):
  spec = models.model_spec(name)
  variables = _abstract_variables(models.create_model(name, num_classes),
                                  spec.image_size)
  count = _count(variables["params"])
  assert count == _torch_count(build)
  if published is not None:
    assert count == published


def test_cifar_resnet_factor_scales_widths():
  model = models.create_model("cifar_resnet18", 100, factor=2)
  params = _flat(_abstract_variables(model, 32)["params"])
  assert params["conv1.kernel"].shape == (3, 3, 3, 16)
  assert params["layer4.1.conv2.kernel"].shape == (3, 3, 128, 128)
  assert params["fc.kernel"].shape == (128, 100)
  assert _count(params) == _torch_count(lambda: TorchResNet(
      TorchBasicBlock, (2, 2, 2, 2), (16, 32, 64, 128), "cifar", 100))


# ---------------------------------------------------------------------------
# Structure of every registered model (traced only).
# ---------------------------------------------------------------------------


def _taking_part(params: dict) -> set[str]:
  """DSP's rule, independently: every conv but the stem and shortcut convs.

  The stem is the only conv reading the 3-channel image.
  """
  return {p[:-len(".kernel")] for p, v in params.items()
          if p.endswith(".kernel") and len(v.shape) == 4 and v.shape[2] != 3
          and ".downsample." not in p}


# Gated convs of a few models, counted by hand: 2 per basic block, 3 per
# bottleneck, every VGG conv but the first.
GATED_CONVS = {"cifar_resnet20": 18, "resnet18": 16, "resnet50": 48,
               "vgg16_bn": 12, "cifar_vgg11_bn": 7}


@pytest.mark.parametrize("name", [
    n for n in models.list_models()
    if models.model_spec(n).family in CNN_FAMILIES])
def test_registered_model_structure(name):
  spec = models.model_spec(name)
  assert spec.family in ("cifar_resnet", "resnet", "vgg")
  size = spec.image_size

  def init_and_apply(model):
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                           train=False)
    return variables, model.apply(variables, jnp.zeros((2, size, size, 3)),
                                  train=False)

  model = models.create_model(name, 7)
  variables, out = jax.eval_shape(lambda: init_and_apply(model))
  assert out.shape == (2, 7)
  assert "gates" not in variables
  params, masks = _flat(variables["params"]), _flat(variables["masks"])
  # One (in, out) mask per conv/dense kernel, one (C,) mask per norm scale.
  want = {}
  for p, v in params.items():
    if p.endswith(".kernel"):
      want[p] = v.shape[-2:]
    elif p.endswith(".scale"):
      want[p] = v.shape
  assert {p: v.shape for p, v in masks.items()} == want

  model = models.create_model(name, 7, groups=2)
  grouped, out = jax.eval_shape(lambda: init_and_apply(model))
  assert out.shape == (2, 7)
  gates = _flat(grouped["gates"])
  assert {p[:-len(".logits")] for p in gates} == _taking_part(params)
  for p, v in gates.items():
    assert v.shape == (2, params[p[:-len(".logits")] + ".kernel"].shape[-1])
  assert _count(grouped["params"]) == _count(variables["params"])
  if name in GATED_CONVS:
    assert len(gates) == GATED_CONVS[name]


@pytest.mark.parametrize("name", TINY)
def test_param_dtype_reaches_every_variable(name):
  model = models.create_model(name, 10, groups=2, param_dtype=jnp.bfloat16)
  variables = _abstract_variables(model, models.model_spec(name).image_size)
  assert set(variables) == {"params", "batch_stats", "masks", "gates"}
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_resnet_paths_follow_torchvision_names():
  params = _flat(_abstract_variables(models.create_model("resnet50", 10),
                                     224)["params"])
  for path in ("conv1.kernel", "bn1.scale", "layer1.0.conv3.kernel",
               "layer1.0.downsample.0.kernel", "layer2.0.downsample.1.bias",
               "layer4.2.bn3.scale", "fc.kernel", "fc.bias"):
    assert path in params
  # torchvision v1.5: the stride sits on the 3x3 conv of a Bottleneck.
  assert params["layer2.0.conv2.kernel"].shape == (3, 3, 128, 128)


def test_vgg_paths_follow_torchvision_indices():
  params = _flat(_abstract_variables(models.create_model("vgg16_bn", 10),
                                     224)["params"])
  convs = sorted(int(p.split(".")[1]) for p in params
                 if p.startswith("features.") and p.endswith(".kernel"))
  assert convs == [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
  assert "features.41.scale" in params
  assert params["classifier.0.kernel"].shape == (25088, 4096)
  assert params["classifier.6.kernel"].shape == (4096, 10)
  cifar = _flat(_abstract_variables(models.create_model("cifar_vgg16_bn", 10),
                                    32)["params"])
  assert sorted({p.rsplit(".", 1)[0] for p in cifar
                 if p.startswith("classifier.")}) == [
                     "classifier.0", "classifier.1", "classifier.4",
                     "classifier.5", "classifier.8"]
  assert cifar["classifier.1.scale"].shape == (512,)


# ---------------------------------------------------------------------------
# Mask semantics (tiny models, real numbers).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", TINY)
def test_all_ones_masks_are_bit_identical(name, train):
  model, variables, x = _tiny_setup(name)
  with_masks = _apply(model, variables, x, train)
  without = _apply(model, _without(variables, "masks"), x, train)
  assert np.array_equal(with_masks, without)


def _set(tree: dict, path: str, value) -> dict:
  flat = _flat(tree)
  flat[path] = value
  return traverse_util.unflatten_dict(flat, sep=".")


@pytest.mark.parametrize("name", TINY)
def test_kernel_mask_entry_equals_zeroed_kernel_slice(name):
  model, variables, x = _tiny_setup(name)
  params = _flat(variables["params"])
  kernels = sorted(p for p in params if p.endswith(".kernel"))
  rng = np.random.default_rng(0)
  for path in (kernels[0], kernels[len(kernels) // 2], kernels[-1]):
    kernel = params[path]
    i, o = rng.integers(kernel.shape[-2]), rng.integers(kernel.shape[-1])
    mask = _flat(variables["masks"])[path].at[i, o].set(0.0)
    masked = dict(variables, masks=_set(variables["masks"], path, mask))
    zeroed = dict(variables,
                  params=_set(variables["params"], path,
                              kernel.at[..., i, o].set(0.0)))
    a = _apply(model, masked, x, False)
    b = _apply(model, zeroed, x, False)
    assert np.array_equal(a, b), path
    assert not np.array_equal(a, _apply(model, variables, x, False)), path


@pytest.mark.parametrize("name", TINY)
def test_norm_mask_entry_equals_zeroed_scale_and_bias(name):
  model, variables, x = _tiny_setup(name)
  scales = sorted(p for p in _flat(variables["params"]) if p.endswith(".scale"))
  for path in (scales[1], scales[-1]):
    prefix = path[:-len(".scale")]
    c = _flat(variables["params"])[path].shape[0] // 2
    # A large bias keeps the unit active after the ReLU, so removing it shows.
    bias = _flat(variables["params"])[prefix + ".bias"].at[c].set(3.0)
    variables = dict(variables,
                     params=_set(variables["params"], prefix + ".bias", bias))
    params = _flat(variables["params"])
    mask = _flat(variables["masks"])[path].at[c].set(0.0)
    masked = dict(variables, masks=_set(variables["masks"], path, mask))
    p = _set(variables["params"], path, params[path].at[c].set(0.0))
    p = _set(p, prefix + ".bias", params[prefix + ".bias"].at[c].set(0.0))
    zeroed = dict(variables, params=p)
    for train in (False, True):
      a = _apply(model, masked, x, train)
      assert np.array_equal(a, _apply(model, zeroed, x, train)), path
      assert not np.array_equal(a, _apply(model, variables, x, train)), path


def test_ddrop_acts_on_hidden_dense_but_not_on_logits():
  model = models.create_model("cifar_vgg_tiny", 10, dropout_rate=0.0)
  x = _images(2, 32)
  variables = _random_variables(model, x)
  variables["params"] = traverse_util.unflatten_dict(
      {p: v if p.endswith(("kernel", "scale")) else jnp.zeros_like(v)
       for p, v in _flat(variables["params"]).items()}, sep=".")
  base = _apply(model, variables, x, True)
  rngs = {"ddrop": jax.random.key(5), "dropout": jax.random.key(3)}

  def run(layer: str, width: int):
    v = dict(variables, ddrop={"classifier": {layer: {"keep": jnp.zeros(
        (width,))}}})
    y, _ = model.apply(v, x, train=True, mutable=["batch_stats"], rngs=rngs)
    return np.asarray(y)

  # The output Linear is never a DDROP layer. Hidden Linear with keep 0: the
  # head sees zeros, so logits collapse to what zero features give (all
  # biases are 0).
  import ddrop_jax  # pylint: disable=import-outside-toplevel
  assert ("classifier", "8") not in {l.path for l in ddrop_jax.ddrop_layers(
      model)}
  assert not np.array_equal(run("0", 16), base)
  assert np.array_equal(run("0", 16), np.zeros_like(base))


def test_vgg_dropout_uses_dropout_rng():
  model = models.create_model("cifar_vgg_tiny", 10)
  x = _images(2, 32)
  variables = _random_variables(model, x)

  def train(seed):
    y, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(seed)})
    return np.asarray(y)

  assert np.array_equal(train(0), train(0))
  assert not np.array_equal(train(0), train(1))
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True, mutable=["batch_stats"])


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match="valid names") as e:
    models.create_model("resnet19")
  for name in ("resnet18", "cifar_vgg_tiny", "vgg19_bn", "cifar_resnet50"):
    assert name in str(e.value)


@pytest.mark.parametrize("name,shape,expected", [
    ("resnet18", (1, 32, 32, 3), "(batch, 224, 224, 3)"),
    ("vgg11_bn", (224, 224, 3), "(batch, 224, 224, 3)"),
    ("cifar_resnet10_tiny", (1, 32, 32, 1), "(batch, 32, 32, 3)"),
    ("cifar_vgg_tiny", (1, 3, 32, 32), "(batch, 32, 32, 3)"),
])
def test_wrong_input_shape_names_expected_shape(name, shape, expected):
  model = models.create_model(name, 10)
  with pytest.raises(ValueError) as e:
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape),
                                      train=False))
  assert expected in str(e.value)
  assert str(shape) in str(e.value)


def test_vgg_input_too_small_for_pools():
  model = vgg.vgg(11, 10, image_size=None)
  with pytest.raises(ValueError, match=">= 32"):
    jax.eval_shape(lambda: model.init(jax.random.key(0),
                                      jnp.zeros((1, 16, 16, 3)), train=False))


@pytest.mark.parametrize("name,groups,layer", [
    ("cifar_resnet10_tiny", 5, "layer1.0.conv1"),
    ("cifar_vgg_tiny", 9, "features.4"),
    ("cifar_resnet8", 5, "stage_1.0.conv_a"),
])
def test_groups_larger_than_filters_names_layer(name, groups, layer):
  model = models.create_model(name, 10, groups=groups)
  with pytest.raises(ValueError, match="groups") as e:
    jax.eval_shape(lambda: model.init(jax.random.key(0),
                                      jnp.zeros((1, 32, 32, 3)), train=False))
  assert layer in str(e.value)


@pytest.mark.parametrize("groups", [0, -1, 2.5])
def test_groups_below_one_rejected(groups):
  with pytest.raises(ValueError, match="groups"):
    models.create_model("cifar_resnet10_tiny", 10, groups=groups)


def test_bad_stem_head_and_depth_list_choices():
  x = jnp.zeros((1, 32, 32, 3))
  for module, pattern in ((resnet.ResNet(stem="tiny"), "imagenet"),
                          (resnet.ResNet(block="wide"), "bottleneck"),
                          (vgg.VGG(head="mlp"), "cifar")):
    with pytest.raises(ValueError, match=pattern):
      jax.eval_shape(lambda m=module: m.init(jax.random.key(0), x,
                                             train=False))
  with pytest.raises(ValueError, match=r"\[18, 34, 50\]"):
    resnet.resnet(101)
  with pytest.raises(ValueError, match=r"\[11, 13, 16, 19\]"):
    vgg.vgg(8)


# ---------------------------------------------------------------------------
# Numerical parity with PyTorch (validates the layers' numerics).
# ---------------------------------------------------------------------------


def test_adaptive_pool_matches_torch():
  rng = np.random.default_rng(0)
  for h, w in ((10, 10), (5, 9), (14, 7), (7, 7), (13, 3)):
    x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
    want = F.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 7)
    got = vgg.adaptive_avg_pool(jnp.asarray(x), 7)
    np.testing.assert_allclose(np.asarray(got),
                               want.permute(0, 2, 3, 1).numpy(), rtol=1e-6,
                               atol=1e-6)


def _to_torch_state(variables: dict, module: tnn.Module,
                    chw_inputs: dict[str, tuple[int, int, int]]) -> dict:
  """Flax variables -> the torch module's state dict, by path name.

  Args:
    variables: Flax ``params`` and ``batch_stats``.
    module: the torch module whose keys are filled.
    chw_inputs: Linear layers fed by a flatten of a (C, H, W) map; their
      rows are in (H, W, C) order in Flax.

  Returns:
    The state dict; every Flax variable must have been used exactly once.
  """
  params = _flat(variables["params"])
  stats = _flat(variables.get("batch_stats", {}))
  used, state = set(), {}
  for key, ref in module.state_dict().items():
    prefix, leaf = key.rsplit(".", 1)
    if leaf == "num_batches_tracked":
      state[key] = ref
      continue
    if leaf in ("running_mean", "running_var"):
      path = f"{prefix}.{'mean' if leaf == 'running_mean' else 'var'}"
      value = np.array(stats[path])
      used.add(("batch_stats", path))
    else:
      if leaf == "weight":
        path = (f"{prefix}.kernel" if f"{prefix}.kernel" in params
                else f"{prefix}.scale")
      else:
        path = f"{prefix}.bias"
      value = np.array(params[path])
      used.add(("params", path))
      if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
      elif value.ndim == 2 and prefix in chw_inputs:
        c, h, w = chw_inputs[prefix]
        value = value.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(
            -1, c * h * w)
      elif value.ndim == 2:
        value = value.T
    assert tuple(value.shape) == tuple(ref.shape), key
    state[key] = torch.from_numpy(np.array(value))
  everything = ({("params", p) for p in params}
                | {("batch_stats", p) for p in stats})
  assert used == everything
  return state


PARITY_CASES = {
    "cifar_resnet8": (lambda: models.create_model("cifar_resnet8", 10),
                      lambda: TorchDspResNet(8, 10, (4, 8, 16)), 32, {}),
    "cifar_resnet10_tiny": (
        lambda: models.create_model("cifar_resnet10_tiny", 10),
        lambda: TorchResNet(TorchBasicBlock, (1, 1, 1, 1), (4, 8, 8, 16),
                            "cifar", 10), 32, {}),
    # Odd input size: exercises the stem's padding and the max-pool's floor.
    "imagenet_stem_bottleneck": (
        lambda: resnet.ResNet(block="bottleneck", stage_sizes=(1, 2),
                              widths=(4, 8), stem="imagenet", num_classes=10),
        lambda: TorchResNet(TorchBottleneck, (1, 2), (4, 8), "imagenet", 10),
        37, {}),
    "cifar_vgg_tiny": (
        lambda: models.create_model("cifar_vgg_tiny", 10, dropout_rate=0.0),
        lambda: TorchVGG((4, "M", 8, 8, "M", 16, "M"), "cifar", 10, 16, 0.0),
        32, {}),
    # 40 -> 10x10 features -> overlapping 7x7 adaptive-pool bins.
    "imagenet_head_vgg": (
        lambda: vgg.VGG(config=(4, "M", 8, "M"), head="imagenet", hidden=16,
                        num_classes=10, dropout_rate=0.0),
        lambda: TorchVGG((4, "M", 8, "M"), "imagenet", 10, 16, 0.0),
        40, {"classifier.0": (8, 7, 7)}),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_forward_matches_pytorch(case):
  build, build_torch, size, chw = PARITY_CASES[case]
  model, tmodel = build(), build_torch()
  x = _images(4, size)
  variables = _random_variables(model, x)
  tmodel.load_state_dict(_to_torch_state(variables, tmodel, chw))
  tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()

  tmodel.eval()
  with torch.no_grad():
    want = tmodel(tx).numpy()
  got = model.apply(_without(variables, "masks"), x, train=False)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)

  tmodel.train()
  with torch.no_grad():
    want = tmodel(tx).numpy()
  got, updated = model.apply(variables, x, train=True,
                             mutable=["batch_stats"],
                             rngs={"dropout": jax.random.key(2)})
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  # Updated running statistics, incl. torch's unbiased running variance.
  new_state = _to_torch_state(dict(variables, **updated), tmodel, chw)
  for key, value in tmodel.state_dict().items():
    if "running" in key:
      np.testing.assert_allclose(new_state[key].numpy(), value.numpy(),
                                 rtol=1e-5, atol=1e-6, err_msg=key)
