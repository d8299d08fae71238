"""End to end DDROP pipeline on the built-in digits with a tiny ResNet."""

import math

import jax
import numpy as np
import pytest

import models
from models import paths
from configs import base
from ddrop_jax import pipeline
from training import config as config_lib

STEPS = 3


def _config():
  config = base.get_config()
  config.method = "ddrop"
  config.dataset = "digits"
  config.model = "cifar_resnet10_tiny"
  config.batch_size = 32
  config.test_batch_size = 400
  config.progress_bar = False
  config.max_steps = STEPS
  config.checkpoint_every_steps = 100
  d = config.ddrop
  d.prob = (0.3, 0.9)
  d.before_epochs, d.epochs, d.ft_epochs = 1, 1, 1
  d.amount = 0.5
  config_lib.validate(config)
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ddrop")
  report, state = pipeline.execute(_config(), workdir)
  return workdir, report, state


def test_every_stage_ran_and_left_its_artifacts(run):
  workdir, report, _ = run
  stages = report["stages"]
  assert [stages[s]["steps"] for s in ("before", "ddrop", "finetune")] == [
      STEPS] * 3
  assert stages["prune"]["final"]["accuracy"] == report["accuracy"]["pruned"]
  for name in ("before", "ddrop", "finetune"):
    assert (workdir / name / "meta.json").exists()
  assert (workdir / pipeline.PRUNE_FILE).exists()
  assert (workdir / "report.json").exists()


def test_report_fields_are_sane(run):
  _, report, _ = run
  acc = report["accuracy"]
  assert set(acc) == {"before", "ddrop", "pruned", "finetune"}
  assert all(0.0 <= a <= 1.0 for a in acc.values())
  assert report["amount"] == 0.5
  units = report["pruned_units"]
  # cifar_resnet10_tiny: DDROP on each block's first BN (widths 4, 8, 8, 16).
  assert units == {"layer1.0.bn1": [2, 4], "layer2.0.bn1": [4, 8],
                   "layer3.0.bn1": [4, 8], "layer4.0.bn1": [8, 16]}
  dense, pruned = report["dense"], report["pruned"]
  assert dense["params"] == dense["params_dense"]
  assert pruned["params"] < dense["params"]
  assert pruned["macs"] < dense["macs"]
  assert report["params"] == pruned["params"]
  # Default schedule length: a third of the DDROP phase (1257 training
  # digits, batch 32: 39 steps per epoch).
  assert report["ddrop"]["total_steps"] == 39 // 3


def test_pruned_units_stay_zero_after_finetuning(run):
  _, report, state = run
  masks = state.masks
  assert masks, "fine-tuning must keep the masks"
  for name, (n_pruned, _) in report["pruned_units"].items():
    path = name.split(".")
    bn_mask = np.asarray(paths.get(masks, tuple(path))["scale"])
    bn = paths.get(state.params, tuple(path))
    dead = bn_mask == 0
    assert dead.sum() == n_pruned
    np.testing.assert_array_equal(np.asarray(bn["scale"])[dead], 0.0)
    np.testing.assert_array_equal(np.asarray(bn["bias"])[dead], 0.0)
    conv = paths.get(state.params, tuple(path[:-1] + [path[-1].replace(
        "bn", "conv")]))
    np.testing.assert_array_equal(np.asarray(conv["kernel"])[..., dead], 0.0)
    # The surviving units were trained.
    assert np.abs(np.asarray(bn["scale"])[~dead]).min() > 0


def test_export_matches_the_flax_model(run):
  torch = pytest.importorskip("torch")
  workdir, report, state = run
  export = report["export"]
  files = {k: workdir / "export" / k for k in (
      "slim.pt", "slim.pt2", "slim_state_dict.pt", "reference_io.npz")}
  assert set(export["files"]) == set(files) | {
      "preprocess.json", "fast.pt", "fast.pt2", "fast_plan.json",
      "model.pt", "model.pt2", "model_state_dict.pt", "model.onnx"}
  for f in files.values():
    assert f.exists()
  io = np.load(files["reference_io.npz"])
  model = models.create_model("cifar_resnet10_tiny", 10)
  want = np.asarray(model.apply(state.variables(), io["images"],
                                train=False))
  module = torch.jit.load(str(files["slim.pt"]))
  with torch.no_grad():
    got = module(torch.from_numpy(io["images_nchw"])).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert export["params_slim"] < report["dense"]["params"]


def test_rerun_resumes_from_the_checkpoints(run):
  workdir, report, _ = run
  config = _config()
  config.stages = "before,ddrop,prune,finetune"
  again, _ = pipeline.execute(config, workdir)
  assert again["accuracy"] == report["accuracy"]
  assert again["pruned_units"] == report["pruned_units"]
  assert again["stages"]["finetune"]["steps"] == STEPS
