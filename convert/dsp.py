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

import jax
import numpy as np
import torch

import models
from models.layers import input_channels
from convert import dsp_torch, fast, fast_specs, jax_side, packing, tables

PACKED, PROGRAM, STATE_DICT, REFERENCE_IO = (
    "packed.pt", "packed.pt2", "dense_state_dict.pt", "reference_io.npz")


class ConversionMismatch(ValueError):
  """Converted model's logits differ from the source's beyond tolerance (a
  ValueError: reported as one line, like other unusable inputs)."""


def random_images(n: int, image_size: int = 32, seed: int = 0,
                  channels: int = 3) -> np.ndarray:
  """``n`` standard-normal NHWC images (float32) from ``jax.random.key(seed)``."""
  x = jax.random.normal(jax.random.key(seed),
                        (n, image_size, image_size, channels))
  return np.asarray(x, np.float32)


def torch_logits(module: Any, images_nhwc: np.ndarray) -> np.ndarray:
  """Logits of a torch module (eval, no grad) for NHWC images."""
  # A copy: a 1-channel transpose is already contiguous, and read-only.
  x = torch.from_numpy(np.array(images_nhwc.transpose(0, 3, 1, 2), order="C"))
  # No profiling/fusion passes: one call, and they cost seconds on CPU.
  with torch.no_grad(), torch.jit.optimized_execution(False):
    return module(x).detach().cpu().numpy()


def check_logits(name: str, got: np.ndarray, want: np.ndarray,
                 atol: float) -> float:
  """Max |got - want|; raises ``ConversionMismatch`` naming ``name`` beyond atol.

  Args:
    name: what produced ``got`` (a file or module), for the error.
    got: logits of the converted model.
    want: logits of the Flax model.
    atol: largest accepted difference.

  Returns:
    The measured difference.
  """
  diff = float(np.max(np.abs(got - want)))
  if not diff <= atol:
    raise ConversionMismatch(
        f"{name}: logits differ from the Flax model by {diff:.3g} > {atol:g}")
  return diff


def dense_state_dict(variables: Mapping[str, Any],
                     num_batches_tracked: Mapping[str, int] | None = None,
                     ) -> dict[str, torch.Tensor]:
  """Dense-shaped reference-named state dict with ``.mask`` for taking-part convs."""
  v = jax_side.to_numpy_tree(variables)
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
  for path, _ in tables.leaves(v.get(tables.MASKS, {})):
    if path[-1] == "scale":
      name = ".".join(path[:-1])
      p = tables.get_path(folded[tables.PARAMS], path[:-1])
      out[name + ".weight"] = torch.from_numpy(np.array(p["scale"]))
      out[name + ".bias"] = torch.from_numpy(np.array(p["bias"]))
  return out


@dataclasses.dataclass
class ExportResult:
  """Paths written and the max |logit| differences measured."""

  files: dict[str, pathlib.Path]
  max_abs_diff: dict[str, float]
  branches: dict[str, tuple[int, int]]
  notes: list[str] = dataclasses.field(default_factory=list)


def export_packed(model: Any, variables: Mapping[str, Any],
                  out_dir: str | os.PathLike, *,
                  num_batches_tracked: Mapping[str, int] | None = None,
                  images: np.ndarray | None = None, num_images: int = 4,
                  image_size: int = 32, seed: int = 0, atol: float = 1e-4,
                  program: bool = True,
                  fast_options: fast.Options | None = fast.Options()
                  ) -> ExportResult:
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

  Returns:
    The written paths, the measured differences and the branch counts per
    block.

  Raises:
    ConversionMismatch: a written file's logits differ by more than ``atol``.
  """
  out_dir = pathlib.Path(out_dir)
  plan = jax_side.plan_from_variables(variables, num_batches_tracked)
  if images is None:
    images = random_images(num_images, image_size, seed,
                           input_channels(model))
  want = jax_side.logits(model, variables, images)
  traced = dsp_torch.trace(plan, image_size)
  diffs = {"traced": check_logits("traced packed model",
                                  torch_logits(traced, images), want, atol)}
  files = {}
  files[REFERENCE_IO] = jax_side.atomic_write(
      out_dir / REFERENCE_IO,
      lambda f: np.savez(f, images=images,
                         images_nchw=images.transpose(0, 3, 1, 2),
                         logits=want))
  files[PACKED] = jax_side.atomic_write(
      out_dir / PACKED, lambda f: torch.jit.save(traced, f))
  diffs[PACKED] = check_logits(
      PACKED, torch_logits(torch.jit.load(files[PACKED]), images), want, atol)
  if program:
    # Batch 2 in the example: a size-1 dimension would be specialised.
    example = (torch.zeros(2, images.shape[-1], image_size, image_size),)
    ep = torch.export.export(
        dsp_torch.build(plan, index_select=True), example,
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    files[PROGRAM] = jax_side.atomic_write(
        out_dir / PROGRAM, lambda f: torch.export.save(ep, f))
    loaded = torch.export.load(files[PROGRAM]).module()
    diffs[PROGRAM] = check_logits(PROGRAM, torch_logits(loaded, images), want,
                                  atol)
  sd = dense_state_dict(variables, num_batches_tracked)
  files[STATE_DICT] = jax_side.atomic_write(
      out_dir / STATE_DICT, lambda f: torch.save(sd, f))
  loaded_sd = torch.load(files[STATE_DICT], weights_only=True)
  diffs[STATE_DICT] = check_logits(
      STATE_DICT,
      torch_logits(lambda x: dsp_torch.dense_forward(loaded_sd, x), images),
      want, atol)
  result = ExportResult(files, diffs, branch_counts(plan))
  if fast_options is not None:
    fast.attach(result, fast_specs.from_packed(
        plan, type(models.unwrap(model)).__name__ + str(getattr(model, "depth", "")),
        image_size), out_dir, fast_options, program=program, atol=atol)
  return result


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
  images = random_images(num_images, 32, seed, input_channels(model))
  got = jax_side.logits(model, variables, images)
  diff = float(np.max(np.abs(got - torch_logits(module, images))))
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
