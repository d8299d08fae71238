"""Every export format, chosen by what applies to a model: ``export``.

* ``torch``    the compact program as TorchScript, ``torch.export`` program
  and state dict (``model.pt``, ``model.pt2``, ``model_state_dict.pt``), any
  model (``convert.generic``);
* ``onnx``     the same network as ``model.onnx``, any model;
* ``packed``   the released DSP format (``packed.pt``...), the DSP CIFAR
  ResNets (``convert.dsp``);
* ``slim``     torchvision-named slimmed modules (``slim.pt``...), the
  registry ResNets, VGG-bns, ViTs and Swins (``convert.slim``);
* ``branched`` DSP's groups as branch convs (``packed.pt``,
  ``branches.json``...), the same families carrying DSP group logits
  (``convert.branched``);
* ``fast``     ``fast.pt`` / ``fast.pt2`` / ``fast_plan.json`` beside packed
  and slim files (``convert.fast``).

Every file is written atomically and checked against the masked JAX logits;
the family formats are checked against the pruned network's description
(``convert.description``) too, so a module that lost or changed a layer is an
error naming it.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

import models
from convert import description as desc_lib
from convert import writer
from models import paths

FORMATS = ("packed", "slim", "branched", "fast", "torch", "onnx")
GENERIC = ("torch", "onnx")


def family_of(model: Any) -> str:
  """The registry family of a model's class, or ``generic``."""
  from models import cifar_resnet, resnet, swin, vgg, vit  # pylint: disable=import-outside-toplevel
  plain = models.unwrap(model)
  for cls, family in ((cifar_resnet.CifarResNet, "cifar_resnet"),
                      (resnet.ResNet, "resnet"), (vgg.VGG, "vgg"),
                      (vit.VisionTransformer, "vit"),
                      (swin.SwinTransformer, "swin")):
    if isinstance(plain, cls):
      return family
  return models.GENERIC


def applicable(model: Any, variables: Mapping[str, Any]) -> list[str]:
  """The formats that apply to a model, in ``FORMATS`` order."""
  family = family_of(model)
  gated = bool(variables.get(models.GATES))
  out = []
  if family == "cifar_resnet":
    out += ["packed", "fast"]
  elif family in ("resnet", "vgg", "vit", "swin"):
    out += ["branched"] if gated else ["slim", "fast"]
  return out + list(GENERIC)


def export(model: Any, variables: Mapping[str, Any],
           out_dir: str | os.PathLike,
           input_shape: Sequence[int] | None = None, *,
           formats: str | Sequence[str] = "all", stage: str | None = None,
           accuracy: float = 0.0,
           num_batches_tracked: Mapping[str, int] | None = None,
           program: bool = True, fast_options: Any = "default",
           fresh: bool = True, atol: float = 1e-4) -> writer.ExportResult:
  """Exports a pruned model in every format asked for that applies.

  Args:
    model: any Flax Linen model (plain or ``models.prunable``-wrapped).
    variables: its variables with ``masks`` (and ``gates`` for DSP).
    out_dir: directory to write into (created).
    input_shape: (H, W, C) (default: the model's image size, 3 channels).
    formats: ``all`` (every format that applies) or names of ``FORMATS``.
    stage: ``packed`` only: also write the reference-format state dict of
      this stage (``reference_state_dict.pkl``).
    accuracy: the accuracy stored in the reference-format file.
    num_batches_tracked: ``packed``: BatchNorm counters.
    program: also write the ``torch.export`` programs.
    fast_options: ``convert.fast.Options`` (``default``: the cost model);
      None skips ``fast``.
    fresh: reload the generic files in a fresh interpreter.
    atol: largest accepted |logit| difference.

  Returns:
    Every written file by name, each file's max |logit difference| against
    the masked JAX model, notes, and in ``details`` the parameters and MACs
    before and after.

  Raises:
    ValueError: a format that does not apply to the model (naming the ones
      that do), or an operation an export cannot translate (before it writes
      anything).
  """
  from convert import generic  # pylint: disable=import-outside-toplevel
  can = applicable(model, variables)
  if isinstance(formats, str):
    formats = can if formats == "all" else [formats]
  formats = list(formats)
  for f in formats:
    if f not in FORMATS:
      raise ValueError(f"export format must be one of all, "
                       f"{', '.join(FORMATS)}; got {f!r}")
    if f not in can:
      raise ValueError(f"the {f} export does not apply to this "
                       f"{family_of(model)} model; it takes "
                       f"{', '.join(can)}")
  if stage is not None and "packed" not in formats:
    raise ValueError("--stage (the reference-format state dict) belongs to "
                     "the packed DSP export")
  if fast_options == "default":
    from convert import fast  # pylint: disable=import-outside-toplevel
    fast_options = fast.Options()
  if "fast" not in formats:
    fast_options = None
  out_dir = pathlib.Path(out_dir)
  description = desc_lib.describe(model, variables, input_shape)
  size = description.input_shape[0]
  result = writer.ExportResult({}, {})
  kinds = [k for k in ("torchscript", "program", "state_dict")
           if "torch" in formats and (k != "program" or program)]
  if "onnx" in formats:
    kinds.append("onnx")
  if kinds:
    # First: it refuses an untranslatable model before anything is written.
    _merge(result, generic.export(model, variables, out_dir,
                                  description.input_shape, kinds=kinds,
                                  fresh=fresh, atol=atol,
                                  description=description))
  if "packed" in formats:
    from convert import dsp  # pylint: disable=import-outside-toplevel
    r = dsp.export_packed(model, variables, out_dir,
                          num_batches_tracked=num_batches_tracked,
                          program=program, image_size=size,
                          fast_options=fast_options, atol=atol,
                          description=description)
    if stage is not None:
      from convert import reference  # pylint: disable=import-outside-toplevel
      sd = reference.to_reference(variables, stage, "cifar_resnet",
                                  num_batches_tracked)
      r.files["reference"] = reference.save(
          out_dir / "reference_state_dict.pkl", sd, accuracy)
    _merge(result, r)
  if "slim" in formats:
    from convert import slim  # pylint: disable=import-outside-toplevel
    _merge(result, slim.export_ddrop(model, variables, out_dir, size,
                                     program=program, atol=atol,
                                     fast_options=fast_options,
                                     description=description))
  if "branched" in formats:
    from convert import branched  # pylint: disable=import-outside-toplevel
    _merge(result, branched.export_branched(model, variables, out_dir, size,
                                            program=program, atol=atol,
                                            description=description))
  summary = result.details.get("summary")
  if "params_after" not in result.details and hasattr(summary,
                                                      "params_after"):
    result.details["params_after"] = summary.params_after
  g = description.graph
  result.details.update(
      formats=formats,
      params_before=sum(int(np.size(x)) for _, x in
                        paths.leaves(variables["params"])),
      macs_before=int(sum(l.macs for l in g.weighted) + g.activation_macs),
      macs_after=description.macs)
  return result


def _merge(into: writer.ExportResult, part: Any) -> None:
  into.files.update(part.files)
  into.max_abs_diff.update(part.max_abs_diff)
  into.notes.extend(part.notes)
  into.details.update(part.details)
