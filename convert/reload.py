"""Loads exported files in a fresh interpreter and prints their logits' error.

    python -m convert.reload reference_io.npz torchscript=a.pt program=a.pt2
        onnx=a.onnx

Prints one JSON line: file name -> max |logits - reference logits| on the
reference images. Run by ``convert.writer`` after every export, so that a
file that only loads in the exporting process (a module class it needs, a
cached state) is caught.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np


def logits(kind: str, path: str, images_nchw: np.ndarray) -> np.ndarray:
  """Logits of one exported file on NCHW images."""
  if kind == "onnx":
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images_nchw})[0]
  import torch  # pylint: disable=import-outside-toplevel
  if kind == "program":
    module = torch.export.load(path).module()
  else:
    module = torch.jit.load(path)
  with torch.no_grad():
    return module(torch.from_numpy(images_nchw)).numpy()


def main(argv: list[str]) -> int:
  io = np.load(argv[0])
  images = np.ascontiguousarray(io["images_nchw"])
  out = {}
  for arg in argv[1:]:
    kind, path = arg.split("=", 1)
    got = logits(kind, path, images)
    out[pathlib.Path(path).name] = float(np.max(np.abs(got - io["logits"])))
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
