"""PyTorch ViT / Swin with torchvision's module names, and DDROP slimming.

``TorchViT`` and ``TorchSwin`` compute torchvision's ``vit_b_16`` /
``swin_t`` architectures (evaluation mode) with a per-block MLP width, so a
pruned model's MLP hidden units can be physically removed: ``mlp.0``
(fc1) keeps only its live rows and ``mlp.3`` (fc2) the matching columns. The
state-dict keys are torchvision's (``encoder.layers.encoder_layer_{i}
.mlp.0.weight``, ``features.{k}.{j}.attn.qkv.weight``, ...); a dense ViT's
state dict loads into torchvision's own module, a Swin's with
``strict=False`` (it also holds each block's ``attn.attn_mask`` buffer).

``slim(model, variables)`` folds DDROP's ``dummy_norm`` scale into fc1 (a
per-unit scale of a Linear's output is a scale of its rows and bias) and
removes the hidden units that cannot affect the logits
(``models.dead_channels``: a zero masked scale, or an fc2 column that is
zero) or that output zero (fc1 row and bias zero; GELU(0) = 0). A DSP-pruned
MLP (groups of fc1 units over their own input features, a filter-pruned fc2)
also drops the token features fc1 never reads and the outputs fc2 never
writes: ``SlimMlp`` reads the union of its groups' inputs (zeros where a
group does not use one) and index-adds fc2's kept outputs into the residual
stream, exactly the masked model's arithmetic.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import models
from models import paths
from convert import packing, tables, transformers
from models import swin as swin_lib
from models import vit as vit_lib
from models.paths import Path
from training import artifacts


class SlimMlp(nn.Sequential):
  """torchvision's MLP (Linear, GELU, Dropout, Linear, Dropout) over kept units.

  ``0`` (fc1) reads only the input features ``inputs`` and ``3`` (fc2) writes
  only the output features ``outputs``, which ``add_to`` index-adds into the
  residual stream (DSP's per-group input subsets and filter-pruned fc2, as
  ``convert.branched`` does for convs). Without them (None: every feature) it
  is torchvision's module, state-dict keys included.

  Args:
    dim: token width.
    hidden: kept hidden units.
    inputs: fc1's input features (int64), None for all.
    outputs: fc2's output features (int64), None for all.
  """

  def __init__(self, dim: int, hidden: int,
               inputs: torch.Tensor | None = None,
               outputs: torch.Tensor | None = None):
    super().__init__(
        nn.Linear(dim if inputs is None else len(inputs), hidden), nn.GELU(),
        nn.Dropout(0.0),
        nn.Linear(hidden, dim if outputs is None else len(outputs)),
        nn.Dropout(0.0))
    self.select, self.scatter = inputs is not None, outputs is not None
    if inputs is not None:
      self.register_buffer("inputs", inputs)
    if outputs is not None:
      self.register_buffer("outputs", outputs)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.select:
      x = x.index_select(x.dim() - 1, self.inputs)
    for m in self:
      x = m(x)
    return x

  def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The residual sum ``x + mlp`` with ``y`` (this MLP's output)."""
    if self.scatter:
      return x.index_add(x.dim() - 1, self.outputs, y)
    return x + y


# Per block: (hidden units, fc1 input features or None, fc2 outputs or None).
MlpShape = tuple[int, Any, Any]


def _mlp(dim: int, shape: int | MlpShape) -> SlimMlp:
  if isinstance(shape, int):
    return SlimMlp(dim, shape)
  hidden, inputs, outputs = shape
  idx = lambda a: None if a is None else torch.from_numpy(
      np.asarray(a, np.int64))
  return SlimMlp(dim, hidden, idx(inputs), idx(outputs))


class SelfAttention(nn.Module):
  """``nn.MultiheadAttention``'s tensors (fused ``in_proj``), batch first."""

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.in_proj_weight = nn.Parameter(torch.zeros(3 * dim, dim))
    self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
    self.out_proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
    qkv = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(
        2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = torch.softmax(
        (q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
    return self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class EncoderBlock(nn.Module):
  def __init__(self, dim: int, heads: int, hidden: int | MlpShape):
    super().__init__()
    self.ln_1 = nn.LayerNorm(dim, eps=vit_lib.LN_EPS)
    self.self_attention = SelfAttention(dim, heads)
    self.ln_2 = nn.LayerNorm(dim, eps=vit_lib.LN_EPS)
    self.mlp = _mlp(dim, hidden)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.self_attention(self.ln_1(x))
    return self.mlp.add_to(x, self.mlp(self.ln_2(x)))


class Encoder(nn.Module):
  def __init__(self, tokens: int, dim: int, heads: int,
               hidden: Sequence[int]):
    super().__init__()
    self.pos_embedding = nn.Parameter(torch.zeros(1, tokens, dim))
    self.layers = nn.Sequential(collections.OrderedDict(
        (f"encoder_layer_{i}", EncoderBlock(dim, heads, h))
        for i, h in enumerate(hidden)))
    self.ln = nn.LayerNorm(dim, eps=vit_lib.LN_EPS)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.ln(self.layers(x + self.pos_embedding))


class TorchViT(nn.Module):
  """torchvision ``VisionTransformer`` (eval) with per-block MLP widths."""

  def __init__(self, image_size: int, patch: int, dim: int, heads: int,
               hidden: Sequence[int], num_classes: int):
    super().__init__()
    self.conv_proj = nn.Conv2d(3, dim, patch, patch)
    self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.encoder = Encoder((image_size // patch) ** 2 + 1, dim, heads, hidden)
    self.heads = nn.Sequential(collections.OrderedDict(
        head=nn.Linear(dim, num_classes)))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.conv_proj(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    return self.heads(self.encoder(x)[:, 0])


class WindowAttention(nn.Module):
  """torchvision ``ShiftedWindowAttention`` for a fixed (H, W) map."""

  def __init__(self, dim: int, window: int, shift: int, heads: int,
               hw: tuple[int, int]):
    super().__init__()
    self.window, self.heads = window, heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.relative_position_bias_table = nn.Parameter(
        torch.zeros((2 * window - 1) ** 2, heads))
    self.register_buffer("relative_position_index", torch.from_numpy(
        models.transformer.relative_position_index(window).astype(np.int64)))
    h, w = hw
    self.pad = ((window - w % window) % window, (window - h % window) % window)
    ph, pw = h + self.pad[1], w + self.pad[0]
    self.shift = (0 if window >= ph else shift, 0 if window >= pw else shift)
    mask = swin_lib.attention_mask(ph, pw, window, self.shift) if sum(
        self.shift) else np.zeros((1, 1, 1), np.float32)
    # Persistent: a state dict restores everything forward reads (torchvision
    # recomputes the mask in forward; timm stores it as ``attn_mask`` too).
    self.register_buffer("attn_mask", torch.from_numpy(mask))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    ws = self.window
    x = F.pad(x, (0, 0, 0, self.pad[0], 0, self.pad[1]))
    ph, pw = h + self.pad[1], w + self.pad[0]
    if sum(self.shift):
      x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
    nw = (ph // ws) * (pw // ws)
    x = x.view(b, ph // ws, ws, pw // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b * nw, ws * ws, c)
    n = ws * ws
    qkv = self.qkv(x).reshape(b * nw, n, 3, self.heads,
                              c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
    bias = self.relative_position_bias_table[self.relative_position_index]
    attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    if sum(self.shift):
      attn = attn.view(b, nw, self.heads, n, n) + self.attn_mask.unsqueeze(
          1).unsqueeze(0)
      attn = attn.view(-1, self.heads, n, n)
    x = (torch.softmax(attn, dim=-1) @ v).transpose(1, 2).reshape(b * nw, n, c)
    x = self.proj(x)
    x = x.view(b, ph // ws, pw // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, ph, pw, c)
    if sum(self.shift):
      x = torch.roll(x, shifts=self.shift, dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class SwinBlock(nn.Module):
  def __init__(self, dim: int, heads: int, window: int, shift: int,
               hidden: int | MlpShape, hw: tuple[int, int]):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=swin_lib.LN_EPS)
    self.attn = WindowAttention(dim, window, shift, heads, hw)
    self.norm2 = nn.LayerNorm(dim, eps=swin_lib.LN_EPS)
    self.mlp = _mlp(dim, hidden)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x))
    return self.mlp.add_to(x, self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
  def __init__(self, dim: int):
    super().__init__()
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
    self.norm = nn.LayerNorm(4 * dim, eps=swin_lib.LN_EPS)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[1], x.shape[2]
    x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                   x[:, 1::2, 1::2]], -1)
    return self.reduction(self.norm(x))


class _NHWC(nn.Module):
  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class TorchSwin(nn.Module):
  """torchvision ``SwinTransformer`` (V1, eval) with per-block MLP widths."""

  def __init__(self, image_size: int, patch: int, dim: int,
               depths: Sequence[int], heads: Sequence[int], window: int,
               hidden: Sequence[Sequence[int]], num_classes: int):
    super().__init__()
    layers: list[nn.Module] = [nn.Sequential(
        nn.Conv2d(3, dim, patch, patch), _NHWC(),
        nn.LayerNorm(dim, eps=swin_lib.LN_EPS))]
    size = image_size // patch
    for s, depth in enumerate(depths):
      d = dim * 2 ** s
      layers.append(nn.Sequential(*[
          SwinBlock(d, heads[s], window, 0 if j % 2 == 0 else window // 2,
                    hidden[s][j], (size, size)) for j in range(depth)]))
      if s + 1 < len(depths):
        layers.append(PatchMerging(d))
        size = (size + 1) // 2
    self.features = nn.Sequential(*layers)
    self.norm = nn.LayerNorm(dim * 2 ** (len(depths) - 1),
                             eps=swin_lib.LN_EPS)
    self.head = nn.Linear(dim * 2 ** (len(depths) - 1), num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(self.norm(self.features(x)).mean((1, 2)))


# ------------------------------------------------------------------ slimming
def mlp_blocks(model: Any) -> list[tuple[str, ...]]:
  """Flax paths of every MLP (``.../mlp``), in block order."""
  if isinstance(models.unwrap(model), vit_lib.VisionTransformer):
    return [("encoder", "layers", f"encoder_layer_{i}", "mlp")
            for i in range(model.num_layers)]
  return [("features", str(2 * s + 1), str(j), "mlp")
          for s, depth in enumerate(model.depths) for j in range(depth)]


def kept_hidden(model: Any, variables: Mapping[str, Any],
                image_size: int) -> dict[tuple[str, ...], np.ndarray]:
  """MLP path -> its hidden units that stay (ascending)."""
  structure = models.analyze(model, image_size)
  masks = variables.get(tables.MASKS)
  params = variables[tables.PARAMS]
  dead = models.dead_channels(structure, masks, params)
  folded = packing.apply_masks(variables)[tables.PARAMS]
  out = {}
  for mlp in mlp_blocks(model):
    fc1: Path = mlp + ("fc1",)
    p = paths.get(folded, fc1)
    zero = ~np.any(np.asarray(p["kernel"]) != 0, axis=0) & (
        np.asarray(p["bias"]) == 0)
    out[mlp] = np.flatnonzero(~(dead[fc1] | zero)).astype(np.int64)
  return out


def _fold_scale(folded: Mapping[str, Any], mlp: tuple[str, ...]) -> None:
  scale = paths.get(folded, mlp + ("dummy_norm", "scale"))
  if scale is None:
    return
  fc1 = paths.get(folded, mlp + ("fc1",))
  fc1["kernel"] = np.asarray(fc1["kernel"]) * np.asarray(scale)[None, :]
  fc1["bias"] = np.asarray(fc1["bias"]) * np.asarray(scale)


def _subset(keep: np.ndarray) -> np.ndarray | None:
  """The kept positions (int64, ascending), None when every one is kept."""
  return None if keep.all() else np.flatnonzero(keep).astype(np.int64)


def torch_module(model: Any, hidden: Sequence[int | MlpShape]) -> nn.Module:
  """The torch ViT / Swin of ``model``'s shape with MLP widths ``hidden``.

  ``hidden[b]`` is block b's hidden units, or ``(units, fc1 inputs, fc2
  outputs)`` for an MLP that reads / writes a subset of the token features
  (``SlimMlp``).
  """
  if isinstance(models.unwrap(model), vit_lib.VisionTransformer):
    return TorchViT(model.image_size, model.patch_size, model.hidden_dim,
                    model.num_heads, hidden, model.num_classes)
  per_stage, i = [], 0
  for depth in model.depths:
    per_stage.append(list(hidden[i:i + depth]))
    i += depth
  return TorchSwin(model.image_size, model.patch_size, model.embed_dim,
                   model.depths, model.num_heads, model.window_size,
                   per_stage, model.num_classes)


def slim(model: Any, variables: Mapping[str, Any], image_size: int
         ) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
  """The masked Flax ViT / Swin with its removable MLP units removed.

  Args:
    model: a ``models.vit.VisionTransformer`` or ``models.swin
      .SwinTransformer``.
    variables: its (pruned, masked) variables.
    image_size: input height/width (the model's).

  Returns:
    The torch module (eval, CPU) and ``{fc1 name: (units, kept)}`` (and
    ``{fc2 name: (outputs, kept)}`` for an fc2 that writes a subset).
  """
  if model.image_size is not None and image_size != model.image_size:
    raise ValueError(f"{type(models.unwrap(model)).__name__} is built for {model.image_size}"
                     f" x {model.image_size} images, not {image_size}")
  if model.image_size is None:
    model = model.clone(image_size=image_size)
  v = artifacts.to_numpy_tree(dict(variables))
  keep = kept_hidden(model, v, image_size)
  folded = artifacts.to_numpy_tree(packing.apply_masks(v)[tables.PARAMS])
  widths, shapes = {}, []
  for mlp, kept in keep.items():
    if not len(kept):
      raise ValueError(
          f"{'.'.join(mlp)} keeps none of its hidden units (pruning amount "
          "1 removes every unit); the slimmed model cannot represent that "
          "(prune with amount < 1)")
    _fold_scale(folded, mlp)
    fc1 = paths.get(folded, mlp + ("fc1",))
    fc2 = paths.get(folded, mlp + ("fc2",))
    widths[".".join(mlp + ("fc1",))] = (fc1["kernel"].shape[1], len(kept))
    fc1["kernel"] = tables.slice_channels(fc1["kernel"], kept, 1)
    fc1["bias"] = tables.slice_channels(fc1["bias"], kept, 0)
    fc2["kernel"] = tables.slice_channels(fc2["kernel"], kept, 0)
    # DSP: each group of fc1 units reads its own input features (fc1 reads
    # their union, zeros where a group does not) and fc2 (the fp layer)
    # writes only its kept outputs (a zero column and bias adds nothing).
    inputs = _subset(np.any(fc1["kernel"] != 0, axis=1))
    outputs = _subset(np.any(fc2["kernel"] != 0, axis=0) | (fc2["bias"] != 0))
    if inputs is not None:
      fc1["kernel"] = tables.slice_channels(fc1["kernel"], inputs, 0)
    if outputs is not None:
      widths[".".join(mlp + ("fc2",))] = (fc2["kernel"].shape[1], len(outputs))
      fc2["kernel"] = tables.slice_channels(fc2["kernel"], outputs, 1)
      fc2["bias"] = tables.slice_channels(fc2["bias"], outputs, 0)
    shapes.append((len(kept), inputs, outputs))
  sd = transformers.to_torch(folded, model)
  module = torch_module(model, [s[0] if s[1] is None and s[2] is None else s
                                for s in shapes])
  for k, buf in module.state_dict().items():
    if k.endswith(("relative_position_index", "attn_mask", "mlp.inputs",
                   "mlp.outputs")):
      sd[k] = buf.numpy()
  module.load_state_dict({k: torch.from_numpy(np.array(x)) for k, x in
                          sd.items()})
  return module.eval(), widths
