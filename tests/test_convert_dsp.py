"""DSP export/import of our own masked CifarResNets (no shared data needed)."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
import torch

import models
from models import paths
from convert import cli, dsp, dsp_torch, fast, jax_side, packing, tables
from convert import writer
from training import artifacts


def masked_resnet(name: str, groups: int, seed: int,
                  empty_block: str | None = None):
  """A CifarResNet with random BN tensors and random group-structured masks.

  Every conv_a/conv_b filter gets a random group; each group keeps a random
  input subset; a few filters are removed. conv_b keeps only channels conv_a
  produces, and BN masks follow their conv's surviving filters, as the
  pruning stage leaves them. ``empty_block`` gets an all-zero conv_a.
  """
  model = models.create_model(name, 10)
  rng = np.random.default_rng(seed)
  v = artifacts.random_variables(model, rng)
  for conv in tables.taking_part_convs(v, "cifar_resnet"):
    block, which = tuple(conv.split(".")[:-1]), conv.split(".")[-1][-1]
    kernel = paths.get(v["params"], block + (f"conv_{which}", "kernel"))
    n_in, n_out = kernel.shape[2:]
    group = rng.integers(0, groups, n_out)
    keep = rng.random((groups, n_in)) < 0.6
    keep[np.arange(groups), rng.integers(0, n_in, groups)] = True
    mask = keep[group].T.astype(np.float32)            # (I, O)
    mask[:, rng.random(n_out) < 0.15] = 0              # removed filters
    if which == "b":
      produced = paths.get(v["masks"], block + ("bn_a", "scale")) > 0
      mask *= produced[:, None]
    if which == "a" and ".".join(block) == empty_block:
      mask[:] = 0
    paths.assign(v["masks"], block + (f"conv_{which}", "kernel"), mask)
    paths.assign(v["masks"], block + (f"bn_{which}", "scale"),
         (mask.sum(0) > 0).astype(np.float32))
  return model, v


@pytest.mark.parametrize("name,groups", [("cifar_resnet8", 1),
                                         ("cifar_resnet8", 2),
                                         ("cifar_resnet8", 4),
                                         ("cifar_resnet20", 6)])
def test_export_torchscript_matches_flax(tmp_path, name, groups):
  model, v = masked_resnet(name, groups, seed=groups)
  r = dsp.export_packed(model, v, tmp_path, program=False)
  assert max(r.max_abs_diff.values()) <= 1e-4
  io = np.load(tmp_path / dsp.REFERENCE_IO)
  loaded = torch.jit.load(str(tmp_path / dsp.PACKED))   # no map_location
  assert np.abs(writer.torch_logits(loaded, io["images"]) - io["logits"]).max() <= 1e-4
  most = max(max(a, b) for a, b in r.details["branches"].values())
  assert most <= groups
  names = {m.original_name for _, m in loaded.named_modules()}
  assert f"Sampler_T{most}" in names and "Compactblock" in names
  if groups == 6:   # more branches than the reference's hard-coded 4
    assert most > 4
  # The index constants are traced int64 constants of the documented shapes.
  blk = next(m for n, m in loaded.named_modules()
             if m.original_name == "Compactblock" and hasattr(m, "sampler_a"))
  _, consts = blk.sampler_a.code_with_constants
  assert all(c.dtype == torch.int64 and c.dim() == 4 and c.shape[0] == 1
             for c in consts.const_mapping.values())
  _, consts = blk.residual.code_with_constants
  assert all(c.dtype == torch.int64 and c.dim() == 1
             for c in consts.const_mapping.values())


def test_program_and_state_dict_and_empty_block(tmp_path):
  model, v = masked_resnet("cifar_resnet8", 2, seed=7,
                           empty_block="stage_2.0")
  r = dsp.export_packed(model, v, tmp_path, program=True)
  assert set(r.files) >= {dsp.PACKED, dsp.PROGRAM, dsp.STATE_DICT,
                          dsp.REFERENCE_IO, fast.FAST, fast.FAST_PROGRAM,
                          fast.FAST_PLAN}
  assert r.details["branches"]["stage_2.0"] == (0, 0)
  io = np.load(tmp_path / dsp.REFERENCE_IO)
  prog = torch.export.load(str(tmp_path / dsp.PROGRAM)).module()
  assert np.abs(writer.torch_logits(prog, io["images"]) - io["logits"]).max() <= 1e-4
  sd = torch.load(tmp_path / dsp.STATE_DICT, weights_only=True)
  assert sd["stage_1.0.conv_a.mask"].shape == (4, 4, 1, 1)
  got = writer.torch_logits(lambda x: dsp_torch.dense_forward(sd, x), io["images"])
  assert np.abs(got - io["logits"]).max() <= 1e-4
  with pytest.warns(UserWarning, match="TorchScript"):
    ts = torch.load(tmp_path / dsp.PACKED, weights_only=False)  # no map_location
  assert isinstance(ts, torch.jit.ScriptModule)
  kids = dict(dict(ts.stage_2.named_children())["0"].named_children())
  assert set(kids) == {"downsample"}       # shortcut + ReLU only
  assert not list(tmp_path.glob(".*tmp-*"))  # atomic writes left no temp file


def test_import_of_export_round_trips(tmp_path):
  model, v = masked_resnet("cifar_resnet8", 4, seed=3)
  dsp.export_packed(model, v, tmp_path, program=False,
                    num_batches_tracked={"bn_1": 5})
  r = dsp.import_packed(tmp_path / dsp.PACKED)
  assert r.max_abs_diff <= 1e-4
  assert r.num_batches_tracked["bn_1"] == 5
  assert packing.plans_equal(r.plan, jax_side.plan_from_variables(
      v, {"bn_1": 5})) == []
  # Import -> export reproduces the file's tensors and names.
  dsp.export_packed(r.model(), r.variables, tmp_path / "again", program=False,
                    num_batches_tracked=r.num_batches_tracked)
  a = torch.jit.load(str(tmp_path / dsp.PACKED)).state_dict()
  b = torch.jit.load(str(tmp_path / "again" / dsp.PACKED)).state_dict()
  assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_group_rows_orders():
  mask = np.array([[0, 1, 1], [0, 0, 0], [1, 0, 1], [0, 1, 1], [1, 0, 1]])
  groups = packing.group_rows(mask)
  assert [(i.tolist(), r.tolist()) for i, r in groups] == [
      ([1, 2], [0, 3]), ([0, 2], [2, 4])]


def test_mismatch_raises(tmp_path):
  model, v = masked_resnet("cifar_resnet8", 2, seed=1)
  # A conv_a filter dropped by its conv mask but left alive in its BN mask
  # emits a constant that the packed model drops: the check must refuse it.
  v["masks"]["stage_1"]["0"]["conv_a"]["kernel"][:, 0] = 0
  v["masks"]["stage_1"]["0"]["bn_a"]["scale"][0] = 1
  v["params"]["stage_1"]["0"]["bn_a"]["bias"][0] = 1.0
  v["batch_stats"]["stage_1"]["0"]["bn_a"]["mean"][0] = 0.0
  kb = v["masks"]["stage_1"]["0"]["conv_b"]["kernel"]
  kb[0, kb.sum(0) > 0] = 1
  with pytest.raises(writer.ConversionMismatch, match="logits differ"):
    dsp.export_packed(model, v, tmp_path, program=False)
  assert not (tmp_path / dsp.PACKED).exists()


def test_bad_inputs_name_what_was_expected(tmp_path):
  junk = tmp_path / "junk.pt"
  junk.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="TorchScript"):
    dsp.import_packed(junk)
  lin = torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2))
  with pytest.raises(ValueError, match="expected a packed DSP CifarResNet"):
    dsp.import_packed(lin)
  with pytest.raises(ValueError, match="expected a torch.save file"):
    cli.import_file(junk, tmp_path / "out")
  assert cli.main(["import", str(junk), "--out", str(tmp_path / "o")]) == 2


def test_cli_import_inspect_export(tmp_path, capsys):
  model, v = masked_resnet("cifar_resnet8", 2, seed=11)
  dsp.export_packed(model, v, tmp_path / "a", program=False)
  assert cli.main(["import", str(tmp_path / "a" / dsp.PACKED),
                   "--out", str(tmp_path / "vars")]) == 0
  m2, v2, info = artifacts.load_variables(tmp_path / "vars")
  assert info["model"] == "cifar_resnet8"
  x = writer.random_images(2)
  np.testing.assert_allclose(artifacts.logits(m2, v2, x),
                             artifacts.logits(model, v, x), atol=1e-4)
  assert cli.main(["inspect", str(tmp_path / "vars")]) == 0
  out = capsys.readouterr().out
  assert "stage_1.0" in out and "P.FLOPS" in out
  assert cli.main(["export", str(tmp_path / "vars"), "--out",
                   str(tmp_path / "b"), "--no-program", "--stage",
                   "finetuned"]) == 0
  a = torch.jit.load(str(tmp_path / "a" / dsp.PACKED)).state_dict()
  b = torch.jit.load(str(tmp_path / "b" / dsp.PACKED)).state_dict()
  assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
  sd, acc = cli.reference.read_state_dict(
      pathlib.Path(tmp_path / "b" / "reference_state_dict.pkl"))
  assert acc == 0.0 and "stage_1.0.conv_b.mask" in sd


def test_cli_exports_a_training_stage_directory(tmp_path):
  from training import checkpoint, state  # pylint: disable=import-outside-toplevel
  model, v = masked_resnet("cifar_resnet8", 2, seed=5)
  ts = state.TrainState(step=np.int32(4), params=v["params"],
                        batch_stats=v["batch_stats"], masks=v["masks"],
                        gates={}, opt_state={}, rng=jax.random.key(0))
  ck = checkpoint.StageCheckpointer(tmp_path / "finetune",
                                    {"model": "cifar_resnet8", "method": "dsp"})
  ck.save_best(4, ts, {"best": 0.5})
  ck.close()
  # The run records its model when it starts; without the record the stage
  # directory cannot be rebuilt: one line naming the file.
  assert cli.main(["export", str(tmp_path / "finetune"), "--out",
                   str(tmp_path / "export")]) == 2
  artifacts.save_architecture(tmp_path, "cifar_resnet8", 10, {})
  assert cli.main(["export", str(tmp_path / "finetune"), "--out",
                   str(tmp_path / "export"), "--no-program", "--format",
                   "packed"]) == 0
  io = np.load(tmp_path / "export" / dsp.REFERENCE_IO)
  np.testing.assert_allclose(io["logits"], artifacts.logits(model, v, io["images"]),
                             atol=1e-5)
