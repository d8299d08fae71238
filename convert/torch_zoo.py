"""Plain PyTorch modules of slimmed (physically pruned) ResNets and VGG-bns.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ``fc``; ``features.{i}``, ``classifier.{i}``), so a
slimmed state dict reads like a torchvision one with narrower tensors plus a
few index/constant buffers:

* ``SlimBlock.index``: the residual-space channels the block's last conv
  still produces; its output is index-added into the shortcut there (the
  removed filters added exactly zero);
* ``SlimBlock.const``: the per-channel constant a block adds when a conv of
  its main branch keeps no filter at all (the last BN applied to zeros);
* ``SlimLayerNorm.removed``: the constant pre-norm values of the units removed
  from a LayerNorm's input, which still count in its mean and variance.

Every module computes, in eval mode, what the masked Flax model computes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

class SlimLayerNorm(nn.Module):
  """LayerNorm over ``width`` units of which only some are computed.

  The removed units have known constant values before the norm (their Linear
  rows and biases are zero, or constant); they still take part in the mean
  and variance, so normalising the kept units alone would change every
  output. Exact: ``mean = (sum(x) + sum(removed)) / width`` and the variance
  likewise over kept and removed values.

  Args:
    weight: scale of the kept units.
    bias: bias of the kept units.
    width: units of the original LayerNorm.
    removed: pre-norm values of the removed units (``width - len(weight)``).
    eps: variance epsilon.
  """

  def __init__(self, weight: torch.Tensor, bias: torch.Tensor, width: int,
               removed: torch.Tensor, eps: float = 1e-5):
    super().__init__()
    if weight.shape[0] + removed.shape[0] != width:
      raise ValueError(f"SlimLayerNorm: {weight.shape[0]} kept + "
                       f"{removed.shape[0]} removed units != width {width}")
    self.weight = nn.Parameter(weight)
    self.bias = nn.Parameter(bias)
    # No buffer when nothing was removed: torch.export.save cannot package
    # two empty tensors (they share a null storage).
    self.any_removed = bool(removed.shape[0])
    if self.any_removed:
      self.register_buffer("removed", removed)
    self.width = int(width)
    self.eps = float(eps)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.any_removed:
      mean = x.sum(-1, keepdim=True) / self.width
      sq = (x - mean).square().sum(-1, keepdim=True)
      return (x - mean) * torch.rsqrt(sq / self.width + self.eps) * (
          self.weight) + self.bias
    mean = (x.sum(-1, keepdim=True) + self.removed.sum()) / self.width
    sq = (x - mean).square().sum(-1, keepdim=True) + (
        self.removed - mean).square().sum(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(sq / self.width + self.eps) * (
        self.weight) + self.bias


class SlimBlock(nn.Module):
  """A residual block whose main branch is slimmed.

  ``main`` holds the (name, conv, norm name, norm) of the main branch in call
  order (ReLU between them); the last one's output is index-added into the
  shortcut at ``index``; then ReLU. With ``main`` empty the block adds
  ``const`` (broadcast over space) to its shortcut instead.

  Args:
    main: ``[(conv_name, conv, bn_name, bn)]``, empty when a conv of the main
      branch keeps no filter.
    index: residual-space channels of the last conv's kept filters.
    downsample: the shortcut (None: identity).
    const: (C,) constant added when ``main`` is empty.
  """

  def __init__(self, main: Sequence[tuple[str, nn.Module, str, nn.Module]],
               index: torch.Tensor, downsample: nn.Module | None,
               const: torch.Tensor | None = None):
    super().__init__()
    self.pairs = tuple((c, b) for c, _, b, _ in main)
    for c, conv, b, bn in main:
      setattr(self, c, conv)
      setattr(self, b, bn)
    self.register_buffer("index", index)
    self.downsample = downsample
    if not self.pairs:
      if const is None:
        raise ValueError("SlimBlock without a main branch needs const")
      self.register_buffer("const", const)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    s = x if self.downsample is None else self.downsample(x)
    if not self.pairs:
      return torch.relu(s + self.const.view(1, -1, 1, 1))
    y = x
    for i, (c, b) in enumerate(self.pairs):
      y = getattr(self, b)(getattr(self, c)(y))
      if i + 1 < len(self.pairs):
        y = torch.relu(y)
    return torch.relu(s.index_add(1, self.index, y))


class SlimResNet(nn.Module):
  """torchvision ResNet layout with slimmed blocks.

  Args:
    conv1: stem conv.
    bn1: stem BN.
    layers: per stage, its blocks.
    fc: classifier.
    max_pool: ImageNet stem's 3x3 stride-2 max-pool.
  """

  def __init__(self, conv1: nn.Module, bn1: nn.Module,
               layers: Sequence[Sequence[SlimBlock]], fc: nn.Module,
               max_pool: bool):
    super().__init__()
    self.conv1, self.bn1 = conv1, bn1
    self.maxpool = nn.MaxPool2d(3, 2, 1) if max_pool else None
    self.num_layers = len(layers)
    for s, blocks in enumerate(layers):
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
    self.fc = fc

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = torch.relu(self.bn1(self.conv1(x)))
    if self.maxpool is not None:
      x = self.maxpool(x)
    for s in range(self.num_layers):
      x = getattr(self, f"layer{s + 1}")(x)
    return self.fc(x.mean((2, 3)))


class SlimVGG(nn.Module):
  """torchvision VGG-bn layout with slimmed convs and Linears.

  Args:
    features: torchvision's ``features`` Sequential.
    classifier: torchvision's ``classifier`` Sequential.
    pool_size: ImageNet head's adaptive pool size (then an NCHW flatten);
      None for the CIFAR head's global average pool.
  """

  def __init__(self, features: nn.Sequential, classifier: nn.Sequential,
               pool_size: int | None):
    super().__init__()
    self.features = features
    self.avgpool = (None if pool_size is None else
                    nn.AdaptiveAvgPool2d((pool_size, pool_size)))
    self.classifier = classifier

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.features(x)
    if self.avgpool is None:
      x = x.mean((2, 3))
    else:
      x = torch.flatten(self.avgpool(x), 1)
    return self.classifier(x)

