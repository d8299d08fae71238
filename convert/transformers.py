"""Name tables between the Flax ViT / Swin and torchvision- or timm-format
state dicts.

A table is a list of ``Entry(torch_key, flax_paths, fn)``: one PyTorch tensor,
the Flax leaves it becomes and the per-tensor function ``fn`` (a pair of
numpy functions, PyTorch -> Flax and back):

=========  =======================================  =========================
fn         PyTorch                                  Flax
=========  =======================================  =========================
conv       weight (O, I, kh, kw)                    kernel (kh, kw, I, O)
linear     weight (out, in)                         kernel (in, out)
same       bias, norm weight/bias, tokens, tables   same array
qkv        fused ``qkv`` / ``in_proj`` (3D, D)      query, key, value (D, D)
qkv_bias   fused bias (3D,)                         three (D,) biases
=========  =======================================  =========================

The tables name every tensor of the model; tensors of the Flax model that no
PyTorch file has (DDROP's ``mlp.dummy_norm`` scales) are left to the caller
(init: ones). Buffers that both formats derive from the architecture
(``relative_position_index``, timm's ``attn_mask``) are checked or ignored.

Formats: torchvision (``conv_proj``, ``encoder.layers.encoder_layer_{i}``,
``self_attention.in_proj_weight``, ``mlp.0`` / ``mlp.3``, ``heads.head``;
Swin ``features.{k}.{j}.attn.qkv``, ``features.{k}.reduction``, ``head``)
and timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.attn.qkv``, ``blocks.{i}.mlp.fc1``, ``head``; Swin
``layers.{s}.blocks.{j}``, ``layers.{s}.downsample`` at the start of stage
s, ``head.fc``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import models
from models import paths

from convert import tables

Array = np.ndarray
FORMATS = ("torchvision", "timm")
# Registry families these tables convert.
FAMILIES = ("vit", "swin")


def split_qkv(w: Array) -> tuple[Array, Array, Array]:
  """Fused (3D, D) Linear weight -> q, k, v Dense kernels (D, D)."""
  q, k, v = np.split(np.asarray(w), 3, axis=0)
  return tuple(tables.transpose2d(x) for x in (q, k, v))


def merge_qkv(q: Array, k: Array, v: Array) -> Array:
  """Inverse of ``split_qkv``."""
  return np.concatenate([tables.transpose2d(x) for x in (q, k, v)], axis=0)


def split_qkv_bias(b: Array) -> tuple[Array, Array, Array]:
  return tuple(np.split(np.asarray(b), 3, axis=0))


def merge_qkv_bias(q: Array, k: Array, v: Array) -> Array:
  return np.concatenate([q, k, v], axis=0)


def _one(f: Callable[[Array], Array]):
  return lambda x: (f(x),)


def _unpack(f: Callable[[Array], Array]):
  return lambda x: f(x[0])


# name -> (to_flax: torch array -> tuple of Flax arrays, to_torch: tuple -> array)
FNS: dict[str, tuple[Callable, Callable]] = {
    "conv": (_one(tables.oihw_to_hwio), _unpack(tables.hwio_to_oihw)),
    "linear": (_one(tables.transpose2d), _unpack(tables.transpose2d)),
    "same": (_one(np.asarray), _unpack(np.asarray)),
    "qkv": (split_qkv, lambda x: merge_qkv(*x)),
    "qkv_bias": (split_qkv_bias, lambda x: merge_qkv_bias(*x)),
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One PyTorch tensor and the Flax ``params`` leaves it maps to."""

  torch_key: str
  flax_paths: tuple[tuple[str, ...], ...]
  fn: str


def _cubic_weights(t: Array, a: float = -0.75) -> Array:
  """PyTorch's bicubic convolution weights for offsets t in [0, 1)."""
  t = t[:, None] - np.array([-1.0, 0.0, 1.0, 2.0])[None, :]
  t = np.abs(t)
  return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a,
                           0.0))


def _resize_matrix(n_in: int, n_out: int) -> Array:
  """(n_out, n_in) bicubic interpolation matrix, ``align_corners=True``."""
  if n_out == 1 or n_in == 1:
    m = np.zeros((n_out, n_in))
    m[:, 0] = 1.0
    return m
  src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  base = np.floor(src).astype(int)
  w = _cubic_weights(src - base)
  m = np.zeros((n_out, n_in))
  for j in range(4):
    np.add.at(m, (np.arange(n_out), np.clip(base - 1 + j, 0, n_in - 1)),
              w[:, j])
  return m


def interpolate_pos_embedding(pos: Array, tokens: int) -> Array:
  """A ViT position embedding (1, 1 + S*S, D) resized to ``tokens`` tokens.

  The class token's entry is kept; the S x S grid is resized bicubically
  with ``align_corners=True``, as torchvision's ``interpolate_embeddings``
  does when a model is built for another image size.

  Args:
    pos: the embedding of the file.
    tokens: 1 + T*T tokens of the model.

  Returns:
    The (1, tokens, D) embedding.
  """
  pos = np.asarray(pos, np.float64)
  n_in = pos.shape[1] - 1
  s_in, s_out = int(round(np.sqrt(n_in))), int(round(np.sqrt(tokens - 1)))
  if s_in * s_in != n_in or s_out * s_out != tokens - 1:
    raise ValueError(f"position embedding of {pos.shape[1]} tokens cannot be "
                     f"resized to {tokens}: the patch grids are not square")
  d = pos.shape[-1]
  grid = pos[0, 1:].reshape(s_in, s_in, d)
  m = _resize_matrix(s_in, s_out)
  grid = np.einsum("ai,bj,ijd->abd", m, m, grid).reshape(1, s_out * s_out, d)
  return np.concatenate([pos[:, :1], grid], axis=1)


# ------------------------------------------------------------------ tables
def _linear(t: str, f: tuple[str, ...], bias: bool = True) -> list[Entry]:
  out = [Entry(f"{t}.weight", (f + ("kernel",),), "linear")]
  if bias:
    out.append(Entry(f"{t}.bias", (f + ("bias",),), "same"))
  return out


def _norm(t: str, f: tuple[str, ...]) -> list[Entry]:
  return [Entry(f"{t}.weight", (f + ("scale",),), "same"),
          Entry(f"{t}.bias", (f + ("bias",),), "same")]


def _conv(t: str, f: tuple[str, ...]) -> list[Entry]:
  return [Entry(f"{t}.weight", (f + ("kernel",),), "conv"),
          Entry(f"{t}.bias", (f + ("bias",),), "same")]


def _qkv(w: str, b: str, f: tuple[str, ...]) -> list[Entry]:
  names = ("query", "key", "value")
  return [Entry(w, tuple(f + (n, "kernel") for n in names), "qkv"),
          Entry(b, tuple(f + (n, "bias") for n in names), "qkv_bias")]


def vit_table(num_layers: int, fmt: str) -> list[Entry]:
  """Entries of a ViT with ``num_layers`` blocks in format ``fmt``."""
  tv = fmt == "torchvision"
  out = _conv("conv_proj" if tv else "patch_embed.proj", ("conv_proj",))
  out.append(Entry("class_token" if tv else "cls_token", (("class_token",),),
                   "same"))
  out.append(Entry("encoder.pos_embedding" if tv else "pos_embed",
                   (("encoder", "pos_embedding"),), "same"))
  for i in range(num_layers):
    f = ("encoder", "layers", f"encoder_layer_{i}")
    if tv:
      t = f"encoder.layers.encoder_layer_{i}"
      out += _norm(f"{t}.ln_1", f + ("ln_1",))
      out += _qkv(f"{t}.self_attention.in_proj_weight",
                  f"{t}.self_attention.in_proj_bias", f + ("self_attention",))
      out += _linear(f"{t}.self_attention.out_proj",
                     f + ("self_attention", "out_proj"))
      out += _norm(f"{t}.ln_2", f + ("ln_2",))
      out += _linear(f"{t}.mlp.0", f + ("mlp", "fc1"))
      out += _linear(f"{t}.mlp.3", f + ("mlp", "fc2"))
    else:
      t = f"blocks.{i}"
      out += _norm(f"{t}.norm1", f + ("ln_1",))
      out += _qkv(f"{t}.attn.qkv.weight", f"{t}.attn.qkv.bias",
                  f + ("self_attention",))
      out += _linear(f"{t}.attn.proj", f + ("self_attention", "out_proj"))
      out += _norm(f"{t}.norm2", f + ("ln_2",))
      out += _linear(f"{t}.mlp.fc1", f + ("mlp", "fc1"))
      out += _linear(f"{t}.mlp.fc2", f + ("mlp", "fc2"))
  out += _norm("encoder.ln" if tv else "norm", ("encoder", "ln"))
  out += _linear("heads.head" if tv else "head", ("heads", "head"))
  return out


def swin_block_entries(t: str, f: tuple[str, ...], fmt: str) -> list[Entry]:
  """One Swin block at torch prefix ``t`` and Flax path ``f``."""
  tv = fmt == "torchvision"
  out = _norm(f"{t}.norm1", f + ("norm1",))
  out += _qkv(f"{t}.attn.qkv.weight", f"{t}.attn.qkv.bias", f + ("attn",))
  out += _linear(f"{t}.attn.proj", f + ("attn", "proj"))
  out.append(Entry(f"{t}.attn.relative_position_bias_table",
                   (f + ("attn", "relative_position_bias_table"),), "same"))
  out += _norm(f"{t}.norm2", f + ("norm2",))
  out += _linear(f"{t}.mlp.0" if tv else f"{t}.mlp.fc1", f + ("mlp", "fc1"))
  out += _linear(f"{t}.mlp.3" if tv else f"{t}.mlp.fc2", f + ("mlp", "fc2"))
  return out


def swin_table(depths: Sequence[int], fmt: str,
               head: str = "head") -> list[Entry]:
  """Entries of a Swin with stage ``depths`` in format ``fmt``.

  Args:
    depths: blocks per stage.
    fmt: ``torchvision`` or ``timm``.
    head: the timm head's prefix (``head.fc`` in timm >= 0.9, ``head``
      before).

  Returns:
    The entries.
  """
  tv = fmt == "torchvision"
  out = _conv("features.0.0" if tv else "patch_embed.proj",
              ("features", "0", "0"))
  out += _norm("features.0.2" if tv else "patch_embed.norm",
               ("features", "0", "2"))
  for s, depth in enumerate(depths):
    if s > 0:
      f = ("features", str(2 * s))
      t = f"features.{2 * s}" if tv else f"layers.{s}.downsample"
      out += _norm(f"{t}.norm", f + ("norm",))
      out += _linear(f"{t}.reduction", f + ("reduction",), bias=False)
    for j in range(depth):
      t = f"features.{2 * s + 1}.{j}" if tv else f"layers.{s}.blocks.{j}"
      out += swin_block_entries(t, ("features", str(2 * s + 1), str(j)), fmt)
  out += _norm("norm", ("norm",))
  out += _linear("head" if tv else head, ("head",))
  return out


# Buffers a file may hold that the architecture determines.
_DERIVED = ("relative_position_index", "attn_mask")


def detect_format(state_dict: Mapping[str, Any], family: str,
                  expected: str) -> str:
  """``torchvision`` or ``timm`` from the keys; a clear error otherwise."""
  probes = {"vit": ("conv_proj.weight", "patch_embed.proj.weight"),
            "swin": ("features.0.0.weight", "patch_embed.proj.weight")}[family]
  for fmt, key in zip(FORMATS, probes):
    if key in state_dict:
      return fmt
  first = next(iter(state_dict), "(empty)")
  raise ValueError(
      f"expected a {expected} state dict (torchvision key {probes[0]!r} or "
      f"timm key {probes[1]!r}); the file's first key is {first!r}")


def table_for(model: Any, state_dict: Mapping[str, Any] | None = None,
              fmt: str | None = None, expected: str = "") -> list[Entry]:
  """The table of a Flax ViT / Swin in the format of ``state_dict`` (or
  ``fmt``)."""
  from models import swin, vit  # pylint: disable=import-outside-toplevel
  if isinstance(models.unwrap(model), vit.VisionTransformer):
    family = "vit"
  elif isinstance(models.unwrap(model), swin.SwinTransformer):
    family = "swin"
  else:
    raise ValueError(f"no transformer name table for {type(models.unwrap(model)).__name__}")
  expected = expected or family
  if fmt is None:
    fmt = detect_format(state_dict, family, expected)
  if family == "vit":
    return vit_table(model.num_layers, fmt)
  # timm >= 0.9 names the Swin head ``head.fc`` (and writes it so); older
  # files have ``head``.
  head = "head.fc" if fmt == "timm" and (
      state_dict is None or "head.weight" not in state_dict) else "head"
  return swin_table(model.depths, fmt, head)


HEAD_PATHS = (("heads", "head"), ("head",))


def from_torch(state_dict: Mapping[str, Any], template: Mapping[str, Any],
               model: Any, expected: str = "",
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """torchvision/timm state dict -> Flax ``params`` of a ViT / Swin.

  A head of another class count is left out (the caller keeps its fresh
  head; ``log`` says so); a ViT position embedding of another token count is
  resized (``interpolate_pos_embedding``). Flax leaves no PyTorch file has
  (``dummy_norm`` scales) are absent from the result.

  Args:
    state_dict: the file's tensors (numpy or torch).
    template: the model's variables or their shapes.
    model: the Flax module (chooses the table).
    expected: model name for error messages.
    log: receives one line per adaptation.

  Returns:
    ``{'params': nested dict}`` of numpy arrays.

  Raises:
    KeyError: the first missing key (with the expected model).
    ValueError: the first mis-shaped key, or keys the model does not have.
  """
  entries = table_for(model, state_dict, expected=expected)
  expected = expected or type(models.unwrap(model)).__name__
  params = template[tables.PARAMS]
  out: dict[str, Any] = {}
  used = set()
  for e in entries:
    if e.torch_key not in state_dict:
      raise KeyError(f"not a {expected} state dict: key {e.torch_key!r} is "
                     "missing")
    used.add(e.torch_key)
    value = tables.to_numpy(state_dict[e.torch_key])
    parts = FNS[e.fn][0](value)
    for path, part in zip(e.flax_paths, parts):
      want = paths.get(params, path)
      if want is None:
        raise KeyError(f"{expected}: the model has no {'/'.join(path)} "
                       f"(for {e.torch_key!r})")
      if tuple(part.shape) != tuple(want.shape):
        if path[:-1] in HEAD_PATHS and part.shape[:-1] == want.shape[:-1]:
          if part.ndim == 2:
            log(f"init_from: head {e.torch_key} has {part.shape[-1]} "
                f"classes, the model {want.shape[-1]}: the head is replaced "
                "(fresh init)")
          continue
        if path == ("encoder", "pos_embedding") and part.ndim == 3 and (
            part.shape[2] == want.shape[2]):
          log(f"init_from: {e.torch_key} resized from {part.shape[1]} to "
              f"{want.shape[1]} tokens (bicubic, the image size differs)")
          part = interpolate_pos_embedding(part, want.shape[1])
        else:
          raise ValueError(
              f"not a {expected} state dict of this size: {e.torch_key} has "
              f"shape {tuple(value.shape)}, the model needs "
              f"{tuple(want.shape)} for {'/'.join(path)}")
      paths.assign(out, path, np.asarray(part).astype(want.dtype))
  extra = [k for k in state_dict if k not in used
           and not k.endswith(_DERIVED) and not k.endswith(tables.NUM_BATCHES)]
  if extra:
    raise ValueError(f"not a {expected} state dict: unexpected key "
                     f"{extra[0]!r}" + (f" (and {len(extra) - 1} more)"
                                        if len(extra) > 1 else ""))
  return {tables.PARAMS: out}


def to_torch(params: Mapping[str, Any], model: Any,
             fmt: str = "torchvision") -> dict[str, Array]:
  """Flax ``params`` of a ViT / Swin -> state dict in ``fmt`` (numpy)."""
  out = {}
  for e in table_for(model, fmt=fmt):
    parts = tuple(np.asarray(paths.get(params, p)) for p in e.flax_paths)
    out[e.torch_key] = FNS[e.fn][1](parts)
  return out
