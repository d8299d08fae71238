"""End-to-end DSP pipeline (dsp_jax.pipeline) on digits with a tiny ResNet."""

import json
import pathlib

import numpy as np
import pytest
import torch

from configs import base
from convert import reference as ref_lib
from training import artifacts
from dsp_jax import pipeline

STAGES = ["pretrain", "group", "prune_finetune/cycle_1",
          "prune_finetune/cycle_2"]


def _config(**dsp):
  c = base.get_config()
  c.method = "dsp"
  c.dataset = "digits"
  c.model = "cifar_resnet8"
  c.batch_size = 32
  c.test_batch_size = 200
  c.max_steps = 2  # A handful of steps per stage; schedules span full epochs.
  c.progress_bar = False
  c.checkpoint_every_steps = 100
  c.dsp.groups = 2
  c.dsp.pretrain_epochs = 1
  c.dsp.group_epochs = 1
  c.dsp.finetune_epochs = 2
  c.dsp.cycles = 2
  c.dsp.prune_rate = 0.7
  for k, v in dsp.items():
    c.dsp[k] = v
  return c


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dsp_full")
  report = pipeline.run(_config(), workdir)
  return workdir, report


def test_stages_run_in_order_and_write_artifacts(full_run):
  workdir, report = full_run
  assert list(report["stages"]) == STAGES
  order = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    stage = json.loads(line)["stage"]
    if not order or order[-1] != stage:
      order.append(stage)
  assert order == STAGES
  for stage, ref in (("pretrain", "resnet8.pkl"), ("group", "resnet8_G0g2.pkl"),
                     ("prune_finetune", "resnet8_P0g2c0.70.pkl")):
    assert (workdir / stage / "output" / "variables.npz").is_file()
    sd, acc = ref_lib.read_state_dict(workdir / stage / ref)
    assert ref_lib.reference_stage(sd) == {
        "pretrain": "pretrained", "group": "group"}.get(stage, "finetuned")
    assert 0.0 <= acc <= 100.0
  assert json.loads((workdir / "report.json").read_text()) == json.loads(
      json.dumps(report))


def test_report_fields(full_run):
  _, report = full_run
  assert report["method"] == "dsp" and report["groups"] == 2
  assert 0.0 < report["beta"] < 1.0
  for k in ("pflops_reference", "pparams_reference", "pflops_whole_model",
            "pparams_whole_model"):
    assert 0.0 <= report[k] <= 100.0, k
  # The stem, shortcuts and classifier are never pruned.
  assert report["pflops_whole_model"] < report["pflops_reference"] or (
      report["pflops_reference"] == 0.0)
  for k in ("dense_accuracy", "pruned_accuracy", "best_accuracy"):
    assert 0.0 <= report[k] <= 1.0, k
  assert [r["layer"] for r in report["structure"]] == [
      f"stage_{s}.0.conv_{c}" for s in (1, 2, 3) for c in "ab"]
  assert all(len(r["groups"]) == 2 for r in report["structure"])
  assert [c["cycle"] for c in report["cycles"]] == [1, 2]
  assert set(report["export"]["files"]) == {
      "packed.pt", "packed.pt2", "dense_state_dict.pt", "reference_io.npz",
      "preprocess.json", "fast.pt", "fast.pt2", "fast_plan.json",
      "model.pt", "model.pt2", "model_state_dict.pt", "model.onnx"}


def test_packed_torchscript_matches_pruned_model(full_run):
  workdir, _ = full_run
  packed = torch.jit.load(str(workdir / "export" / "packed.pt"))
  model, variables, _ = artifacts.load_variables(
      workdir / "prune_finetune" / "output")
  images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(
      np.float32)
  want = np.asarray(artifacts.logits(model, variables, images))
  with torch.no_grad():
    got = packed(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
  # `python -m convert export WORKDIR` reads the same result from the workdir.
  _, from_run, _ = artifacts.load_source(workdir)
  np.testing.assert_array_equal(
      np.asarray(artifacts.logits(model, from_run, images)), want)


def test_prune_finetune_alone_from_group_stage(full_run, tmp_path):
  workdir, report = full_run
  config = _config(init_from=str(workdir / "group"))
  config.stages = "prune_finetune"
  again = pipeline.run(config, tmp_path)
  assert list(again["stages"]) == STAGES[2:]
  # Same group-learned input and config: the same prune.
  assert again["beta"] == report["beta"]
  assert again["structure"] == report["structure"]
  assert (tmp_path / "prune_finetune" / "resnet8_P0g2c0.70.pkl").is_file()
  assert not (tmp_path / "pretrain").exists()
  assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("source", ["group", "group/resnet8_G0g2.pkl"])
def test_group_count_mismatch_is_a_clear_error(full_run, tmp_path, source):
  workdir, _ = full_run
  config = _config(init_from=str(workdir / source), groups=3)
  config.stages = "prune_finetune"
  with pytest.raises(ValueError, match="2 groups but dsp.groups=3"):
    pipeline.run(config, tmp_path)


def test_stage_without_its_input_is_a_clear_error(tmp_path):
  config = _config()
  config.stages = "pack"
  with pytest.raises(FileNotFoundError, match="stage 'prune_finetune'"):
    pipeline.run(config, tmp_path)
