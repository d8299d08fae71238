"""Reference-format state dicts: ``torch.save([state_dict, accuracy], path)``.

The DSP reference saves one such file per stage, with PyTorch key names of
its CifarResNet (see the family tables in ``convert.tables``):

* pretrained:     the dense model (``resnet{L}.pkl``);
* group-learned:  plus ``{conv}.group`` (G x O) for every taking-part conv,
  our ``gates/.../logits`` (G, O) (``resnet{L}_G{dev}g{G}.pkl``);
* fine-tuned:     plus ``{conv}.mask`` (O x I x 1 x 1), our ``masks/.../kernel``
  (I, O) (``resnet{L}_P{dev}g{G}c{rate:.2f}.pkl``); ``.group`` is written
  when the variables have gates (a model imported from a packed file has
  none).

Reading then writing a file gives back the same keys, in the same order,
with equal tensors. The reference keeps no BatchNorm masks (it zeroes
BatchNorm weight and bias instead); reading a fine-tuned file sets the mask
of a BatchNorm that follows a masked conv to ``weight != 0``.

torchvision-layout ResNet/VGG state dicts (plain dicts, or the same
``[state_dict, accuracy]`` pair) import as starting points with
``read_state_dict`` + ``tables.from_torch``.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Any, Mapping

import jax
import numpy as np
import torch

from models import paths
from convert import tables
from convert import writer
from training import artifacts

STAGES = ("pretrained", "group", "finetuned")


def to_reference(variables: Mapping[str, Any], stage: str,
                 family: str = "cifar_resnet",
                 num_batches_tracked: Mapping[str, int] | None = None,
                 ) -> dict[str, torch.Tensor]:
  """Our variables -> the reference state dict of one stage.

  Args:
    variables: ``params``, ``batch_stats``; ``gates`` for the group-learned and
      fine-tuned stages; ``masks`` for the fine-tuned stage.
    stage: one of ``STAGES``.
    family: model family (name table).
    num_batches_tracked: BatchNorm counters (0 where absent).

  Returns:
    ``{key: tensor}`` in model order; ``.group``/``.mask`` follow their
    conv's ``.weight``.
  """
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
  v = artifacts.to_numpy_tree(variables)
  sd = tables.to_torch(v, family, num_batches_tracked)
  convs = set(tables.taking_part_convs(v, family))
  extra: dict[str, dict[str, np.ndarray]] = {}
  for conv in convs:
    path = tuple(conv.split("."))
    entries = {}
    logits = paths.get(v.get(tables.GATES, {}), path + ("logits",))
    if stage == "finetuned" and logits is None:
      pass  # e.g. imported from a packed file, which keeps no group logits
    elif stage != "pretrained":
      if logits is None:
        raise KeyError(f"stage {stage!r} needs gates/{'/'.join(path)}/logits "
                       "(build the model with groups=G)")
      entries["group"] = np.asarray(logits)
    if stage == "finetuned":
      mask = paths.get(v.get(tables.MASKS, {}), path + ("kernel",))
      if mask is None:
        raise KeyError(f"stage 'finetuned' needs masks/{'/'.join(path)}/kernel")
      entries["mask"] = tables.io_mask_to_oi11(np.asarray(mask))
    extra[conv] = entries
  out: dict[str, torch.Tensor] = {}
  for k, t in sd.items():
    out[k] = torch.from_numpy(np.array(t, copy=True))
    conv = k[:-len(".weight")]
    if k.endswith(".weight") and conv in extra:
      for leaf, t2 in extra[conv].items():
        out[f"{conv}.{leaf}"] = torch.from_numpy(np.array(t2, copy=True))
  return out


def reference_stage(state_dict: Mapping[str, Any]) -> str:
  """``pretrained``, ``group`` or ``finetuned``, from the keys present."""
  if any(k.endswith(".mask") for k in state_dict):
    return "finetuned"
  if any(k.endswith(".group") for k in state_dict):
    return "group"
  return "pretrained"


def groups_of(state_dict: Mapping[str, Any]) -> int | None:
  """G of a group-learned/fine-tuned state dict (from any ``.group``)."""
  for k, t in state_dict.items():
    if k.endswith(".group"):
      return int(tables.to_numpy(t).shape[0])
  return None


def from_reference(state_dict: Mapping[str, Any], template: Mapping[str, Any],
                   family: str = "cifar_resnet") -> dict[str, Any]:
  """Reference state dict -> our variables shaped as ``template``.

  Args:
    state_dict: reference keys (``.group``/``.mask`` optional).
    template: the variables' shapes (build the model with ``groups=G`` when
      the state dict has ``.group``).
    family: model family.

  Returns:
    ``params``, ``batch_stats``, and ``gates``/``masks`` when the file has
    them (masks: ones except the conv masks read and the BatchNorm masks
    derived from them), numpy.

  Raises:
    KeyError, ValueError: missing keys, unexpected keys or shape mismatches,
      naming the key.
  """
  plain = {k: v for k, v in state_dict.items()
           if not k.endswith((".group", ".mask"))}
  variables = tables.from_torch(plain, template, family)
  convs = tables.taking_part_convs(template, family)
  known = set(convs)
  for k in state_dict:
    if k.endswith((".group", ".mask")) and k.rsplit(".", 1)[0] not in known:
      raise KeyError(f"{k}: .group/.mask on a conv that does not take part in "
                     f"DSP; taking-part convs: {', '.join(convs)}")
  stage = reference_stage(state_dict)
  if stage != "pretrained":
    if tables.GATES not in template:
      raise ValueError("the state dict has .group entries; build the model "
                       f"with groups={groups_of(state_dict)}")
    gates = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                         template[tables.GATES])
    for conv in convs:
      key = conv + ".group"
      want = paths.get(gates, tuple(conv.split(".")) + ("logits",))
      _put(gates, conv, "logits", _need(state_dict, key), want, key)
    variables[tables.GATES] = gates
  if stage == "finetuned":
    masks = jax.tree.map(lambda s: np.ones(s.shape, s.dtype),
                         template[tables.MASKS])
    layers = tables.find_layers(template, family)
    for conv in convs:
      key = conv + ".mask"
      want = paths.get(masks, tuple(conv.split(".")) + ("kernel",))
      _put(masks, conv, "kernel",
           tables.oi11_to_io_mask(tables.to_numpy(_need(state_dict, key))),
           want, key)
      # The BatchNorm right after the conv: its mask is where weight != 0.
      i = [l.name for l in layers].index(conv)
      if i + 1 < len(layers) and layers[i + 1].kind == "batchnorm":
        bn = layers[i + 1]
        scale = paths.get(variables[tables.PARAMS], bn.path + ("scale",))
        paths.assign(masks, bn.path + ("scale",),
                    (np.asarray(scale) != 0).astype(scale.dtype))
    variables[tables.MASKS] = masks
  return variables


def _need(state_dict: Mapping[str, Any], key: str) -> Any:
  if key not in state_dict:
    raise KeyError(f"state dict has no {key!r}")
  return state_dict[key]


def _put(tree: dict[str, Any], conv: str, leaf: str, value: Any, want: Any,
         key: str) -> None:
  value = tables.to_numpy(value)
  if tuple(value.shape) != tuple(want.shape):
    raise ValueError(f"{key}: shape {tuple(value.shape)}, the model needs "
                     f"{tuple(want.shape)}")
  paths.assign(tree, tuple(conv.split(".")) + (leaf,), value.astype(want.dtype))


def save(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
         accuracy: float) -> pathlib.Path:
  """Writes ``[state_dict, accuracy]`` atomically, as the reference does."""
  return writer.save(
      path, lambda f: torch.save([dict(state_dict), float(accuracy)], f))


def read_state_dict(path: str | os.PathLike
                    ) -> tuple[dict[str, torch.Tensor], float | None]:
  """Reads a reference ``[state_dict, accuracy]`` file or a plain state dict.

  Args:
    path: the file (``torch.save`` format).

  Returns:
    ``(state_dict, accuracy)``; accuracy None for a plain state dict.

  Raises:
    ValueError: the file is not a torch.save file of one of those shapes
      (what was found is named).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such file: {path}")
  if not zipfile.is_zipfile(path):
    # torch.save writes zip archives (PyTorch >= 1.6); anything else is not ours.
    raise ValueError(
        f"{path}: expected a torch.save file holding [state_dict, accuracy] or "
        f"a state dict, found a file that is not a zip archive "
        f"({path.stat().st_size} bytes)")
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # pickle/zip errors come in many types.
    raise ValueError(
        f"{path}: expected a torch.save file holding [state_dict, accuracy] "
        f"or a state dict; torch.load failed: "
        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  acc = None
  if isinstance(obj, (list, tuple)):
    if len(obj) != 2 or not isinstance(obj[0], Mapping):
      raise ValueError(f"{path}: expected [state_dict, accuracy], found a "
                       f"{type(obj).__name__} of {len(obj)} items")
    obj, acc = obj
    acc = float(acc)
  if not isinstance(obj, Mapping) or not all(
      isinstance(v, torch.Tensor) for v in obj.values()):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), found "
                     f"{type(obj).__name__}")
  return dict(obj), acc
