"""Name tables, reference-format state dicts, torchvision-layout imports."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import models
from models import paths
from convert import cli, dsp, dsp_torch, reference, tables
from convert import writer
from training import artifacts


def random_variables(model, seed: int):
  """Random tensors in the shapes of ``model``'s variables, random masks."""
  return artifacts.random_variables(model, seed, mask_density=0.7)


def assert_trees_equal(a, b):
  fa, fb = artifacts.flatten(a), artifacts.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


@pytest.fixture(scope="module")
def resnet8():
  model = models.create_model("cifar_resnet8", 10, groups=2)
  return model, random_variables(model, 0)


@pytest.mark.parametrize("stage", reference.STAGES)
def test_reference_state_dict_round_trips(tmp_path, resnet8, stage):
  model, v = resnet8
  nbt = {"bn_1": 7, "stage_2.0.downsample.1": 7}
  sd = reference.to_reference(v, stage, num_batches_tracked=nbt)
  assert list(sd)[:3] == ["conv_1_3x3.weight", "bn_1.weight", "bn_1.bias"]
  assert sd["stage_1.0.conv_a.weight"].shape == (4, 4, 3, 3)
  assert ("stage_1.0.conv_b.group" in sd) == (stage != "pretrained")
  assert ("stage_1.0.conv_b.mask" in sd) == (stage == "finetuned")
  assert "stage_2.0.downsample.0.group" not in sd
  if stage != "pretrained":
    assert sd["stage_3.0.conv_b.group"].shape == (2, 16)
  if stage == "finetuned":
    assert sd["stage_3.0.conv_b.mask"].shape == (16, 16, 1, 1)
  path = reference.save(tmp_path / "resnet8.pkl", sd, 91.25)
  sd2, acc = reference.read_state_dict(path)
  assert acc == 91.25 and reference.reference_stage(sd2) == stage
  # file -> ours -> file: same keys, order and tensors.
  v2 = reference.from_reference(sd2, artifacts.template(model))
  sd3 = reference.to_reference(v2, stage, num_batches_tracked=nbt)
  assert list(sd3) == list(sd)
  for k in sd:
    assert sd3[k].dtype == sd[k].dtype and torch.equal(sd3[k], sd[k]), k
  # ours -> file -> ours: every collection the stage carries.
  keep = {"pretrained": ("params", "batch_stats"),
          "group": ("params", "batch_stats", "gates"),
          "finetuned": ("params", "batch_stats", "gates")}[stage]
  assert_trees_equal({c: v[c] for c in keep}, {c: v2[c] for c in keep})
  if stage == "finetuned":
    for conv in tables.taking_part_convs(v, "cifar_resnet"):
      p = tuple(conv.split(".")) + ("kernel",)
      assert np.array_equal(paths.get(v2["masks"], p),
                            paths.get(v["masks"], p)), conv


def test_reference_dense_forward_matches_flax(resnet8):
  model, v = resnet8
  v = {k: v[k] for k in ("params", "batch_stats", "gates")}
  sd = reference.to_reference(v, "pretrained")
  x = writer.random_images(2)
  got = writer.torch_logits(lambda t: dsp_torch.dense_forward(sd, t), x)
  np.testing.assert_allclose(got, artifacts.logits(model, v, x), atol=1e-4)


def test_bad_state_dicts_name_the_key(tmp_path, resnet8):
  model, v = resnet8
  tmpl = artifacts.template(model)
  sd = reference.to_reference(v, "group")
  # (key, replacement or None to delete it, expected error); the error names
  # the key.
  cases = [("stage_2.0.bn_b.running_var", None, KeyError),
           ("classifier.weight", torch.zeros(3, 16), ValueError),
           ("stage_9.0.conv_a.weight", torch.zeros(1), KeyError),
           ("stage_1.0.conv_a.group", torch.zeros(3, 4), ValueError)]
  for key, value, error in cases:
    bad = dict(sd)
    if value is None:
      del bad[key]
    else:
      bad[key] = value
    with pytest.raises(error, match=re.escape(key)):
      reference.from_reference(bad, tmpl)
  torch.save({"a": 1}, tmp_path / "x.pt")
  with pytest.raises(ValueError, match="expected a state dict"):
    reference.read_state_dict(tmp_path / "x.pt")
  torch.save([sd, 1.0, 2.0], tmp_path / "y.pt")
  with pytest.raises(ValueError, match=r"expected \[state_dict, accuracy\]"):
    reference.read_state_dict(tmp_path / "y.pt")
  with pytest.raises(ValueError, match="no conversion table"):
    tables.to_torch(v, "mobilenet")
  torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "tv.pt")
  with pytest.raises(ValueError, match="pass --model NAME"):
    cli.import_file(tmp_path / "tv.pt", tmp_path / "out")


def test_cli_imports_reference_file_with_inferred_architecture(tmp_path,
                                                               resnet8):
  _, v = resnet8
  sd = reference.to_reference(v, "finetuned")
  reference.save(tmp_path / "resnet8_P0g2c0.50.pkl", sd, 90.0)
  info = cli.import_file(tmp_path / "resnet8_P0g2c0.50.pkl", tmp_path / "vars")
  assert info["model"] == "cifar_resnet8" and info["meta"]["accuracy"] == 90.0
  model, v2, spec = artifacts.load_variables(tmp_path / "vars")
  assert spec["overrides"]["groups"] == 2
  assert_trees_equal(v["gates"], v2["gates"])


class TorchVGG(nn.Module):
  """torchvision's VGG layout (features / avgpool / classifier), tiny."""

  def __init__(self, config, hidden, classes):
    super().__init__()
    feats, c = [], 3
    for v in config:
      if v == "M":
        feats.append(nn.MaxPool2d(2, 2))
      else:
        feats += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v),
                  nn.ReLU(True)]
        c = v
    self.features = nn.Sequential(*feats)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(c * 49, hidden), nn.ReLU(True), nn.Dropout(),
        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
        nn.Linear(hidden, classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_vgg_imagenet_head_permutes_flatten_rows():
  from models import vgg  # pylint: disable=import-outside-toplevel
  config = (4, "M", 6, "M")
  model = vgg.VGG(config=config, num_classes=5, head="imagenet", hidden=8,
                  image_size=32)
  v = random_variables(model, 1)
  v = {k: v[k] for k in ("params", "batch_stats")}
  sd = tables.to_torch(v, "vgg")
  assert sd["classifier.0.weight"].shape == (8, 6 * 49)
  net = TorchVGG(config, 8, 5).eval()
  net.load_state_dict({k: torch.from_numpy(np.array(a)) for k, a in sd.items()})
  x = writer.random_images(2)
  np.testing.assert_allclose(writer.torch_logits(net, x),
                             artifacts.logits(model, v, x), atol=1e-4)
  # torchvision state dict -> ours is the exact inverse.
  back = tables.from_torch(net.state_dict(), artifacts.template(model), "vgg")
  assert_trees_equal(back, v)


def test_torchvision_resnet_names_round_trip():
  model = models.create_model("cifar_resnet10_tiny", 10)
  v = random_variables(model, 2)
  v = {k: v[k] for k in ("params", "batch_stats")}
  sd = tables.to_torch(v, "resnet")
  for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv2.weight",
              "layer2.0.downsample.0.weight", "layer2.0.downsample.1.bias",
              "fc.weight", "fc.bias"):
    assert key in sd, key
  assert list(sd).index("layer1.0.bn2.weight") < list(sd).index(
      "layer2.0.conv1.weight") < list(sd).index("fc.weight")
  assert tables.taking_part_convs(v, "resnet")[0] == "layer1.0.conv1"
  back = tables.from_torch({k: torch.from_numpy(np.array(a))
                            for k, a in sd.items()},
                           artifacts.template(model), "resnet")
  assert_trees_equal(back, v)


def test_layout_functions_are_inverse():
  rng = np.random.default_rng(0)
  k = rng.normal(size=(3, 3, 5, 7))
  assert np.array_equal(tables.oihw_to_hwio(tables.hwio_to_oihw(k)), k)
  m = rng.random((5, 7))
  assert np.array_equal(tables.oi11_to_io_mask(tables.io_mask_to_oi11(m)), m)
  d = rng.normal(size=(2 * 2 * 3, 4))
  assert np.array_equal(tables.nchw_rows_to_nhwc(
      tables.nhwc_rows_to_nchw(d, 3), 3), d)


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet10_tiny",
                                  "cifar_vgg_tiny", "resnet18", "vgg16_bn"])
def test_file_names_of_taking_part_convs_are_the_graphs(name):
  """The reference files name their taking-part convs per family; those
  names are exactly the traced graph's taking-part layers."""
  model = models.create_model(name, 10)
  size = getattr(model, "image_size", None) or 32
  family = models.model_spec(name).family
  named = tables.taking_part_convs(artifacts.template(model, size), family)
  graph = models.analyze(model, size)
  assert named == [".".join(l.path) for l in graph.taking_part]
