"""The one writer of exported files: save, reload, check.

``write(module, out_dir, names, images, want)`` writes a torch module as
TorchScript (``torch.jit.load``), a ``torch.export`` program
(``torch.export.load(path).module()``), a state dict (``torch.load(path,
weights_only=True)``) and, when asked, ONNX (opset 17; onnxruntime), each
atomically, beside ``reference_io.npz`` (the check images and the JAX
logits). Every file's logits are checked against the JAX logits, in this
process and, where the kind allows, in a fresh interpreter
(``python -m convert.reload``), before the result is returned; the module's
layer widths are checked against the pruned network's description.

Modules take NCHW float images, as PyTorch models do.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys
import warnings
from typing import Any, Mapping

import jax
import numpy as np
import torch

from training import artifacts
from training import integrity

REFERENCE_IO = "reference_io.npz"
TORCHSCRIPT, PROGRAM, STATE_DICT, ONNX = "torchscript", "program", \
    "state_dict", "onnx"
ONNX_OPSET = 17


class ConversionMismatch(ValueError):
  """Converted model's logits differ from the source's beyond tolerance (a
  ValueError: reported as one line, like other unusable inputs)."""


@dataclasses.dataclass
class ExportResult:
  """What an export wrote and measured.

  Attributes:
    files: written paths by name (``reference_io.npz`` included).
    max_abs_diff: per file (and ``module``), max |logit - JAX logit|.
    notes: remarks for the report (skipped files, reasons).
    details: format-specific figures (branches, widths, parameter counts).
  """

  files: dict[str, pathlib.Path]
  max_abs_diff: dict[str, float]
  notes: list[str] = dataclasses.field(default_factory=list)
  details: dict[str, Any] = dataclasses.field(default_factory=dict)


def random_images(n: int, image_size: int | tuple[int, int] = 32,
                  seed: int = 0, channels: int = 3) -> np.ndarray:
  """``n`` standard-normal NHWC images (float32) from ``jax.random.key(seed)``."""
  hw = (image_size, image_size) if isinstance(image_size, int) else tuple(
      image_size)
  x = jax.random.normal(jax.random.key(seed), (n, *hw, channels))
  return np.asarray(x, np.float32)


def check_images(model: Any, variables: Mapping[str, Any],
                 input_shape: tuple[int, int, int],
                 images: np.ndarray | None = None, num_images: int = 4,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The images an export is checked on (``num_images`` random ones of
  ``input_shape`` (H, W, C) when None) and the masked JAX model's logits."""
  if images is None:
    images = random_images(num_images, input_shape[:2], seed, input_shape[2])
  return images, artifacts.logits(model, variables, images)


def torch_logits(module: Any, images_nhwc: np.ndarray) -> np.ndarray:
  """Logits of a torch module (eval, no grad) for NHWC images."""
  # A copy: a 1-channel transpose is already contiguous, and read-only.
  x = torch.from_numpy(np.array(images_nhwc.transpose(0, 3, 1, 2), order="C"))
  # No profiling/fusion passes: one call, and they cost seconds on CPU.
  with torch.no_grad(), torch.jit.optimized_execution(False):
    return module(x).detach().cpu().numpy()


def check_logits(name: str, got: np.ndarray, want: np.ndarray,
                 atol: float) -> float:
  """Max |got - want|; raises ``ConversionMismatch`` naming ``name`` beyond
  ``atol``."""
  diff = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
  if not diff <= atol:
    raise ConversionMismatch(
        f"{name}: logits differ from the JAX model by {diff:.3g} > {atol:g}")
  return diff


# Torch's own file writers abort the process on a full disk instead of
# raising: every file is serialised in memory and written atomically.
save = artifacts.write_with


def write_reference_io(out_dir: pathlib.Path, images: np.ndarray,
                       want: np.ndarray) -> pathlib.Path:
  """``reference_io.npz``: ``images`` (NHWC), ``images_nchw``, ``logits``."""
  return save(
      out_dir / REFERENCE_IO,
      lambda f: np.savez(f, images=images,
                         images_nchw=images.transpose(0, 3, 1, 2),
                         logits=want))


def _example(module: torch.nn.Module, batch: int, hw: tuple[int, int],
             channels: int) -> torch.Tensor:
  tensors = list(module.parameters()) + list(module.buffers())
  dtype = next((t.dtype for t in tensors if t.is_floating_point()),
               torch.float32)
  return torch.zeros(batch, channels, *hw, dtype=dtype)


def write(module: torch.nn.Module, out_dir: str | os.PathLike,
          names: Mapping[str, str], images: np.ndarray, want: np.ndarray, *,
          atol: float = 1e-4, fresh: bool = True) -> ExportResult:
  """Writes a torch module equivalent to a JAX model, checking each file.

  Args:
    module: the torch module (eval mode, CPU; NCHW input).
    out_dir: directory to write into (created).
    names: file name per kind to write: ``torchscript``, ``program``,
      ``state_dict``, ``onnx`` (kinds left out are not written).
    images: NHWC check images.
    want: the JAX logits of ``images``.
    atol: largest accepted |logit| difference.
    fresh: also reload the files in a fresh interpreter.

  Returns:
    The written files and measured differences (keyed by file name, plus
    ``module`` for the module itself).

  Raises:
    ConversionMismatch: a file's logits differ by more than ``atol``.
  """
  out_dir = pathlib.Path(out_dir)
  module = module.eval()
  hw, channels = images.shape[1:3], images.shape[3]
  diffs = {"module": check_logits("converted module",
                                  torch_logits(module, images), want, atol)}
  files = {REFERENCE_IO: write_reference_io(out_dir, images, want)}
  if TORCHSCRIPT in names:
    name = names[TORCHSCRIPT]
    traced = module
    if not isinstance(module, torch.jit.ScriptModule):  # else: as it is
      with torch.no_grad():
        traced = torch.jit.trace(module, _example(module, 1, hw, channels),
                                 check_trace=False)
    files[name] = save(out_dir / name, lambda f: torch.jit.save(traced, f))
    diffs[name] = check_logits(name, torch_logits(
        torch.jit.load(str(files[name])), images), want, atol)
  if PROGRAM in names:
    name = names[PROGRAM]
    # Batch 2 in the example: a size-1 dimension would be specialised.
    ep = torch.export.export(
        module, (_example(module, 2, hw, channels),),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    files[name] = save(out_dir / name, lambda f: torch.export.save(ep, f))
    diffs[name] = check_logits(name, torch_logits(
        torch.export.load(str(files[name])).module(), images), want, atol)
  if STATE_DICT in names:
    name = names[STATE_DICT]
    state = {k: t.detach().clone() for k, t in module.state_dict().items()}
    files[name] = save(out_dir / name, lambda f: torch.save(state, f))
    reloaded = copy.deepcopy(module)
    with torch.no_grad():
      for t in list(reloaded.parameters()) + list(reloaded.buffers()):
        if t.is_floating_point():
          t.zero_()
    reloaded.load_state_dict(torch.load(files[name], weights_only=True))
    diffs[name] = check_logits(name, torch_logits(reloaded, images), want,
                               atol)
  if ONNX in names:
    name = names[ONNX]
    files[name] = _write_onnx(module, out_dir / name, hw, channels)
    diffs[name] = check_logits(name, onnx_logits(files[name], images), want,
                               atol)
  if fresh:
    kinds = {k: files[n] for k, n in names.items()
             if k != STATE_DICT and n in files}
    for name, diff in reload_in_fresh_interpreter(
        kinds, files[REFERENCE_IO]).items():
      if not diff <= atol:
        raise ConversionMismatch(
            f"{name} (a fresh interpreter): logits differ from the JAX model "
            f"by {diff:.3g} > {atol:g}")
      diffs[f"{name} (fresh interpreter)"] = diff
  return ExportResult(files, diffs)


def _write_onnx(module: torch.nn.Module, path: pathlib.Path,
                hw: tuple[int, int], channels: int) -> pathlib.Path:
  buf = io.BytesIO()
  with warnings.catch_warnings(), torch.no_grad():
    # The TorchScript-based exporter (the export-based one needs onnxscript).
    warnings.simplefilter("ignore")
    torch.onnx.export(module, (_example(module, 2, hw, channels),), buf,
                      input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"},
                                    "logits": {0: "batch"}},
                      opset_version=ONNX_OPSET, dynamo=False)
  return integrity.atomic_write(path, buf.getvalue())


def onnx_logits(path: str | os.PathLike, images_nhwc: np.ndarray
                ) -> np.ndarray:
  """Logits of an ONNX file under onnxruntime's CPU provider."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  session = ort.InferenceSession(str(path),
                                 providers=["CPUExecutionProvider"])
  x = np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))
  return session.run(None, {session.get_inputs()[0].name: x})[0]


def reload_in_fresh_interpreter(files: Mapping[str, pathlib.Path],
                                reference_io: pathlib.Path
                                ) -> dict[str, float]:
  """Max |logit difference| of each file loaded by a new Python process.

  Args:
    files: path per kind (``torchscript``, ``program``, ``onnx``).
    reference_io: the ``reference_io.npz`` written beside them.

  Returns:
    File name -> max |logits - reference logits|.

  Raises:
    ConversionMismatch: the fresh interpreter could not load a file.
  """
  if not files:
    return {}
  args = [f"{k}={p}" for k, p in files.items()]
  proc = subprocess.run(
      [sys.executable, "-m", "convert.reload", str(reference_io), *args],
      capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": os.pathsep.join(
          [str(pathlib.Path(__file__).resolve().parents[1]),
           os.environ.get("PYTHONPATH", "")])})
  if proc.returncode != 0:
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise ConversionMismatch(f"a fresh interpreter could not load "
                             f"{', '.join(p.name for p in files.values())}: "
                             f"{last}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def is_torchscript(path: pathlib.Path) -> bool:
  """True for a ``torch.jit.save`` archive (a zip with a ``code/`` tree)."""
  import zipfile  # pylint: disable=import-outside-toplevel
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any("/code/__torch__/" in "/" + n for n in z.namelist())


def module_widths(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
  """(inputs, outputs) of every Conv2d and Linear, by module name."""
  out = {}
  for name, m in module.named_modules():
    if isinstance(m, torch.nn.Conv2d):
      out[name] = (m.in_channels, m.out_channels)
    elif isinstance(m, torch.nn.Linear):
      out[name] = (m.in_features, m.out_features)
  return out


def to_json(result: ExportResult) -> str:
  """The result as JSON (paths as strings)."""
  return json.dumps({"files": {k: str(v) for k, v in result.files.items()},
                     "max_abs_diff": result.max_abs_diff,
                     "notes": result.notes}, indent=1, default=str)
