"""round_to and latency targets: DSP's search, DDROP's amount, the table."""

import dataclasses
import functools
import json
import warnings

import numpy as np
import pytest

import ddrop_jax as dd
import dsp_jax
import models
from ddrop_jax import latency as ddrop_latency
from ddrop_jax import probs
from models import latency as lat
from training import artifacts
from training import config as config_lib


@functools.lru_cache(maxsize=None)
def _dsp(groups=2):
  """ResNet-8 (widths 16/32/64) on 8x8 images, random weights and gates."""
  model = models.create_model("cifar_resnet8", groups=groups, image_size=8,
                              widths=(16, 32, 64))
  v = artifacts.random_variables(model, 0, 8)
  info = dsp_jax.analyze(model, (8, 8, 3))
  return model, v, info


def _prune(**kw):
  _, v, info = _dsp()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return dsp_jax.prune(v["params"], v["gates"], info, groups=2, **kw)


def _analytic(batch=128):
  return lat.LatencyModel(_dsp()[2], batch)


# ------------------------------------------------------------------ round_to
def test_dsp_round_to_keeps_multiples_and_meets_the_rate():
  r = 8
  res = _prune(rate=0.3, round_to=r, parity=False)
  pruner = dsp_jax.pruning.Pruner(_dsp()[1]["params"], _dsp()[1]["gates"],
                                  _dsp()[2], 2, parity=False, round_to=r)
  masks, _ = pruner.channel_masks(res.beta)
  for e, m in zip(pruner.layers, masks):
    width_in = m.shape[0]
    for g in range(2):
      filt = e["H"][g] > 0
      if not filt.any():
        continue
      kept = int(np.sum(m[:, filt].any(axis=1)))
      assert kept % r == 0 or kept == width_in, (e["conv"].name, kept)
  # Met, overshooting by at most a rounding step (8 of 16 channels here).
  assert 30.0 <= res.p_flops <= 36.0


def test_dsp_round_to_keeps_more_than_without():
  plain = dsp_jax.pruning.Pruner(_dsp()[1]["params"], _dsp()[1]["gates"],
                                 _dsp()[2], 2, parity=False)
  rounded = dsp_jax.pruning.Pruner(_dsp()[1]["params"], _dsp()[1]["gates"],
                                   _dsp()[2], 2, parity=False, round_to=8)
  for beta in (0.3, 0.6, 0.9):
    a, _ = plain.channel_masks(beta)
    b, _ = rounded.channel_masks(beta)
    for x, y in zip(a, b):
      assert np.all(y >= x)  # rounding only ever keeps more
    assert rounded.flops_at(beta) <= plain.flops_at(beta)


def test_dsp_round_to_off_is_unchanged():
  a, b = _prune(rate=0.3), _prune(rate=0.3, round_to=1)
  assert a.beta == b.beta and a.table == b.table
  assert all(np.array_equal(x, y) for x, y in zip(
      dsp_jax.pruning.paths.flatten(a.masks).values(),
      dsp_jax.pruning.paths.flatten(b.masks).values()))


def test_dsp_round_to_wider_than_a_layer_names_it():
  with pytest.raises(ValueError, match=r"conv_a: round_to=32 exceeds its 16"):
    _prune(rate=0.3, round_to=32)
  with pytest.raises(ValueError, match="round_to must be an integer"):
    _prune(rate=0.3, round_to=-1)


def test_ddrop_prune_count_rounds_the_kept_count_up():
  assert probs.prune_count(64, 0.5) == 32
  assert probs.prune_count(64, 0.6, 16) == 64 - 32   # keeps 26 -> 32
  assert probs.prune_count(64, 0.55, 0) == 35
  assert probs.prune_count(20, 0.5, 16) == 4         # keeps 10 -> 16
  assert probs.prune_count(10, 0.5, 16) == 0         # capped at the width
  for c in (16, 24, 64):
    for a in (0.1, 0.33, 0.5, 0.9):
      kept = c - probs.prune_count(c, a, 8)
      assert kept % 8 == 0 or kept == c
      assert kept >= c - probs.prune_count(c, a)


def test_ddrop_round_to_in_prune_and_errors():
  model = models.create_model("cifar_resnet8", image_size=8)
  v = artifacts.random_variables(model, 1, 8)
  layers = dd.ddrop_layers(model, (8, 8, 3))
  cfg = dd.DdropConfig(amount=0.6, round_to=4)
  out = dd.prune(v, layers, cfg)
  for layer in layers:
    kernel = dsp_jax.pruning.paths.get(out["masks"],
                                       layer.producer + ("kernel",))
    kept = int(np.sum(np.asarray(kernel).any(axis=tuple(
        range(np.ndim(kernel) - 1)))))
    assert kept % 4 == 0 or kept == layer.units
  with pytest.raises(ValueError, match=r"round_to=32 exceeds the \d+ units "
                     "of layer"):
    dd.prune(v, layers, dataclasses.replace(cfg, round_to=32))
  with pytest.raises(ValueError, match="ddrop.round_to must be an integer"):
    dd.DdropConfig(round_to=-2)


# ------------------------------------------------------------------- table
def _fake_table(env, shapes):
  t = lat.Table(dict(env))
  for s in shapes:
    gi, go = lat.grid(s.in_features), lat.grid(s.out_features)
    secs = [[1e-9 * s.macs(i, o) * env["batch"] + 1e-5 for o in go]
            for i in gi]
    t.entries[s.key] = {"in": list(gi), "out": list(go), "seconds": secs,
                        "ops": dict.fromkeys(lat.OPS, 1e-10)}
  return lat.Table.from_json(t.to_json())


def test_table_interpolates_and_round_trips(tmp_path):
  s = lat.LayerShape("conv", 3, 1, 8, 8, 16, 32)
  env = lat.environment(4)
  t = _fake_table(env, [s])
  # Bilinear in (cin, cout) reproduces a bilinear function exactly.
  assert t.seconds(s, 10, 20) == pytest.approx(
      1e-9 * s.macs(10, 20) * 4 + 1e-5)
  assert t.seconds(s, 0, 20) == 0.0
  t.save(tmp_path / "t.json")
  back = lat.Table.from_json(json.loads((tmp_path / "t.json").read_text()))
  assert back.seconds(s, 7, 31) == pytest.approx(t.seconds(s, 7, 31))


def test_table_cache_keyed_by_machine_and_torch(tmp_path, monkeypatch):
  s = lat.LayerShape("conv", 1, 1, 4, 4, 4, 4)
  path = tmp_path / "table.json"
  calls = []
  real = lat.measure

  def counting(shapes, batch, threads=1, repeats=5, table=None):
    shapes = list(shapes)
    calls.append([x.key for x in shapes if table is None or not table.has(x)])
    return real(shapes, batch, threads, 1, table)

  monkeypatch.setattr(lat, "measure", counting)
  first = lat.load_or_measure(path, [s], 2)
  assert calls[-1] == [s.key] and path.is_file()
  again = lat.load_or_measure(path, [s], 2)
  assert calls[-1] == [] and again.entries[s.key]["seconds"] == (
      first.entries[s.key]["seconds"])
  d = json.loads(path.read_text())
  d["env"]["torch"] = "0.0-elsewhere"
  path.write_text(json.dumps(d))
  with pytest.warns(UserWarning, match="another setting.*torch"):
    lat.load_or_measure(path, [s], 2)
  assert calls[-1] == [s.key]
  with pytest.warns(UserWarning, match="another setting.*threads"):
    lat.load_or_measure(path, [s], 2, threads=2)
  assert json.loads(path.read_text())["env"] == lat.environment(2, 2)


def test_analytic_model_prices_smaller_layers_lower():
  m = _analytic()
  conv = [l for l in _dsp()[2].taking_part][1]
  full = m.layer_seconds(conv, conv.in_features, conv.out_features)
  half = m.layer_seconds(conv, conv.in_features // 2, conv.out_features // 2)
  assert 0 < half < full and m.source == "analytic"
  assert m.dense_seconds() > 0


def test_no_gather_when_the_input_is_the_chains_compact_output():
  m = _analytic()
  conv = [l for l in _dsp()[2].taking_part][1]
  gathered = m.layer_seconds(conv, 4, 8)
  compact = m.layer_seconds(conv, 4, 8, available=4)
  assert compact < gathered


def test_search_prediction_equals_the_cut_of_its_masks():
  m = _analytic()
  res = _prune(target_latency=0.8, latency=m, parity=False)
  from models import graph as graph_lib
  cut = graph_lib.cut(_dsp()[2], res.params, res.masks)
  assert m.predict_cut(cut.layers) == pytest.approx(
      res.latency["predicted_seconds"], rel=1e-9)


# ------------------------------------------------------------ latency target
@pytest.mark.parametrize("target", [0.6, 0.8])
def test_dsp_search_hits_the_latency_target(target):
  m = _analytic()
  res = _prune(target_latency=target, latency=m, parity=False)
  assert target - 0.02 <= res.latency["fraction"] <= target
  assert res.latency["source"] == "analytic" and res.latency["batch"] == 128
  assert res.p_flops > 0


def test_dsp_latency_target_with_round_to():
  m = _analytic()
  res = _prune(target_latency=0.8, latency=m, parity=False, round_to=8)
  assert 0.75 <= res.latency["fraction"] <= 0.8


def test_dsp_unreachable_latency_target_gives_the_range():
  with pytest.raises(ValueError, match=r"target_latency=0.01 is unreachable"
                     r".*must lie in \[0\.\d+, 1\.0000\)"):
    _prune(target_latency=0.01, latency=_analytic(), parity=False)
  with pytest.raises(ValueError, match="exactly one of rate"):
    _prune(rate=0.5, target_latency=0.5, latency=_analytic())
  with pytest.raises(ValueError, match="needs a latency model"):
    _prune(target_latency=0.5)


def test_dsp_latency_search_uses_the_table():
  info = _dsp()[2]
  shapes = [lat.shape_of(l) for l in info.producers]
  t = _fake_table(lat.environment(128), shapes)
  m = lat.LatencyModel(info, 128, t)
  assert m.source == "measured"
  res = _prune(target_latency=0.6, latency=m, parity=False)
  assert 0.58 <= res.latency["fraction"] <= 0.6
  with pytest.raises(ValueError, match="lacks layer shape"):
    lat.LatencyModel(info, 128, lat.Table(t.env, {}))


def test_ddrop_amount_hits_the_latency_target():
  model = models.create_model("cifar_resnet8", image_size=8)
  v = artifacts.random_variables(model, 1, 8)
  layers = dd.ddrop_layers(model, (8, 8, 3))
  graph = dsp_jax.analyze(model, (8, 8, 3))
  m = lat.LatencyModel(graph, 128)
  cfg = dd.DdropConfig()
  got = ddrop_latency.choose_amount(graph, m, v, layers, cfg, 0.8)
  assert got.figures["fraction"] <= 0.8
  assert got.figures["fraction"] == pytest.approx(0.8, abs=0.05)
  with pytest.raises(ValueError, match=r"ddrop.target_latency=0.05 is "
                     r"unreachable.*\[0\.\d+, 1\)"):
    ddrop_latency.choose_amount(graph, m, v, layers, cfg, 0.05)


# ------------------------------------------------------------------- config
def test_config_fields_parse_and_validate():
  c = config_lib.default_config()
  assert c.dsp.round_to == 0 and c.dsp.target_latency == 0.0
  assert c.ddrop.round_to == 0 and c.ddrop.target_latency == 0.0
  assert c.latency.batch == 128 and c.latency.measured
  c.dsp.round_to, c.dsp.target_latency = 16, 0.6
  c.ddrop.round_to, c.ddrop.target_latency = 8, 0.5
  config_lib.validate(c)
  cfg = dd.DdropConfig.from_engine(c.ddrop)
  assert (cfg.round_to, cfg.target_latency) == (8, 0.5)
  c.dsp.target_latency = 1.0
  with pytest.raises(config_lib.ConfigError, match="dsp.target_latency"):
    config_lib.validate(c)
  c.dsp.target_latency, c.latency.batch = 0.6, 0
  with pytest.raises(config_lib.ConfigError, match="latency.batch"):
    config_lib.validate(c)


# ----------------------------------------------------------------- pipelines
def test_dsp_pipeline_prunes_to_a_latency_target(tmp_path):
  from configs import base
  from dsp_jax import pipeline
  c = base.get_config()
  c.method, c.dataset, c.model = "dsp", "digits", "cifar_resnet8"
  c.widths = "16,32,64"
  c.batch_size, c.test_batch_size, c.max_steps = 32, 200, 2
  c.progress_bar, c.checkpoint_every_steps = False, 100
  c.stages = "pretrain,group,prune_finetune"
  d = c.dsp
  d.groups, d.pretrain_epochs, d.group_epochs = 2, 1, 1
  d.finetune_epochs, d.cycles = 1, 1
  d.target_latency, d.round_to = 0.8, 8
  c.latency.measured = False  # The analytic model: nothing timed in tests.
  config_lib.validate(c)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    report = pipeline.run(c, tmp_path)
  got = report["latency"]
  assert got["source"] == "analytic" and got["batch"] == 128
  assert 0.7 <= got["fraction"] <= 0.8
  assert report["pflops_reference"] > 0


def test_ddrop_pipeline_chooses_the_amount_of_a_latency_target(tmp_path):
  from configs import base
  from ddrop_jax import pipeline
  c = base.get_config()
  c.method, c.dataset, c.model = "ddrop", "digits", "cifar_resnet10_tiny"
  c.batch_size, c.test_batch_size, c.max_steps = 32, 400, 2
  c.progress_bar, c.checkpoint_every_steps = False, 100
  c.stages = "before,ddrop,prune"
  d = c.ddrop
  d.before_epochs, d.epochs, d.ft_epochs = 1, 1, 0
  d.target_latency, d.round_to = 0.9, 2
  c.latency.measured = False
  config_lib.validate(c)
  report, _ = pipeline.execute(c, tmp_path)
  got = report["latency"]
  assert got["fraction"] <= 0.9 and got["target"] == 0.9
  assert 0.0 < report["amount"] < 1.0
