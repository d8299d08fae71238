"""``python -m convert {export,import,inspect}``: the converter's command line.

* ``import SRC --out DIR``: a packed DSP TorchScript file (ours or a released
  one) or a reference-format / torchvision state dict -> ``DIR/variables.npz``
  + ``DIR/model.json`` (``convert.jax_side.load_variables`` reads them back).
  State dicts of the DSP CifarResNet are recognised from their keys; other
  architectures need ``--model NAME``.
* ``export SRC_DIR --out DIR``: a converted-variables directory or a run's
  stage directory (``workdir/<stage>``: ``meta.json`` + orbax checkpoints;
  ``--which best|latest``) -> PyTorch files, in the format the model's family
  takes unless ``--format`` names one:

  - ``packed`` (``cifar_resnet`` family, DSP): the packed multi-branch files
    of ``convert.dsp.export_packed`` and, with ``--stage``, the
    reference-format ``[state_dict, accuracy]`` file;
  - ``slim`` (``resnet`` / ``vgg`` families, DDROP): the physically slimmed
    files of ``convert.slim.export_ddrop`` (``slim.pt``, ``slim.pt2``,
    ``slim_state_dict.pt``, ``reference_io.npz``);
  - ``branched`` (``resnet`` / ``vgg`` families, DSP): the multi-branch files
    of ``convert.branched.export_branched`` (``packed.pt``, ``packed.pt2``,
    ``packed_state_dict.pt``, ``branches.json``); the default for a model
    that carries DSP group logits (a ``gates`` collection).

  Both also write ``fast.pt`` / ``fast.pt2`` / ``fast_plan.json``
  (``convert.fast``; ``--tune`` times the formulations, ``--plan`` reuses a
  plan, ``--no-fast`` skips them). Every written file's logits are checked
  against the Flax model's.
* ``inspect SRC``: module tree, branches per block, FLOPs and parameters by
  DSP's measure and over the whole model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import zipfile
from typing import Any, Sequence

import numpy as np

import models
from convert import (branched, dsp, fast, jax_side, preprocess, reference,
                     slim, tables)
from convert import transformers
from training import errors

# Export format -> the model families it supports.
FORMATS = {"packed": (jax_side.FAMILY,), "slim": slim.FAMILIES,
           "branched": slim.FAMILIES}


def is_torchscript(path: pathlib.Path) -> bool:
  """True for a ``torch.jit.save`` archive (a zip with a ``code/`` tree)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any("/code/__torch__/" in "/" + n for n in z.namelist())


def infer_cifar_resnet(state_dict: dict[str, Any]) -> tuple[str, dict[str, Any], int]:
  """Registry name, overrides and classes of a reference CifarResNet state dict."""
  if "conv_1_3x3.weight" not in state_dict:
    raise ValueError(
        "cannot infer the architecture: expected DSP CifarResNet keys "
        "(conv_1_3x3.weight, stage_1.0.conv_a.weight, ...), found "
        f"{', '.join(list(state_dict)[:5])} ...; pass --model NAME")
  blocks = {m.group(1) for k in state_dict
            if (m := re.match(r"stage_1\.(\d+)\.conv_a\.weight$", k))}
  widths = [tables.to_numpy(state_dict["conv_1_3x3.weight"]).shape[0]]
  s = 2
  while f"stage_{s}.0.conv_a.weight" in state_dict:
    widths.append(tables.to_numpy(state_dict[f"stage_{s}.0.conv_a.weight"]).shape[0])
    s += 1
  classes = tables.to_numpy(state_dict["classifier.weight"]).shape[0]
  name, overrides = jax_side.cifar_resnet_for(
      6 * len(blocks) + 2, tuple(widths), classes,
      reference.groups_of(state_dict))
  return name, overrides, classes


def _state_dict_model(sd: dict[str, Any], model_name: str | None
                      ) -> tuple[str, dict[str, Any], int]:
  """Registry name, overrides and classes for a state dict."""
  if model_name is None:
    return infer_cifar_resnet(sd)
  models.model_spec(model_name)  # a clear error for unknown names
  # The output layer is the last weight in state-dict (model) order.
  head = [k for k in sd if k.endswith(".weight")][-1]
  groups = reference.groups_of(sd)
  return (model_name, {"groups": groups} if groups else {},
          tables.to_numpy(sd[head]).shape[0])


def _from_state_dict(sd: dict[str, Any], model_name: str | None
                     ) -> tuple[Any, dict[str, Any], str, dict[str, Any]]:
  """Flax model, variables, registry name and overrides of a state dict."""
  model_name, overrides, classes = _state_dict_model(sd, model_name)
  model = models.create_model(model_name, classes, **overrides)
  family = models.model_spec(model_name).family
  if family in transformers.FAMILIES:
    # torchvision or timm ViT / Swin names (convert.transformers tables).
    variables = transformers.from_torch(
        sd, jax_side.template(model, model.image_size or 224), model,
        model_name)
  else:
    variables = reference.from_reference(sd, jax_side.template(model), family)
  return model, variables, model_name, overrides


def import_file(src: str | pathlib.Path, out: str | pathlib.Path,
                model_name: str | None = None) -> dict[str, Any]:
  """Converts SRC into a variables directory; returns the ``model.json`` info."""
  src = pathlib.Path(src)
  if not src.is_file():
    raise FileNotFoundError(f"no such file: {src}")
  if is_torchscript(src):
    r = dsp.import_packed(src)
    meta = {"source": str(src), "format": "packed TorchScript",
            "num_batches_tracked": r.num_batches_tracked,
            "max_abs_diff": r.max_abs_diff}
    jax_side.save_variables(out, r.model_name, r.num_classes, r.overrides,
                            r.variables, meta)
    return {"model": r.model_name, "meta": meta}
  try:
    sd, acc = reference.read_state_dict(src)
  except ValueError as e:
    raise ValueError(f"{e}; a packed DSP TorchScript file (torch.jit.save, "
                     "e.g. a released resnet20_g4.pt) is accepted too") from e
  model, variables, model_name, overrides = _from_state_dict(sd, model_name)
  meta = {"source": str(src), "format": "state dict",
          "stage": reference.reference_stage(sd), "accuracy": acc,
          "num_batches_tracked": tables.num_batches_tracked(sd)}
  jax_side.save_variables(out, model_name, model.num_classes, overrides,
                          variables, meta)
  return {"model": model_name, "meta": meta}


def export_format(model_name: str) -> str:
  """The export of a registry model: ``packed`` (DSP) or ``slim`` (DDROP).

  Args:
    model_name: a registry name.

  Returns:
    ``packed`` for the ``cifar_resnet`` family (DSP packing), ``slim`` for the
    ``resnet`` / ``vgg`` families (DDROP slimming).

  Raises:
    ValueError: a family neither export supports.
  """
  family = models.model_spec(model_name).family
  for fmt, families in FORMATS.items():
    if family in families:
      return fmt
  raise ValueError(f"{model_name} is of family {family}; exports exist for "
                   + "; ".join(f"{', '.join(f)} ({k})"
                               for k, f in FORMATS.items()))


def export_dir(source: str | pathlib.Path, out: str | pathlib.Path,
               stage: str | None = None, accuracy: float = 0.0,
               program: bool = True, which: str = "best",
               export: str | None = None, image_size: int | None = None,
               fast_options: fast.Options | None = fast.Options()
               ) -> (dsp.ExportResult | slim.SlimExport
                     | branched.BranchedExport):
  """Exports a variables directory or a training stage directory.

  Args:
    source: a ``jax_side.save_variables`` directory (``model.json``) or a
      run's stage directory (``meta.json``, orbax checkpoints).
    out: output directory.
    stage: also write the reference-format file of this stage (``packed``
      only: the format is DSP's CifarResNet).
    accuracy: the accuracy stored in the reference-format file.
    program: also write the ``.pt2`` program.
    which: ``best`` or ``latest`` checkpoint of a stage directory.
    export: ``packed`` (``convert.dsp.export_packed``) or ``slim``
      (``convert.slim.export_ddrop``); None picks by the model's family
      (``export_format``).
    image_size: input height/width (default: the model's, or 32).
    fast_options: how to write ``fast.pt`` / ``fast.pt2`` /
      ``fast_plan.json`` (``convert.fast``); None skips them.

  Returns:
    ``dsp.ExportResult`` or ``slim.SlimExport`` (both have ``files``,
    ``max_abs_diff`` and ``notes``).

  Raises:
    ValueError: an unknown format, a format the model's family does not
      support, or ``stage`` with ``slim``.
  """
  model, variables, info = jax_side.load_source(source, which)
  return _export(model, variables, info, out, stage, accuracy, program, export,
                 image_size, fast_options)


def _export(model: Any, variables: dict[str, Any], info: dict[str, Any],
            out: str | pathlib.Path, stage: str | None, accuracy: float,
            program: bool, export: str | None, image_size: int | None,
            fast_options: fast.Options | None = fast.Options()
            ) -> (dsp.ExportResult | slim.SlimExport
                  | branched.BranchedExport):
  if image_size and getattr(model, "image_size", None) not in (None,
                                                               image_size):
    # A model rebuilt from a checkpoint has the registry's input size; it
    # is exported for the size it was trained at.
    model = model.clone(image_size=image_size)
  fmt = export_format(info["model"]) if export is None else export
  if export is None and fmt == "slim" and variables.get("gates"):
    fmt = "branched"  # DSP-pruned: its groups become branches.
  if fmt not in FORMATS:
    raise ValueError(f"export format must be one of {', '.join(FORMATS)}, "
                     f"got {fmt!r}")
  family = models.model_spec(info["model"]).family
  if family not in FORMATS[fmt]:
    raise ValueError(f"the {fmt} export supports the families "
                     f"{', '.join(FORMATS[fmt])}; {info['model']} is {family}")
  if fmt != "packed" and stage is not None:
    raise ValueError("--stage (the reference-format state dict) belongs to "
                     f"the packed DSP export; the {fmt} export has none")
  if fmt == "slim":
    return slim.export_ddrop(model, variables, out, image_size,
                             program=program, fast_options=fast_options)
  if fmt == "branched":
    return branched.export_branched(model, variables, out, image_size,
                                    program=program)
  nbt = info.get("meta", {}).get("num_batches_tracked")
  result = dsp.export_packed(model, variables, out, num_batches_tracked=nbt,
                             program=program, image_size=image_size or 32,
                             fast_options=fast_options)
  if stage is not None:
    sd = reference.to_reference(variables, stage, family, nbt)
    result.files["reference"] = reference.save(
        pathlib.Path(out) / "reference_state_dict.pkl", sd, accuracy)
  return result


def _load_any(src: pathlib.Path, model_name: str | None
              ) -> tuple[Any, dict[str, Any], str, dict[str, Any] | None]:
  if src.is_dir():
    model, variables, info = jax_side.load_source(src)
    return model, variables, info["model"], None
  if is_torchscript(src):
    r = dsp.import_packed(src)
    return r.model(), r.variables, r.model_name, dsp.branch_counts(r.plan)
  sd, _ = reference.read_state_dict(src)
  model, variables, model_name, _ = _from_state_dict(sd, model_name)
  return model, variables, model_name, None


def inspect(src: str | pathlib.Path, model_name: str | None = None) -> str:
  """Text report: layers, branches per block (packed files), FLOPs/params."""
  src = pathlib.Path(src)
  if not src.exists():
    raise FileNotFoundError(f"no such file or directory: {src}")
  model, variables, name, branches = _load_any(src, model_name)
  family = models.model_spec(name).family
  lines = [f"{src}: {name} ({family})"]
  for layer in tables.find_layers(variables, family):
    k = tables.get_path(variables[tables.PARAMS],
                    layer.path + ("scale" if "norm" in layer.kind else "kernel",))
    lines.append(f"  {layer.name:<28} {layer.kind:<9} {tuple(np.shape(k))}")
  if branches is None and family == jax_side.FAMILY:
    branches = dsp.branch_counts(jax_side.plan_from_variables(variables))
  if branches:
    lines.append("branches per block (conv_a, conv_b):")
    lines += [f"  {b:<12} {a} {c}" for b, (a, c) in branches.items()]
  try:
    from models import flops  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # the FLOPs module is optional here.
    lines.append(f"(no FLOPs report: {e})")
  else:
    lines.append(flops.format_table(flops.report(model, variables)))
  return "\n".join(lines)


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
  """The ``export`` command's arguments."""
  p.add_argument("variables", help="a variables directory (model.json) or a "
                 "run's stage directory (meta.json + checkpoints)")
  p.add_argument("--which", choices=("best", "latest"), default="best",
                 help="checkpoint of a stage directory")
  p.add_argument("--out", required=True)
  p.add_argument("--format", choices=tuple(FORMATS), dest="export_format",
                 help="packed: DSP packing (cifar_resnet family); slim: DDROP "
                 "slimming (resnet, vgg, vit, swin families); branched: DSP "
                 "branches (resnet, vgg; vit, swin: compact MLPs); default: "
                 "by the model's family, branched when it carries DSP gates")
  p.add_argument("--stage", choices=reference.STAGES,
                 help="also write the reference-format state dict (packed)")
  p.add_argument("--accuracy", type=float, default=0.0)
  p.add_argument("--image-size", type=int,
                 help="input size (default: the model's, or 32)")
  p.add_argument("--no-program", action="store_true",
                 help="skip the torch.export (.pt2) program")
  p.add_argument("--dataset",
                 help="dataset the model was trained on, for preprocess.json "
                 "(default: the run's, read from its report.json)")
  p.add_argument("--with-preprocess", action="store_true",
                 help="embed the input normalisation into the TorchScript "
                 "files other than packed.pt (they then take 0..255 pixels)")
  p.add_argument("--tune", action="store_true",
                 help="choose fast.pt's per-layer formulations and memory "
                 "format by timing them on this machine (cached in "
                 "OUT/fast_plan.json) instead of the cost model")
  p.add_argument("--plan", help="a fast_plan.json to reuse (ignored with a "
                 "warning when made for another model or torch version)")
  p.add_argument("--no-fast", action="store_true",
                 help="skip fast.pt / fast.pt2 / fast_plan.json")


def dataset_of(source: str | pathlib.Path) -> str | None:
  """The training dataset of a run's directory (from its ``report.json``).

  Args:
    source: a run's workdir, one of its stage directories or a stage's
      ``output/``.

  Returns:
    The dataset name, or None when no report names it.
  """
  source = pathlib.Path(source).resolve()
  for d in (source, *list(source.parents)[:3]):
    try:
      return json.loads((d / "report.json").read_text())["dataset"]
    except (OSError, ValueError, KeyError):
      continue
  return None


def _dataset_info(args: argparse.Namespace) -> Any:
  """The training dataset's ``DatasetInfo`` (None: unknown), its image
  size replaced by ``--image-size`` when given."""
  name = args.dataset or dataset_of(args.variables)
  if name is None:
    return None
  from training import data  # pylint: disable=g-import-not-at-top
  info = data.get_info(name)
  if args.image_size:
    info = dataclasses.replace(info, image_size=args.image_size)
  return info


def _write_preprocess(args: argparse.Namespace, info: Any,
                      files: dict[str, Any]) -> dict[str, Any] | None:
  """``preprocess.json`` of an export (None: dataset unknown)."""
  if info is None:
    if args.with_preprocess:
      raise ValueError("--with-preprocess needs the training dataset: pass "
                       "--dataset NAME")
    return None
  return preprocess.finish(args.out, info, files, args.with_preprocess)


def _run_export(args: argparse.Namespace) -> None:
  """Exports for parsed ``export`` arguments; prints files and differences."""
  if not pathlib.Path(args.variables).is_dir():
    raise FileNotFoundError(
        f"no such directory: {args.variables} (not a converted-variables "
        "directory; expected a run's workdir, one of its stage directories, "
        "or a `convert import` directory)")
  model, variables, info = jax_side.load_source(args.variables, args.which)
  data_info = _dataset_info(args)
  # The model takes the training images' size (Fashion-MNIST: 28).
  size = args.image_size or (data_info.image_size if data_info else None)
  r = _export(model, variables, info, args.out, args.stage, args.accuracy,
              not args.no_program, args.export_format, size,
              None if args.no_fast else fast.Options(args.tune, args.plan))
  pre = _write_preprocess(args, data_info, r.files)
  if pre is not None:
    r.files[preprocess.FILE] = pre["file"]
  for path in r.files.values():
    print(f"wrote {path}")
  if pre is not None:
    print(f"input: {pre['summary']}")
  else:
    print("no preprocess.json: the training dataset is unknown; pass "
          "--dataset NAME")
  for k, d in r.max_abs_diff.items():
    print(f"max |logits diff| {k}: {d:.3g}")
  for note in r.notes:
    print(note)
  if isinstance(r, slim.SlimExport):
    s = r.summary
    print(f"{info['model']}: parameters {s.params_before} -> {s.params_after} "
          f"({s.params_after / s.params_before:.1%})")


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``python -m convert``."""
  parser = argparse.ArgumentParser(prog="python -m convert",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("import", help="TorchScript/state dict -> variables dir")
  p.add_argument("src")
  p.add_argument("--out", required=True)
  p.add_argument("--model", help="registry name (state dicts of other "
                 "architectures than the DSP CifarResNet)")
  _add_export_arguments(sub.add_parser(
      "export", help="variables or run stage dir -> packed (DSP) or slimmed "
      "(DDROP) PyTorch files"))
  p = sub.add_parser("inspect", help="tree, branches, FLOPs of a file/dir")
  p.add_argument("src")
  p.add_argument("--model")
  args = parser.parse_args(argv)

  def work():
    if args.command == "import":
      info = import_file(args.src, args.out, args.model)
      print(f"imported {args.src} as {info['model']} -> {args.out}")
      if "max_abs_diff" in info["meta"]:
        print(f"max |logits(JAX) - logits(TorchScript)| = "
              f"{info['meta']['max_abs_diff']:.3g}")
    elif args.command == "export":
      with errors.exit_on_interrupt():  # Its files are written atomically.
        _run_export(args)
    else:
      print(inspect(args.src, args.model))

  return errors.call(work, outputs=[getattr(args, "out", None)], status=2)
