"""Export any pruned model: compact JAX function, PyTorch and ONNX files.

``export(model, variables, out_dir, input_shape)`` describes the pruned
network (``convert.description``), builds its compact program
(``convert.program``), checks the compact JAX function against the masked
model, lowers the program to PyTorch (``convert.torch_program``), checks the
layer widths against the description and writes, through the one writer
(``convert.writer``):

* ``model.pt``   TorchScript (``torch.jit.load``);
* ``model.pt2``  a ``torch.export`` program;
* ``model_state_dict.pt``  its tensors by module path
  (``torch.load(path, weights_only=True)``);
* ``model.onnx`` ONNX (opset 17, checked with onnxruntime);
* ``reference_io.npz``.

Registry families add their own formats through ``convert.cli`` (the
released DSP format, slim, branched, fast); every one is checked the same
way.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from convert import program as compact_lib
from convert import description as desc_lib
from convert import torch_program
from convert import writer

FILES = {writer.TORCHSCRIPT: "model.pt", writer.PROGRAM: "model.pt2",
         writer.STATE_DICT: "model_state_dict.pt", writer.ONNX: "model.onnx"}


def export(model: Any, variables: Mapping[str, Any],
           out_dir: str | os.PathLike,
           input_shape: Sequence[int] | None = None, *,
           kinds: Sequence[str] = tuple(FILES),
           images: np.ndarray | None = None, num_images: int = 4,
           seed: int = 0, atol: float = 1e-4, fresh: bool = True,
           description: desc_lib.Description | None = None
           ) -> writer.ExportResult:
  """Writes the PyTorch and ONNX files of any pruned Flax model.

  Args:
    model: any Flax Linen model (plain or ``models.prunable``-wrapped).
    variables: its variables with their ``masks`` (numpy or jax arrays).
    out_dir: directory to write into (created).
    input_shape: (H, W, C) (default: the model's image size, 3 channels).
    kinds: which of ``FILES`` to write.
    images: NHWC check images; ``num_images`` random ones when None.
    num_images: number of random check images.
    seed: seed of the random images.
    atol: largest accepted |logit| difference.
    fresh: also reload the files in a fresh interpreter.
    description: the pruned network's description (computed when None).

  Returns:
    The files by name, each file's max |logit difference| against the
    masked JAX model (``compact`` is the compact JAX function's), and in
    ``details`` the parameters, MACs and widths before and after.

  Raises:
    convert.compact.UnsupportedOperation: an operation the export cannot
      translate, before any file is written.
    convert.writer.ConversionMismatch: logits beyond ``atol``.
    convert.description.WidthMismatch: a written layer's widths differ from
      the description's.
  """
  if description is None:
    description = desc_lib.describe(model, variables, input_shape)
  program = compact_lib.build(model, variables, description)
  missing = torch_program.unsupported(program)
  if missing:
    raise compact_lib.UnsupportedOperation(
        "the export cannot translate the JAX primitive(s) "
        + ", ".join(missing))
  shape = description.input_shape
  images, want = writer.check_images(model, variables, shape, images,
                                     num_images, seed)
  diffs = {"compact": writer.check_logits(
      "compact JAX function",
      compact_lib.run(program, program.consts, jnp.asarray(images)), want,
      atol)}
  module = torch_program.module(program)
  desc_lib.check_widths(description, program.widths)
  result = writer.write(module, pathlib.Path(out_dir),
                        {k: FILES[k] for k in kinds}, images, want,
                        atol=atol, fresh=fresh)
  result.max_abs_diff = {**diffs, **result.max_abs_diff}
  result.details.update(params_after=program.num_params,
                        widths=dict(program.widths))
  return result
