"""Fast inference exports: per-layer formulations, plans, files, JAX compact."""

from __future__ import annotations

import functools
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from torch.nn import functional as F

import models
from convert import cli, dsp, dsp_torch, fast, fast_jax, fast_specs, jax_side
from convert import slim
from convert import writer
from training import artifacts
from ddrop_jax import pruning, selection
from ddrop_jax.config import DdropConfig
from test_convert_dsp import masked_resnet

ATOL = 1e-4
CKPTS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / (
    "dsp_checkpoints")


@functools.cache
def dsp_pruned(name: str, groups: int):
  """A CifarResNet with random weights and random DSP group-structured masks."""
  return masked_resnet(name, groups, seed=groups)


@functools.cache
def jax_logits_fn(name: str):
  """Jitted eval logits of a registry model (one compile for all its masks)."""
  model = models.create_model(name, 10)
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


def masked_logits(name: str, variables, x: np.ndarray) -> np.ndarray:
  return np.asarray(jax_logits_fn(name)(variables, x))


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet56"])
@pytest.mark.parametrize("groups,fmt", [(1, "nchw"), (2, "channels_last"),
                                        (4, "nchw"), (6, "channels_last")])
def test_fast_model_equals_masked_jax(name, groups, fmt):
  _, v = dsp_pruned(name, groups)
  spec = fast_specs.from_packed(jax_side.plan_from_variables(v), name)
  assert spec.pruned
  plan = fast.make_plan(spec, memory_format=fmt)
  x = writer.random_images(2, seed=5)
  want = masked_logits(name, v, x)
  assert np.abs(want).max() > 1e-2  # not a vacuous comparison
  # float32 rounding grows with the logits, which reach ~1e3 in a random
  # ResNet-56: compare at the scale of logits of magnitude 10.
  tol = ATOL * max(1.0, float(np.abs(want).max()) / 10)
  got = writer.torch_logits(fast.build_torch(spec, plan), x)
  assert np.abs(got - want).max() <= tol
  # More than one formulation is in use, and the model saves MACs.
  assert len(plan.large.info["formulations"]) > 1 or groups == 1
  params, apply = fast_jax.compact(spec)
  if groups == 4:
    assert np.abs(np.asarray(jax.jit(apply)(params, x)) - want).max() <= tol


def test_export_writes_fast_files_that_load_without_project_code(tmp_path):
  _, v = dsp_pruned("cifar_resnet8", 4)
  spec = fast_specs.from_packed(jax_side.plan_from_variables(v), "r8")
  x = writer.random_images(3, seed=1)
  want = masked_logits("cifar_resnet8", v, x)
  np.savez(tmp_path / dsp.REFERENCE_IO, images=x,
           images_nchw=x.transpose(0, 3, 1, 2), logits=want)
  r = fast.export_fast(spec, tmp_path, x, want)
  assert set(r.max_abs_diff) == {fast.FAST, fast.FAST_PROGRAM}
  assert max(r.max_abs_diff.values()) <= ATOL
  plan = fast.Plan.load(tmp_path / fast.FAST_PLAN)
  assert plan.method == "cost_model" and plan.pruned
  # Gathers cost more in channels_last; its convs less at large batches.
  assert plan.regimes["small"].memory_format == "nchw"
  assert plan.large.memory_format == "channels_last" and plan.dispatches()
  assert "batch <= 8: nchw" in r.notes[-1]
  # Batches on both sides of the threshold: each regime's module.
  big = np.concatenate([x] * 3)[:plan.threshold + 1]
  big_want = np.concatenate([want] * 3)[:plan.threshold + 1]
  np.savez(tmp_path / "big.npz", images_nchw=big.transpose(0, 3, 1, 2),
           logits=big_want)
  prog = torch.export.load(str(tmp_path / fast.FAST_PROGRAM)).module()
  for xb, wb in ((x[:1], want[:1]), (x, want), (big, big_want)):
    assert np.abs(writer.torch_logits(prog, xb) - wb).max() <= ATOL
  dense = fast_specs.from_packed(jax_side.plan_from_variables(
      {k: v[k] for k in ("params", "batch_stats")}), "d")
  assert plan.info["macs"] < 0.8 * fast.spec_macs(dense)
  # A fresh interpreter where the project's packages cannot be imported.
  code = (
      "import sys\n"
      "for m in ('convert', 'models', 'dsp_jax', 'ddrop_jax', 'training'):\n"
      "  sys.modules[m] = None\n"
      "import numpy as np, torch\n"
      f"m = torch.jit.load({str(tmp_path / fast.FAST)!r})\n"
      "for f in ('reference_io.npz', 'big.npz'):\n"
      "  io = np.load(f)\n"
      "  for n in (1, len(io['logits'])):\n"
      "    with torch.no_grad():\n"
      "      y = m(torch.from_numpy(io['images_nchw'][:n])).numpy()\n"
      "    print(n, float(np.abs(y - io['logits'][:n]).max()))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, cwd=tmp_path)
  got = dict(line.split() for line in out.stdout.splitlines())
  assert set(got) == {"1", "3", str(plan.threshold + 1)}
  assert max(map(float, got.values())) <= ATOL
  # Frozen, the module keeps both regimes: NCHW, and a channels_last copy.
  code = torch.jit.load(str(tmp_path / fast.FAST)).code
  assert code.count("memory_format=2") == 1 and "if " in code


@pytest.mark.shared
@pytest.mark.skipif(not CKPTS.is_dir(), reason=f"released DSP checkpoints not "
                    f"found at {CKPTS} (the shared reference data)")
@pytest.mark.parametrize("name", ["resnet20_g2", "resnet20_g4", "resnet56_g3"])
def test_released_files_imported_fast_equals_masked_jax(name, tmp_path):
  plan = dsp_torch.read_packed(dsp.load_torchscript(CKPTS / f"{name}.pt"))
  model_name, overrides, v = jax_side.variables_from_plan(plan)
  model = models.create_model(model_name, plan.num_classes, **overrides)
  spec = fast_specs.from_packed(plan, model_name)
  x = writer.random_images(2, seed=9)
  want = artifacts.logits(model, v, x)
  r = fast.export_fast(spec, tmp_path, x, want, program=False)
  assert max(r.max_abs_diff.values()) <= ATOL
  if name == "resnet20_g4":
    params, apply = fast_jax.compact(spec)
    got = np.asarray(jax.jit(apply)(params, x))
    assert np.abs(got - want).max() <= ATOL


def ddrop_slimmed(name: str, amount: float = 0.5):
  model = models.create_model(name, 10)
  v = artifacts.random_variables(model, 0)
  layers = selection.prune_layers(model, selection.ddrop_layers(model), True)
  v = artifacts.to_numpy_tree(pruning.prune(v, layers,
                                           DdropConfig(amount=amount)))
  return model, v


@pytest.mark.parametrize("name", ["cifar_resnet18", "cifar_vgg11_bn"])
def test_ddrop_slim_fast_equals_masked_jax(name, tmp_path):
  model, v = ddrop_slimmed(name)
  r = slim.export_ddrop(model, v, tmp_path, num_images=2, program=False)
  assert fast.FAST in r.max_abs_diff
  assert max(r.max_abs_diff.values()) <= ATOL
  module, summary = slim.slim(model, v)
  spec = fast_specs.from_slim(module, name, 32)
  params, apply = fast_jax.compact(spec)
  x = writer.random_images(2, seed=3)
  want = artifacts.logits(model, v, x)
  assert np.abs(np.asarray(jax.jit(apply)(params, x)) - want).max() <= ATOL
  ts = torch.jit.load(str(tmp_path / fast.FAST))
  assert np.abs(writer.torch_logits(ts, x) - want).max() <= ATOL
  if name == "cifar_resnet18":
    # Exact residual forms: every block-last conv lost filters, so each is
    # an index-add or a zero-padded conv with a plain add.
    plan = fast.Plan.load(tmp_path / fast.FAST_PLAN)
    last = [b.main[-1].name for b in spec.body
            if isinstance(b, fast.BlockSpec) and b.main]
    assert last and all(plan.layers[n].formulation in ("union", "padded")
                        for n in last)


# ------------------------------------------------- formulations, one by one
def _conv(rng, cin, cout, hw, groups, relu=True):
  return fast.ConvSpec("c", cin, cout, 3, 1, 1, hw, [
      fast.BranchSpec(np.asarray(i), np.asarray(o),
                      rng.normal(size=(len(o), len(i), 3, 3)).astype(
                          np.float32),
                      rng.normal(size=len(o)).astype(np.float32))
      for i, o in groups], relu)


r_ = np.arange
# Layers on which the cost model picks each formulation: (groups, hw,
# residual width or None, memory format).
CHOSEN = {
    # Two narrow, disjoint branches in a wide layer: separate convs.
    "branches": ([(r_(0, 16), r_(0, 32)), (r_(48, 64), r_(32, 64))], 32, None,
                 "nchw"),
    # Two pairs of overlapping narrow branches: one conv per pair.
    "clusters": ([(r_(0, 8), r_(0, 4)), (r_(1, 9), r_(4, 8)),
                  (r_(40, 48), r_(8, 12)), (r_(41, 49), r_(12, 16))], 32, None,
                 "nchw"),
    # Overlapping branches: one conv over the union of their inputs.
    "union": ([(r_(0, 30), r_(0, 16)), (r_(2, 32), r_(16, 32))], 16, None,
              "nchw"),
    # The union is nearly every input: reading all beats gathering.
    "dense_in": ([(r_(0, 60), r_(0, 16)), (r_(2, 62), r_(16, 32))], 16, None,
                 "channels_last"),
    # A residual layer keeping most filters: zero rows beat an index-add.
    "padded": ([(r_(0, 64), r_(0, 60))], 16, 64, "channels_last"),
}


def _reference(spec: fast.NetSpec, x: torch.Tensor) -> torch.Tensor:
  """The network with every layer dense-shaped (zeros where pruned)."""
  def conv(c, x):
    w, b = c.dense()
    y = F.conv2d(x, torch.from_numpy(w), torch.from_numpy(b), c.stride,
                 c.padding)
    return torch.relu(y) if c.relu else y
  for item in spec.body:
    if isinstance(item, fast.ConvSpec):
      x = conv(item, x)
    else:
      y = x
      for c in item.main:
        y = conv(c, y)
      x = torch.relu(x + y)
  x = x.mean((2, 3))
  return F.linear(x, torch.from_numpy(spec.head[0][1]),
                  torch.from_numpy(spec.head[0][2]))


@pytest.mark.parametrize("formulation", fast.FORMULATIONS)
def test_each_formulation_is_chosen_somewhere_and_exact(formulation):
  assert set(CHOSEN) == set(fast.FORMULATIONS)
  groups, hw, width, fmt = CHOSEN[formulation]
  rng = np.random.default_rng(0)
  conv = _conv(rng, 64, 64, hw, groups, relu=width is None)
  choice, _ = fast.plan_chain([conv], np.arange(64), width, fmt)
  assert choice[0].formulation == formulation
  # The layer inside a network: in a residual block (after a second conv
  # for non-residual layers, which re-reads the chosen layout).
  kept = conv.kept_outputs()
  second = fast.ConvSpec("d", 64, 64, 1, 1, 0, hw, [fast.BranchSpec(
      kept, np.arange(64), rng.normal(size=(64, len(kept), 1, 1)).astype(
          np.float32) * 0.1, np.zeros(64, np.float32))], False)
  main = [conv] if width else [conv, second]
  stem = fast.dense_conv_spec("stem", rng.normal(size=(64, 3, 3, 3)).astype(
      np.float32), rng.normal(size=64).astype(np.float32), 1, 1, hw, True)
  head = [("linear", rng.normal(size=(5, 64)).astype(np.float32),
           np.zeros(5, np.float32))]
  spec = fast.NetSpec("t", hw, 3, [stem, fast.BlockSpec("b", main, None, 64)],
                      None, head)
  plan = fast.Regime(128, fmt, {"c": choice[0]})
  x = torch.randn(2, 3, hw, hw)
  with torch.no_grad():
    want = _reference(spec, x).numpy()
    got = fast.build_torch(spec, plan)(x).numpy()
  assert np.abs(got - want).max() <= ATOL * np.abs(want).max()
  params, apply = fast_jax.compact(spec, plan)
  got_jax = np.asarray(apply(params, x.numpy().transpose(0, 2, 3, 1)))
  assert np.abs(got_jax - want).max() <= ATOL * np.abs(want).max()


# ---------------------------------------------------------------- plans
def test_plan_json_round_trip(tmp_path):
  model, v = dsp_pruned("cifar_resnet20", 2)
  spec = fast_specs.from_packed(jax_side.plan_from_variables(v), "r20")
  plan = fast.make_plan(spec)
  assert set(plan.regimes) == set(fast.REGIMES) and plan.dispatches()
  assert plan.threshold == fast.SMALL_BATCH_MAX
  assert {k: r.batch for k, r in plan.regimes.items()} == fast.REGIMES
  d = json.loads(json.dumps(plan.to_json()))
  assert d["version"] == fast.PLAN_VERSION == 2 and d["threshold"] == 8
  assert {d["regimes"][k]["memory_format"] for k in d["regimes"]} == set(
      fast.MEMORY_FORMATS)
  assert fast.Plan.from_json(d) == plan
  # Regimes lowering alike give one module, without a dispatch.
  small = fast.Regime(1, plan.memory_format, plan.layers)
  same = fast.Plan(plan.model, plan.fingerprint, plan.torch_version,
                   plan.method, {"small": small, "large": plan.large})
  assert not same.dispatches()
  assert "if " not in fast.script(spec, same).code
  plan.save(tmp_path / "p.json")
  assert fast.Plan.load(tmp_path / "p.json") == plan
  # A saved plan is what the builder uses: the same module comes out.
  assert fast.make_plan(spec, cache=tmp_path / "p.json") == plan
  with pytest.raises(ValueError, match="unknown formulation"):
    fast.LayerChoice.from_json({"formulation": "sparse"})


def test_tuning_times_candidates_and_caches(tmp_path):
  model, v = dsp_pruned("cifar_resnet8", 4)
  spec = fast_specs.from_packed(jax_side.plan_from_variables(v), "r8")
  plan = fast.make_plan(spec, tune=True, batches={"small": 1, "large": 4},
                        threshold=2, repeats=1)
  assert plan.method == "tuned" and plan.threshold == 2
  for k, b in (("small", 1), ("large", 4)):
    assert plan.regimes[k].batch == b
    assert set(plan.regimes[k].info["seconds_per_image"]) == set(
        fast.MEMORY_FORMATS)
  plan.save(tmp_path / fast.FAST_PLAN)
  again = fast.make_plan(spec, tune=True, cache=tmp_path / fast.FAST_PLAN)
  assert again == plan  # reused, not re-timed


def test_cached_plan_for_another_model_or_torch_is_ignored(tmp_path):
  _, v2 = dsp_pruned("cifar_resnet20", 2)
  _, v4 = dsp_pruned("cifar_resnet20", 4)
  s2 = fast_specs.from_packed(jax_side.plan_from_variables(v2), "r20")
  s4 = fast_specs.from_packed(jax_side.plan_from_variables(v4), "r20")
  path = tmp_path / fast.FAST_PLAN
  fast.make_plan(s2).save(path)
  with pytest.warns(UserWarning, match="another model"):
    plan = fast.make_plan(s4, cache=path)
  assert plan.fingerprint == s4.fingerprint() != s2.fingerprint()
  d = json.loads(path.read_text())
  d["torch"] = "1.10.0"
  path.write_text(json.dumps(d))
  with pytest.warns(UserWarning, match="torch 1.10.0"):
    plan = fast.make_plan(s2, cache=path)
  assert plan.torch_version == torch.__version__
  path.write_text("{not json")
  with pytest.warns(UserWarning, match="unreadable"):
    fast.make_plan(s2, cache=path)
  # A plan of version 1 (one memory format for every batch) is re-planned.
  old = fast.make_plan(s2).to_json()
  large = old.pop("regimes")["large"]
  old.update(version=1, memory_format=large["memory_format"],
             layers=large["layers"])
  del old["threshold"]
  path.write_text(json.dumps(old))
  with pytest.warns(UserWarning, match="plan version 1, expected 2"):
    plan = fast.make_plan(s2, cache=path)
  assert plan == fast.make_plan(s2)


def test_nothing_pruned_is_the_folded_dense_model(tmp_path, capsys):
  model = models.create_model("cifar_resnet8", 10)
  v = artifacts.random_variables(model, 0)
  artifacts.save_variables(tmp_path / "vars", "cifar_resnet8", 10, {}, v)
  assert cli.main(["export", str(tmp_path / "vars"), "--out",
                   str(tmp_path / "out"), "--no-program"]) == 0
  out = capsys.readouterr().out
  assert "nothing pruned: fast.pt is the BN-folded dense model" in out
  assert not (tmp_path / "out" / fast.FAST_PROGRAM).exists()
  plan = fast.Plan.load(tmp_path / "out" / fast.FAST_PLAN)
  assert not plan.pruned
  assert set(plan.large.info["formulations"]) == {"union"}
  ts = torch.jit.load(str(tmp_path / "out" / fast.FAST))
  code = ts.code
  # Per regime, one conv per dense conv (7 in ResNet-8 + 2 shortcuts), BN
  # folded into them, no gathers or index-adds.
  assert code.count("conv2d(") + code.count("_convolution(") == 9 * (
      2 if plan.dispatches() else 1)
  for op in ("index_select", "index_add", "batch_norm"):
    assert op not in code
  sd = dsp.dense_state_dict(v)
  io = np.load(tmp_path / "out" / dsp.REFERENCE_IO)
  dense = writer.torch_logits(lambda x: dsp_torch.dense_forward(sd, x),
                           io["images"])
  assert np.abs(writer.torch_logits(ts, io["images"]) - dense).max() <= ATOL


def test_cli_reuses_a_plan_and_ignores_a_foreign_one(tmp_path, capsys):
  model, v = dsp_pruned("cifar_resnet8", 2)
  artifacts.save_variables(tmp_path / "vars", "cifar_resnet8", 10, {}, v)
  other = tmp_path / "other.json"
  fast.make_plan(fast_specs.from_packed(jax_side.plan_from_variables(
      dsp_pruned("cifar_resnet8", 4)[1]), "x")).save(other)
  with pytest.warns(UserWarning, match="another model"):
    assert cli.main(["export", str(tmp_path / "vars"), "--out",
                     str(tmp_path / "out"), "--no-program", "--plan",
                     str(other)]) == 0
  assert "fast plan:" in capsys.readouterr().out
  first = fast.Plan.load(tmp_path / "out" / fast.FAST_PLAN)
  assert cli.main(["export", str(tmp_path / "vars"), "--out",
                   str(tmp_path / "out"), "--no-program", "--plan",
                   str(tmp_path / "out" / fast.FAST_PLAN)]) == 0
  assert fast.Plan.load(tmp_path / "out" / fast.FAST_PLAN) == first
