"""Exports of pruned models: one description, a compact JAX function, files.

For any Flax model the traced graph (``models.analyze``) covers:

* ``describe(model, variables, input_shape)``: the pruned network's
  description (``convert.description``): per layer the kept inputs, filters
  and DSP branches, norms and per-channel variables kept, MACs;
* ``compact(model, variables, input_shape)``: ``(apply, params)``, a jittable
  JAX function over sliced arrays with the masked model's logits
  (``convert.program``);
* ``export(model, variables, out_dir, input_shape)``: every file format that
  applies (``convert.formats``), each written atomically and checked against
  the masked model's logits and the description.

The modules:

* ``convert.description``  the description, the structural checks;
* ``convert.program``      the compact program (a re-evaluated jaxpr over the
  kept channels) and its JAX runner;
* ``convert.torch_program`` the same program as a torch module;
* ``convert.writer``       the one writer: save, reload, check logits;
* ``convert.generic``      TorchScript, ``.pt2``, state dict and ONNX of the
  compact program, any model;
* ``convert.dsp`` / ``dsp_torch`` / ``packing`` / ``jax_side``  the released
  DSP format (``packed.pt``) of the CIFAR ResNets, ``import_packed``;
* ``convert.slim`` / ``branched`` / ``torch_zoo`` / ``transformer_torch``
  torchvision-named slimmed and branched modules of the registry families;
* ``convert.fast`` / ``fast_specs`` / ``fast_jax``  fast inference files;
* ``convert.tables`` / ``reference`` / ``transformers`` / ``pretrained``
  name tables, the reference ``[state_dict, accuracy]`` files, weights from
  the user's disk;
* ``python -m convert``  ``import`` / ``export`` / ``inspect``.

Submodules are imported on use, so ``import convert`` does not load torch.
"""

from __future__ import annotations

from typing import Any


def describe(*args: Any, **kwargs: Any) -> Any:
  """``convert.description.describe``."""
  from convert import description  # pylint: disable=import-outside-toplevel
  return description.describe(*args, **kwargs)


def compact(*args: Any, **kwargs: Any) -> Any:
  """``convert.program.compact``."""
  from convert import program  # pylint: disable=import-outside-toplevel
  return program.compact(*args, **kwargs)


def export(*args: Any, **kwargs: Any) -> Any:
  """``convert.formats.export`` (imports torch)."""
  from convert import formats  # pylint: disable=import-outside-toplevel
  return formats.export(*args, **kwargs)
