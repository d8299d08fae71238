"""Pretrained starts: a local PyTorch state dict (or converted directory) as
the initial weights of any pipeline (``config.init_from``).

Formats, chosen by the model's registry family:

* ``resnet`` / ``vgg``: torchvision state dicts (``resnet18/34/50``,
  ``vgg*_bn`` and the CIFAR variants), through ``convert.tables``;
* ``vit`` / ``swin``: torchvision or timm state dicts, through
  ``convert.transformers`` (qkv split, position-embedding resize);
* ``cifar_resnet``: the DSP reference ``[state_dict, accuracy]`` files;
* any family: a ``python -m convert import`` directory or a run's stage
  directory of the same model.

A head of another class count is replaced by the model's fresh head (one
log line says so); the first missing or mis-shaped key is named in the error
together with the model that was expected. Nothing is downloaded.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Mapping

import jax
import numpy as np

import models
from models import paths
from convert import reference, tables, transformers
from training import artifacts


def _merge(base: Mapping[str, Any], update: Mapping[str, Any],
           prefix: str = "") -> dict[str, Any]:
  """``base`` with the leaves of ``update`` that it has (shapes checked)."""
  out = dict(base)
  for k, v in update.items():
    if k not in base:
      continue  # e.g. DDROP's dummy_norm of a source the run does not have
    if isinstance(v, Mapping) and isinstance(base[k], Mapping):
      out[k] = _merge(base[k], v, f"{prefix}{k}/")
    elif np.shape(v) != np.shape(base[k]):
      raise ValueError(f"init_from: {prefix}{k} has shape {np.shape(v)}, the "
                       f"model needs {np.shape(base[k])}")
    else:
      out[k] = np.asarray(v, np.asarray(base[k]).dtype)
  return out


def _drop(tree: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
  out = dict(tree)
  if len(path) == 1:
    out.pop(path[0], None)
  elif path[0] in out:
    out[path[0]] = _drop(out[path[0]], path[1:])
  return out


def _cnn(sd: dict[str, Any], template: Mapping[str, Any], family: str,
         name: str, log: Callable[[str], None]) -> dict[str, Any]:
  """torchvision ResNet / VGG-bn tensors, with the head replaced if needed."""
  layers = [l for l in tables.find_layers(template, family)
            if l.kind == "dense"]
  head = layers[-1]
  key = f"{head.name}.weight"
  want = paths.get(template[tables.PARAMS], head.path + ("kernel",))
  if key in sd and tables.to_numpy(sd[key]).shape[0] != want.shape[1]:
    log(f"init_from: head {key} has {tables.to_numpy(sd[key]).shape[0]} "
        f"classes, the model {want.shape[1]}: the head is replaced (fresh "
        "init)")
    sd = {k: v for k, v in sd.items() if not k.startswith(head.name + ".")}
    template = {c: _drop(t, head.path) for c, t in template.items()}
  try:
    return tables.from_torch(sd, template, family)
  except KeyError as e:
    raise KeyError(f"not a {name} (torchvision format) state dict: "
                   f"{e.args[0]}") from None
  except ValueError as e:
    raise ValueError(f"not a {name} (torchvision format) state dict of this "
                     f"size: {e}") from None


def load(path: str | pathlib.Path, model: Any, model_name: str,
         variables: Mapping[str, Any],
         log: Callable[[str], None] = print) -> dict[str, Any]:
  """``variables`` with the tensors of ``path`` loaded into them.

  Args:
    path: a local state-dict file or a converted / stage directory.
    model: the Flax module of the run.
    model_name: its registry name (checked against directories, named in
      errors).
    variables: the model's freshly initialised variables, at the run's image
      size (kept where the file has nothing: a replaced head, DDROP's
      dummy_norm scales).
    log: receives one line per adaptation.

  Returns:
    The variables as numpy arrays.

  Raises:
    FileNotFoundError: nothing at ``path``.
    KeyError, ValueError: another architecture or size (first offending key
      and the expected model named).
  """
  path = pathlib.Path(path).expanduser()
  base = artifacts.to_numpy_tree(jax.device_get(dict(variables)))
  if path.is_dir():
    _, loaded, info = artifacts.load_source(path)
    if info["model"] != model_name:
      raise ValueError(f"init_from {path} holds a {info['model']!r} model, "
                       f"expected {model_name!r}")
    loaded = {k: v for k, v in loaded.items()
              if k in (tables.PARAMS, tables.BATCH_STATS)}
    return _merge(base, loaded)
  if not path.is_file():
    raise FileNotFoundError(f"init_from: no such file or directory: {path}")
  sd, _ = reference.read_state_dict(path)
  return load_state_dict(sd, model, model_name, base, log)


def load_state_dict(sd: Mapping[str, Any], model: Any, model_name: str,
                    variables: Mapping[str, Any],
                    log: Callable[[str], None] = print) -> dict[str, Any]:
  """``load`` for a state dict already in memory (same arguments)."""
  base = artifacts.to_numpy_tree(jax.device_get(dict(variables)))
  template = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), base)
  sd = dict(sd)
  family = models.model_spec(model_name).family
  if family in ("vit", "swin"):
    loaded = transformers.from_torch(sd, template, model, model_name, log)
  elif family in ("resnet", "vgg"):
    loaded = _cnn(sd, template, family, model_name, log)
  elif family == "cifar_resnet":
    loaded = reference.from_reference(sd, template, family)
    loaded = {k: v for k, v in loaded.items()
              if k in (tables.PARAMS, tables.BATCH_STATS)}
  else:
    raise ValueError(f"init_from: no state-dict format for model family "
                     f"{family!r} ({model_name})")
  return _merge(base, loaded)
