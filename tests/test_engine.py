"""Train state, masks, jitted steps on a mesh, the stage loop."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from training import checkpoint as ckpt_lib
from training import config as config_lib
from training import loop
from training import mesh as mesh_lib
from training import optim
from training import state as state_lib
from training import steps
from training.data import DatasetInfo

ROOT = pathlib.Path(__file__).resolve().parents[1]
INFO = DatasetInfo("synthetic", 10, 32, 3, {"train": 64, "test": 13},
                   (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))

# Runs a few train steps of ResNet-8 on N simulated devices; prints params.
SHARDED_SCRIPT = r"""
import sys, numpy as np, jax
sys.path.insert(0, sys.argv[1])
import models
from training import mesh as mesh_lib, optim, state as state_lib, steps
from tests.test_engine import INFO, batches
assert jax.device_count() == int(sys.argv[2]), jax.devices()
model = models.create_model("cifar_resnet8", 10)
lr, mom = optim.onecycle(0.1, 10)
tx = optim.sgd_torch(lr, mom, 5e-4)
mesh = mesh_lib.make_mesh()
state = mesh_lib.replicate(state_lib.create_train_state(
    model, tx, jax.random.key(3), (32, 32, 3)), mesh)
step = steps.make_train_step(model, tx, INFO, mesh, lr_schedule=lr)
for b in batches(3, 16):
  state, m = step(state, mesh_lib.global_batch(b, mesh))
  float(m["loss"])
kernel = state.params["stage_1"]["0"]["conv_a"]["kernel"]
assert kernel.sharding.is_fully_replicated
flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
        jax.tree_util.tree_leaves_with_path((state.params, state.batch_stats))}
np.savez(sys.argv[3], **flat)
"""


def batches(n, size, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    yield {"image": rng.integers(0, 256, (size, 32, 32, 3), np.uint8),
           "label": rng.integers(0, 10, (size,), np.int32)}


def test_train_step_on_8_devices_equals_1_device(tmp_path):
  procs = {}
  for n in (1, 8):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    procs[n] = subprocess.Popen(
        [sys.executable, "-c", SHARDED_SCRIPT, str(ROOT), str(n),
         str(tmp_path / f"{n}.npz")], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  for n, p in procs.items():
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out.decode()[-3000:]
  one, eight = np.load(tmp_path / "1.npz"), np.load(tmp_path / "8.npz")
  assert sorted(one) == sorted(eight) and len(one) > 20
  for k in one:
    np.testing.assert_allclose(one[k], eight[k], rtol=2e-4, atol=2e-5,
                               err_msg=k)
  # The steps did something (params and BN statistics moved from init).
  assert not np.allclose(one["[1]['bn_1']['mean']"], 0.0)


def test_apply_masks_matches_the_layers_forward_pass():
  model, _, st = _tiny_state(masks=True)
  v = {"params": st.params, "batch_stats": st.batch_stats, "masks": st.masks}
  rng = np.random.default_rng(1)
  masks = jax.tree.map(
      lambda m: jnp.asarray(rng.random(m.shape) > 0.4, m.dtype), v["masks"])
  masked = models.apply_masks(v["params"], masks)
  conv = masked["stage_1"]["0"]["conv_a"]["kernel"]
  m = masks["stage_1"]["0"]["conv_a"]["kernel"]
  np.testing.assert_array_equal(conv == 0, np.broadcast_to(m == 0, conv.shape)
                                | (v["params"]["stage_1"]["0"]["conv_a"][
                                    "kernel"] == 0))
  bn = masked["stage_1"]["0"]["bn_a"]
  bm = masks["stage_1"]["0"]["bn_a"]["scale"]
  assert np.all(bn["bias"][bm == 0] == 0) and np.all(bn["scale"][bm == 0] == 0)
  x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  apply = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
  with_masks = apply({**v, "masks": masks}, x)
  pre_masked = apply({"params": masked, "batch_stats": v["batch_stats"]}, x)
  np.testing.assert_allclose(with_masks, pre_masked, rtol=1e-5, atol=1e-6)
  assert models.apply_masks(v["params"], {}) is v["params"]
  with pytest.raises(KeyError, match="no parameter"):
    models.apply_masks(v["params"], {"nope": {"kernel": m}})


def _tiny_state(masks=False):
  model = models.create_model("cifar_resnet8", 10)
  tx = optim.sgd_torch(0.05, 0.9, 1e-4)
  state = state_lib.create_train_state(model, tx, jax.random.key(0),
                                       (32, 32, 3), with_masks=masks)
  return model, tx, state


def test_masked_train_step_keeps_pruned_weights_zero_and_evaluate_pads():
  model, tx, state = _tiny_state(masks=True)
  mesh = mesh_lib.make_mesh()
  m = state.masks["stage_2"]["0"]["conv_b"]["kernel"]
  state = state.replace(masks=jax.tree.map(lambda x: x, state.masks))
  state.masks["stage_2"]["0"]["conv_b"]["kernel"] = m.at[:, :3].set(0.0)
  state.masks["stage_1"]["0"]["bn_a"]["scale"] = (
      state.masks["stage_1"]["0"]["bn_a"]["scale"].at[1].set(0.0))
  state = mesh_lib.replicate(state, mesh)
  step = steps.make_train_step(model, tx, INFO, mesh)
  for b in batches(2, 8):
    state, metrics = step(state, mesh_lib.global_batch(b, mesh))
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
  k = state.params["stage_2"]["0"]["conv_b"]["kernel"]
  assert np.all(np.asarray(k)[..., :3] == 0) and np.any(np.asarray(k)[..., 3:])
  assert float(state.params["stage_1"]["0"]["bn_a"]["bias"][1]) == 0.0
  # Evaluation counts only unmasked examples, whatever the padding.
  ev = steps.make_eval_step(model, INFO, mesh)
  b = next(batches(1, 13, seed=5))
  b["mask"] = np.arange(13) < 11
  r = steps.evaluate(ev, state, [b], mesh)
  assert r["count"] == 11
  logits = jax.jit(lambda v, x: model.apply(
      v, steps.preprocess(None, x, INFO), train=False))(
          state.variables(), jnp.asarray(b["image"]))
  want = float(np.mean(np.argmax(logits, -1)[:11] == b["label"][:11]))
  assert r["accuracy"] == pytest.approx(want)


class _Stream:
  """A checkpointable stream of batches (the grain iterator's contract)."""

  def __init__(self, size=4):
    self.pos, self.size = 0, size

  def __iter__(self):
    return self

  def __next__(self):
    b = next(batches(1, self.size, seed=self.pos))
    self.pos += 1
    return b

  def get_state(self):
    return json.dumps({"pos": self.pos}).encode()

  def set_state(self, s):
    self.pos = json.loads(s.decode())["pos"]


def _config(**kw):
  c = config_lib.default_config()
  c.model = "cifar_resnet8"
  c.progress_bar = False
  c.update(kw)
  return c


def _toy_stage(tmp_path, num_steps, nan_at=None, **cfg):
  """run_stage with a cheap jitted step: params ← params − mean(image)."""
  state = state_lib.TrainState(
      step=jnp.zeros([], jnp.int32), params={"w": jnp.ones(3)},
      batch_stats={}, masks={}, gates={}, opt_state={}, rng=jax.random.key(0))
  mesh = mesh_lib.make_mesh()

  @jax.jit
  def step_fn(s, b):
    w = s.params["w"] - 1e-3 * jnp.mean(b["image"].astype(jnp.float32))
    loss = jnp.sum(w)
    if nan_at is not None:
      loss = jnp.where(s.step + 1 == nan_at, jnp.nan, loss)
    return s.replace(step=s.step + 1, params={"w": w}), {"loss": loss}

  evals = []

  def eval_fn(s):
    evals.append(int(s.step))
    return {"test": {"accuracy": float(-s.params["w"][0]), "loss": 0.0}}

  return loop.run_stage("toy", mesh_lib.replicate(state, mesh), step_fn,
                        num_steps=num_steps, train_data=_Stream(),
                        steps_per_epoch=4, mesh=mesh, workdir=tmp_path,
                        config=_config(**cfg), eval_fn=eval_fn), evals


def test_run_stage_resumes_and_skips_finished_stage(tmp_path):
  full, _ = _toy_stage(tmp_path / "a", 10, checkpoint_every_steps=3)
  part, _ = _toy_stage(tmp_path / "b", 10, checkpoint_every_steps=3,
                       max_steps=5)
  assert part.steps == 5
  resumed, evals = _toy_stage(tmp_path / "b", 10, checkpoint_every_steps=3)
  assert resumed.steps == 10 and evals == [8, 10]  # Epoch ends, and the end.
  np.testing.assert_array_equal(resumed.state.params["w"],
                                full.state.params["w"])
  again, evals = _toy_stage(tmp_path / "b", 10)
  assert again.steps == 10 and evals == []  # Done: nothing re-run.
  summary = full.summary("test")
  assert full.best_step == 10 and summary["best"]["test"]["accuracy"] > 0
  with pytest.raises(ckpt_lib.CheckpointError, match="num_steps"):
    _toy_stage(tmp_path / "b", 12)


def test_corrupted_checkpoint_is_set_aside_and_the_run_falls_back(tmp_path):
  _toy_stage(tmp_path, 10, max_steps=4, checkpoint_every_steps=2)
  state_dir = tmp_path / "toy" / "steps" / "4" / "state"
  files = [p for p in state_dir.rglob("*") if p.is_file()]
  assert files
  for p in files:
    p.write_bytes(b"garbage")
  resumed, _ = _toy_stage(tmp_path, 10, checkpoint_every_steps=2)
  full, _ = _toy_stage(tmp_path / "full", 10, checkpoint_every_steps=2)
  np.testing.assert_array_equal(resumed.state.params["w"],
                                full.state.params["w"])
  # Moved aside untouched, never deleted.
  aside = tmp_path / "toy" / "damaged" / "steps-4" / "state"
  assert sorted(p.relative_to(aside) for p in aside.rglob("*")
                if p.is_file()) == sorted(
      p.relative_to(state_dir) for p in files)
  assert all(p.read_bytes() == b"garbage" for p in aside.rglob("*")
             if p.is_file())


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
  with pytest.raises(loop.TrainingDiverged, match="at step 7.*step 6"):
    _toy_stage(tmp_path, 10, nan_at=7, checkpoint_every_steps=2)
  steps_dir = tmp_path / "toy" / "steps"
  assert max(int(p.name) for p in steps_dir.iterdir() if p.name.isdigit()) == 6


def test_cross_entropy_matches_torch():
  import torch
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 5)
  want = torch.nn.functional.cross_entropy(torch.tensor(logits),
                                           torch.tensor(labels)).item()
  got = float(jnp.mean(steps.cross_entropy(jnp.asarray(logits),
                                           jnp.asarray(labels))))
  assert got == pytest.approx(want, rel=1e-6)


def test_report_merges_saves_and_summarises(tmp_path):
  from training.report import MetricsWriter, Report
  r = Report(tmp_path, method="dsp", model="cifar_resnet20", dataset="digits")
  r.add_stage("group", {"steps": 5, "seconds": 1.5,
                        "final": {"test": {"accuracy": 0.5}},
                        "best": {"test": {"accuracy": 0.75}}})
  r.merge({"pruning": {"p_flops": 60.0}, "params": 1000})
  r.merge({"pruning": {"p_params": np.float32(50.0)}})
  r.save()
  again = Report(tmp_path)  # A resumed run keeps what was reported.
  assert again.data["pruning"] == {"p_flops": 60.0, "p_params": 50.0}
  text = again.summary()
  assert "group" in text and "50.00" in text and "75.00" in text
  assert "pruning" in text
  w = MetricsWriter(tmp_path)
  for step in (1, 2, 3):
    w.write("s", step, "train", {"loss": jnp.float32(step)})
  w.truncate("s", 1)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1]
