"""Kill -9 a real ``run.py`` after a checkpoint, resume it, compare bit-wise."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 40
ARGS = ["--config", "configs/base.py", "--config.model=cifar_resnet8",
        "--config.batch_size=32", "--config.epochs=2",
        f"--config.max_steps={STEPS}", "--config.checkpoint_every_steps=3",
        "--config.keep_checkpoints=2", "--config.log_every_steps=5",
        "--config.progress_bar=False", "--config.test_batch_size=200",
        "--config.optim.schedule=onecycle"]


def _cmd(workdir):
  return [sys.executable, "run.py", *ARGS, "--workdir", str(workdir)]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _steps(workdir):
  d = workdir / "train" / "steps"
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def _final_params(workdir):
  step = max(_steps(workdir))
  restored = ocp.PyTreeCheckpointer().restore(
      workdir / "train" / "steps" / str(step) / "state")
  return step, restored


@pytest.mark.slow  # Three real runs (about 1 min on 2 cores).
@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_kill_and_resume_is_bit_identical(tmp_path):
  full, killed = tmp_path / "full", tmp_path / "killed"
  # The uninterrupted run and the run to kill go side by side.
  ref = subprocess.Popen(_cmd(full), cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  victim = subprocess.Popen(_cmd(killed), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  deadline = time.time() + 400
  while not _steps(killed) and victim.poll() is None:
    assert time.time() < deadline, "no checkpoint was written"
    time.sleep(0.02)
  assert victim.poll() is None, "the run ended before it could be killed"
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  at_kill = max(_steps(killed))
  assert 0 < at_kill < STEPS
  out, _ = ref.communicate(timeout=400)
  assert ref.returncode == 0, out.decode()[-3000:]

  resumed = subprocess.run(_cmd(killed), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=400)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "train: resuming from step" in resumed.stdout

  step_a, a = _final_params(full)
  step_b, b = _final_params(killed)
  assert step_a == step_b == STEPS
  leaves_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for (path, x), y in zip(leaves_a, leaves_b):
    assert np.array_equal(np.asarray(x), np.asarray(y)), path
  report = json.loads((killed / "report.json").read_text())
  assert report["stages"]["train"]["steps"] == STEPS
  # No step is logged twice after the resume.
  recs = [json.loads(l) for l in
          (killed / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in recs if r["split"] == "train"]
  assert train_steps == sorted(set(train_steps))


def test_foreign_checkpoint_is_refused_and_kept(tmp_path):
  from training import checkpoint as ckpt_lib
  d = tmp_path / "train"
  d.mkdir()
  (d / "notes.txt").write_text("someone else's files")
  with pytest.raises(ckpt_lib.CheckpointError, match="no meta.json"):
    ckpt_lib.StageCheckpointer(d, {"stage": "train"})
  assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
  d2 = tmp_path / "other"
  ckpt_lib.StageCheckpointer(d2, {"stage": "train", "model": "a"}).close()
  before = (d2 / "meta.json").read_text()
  with pytest.raises(ckpt_lib.CheckpointError, match="model: stored 'a'"):
    ckpt_lib.StageCheckpointer(d2, {"stage": "train", "model": "b"})
  assert (d2 / "meta.json").read_text() == before
  (d2 / "meta.json").write_text("{corrupt")
  with pytest.raises(ckpt_lib.CheckpointError, match="unreadable"):
    ckpt_lib.StageCheckpointer(d2, {"stage": "train", "model": "a"})
