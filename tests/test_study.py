"""Baseline pruning (L1-norm, random) and the accuracy-vs-FLOPs study."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddrop_jax
import models
from ddrop_jax.config import DdropConfig
from ddrop_jax.selection import prune_layers
from models import flops
from training import baselines

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("dsp", "ddrop", "slim", "l1", "random")


@pytest.fixture(scope="module")
def vgg():
  model = models.create_model("cifar_vgg_tiny", 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False)
  return model, variables, ddrop_jax.ddrop_layers(model)


def _kept(masks, layer):
  return np.asarray(jax.tree.leaves(_at(masks, layer.producer))[0]).max(0)


def _at(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_l1_prunes_the_smallest_l1_filters(vgg):
  model, variables, layers = vgg
  pruned = baselines.prune(variables, layers, criterion="l1", amount=0.5)
  for layer in layers:
    k = np.asarray(_at(variables["params"], layer.producer)["kernel"])
    norms = np.abs(k).reshape(-1, k.shape[-1]).sum(0)
    want = np.ones(layer.units)
    want[np.argsort(norms, kind="stable")[:layer.units // 2]] = 0
    np.testing.assert_array_equal(_kept(pruned["masks"], layer), want)
    pk = np.asarray(_at(pruned["params"], layer.producer)["kernel"])
    assert not np.any(pk[..., want == 0])


def test_random_prunes_the_same_counts_and_macs_as_ddrop(vgg):
  model, variables, layers = vgg
  a = baselines.prune(variables, layers, criterion="random", amount=0.5,
                      rng=jax.random.key(1))
  b = baselines.prune(variables, layers, criterion="random", amount=0.5,
                      rng=jax.random.key(2))
  d = ddrop_jax.prune(variables, layers, DdropConfig(amount=0.5))
  differs = False
  for layer in layers:
    ka, kb = _kept(a["masks"], layer), _kept(b["masks"], layer)
    assert ka.sum() == kb.sum() == layer.units - layer.units // 2
    differs |= bool(np.any(ka != kb))
  assert differs
  macs = {flops.report(model, v, 32, remove_dead=True).macs for v in (a, b, d)}
  assert len(macs) == 1
  with pytest.raises(ValueError, match="rng"):
    baselines.prune(variables, layers, criterion="random", amount=0.5)
  with pytest.raises(ValueError, match="criterion"):
    baselines.prune(variables, layers, criterion="l2", amount=0.5)


def test_prune_residual_ranks_every_layer_by_l1():
  model = models.create_model("cifar_resnet8", 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False)
  layers = ddrop_jax.ddrop_layers(model)
  targets = prune_layers(model, layers, True)
  pruned = baselines.prune(variables, targets, criterion="l1", amount=0.5)
  assert len(targets) > len(layers)
  for layer in targets:
    k = np.asarray(_at(variables["params"], layer.producer)["kernel"])
    norms = np.abs(k).reshape(-1, k.shape[-1]).sum(0)
    kept = _kept(pruned["masks"], layer)
    assert kept.sum() == layer.units - layer.units // 2
    assert norms[kept == 1].min() >= norms[kept == 0].max()


def test_l1_pruned_vgg_exports_slimmed_and_matches(vgg, tmp_path):
  from convert import slim
  model, variables, layers = vgg
  pruned = baselines.prune(variables, layers, criterion="l1", amount=0.5)
  out = slim.export_ddrop(model, pruned, tmp_path, 32, program=False,
                          fast_options=None)
  assert max(out.max_abs_diff.values()) < 1e-4
  summary = out.details["summary"]
  assert summary.params_after < summary.params_before


@pytest.mark.slow
def test_study_quick_writes_results_and_plot(tmp_path):
  # One model and one target keep the smoke run short (the other targets
  # and models run the same code); it is bound by compilation.
  out = tmp_path / "study"
  subprocess.run([sys.executable, str(ROOT / "bench" / "study.py"), "--out",
                  str(out), "--quick", "--models", "cifar_resnet8",
                  "--targets", "50", "--arms", *METHODS], check=True,
                 cwd=ROOT)
  data = json.loads((out / "results.json").read_text())
  runs = data["runs"]
  targets = data["setting"]["targets"]
  got = {(r["method"], r["target"]) for r in runs}
  assert got == {("dense", 0.0)} | {(m, t) for m in METHODS for t in targets}
  for r in runs:
    for k in ("acc_before_ft", "acc_after_ft", "val_before_ft",
              "val_after_ft"):
      assert 0.0 <= r[k] <= 1.0, (k, r)
    assert r["macs"] <= r["macs_dense"] and r["seconds"] > 0
    for k in ("pflops_whole_model", "pparams_whole_model", "dsp_pflops",
              "dsp_pparams"):
      assert math.isfinite(r[k])
    if r["method"] != "dense":
      assert abs(r["pflops_whole_model"] - r["target"]) < 5, r
      assert r["export_max_abs_diff"] < 1e-4, r
  amounts = {(r["target"], r["amount"]) for r in runs if "amount" in r}
  assert len(amounts) == len(targets)  # DDROP, L1, random: one amount each
  phases = {s["phase"] for s in data["shared"]}
  assert phases == {"pretrain", "plain", "ddrop", "slim", "group"}
  png = (out / "accuracy_vs_flops.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  assert "| DSP |" in (out / "table.md").read_text()
