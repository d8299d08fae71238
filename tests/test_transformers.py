"""ViT / Swin: architecture parity with PyTorch, name tables (torchvision and
timm), DDROP on the MLP hidden units, slimmed export, pretrained starts."""

from __future__ import annotations

import collections
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ddrop_jax as dd
import models
from models import paths
from configs import base
from convert import dsp, jax_side, pretrained, slim, transformers
from convert import writer
from models import graph as structure_lib
from training import config as config_lib
from training import artifacts

ATOL = 1e-4


# ---------------------------------------------------------------------------
# PyTorch implementations of the published architectures (torchvision's
# VisionTransformer and SwinTransformer V1, evaluation mode), written here
# independently of convert/: their state dicts have torchvision's names.


class RefViTBlock(nn.Module):

  def __init__(self, dim, heads, mlp_dim):
    super().__init__()
    self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
    self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
    self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(),
                             nn.Linear(mlp_dim, dim), nn.Dropout())

  def forward(self, inp):
    x = self.ln_1(inp)
    x, _ = self.self_attention(x, x, x, need_weights=False)
    x = x + inp
    return x + self.mlp(self.ln_2(x))


class RefViT(nn.Module):

  def __init__(self, image_size, patch, layers, heads, dim, mlp_dim, classes):
    super().__init__()
    self.patch = patch
    self.conv_proj = nn.Conv2d(3, dim, patch, patch)
    self.class_token = nn.Parameter(torch.randn(1, 1, dim))
    self.encoder = nn.Module()
    self.encoder.pos_embedding = nn.Parameter(
        torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
    self.encoder.layers = nn.Sequential(collections.OrderedDict(
        (f"encoder_layer_{i}", RefViTBlock(dim, heads, mlp_dim))
        for i in range(layers)))
    self.encoder.ln = nn.LayerNorm(dim, eps=1e-6)
    self.heads = nn.Sequential(collections.OrderedDict(
        head=nn.Linear(dim, classes)))

  def forward(self, x):
    n = x.shape[0]
    x = self.conv_proj(x).reshape(n, self.conv_proj.out_channels, -1)
    x = torch.cat([self.class_token.expand(n, -1, -1), x.permute(0, 2, 1)], 1)
    x = self.encoder.ln(self.encoder.layers(x + self.encoder.pos_embedding))
    return self.heads(x[:, 0])


def ref_shifted_window_attention(x, qkv, proj, table, index, window, heads,
                                 shift):
  """torchvision's ``shifted_window_attention`` (V1, eval)."""
  b, h, w, c = x.shape
  pad_r = (window - w % window) % window
  pad_b = (window - h % window) % window
  x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
  _, ph, pw, _ = x.shape
  shift = list(shift)
  if window >= ph:
    shift[0] = 0
  if window >= pw:
    shift[1] = 0
  if sum(shift) > 0:
    x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
  nw = (ph // window) * (pw // window)
  x = x.view(b, ph // window, window, pw // window, window, c)
  x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * nw, window * window, c)
  q, k, v = qkv(x).reshape(x.size(0), x.size(1), 3, heads,
                           c // heads).permute(2, 0, 3, 1, 4)
  q = q * (c // heads) ** -0.5
  attn = q.matmul(k.transpose(-2, -1))
  n = window * window
  bias = table[index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
  attn = attn + bias
  if sum(shift) > 0:
    mask = x.new_zeros((ph, pw))
    hs = ((0, -window), (-window, -shift[0]), (-shift[0], None))
    ws = ((0, -window), (-window, -shift[1]), (-shift[1], None))
    count = 0
    for hh in hs:
      for ww in ws:
        mask[hh[0]:hh[1], ww[0]:ww[1]] = count
        count += 1
    mask = mask.view(ph // window, window, pw // window, window)
    mask = mask.permute(0, 2, 1, 3).reshape(nw, n)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    attn = attn.view(x.size(0) // nw, nw, heads, n, n)
    attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
  x = F.softmax(attn, dim=-1).matmul(v).transpose(1, 2).reshape(
      x.size(0), n, c)
  x = proj(x)
  x = x.view(b, ph // window, pw // window, window, window, c)
  x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
  if sum(shift) > 0:
    x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
  return x[:, :h, :w, :].contiguous()


class RefSwinAttention(nn.Module):

  def __init__(self, dim, window, shift, heads):
    super().__init__()
    self.window, self.shift, self.heads = window, shift, heads
    self.qkv = nn.Linear(dim, dim * 3)
    self.proj = nn.Linear(dim, dim)
    self.relative_position_bias_table = nn.Parameter(
        torch.randn((2 * window - 1) ** 2, heads) * 0.5)
    coords = torch.stack(torch.meshgrid(torch.arange(window),
                                        torch.arange(window), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    self.register_buffer("relative_position_index", rel.sum(-1).flatten())

  def forward(self, x):
    return ref_shifted_window_attention(
        x, self.qkv, self.proj, self.relative_position_bias_table,
        self.relative_position_index, self.window, self.heads,
        [self.shift, self.shift])


class RefSwinBlock(nn.Module):

  def __init__(self, dim, heads, window, shift):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim)
    self.attn = RefSwinAttention(dim, window, shift, heads)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(),
                             nn.Linear(4 * dim, dim), nn.Dropout())

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class RefPatchMerging(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
    self.norm = nn.LayerNorm(4 * dim)

  def forward(self, x):
    h, w = x.shape[-3:-1]
    x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :],
                   x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
    return self.reduction(self.norm(x))


class Permute(nn.Module):

  def forward(self, x):
    return x.permute(0, 2, 3, 1)


class RefSwin(nn.Module):

  def __init__(self, patch, dim, depths, heads, window, classes):
    super().__init__()
    layers = [nn.Sequential(nn.Conv2d(3, dim, patch, patch), Permute(),
                            nn.LayerNorm(dim))]
    for s, depth in enumerate(depths):
      d = dim * 2 ** s
      layers.append(nn.Sequential(*[
          RefSwinBlock(d, heads[s], window, 0 if j % 2 == 0 else window // 2)
          for j in range(depth)]))
      if s < len(depths) - 1:
        layers.append(RefPatchMerging(d))
    self.features = nn.Sequential(*layers)
    self.norm = nn.LayerNorm(dim * 2 ** (len(depths) - 1))
    self.head = nn.Linear(dim * 2 ** (len(depths) - 1), classes)

  def forward(self, x):
    x = self.norm(self.features(x)).permute(0, 3, 1, 2)
    return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _randomize(module, seed):
  """Every tensor random, so that no layer is an identity or a zero."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("bias"):
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
      elif p.ndim == 1:
        p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
  return module.eval()


def ref_vit(classes=10, image_size=32, seed=0):
  torch.manual_seed(seed)
  return _randomize(RefViT(image_size, 8, 2, 2, 32, 64, classes), seed)


def ref_swin(classes=10, seed=0):
  torch.manual_seed(seed)
  return _randomize(RefSwin(2, 16, (2, 2), (2, 4), 4, classes), seed)


def to_timm(sd):
  """torchvision ViT/Swin keys -> timm's, by the published timm names."""
  out = {}
  for k, v in sd.items():
    m = re.match(r"encoder\.layers\.encoder_layer_(\d+)\.(.*)", k)
    if m:
      i, rest = m.groups()
      rest = (rest.replace("ln_1", "norm1").replace("ln_2", "norm2")
              .replace("self_attention.in_proj_weight", "attn.qkv.weight")
              .replace("self_attention.in_proj_bias", "attn.qkv.bias")
              .replace("self_attention.out_proj", "attn.proj")
              .replace("mlp.0", "mlp.fc1").replace("mlp.3", "mlp.fc2"))
      out[f"blocks.{i}.{rest}"] = v
      continue
    m = re.match(r"features\.(\d+)\.(.*)", k)
    if m:
      f, rest = int(m.group(1)), m.group(2)
      if f == 0:
        rest = rest.replace("0.", "proj.", 1).replace("2.", "norm.", 1)
        out[f"patch_embed.{rest}"] = v
      elif f % 2:
        j, r = rest.split(".", 1)
        r = r.replace("mlp.0", "mlp.fc1").replace("mlp.3", "mlp.fc2")
        out[f"layers.{(f - 1) // 2}.blocks.{j}.{r}"] = v
      else:
        out[f"layers.{f // 2}.downsample.{rest}"] = v
      continue
    names = {"conv_proj.weight": "patch_embed.proj.weight",
             "conv_proj.bias": "patch_embed.proj.bias",
             "class_token": "cls_token", "encoder.pos_embedding": "pos_embed",
             "encoder.ln.weight": "norm.weight", "encoder.ln.bias": "norm.bias",
             "heads.head.weight": "head.weight", "heads.head.bias": "head.bias"}
    if "features.0.0.weight" in sd and k.startswith("head."):
      out["head.fc." + k[5:]] = v   # timm >= 0.9 Swin head
    else:
      out[names.get(k, k)] = v
  return out


def _images(n=3, size=32):
  return writer.random_images(n, size, seed=3)


def _ref_logits(module, x):
  return writer.torch_logits(module, x)


def _logits(model, variables, x):
  # Compiled: the eager op-by-op Swin forward takes seconds on CPU.
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return np.asarray(fn(jax.tree.map(jnp.asarray, dict(variables)),
                       jnp.asarray(x)))


def _flax(name, **kw):
  model = models.create_model(name, kw.pop("num_classes", 10), **kw)
  return model, artifacts.template(model, model.image_size)


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torchvision", "timm"])
@pytest.mark.parametrize("name", ["vit_tiny", "swin_tiny"])
def test_imported_state_dict_gives_the_reference_logits(name, fmt):
  ref = ref_vit() if name == "vit_tiny" else ref_swin()
  sd = ref.state_dict()
  if fmt == "timm":
    sd = to_timm(sd)
    assert any(k.startswith(("blocks.", "layers.")) for k in sd)
  model, tmpl = _flax(name)
  v = transformers.from_torch(sd, tmpl, model, name, log=lambda _: None)
  x = _images()
  got = _logits(model, v, x)
  want = _ref_logits(ref, x)
  assert np.max(np.abs(got - want)) <= ATOL
  # Export direction: the same names and tensors come back.
  back = transformers.to_torch(v["params"], model, fmt)
  for k, t in back.items():
    np.testing.assert_allclose(t, sd[k].numpy(), atol=1e-6, err_msg=k)


def test_swin_pads_maps_to_whole_windows():
  # 28 / patch 2 = 14 tokens: padded to 16 for the 4x4 windows, then 7 -> 8.
  torch.manual_seed(1)
  ref = _randomize(RefSwin(2, 16, (2, 2), (2, 4), 4, 10), 1)
  model, tmpl = _flax("swin_tiny", image_size=28)
  v = transformers.from_torch(ref.state_dict(), tmpl, model)
  x = _images(2, 28)
  assert np.max(np.abs(_logits(model, v, x) - _ref_logits(ref, x))) <= ATOL


def test_full_size_parameter_counts():
  for name, want in (("vit_b_16", 86_567_656), ("swin_t", 28_288_354)):
    model, tmpl = _flax(name, num_classes=1000)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tmpl["params"]))
    assert n == want, name
  # Whole-model MACs, attention products included: torchvision's published
  # 17.56 (ViT-B/16) and 4.49 (Swin-T) GFLOPS.
  for name, want in (("vit_b_16", 17.56e9), ("swin_t", 4.49e9)):
    s = models.analyze(models.create_model(name, 1000), 224)
    macs = sum(l.macs for l in s.producers) + s.activation_macs
    assert abs(macs - want) < 0.005e9, (name, macs)
  model, tmpl = _flax("vit_b_16", num_classes=1000, mlp_scale=True)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tmpl["params"]))
  assert n == 86_567_656 + 12 * 3072   # one DDROP scale per hidden unit


def test_position_embedding_resize_is_torch_bicubic():
  pos = np.random.default_rng(0).normal(size=(1, 1 + 16, 5))
  got = transformers.interpolate_pos_embedding(pos, 1 + 36)
  grid = torch.from_numpy(pos[0, 1:].reshape(4, 4, 5).transpose(2, 0, 1))[None]
  want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=True)
  want = want[0].permute(1, 2, 0).reshape(36, 5).numpy()
  np.testing.assert_allclose(got[0, 1:], want, atol=1e-10)
  np.testing.assert_array_equal(got[0, 0], pos[0, 0])


def test_other_image_size_resizes_the_position_embedding_and_head_is_replaced():
  sd = ref_vit(classes=7).state_dict()
  model = models.create_model("vit_tiny", 10, image_size=48)
  fresh = artifacts.random_variables(model, 0)
  lines = []
  v = pretrained.load_state_dict(sd, model, "vit_tiny", fresh, lines.append)
  assert v["params"]["encoder"]["pos_embedding"].shape == (1, 37, 32)
  assert any("head" in l and "replaced" in l for l in lines)
  assert any("resized from 17 to 37" in l for l in lines)
  np.testing.assert_array_equal(v["params"]["heads"]["head"]["kernel"],
                                fresh["params"]["heads"]["head"]["kernel"])
  np.testing.assert_allclose(
      v["params"]["conv_proj"]["bias"], sd["conv_proj.bias"].numpy())


def test_structure_separates_mlp_units_from_attention():
  model = models.create_model("vit_tiny", 10, mlp_scale=True)
  s = models.analyze(model, 32)
  fc1 = [l for l in s.producers if l.path[-1] == "fc1"]
  assert len(fc1) == 2
  for l in fc1:
    assert l.path not in s.mixed and l.norm == l.path[:-1] + ("dummy_norm",)
    assert len(s.space_of(l.path)) == 1
  attn = [l for l in s.producers if "self_attention" in l.path]
  assert attn and all(l.path in s.mixed for l in attn)
  # Dead-unit detection: a zero DDROP scale kills exactly those fc1 units.
  v = artifacts.random_variables(model, 0)
  scale = v["params"]["encoder"]["layers"]["encoder_layer_1"]["mlp"][
      "dummy_norm"]["scale"]
  scale[:5] = 0
  dead = structure_lib.dead_channels(s, v.get("masks"), v["params"])
  assert int(dead[fc1[1].path].sum()) == 5 and not dead[fc1[0].path].any()
  assert not any(d.any() for p, d in dead.items() if p not in
                 (fc1[0].path, fc1[1].path))


@pytest.mark.parametrize("name", ["vit_tiny", "swin_tiny"])
def test_ddrop_acts_on_exactly_the_mlp_hidden_units(name):
  model = models.create_model(name, 10, mlp_scale=True)
  v = artifacts.random_variables(model, 0)
  layers = dd.ddrop_layers(model)
  blocks = 2 if name == "vit_tiny" else 4
  assert len(layers) == blocks
  for l in layers:
    assert l.path[-2:] == ("mlp", "dummy_norm")
    assert l.producer == l.path[:-1] + ("fc1",)
    assert l.units == paths.get(
        v["params"], l.producer)["kernel"].shape[1]
  cfg = dd.DdropConfig(prob=(0.2, 0.9), amount=0.25, total_steps=10)
  keep = dd.keep_probabilities(v["params"], None, 0, cfg, layers)
  flat = artifacts.flatten(keep)
  assert sorted(flat) == sorted("/".join(l.path) + "/keep" for l in layers)
  # Drawn masks in training touch only those units: attention is untouched.
  x = jnp.asarray(_images(2))
  hidden = {} if name != "vit_tiny" else jax.jit(lambda v, x: model.apply(
      {**v, "ddrop": keep}, x, train=True, rngs={"ddrop": jax.random.key(0)},
      capture_intermediates=lambda m, _: "dummy_norm" in m.scope.path,
      mutable=["intermediates"])[1]["intermediates"])(v, x)
  for l in layers if hidden else ():
    y = np.asarray(paths.get(hidden, l.path)["__call__"][0])
    # Per sample, dropped units are zero at every token.
    dropped = np.all(y == 0, axis=tuple(range(1, y.ndim - 1)))
    assert 0 < dropped.mean() < 1
  pruned = artifacts.to_numpy_tree(dd.prune(v, layers, cfg))
  for path, m in artifacts.flatten(pruned["masks"]).items():
    zeros = int((m == 0).sum())
    if path.endswith("mlp/fc1/kernel"):
      units = m.shape[1]
      assert int((m.max(axis=0) == 0).sum()) == math.floor(0.25 * units)
    elif path.endswith("mlp/dummy_norm/scale"):
      assert zeros == math.floor(0.25 * m.size)
    else:
      assert zeros == 0, path
  # L1 on the DDROP scales only.
  mask = dd.l1_mask(layers)(v["params"])
  on = [k for k, b in artifacts.flatten(mask).items() if b]
  assert sorted(on) == sorted("/".join(l.path) + "/scale" for l in layers)


@pytest.mark.parametrize("name", ["vit_tiny", "swin_tiny"])
def test_slim_export_matches_masked_jax_with_fewer_params(name, tmp_path):
  model = models.create_model(name, 10, mlp_scale=True)
  v = artifacts.random_variables(model, 0)
  pruned = artifacts.to_numpy_tree(dd.prune(v, dd.ddrop_layers(model),
                                           dd.DdropConfig(amount=0.5)))
  if name == "vit_tiny":
    out = slim.export_ddrop(model, pruned, tmp_path, program=False)
    assert max(out.max_abs_diff.values()) <= ATOL
    s = out.details["summary"]
    sd = torch.load(out.files[slim.STATE_DICT], weights_only=True)
  else:  # The module only (the files are written as for the ViT).
    module, s = slim.slim(model, pruned)
    x = _images(2)
    assert np.max(np.abs(writer.torch_logits(module, x) -
                         _logits(model, pruned, x))) <= ATOL
    sd = module.state_dict()
  assert s.params_after < s.params_before
  fc1 = [k for k in sd if re.search(r"mlp\.0\.weight$", k)]
  fc2 = [k for k in sd if re.search(r"mlp\.3\.weight$", k)]
  assert len(fc1) == len(fc2) == (2 if name == "vit_tiny" else 4)
  for a, b in zip(fc1, fc2):
    assert sd[a].shape[0] == sd[b].shape[1]
  hidden = {k: v for k, v in s.widths.items() if k.endswith("fc1")}
  assert all(after == before // 2 for before, after in hidden.values())


def test_bad_inputs_are_clear_errors():
  model, tmpl = _flax("vit_tiny")
  resnet_sd = {"conv1.weight": torch.zeros(8, 3, 3, 3)}
  with pytest.raises(ValueError, match="vit_tiny.*'conv1.weight'"):
    transformers.from_torch(resnet_sd, tmpl, model, "vit_tiny")
  sd = ref_vit().state_dict()
  sd.pop("encoder.layers.encoder_layer_1.mlp.0.weight")
  with pytest.raises(KeyError, match="vit_tiny.*encoder_layer_1.mlp.0.weight"):
    transformers.from_torch(sd, tmpl, model, "vit_tiny")
  wide = RefViT(32, 8, 2, 2, 48, 64, 10).state_dict()
  with pytest.raises(ValueError, match="vit_tiny.*conv_proj.weight"):
    transformers.from_torch(wide, tmpl, model, "vit_tiny")
  # A transformer file for a CNN names the CNN and its first missing key.
  cnn = models.create_model("cifar_resnet10_tiny", 10)
  with pytest.raises(KeyError, match="cifar_resnet10_tiny.*conv1.weight"):
    pretrained.load_state_dict(ref_vit().state_dict(), cnn,
                               "cifar_resnet10_tiny",
                               artifacts.random_variables(cnn, 0))
  # Pruning every hidden unit of a block cannot be slimmed: named.
  vit = models.create_model("vit_tiny", 10, mlp_scale=True)
  v = artifacts.random_variables(vit, 0)
  empty = dd.prune(v, dd.ddrop_layers(vit), dd.DdropConfig(amount=1.0))
  with pytest.raises(ValueError, match="encoder_layer_0.mlp keeps none"):
    slim.slim(vit, artifacts.to_numpy_tree(empty))
  with pytest.raises(ValueError, match="image size 30.*patch size 8"):
    artifacts.template(models.create_model("vit_tiny", 10, image_size=30), 30)
  with pytest.raises(ValueError, match="image size 31.*patch size 2.*window 4"):
    artifacts.template(models.create_model("swin_tiny", 10, image_size=31), 31)


def _digits_config(**kw):
  c = base.get_config()
  c.dataset = "digits"
  c.model = "vit_tiny"
  c.batch_size = 64
  c.test_batch_size = 360
  c.progress_bar = False
  c.checkpoint_every_steps = 1000
  for k, v in kw.items():
    c[k] = v
  return c


def test_ddrop_amount_removing_every_hidden_unit_is_refused(tmp_path):
  from ddrop_jax import pipeline as ddrop_pipeline
  c = _digits_config(method="ddrop")
  c.ddrop.amount = 1.0
  # floor(amount * C) = C only for amount = 1: refused before any work.
  with pytest.raises(config_lib.ConfigError, match="ddrop.amount"):
    ddrop_pipeline.run(c, tmp_path)


def test_pretrained_start_first_evaluation_is_the_imported_accuracy(tmp_path):
  from training import mesh as mesh_lib
  from training import pipeline as train_pipeline
  from training import state as state_lib
  from training import steps
  from training import data
  torch.save(ref_vit(seed=5).state_dict(), tmp_path / "vit.pth")
  c = _digits_config(method="train", epochs=1, max_steps=1,
                     init_from=str(tmp_path / "vit.pth"))
  c.optim.lr = 0.0
  c.optim.weight_decay = 0.0
  report = train_pipeline.run(c, tmp_path / "run")
  first = report["stages"]["train"]["final"]["test"]["accuracy"]
  # The imported model evaluated directly.
  model = models.create_model("vit_tiny", 10)
  v = pretrained.load(tmp_path / "vit.pth", model, "vit_tiny",
                      artifacts.random_variables(model, 0))
  info = data.get_info("digits")
  mesh = mesh_lib.make_mesh()
  state = state_lib.create_train_state(
      model, __import__("optax").sgd(0.0), jax.random.key(0), (32, 32, 3))
  state = state.replace(params=jax.tree.map(jnp.asarray, v["params"]))
  acc = steps.evaluate(steps.make_eval_step(model, info, mesh), state,
                       data.eval_batches("digits", "test", batch_size=360),
                       mesh)["accuracy"]
  assert first == pytest.approx(acc, abs=1e-9)
  assert 0.0 < acc < 1.0


def test_torchvision_cnn_state_dict_start_replaces_a_head_of_other_classes():
  src = models.create_model("cifar_resnet10_tiny", 7)
  sd = jax_side.tables.to_torch(artifacts.random_variables(src, 1), "resnet")
  model = models.create_model("cifar_resnet10_tiny", 10)
  fresh = artifacts.random_variables(model, 0)
  lines = []
  v = pretrained.load_state_dict(sd, model, "cifar_resnet10_tiny", fresh,
                                 lines.append)
  assert len(lines) == 1 and "fc.weight has 7 classes" in lines[0]
  np.testing.assert_array_equal(v["params"]["fc"]["kernel"],
                                fresh["params"]["fc"]["kernel"])
  np.testing.assert_allclose(v["params"]["conv1"]["kernel"],
                             np.transpose(sd["conv1.weight"], (2, 3, 1, 0)))
  np.testing.assert_allclose(v["batch_stats"]["bn1"]["mean"],
                             sd["bn1.running_mean"])


def test_convert_import_reads_a_timm_file(tmp_path):
  from convert import cli
  torch.save(to_timm(ref_vit().state_dict()), tmp_path / "vit.pth")
  assert cli.main(["import", str(tmp_path / "vit.pth"), "--model", "vit_tiny",
                   "--out", str(tmp_path / "imp")]) == 0
  model, v, info = artifacts.load_variables(tmp_path / "imp")
  assert info["model"] == "vit_tiny"
  x = _images(2)
  assert np.max(np.abs(_logits(model, v, x) -
                       _ref_logits(ref_vit(), x))) <= ATOL


@pytest.mark.slow
def test_ddrop_pipeline_on_a_pretrained_tiny_vit_exports_a_slim_model(tmp_path):
  from ddrop_jax import pipeline as ddrop_pipeline
  torch.save(ref_vit(seed=2).state_dict(), tmp_path / "vit.pth")
  c = _digits_config(method="ddrop", max_steps=2,
                     init_from=str(tmp_path / "vit.pth"))
  # DDROP, pruning, fine-tuning and the export (plain training before is
  # the engine's, tested elsewhere).
  c.ddrop.before_epochs, c.ddrop.epochs, c.ddrop.ft_epochs = 0, 1, 1
  c.ddrop.lr, c.ddrop.ft_lr = 1e-3, 1e-3
  report = ddrop_pipeline.run(c, tmp_path / "run")
  assert set(report["accuracy"]) == {"ddrop", "pruned", "finetune"}
  assert report["pruned_units"] == {
      f"encoder.layers.encoder_layer_{i}.mlp.dummy_norm": [32, 64]
      for i in range(2)}
  export = tmp_path / "run" / "export"
  sd = torch.load(export / slim.STATE_DICT, weights_only=True)
  assert sd["encoder.layers.encoder_layer_0.mlp.0.weight"].shape == (32, 32)
  assert sd["encoder.layers.encoder_layer_0.mlp.3.weight"].shape == (32, 32)
  assert max(report["export"]["max_abs_diff"].values()) <= ATOL
