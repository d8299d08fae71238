"""``python -m convert {export,import,inspect}``: the converter's command line.

* ``import SRC --out DIR``: a packed DSP TorchScript file (ours or a released
  one) or a reference-format / torchvision state dict -> ``DIR/variables.npz``
  + ``DIR/model.json`` (``convert.artifacts.load_variables`` reads them back).
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
from typing import Any, Sequence

import numpy as np

import models
from convert import (dsp, fast, formats, jax_side, preprocess, reference,
                     tables, writer)
from convert import transformers
from models.layers import input_channels
from training import artifacts
from training import errors

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
        sd, artifacts.template(model, model.image_size or 224), model,
        model_name)
  else:
    variables = reference.from_reference(sd, artifacts.template(model), family)
  return model, variables, model_name, overrides


def import_file(src: str | pathlib.Path, out: str | pathlib.Path,
                model_name: str | None = None) -> dict[str, Any]:
  """Converts SRC into a variables directory; returns the ``model.json`` info."""
  src = pathlib.Path(src)
  if not src.is_file():
    raise FileNotFoundError(f"no such file: {src}")
  if writer.is_torchscript(src):
    r = dsp.import_packed(src)
    meta = {"source": str(src), "format": "packed TorchScript",
            "num_batches_tracked": r.num_batches_tracked,
            "max_abs_diff": r.max_abs_diff}
    artifacts.save_variables(out, r.model_name, r.num_classes, r.overrides,
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
  artifacts.save_variables(out, model_name, model.num_classes, overrides,
                          variables, meta)
  return {"model": model_name, "meta": meta}


def export_dir(source: str | pathlib.Path, out: str | pathlib.Path,
               stage: str | None = None, accuracy: float = 0.0,
               program: bool = True, which: str = "best",
               export: str | None = None, image_size: int | None = None,
               fast_options: Any = "default", fresh: bool = True
               ) -> writer.ExportResult:
  """Exports a variables directory or a training stage directory.

  Args:
    source: a ``save_variables`` directory (``model.json``) or a run's stage
      directory (``meta.json``, orbax checkpoints).
    out: output directory.
    stage: also write the reference-format file of this stage (``packed``).
    accuracy: the accuracy stored in the reference-format file.
    program: also write the ``.pt2`` programs.
    which: ``best`` or ``latest`` checkpoint of a stage directory.
    export: one of ``convert.formats.FORMATS``, or None / ``all`` for every
      format that applies.
    image_size: input height/width (default: the model's, or 32).
    fast_options: ``convert.fast.Options`` for ``fast.pt`` (None skips it).
    fresh: reload the generic files in a fresh interpreter.

  Returns:
    The ``convert.writer.ExportResult`` of every written file.
  """
  model, variables, info = artifacts.load_source(source, which)
  return _export(model, variables, info, out, stage, accuracy, program, export,
                 image_size, fast_options, fresh)


def _export(model: Any, variables: dict[str, Any], info: dict[str, Any],
            out: str | pathlib.Path, stage: str | None, accuracy: float,
            program: bool, export: str | None, image_size: int | None,
            fast_options: Any = "default", fresh: bool = True
            ) -> writer.ExportResult:
  size = image_size or getattr(models.unwrap(model), "image_size",
                               None) or 32
  channels = input_channels(models.unwrap(model))
  return formats.export(
      model, variables, out, (size, size, channels),
      formats=export or "all", stage=stage, accuracy=accuracy,
      num_batches_tracked=info.get("meta", {}).get("num_batches_tracked"),
      program=program, fast_options=fast_options, fresh=fresh)


def _load_any(src: pathlib.Path, model_name: str | None
              ) -> tuple[Any, dict[str, Any], str, dict[str, Any] | None]:
  if src.is_dir():
    model, variables, info = artifacts.load_source(src)
    return model, variables, info["model"], None
  if writer.is_torchscript(src):
    r = dsp.import_packed(src)
    return r.model(), r.variables, r.model_name, dsp.branch_counts(r.plan)
  sd, _ = reference.read_state_dict(src)
  model, variables, model_name, _ = _from_state_dict(sd, model_name)
  return model, variables, model_name, None


# Column legends of the ``--layers`` tables: every column named and explained.
_LAYER_LEGEND = (
    "per layer (conv and dense): layer = Flax module path; kind = conv or "
    "dense; dsp = * when the layer takes part in DSP; kernels = kept / all "
    "(filter, input channel) kernels; MACs = kept / dense multiply-"
    "accumulates per image; params = kept / dense parameters")
_TENSOR_LEGEND = ("per weight tensor of 2 or more dimensions (conv and "
                  "linear weights, PyTorch layout: out, in, ...): name, shape")


def inspect(src: str | pathlib.Path, model_name: str | None = None,
            layers: bool = False) -> str:
  """Text report of a variables/run directory or of any file ``export``
  writes: the summary, then (``layers``) one row per layer.

  Args:
    src: a directory (variables, stage or run), a packed DSP TorchScript
      file, a reference-format or torchvision state dict, or any exported
      file (TorchScript, ``.pt2``, state dict, ONNX).
    model_name: registry name of a state dict of another architecture than
      the DSP CifarResNet.
    layers: append the per-layer table (its header explains every column).

  Returns:
    The report.
  """
  src = pathlib.Path(src)
  if not src.exists():
    raise FileNotFoundError(f"no such file or directory: {src}")
  if src.is_file() and not _reads_as_model(src, model_name):
    return _inspect_file(src, layers)
  model, variables, name, branches = _load_any(src, model_name)
  family = models.model_spec(name).family
  from models import flops  # pylint: disable=import-outside-toplevel
  rep = flops.report(model, variables,
                     getattr(models.unwrap(model), "image_size", None) or 32)
  # format_table ends with the two summary lines (DSP and whole-model).
  table = flops.format_table(rep).splitlines()
  lines = [f"{src}: {name} ({family}), parameters {rep.params:,} of "
           f"{rep.params_dense:,}, MACs {rep.macs:,} of {rep.macs_dense:,} "
           f"per image", *table[-2:]]
  if branches is None and family == jax_side.FAMILY:
    branches = dsp.branch_counts(jax_side.plan_from_variables(variables))
  if branches:
    lines.append("branches per block (packed convs: conv_a, conv_b):")
    lines += [f"  {b:<12} {a} {c}" for b, (a, c) in branches.items()]
  if layers:
    lines += ["", _LAYER_LEGEND, *table[:-3]]
  else:
    lines.append("(--layers: one row per layer)")
  return "\n".join(lines)


def _reads_as_model(src: pathlib.Path, model_name: str | None) -> bool:
  """Whether a file is one ``import`` reads (packed DSP TorchScript, or a
  state dict with the names of a registry model)."""
  if src.suffix in (".onnx", ".pt2", ".json", ".npz"):
    return False
  if writer.is_torchscript(src):
    return dsp.is_packed(src)
  try:
    sd, _ = reference.read_state_dict(src)
    _from_state_dict(sd, model_name)
  except (ValueError, KeyError):
    return False
  return True


def _inspect_file(src: pathlib.Path, layers: bool = False) -> str:
  """Any exported file: its kind, tensor count and numbers; ONNX: opset,
  inputs/outputs and operators; with ``layers``, the weights' shapes."""
  import torch  # pylint: disable=import-outside-toplevel
  lines: list[str] = []
  if src.suffix == ".json":
    return f"{src}:\n{src.read_text()}"
  if src.suffix == ".npz":
    with np.load(src) as z:
      return "\n".join([f"{src}: numpy arrays"] + [
          f"  {k:<20} {z[k].shape} {z[k].dtype}" for k in z.files])
  if src.suffix == ".onnx":
    import onnx  # pylint: disable=import-outside-toplevel
    m = onnx.load(str(src))
    tensors = {t.name: tuple(t.dims) for t in m.graph.initializer}
    ops: dict[str, int] = {}
    for node in m.graph.node:
      ops[node.op_type] = ops.get(node.op_type, 0) + 1

    def io(values):
      return ", ".join(
          f"{v.name} {tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)}"
          for v in values)

    opset = max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    head = (f"{src}: ONNX (opset {opset}), inputs {io(m.graph.input)}, "
            f"outputs {io(m.graph.output)}")
    tail = "operators: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items()))
  else:
    if writer.is_torchscript(src):
      sd, kind = torch.jit.load(str(src), map_location="cpu").state_dict(), (
          "TorchScript")
    elif src.suffix == ".pt2":
      sd, kind = torch.export.load(str(src)).module().state_dict(), (
          "torch.export program")
    else:
      try:
        sd, kind = torch.load(src, map_location="cpu", weights_only=True), (
            "state dict")
      except Exception as e:  # torch raises many kinds for foreign files.
        raise ValueError(
            f"{src} is not a file this command reads (a variables or run "
            "directory, TorchScript, .pt2, state dict, ONNX, .npz or .json "
            f"file): {str(e).splitlines()[0]}") from e
      if not isinstance(sd, dict):
        raise ValueError(f"{src} is not a state dict, TorchScript, .pt2 or "
                         "ONNX file")
    tensors = {k: tuple(v.shape) for k, v in sd.items()
               if isinstance(v, torch.Tensor)}
    head, tail = f"{src}: {kind}", None
  total = sum(int(np.prod(s)) for s in tensors.values())
  lines.append(f"{head}, {len(tensors)} tensors, {total:,} numbers" + (
      " (frozen: its weights are constants of the code)"
      if not tensors and src.suffix != ".onnx" else ""))
  if tail:
    lines.append(tail)
  weights = [(n, s) for n, s in tensors.items() if len(s) >= 2]
  if layers and weights:  # conv and linear weights: the layers' widths
    lines += ["", _TENSOR_LEGEND]
    lines += [f"  {name:<40} {shape}" for name, shape in weights]
  elif weights:
    lines.append("(--layers: the weights' shapes)")
  return "\n".join(lines)


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
  """The ``export`` command's arguments."""
  p.add_argument("variables", help="a variables directory (model.json) or a "
                 "run's stage directory (meta.json + checkpoints)")
  p.add_argument("--which", choices=("best", "latest"), default="best",
                 help="checkpoint of a stage directory")
  p.add_argument("--out", required=True,
                 help="output directory (created; files written atomically)")
  p.add_argument("--format", choices=("all",) + formats.FORMATS,
                 default="all", dest="export_format",
                 help="all (default): every format that applies; torch / "
                 "onnx: the compact network of any model (model.pt, "
                 "model.pt2, model_state_dict.pt / model.onnx); packed: the "
                 "released DSP format (cifar_resnet family); slim: DDROP "
                 "slimming (resnet, vgg, vit, swin); branched: DSP branches "
                 "(the same families with group logits); fast: fast.pt "
                 "beside packed or slim files")
  p.add_argument("--stage", choices=reference.STAGES,
                 help="also write the reference-format state dict (packed)")
  p.add_argument("--accuracy", type=float, default=0.0,
                 help="accuracy stored in the reference-format file "
                 "(with --stage; default 0)")
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
  model, variables, info = artifacts.load_source(args.variables, args.which)
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
  d = r.details
  params = (f"parameters {d['params_before']:,} -> {d['params_after']:,}, "
            if "params_after" in d else "")
  print(f"{info['model']}: {params}MACs {d['macs_before']:,} -> "
        f"{d['macs_after']:,} (the pruned network's description)")


# Plain text for --help (the module docstring is reStructuredText).
DESCRIPTION = (
    "Convert between this project's JAX variables and PyTorch / ONNX files: "
    "import a packed DSP file or a state dict, export a run or a variables "
    "directory, inspect any of them. See docs/export.md.")


def build_parser(prog: str = "python -m convert") -> argparse.ArgumentParser:
  """The command line of ``python -m convert`` (every option with help)."""
  parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser(
      "import", help="TorchScript/state dict -> variables dir",
      description="Read a packed DSP TorchScript file (ours or a released "
      "one) or a reference-format / torchvision / timm state dict into a "
      "variables directory (variables.npz + model.json).")
  p.add_argument("src", help="the file to import")
  p.add_argument("--out", required=True, help="variables directory to write")
  p.add_argument("--model", help="registry name (state dicts of other "
                 "architectures than the DSP CifarResNet)")
  _add_export_arguments(sub.add_parser(
      "export", help="variables or run stage dir -> PyTorch and ONNX files",
      description="Export a run, one of its stage directories or a "
      "variables directory; every file's logits are checked against the "
      "JAX model's."))
  p = sub.add_parser(
      "inspect", help="summary (and layers) of a file or directory",
      description="Summarise a run, stage or variables directory, or any "
      "file export writes: parameters and MACs (both measures), DSP "
      "branches; --layers adds one row per layer.")
  p.add_argument("src", help="a file or directory to inspect")
  p.add_argument("--model", help="registry name of a state dict of another "
                 "architecture than the DSP CifarResNet")
  p.add_argument("--layers", action="store_true",
                 help="also print one row per layer (columns explained in "
                 "the table's header)")
  return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m convert"
         ) -> int:
  """Entry point of ``python -m convert``."""
  args = build_parser(prog).parse_args(argv)

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
      print(inspect(args.src, args.model, args.layers))

  return errors.call(work, outputs=[getattr(args, "out", None)], status=2)
