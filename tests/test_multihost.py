"""Multi-process jobs on one machine (training.launch, simulated CPU devices).

2 processes x 2 devices must end where 1 process x 4 devices ends (same
global batch), survive a kill -9 + restart bit-identically, evaluate every
example once, and reject bad settings with one error line, without hanging.
Every run is bounded by a timeout; the launcher SIGKILLs its processes.
"""

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
from training import artifacts
from training import config as config_lib
from training import launch
from training import mesh as mesh_lib

pytestmark = pytest.mark.multihost

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 400
COMMON = ["--config.batch_size=32", "--config.test_batch_size=200",
          "--config.progress_bar=False", "--config.log_every_steps=1",
          "--config.distributed_timeout=120"]
DSP = ["--config", "configs/quickstart.py", "--config.model=cifar_resnet8",
       "--config.max_steps=3", "--config.checkpoint_every_steps=100",
       "--config.stages=group,prune_finetune", "--config.dsp.groups=2",
       "--config.dsp.pretrain_epochs=0", "--config.dsp.group_epochs=1",
       "--config.dsp.finetune_epochs=1", "--config.dsp.cycles=1",
       "--config.dsp.prune_rate=0.3", *COMMON]
DDROP_STEPS = 4
# One keep probability for every unit: units still drop at random, but a
# rank flip between two nearly tied importances (round-off of a different
# reduction order) cannot change which unit drops more, which would amplify
# round-off beyond any tolerance within a few steps.
DDROP = ["--config", "configs/ddrop_quickstart.py",
         f"--config.max_steps={DDROP_STEPS}",
         "--config.checkpoint_every_steps=2",
         "--config.stages=ddrop,prune,finetune",
         "--config.ddrop.before_epochs=0", "--config.ddrop.epochs=1",
         "--config.ddrop.ft_epochs=1", "--config.ddrop.prob=(0.6,0.6)",
         *COMMON]


def _env(devices=1, cache=None):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "XLA_FLAGS"))}
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if cache:  # Reruns of one program skip compilation.
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return env


def _failure(out):
  """The error lines of a failed command, then the end of its stderr."""
  errors = [l for l in out.stderr.splitlines()
            if l.startswith(("error:", "process ")) or "Error" in l]
  return "\n".join(errors[:20]) + "\n...\n" + out.stderr[-2000:]


def _single(workdir, args, devices, cache=None):
  """``run.py`` as one process with ``devices`` simulated devices."""
  out = subprocess.run(
      [sys.executable, "run.py", *args, "--workdir", str(workdir)], cwd=ROOT,
      env=_env(devices, cache), capture_output=True, text=True,
      timeout=TIMEOUT)
  assert out.returncode == 0, _failure(out)
  return out


def _launch_cmd(workdir, args, n=2, devices=2):
  return [sys.executable, "-m", "training.launch", "-n", str(n),
          "--devices-per-process", str(devices), "--timeout", str(TIMEOUT),
          "--", "run.py", *args, "--workdir", str(workdir)]


def _multi(workdir, args, cache=None):
  """``run.py`` as 2 processes x 2 devices through the launcher."""
  out = subprocess.run(_launch_cmd(workdir, args), cwd=ROOT, env=_env(1, cache),
                       capture_output=True, text=True, timeout=TIMEOUT + 60)
  assert out.returncode == 0, _failure(out)
  return out


def _assert_close(a, b, exact_keys=("masks",)):
  """Variables equal within 1e-5 (masks exactly)."""
  flat_a, flat_b = _flat(a), _flat(b)
  assert sorted(flat_a) == sorted(flat_b) and len(flat_a) > 10
  for k, x in flat_a.items():
    y = flat_b[k]
    if k[0] in exact_keys:
      assert np.array_equal(x, y), k
    else:
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, err_msg=str(k))


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = np.asarray(v)
  return out


def _stage_state(workdir, stage):
  """The newest periodic checkpoint's state of a stage (numpy)."""
  steps = workdir / stage / "steps"
  step = max(int(p.name) for p in steps.iterdir() if p.name.isdigit())
  path = steps / str(step) / "state"
  ckptr = ocp.PyTreeCheckpointer()
  # As numpy: the saved shardings name devices this process does not have.
  tree = ckptr.metadata(path).item_metadata.tree
  return step, ckptr.restore(path, restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("xla_cache")


@pytest.mark.slow  # Two jobs: about 1 min on 2 idle cores.
def test_dsp_two_processes_match_one_process(tmp_path, cache):
  one, two = tmp_path / "one", tmp_path / "two"
  _single(one, DSP, devices=4, cache=cache)
  _multi(two, DSP, cache=cache)
  for stage in ("group", "prune_finetune"):
    _, a, _ = artifacts.load_variables(one / stage / "output")
    _, b, _ = artifacts.load_variables(two / stage / "output")
    _assert_close(a, b)
  _, pruned, _ = artifacts.load_variables(two / "prune_finetune" / "output")
  m = np.concatenate([np.ravel(x) for x in _flat(pruned["masks"]).values()])
  assert 0 < m.mean() < 1  # A real prune, identical in both runs.
  ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
  assert ra["beta"] == rb["beta"]
  assert ra["structure"] == rb["structure"]
  # Evaluation with 2 processes counts every example exactly once (360 test
  # and 180 validation digits: 200-batches leave a remainder batch).
  final = rb["stages"]["prune_finetune/cycle_1"]["final"]
  assert final["test"]["count"] == 360
  assert final["validation"]["count"] == 180
  # Only process 0 wrote files: one line per logged step.
  recs = [json.loads(l) for l in
          (two / "metrics.jsonl").read_text().splitlines()]
  train = [(r["stage"], r["step"]) for r in recs if r["split"] == "train"]
  assert len(train) == len(set(train)) == 6


def _children(pid):
  path = pathlib.Path(f"/proc/{pid}/task/{pid}/children")
  return [int(c) for c in path.read_text().split()] if path.exists() else []


def _process_id(pid):
  env = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
  for item in env:
    if item.startswith(mesh_lib.ENV_PROCESS_ID.encode() + b"="):
      return int(item.split(b"=", 1)[1])
  return None


def _committed_steps(workdir, stage):
  d = workdir / stage / "steps"
  return [int(p.name) for p in d.iterdir() if p.name.isdigit()] if (
      d.exists()) else []


@pytest.mark.slow  # Four jobs: about 2 min on 2 idle cores.
def test_ddrop_two_processes_match_one_process_and_resume_after_kill(
    tmp_path, cache):
  one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
  _single(one, DDROP, devices=4, cache=cache)
  _multi(two, DDROP, cache=cache)
  for stage in ("ddrop", "finetune"):  # finetune holds the prune's masks.
    step_a, a = _stage_state(one, stage)
    step_b, b = _stage_state(two, stage)
    assert step_a == step_b == DDROP_STEPS
    _assert_close({k: a[k] for k in ("params", "batch_stats", "masks")},
                  {k: b[k] for k in ("params", "batch_stats", "masks")})
  masks = np.concatenate([np.ravel(x) for x in _flat(b["masks"]).values()])
  assert 0 < masks.mean() < 1
  ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
  assert ra["pruned_units"] == rb["pruned_units"]

  # kill -9 of one process mid-stage: the job fails (launcher kills the
  # rest); restarting every process resumes bit-identically.
  job = subprocess.Popen(_launch_cmd(killed, DDROP), cwd=ROOT,
                         env=_env(1, cache), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
  deadline = time.time() + TIMEOUT
  while not _committed_steps(killed, "ddrop") and job.poll() is None:
    assert time.time() < deadline, "no checkpoint was written"
    time.sleep(0.02)
  victims = [p for p in _children(job.pid) if _process_id(p) == 1]
  assert victims and job.poll() is None, "the job ended before the kill"
  os.kill(victims[0], signal.SIGKILL)
  _, err = job.communicate(timeout=60)
  assert job.returncode == 128 + signal.SIGKILL, err[-2000:]
  assert "process 1 failed" in err
  assert not _children(job.pid)
  at_kill = max(_committed_steps(killed, "ddrop"))
  assert at_kill < DDROP_STEPS
  out = _multi(killed, DDROP, cache=cache)
  assert "ddrop: resuming from step" in out.stdout
  for stage in ("ddrop", "finetune"):
    _, a = _stage_state(two, stage)
    _, b = _stage_state(killed, stage)
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 10
    for (path, x), y in zip(leaves_a, leaves_b):  # Params, optimizer, rng...
      assert np.array_equal(np.asarray(x), np.asarray(y)), (stage, path)


def _error_line(out):
  lines = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert out.returncode != 0 and len(lines) == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  return lines[0]


def _run_py(args, env, timeout=120):
  return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_batch_not_divisible_names_both_numbers(tmp_path):
  out = _run_py([*DDROP, "--config.batch_size=30", "--workdir",
                 str(tmp_path / "w")], _env(devices=4))
  line = _error_line(out)
  assert "batch_size=30" in line and "number of devices (4" in line


def test_process_id_out_of_range_and_unreachable_coordinator(tmp_path):
  port = launch.free_port()
  env = {**_env(), mesh_lib.ENV_COORDINATOR: f"127.0.0.1:{port}",
         mesh_lib.ENV_NUM_PROCESSES: "2", mesh_lib.ENV_PROCESS_ID: "2"}
  line = _error_line(_run_py([*DDROP, "--workdir", str(tmp_path / "w")], env))
  assert "process_id=2" in line and "num_processes=2" in line
  # Nobody listens on the port: bounded by distributed_timeout.
  env[mesh_lib.ENV_PROCESS_ID] = "1"
  start = time.time()
  line = _error_line(_run_py([*DDROP, "--config.distributed_timeout=3",
                              "--workdir", str(tmp_path / "w")], env))
  assert time.time() - start < 60
  assert f"127.0.0.1:{port}" in line and "distributed_timeout=3" in line


def test_mismatched_configs_are_refused_on_every_process(tmp_path):
  port = launch.free_port()
  procs = []
  for i, seed in enumerate((1, 2)):
    env = launch.process_env(_env(), f"127.0.0.1:{port}", 2, i, 1)
    procs.append(subprocess.Popen(
        [sys.executable, "run.py", *DDROP, f"--config.seed={seed}",
         "--workdir", str(tmp_path / "w")], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True))
  try:
    outs = [p.communicate(timeout=180) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  for p, (_, err) in zip(procs, outs):
    line = _error_line(subprocess.CompletedProcess([], p.returncode, "", err))
    assert "process(es) [1] run a configuration other than process 0's" in line


@pytest.mark.parametrize("environ,expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "3"}, ("h:1", 4, 3)),
])
def test_distributed_settings_from_environment(environ, expected):
  config = config_lib.default_config()
  got = mesh_lib.distributed_settings(config, environ)
  if expected is None:
    assert got is None
  else:
    assert (got.coordinator_address, got.num_processes,
            got.process_id) == expected


def test_distributed_settings_config_wins_and_partial_is_refused():
  config = config_lib.default_config()
  config.coordinator_address, config.num_processes = "c:2", 2
  config.process_id = 1
  got = mesh_lib.distributed_settings(config, {"JAX_PROCESS_ID": "0"})
  assert (got.coordinator_address, got.num_processes, got.process_id) == (
      "c:2", 2, 1)
  config.process_id = -1
  with pytest.raises(config_lib.ConfigError, match="but not process_id"):
    mesh_lib.distributed_settings(config, {})
  config.multihost = True  # Cluster detection fills in the rest.
  assert mesh_lib.distributed_settings(config, {}).process_id is None


def test_launcher_environment():
  env = launch.process_env({"XLA_FLAGS": "--xla_foo "
                            "--xla_force_host_platform_device_count=8"},
                           "127.0.0.1:5", 3, 2, 4)
  assert env["XLA_FLAGS"] == ("--xla_foo "
                              "--xla_force_host_platform_device_count=4")
  assert (env[mesh_lib.ENV_COORDINATOR], env[mesh_lib.ENV_NUM_PROCESSES],
          env[mesh_lib.ENV_PROCESS_ID]) == ("127.0.0.1:5", "3", "2")


def test_global_order_batches_do_not_depend_on_the_process_count():
  from training import data
  kw = dict(global_batch_size=32, seed=3, in_memory=True)
  whole = data.train_loader("digits", "train", global_order=True, **kw)
  parts = [data.train_loader("digits", "train", global_order=True,
                             process_index=p, process_count=2, **kw)
           for p in range(2)]
  plain = data.train_loader("digits", "train", **kw)  # One process's order.
  its = [iter(x) for x in (whole, plain, *parts)]
  for _ in range(45):  # Past the end of the first epoch (39 batches).
    w, p, a, b = (next(it) for it in its)
    for k in ("image", "label"):
      np.testing.assert_array_equal(w[k], p[k])
      np.testing.assert_array_equal(w[k], np.concatenate([a[k], b[k]]))
  assert its[2].get_state() == its[3].get_state()  # Any process's state.


_DIVERGE = """
import jax, numpy as np
from configs import base
from training import mesh
mesh.initialize_distributed(base.get_config())
same = {"masks": np.ones(3), "beta": np.float64(0.5)}
mesh.check_same_on_processes(same, "masks")
try:
  mesh.check_same_on_processes(
      {**same, "beta": np.float64(0.5 + 1e-12 * jax.process_index())}, "masks")
except RuntimeError as e:
  print(e, flush=True)
"""


def test_host_decisions_that_differ_between_processes_are_caught():
  out = subprocess.run(
      [sys.executable, "-m", "training.launch", "-n", "2", "--timeout", "120",
       "--", "-c", _DIVERGE], cwd=ROOT, env=_env(), capture_output=True,
      text=True, timeout=180)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "masks differ between process 0 and process(es) [1]" in out.stdout
