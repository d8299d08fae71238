"""``bash bench/device_check.sh --cpu-smoke`` prints its whole table on CPU.

Every row of the accelerator check appears: the train steps measured (tiny
sizes), the JAX inference rows measured, and the rows that need a GPU (torch
on CUDA, onnxruntime's CUDA provider) skipped with their reason, never
failed. No GPU is needed or used.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ("plain", "DSP group", "DDROP")
INFER = {"fast.pt CUDA fp32": "float32", "fast.pt CUDA fp16": "float16",
         "ONNX CUDA": "float32", "JAX compact": "float32"}


def test_cpu_smoke_prints_every_row():
  env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu",
         "CUDA_VISIBLE_DEVICES": ""}
  proc = subprocess.run(["bash", "bench/device_check.sh", "--cpu-smoke"],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  table = proc.stdout[proc.stdout.index("| check | model |"):]
  rows = {}
  for line in table.splitlines()[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows[(cells[0], cells[2], cells[3])] = (cells[4], cells[5])
  want = {(f"train {k}", d, "8") for k in TRAIN
          for d in ("float32", "bfloat16")}
  want |= {(f"infer {k}", d, b) for k, d in INFER.items() for b in "14"}
  assert set(rows) == want
  for key, (result, status) in rows.items():
    if "CUDA" in key[0]:
      assert status.startswith("skipped: "), (key, status)
    else:
      assert status == "ok", (key, status)
  for key in want:
    if key[0].startswith("train"):
      assert re.fullmatch(r"[0-9.]+ img/s", rows[key][0]), rows[key]
  assert re.match(r"pruned [0-9.]+ ms, dense [0-9.]+ ms",
                  rows[("infer JAX compact", "float32", "1")][0])
