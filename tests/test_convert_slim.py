"""DDROP-pruned ResNets and VGG-bns slimmed and exported to PyTorch."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import models
from convert import cli, dsp, fast, formats, slim
from convert import writer
from convert.torch_zoo import SlimBlock, SlimLayerNorm
from training import artifacts
from ddrop_jax import pruning, selection
from ddrop_jax.config import DdropConfig
from models import resnet, vgg

ATOL = 1e-4


def ddrop_pruned(model, scope: str = "ddrop_layers", amount: float = 0.5,
                 seed: int = 0) -> dict:
  """Random weights, then DDROP pruning (random |gamma| ranks the units)."""
  v = artifacts.random_variables(model, seed)
  layers = selection.prune_layers(model, selection.ddrop_layers(model),
                                  scope == "all")
  out = pruning.prune(v, layers, DdropConfig(amount=amount))
  return artifacts.to_numpy_tree(out)


def images(model, n: int = 2) -> np.ndarray:
  return writer.random_images(n, getattr(model, "image_size", None) or 32, seed=1)


def assert_matches(model, variables, module) -> np.ndarray:
  x = images(model)
  want = artifacts.logits(model, variables, x)
  got = writer.torch_logits(module, x)
  assert np.max(np.abs(got - want)) <= ATOL
  assert np.max(np.abs(want)) > 1e-2  # the comparison is not vacuous
  return want


def test_resnet_tiny_export_all_files_index_add(tmp_path):
  model = models.create_model("cifar_resnet10_tiny")
  v = ddrop_pruned(model, scope="all")
  r = slim.export_ddrop(model, v, tmp_path, num_images=3)
  io = np.load(r.files[slim.REFERENCE_IO])
  np.testing.assert_allclose(io["logits"], artifacts.logits(model, v,
                                                           io["images"]),
                             atol=1e-6)
  x = io["images"]
  loaded = {
      "torchscript": torch.jit.load(str(tmp_path / slim.TORCHSCRIPT)),
      "program": torch.export.load(str(tmp_path / slim.PROGRAM)).module(),
  }
  module, summary = slim.slim(model, v)
  with torch.no_grad():
    for p in module.parameters():
      p.zero_()
  module.load_state_dict(torch.load(tmp_path / slim.STATE_DICT,
                                    weights_only=True))
  loaded["state_dict"] = module
  for name, m in loaded.items():
    diff = np.max(np.abs(writer.torch_logits(m, x) - io["logits"]))
    assert diff <= ATOL, name
  assert summary.params_after < summary.params_before
  assert r.details["summary"].params_after == summary.params_after
  # Block-last convs are slimmed and index-added; stem and shortcut keep width.
  assert summary.widths["layer1.0.conv2"] == (4, 2)
  assert summary.widths["conv1"] == (4, 4)
  assert summary.widths["layer2.0.downsample.0"] == (8, 8)
  block = module.layer1[0]
  assert isinstance(block, SlimBlock) and block.conv2.weight.shape[0] == 2
  zeroed = np.flatnonzero(v["masks"]["layer1"]["0"]["bn2"]["scale"] == 0)
  assert set(block.index.tolist()) == set(range(4)) - set(zeroed.tolist())


@pytest.mark.parametrize("amount", [0.5, 1.0])
def test_resnet_tiny_inner_units_removed(amount):
  model = models.create_model("cifar_resnet10_tiny")
  v = ddrop_pruned(model, amount=amount, seed=2)
  module, summary = slim.slim(model, v)
  assert_matches(model, v, module)
  assert summary.params_after < summary.params_before
  # Default scope: only the non-last BNs of the blocks are pruned.
  assert summary.widths["layer4.0.conv1"] == (16, int(16 * (1 - amount)))
  assert summary.widths["layer4.0.conv2"] == (16, 16)
  if amount == 1.0:  # every block's main branch reduces to a constant
    assert all(not b.pairs for b in (module.layer1[0], module.layer4[0]))


def test_vgg_tiny_export_and_layernorm_constants(tmp_path):
  model = models.create_model("cifar_vgg_tiny")
  v = ddrop_pruned(model)
  r = slim.export_ddrop(model, v, tmp_path, num_images=3)
  assert set(r.max_abs_diff) == {"module", slim.TORCHSCRIPT, slim.PROGRAM,
                                 slim.STATE_DICT, fast.FAST, fast.FAST_PROGRAM}
  x = np.load(r.files[slim.REFERENCE_IO])["images"]
  want = artifacts.logits(model, v, x)
  for m in (torch.jit.load(str(r.files[slim.TORCHSCRIPT])),
            torch.export.load(str(r.files[slim.PROGRAM])).module()):
    assert np.max(np.abs(writer.torch_logits(m, x) - want)) <= ATOL
  s = r.details["summary"]
  assert s.widths["classifier.0"] == (16, 8)
  assert s.widths["features.4"] == (8, 4)
  assert s.widths["classifier.8"] == (10, 10)
  assert s.params_after < s.params_before
  module, _ = slim.slim(model, v)
  ln = module.classifier[1]
  assert isinstance(ln, SlimLayerNorm) and ln.width == 16
  assert ln.removed.shape == (8,)


def test_vgg_layernorm_unit_with_live_row_keeps_width():
  # A LayerNorm unit masked while its Linear row is intact: its pre-norm
  # value varies with the input and enters the statistics, so it must stay.
  model = models.create_model("cifar_vgg_tiny")
  v = artifacts.random_variables(model, 3)
  v["masks"] = models.full_masks(models.analyze(model), v["params"])
  scale = np.array(v["masks"]["classifier"]["1"]["scale"])
  scale[:8] = 0
  v["masks"]["classifier"]["1"]["scale"] = scale
  module, summary = slim.slim(model, v)
  assert summary.widths["classifier.0"] == (16, 16)
  assert_matches(model, v, module)


def test_slim_layernorm_equals_full_width_layernorm():
  torch.manual_seed(0)
  x, const = torch.randn(3, 5), torch.randn(4)
  w, b = torch.randn(5), torch.randn(5)
  full = torch.nn.functional.layer_norm(
      torch.cat([x, const.expand(3, 4)], 1), (9,),
      torch.cat([w, torch.zeros(4)]), torch.cat([b, torch.zeros(4)]), 1e-5)
  got = SlimLayerNorm(w, b, 9, const)(x)
  torch.testing.assert_close(got, full[:, :5], atol=1e-6, rtol=1e-6)
  plain = torch.nn.functional.layer_norm(x, (5,), w, b, 1e-5)
  assert (got - plain).abs().max() > 1e-2  # dropping units would be wrong
  with pytest.raises(ValueError, match="width"):
    SlimLayerNorm(w, b, 8, const)


def test_imagenet_vgg_head_nchw_flatten():
  model = vgg.VGG(config=(4, "M", 8, "M"), num_classes=5, head="imagenet",
                  hidden=12, pool_size=2, image_size=16)
  v = ddrop_pruned(model, seed=4)
  module, summary = slim.slim(model, v)
  assert_matches(model, v, module)
  # classifier.0 reads the kept channels of features.4 x 2 x 2 positions.
  assert summary.widths["features.4"] == (8, 4)
  assert module.classifier[0].weight.shape == (6, 4 * 4)
  assert summary.params_after < summary.params_before


@pytest.mark.parametrize("name", ["cifar_resnet18", "cifar_vgg11_bn"])
def test_reference_models_slim_exactly(name):
  model = models.create_model(name)
  v = ddrop_pruned(model)
  module, summary = slim.slim(model, v)
  assert_matches(model, v, module)
  assert summary.params_after < summary.params_before
  removed = [n for n, (a, b) in summary.widths.items() if b < a]
  if name == "cifar_resnet18":
    assert summary.widths["layer1.0.conv1"] == (8, 4)
    assert all(n.endswith("conv1") for n in removed)
  else:
    assert summary.widths["features.0"] == (64, 32)
    assert summary.widths["classifier.4"] == (512, 256)


def test_unsupported_family_is_a_clear_error():
  model = models.create_model("cifar_resnet8")
  v = artifacts.random_variables(model, 0)
  with pytest.raises(ValueError, match="resnet, vgg.*convert.dsp"):
    slim.slim(model, v)
  with pytest.raises(ValueError, match="batch_stats"):
    slim.slim(models.create_model("cifar_vgg_tiny"),
              {"params": v["params"]})


def test_bottleneck_with_imagenet_stem():
  # Three-conv main branches, a max-pooled 7x7 stem, scope 'all'.
  model = resnet.ResNet(block="bottleneck", stage_sizes=(1, 1), stem="imagenet",
                        widths=(2, 4), num_classes=5, image_size=32)
  v = ddrop_pruned(model, scope="all", seed=5)
  module, summary = slim.slim(model, v)
  assert_matches(model, v, module)
  assert summary.widths["layer2.0.conv1"] == (4, 2)
  assert summary.widths["layer2.0.conv2"] == (4, 2)
  assert summary.widths["layer2.0.conv3"] == (16, 8)
  assert summary.widths["layer2.0.downsample.0"] == (16, 16)
  assert module.layer2[0].conv2.weight.shape == (2, 2, 3, 3)
  assert summary.params_after < summary.params_before


def test_command_line_exports_a_variables_directory(tmp_path, capsys):
  model = models.create_model("cifar_vgg_tiny")
  v = ddrop_pruned(model, seed=6)
  artifacts.save_variables(tmp_path / "vars", "cifar_vgg_tiny", 10, {}, v)
  # ``python -m convert export`` picks slimming for the vgg family.
  assert formats.applicable(model, v)[0] == "slim"
  assert cli.main(["export", str(tmp_path / "vars"), "--out",
                   str(tmp_path / "out"), "--no-program", "--format",
                   "slim"]) == 0
  out = capsys.readouterr().out
  assert "slim.pt" in out and "cifar_vgg_tiny: parameters" in out
  assert (tmp_path / "out" / slim.STATE_DICT).is_file()
  assert not (tmp_path / "out" / slim.PROGRAM).exists()
  ts = torch.jit.load(str(tmp_path / "out" / slim.TORCHSCRIPT))
  x = images(model)
  assert np.max(np.abs(writer.torch_logits(ts, x) -
                       artifacts.logits(model, v, x))) <= ATOL
  # The wrong format for the family, or --stage with slim: exit 2, named.
  assert cli.main(["export", str(tmp_path / "vars"), "--out",
                   str(tmp_path / "o1"), "--format", "packed"]) == 2
  assert "packed export does not apply to this vgg model" in (
      capsys.readouterr().err)
  assert cli.main(["export", str(tmp_path / "vars"), "--out",
                   str(tmp_path / "o1"), "--stage", "finetuned"]) == 2
  assert "--stage" in capsys.readouterr().err
  assert not (tmp_path / "o1").exists()
  assert cli.main(["export", str(tmp_path / "missing"), "--out",
                   str(tmp_path / "o2")]) == 2
  assert "not a converted-variables directory" in capsys.readouterr().err


def test_command_line_subprocess_slims_a_resnet(tmp_path):
  model = models.create_model("cifar_resnet10_tiny")
  v = ddrop_pruned(model, scope="all", seed=8)
  artifacts.save_variables(tmp_path / "vars", "cifar_resnet10_tiny", 10, {}, v)
  root = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run(
      [sys.executable, "-m", "convert", "export", str(tmp_path / "vars"),
       "--out", str(tmp_path / "out"), "--format", "slim", "--no-program"],
      cwd=root, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "cifar_resnet10_tiny: parameters" in proc.stdout
  io = np.load(tmp_path / "out" / slim.REFERENCE_IO)
  ts = torch.jit.load(str(tmp_path / "out" / slim.TORCHSCRIPT))
  assert np.max(np.abs(writer.torch_logits(ts, io["images"]) -
                       artifacts.logits(model, v, io["images"]))) <= ATOL


def test_vgg_layer_without_units_is_a_clear_error():
  model = models.create_model("cifar_vgg_tiny")
  v = ddrop_pruned(model, amount=1.0, seed=7)
  with pytest.raises(ValueError, match="features.0 keeps none of its 4 units"):
    slim.slim(model, v)
