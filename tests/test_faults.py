"""Faults and hostile input: each ends in one line, runs nothing, loses nothing.

A payload in a dataset pickle, a diverging state, two runs on one workdir, a
damaged checkpoint, a full disk, a cut-short export, an interrupt during an
export and the re-run of an earlier stage of a finished workdir.
"""

import errno
import io
import json
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from convert import preprocess
from tests.test_engine import INFO, _Stream, _config, batches
from training import artifacts
from training import checkpoint as ckpt_lib
from training import errors
from training import finite
from training import integrity
from training import loop
from training import mesh as mesh_lib
from training import optim
from training import state as state_lib
from training import steps
from training import workdir as workdir_lib
from training.datasets import cifar

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The input description of the test exports.
_SPEC = preprocess.spec(32, 3, [0.5] * 3, [0.5] * 3, "digits")


def _env(tmp_path):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
          "TFDS_DATA_DIR": str(tmp_path / "tfds")}


def _one_error_line(stderr):
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  return lines[0]


# --------------------------------------------------------------- toy stage
def _toy_state(size):
  w = jax.random.normal(jax.random.key(1), (size,))  # Incompressible.
  return state_lib.TrainState(
      step=jnp.zeros([], jnp.int32), params={"w": w}, batch_stats={},
      masks={}, gates={}, opt_state={"m": jnp.zeros(size)},
      rng=jax.random.key(0))


def _toy_stage(workdir, num_steps, *, size=3, nan_params_at=None,
               report=True, evaluate=True, **cfg):
  """run_stage with a cheap step; from step ``nan_params_at`` on, the params
  are NaN while the loss stays finite (the loss is computed before them)."""
  mesh = mesh_lib.make_mesh()

  @jax.jit
  def step_fn(s, b):
    loss = jnp.sum(s.params["w"][:3])
    w = s.params["w"] - 1e-3 * jnp.mean(b["image"].astype(jnp.float32))
    if nan_params_at is not None:
      w = jnp.where(s.step + 1 >= nan_params_at, jnp.nan, w)
    new = s.replace(step=s.step + 1, params={"w": w},
                    opt_state={"m": s.opt_state["m"] + 1.0})
    metrics = {"loss": loss}
    if report:
      metrics[finite.KEY] = finite.all_finite(new)
    return new, metrics

  def eval_fn(s):  # Falls with every step: the best checkpoint is the first.
    return {"test": {"accuracy": float(s.params["w"][0]), "loss": 0.0}}

  return loop.run_stage(
      "toy", mesh_lib.replicate(_toy_state(size), mesh), step_fn,
      num_steps=num_steps, train_data=_Stream(), steps_per_epoch=4,
      mesh=mesh, workdir=workdir, config=_config(**cfg),
      eval_fn=eval_fn if evaluate else None)


def _saved_states(stage_dir):
  """Every checkpoint's state tree under a stage directory, by its path."""
  out = {}
  for kind in ("steps", "best"):
    for d in sorted((stage_dir / kind).iterdir()):
      if d.name.isdigit():
        out[f"{kind}/{d.name}"] = ocp.PyTreeCheckpointer().restore(d / "state")
  return out


# ------------------------------------------------------------ hostile data
def test_cifar_pickle_payload_runs_nothing_and_is_one_line(tmp_path):
  marker = tmp_path / "MARKER"

  class Payload:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  raw = pickle.dumps({b"data": Payload(), b"labels": [1]}, protocol=2)
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
      info = tarfile.TarInfo(f"cifar-10-batches-py/{f}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "run.py", "--config", "configs/base.py",
       "--config.dataset=cifar10", f"--config.data_dir={data_dir}",
       "--workdir", str(workdir)], cwd=ROOT, env=_env(tmp_path),
      capture_output=True, text=True, timeout=300)
  line = _one_error_line(proc.stderr)
  assert proc.returncode == errors.EXIT_STATUS
  assert "data_batch_1" in line and "posix.system" in line, line
  assert not marker.exists()
  # Nothing half-prepared, no workdir.
  assert sorted(p.name for p in data_dir.iterdir()) == [
      "cifar-10-python.tar.gz"]
  assert not workdir.exists()


def test_cifar_batches_of_numpy_1_and_2_and_every_protocol_load():
  data = (np.arange(2 * 3072) % 256).astype(np.uint8).reshape(2, 3072)
  batch = {b"data": data, b"labels": [3, 4], b"filenames": [b"a", b"b"],
           b"batch_label": b"training batch 1 of 5", b"n": np.int64(2)}
  for protocol in (2, 3, 4, 5):
    raw = pickle.dumps(batch, protocol=protocol)
    np.testing.assert_array_equal(cifar.load_batch(raw, "x")[b"data"], data)
  # numpy 1.x wrote numpy.core, numpy 2.x numpy._core.
  old = pickle.dumps(batch, protocol=2).replace(b"numpy._core.", b"numpy.core.")
  assert b"numpy.core.multiarray" in old
  np.testing.assert_array_equal(cifar.load_batch(old, "x")[b"data"], data)
  with pytest.raises(ValueError, match="dtype object"):
    cifar.load_batch(pickle.dumps({b"data": np.array([None])}, protocol=2),
                     "x")
  with pytest.raises(ValueError, match="builtins.eval"):
    cifar.load_batch(b"cbuiltins\neval\n(S'1'\ntR.", "x")


# ------------------------------------------------------------ finite state
@pytest.mark.filterwarnings("ignore:Sharding info not provided")
@pytest.mark.parametrize("report", [True, False],
                         ids=["step-reports", "loop-checks"])
def test_non_finite_state_is_never_checkpointed(tmp_path, report):
  with pytest.raises(loop.TrainingDiverged) as err:
    _toy_stage(tmp_path, 12, nan_params_at=7, report=report,
               checkpoint_every_steps=2)
  message = str(err.value)
  assert "not finite (first: params/w" in message
  if report:  # Found at the step itself.
    assert "at step 7" in message
  assert "last checkpoint (step 6)" in message
  saved = _saved_states(tmp_path / "toy")
  assert "steps/6" in saved and not any(k.endswith("/8") for k in saved)
  for where, tree in saved.items():
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      if np.issubdtype(np.asarray(leaf).dtype, np.floating):
        assert np.isfinite(leaf).all(), (where, path)


def test_engine_step_reports_a_non_finite_state():
  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(10)(x.reshape(x.shape[0], -1))

  mesh = mesh_lib.make_mesh()
  tx = optim.sgd_torch(lambda t: jnp.inf, 0.9, 0.0)  # Overflows at once.
  state = mesh_lib.replicate(state_lib.create_train_state(
      Tiny(), tx, jax.random.key(0), (32, 32, 3)), mesh)
  step = steps.make_train_step(Tiny(), tx, INFO, mesh)
  flags = []
  for b in batches(3, 8):
    state, m = step(state, mesh_lib.global_batch(b, mesh))
    flags.append((float(m["loss"]), float(m[finite.KEY])))
  assert np.isfinite(flags[0][0]) and flags[0][1] == 0.0  # Loss still fine.
  assert finite.first_non_finite(state).startswith("params/Dense_0/")


# ------------------------------------------------------------ one run only
def test_second_run_on_a_locked_workdir_stops_at_once(tmp_path):
  workdir = tmp_path / "run"
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time\nfrom training import workdir\n"
       "with workdir.lock(sys.argv[1]):\n"
       "  print('held', flush=True)\n  time.sleep(120)\n", str(workdir)],
      cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "run.py", "--config", "configs/base.py",
         "--config.model=cifar_resnet10_tiny", "--workdir", str(workdir)],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
        timeout=120)
    seconds = time.monotonic() - start
    line = _one_error_line(proc.stderr)
    assert proc.returncode == errors.EXIT_STATUS
    assert f"pid {holder.pid}" in line and "in use" in line, line
    assert seconds < 60  # Startup (imports) only: no data, no compile.
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lib.lock(workdir):  # kill -9 leaves no stale lock.
    assert f"pid {os.getpid()}" in (workdir / ".lock").read_text()


# ------------------------------------------------------- damaged checkpoint
def _garbage(step_dir):
  for p in (step_dir / "state").rglob("*"):
    if p.is_file():
      p.write_bytes(b"garbage")


def _flip_one_bit(step_dir):
  chunks = [p for p in (step_dir / "state").rglob("*")
            if p.is_file() and p.parent.name == "d"]
  target = max(chunks, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0x10
  target.write_bytes(bytes(data))


def _unsealed_garbage(step_dir):
  (step_dir / ckpt_lib.MANIFEST).unlink()
  _garbage(step_dir)


@pytest.mark.parametrize("damage", [_garbage, _flip_one_bit,
                                    _unsealed_garbage],
                         ids=["garbage", "bit-flip", "unsealed-garbage"])
def test_damaged_newest_checkpoint_falls_back_to_an_older_one(
    tmp_path, capsys, damage):
  reference = _toy_stage(tmp_path / "ref", 10, size=4096,
                         checkpoint_every_steps=2)
  _toy_stage(tmp_path / "run", 10, size=4096, checkpoint_every_steps=2)
  stage = tmp_path / "run" / "toy"
  assert sorted(int(p.name) for p in (stage / "steps").iterdir()) == [8, 10]
  damage(stage / "steps" / "10")
  capsys.readouterr()
  resumed = _toy_stage(tmp_path / "run", 10, size=4096,
                       checkpoint_every_steps=2)
  out = capsys.readouterr().out
  assert "checkpoint steps/10 is damaged" in out
  assert "toy: resuming from step 8 of 10" in out
  # Moved aside, not deleted.
  assert (stage / "damaged" / "steps-10" / "state").is_dir()
  leaves = [jax.tree.leaves(r.state.replace(rng=jax.random.key_data(
      r.state.rng))) for r in (reference, resumed)]
  for a, b in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ckpt_lib.damage(stage / "steps" / "10") is None  # Saved anew.


# ---------------------------------------------------------------- full disk
def _mount_tmpfs(path, size):
  """A size-limited tmpfs at ``path``; False where mounting is not allowed."""
  path.mkdir()
  if shutil.which("mount") is None:
    return False
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                         "tmpfs", str(path)], capture_output=True)
  return proc.returncode == 0


def test_full_disk_is_one_line_and_nothing_half_written_is_trusted(
    tmp_path, capfd, monkeypatch):
  disk = tmp_path / "disk"
  # A real full filesystem where the machine allows mounting one, else a
  # writer that fails like one.
  mounted = _mount_tmpfs(disk, "1200k")
  try:
    if not mounted:
      real_save = ocp.CheckpointManager.save

      def save(self, step, *args, **kwargs):
        if step >= 6:
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, step, *args, **kwargs)

      monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    workdir = disk / "run"
    size = 200_000  # 0.8 MB of random float32 per checkpoint.

    def train():
      with workdir_lib.hold(workdir):
        _toy_stage(workdir, 12, size=size, evaluate=False,
                   checkpoint_every_steps=2, keep_checkpoints=1)

    capfd.readouterr()
    # As run.py reports them.
    assert errors.call(train, extra=(ckpt_lib.CheckpointError,)) == (
        errors.EXIT_STATUS)
    err = capfd.readouterr().err
    line = _one_error_line(err)
    assert "no space left on device" in line.lower(), line
    assert "checkpoint step" in line, line
    # Every checkpoint left is complete and sealed; none is newer than the
    # failure.
    stage = workdir / "toy"
    kept = [p for p in (stage / "steps").iterdir() if p.name.isdigit()]
    assert kept and all(ckpt_lib.is_sealed(p) and ckpt_lib.damage(p) is None
                        for p in kept)
    failed = int(line.split("checkpoint step ")[1].split()[0])
    assert max(int(p.name) for p in kept) < failed

    # An export onto the full disk: one line, nothing recorded as done.
    from convert import stamp
    out = disk / "export"
    blob = os.urandom(3_000_000)

    def export():
      if not mounted:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      path = artifacts.write_with(out / "model.bin", lambda f: f.write(blob))
      return {"files": {"model.bin": str(path)}}

    variables = {"params": {"w": np.ones(3, np.float32)}}
    capfd.readouterr()
    assert errors.call(lambda: stamp.export_once(
        out, variables, _SPEC, export)) == errors.EXIT_STATUS
    assert "No space left on device" in _one_error_line(capfd.readouterr().err)
    assert not (out / stamp.FILE).exists()
    assert not out.exists() or not any(out.iterdir())
  finally:
    if mounted:
      subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------ exports
def test_damaged_or_moved_export_is_judged_by_its_content(tmp_path):
  from convert import stamp
  info = _SPEC
  variables = {"params": {"w": np.ones(3, np.float32)}}
  workdir = tmp_path / "run"
  out = workdir / "export"
  calls = []

  def export():
    calls.append(1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.bin").write_bytes(b"0123456789" * 100)
    return {"files": {"model.bin": str(out / "model.bin")}}

  entry, skipped = stamp.export_once(out, variables, info, export)
  assert not skipped and entry["files"]["model.bin"] == "export/model.bin"
  source = json.loads((out / stamp.FILE).read_text())
  assert all(not os.path.isabs(p) for p in source["files"].values())
  # A copy of the workdir is up to date where it lies.
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  assert stamp.export_once(copy / "export", variables, info, export)[1]
  # Truncated, then the same size with one bit flipped: exported again.
  with open(out / "model.bin", "r+b") as f:
    f.truncate(10)
  assert not stamp.export_once(out, variables, info, export)[1]
  data = bytearray((out / "model.bin").read_bytes())
  data[500] ^= 1
  (out / "model.bin").write_bytes(bytes(data))
  assert not stamp.export_once(out, variables, info, export)[1]
  assert stamp.export_once(out, variables, info, export)[1]
  assert len(calls) == 3
  with pytest.raises(ValueError, match="not finite.*params/w"):
    stamp.export_once(out, {"params": {"w": np.array([np.nan])}}, info,
                      export)


# An export that gets Ctrl-C between its two files.
EXPORT_SCRIPT = r"""
import os, pathlib, signal, sys
from convert import preprocess, stamp
from training import integrity
out = pathlib.Path(sys.argv[1])
info = preprocess.spec(32, 3, [0.5] * 3, [0.5] * 3, "digits")

def export():
  first = integrity.atomic_write(out / "a.bin", "a" * 100)
  os.kill(os.getpid(), signal.SIGINT)
  second = integrity.atomic_write(out / "b.bin", "b" * 100)
  return {"files": {"a.bin": str(first), "b.bin": str(second)}}

stamp.export_once(out, {"w": [1.0]}, info, export)
"""


def test_interrupted_export_is_130_without_traceback_and_redone(tmp_path):
  from convert import stamp
  out = tmp_path / "export"
  proc = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(out)],
                        cwd=ROOT, env=_env(tmp_path), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == errors.INTERRUPTED_STATUS
  assert proc.stderr.strip() == "interrupted", proc.stderr
  assert (out / "a.bin").read_bytes() == b"a" * 100
  assert not (out / "b.bin").exists() and not (out / "source.json").exists()

  def export():  # The same export, not interrupted.
    files = {n: integrity.atomic_write(out / n, n[0] * 100)
             for n in ("a.bin", "b.bin")}
    return {"files": {n: str(p) for n, p in files.items()}}

  assert not stamp.export_once(out, {"w": [1.0]}, _SPEC, export)[1]
  assert stamp.export_once(out, {"w": [1.0]}, _SPEC, export)[1]


# ------------------------------------------------------ re-running a stage
def test_re_running_an_earlier_stage_that_would_change_is_refused(tmp_path):
  import models
  from training import pipeline
  from training.report import Report
  mesh = mesh_lib.make_mesh()

  def run(name, max_steps):
    @jax.jit
    def step_fn(s, b):
      return s.replace(step=s.step + 1), {"loss": jnp.float32(0.0)}
    return loop.run_stage(
        name, mesh_lib.replicate(_toy_state(3), mesh), step_fn, num_steps=8,
        train_data=_Stream(), steps_per_epoch=4, mesh=mesh, workdir=tmp_path,
        config=_config(method="ddrop", max_steps=max_steps,
                       checkpoint_every_steps=2))

  run("before", 4)
  run("ddrop", 4)
  assert run("before", 4).steps == 4  # Unchanged: nothing to invalidate.
  with pytest.raises(ckpt_lib.CheckpointError,
                     match="stage 'before' would train.*later stage.*ddrop"):
    run("before", 0)
  # Re-run alone, 'before' leaves the figures of the later stages' model.
  model = models.create_model("cifar_resnet10_tiny", 10)
  variables = artifacts.random_variables(model, 0)
  for stages, merged in (("before", False), ("before,ddrop", True)):
    env = pipeline.Env(mesh, INFO, None, 4, tmp_path, Report(tmp_path), None,
                       _config(method="ddrop", stages=stages))
    pipeline.merge_model_figures(env, model, variables)
    assert ("params" in env.report.data) == merged, stages
  # Sub-stages: a cycle is followed by the cycles after it.
  for cycle in ("cycle_2", "cycle_10"):
    (tmp_path / "prune_finetune" / cycle).mkdir(parents=True)
    (tmp_path / "prune_finetune" / cycle / "meta.json").write_text("{}")
  (tmp_path / "export").mkdir()
  (tmp_path / "export" / "source.json").write_text("{}")
  order = ("pretrain", "group", "prune_finetune", "pack")
  assert workdir_lib.later_results(tmp_path, order, "group") == [
      "prune_finetune", "pack"]
  assert workdir_lib.later_results(
      tmp_path, order, "prune_finetune/cycle_2") == [
          "prune_finetune/cycle_10", "pack"]
