"""``bench/cpu_steps.py``'s PyTorch reference is our ResNet-20.

The benchmark compares our train step with a PyTorch ResNet-20 written in
the benchmark itself; it is only a fair reference if it is the same
network: same parameter tensors' shapes, layer by layer, as
``models/cifar_resnet.py``'s (option-B shortcuts, no conv biases).
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp

import models

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

import cpu_steps  # noqa: E402  pylint: disable=wrong-import-position


def test_torch_reference_has_our_resnet20_shapes():
  torch_shapes = sorted(tuple(p.shape) for p in
                        cpu_steps.torch_resnet20().parameters())
  model = models.create_model("cifar_resnet20", 10)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
  # Flax kernels are HWIO / (in, out); torch's OIHW / (out, in).
  flax_shapes = sorted(
      (s[3], s[2], s[0], s[1]) if len(s) == 4 else
      (s[1], s[0]) if len(s) == 2 else s
      for s in (tuple(x.shape) for x in jax.tree.leaves(params)))
  assert torch_shapes == flax_shapes
