"""``preprocess.json``: how to feed an exported model.

Every export directory gets one (``write``), beside the model files::

  {"layout": "NCHW", "shape": [3, 32, 32], "dtype": "float32",
   "channel_order": "RGB", "value_range": [0, 255],
   "mean": [0.4914, ...], "std": [0.247, ...],
   "formula": "x = (pixels / 255 - mean) / std", ...}

The exported networks take normalised input, as the training steps feed
them: pixels on the 0..255 scale, divided by 255, minus ``mean``, divided by
``std`` per channel (``mean``/``std`` on the 0..1 scale), NCHW float32.
``embed_normalisation`` rewrites a TorchScript file to do that itself (it
then takes the 0..255 pixels as float32 NCHW); ``raw_input_files`` lists the
files that were rewritten. The original-format DSP file (``packed.pt``)
always keeps the authors' normalised input.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from training import integrity

FILE = "preprocess.json"
FORMULA = "x = (pixels / 255 - mean) / std"


def spec(image_size: int, channels: int, mean: Sequence[float],
         std: Sequence[float], dataset: str | None = None,
         raw_input_files: Sequence[str] = ()) -> dict[str, Any]:
  """The contents of ``preprocess.json``.

  Args:
    image_size: input height = width.
    channels: input channels.
    mean: per-channel mean, 0..1 scale.
    std: per-channel standard deviation, 0..1 scale.
    dataset: the training dataset's name.
    raw_input_files: file names that embed the normalisation.

  Returns:
    The JSON-ready dict.
  """
  return {
      "dataset": dataset, "layout": "NCHW",
      "shape": [int(channels), int(image_size), int(image_size)],
      "dtype": "float32",
      "channel_order": {3: "RGB", 1: "grey"}.get(channels,
                                                  f"{channels} channels"),
      "value_range": [0, 255], "mean": [float(m) for m in mean],
      "std": [float(s) for s in std], "formula": FORMULA,
      "raw_input_files": sorted(raw_input_files),
      "note": ("files in raw_input_files apply the formula themselves and "
               "take the 0..255 pixels (float32 NCHW); every other file "
               "takes x"),
  }


def from_info(info: Any, raw_input_files: Sequence[str] = ()
              ) -> dict[str, Any]:
  """``spec`` of a ``training.data.DatasetInfo``."""
  return spec(info.image_size, info.channels, info.mean, info.std,
              getattr(info, "name", None), raw_input_files)


def write(out_dir: str | os.PathLike, info: Any,
          raw_input_files: Sequence[str] = ()) -> pathlib.Path:
  """Writes ``out_dir/preprocess.json`` for a dataset's input.

  Args:
    out_dir: the export directory.
    info: a ``DatasetInfo`` (image_size, channels, mean, std, name) or a
      ``spec`` dict.
    raw_input_files: file names that embed the normalisation.

  Returns:
    The written path.
  """
  content = (dict(info) if isinstance(info, Mapping)
             else from_info(info, raw_input_files))
  if raw_input_files:
    content["raw_input_files"] = sorted(raw_input_files)
  return integrity.atomic_write(pathlib.Path(out_dir) / FILE,
                                json.dumps(content, indent=1) + "\n")


def read(out_dir: str | os.PathLike) -> dict[str, Any]:
  """The ``preprocess.json`` of an export directory."""
  return json.loads((pathlib.Path(out_dir) / FILE).read_text())


def summary(content: Mapping[str, Any]) -> str:
  """One line: layout, shape, formula, mean and std."""
  fmt = lambda xs: "(" + ", ".join(f"{x:.4g}" for x in xs) + ")"
  shape = "x".join(map(str, content["shape"]))
  text = (f"{content['layout']} float32 {shape} {content['channel_order']}, "
          f"{content['formula']}, mean {fmt(content['mean'])}, std "
          f"{fmt(content['std'])}")
  if content.get("raw_input_files"):
    text += ("; files taking the 0..255 pixels themselves: "
             + ", ".join(content["raw_input_files"]))
  return text


def normalise(pixels_nhwc: np.ndarray, content: Mapping[str, Any]
              ) -> np.ndarray:
  """NHWC pixels (0..255) -> the NCHW float32 input of the exported model."""
  mean = np.asarray(content["mean"], np.float32)
  std = np.asarray(content["std"], np.float32)
  x = (np.asarray(pixels_nhwc, np.float32) / 255.0 - mean) / std
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def embed_normalisation(path: str | os.PathLike,
                        content: Mapping[str, Any]) -> pathlib.Path:
  """Rewrites a TorchScript file to take 0..255 pixels (float32 NCHW).

  Args:
    path: a ``torch.jit.save`` file taking normalised input.
    content: the ``spec`` of its input.

  Returns:
    ``path``.
  """
  import torch  # Imported here: only exports need it.

  class Normalised(torch.nn.Module):
    """``model((x / 255 - mean) / std)``."""

    def __init__(self, model, mean, std):
      super().__init__()
      self.model = model
      self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
      self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return self.model((x / 255.0 - self.mean) / self.std)

  from convert import writer  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  model = torch.jit.load(str(path), map_location="cpu")
  wrapped = torch.jit.script(Normalised(model, content["mean"],
                                        content["std"]))
  return writer.save(path, lambda f: torch.jit.save(wrapped, f))


# Files that keep the authors' input format whatever is asked.
ORIGINAL_FORMAT = ("packed.pt",)


def finish(out_dir: str | os.PathLike, info: Any,
           files: Mapping[str, str | os.PathLike],
           with_preprocess: bool = False) -> dict[str, Any]:
  """Writes ``preprocess.json`` beside an export's files.

  Args:
    out_dir: the export directory.
    info: the input's ``DatasetInfo`` (or a ``spec`` dict).
    files: the export's written files.
    with_preprocess: also embed the normalisation into the TorchScript files
      other than the original-format ``packed.pt``.

  Returns:
    ``{'file': path, 'summary': one line}`` for the report.
  """
  from convert.writer import is_torchscript  # pylint: disable=import-outside-toplevel
  raw = []
  if with_preprocess:
    content = dict(info) if isinstance(info, Mapping) else from_info(info)
    for p in map(pathlib.Path, files.values()):
      if (p.suffix == ".pt" and p.name not in ORIGINAL_FORMAT
          and is_torchscript(p)):
        embed_normalisation(p, content)
        raw.append(p.name)
  path = write(out_dir, info, raw)
  return {"file": str(path), "summary": summary(read(out_dir))}
