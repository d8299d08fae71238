"""What a new user meets: errors, progress, summary, re-runs, exports, plots."""

import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training import errors, progress
from training import artifacts
from training.report import WIDTH, Report

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(args, tmp_path):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300,
                        env={**os.environ,
                             "TFDS_DATA_DIR": str(tmp_path / "tfds")})


def _one_line_error(proc):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr + proc.stdout
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  return lines[0]


# ------------------------------------------------------------------ errors
def test_missing_config_file_is_one_line(tmp_path):
  proc = _cli(["run.py", "--config", "configs/nope.py"], tmp_path)
  assert "configs/nope.py" in _one_line_error(proc)


def test_missing_cifar_archive_is_one_line_and_leaves_nothing(tmp_path):
  workdir = tmp_path / "run"
  proc = _cli(["run.py", "--config", "configs/quickstart.py",
               "--config.dataset=cifar10", "--workdir", str(workdir)],
              tmp_path)
  line = _one_line_error(proc)
  assert "cifar-10-python.tar.gz" in line and "data_dir" in line
  assert "Downloading" not in proc.stdout + proc.stderr
  assert not workdir.exists()
  assert not list((tmp_path / "tfds").glob("*cifar*"))


def test_convert_errors_are_one_line_and_name_torchscript(tmp_path):
  junk = tmp_path / "junk.txt"
  junk.write_text("not a model")
  proc = _cli(["-m", "convert", "import", str(junk), "--out",
               str(tmp_path / "o")], tmp_path)
  assert "TorchScript" in _one_line_error(proc)
  assert not (tmp_path / "o").exists()
  proc = _cli(["-m", "convert", "export", str(tmp_path / "missing"), "--out",
               str(tmp_path / "o")], tmp_path)
  assert "no such directory" in _one_line_error(proc)


def test_reported_removes_only_new_output_dirs(tmp_path):
  old, new = tmp_path / "old", tmp_path / "new"
  old.mkdir()

  def fail():
    new.mkdir()
    (old / "x").write_text("")
    raise FileNotFoundError("no such file: data.bin")

  assert errors.call(fail, outputs=[old, new], status=3) == 3
  assert old.exists() and not new.exists()
  assert errors.message(KeyError("unknown model 'x'")) == "unknown model 'x'"
  with pytest.raises(TypeError):  # A bug keeps its traceback.
    errors.call(lambda: (_ for _ in ()).throw(TypeError("bug")))


def test_ddrop_cli_digits_needs_no_data_dir_and_help_matches_validation():
  from ddrop_jax import cli
  from training import config as config_lib
  config = cli.parse("--dataset digits --model cifar_resnet10_tiny --prob 0 "
                     "0.9".split())
  assert config.data_dir == ""
  help_text = cli.build_parser().format_help()
  for name in config_lib.DATASETS:
    assert name in help_text


# ---------------------------------------------------------------- progress
def _drive(display, epochs=2, spe=3):
  for step in range(epochs * spe):
    display.step({"loss": 1.0 / (step + 1), "accuracy": 0.5, "lr": 0.1})
    display.throughput(123.0)
    if (step + 1) % spe == 0:
      display.evaluated({"test": {"accuracy": 0.75}})
      display.epoch_end()
  display.close()


def test_plain_progress_is_one_line_per_epoch():
  out = io.StringIO()
  _drive(progress.Display("pretrain", 6, 0, 3, terminal=False, stream=out))
  lines = out.getvalue().splitlines()
  assert len(lines) == 3 and "\r" not in out.getvalue()
  assert lines[0] == "pretrain: steps 1..6 (2 epochs of 3 steps)"
  assert lines[2].startswith("pretrain epoch 2/2 step 6/6 loss")
  for field in ("acc 0.500", "lr 0.1", "123 img/s", "test 75.00%", "ETA"):
    assert field in lines[2]


def test_terminal_progress_is_a_bar_with_the_fields():
  out = io.StringIO()
  _drive(progress.Display("group", 6, 0, 3, terminal=True, stream=out))
  text = out.getvalue()
  assert "\r" in text and "group" in text and "6/6" in text
  assert "loss" in text and "img/s" in text and "test 75.00%" in text
  quiet = io.StringIO()
  _drive(progress.Display("g", 6, 0, 3, enabled=False, terminal=False,
                          stream=quiet))
  assert quiet.getvalue() == ""


def test_finished_stage_says_already_done():
  assert "already done" in progress.status_message("pretrain", 380, 380, "d")
  assert "resuming from step 10 of 380" in progress.status_message(
      "pretrain", 10, 380, "d")


# ----------------------------------------------------------------- summary
def test_summary_is_one_readable_screen(tmp_path):
  from dsp_jax import pipeline as dsp_pipeline
  r = Report(tmp_path, method="dsp", model="cifar_resnet20", dataset="digits")
  for name in ("pretrain", "group", *(f"prune_finetune/cycle_{i}"
                                      for i in range(1, 6))):
    r.add_stage(name, {"steps": 114, "seconds": 75.3, "best_step": 38,
                       "final": {"test": {"accuracy": 0.9889}},
                       "best": {"test": {"accuracy": 0.9917}}})
  cycles = [{"cycle": i, "beta": 0.2, "pflops_reference": 54.0 + i,
             "final": 0.98, "best": 0.99 - 0.001 * i, "best_step": 10 * i}
            for i in range(1, 6)]
  figures = {"cycles": cycles, "best_cycle": 1, "best_accuracy": 0.989,
             "selected_on": "test", "groups": 4, "beta": 0.2,
             "pflops_reference": 55.0, "pparams_reference": 53.5,
             "pruned_accuracy": 0.9889, "dense_accuracy": 0.9944,
             "structure": [{"layer": f"stage_{i}.0.conv_a",
                            "groups": [[3, 7]] * 4} for i in range(9)],
             "empty_groups": [["stage_1.0.conv_a", 2]] * 40}
  figures["exported"] = dsp_pipeline.exported_entry(figures)
  r.merge(figures)
  r.merge({"params": 129020, "params_dense": 272474, "macs": 18.8e6,
           "macs_dense": 40.8e6, "dsp_pflops": 55.0, "dsp_pparams": 53.5,
           "pflops_whole_model": 53.9, "pparams_whole_model": 52.6,
           "export": {"files": {n: str(tmp_path / "export" / n) for n in
                                ("packed.pt", "packed.pt2", "fast.pt",
                                 "preprocess.json")},
                      "max_abs_diff": {"packed.pt": 4e-6}},
           "preprocess": {"summary": "NCHW float32 3x32x32 RGB"},
           "some_list": [{"a": 1}] * 50})
  text = r.summary(dsp_pipeline.summary(r.data), dsp_pipeline.SUMMARY_KEYS)
  lines = text.splitlines()
  assert max(map(len, lines)) <= WIDTH
  assert len(lines) < 60
  assert not any(l.count("{") != l.count("}") or l.count("[") != l.count("]")
                 for l in lines)  # No JSON cut mid-token.
  assert sum("per group" in l for l in lines) == 1  # The table once.
  assert "exported model: cycle 1's best checkpoint" in text
  assert "step 10; P.FLOPS 55.00 %" in text
  assert "prune_finetune/cycle_5" in text and "fast.pt" in text
  assert "input: NCHW" in text


# ------------------------------------------- re-export and preprocess.json
def test_export_once_skips_unchanged_and_writes_preprocess(tmp_path):
  from convert import preprocess, stamp
  from training import data
  info = data.get_info("digits")
  variables = {"params": {"w": np.ones(3, np.float32)}}
  calls = []

  def export():
    calls.append(1)
    path = tmp_path / "m.bin"
    path.write_bytes(b"x")
    return {"files": {"m.bin": str(path)}}

  entry, skipped = stamp.export_once(tmp_path, variables, info, export)
  assert not skipped and calls == [1]
  assert entry["files"][preprocess.FILE].endswith(preprocess.FILE)
  _, skipped = stamp.export_once(tmp_path, variables, info, export)
  assert skipped and calls == [1]
  _, skipped = stamp.export_once(
      tmp_path, {"params": {"w": np.zeros(3, np.float32)}}, info, export)
  assert not skipped and calls == [1, 1]  # Input changed: re-exported.
  _, skipped = stamp.export_once(tmp_path, variables, info, export, force=True)
  assert not skipped and len(calls) == 3


def test_preprocess_json_reproduces_the_model_on_raw_images(tmp_path):
  import torch
  import models
  from convert import dsp, preprocess
  from training import data, steps
  from training.datasets import digits_arrays
  info = data.get_info("digits")
  model = models.create_model("cifar_resnet8", num_classes=10, groups=2)
  variables = artifacts.random_variables(model, 0)
  out = tmp_path / "export"
  r = dsp.export_packed(model, variables, out, program=False)
  pre = preprocess.finish(out, info, r.files, with_preprocess=True)
  content = preprocess.read(out)
  assert content["mean"] == list(info.mean) and content["std"] == list(info.std)
  assert content["shape"] == [3, 32, 32] and content["layout"] == "NCHW"
  assert content["raw_input_files"] == ["fast.pt"]  # Not the original format.
  assert "(pixels / 255 - mean) / std" in pre["summary"]
  raw = digits_arrays()["test"][0][:4]  # uint8 NHWC test images.
  want = np.asarray(model.apply(
      variables, steps.preprocess(None, jnp.asarray(raw), info), train=False))
  with torch.no_grad():
    packed = torch.jit.load(str(out / dsp.PACKED))
    got = packed(torch.from_numpy(preprocess.normalise(raw, content))).numpy()
    fast = torch.jit.load(str(out / "fast.pt"))
    raw_nchw = torch.from_numpy(
        np.ascontiguousarray(raw.transpose(0, 3, 1, 2)).astype(np.float32))
    got_raw = fast(raw_nchw).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_allclose(got_raw, want, atol=1e-4)


# ------------------------------------------------------------------- plots
def test_plot_run_writes_the_pngs(tmp_path):
  from training import plot
  recs = [{"stage": s, "step": t, "split": "train", "loss": 1.0 / t,
           "accuracy": 0.1 * t, "lr": 0.1} for s in ("pretrain", "group")
          for t in range(1, 5)]
  recs += [{"stage": "pretrain", "step": 4, "split": "test", "loss": 0.5,
            "accuracy": 0.6}]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in recs) + '{"cut')
  (tmp_path / "report.json").write_text(json.dumps({
      "structure": [{"layer": "a", "groups": [[2, 3], [1, 4]]}],
      "cycles": [{"cycle": 1, "pflops_reference": 50.0, "best": 0.9}],
      "config": {"dsp": {"prune_rate": 0.5}}}))
  written = plot.plot_run(tmp_path)
  assert sorted(written) == ["curves", "pflops", "structure"]
  for p in written.values():
    assert pathlib.Path(p).read_bytes()[:4] == b"\x89PNG"
  assert plot.main([str(tmp_path / "absent")]) == errors.EXIT_STATUS


# ------------------------------------------------------- DDROP fidelity
def test_ddrop_recipes_cycle_momentum_from_095_to_085():
  import importlib
  from ddrop_jax import pipeline as ddrop_pipeline
  for name in ("ddrop_quickstart", "ddrop_resnet50_cifar10",
               "ddrop_vgg16_cifar100"):
    config = importlib.import_module(f"configs.{name}").get_config()
    section = ddrop_pipeline.phase_optim(config, config.model)
    assert section["schedule"] == "onecycle"
    assert (section["momentum"], section["base_momentum"]) == (0.95, 0.85)


def test_equal_importances_are_ranked_at_random_from_the_step_key():
  from ddrop_jax import probs
  ones = jnp.ones(16)
  assert (np.asarray(probs.ranks(ones)) == np.arange(16)).all()
  k0 = probs.tie_key(jax.random.key(0), 0)
  r0 = np.asarray(probs.ranks(ones, k0))
  r1 = np.asarray(probs.ranks(ones, probs.tie_key(jax.random.key(0), 1)))
  assert sorted(r0) == list(range(16))  # Still a ranking.
  assert not (r0 == np.arange(16)).all() and not (r0 == r1).all()
  v = jnp.asarray([3.0, 1.0, 2.0, 1.0])  # Unequal values keep their order.
  r = np.asarray(probs.ranks(v, k0))
  assert r[0] == 3 and r[2] == 2 and sorted(r[[1, 3]]) == [0, 1]


def test_ddrop_summary_names_phases_and_the_exported_state(tmp_path):
  from ddrop_jax import pipeline as ddrop_pipeline
  r = Report(tmp_path, method="ddrop", model="cifar_resnet18",
             dataset="cifar10")
  for name, steps in (("before", 10), ("ddrop", 10), ("prune", 0),
                      ("finetune", 10)):
    r.add_stage(name, {"steps": steps, "seconds": 1.0, "best_step": 5,
                       "final": {"test": {"accuracy": 0.8}},
                       "best": {"test": {"accuracy": 0.85}}})
  r.merge({"accuracy": {"before": 0.9, "ddrop": 0.7, "pruned": 0.6,
                        "finetune": 0.8},
           "pruned_units": {f"layer{i}": [8, 16] for i in range(30)},
           "amount": 0.5,
           "ddrop": {"layers": [f"layer{i}" for i in range(30)]}})
  r.merge({"exported": ddrop_pipeline.exported_entry(r.data)})
  text = r.summary(ddrop_pipeline.summary(r.data), ddrop_pipeline.SUMMARY_KEYS)
  assert max(map(len, text.splitlines())) <= WIDTH
  assert "right after pruning 60.00 %" in text
  assert "pruned units: 240 of 480 in 30 layers" in text
  assert "finetune's final state (step 10), test 80.00 %" in text
  assert "best checkpoint (test 85.00 % at step 5) stays in finetune/" in text
