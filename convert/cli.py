"""``python -m convert {export,import,inspect}``: the converter's command line.

* ``import SRC --out DIR``: a packed DSP TorchScript file (ours or a released
  one) or a reference-format / torchvision state dict -> ``DIR/variables.npz``
  + ``DIR/model.json`` (``convert.jax_side.load_variables`` reads them back).
  State dicts of the DSP CifarResNet are recognised from their keys; other
  architectures need ``--model NAME``.
* ``export SRC_DIR --out DIR``: a converted-variables directory or a run's
  stage directory (``workdir/<stage>``: ``meta.json`` + orbax checkpoints;
  ``--which best|latest``) -> the packed files of
  ``convert.dsp.export_packed`` and, with ``--stage``, the reference-format
  ``[state_dict, accuracy]`` file.
* ``inspect SRC``: module tree, branches per block, FLOPs and parameters by
  DSP's measure and over the whole model.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import zipfile
from typing import Any, Sequence

import numpy as np

import models
from convert import dsp, jax_side, reference, tables


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
  sd, acc = reference.read_state_dict(src)
  model_name, overrides, classes = _state_dict_model(sd, model_name)
  model = models.create_model(model_name, classes, **overrides)
  family = models.model_spec(model_name).family
  variables = reference.from_reference(sd, jax_side.template(model), family)
  meta = {"source": str(src), "format": "state dict",
          "stage": reference.reference_stage(sd), "accuracy": acc,
          "num_batches_tracked": tables.num_batches_tracked(sd)}
  jax_side.save_variables(out, model_name, classes, overrides, variables, meta)
  return {"model": model_name, "meta": meta}


def export_dir(source: str | pathlib.Path, out: str | pathlib.Path,
               stage: str | None = None, accuracy: float = 0.0,
               program: bool = True, which: str = "best") -> dsp.ExportResult:
  """Exports a variables directory or a training stage directory.

  Args:
    source: a ``jax_side.save_variables`` directory (``model.json``) or a
      run's stage directory (``meta.json``, orbax checkpoints).
    out: output directory.
    stage: also write the reference-format file of this stage.
    accuracy: the accuracy stored in the reference-format file.
    program: also write the ``.pt2`` program.
    which: ``best`` or ``latest`` checkpoint of a stage directory.

  Returns:
    The export result.
  """
  source = pathlib.Path(source)
  if (source / "meta.json").is_file() and not (source / "model.json").is_file():
    name, classes, overrides, variables = jax_side.load_stage_checkpoint(
        source, which)
    model = models.create_model(name, classes, **overrides)
    info: dict[str, Any] = {"model": name}
  else:
    model, variables, info = jax_side.load_variables(source)
  family = models.model_spec(info["model"]).family
  if family != jax_side.FAMILY:
    raise ValueError(f"DSP packing supports the {jax_side.FAMILY} family; "
                     f"{info['model']} is {family}")
  nbt = info.get("meta", {}).get("num_batches_tracked")
  result = dsp.export_packed(model, variables, out, num_batches_tracked=nbt,
                             program=program)
  if stage is not None:
    sd = reference.to_reference(variables, stage, family, nbt)
    result.files["reference"] = reference.save(
        pathlib.Path(out) / "reference_state_dict.pkl", sd, accuracy)
  return result


def _load_any(src: pathlib.Path, model_name: str | None
              ) -> tuple[Any, dict[str, Any], str, dict[str, Any] | None]:
  if src.is_dir():
    model, variables, info = jax_side.load_variables(src)
    return model, variables, info["model"], None
  if is_torchscript(src):
    r = dsp.import_packed(src)
    return r.model(), r.variables, r.model_name, dsp.branch_counts(r.plan)
  sd, _ = reference.read_state_dict(src)
  model_name, overrides, classes = _state_dict_model(sd, model_name)
  model = models.create_model(model_name, classes, **overrides)
  family = models.model_spec(model_name).family
  variables = reference.from_reference(sd, jax_side.template(model), family)
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
  p = sub.add_parser("export", help="variables or run stage dir -> packed "
                     "files")
  p.add_argument("variables", help="a variables directory (model.json) or a "
                 "run's stage directory (meta.json + checkpoints)")
  p.add_argument("--which", choices=("best", "latest"), default="best",
                 help="checkpoint of a stage directory")
  p.add_argument("--out", required=True)
  p.add_argument("--stage", choices=reference.STAGES,
                 help="also write the reference-format state dict")
  p.add_argument("--accuracy", type=float, default=0.0)
  p.add_argument("--no-program", action="store_true",
                 help="skip the torch.export (.pt2) program")
  p = sub.add_parser("inspect", help="tree, branches, FLOPs of a file/dir")
  p.add_argument("src")
  p.add_argument("--model")
  args = parser.parse_args(argv)
  try:
    if args.command == "import":
      info = import_file(args.src, args.out, args.model)
      print(f"imported {args.src} as {info['model']} -> {args.out}")
      if "max_abs_diff" in info["meta"]:
        print(f"max |logits(JAX) - logits(TorchScript)| = "
              f"{info['meta']['max_abs_diff']:.3g}")
    elif args.command == "export":
      r = export_dir(args.variables, args.out, args.stage, args.accuracy,
                     not args.no_program, args.which)
      for k, path in r.files.items():
        print(f"wrote {path}")
      for k, d in r.max_abs_diff.items():
        print(f"max |logits diff| {k}: {d:.3g}")
    else:
      print(inspect(args.src, args.model))
  except (ValueError, KeyError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
