"""DSP on the vision transformers' MLPs: fc1 / fc2 of every block as grouped
1x1 convolutions over the tokens (group learning, fp layers, rate search,
dead structure against exactly-zero gradients, the compact PyTorch export)."""

from __future__ import annotations

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsp_jax
import models
from training import artifacts
from dsp_jax import kernels
from models import paths
from dsp_jax import pruning as pr
from dsp_jax import regularizer as reg
from tests.test_dsp_generic import (SIZE, _gradient_pattern,
                                    _group_state_and_batch)


@functools.lru_cache(maxsize=None)
def _model(groups: int | None = 2):
  # vit_tiny at 16x16: 8x8 patches, 4 tokens + the class token, 2 blocks.
  return models.create_model("vit_tiny", 10, groups=groups, image_size=SIZE)


def _setup(seed: int = 0):
  model = _model()
  info = dsp_jax.analyze(model, (SIZE, SIZE, 3))
  return model, info, artifacts.random_variables(model, seed, SIZE)


def _regulariser(params, gates, info):
  return sum(float(reg.regulariser_value(
      kernels.kernel(params, c),
      dsp_jax.hard_assignment(kernels.logits(gates, c))))
             for c in info.taking_part)


def test_groups_put_gates_on_the_mlp_linears_only():
  model, info, v = _setup()
  mlps = [("encoder", "layers", f"encoder_layer_{i}", "mlp") for i in (0, 1)]
  tp = info.taking_part
  assert [c.path for c in tp] == [m + (f,) for m in mlps
                                  for f in ("fc1", "fc2")]
  assert [tp[i].path[-1] for i in kernels.derived_fp(info)] == ["fc2", "fc2"]
  fc1 = tp[0]
  # A Dense (I, O) kernel over T tokens is a 1x1 conv over a T x 1 map.
  assert fc1.kernel_shape == (1, 1, 32, 64) and fc1.in_shape == (5, 1, 32)
  assert fc1.flops == 32 * 64 * 5
  assert v["gates"]["encoder"]["layers"]["encoder_layer_0"]["mlp"]["fc2"][
      "logits"].shape == (2, 32)
  # Without groups: today's model, same parameter tree, no gates.
  plain = jax.eval_shape(lambda: _model(None).init(
      jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
  grouped = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
  assert "gates" not in plain
  assert jax.tree.structure(plain["params"]) == jax.tree.structure(
      grouped["params"])


def test_swin_mlps_take_part_with_fc2_as_fp():
  info = dsp_jax.analyze(models.create_model("swin_tiny", 10, groups=2),
                         (32, 32, 3))
  tp = info.taking_part
  assert len(tp) == 8
  assert all(c.path[-2] == "mlp" for c in tp)
  assert [tp[i].path[-1] for i in kernels.derived_fp(info)] == ["fc2"] * 4


def test_group_step_runs_and_reduces_the_group_regulariser():
  model, info, v = _setup()
  state, batch = _group_state_and_batch({**v, "batch_stats": {}})
  step = dsp_jax.make_group_step(
      model, groups=2, lam=5.0, lr_schedule=lambda t: 0.05, total_steps=3,
      layer_info=info)
  before = _regulariser(state.params, state.gates, info)
  for _ in range(3):
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert _regulariser(state.params, state.gates, info) < 0.9 * before
  # The Dense kernels keep their (I, O) layout.
  assert paths.get(state.params, info.taking_part[0].kernel_path[1:]
                   ).shape == (32, 64)


@pytest.mark.parametrize("rate", [0.4, 0.6])
def test_rate_search_lands_within_the_tolerance(rate):
  _, info, v = _setup(seed=1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # cnt_g = 0 warnings of tiny layers
    res = pr.prune(v["params"], v["gates"], info, groups=2, rate=rate)
  assert len(res.trajectory) == 11
  assert abs(res.p_flops - 100 * rate) < 1.0
  assert 0 < res.whole_model["pflops_whole_model"] < res.p_flops
  for c in info.taking_part:
    assert paths.get(res.params, c.kernel_path[1:]).shape == c.kernel_shape[2:]
    assert paths.get(res.masks, c.kernel_path[1:]).shape == c.kernel_shape[2:]


def test_dead_structure_equals_the_zero_gradient_pattern():
  model, info, v = _setup(seed=2)
  params = jax.tree.map(np.asarray, v["params"])
  pruner = pr.Pruner(params, v["gates"], info, 2)
  checked = 0
  for beta in (0.05, 0.3):
    masks0, _ = pruner.channel_masks(beta)
    # fc1 units 0-7 of block 0 lose every input: Dense masks their biases
    # too, so they output GELU(0) = 0 and their fc2 rows die.
    masks0[0][:, :8] = 0
    masked = params  # as the masks collection acts (models.apply_masks)
    for c, m in zip(info.taking_part, masks0):
      masked = kernels.with_kernel(masked, c,
                                   kernels.kernel(masked, c) * m[None, None])
      node = paths.get(masked, c.path)
      masked = paths.replace(masked, c.path,
                             {**node, "bias": node["bias"] * m.max(axis=0)})
    grads = _gradient_pattern(model, jax.tree.map(jnp.asarray, masked), {},
                              int(beta * 10))
    masks, _, _ = pruner.dead_structure(masks0)
    for c, m0, m in zip(info.taking_part, masks0, masks):
      g = np.asarray(paths.get(grads, c.kernel_path[1:]))         # (I, O)
      np.testing.assert_array_equal(m != 0, (m0 != 0) & (g != 0),
                                    err_msg=f"{c.name} at beta={beta}")
      checked += int(np.sum((m0 != 0) & (g == 0)))
    assert masks0[1][:8].any() and not masks[1][:8].any()
  assert checked > 0  # some kept kernels really were removed as dead


def test_export_matches_the_masked_model(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  from convert import branched  # pylint: disable=import-outside-toplevel
  model, info, v = _setup(seed=3)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = pr.prune(v["params"], v["gates"], info, groups=2, rate=0.5)
  pruned = {**v, "params": res.params, "masks": res.masks}
  r = branched.export_branched(model, pruned, tmp_path, program=False)
  assert max(r.max_abs_diff.values()) <= 1e-4
  io = np.load(tmp_path / "reference_io.npz")
  loaded = torch.jit.load(str(tmp_path / branched.TORCHSCRIPT))
  with torch.no_grad():
    got = loaded(torch.from_numpy(io["images_nchw"])).numpy()
  np.testing.assert_allclose(got, io["logits"], atol=1e-4)
  sd = torch.load(tmp_path / branched.STATE_DICT, weights_only=True)
  # Compact: fc1 keeps only its live units, fc2 writes only its kept outputs.
  for c in info.taking_part:
    mask = np.asarray(paths.get(res.masks, c.kernel_path[1:])) != 0
    live = np.abs(np.asarray(paths.get(res.params, c.kernel_path[1:]))) * mask > 0
    kept = np.flatnonzero(live.any(axis=0))
    block = ".".join(c.path[:-1])
    if c.path[-1] == "fc2":
      assert sd[f"{block}.3.weight"].shape[0] == len(kept) < 32
      np.testing.assert_array_equal(sd[f"{block}.outputs"].numpy(), kept)
    else:  # dead-structure removal left only units fc2 reads
      assert sd[f"{block}.0.weight"].shape[0] == len(kept) < 64
  # branches.json lists each Linear's groups (units with the same inputs).
  desc = json.loads((tmp_path / branched.BRANCHES).read_text())
  by_name = {l["layer"]: l for l in desc["layers"]}
  assert set(by_name) == {c.name for c in info.taking_part}
  assert max(r.details["branches"].values()) >= 2
  assert branched.family_supported(model)
  # The converter's export picks this path for a ViT carrying group logits.
  from convert import formats  # pylint: disable=import-outside-toplevel
  assert formats.applicable(model, pruned)[0] == "branched"
