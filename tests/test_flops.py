"""FLOPs and parameter accounting (DSP's measure and whole-model counts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import flops


def _abstract_variables(model, image_size=32):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
      train=False))


def _concrete(abstract, rng):
  return jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(s.dtype), abstract)


@pytest.mark.parametrize("name,macs", [("cifar_resnet20", 40_813_184),
                                       ("cifar_resnet56", 125_747_840)])
def test_dense_whole_model_macs_and_params(name, macs):
  model = models.create_model(name)
  variables = _abstract_variables(model)
  rep = flops.report(model, variables, 32)
  assert rep.macs_dense == rep.macs == macs
  n_params = sum(int(np.prod(x.shape))
                 for x in jax.tree.leaves(variables["params"]))
  assert rep.params_dense == rep.params == n_params
  assert rep.dsp_pflops == rep.dsp_pparams == 0.0
  assert rep.pflops_whole_model == rep.pparams_whole_model == 0.0


def test_dense_report_of_every_zoo_model_is_unpruned():
  for name in models.list_models():
    spec = models.model_spec(name)
    model = models.create_model(name)
    variables = _abstract_variables(model, spec.image_size)
    rep = flops.report(model, variables, spec.image_size)
    n_params = sum(int(np.prod(x.shape))
                   for x in jax.tree.leaves(variables["params"]))
    assert rep.params_dense == rep.params == n_params, name
    assert rep.macs == rep.macs_dense > 0, name
    assert rep.dsp_pflops == 0.0 and rep.pflops_whole_model == 0.0, name


def test_hand_made_masks_on_cifar_resnet8():
  # Widths (4, 8, 16). Taking-part convs and flops_l = O*I*9*H_out*W_out:
  #   stage_1.0.conv_a  4x4   32x32: 4*4*9*1024  = 147456, weights 144
  #   stage_1.0.conv_b  4x4   32x32:               147456,         144
  #   stage_2.0.conv_a  8x4   16x16: 8*4*9*256   =  73728,         288
  #   stage_2.0.conv_b  8x8   16x16: 8*8*9*256   = 147456,         576
  #   stage_3.0.conv_a  16x8   8x8 : 16*8*9*64   =  73728,        1152
  #   stage_3.0.conv_b  16x16  8x8 : 16*16*9*64  = 147456,        2304
  #   sum                                          737280,        4608
  # Masks: stage_1.0.conv_a input 0 (4 of 16 kernels), stage_2.0.conv_b
  # filters 0-3 (32 of 64 kernels), and a zero weight kernel (o=0, i=0) of
  # stage_3.0.conv_a (1 of 128); the stem's input 0 is masked too, which
  # DSP's measure ignores.
  #   FLOPs removed: 147456/4 + 147456/2 + 73728/128 = 111168
  #   P.FLOPS  = 100 * 111168 / 737280 = 15.078125
  #   weights removed: 144/4 + 576/2 + 1152/128 = 333
  #   P.PARAMS = 100 * 333 / 4608 = 7.2265625
  model = models.create_model("cifar_resnet8")
  abstract = _abstract_variables(model)
  variables = _concrete(abstract, np.random.default_rng(0))
  variables["masks"] = jax.tree.map(np.ones_like, variables["masks"])
  m, p = variables["masks"], variables["params"]
  m["stage_1"]["0"]["conv_a"]["kernel"][0, :] = 0
  m["stage_2"]["0"]["conv_b"]["kernel"][:, 0:4] = 0
  p["stage_3"]["0"]["conv_a"]["kernel"][:, :, 0, 0] = 0
  m["conv_1_3x3"]["kernel"][0, :] = 0
  rep = flops.report(model, variables, 32)
  assert rep.dsp_pflops == pytest.approx(15.078125, abs=1e-9)
  assert rep.dsp_pparams == pytest.approx(7.2265625, abs=1e-9)
  # Whole model (structural: masks only, so the zero-weight kernel of
  # stage_3.0.conv_a, 73728/128 = 576 MACs and 9 weights, still counts): the
  # stem loses 1/3 of its 4*3*9*1024 = 110592 MACs as well.
  assert rep.macs_dense == 864_416
  assert rep.macs == 864_416 - (111_168 - 576) - 110_592 // 3
  # Params: stem 108/3 = 36 and the 333 - 9 above, plus scale and bias of the
  # 4 channels of stage_2.0.bn_b whose filters are gone: 8.
  assert rep.params == rep.params_dense - 36 - (333 - 9) - 8
  assert rep.pflops_whole_model == pytest.approx(
      100 * (111_168 - 576 + 36_864) / 864_416)
  rows = {r.name: r for r in rep.per_layer}
  assert rows["stage_2.0.conv_b"].kernels_alive == 32
  assert rows["stage_2.0.bn_b"].kernels_alive == 4
  assert rows["stage_1.0.conv_a"].takes_part
  assert not rows["conv_1_3x3"].takes_part
  table = flops.format_table(rep)
  assert "P.FLOPS 15.08 %" in table and "stage_2.0.downsample.0" in table


def test_dense_layer_masks_and_bias_counting():
  model = models.create_model("cifar_resnet8")
  variables = _concrete(_abstract_variables(model), np.random.default_rng(1))
  variables["masks"] = jax.tree.map(np.ones_like, variables["masks"])
  # Classifier (16 -> 10): unit 9 loses every input (its bias goes too),
  # unit 0 loses inputs 0..7.
  variables["masks"]["classifier"]["kernel"][:, 9] = 0
  variables["masks"]["classifier"]["kernel"][0:8, 0] = 0
  rep = flops.report(model, variables, 32)
  assert rep.dsp_pflops == 0.0
  assert rep.macs_dense - rep.macs == 16 + 8
  assert rep.params_dense - rep.params == 16 + 8 + 1


def test_remove_dead_counts_filters_nobody_reads():
  # Input 1 of stage_1.0.conv_b masked everywhere: conv_a's filter 1 is
  # dead, so with remove_dead its 4 kernels (1/4 of 147456 MACs, 36 weights)
  # and the 2 parameters of bn_a's channel 1 are removed as well.
  model = models.create_model("cifar_resnet8")
  variables = _concrete(_abstract_variables(model), np.random.default_rng(2))
  variables["masks"] = jax.tree.map(np.ones_like, variables["masks"])
  variables["masks"]["stage_1"]["0"]["conv_b"]["kernel"][1, :] = 0
  kept = flops.report(model, variables, 32)
  removed = flops.report(model, variables, 32, remove_dead=True)
  assert kept.macs - removed.macs == 147456 // 4
  assert kept.params - removed.params == 36 + 2
  # DSP measure: 737280 taking-part FLOPs; 36864 (conv_b column) + 36864.
  assert kept.dsp_pflops == pytest.approx(100 * 36864 / 737280)
  assert removed.dsp_pflops == pytest.approx(100 * 2 * 36864 / 737280)


def test_report_needs_params():
  model = models.create_model("cifar_resnet8")
  with pytest.raises(ValueError, match="params"):
    flops.report(model, {"masks": {}}, 32)


def _torch_macs(module, shape, convs_only=False):
  """Conv (and Linear) MACs of a torch module for one input of ``shape``."""
  import torch
  total = []

  def hook(m, inp, out):
    if isinstance(m, torch.nn.Conv2d):
      total.append(out[0].numel() * m.in_channels // m.groups
                   * m.kernel_size[0] * m.kernel_size[1])
    elif isinstance(m, torch.nn.Linear) and not convs_only:
      total.append(m.in_features * m.out_features)

  handles = [m.register_forward_hook(hook) for m in module.modules()]
  with torch.no_grad():
    module.eval()(torch.zeros((1,) + shape))
  for h in handles:
    h.remove()
  return sum(total)


@pytest.mark.parametrize("name", ["cifar_vgg_tiny", "cifar_resnet10_tiny"])
def test_channel_pruning_counts_the_next_layers_input_kernels(name):
  """A pruned filter whose norm is masked outputs zeros: the kernels of the
  next layer that read it are removed too, as the slimmed export drops
  them, so the report's MACs are the exported model's."""
  import ddrop_jax
  from ddrop_jax.config import DdropConfig
  from convert import slim
  model = models.create_model(name, 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False)
  layers = ddrop_jax.ddrop_layers(model)
  pruned = jax.device_get(ddrop_jax.prune(
      variables, layers, DdropConfig(amount=0.5)))
  rep = flops.report(model, pruned, 32, remove_dead=True)
  module, _ = slim.slim(model, pruned, 32)
  # VGG's hidden Linears are LayerNorm-mixed: their inputs are counted
  # whole (a few hundred MACs the export saves beyond the report).
  convs = sum(r.macs for r in rep.per_layer if r.kind == "conv")
  assert convs == _torch_macs(module, (3, 32, 32), convs_only=True)
  assert rep.macs < flops.report(model, pruned, 32).macs < rep.macs_dense
