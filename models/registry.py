"""Name -> model constructor registry."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import sys
from typing import Any, Callable

from flax import linen as nn

from models import cifar_resnet
from models import pruning as prunable_lib


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How to build one registered model.

  Attributes:
    name: registry name.
    family: ``cifar_resnet`` (DSP), ``resnet`` / ``vgg`` (torchvision layout;
      CIFAR or ImageNet stem), ``vit`` / ``swin`` (torchvision's vision
      transformers), used by the converter's name tables.
    build: ``build(num_classes, **overrides) -> nn.Module``.
    image_size: input height/width the model is meant for (0: any).
    tiny: a small variant meant for tests.
  """

  name: str
  family: str
  build: Callable[..., nn.Module]
  image_size: int
  tiny: bool = False


MODEL_SPECS: dict[str, ModelSpec] = {}


def register(name: str, family: str, build: Callable[..., nn.Module],
             image_size: int, tiny: bool = False) -> None:
  """Registers a model under ``name`` (``config.model`` and ``create_model``).

  Args:
    name: registry name.
    family: the converter's name-table family (``resnet``, ``vgg``, ...)
      when the model has a torchvision twin, else ``generic`` (exports use
      the module paths).
    build: ``build(num_classes, **overrides) -> nn.Module``.
    image_size: input height/width the model is meant for.
    tiny: a small variant meant for tests.
  """
  if name in MODEL_SPECS:
    raise ValueError(f"model {name!r} registered twice")
  MODEL_SPECS[name] = ModelSpec(name, family, build, image_size, tiny)


def list_models(include_tiny: bool = True) -> list[str]:
  """Registered model names, sorted."""
  return sorted(n for n, s in MODEL_SPECS.items() if include_tiny or not s.tiny)


def model_spec(name: str) -> ModelSpec:
  """The spec of a registry name or of an import path ``pkg.module:Class``.

  An import path names any Flax Linen module class (or a function returning
  a module) of the user's own code; it is built with its keyword arguments
  (``num_classes`` when it takes one), family ``generic``, any image size.
  The working directory is importable, as with ``python -m``.

  Raises:
    ValueError: an unknown name, or an import path that does not import.
  """
  if name in MODEL_SPECS:
    return MODEL_SPECS[name]
  if ":" in name:
    return _import_spec(name)
  raise ValueError(
      f"unknown model {name!r}; valid names: {', '.join(list_models())}, or "
      "an import path package.module:Class")


GENERIC = "generic"


def _import_spec(name: str) -> ModelSpec:
  module_name, _, attr = name.partition(":")
  if os.getcwd() not in sys.path:
    sys.path.append(os.getcwd())
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"model {name!r}: cannot import {module_name!r} ({e})"
                     ) from None
  build = getattr(module, attr, None)
  if not callable(build):
    raise ValueError(f"model {name!r}: {module_name} has no class or "
                     f"function {attr!r}")
  takes_classes = "num_classes" in _parameters(build)

  def make(num_classes: int, **kwargs: Any) -> nn.Module:
    if takes_classes:
      kwargs.setdefault("num_classes", num_classes)
    model = build(**kwargs)
    if not isinstance(model, nn.Module):
      raise ValueError(f"model {name!r} built a {type(model).__name__}, not "
                       "a flax.linen.Module")
    return model

  return ModelSpec(name, GENERIC, make, 0)


def _parameters(fn: Callable[..., Any]) -> set[str]:
  if dataclasses.is_dataclass(fn):
    return {f.name for f in dataclasses.fields(fn)}
  try:
    return set(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return set()


def create_model(name: str, num_classes: int = 10, groups: int | None = None,
                 **overrides: Any) -> prunable_lib.Prunable:
  """Builds a registered model, wrapped by ``models.prunable``.

  Args:
    name: a name from ``list_models()``.
    num_classes: classifier outputs.
    groups: DSP group count (``init`` creates the gates of the taking-part
      layers); None creates none.
    **overrides: model attributes to change (e.g. ``param_dtype=jnp.float64``).

  Returns:
    The wrapped Flax module (its plain model is ``.model``).
  """
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  model = model_spec(name).build(num_classes=num_classes, **overrides)
  return prunable_lib.prunable(model, groups)


def _cifar_resnet(depth: int, num_classes: int, **kw) -> nn.Module:
  return cifar_resnet.CifarResNet(depth=depth, num_classes=num_classes, **kw)


for _depth in (20, 32, 44, 56, 110):
  register(f"cifar_resnet{_depth}", "cifar_resnet",
           functools.partial(_cifar_resnet, _depth), 32)
register("cifar_resnet8", "cifar_resnet",
         functools.partial(_cifar_resnet, 8, widths=(4, 8, 16)), 32, tiny=True)


# torchvision-layout ResNets and VGG-bn (the DDROP reference's models).
from models import resnet, vgg  # noqa: E402


def _resnet(depth: int, stem: str, num_classes: int, **kw) -> nn.Module:
  kw.setdefault("image_size", 224 if stem == "imagenet" else 32)
  return resnet.resnet(depth, num_classes, stem=stem, **kw)


def _vgg(depth: int, head: str, num_classes: int, **kw) -> nn.Module:
  kw.setdefault("image_size", 224 if head == "imagenet" else 32)
  return vgg.vgg(depth, num_classes, head=head, **kw)


def _tiny(cls: type[nn.Module], fixed: dict[str, Any], num_classes: int,
          **kw) -> nn.Module:
  return cls(num_classes=num_classes, **{**fixed, **kw})


for _depth in resnet.DEPTHS:
  register(f"resnet{_depth}", "resnet",
           functools.partial(_resnet, _depth, "imagenet"), 224)
  register(f"cifar_resnet{_depth}", "resnet",
           functools.partial(_resnet, _depth, "cifar"), 32)
for _depth in vgg.CONFIGS:
  register(f"vgg{_depth}_bn", "vgg",
           functools.partial(_vgg, _depth, "imagenet"), 224)
  register(f"cifar_vgg{_depth}_bn", "vgg",
           functools.partial(_vgg, _depth, "cifar"), 32)
register("cifar_resnet10_tiny", "resnet", functools.partial(
    _tiny, resnet.ResNet,
    dict(block="basic", stage_sizes=(1, 1, 1, 1), stem="cifar",
         widths=(4, 8, 8, 16), image_size=32)), 32, tiny=True)
register("cifar_vgg_tiny", "vgg", functools.partial(
    _tiny, vgg.VGG,
    dict(config=(4, "M", 8, 8, "M", 16, "M"), head="cifar", hidden=16,
         image_size=32)), 32, tiny=True)
# Trains on the digits in a few hundred SGD steps at lr 0.1. The Linears under
# the LayerNorms are scale-invariant, so their effective step grows as their
# rows shrink: 0.01 * sqrt(512 / 32) gives the rows of the 512-wide original's
# norm (with 0.01 training stalls for hundreds of steps, seed-dependently), and
# the classifier's Dropout 0.5 on 32 units stalls it too.
register("cifar_vgg_small", "vgg", functools.partial(
    _tiny, vgg.VGG,
    dict(config=(8, "M", 16, 16, "M", 32, 32, "M"), head="cifar", hidden=32,
         dropout_rate=0.0, linear_std=0.04, image_size=32)), 32, tiny=True)


# Vision transformers (torchvision architectures; DDROP's ViT/Swin).
from models import swin, vit  # noqa: E402


def _vit(variant: str, num_classes: int, **kw) -> nn.Module:
  return vit.vit(variant, num_classes, **kw)


def _swin(variant: str, num_classes: int, **kw) -> nn.Module:
  return swin.swin(variant, num_classes, **kw)


register("vit_b_16", "vit", functools.partial(_vit, "b_16"), 224)
register("vit_tiny", "vit", functools.partial(_vit, "tiny"), 32, tiny=True)
register("swin_t", "swin", functools.partial(_swin, "t"), 224)
register("swin_tiny", "swin", functools.partial(_swin, "tiny"), 32, tiny=True)
