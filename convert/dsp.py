"""DSP packed-model export and import (TorchScript, torch.export, state dict).

``export_packed`` writes, atomically, into one directory:

* ``packed.pt``         TorchScript of the compact multi-branch network (the
  released files' format; loads with plain ``torch.jit.load(path)``);
* ``packed.pt2``        the same network as a ``torch.export`` program;
* ``dense_state_dict.pt`` the dense-shaped model in the reference names with
  ``.mask`` (O, I, 1, 1) for the taking-part convs (``torch.load(path,
  weights_only=True)``);
* ``reference_io.npz``  ``images`` (NHWC), ``images_nchw`` and the Flax
  ``logits``;

and checks every written file's logits against the Flax logits before it
returns. ``import_packed`` reads a packed TorchScript file (ours or a
released one) back into dense-shaped Flax variables and checks the logits.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping

import numpy as np
import torch

import models
from models import paths
from models.layers import input_channels
from convert import description as desc_lib
from convert import (dsp_torch, fast, fast_specs, jax_side, packing, tables,
                     writer)
from training import artifacts

PACKED, PROGRAM, STATE_DICT = "packed.pt", "packed.pt2", "dense_state_dict.pt"
REFERENCE_IO = writer.REFERENCE_IO
ConversionMismatch = writer.ConversionMismatch


def dense_state_dict(variables: Mapping[str, Any],
                     num_batches_tracked: Mapping[str, int] | None = None,
                     ) -> dict[str, torch.Tensor]:
  """Dense-shaped reference-named state dict with ``.mask`` for taking-part convs."""
  v = artifacts.to_numpy_tree(variables)
  sd = tables.to_torch(v, jax_side.FAMILY, num_batches_tracked)
  convs = tables.taking_part_convs(v, jax_side.FAMILY)
  masks = jax_side.conv_masks_oi(v, convs)
  out = {}
  for k, t in sd.items():
    out[k] = torch.from_numpy(np.array(t, copy=True))
    conv = k[:-len(".weight")]
    if k.endswith(".weight") and conv in masks:
      out[conv + ".mask"] = torch.from_numpy(
          np.array(masks[conv][:, :, None, None], copy=True))
  # BN masks are not part of the reference format: fold them into the tensors.
  folded = packing.apply_masks(v)
  for path, _ in paths.leaves(v.get(tables.MASKS, {})):
    if path[-1] == "scale":
      name = ".".join(path[:-1])
      p = paths.get(folded[tables.PARAMS], path[:-1])
      out[name + ".weight"] = torch.from_numpy(np.array(p["scale"]))
      out[name + ".bias"] = torch.from_numpy(np.array(p["bias"]))
  return out


def export_packed(model: Any, variables: Mapping[str, Any],
                  out_dir: str | os.PathLike, *,
                  num_batches_tracked: Mapping[str, int] | None = None,
                  images: np.ndarray | None = None, num_images: int = 4,
                  image_size: int = 32, seed: int = 0, atol: float = 1e-4,
                  program: bool = True,
                  fast_options: fast.Options | None = fast.Options(),
                  description: desc_lib.Description | None = None
                  ) -> writer.ExportResult:
  """Packs a masked Flax CifarResNet and writes the export files.

  Args:
    model: the Flax CifarResNet.
    variables: its variables (``params``, ``batch_stats``, ``masks``).
    out_dir: directory to write into (created).
    num_batches_tracked: BatchNorm counters for the copied BNs.
    images: NHWC check images; ``num_images`` random ones when None.
    num_images: number of random check images.
    image_size: input size used for tracing and random images.
    seed: seed of the random images.
    atol: largest accepted |logit| difference.
    program: also write the ``torch.export`` program.
    fast_options: also write ``fast.pt``/``fast.pt2``/``fast_plan.json``
      (``convert.fast``: formulations chosen per layer, BN folded); None
      skips them.
    description: the pruned network's description (computed when None);
      the packed blocks are checked against it.

  Returns:
    The written paths, the measured differences and, in ``details``, the
    branch counts per block.

  Raises:
    ConversionMismatch: a written file's logits differ by more than ``atol``.
    convert.description.WidthMismatch: a packed block keeps other filters
      than the description says.
  """
  out_dir = pathlib.Path(out_dir)
  plan = jax_side.plan_from_variables(variables, num_batches_tracked)
  if description is None:
    description = desc_lib.describe(model, variables,
                                    (image_size, image_size,
                                     input_channels(model)))
  desc_lib.check_module_widths(
      description, packed_widths(plan),
      only=[l.path for l in description.graph.taking_part])
  images, want = writer.check_images(
      model, variables, (image_size, image_size, input_channels(model)),
      images, num_images, seed)
  traced = dsp_torch.trace(plan, image_size)
  result = writer.write(traced, out_dir, {writer.TORCHSCRIPT: PACKED},
                        images, want, atol=atol, fresh=False)
  if program:
    r = writer.write(dsp_torch.build(plan, index_select=True), out_dir,
                     {writer.PROGRAM: PROGRAM}, images, want, atol=atol,
                     fresh=False)
    result.files.update(r.files)
    result.max_abs_diff.update({k: d for k, d in r.max_abs_diff.items()
                                if k != "module"})
  sd = dense_state_dict(variables, num_batches_tracked)
  result.files[STATE_DICT] = writer.save(out_dir / STATE_DICT,
                                         lambda f: torch.save(sd, f))
  loaded_sd = torch.load(result.files[STATE_DICT], weights_only=True)
  result.max_abs_diff[STATE_DICT] = writer.check_logits(
      STATE_DICT,
      writer.torch_logits(lambda x: dsp_torch.dense_forward(loaded_sd, x),
                          images), want, atol)
  result.details["branches"] = branch_counts(plan)
  if fast_options is not None:
    fast.attach(result, fast_specs.from_packed(
        plan, type(models.unwrap(model)).__name__ + str(
            getattr(model, "depth", "")), image_size),
                out_dir, fast_options, program=program, atol=atol)
  return result


def packed_widths(plan: packing.PackedResNet) -> dict[str, tuple[int, int]]:
  """(kept inputs, filters) of every conv_a / conv_b of a packed plan."""
  out = {}
  for stage in plan.stages:
    for b in stage:
      produced = [c for br in b.branches_a for c in br.outputs]
      for conv, branches, source in (("conv_a", b.branches_a, None),
                                     ("conv_b", b.branches_b, produced)):
        if not branches:
          continue
        inputs = {int(i) if source is None else int(source[i])
                  for br in branches for i in br.inputs}
        out[f"{b.name}.{conv}"] = (len(inputs), sum(
            len(br.outputs) for br in branches))
  return out


def branch_counts(plan: packing.PackedResNet) -> dict[str, tuple[int, int]]:
  """``{block: (conv_a branches, conv_b branches)}``."""
  return {b.name: (len(b.branches_a), len(b.branches_b))
          for s in plan.stages for b in s}


@dataclasses.dataclass
class ImportResult:
  """A packed file read back as dense-shaped Flax variables.

  Attributes:
    model_name: registry name; build with ``models.create_model(model_name,
      num_classes, **overrides)``.
    num_classes: classifier outputs.
    overrides: model attributes (``widths``).
    variables: ``params``, ``batch_stats``, ``masks`` (numpy).
    num_batches_tracked: counters of the copied BatchNorms.
    plan: the packed structure read from the file.
    max_abs_diff: |Flax - TorchScript| logits on random inputs.
  """

  model_name: str
  num_classes: int
  overrides: dict[str, Any]
  variables: dict[str, Any]
  num_batches_tracked: dict[str, int]
  plan: packing.PackedResNet
  max_abs_diff: float

  def model(self) -> Any:
    return models.create_model(self.model_name, self.num_classes,
                               **self.overrides)


def load_torchscript(path: str | os.PathLike) -> Any:
  """``torch.jit.load`` on CPU with a clear error for other files."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such file: {path}")
  try:
    return torch.jit.load(str(path), map_location="cpu")
  except Exception as e:  # torch raises RuntimeError/ValueError variants.
    raise ValueError(f"{path}: expected a TorchScript archive (torch.jit.save),"
                     f" found something torch.jit.load cannot read: "
                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                     ) from e


def is_packed(path: str | os.PathLike) -> bool:
  """Whether a TorchScript file is a packed DSP CifarResNet."""
  try:
    dsp_torch.read_packed(load_torchscript(path))
  except ValueError:
    return False
  return True


def import_packed(source: str | os.PathLike | Any, *, num_images: int = 4,
                  seed: int = 0, atol: float | None = 1e-4) -> ImportResult:
  """Reads a packed DSP TorchScript CifarResNet into dense Flax variables.

  Args:
    source: a file path or an already loaded ScriptModule.
    num_images: random images for the logits check.
    seed: their seed.
    atol: raise ``ConversionMismatch`` beyond this |logit| difference; None
      only measures.

  Returns:
    The import result (``max_abs_diff`` holds the measured difference).
  """
  module = (load_torchscript(source) if isinstance(source, (str, os.PathLike))
            else source)
  plan = dsp_torch.read_packed(module)
  name, overrides, variables = jax_side.variables_from_plan(plan)
  model = models.create_model(name, plan.num_classes, **overrides)
  images = writer.random_images(num_images, 32, seed,
                                 input_channels(model))
  got = artifacts.logits(model, variables, images)
  diff = float(np.max(np.abs(got - writer.torch_logits(module, images))))
  if atol is not None and not diff <= atol:
    raise ConversionMismatch(
        f"imported model's logits differ from the TorchScript file by "
        f"{diff:.3g} > {atol:g}")
  nbt = tables.num_batches_tracked(plan.stem)
  for blk in (b for s in plan.stages for b in s):
    if blk.downsample is not None:
      nbt.update({f"{blk.name}.downsample.{k}": v for k, v in
                  tables.num_batches_tracked(blk.downsample).items()})
  return ImportResult(name, plan.num_classes, overrides, variables, nbt, plan,
                      diff)
