"""Name -> model constructor registry."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from flax import linen as nn

from models import cifar_resnet


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How to build one registered model.

  Attributes:
    name: registry name.
    family: ``cifar_resnet`` (DSP), ``resnet`` / ``vgg`` (torchvision layout;
      CIFAR or ImageNet stem), ``vit`` / ``swin`` (torchvision's vision
      transformers), used by the converter's name tables.
    build: ``build(num_classes, **overrides) -> nn.Module``.
    image_size: input height/width the model is meant for.
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
  if name in MODEL_SPECS:
    raise ValueError(f"model {name!r} registered twice")
  MODEL_SPECS[name] = ModelSpec(name, family, build, image_size, tiny)


def list_models(include_tiny: bool = True) -> list[str]:
  """Registered model names, sorted."""
  return sorted(n for n, s in MODEL_SPECS.items() if include_tiny or not s.tiny)


def model_spec(name: str) -> ModelSpec:
  if name not in MODEL_SPECS:
    raise ValueError(
        f"unknown model {name!r}; valid names: {', '.join(list_models())}")
  return MODEL_SPECS[name]


def create_model(name: str, num_classes: int = 10, **overrides: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: a name from ``list_models()``.
    num_classes: classifier outputs.
    **overrides: model attributes to change (e.g. ``groups=4`` to create DSP
      gates, ``param_dtype=jnp.float64``).

  Returns:
    The Flax module.
  """
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  groups = overrides.get("groups")
  if groups is not None and (not isinstance(groups, int) or groups < 1):
    raise ValueError(f"groups must be an integer >= 1 (or None), got {groups!r}")
  return model_spec(name).build(num_classes=num_classes, **overrides)


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
