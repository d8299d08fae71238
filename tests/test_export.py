"""Any pruned model exports: one description, a compact JAX function, files.

For the plain-Flax models (tests/plain_models.py) and every registry family,
DSP-pruned and DDROP-pruned: the compact JAX function and its torch module
reproduce the masked model's logits with fewer parameters, and the
description's MACs are ``flops.report``'s. Files (TorchScript, ``.pt2``,
state dict, ONNX) are written for a few of them; a corrupted description,
an operation the export cannot translate and an unwritable directory are
errors that leave nothing behind.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import pytest
import torch
from flax import linen as nn

import convert
import ddrop_jax as dd
import dsp_jax
import models
from convert import description as desc_lib
from convert import program as program_lib
from convert import torch_program, writer
from ddrop_jax.config import DdropConfig
from dsp_jax import pruning as pr
from models import flops, paths
from tests import plain_models as pm
from training import artifacts

PLAIN = {
    "plain_resnet": pm.ResNetTiny,
    "plain_bottleneck": pm.BottleneckTiny,
    "plain_mobilenet": pm.MobileNetV2,
    "plain_convnext": pm.ConvNeXt,
    "plain_densenet": pm.DenseNet,
}
REGISTRY = ("cifar_resnet8", "cifar_resnet10_tiny", "cifar_vgg_tiny",
            "vit_tiny", "swin_tiny")


def _model(name: str):
  if name in PLAIN:
    return models.prunable(PLAIN[name]()), (16, 16, 3)
  extra = {"mlp_scale": True} if name in ("vit_tiny", "swin_tiny") else {}
  return models.create_model(name, 10, **extra), (32, 32, 3)


@functools.lru_cache(maxsize=None)
def pruned(name: str, method: str, seed: int = 0):
  """A model, its pruned variables and input shape (random weights)."""
  model, shape = _model(name)
  v = artifacts.random_variables(model, seed, shape[0])
  if method == "dsp":
    info = dsp_jax.analyze(model, shape)
    gates = dsp_jax.init_gates(info, 2, key=jax.random.key(seed))
    # Without the reference's cnt_g = 0 defect, which empties whole tiny
    # layers and sends the rate search to a dead network.
    res = pr.prune(v["params"], gates, info, groups=2, rate=0.5,
                   parity=False)
    v = {**v, "params": res.params, "masks": res.masks, "gates": gates}
  else:
    layers = dd.ddrop_layers(model, shape)
    v = {**v, "params": dd.init_scales(layers, v["params"])}
    v = dd.prune(v, dd.prune_layers(model, layers, False, shape),
                 DdropConfig(amount=0.5))
  return model, artifacts.to_numpy_tree(v), shape


def _images(shape, n=3):
  return writer.random_images(n, shape[:2], seed=1, channels=shape[2])


CASES = [(n, m) for n in (*PLAIN, *REGISTRY) for m in ("dsp", "ddrop")]


@pytest.mark.parametrize("name,method", CASES)
def test_compact_function_and_torch_module_reproduce_the_masked_model(
    name, method):
  model, v, shape = pruned(name, method)
  desc = convert.describe(model, v, shape)
  program = program_lib.build(model, v, desc)
  x = _images(shape)
  want = artifacts.logits(model, v, x)
  assert np.abs(want[0] - want[1]).max() > 1e-3  # the network is alive
  apply, params = convert.compact(model, v, shape)
  got = jax.jit(apply)(params, jnp.asarray(x))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert torch_program.unsupported(program) == []
  module = torch_program.module(program).eval()
  np.testing.assert_allclose(writer.torch_logits(module, x), want, atol=1e-4,
                             rtol=0)
  dense = sum(np.size(a) for a in jax.tree.leaves(v["params"]))
  assert program.num_params < dense
  assert sum(p.numel() for p in module.parameters()) + sum(
      b.numel() for b in module.buffers()) == sum(
          np.size(c) for c in program.consts.values())
  rep = flops.report(model, v, shape[:2], shape[2], remove_dead=True)
  assert desc.macs == rep.macs < rep.macs_dense
  # Every exported layer keeps exactly what the description keeps.
  desc_lib.check_widths(desc, program.widths)


@pytest.mark.parametrize("name,method", [("plain_mobilenet", "dsp"),
                                         ("vit_tiny", "ddrop")])
def test_files_load_anywhere_and_match(name, method, tmp_path):
  model, v, shape = pruned(name, method)
  # A fresh interpreter reloads them once (the slowest part): one model.
  r = convert.export(model, v, tmp_path, shape, formats=["torch", "onnx"],
                     fresh=name == "vit_tiny")
  files = {p.name for p in r.files.values()}
  assert {"model.pt", "model.pt2", "model_state_dict.pt", "model.onnx",
          writer.REFERENCE_IO} <= files
  assert max(r.max_abs_diff.values()) <= 1e-4
  io = np.load(tmp_path / writer.REFERENCE_IO)
  x, want = io["images"], io["logits"]
  assert np.abs(writer.torch_logits(torch.jit.load(tmp_path / "model.pt"), x)
                - want).max() <= 1e-4
  ep = torch.export.load(tmp_path / "model.pt2").module()
  assert np.abs(writer.torch_logits(ep, x) - want).max() <= 1e-4
  sd = torch.load(tmp_path / "model_state_dict.pt", weights_only=True)
  assert sum(t.numel() for t in sd.values()) == r.details["params_after"]
  assert r.details["params_after"] < r.details["params_before"]
  session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
  (logits,) = session.run(None, {"images": np.ascontiguousarray(
      x.transpose(0, 3, 1, 2))})
  assert np.abs(logits - want).max() <= 1e-4
  assert r.details["macs_after"] == convert.describe(model, v, shape).macs
  # ``python -m convert inspect`` reads every file it wrote.
  from convert import cli  # pylint: disable=import-outside-toplevel
  n = f"{sum(t.numel() for t in sd.values()):,} numbers"
  assert "ONNX (opset 17)" in cli.inspect(tmp_path / "model.onnx")
  for f in ("model.pt", "model.pt2", "model_state_dict.pt"):
    assert n in cli.inspect(tmp_path / f).splitlines()[0], f


def test_a_layer_pruned_to_nothing_exports(tmp_path):
  """A block's first conv keeping no filter (whole groups emptied): its
  branch adds nothing, and every file says so."""
  model, v, shape = pruned("cifar_resnet8", "dsp")
  masks = jax.tree.map(np.array, v["masks"])
  masks["stage_1"]["0"]["conv_a"]["kernel"][...] = 0
  masks["stage_1"]["0"]["bn_a"]["scale"][...] = 0
  v = {**v, "masks": masks}
  desc = convert.describe(model, v, shape)
  r = convert.export(model, v, tmp_path, shape, formats=["torch", "onnx"],
                     fresh=False)
  assert max(r.max_abs_diff.values()) <= 1e-4
  assert desc.macs == flops.report(model, v, shape[:2], shape[2],
                                   remove_dead=True).macs


def test_a_corrupted_description_is_an_error_naming_the_layer(tmp_path):
  model, v, shape = pruned("plain_resnet", "dsp")
  desc = convert.describe(model, v, shape)
  path, cut = next((p, c) for p, c in desc.layers.items()
                   if 0 < len(c.filters) < len(c.outputs) or
                   len(c.inputs) < desc.graph[p].in_features)
  program = program_lib.build(model, v, desc)
  # One kept input too few: the written layer no longer matches.
  bad = dict(desc.layers)
  bad[path] = cut.__class__(**{**cut.__dict__, "inputs": cut.inputs[1:]})
  corrupted = desc.__class__(**{**desc.__dict__, "layers": bad})
  with pytest.raises(desc_lib.WidthMismatch, match=cut.name):
    desc_lib.check_widths(corrupted, program.widths)
  # Family formats are checked against it too: a module lacking a layer
  # that keeps filters (what a renamed subclass once exported silently).
  widths = {c.name: (len(c.inputs), len(c.filters))
            for c in desc.layers.values()}
  del widths[cut.name]
  with pytest.raises(desc_lib.WidthMismatch, match=f"{cut.name}: the "
                     "exported module has no such layer"):
    desc_lib.check_module_widths(desc, widths)
  assert not any(tmp_path.iterdir())


class _Cumulative(nn.Module):
  """A conv whose channels go through an op the export cannot translate."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
    x = jax.lax.cummax(x, axis=1)  # over rows: channels stay aligned
    x = nn.Conv(8, (3, 3), name="after")(x)
    return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


def test_an_untranslatable_primitive_names_itself_and_writes_nothing(
    tmp_path):
  model = models.prunable(_Cumulative())
  v = artifacts.random_variables(model, 0, 8)
  masks = v["masks"]
  masks["after"]["kernel"][..., :4] = 0  # prune half of "after"
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=r"'cummax' \(after conv\)"):
    convert.export(model, v, out, (8, 8, 3), formats=["torch"])
  assert not out.exists()


def test_an_unwritable_directory_is_one_error_before_any_file(tmp_path):
  model, v, shape = pruned("plain_resnet", "ddrop")
  (tmp_path / "file").write_text("")
  out = tmp_path / "file" / "out"  # under a file: no user can write there
  with pytest.raises(OSError):
    convert.export(model, v, out, shape, formats=["torch"], fresh=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_full_disk_during_writing_leaves_only_whole_files(
    tmp_path, monkeypatch):
  from training import integrity  # pylint: disable=import-outside-toplevel
  model, v, shape = pruned("plain_resnet", "ddrop")
  out = tmp_path / "out"
  original, calls = integrity.atomic_write, []

  def atomic_write(path, data):
    calls.append(path)
    if len(calls) == 3:  # the third file: the disk fills up
      raise OSError(28, "No space left on device")
    return original(path, data)

  monkeypatch.setattr(integrity, "atomic_write", atomic_write)
  with pytest.raises(OSError, match="No space left"):
    convert.export(model, v, out, shape, formats=["torch"], fresh=False)
  # The two files written before are whole; no temporary is left behind.
  left = sorted(out.iterdir())
  assert [p.name for p in left] == sorted(p.name for p in calls[:2])
  with np.load(out / writer.REFERENCE_IO) as io:
    assert io["logits"].shape[0] > 0
